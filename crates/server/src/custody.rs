//! Custody of the audit log outside the database: the key this coordinator signs checkpoints
//! and prunes with, the keys it believes, the journal of the checkpoints it made, and where
//! they are shipped as they are made.
//!
//! Someone with the database alone can rewrite entries and re-chain them, but cannot sign a
//! checkpoint with a pinned key, nor make this coordinator forget the checkpoints it journaled
//! (`DATA/audit-checkpoints.jsonl`) or shipped elsewhere: verification (`Store::audit_verify`
//! with these [`Pins`]) fails on a checkpoint signed by another key, a journaled checkpoint
//! missing or changed, and entries removed without a signed prune.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetbox_proto::api::AuditCheckpoint;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::store::audit::{Pins, parse_public_key};

/// How long a checkpoint's shipping command or webhook may take.
const SHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// Checkpoints kept for a sink that keeps failing, oldest dropped first (they stay in the
/// database and the journal: `fleetbox audit checkpoints` exports them again).
const MAX_UNSENT: usize = 10_000;

/// What went wrong keeping the audit log's custody files.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    #[error("`{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line of a keys or checkpoints file that does not parse.
    #[error("`{}`: line {line}: {why}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        why: String,
    },
    /// An `--audit-ship` target that names no sink.
    #[error("`{0}`: ship checkpoints to `file:PATH`, `exec:COMMAND` or an http(s) URL")]
    Sink(String),
}

/// Why a checkpoint did not reach a sink (it is tried again at the next checkpoint).
#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("could not start it: {0}")]
    Start(std::io::Error),
    #[error("no stdin")]
    NoStdin,
    #[error("still running after {}s", SHIP_TIMEOUT.as_secs())]
    Timeout,
    #[error("{status}: {stderr}")]
    Failed {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("answered {0}")]
    Answered(reqwest::StatusCode),
}

/// Where checkpoints go as they are made (`--audit-ship`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// `file:PATH`: appended as JSON lines.
    File(PathBuf),
    /// `exec:COMMAND`: `sh -c COMMAND`, the checkpoint's JSON line on its stdin, once each.
    Exec(String),
    /// `http://…` or `https://…`: the checkpoint's JSON `POST`ed.
    Webhook(String),
}

impl Sink {
    pub fn parse(text: &str) -> Result<Sink, CustodyError> {
        let bad = || CustodyError::Sink(text.to_string());
        if let Some(path) = text.strip_prefix("file:") {
            (!path.is_empty())
                .then(|| Sink::File(PathBuf::from(path)))
                .ok_or_else(bad)
        } else if let Some(command) = text.strip_prefix("exec:") {
            (!command.trim().is_empty())
                .then(|| Sink::Exec(command.to_string()))
                .ok_or_else(bad)
        } else if text.starts_with("http://") || text.starts_with("https://") {
            reqwest::Url::parse(text).map_err(|_| bad())?;
            Ok(Sink::Webhook(text.to_string()))
        } else {
            Err(bad())
        }
    }

    fn name(&self) -> String {
        match self {
            Sink::File(p) => format!("file:{}", p.display()),
            Sink::Exec(c) => format!("exec:{c}"),
            Sink::Webhook(u) => u.clone(),
        }
    }

    async fn send(&self, line: &str, http: &reqwest::Client) -> Result<(), ShipError> {
        match self {
            Sink::File(path) => Ok(append_line(path, line)?),
            Sink::Exec(command) => {
                let mut child = tokio::process::Command::new("sh")
                    .args(["-c", command])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(ShipError::Start)?;
                let mut stdin = child.stdin.take().ok_or(ShipError::NoStdin)?;
                let ran = tokio::time::timeout(SHIP_TIMEOUT, async {
                    stdin.write_all(format!("{line}\n").as_bytes()).await?;
                    drop(stdin);
                    child.wait_with_output().await
                })
                .await
                .map_err(|_| ShipError::Timeout)??;
                if ran.status.success() {
                    Ok(())
                } else {
                    let stderr = String::from_utf8_lossy(&ran.stderr);
                    Err(ShipError::Failed {
                        status: ran.status,
                        stderr: stderr.trim().to_string(),
                    })
                }
            }
            Sink::Webhook(url) => {
                let resp = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(line.to_string())
                    .timeout(SHIP_TIMEOUT)
                    .send()
                    .await?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(ShipError::Answered(resp.status()))
                }
            }
        }
    }
}

/// Append `line` and a newline to `path` and make it durable.
fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_data()
}

