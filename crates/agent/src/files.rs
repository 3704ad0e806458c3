//! Files a shard wrote in its workspace: kept in the outbox (by sha256) so they reach the
//! coordinator's blob store with the report, then the workspace is removed.

use std::path::{Path, PathBuf};

use fleetbox_proto::ExecutionReport;
use sha2::{Digest, Sha256};

use crate::outbox::Outbox;

/// Largest file uploaded, and most bytes per run.
const MAX_FILE: u64 = 16 << 20;
const MAX_TOTAL: u64 = 64 << 20;

/// Copy the run's listed files into the outbox and remove its workspace (not a session's);
/// returns their hashes.
/// Only regular files inside the workspace are taken (a symlink the program left behind is not
/// followed: the agent may be root), and only when their content still has the listed hash.
pub fn collect(report: &mut ExecutionReport, outbox: &Outbox, keep: bool) -> Vec<String> {
    let Some(dir) = report.workspace.take().map(PathBuf::from) else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    if keep {
        let mut skipped = 0usize;
        let mut total = 0u64;
        if let Ok(work) = dir.join("work").canonicalize() {
            for f in &report.files {
                let Some(sha) = &f.sha256 else { continue };
                if f.bytes > MAX_FILE || total + f.bytes > MAX_TOTAL {
                    skipped += 1;
                    continue;
                }
                match read_inside(&work, &f.path, sha) {
                    Some(data) => match outbox.put_blob(sha, &data) {
                        Ok(()) => {
                            total += f.bytes;
                            kept.push(sha.clone());
                        }
                        Err(e) => {
                            tracing::error!(error = %e, file = %f.path, "could not keep a file in the outbox");
                            skipped += 1;
                        }
                    },
                    None => skipped += 1,
                }
            }
        }
        if skipped > 0 {
            report.notes.push(format!(
                "{skipped} created file(s) not uploaded (over {} MiB each or {} MiB in all, not regular, or changed)",
                MAX_FILE >> 20,
                MAX_TOTAL >> 20
            ));
        }
    }
    // A session's workspace lives on with its interpreter (ended with the session).
    if report.session.is_none() {
        fleetbox_sandbox::workspace::discard(&dir);
    }
    kept.sort();
    kept.dedup();
    kept
}

fn read_inside(work: &Path, rel: &str, sha: &str) -> Option<Vec<u8>> {
    let path = work.join(fleetbox_sandbox::workspace::path_from_listed(rel));
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.file_type().is_file() {
        return None;
    }
    // Every component must resolve inside the workspace (no symlinked directories).
    if !path.canonicalize().ok()?.starts_with(work) {
        return None;
    }
    let data = std::fs::read(&path).ok()?;
    (hex::encode(Sha256::digest(&data)) == sha).then_some(data)
}
