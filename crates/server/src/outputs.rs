//! A run's output and measurements as the store keeps them, for agents' reports and the
//! coordinator's own runs alike: the output inline or as a blob with the hash results are
//! compared by, and the measurements as integer columns.

use fleetbox_proto::ExecutionReport;

use crate::blobs::{Blobs, INLINE_LIMIT};
use crate::ids::sha256_hex;

/// The coordinator's hash of an output, the one results are compared by: SHA-256 of its
/// canonical JSON with every integer exact ([`fleetbox_proto::canonical::exact`]; RFC 8785's
/// doubles let 2^60 + 1 pass for 2^60).
pub fn output_hash(v: &serde_json::Value) -> String {
    sha256_hex(fleetbox_proto::canonical::exact(v).as_bytes())
}

/// What the store keeps of a run's measurements (as its integer columns hold them).
pub struct Measures {
    pub wall_ms: i64,
    /// User + system CPU.
    pub cpu_ms: i64,
    pub peak_memory: i64,
    /// stdout + stderr bytes.
    pub bytes_out: i64,
}

impl Measures {
    pub fn of(report: &ExecutionReport) -> Measures {
        let clamp = |n: u64| n.min(i64::MAX as u64) as i64;
        Measures {
            wall_ms: clamp(report.wall_ms),
            cpu_ms: clamp(report.cpu_user_ms.saturating_add(report.cpu_sys_ms)),
            peak_memory: clamp(report.peak_memory_bytes),
            bytes_out: clamp(report.stdout_bytes.saturating_add(report.stderr_bytes)),
        }
    }
}

/// An output as the store keeps it.
pub struct Stored {
    /// Its JSON text, when it fits inline ([`INLINE_LIMIT`]).
    pub text: Option<String>,
    /// Its blob's hash, when it does not.
    pub blob: Option<String>,
    /// [`output_hash`].
    pub hash: String,
}

/// The blob store refused an output.
#[derive(Debug, thiserror::Error)]
#[error("could not store an output blob: {0}")]
pub struct BlobError(#[from] std::io::Error);

/// Keep `v` (whose JSON text is `text`): inline up to [`INLINE_LIMIT`], else as a blob. The
/// value is kept as serde_json writes it, not as the canonical text.
pub fn store(
    blobs: &Blobs,
    owner: Option<&str>,
    v: &serde_json::Value,
    text: String,
) -> Result<Stored, BlobError> {
    let hash = output_hash(v);
    if text.len() <= INLINE_LIMIT {
        return Ok(Stored {
            text: Some(text),
            blob: None,
            hash,
        });
    }
    let blob = blobs.put(owner, text.as_bytes())?;
    Ok(Stored {
        text: None,
        blob: Some(blob),
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_clamp_to_the_columns_and_add_up() {
        let mut r = ExecutionReport::unmeasured(fleetbox_proto::Status::Ok, None);
        r.wall_ms = u64::MAX;
        r.cpu_user_ms = 7;
        r.cpu_sys_ms = 5;
        r.stdout_bytes = u64::MAX;
        r.stderr_bytes = 1;
        let m = Measures::of(&r);
        assert_eq!((m.wall_ms, m.cpu_ms, m.bytes_out), (i64::MAX, 12, i64::MAX));
    }

    #[test]
    fn small_outputs_stay_inline_and_big_ones_go_to_a_blob() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let small = serde_json::json!({"b": 1, "a": 2});
        let s = store(&blobs, None, &small, small.to_string()).unwrap();
        assert_eq!(s.text.as_deref(), Some(small.to_string().as_str()));
        assert_eq!(s.hash, sha256_hex(br#"{"a":2,"b":1}"#));
        let big = serde_json::json!("x".repeat(INLINE_LIMIT + 1));
        let b = store(&blobs, None, &big, big.to_string()).unwrap();
        assert!(b.text.is_none() && b.blob.is_some());
    }
}
