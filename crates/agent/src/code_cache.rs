//! Programs this agent has received, by SHA-256: a lease names the ones it holds
//! (`cached_code`) and the coordinator sends those as a hash alone, so a million-shard job's
//! program crosses the network once per agent, not once per shard.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use fleetbox_proto::api::{LeasedTask, MAX_CACHED_CODE};
use sha2::{Digest, Sha256};

/// Bytes of programs kept at most; the least recently used go first.
const MAX_BYTES: usize = 16 << 20;

#[derive(Default)]
pub struct CodeCache {
    /// Most recently used first.
    entries: Mutex<VecDeque<(String, Arc<str>)>>,
}

impl CodeCache {
    /// What a lease request names: the hashes held, most recent first.
    pub fn hashes(&self) -> Vec<String> {
        self.lock().iter().map(|(h, _)| h.clone()).collect()
    }

    /// Give `task` its program: check the one sent against its hash and keep it, or fill an
    /// empty one from the cache. `Err` says why the task cannot run here.
    pub fn resolve(&self, task: &mut LeasedTask) -> Result<(), String> {
        if task.code.is_empty() {
            let mut entries = self.lock();
            let Some(i) = entries.iter().position(|(h, _)| *h == task.code_sha256) else {
                return Err(format!(
                    "the coordinator sent no program for `{}`, which this agent does not hold",
                    task.code_sha256
                ));
            };
            let entry = entries.remove(i).expect("found just now");
            task.code = entry.1.to_string();
            entries.push_front(entry);
            return Ok(());
        }
        let got = hex::encode(Sha256::digest(task.code.as_bytes()));
        if got != task.code_sha256 {
            return Err(format!(
                "the program received hashes to `{got}`, not the `{}` its lease names",
                task.code_sha256
            ));
        }
        let mut entries = self.lock();
        entries.retain(|(h, _)| *h != got);
        entries.push_front((got, Arc::from(task.code.as_str())));
        let mut total = 0;
        let keep = entries
            .iter()
            .take(MAX_CACHED_CODE)
            .take_while(|(_, c)| {
                total += c.len();
                total <= MAX_BYTES
            })
            .count()
            .max(1);
        entries.truncate(keep);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(String, Arc<str>)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(code: &str, sha: &str) -> LeasedTask {
        serde_json::from_value(serde_json::json!({
            "lease_id": "l", "task_id": 1, "job_id": "j", "shard_index": 0, "shard_count": 1,
            "attempt": 1, "code": code, "code_sha256": sha, "input": null,
            "limits": {}, "lease_expires_at": 0,
        }))
        .unwrap()
    }

    fn sha(code: &str) -> String {
        hex::encode(Sha256::digest(code.as_bytes()))
    }

    #[test]
    fn a_program_is_kept_once_checked_and_filled_by_its_hash() {
        let cache = CodeCache::default();
        let mut first = task("print(1)", &sha("print(1)"));
        cache.resolve(&mut first).unwrap();
        assert_eq!(cache.hashes(), [sha("print(1)")]);
        let mut named = task("", &sha("print(1)"));
        cache.resolve(&mut named).unwrap();
        assert_eq!(named.code, "print(1)");
        // A hash it does not hold, and a program that is not what its hash says: refused,
        // and nothing false is kept.
        let mut unknown = task("", &sha("print(2)"));
        assert!(
            cache
                .resolve(&mut unknown)
                .unwrap_err()
                .contains("does not hold")
        );
        let mut forged = task("import os", &sha("print(2)"));
        assert!(
            cache
                .resolve(&mut forged)
                .unwrap_err()
                .contains("hashes to")
        );
        assert_eq!(cache.hashes(), [sha("print(1)")]);
    }

    #[test]
    fn the_least_recently_used_go_past_the_cap() {
        let cache = CodeCache::default();
        for i in 0..MAX_CACHED_CODE + 10 {
            let code = format!("print({i})");
            cache.resolve(&mut task(&code, &sha(&code))).unwrap();
        }
        let held = cache.hashes();
        assert_eq!(held.len(), MAX_CACHED_CODE);
        assert_eq!(held[0], sha(&format!("print({})", MAX_CACHED_CODE + 9)));
        assert!(!held.contains(&sha("print(0)")));
        // A program bigger than the byte cap is still kept alone (the one running).
        let big = "#".repeat(MAX_BYTES + 1);
        cache.resolve(&mut task(&big, &sha(&big))).unwrap();
        assert_eq!(cache.hashes(), [sha(&big)]);
    }
}
