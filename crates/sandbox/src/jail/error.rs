//! Why a jail could not be set up, as a type: each variant says what was being done.

use std::io;

/// A failure while preparing or starting a jail. Inside the namespace init it travels to the
/// supervisor as its message (the init is another process); everywhere else it stays typed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call or file operation failed while doing `doing`.
    #[error("{doing}: {source}")]
    Os {
        doing: String,
        #[source]
        source: io::Error,
    },
    /// The host cannot run jails (no user namespaces, not Linux, a sysctl off).
    #[error("{why}")]
    Unsupported { why: String },
    /// The jail configuration could not be read or encoded.
    #[error("jail configuration: {0}")]
    Config(#[from] serde_json::Error),
    /// The other side of a setup handshake went away or broke the protocol.
    #[error("{what}")]
    Protocol { what: String },
    /// What every backend needs failed (the interpreter, the workspace).
    #[error(transparent)]
    Sandbox(#[from] crate::SandboxError),
    /// The jail could not start on this host; `error` says why.
    #[error(
        "{error}; `fleetbox doctor --backend jail` says how to fix this host, or use `--backend process`"
    )]
    HostCannotJail { error: Box<JailError> },
}

impl JailError {
    /// `doing` failed with `source`.
    pub fn os(doing: impl Into<String>, source: io::Error) -> JailError {
        JailError::Os {
            doing: doing.into(),
            source,
        }
    }

    /// `doing` failed with the calling thread's `errno`.
    pub fn last_os(doing: impl Into<String>) -> JailError {
        JailError::os(doing, io::Error::last_os_error())
    }

    pub fn protocol(what: impl Into<String>) -> JailError {
        JailError::Protocol { what: what.into() }
    }

    pub fn unsupported(why: impl Into<String>) -> JailError {
        JailError::Unsupported { why: why.into() }
    }
}
