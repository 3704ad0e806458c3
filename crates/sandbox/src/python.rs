//! Finding the Python interpreter that runs user code.

use std::path::{Path, PathBuf};

use crate::SandboxError;

/// The interpreter a run uses.
#[derive(Debug, Clone)]
pub struct Python {
    /// As configured or found (what the program sees as `sys.executable`).
    pub path: PathBuf,
    /// With symlinks resolved.
    pub real: PathBuf,
    /// `3.11`, from the real binary's name; `unknown` if it does not say.
    pub version: String,
    /// Installation prefix (`/usr` for `/usr/bin/python3.11`): what the jail must bind.
    pub prefix: PathBuf,
}

/// Default search order: the system interpreter first (it lives under `/usr` only, which keeps
/// the jail's bind mounts small, and version managers' shims are shell scripts that add tens of
/// milliseconds), then `python3` on `PATH`.
pub fn resolve(explicit: Option<&Path>) -> Result<Python, SandboxError> {
    let path = match explicit {
        Some(p) => {
            if !p.exists() {
                return Err(SandboxError::PythonMissing {
                    looked: p.display().to_string(),
                });
            }
            p.to_path_buf()
        }
        None => find_default().ok_or_else(|| SandboxError::PythonMissing {
            looked: "/usr/bin/python3, /usr/local/bin/python3, python3 on PATH".into(),
        })?,
    };
    let real = std::fs::canonicalize(&path).map_err(|_| SandboxError::PythonMissing {
        looked: path.display().to_string(),
    })?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let version = name
        .strip_prefix("python")
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .unwrap_or("unknown")
        .to_string();
    let prefix = real
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/usr"));
    Ok(Python {
        path,
        real,
        version,
        prefix,
    })
}

fn find_default() -> Option<PathBuf> {
    for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(p).exists() {
            return Some(PathBuf::from(p));
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("python3"))
        .find(|p| p.is_file())
}