/// The keys in a `--audit-trusted-keys` file: one ed25519 public key (64 hex digits) per line,
/// `#` to the end of a line is a comment.
pub fn read_trusted_keys(path: &Path) -> Result<Vec<String>, CustodyError> {
    let text = std::fs::read_to_string(path).map_err(|source| CustodyError::Io {
        path: path.into(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let key = line.split('#').next().unwrap_or("").trim();
            (!key.is_empty()).then(|| {
                parse_public_key(key).map_err(|why| CustodyError::Line {
                    path: path.into(),
                    line: i + 1,
                    why,
                })
            })
        })
        .collect()
}

/// The checkpoints in a JSON-lines file (the journal, or `fleetbox audit checkpoints`'s
/// output), naming the line that does not parse.
pub fn read_checkpoints(path: &Path) -> Result<Vec<AuditCheckpoint>, CustodyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CustodyError::Io {
                path: path.into(),
                source,
            });
        }
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| CustodyError::Line {
                path: path.into(),
                line: i + 1,
                why: e.to_string(),
            })
        })
        .collect()
}

/// The coordinator's side of the custody.
pub struct Custody {
    /// Signs checkpoints and prunes (`--audit-key`, default `DATA/audit.key`).
    pub key: ed25519_dalek::SigningKey,
    /// Its own public key and `--audit-trusted-keys`.
    pub keys: BTreeSet<String>,
    /// Every checkpoint this coordinator stored, a JSON line each.
    pub journal: PathBuf,
    sinks: Vec<Sink>,
    /// Per sink, the checkpoints it has not taken yet (tried again each round).
    unsent: Mutex<Vec<Vec<String>>>,
    http: reqwest::Client,
}

impl Custody {
    pub fn new(
        key: ed25519_dalek::SigningKey,
        trusted: Vec<String>,
        journal: PathBuf,
        sinks: Vec<Sink>,
    ) -> Custody {
        let mut keys: BTreeSet<String> = trusted.into_iter().collect();
        keys.insert(hex::encode(key.verifying_key().as_bytes()));
        let unsent = Mutex::new(vec![Vec::new(); sinks.len()]);
        Custody {
            key,
            keys,
            journal,
            sinks,
            unsent,
            http: reqwest::Client::new(),
        }
    }

    pub fn public_key(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// What verification believes: the pinned keys and the journaled checkpoints.
    pub fn pins(&self) -> Result<Pins, CustodyError> {
        Ok(Pins {
            keys: self.keys.clone(),
            checkpoints: read_checkpoints(&self.journal)?,
        })
    }

    /// Journal checkpoints just made (before anything else may happen to them).
    pub fn journal(&self, made: &[AuditCheckpoint]) -> Result<(), CustodyError> {
        for c in made {
            let line = serde_json::to_string(c).expect("a checkpoint serialises");
            append_line(&self.journal, &line).map_err(|source| CustodyError::Io {
                path: self.journal.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Whether any `--audit-ship` sink is set.
    pub fn ships(&self) -> bool {
        !self.sinks.is_empty()
    }

    /// Ship checkpoints just made to every sink, after those a sink has not taken yet; a sink
    /// that fails keeps them for the next round (one round at a time).
    pub async fn ship(&self, made: &[AuditCheckpoint], metrics: &crate::metrics::Registry) {
        let lines: Vec<String> = made
            .iter()
            .filter_map(|c| serde_json::to_string(c).ok())
            .collect();
        let mut unsent = self.unsent.lock().await;
        for (sink, waiting) in self.sinks.iter().zip(unsent.iter_mut()) {
            waiting.extend(lines.iter().cloned());
            let excess = waiting.len().saturating_sub(MAX_UNSENT);
            waiting.drain(..excess);
            let mut sent = 0;
            for line in waiting.iter() {
                match sink.send(line, &self.http).await {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        metrics.audit_ship_failed();
                        tracing::error!(sink = %sink.name(), error = %e, waiting = waiting.len() - sent, "could not ship an audit checkpoint; tried again at the next checkpoint");
                        break;
                    }
                }
            }
            waiting.drain(..sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_and_trusted_keys_parse_or_say_why() {
        assert_eq!(
            Sink::parse("file:/var/log/cp.jsonl").unwrap(),
            Sink::File("/var/log/cp.jsonl".into())
        );
        assert_eq!(
            Sink::parse("exec:logger -t fleetbox").unwrap(),
            Sink::Exec("logger -t fleetbox".into())
        );
        assert!(matches!(
            Sink::parse("https://audit.example/cp"),
            Ok(Sink::Webhook(_))
        ));
        for bad in ["file:", "exec: ", "ftp://x", "/tmp/x", "http://"] {
            assert!(Sink::parse(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let public = hex::encode(key.verifying_key().as_bytes());
        let path = dir.path().join("keys");
        std::fs::write(
            &path,
            format!(
                "# the coordinators\n{}  # a\n\n{public}\n",
                public.to_uppercase()
            ),
        )
        .unwrap();
        assert_eq!(
            read_trusted_keys(&path).unwrap(),
            vec![public.clone(), public]
        );
        std::fs::write(&path, "abcd\n").unwrap();
        let err = read_trusted_keys(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("64 hex digits"),
            "{err}"
        );
    }
}
