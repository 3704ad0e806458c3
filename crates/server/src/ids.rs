//! Random identifiers and secrets.

use sha2::{Digest, Sha256};

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the OS random source is unavailable");
    hex::encode(buf)
}

pub fn job_id() -> String {
    format!("job_{}", random_hex(8))
}

pub fn session_id() -> String {
    format!("ses_{}", random_hex(8))
}

pub fn agent_id() -> String {
    format!("agt_{}", random_hex(8))
}

/// A secret token (shown once; only its hash is stored).
pub fn token(prefix: &str) -> String {
    format!("fbx_{prefix}_{}", random_hex(24))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
