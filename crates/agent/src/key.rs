//! The agent's report-signing key: ed25519, made on first start, kept in
//! `state_dir/agent.key` (the 32 secret bytes, mode 0600). Its public half is registered at
//! enrolment; every report is signed with it when sent.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey};

pub const FILE: &str = "agent.key";

/// The agent's key, made (and saved) when there is none.
pub fn load_or_make(state_dir: &Path) -> std::io::Result<SigningKey> {
    let path = state_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let secret: [u8; 32] = bytes.try_into().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("`{}` is not a 32-byte ed25519 secret", path.display()),
                )
            })?;
            Ok(SigningKey::from_bytes(&secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = fresh()?;
            save(state_dir, &key)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// A new key from the operating system's randomness.
pub fn fresh() -> std::io::Result<SigningKey> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(SigningKey::from_bytes(&secret))
}

/// Write `key` to `state_dir/agent.key` atomically, mode 0600.
pub fn save(state_dir: &Path, key: &SigningKey) -> std::io::Result<()> {
    write_private(&state_dir.join(FILE), key.as_bytes())
}

/// Write `bytes` to `path` atomically (a synced temporary file renamed over it), mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

/// The rotation request that replaces `old` with `new` for `agent_id`.
pub fn rotation(
    agent_id: &str,
    old: &SigningKey,
    new: &SigningKey,
) -> fleetbox_proto::api::RotateKeyRequest {
    let public_key = public_hex(new);
    let message = fleetbox_proto::api::RotateKeyRequest::message(agent_id, &public_key);
    fleetbox_proto::api::RotateKeyRequest {
        signature: hex::encode(old.sign(&message).to_bytes()),
        public_key,
    }
}
