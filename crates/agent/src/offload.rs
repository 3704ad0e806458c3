//! Large parts of a report travel ahead of it as blobs: a stream or an output value over
//! [`INLINE_MAX`] is kept in the outbox by its sha256, uploaded before the report and named in
//! [`ShardReport::blobs`], so that no report comes near the coordinator's request limit
//! whatever `limits.max_output` allows.

use fleetbox_proto::api::{ReportBlobs, ShardReport};
use sha2::{Digest, Sha256};

use crate::outbox::Outbox;

/// The most bytes of a stream, or of the output's JSON text, sent inside the report itself.
pub const INLINE_MAX: usize = 256 << 10;

/// Move the report's large parts into outbox blobs; returns their hashes (to upload first).
/// On a write error the part stays inline: the report is then as large as it was.
pub fn offload(record: &mut ShardReport, outbox: &Outbox) -> Vec<String> {
    let mut blobs = ReportBlobs::default();
    let report = &mut record.report;
    let keep = |data: &[u8]| -> Option<String> {
        let sha = hex::encode(Sha256::digest(data));
        match outbox.put_blob(&sha, data) {
            Ok(()) => Some(sha),
            Err(e) => {
                tracing::error!(error = %e, "could not keep a report part in the outbox; it goes inline");
                None
            }
        }
    };
    if report.stdout.len() > INLINE_MAX
        && let Some(sha) = keep(report.stdout.as_bytes())
    {
        report.stdout = String::new();
        blobs.stdout = Some(sha);
    }
    if report.stderr.len() > INLINE_MAX
        && let Some(sha) = keep(report.stderr.as_bytes())
    {
        report.stderr = String::new();
        blobs.stderr = Some(sha);
    }
    if let Some(value) = &report.output {
        let text = serde_json::to_vec(value).unwrap_or_default();
        if text.len() > INLINE_MAX
            && let Some(sha) = keep(&text)
        {
            report.output = None;
            blobs.output = Some(sha);
        }
    }
    let hashes = blobs.hashes().map(str::to_string).collect();
    record.blobs = blobs;
    hashes
}

#[cfg(test)]
mod tests {
    use fleetbox_proto::{ExecutionReport, Status};

    use super::*;

    #[test]
    fn only_large_parts_leave_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        let mut report = ExecutionReport::unmeasured(
            Status::Ok,
            Some(serde_json::json!({"pad": "x".repeat(INLINE_MAX)})),
        );
        report.stdout = "y".repeat(INLINE_MAX + 1);
        report.stderr = "small".into();
        let mut record = ShardReport::new("l1", 1, report);
        let hashes = offload(&mut record, &outbox);
        assert_eq!(hashes.len(), 2);
        assert!(record.report.stdout.is_empty());
        assert_eq!(record.report.stderr, "small");
        assert!(record.report.output.is_none());
        assert!(record.blobs.stderr.is_none());
        let stdout = outbox.blob(record.blobs.stdout.as_ref().unwrap()).unwrap();
        assert_eq!(stdout.len(), INLINE_MAX + 1);
        let output: serde_json::Value =
            serde_json::from_slice(&outbox.blob(record.blobs.output.as_ref().unwrap()).unwrap())
                .unwrap();
        assert_eq!(output["pad"].as_str().unwrap().len(), INLINE_MAX);
        // Serialized, the report is now small.
        assert!(serde_json::to_vec(&record).unwrap().len() < 4096);
    }
}
