//! The agent's own code review: code the policy rejects is refused here even when a
//! coordinator sent it (a compromised coordinator cannot make the fleet run it).
//!
//! Verdicts are cached by the hash of the code this agent received, which it computes itself:
//! a hash the coordinator sends names nothing the agent has checked (a compromised coordinator
//! could send a benign program once, then malware under the benign program's hash).

use std::collections::HashMap;
use std::sync::Mutex;

use fleetbox_review::Reviewer as _;
use sha2::Digest;

/// Verdicts kept before the cache starts over.
const MAX_CACHED: usize = 10_000;

pub struct CodeReview {
    reviewer: fleetbox_review::BuiltinReviewer,
    /// Verdicts by the sha256 of the code: `Some(why)` for rejected code.
    verdicts: Mutex<HashMap<[u8; 32], Option<String>>>,
}

impl CodeReview {
    pub fn shipped() -> CodeReview {
        CodeReview {
            reviewer: fleetbox_review::BuiltinReviewer::shipped(),
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(why)` when this agent's review rejects `code`. A job's shards are reviewed once.
    pub fn judge(&self, code: &str) -> Result<(), String> {
        let key: [u8; 32] = sha2::Sha256::digest(code.as_bytes()).into();
        if let Some(verdict) = self.verdicts.lock().expect("verdicts").get(&key) {
            return verdict.clone().map_or(Ok(()), Err);
        }
        let verdict = match self.reviewer.review_code(code) {
            Ok(r) if r.decision == fleetbox_proto::Decision::Reject => {
                let found: Vec<String> = r
                    .findings
                    .iter()
                    .take(5)
                    .map(|f| format!("{} at line {}", f.rule, f.line))
                    .collect();
                Some(format!(
                    "this agent's code review rejects the program (risk {}): {}",
                    r.risk,
                    found.join(", ")
                ))
            }
            // A program that does not parse fails by itself when it runs.
            _ => None,
        };
        let mut cache = self.verdicts.lock().expect("verdicts");
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, verdict.clone());
        verdict.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a compromised coordinator would try: a benign program, then malware labelled
    /// with the benign program's hash. There is no hash to label: the agent hashes what it got.
    #[test]
    fn malware_under_a_benign_programs_hash_is_still_refused() {
        let review = CodeReview::shipped();
        let benign = "print(sum(range(10)))\n";
        let bomb = "import os\nwhile True:\n    os.fork()\n";
        assert_eq!(review.judge(benign), Ok(()));
        let refused = review.judge(bomb).unwrap_err();
        assert!(refused.contains("process.fork_loop"), "{refused}");
        // Cached both ways, each under its own content.
        assert_eq!(review.judge(benign), Ok(()));
        assert!(review.judge(bomb).is_err());
    }
}
