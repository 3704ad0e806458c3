//! The agent's own code review: code the policy rejects is refused here even when a
//! coordinator sent it (a compromised coordinator cannot make the fleet run it).
//!
//! Verdicts are cached by the hash of the code this agent received, which it computes itself:
//! a hash the coordinator sends names nothing the agent has checked (a compromised coordinator
//! could send a benign program once, then malware under the benign program's hash).

use std::collections::HashMap;
use std::sync::Mutex;

use fleetbox_proto::Decision;
use fleetbox_review::Reviewer as _;
use sha2::Digest;

/// Verdicts kept before the cache starts over.
const MAX_CACHED: usize = 10_000;

/// What this agent refuses to run, by the decision of its own review of the code
/// (`--review-policy FILE`: `refuse = ["reject", "run_on_server_only"]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewPolicy {
    pub refuse: Vec<Decision>,
}

impl ReviewPolicy {
    /// The default: refuse what the review rejects, and code it holds for a person or decides
    /// server-only unless this agent is `hardened` (started with `--hardened`, on a stricter
    /// sandbox such as gVisor, and marked so by an operator on the coordinator). A
    /// coordinator's word that a person approved held code is not this agent's review.
    pub fn default_for(hardened: bool) -> ReviewPolicy {
        let mut refuse = vec![Decision::Reject];
        if !hardened {
            refuse.extend([Decision::Hold, Decision::RunOnServerOnly]);
        }
        ReviewPolicy { refuse }
    }

    /// A policy file's text.
    pub fn from_toml(text: &str) -> Result<ReviewPolicy, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// One review's verdict, as cached: its decision and what it found.
#[derive(Debug, Clone)]
struct Verdict {
    decision: Decision,
    risk: u32,
    found: String,
}

pub struct CodeReview {
    reviewer: fleetbox_review::BuiltinReviewer,
    policy: ReviewPolicy,
    /// Verdicts by the sha256 of the code (`None`: it does not parse, and fails by itself
    /// when it runs).
    verdicts: Mutex<HashMap<[u8; 32], Option<Verdict>>>,
}

impl CodeReview {
    pub fn shipped(policy: ReviewPolicy) -> CodeReview {
        CodeReview {
            reviewer: fleetbox_review::BuiltinReviewer::shipped(),
            policy,
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(why)` when this agent's policy refuses `code` after its own review. A job's
    /// shards are reviewed once.
    /// `declared`: what the job's settings declare (its network), see
    /// [`fleetbox_review::Reviewer::review_declared`].
    #[cfg(test)]
    pub fn judge(&self, code: &str, declared: &[&str]) -> Result<(), String> {
        let sha256 = hex::encode(sha2::Sha256::digest(code.as_bytes()));
        self.judge_hashed(code, &sha256, declared)
    }

    /// [`CodeReview::judge`] for a program whose SHA-256 (hex) this agent computed or checked
    /// itself (the code cache does, for every lease): it is not hashed again. Never a hash the
    /// coordinator merely sent.
    pub fn judge_hashed(&self, code: &str, sha256: &str, declared: &[&str]) -> Result<(), String> {
        let verdict = self.verdict(code, sha256, declared);
        match verdict {
            Some(v) if self.policy.refuse.contains(&v.decision) => Err(format!(
                "refused by this agent's review policy: its review decides `{}` (risk {}): {}",
                v.decision.as_str(),
                v.risk,
                v.found
            )),
            _ => Ok(()),
        }
    }

    fn verdict(&self, code: &str, sha256: &str, declared: &[&str]) -> Option<Verdict> {
        let mut hash = sha2::Sha256::new();
        hash.update(sha256.as_bytes());
        for d in declared {
            hash.update([0]);
            hash.update(d.as_bytes());
        }
        let key: [u8; 32] = hash.finalize().into();
        if let Some(verdict) = self.verdicts.lock().expect("verdicts").get(&key) {
            return verdict.clone();
        }
        let verdict = self
            .reviewer
            .review_declared(code, declared)
            .ok()
            .map(|r| Verdict {
                decision: r.decision,
                risk: r.risk,
                found: r
                    .findings
                    .iter()
                    .take(5)
                    .map(|f| format!("{} at line {}", f.rule, f.line))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        let mut cache = self.verdicts.lock().expect("verdicts");
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, verdict.clone());
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a compromised coordinator would try: a benign program, then malware labelled
    /// with the benign program's hash. There is no hash to label: the agent hashes what it got.
    #[test]
    fn malware_under_a_benign_programs_hash_is_still_refused() {
        let review = CodeReview::shipped(ReviewPolicy::default_for(false));
        let benign = "print(sum(range(10)))\n";
        let bomb = "import os\nwhile True:\n    os.fork()\n";
        assert_eq!(review.judge(benign, &[]), Ok(()));
        let refused = review.judge(bomb, &[]).unwrap_err();
        assert!(refused.contains("process.fork_loop"), "{refused}");
        // Cached both ways, each under its own content.
        assert_eq!(review.judge(benign, &[]), Ok(()));
        assert!(review.judge(bomb, &[]).is_err());
    }

    /// Server-only and held code are refused unless the agent is hardened, rejected code
    /// always; a policy file says otherwise.
    #[test]
    fn the_policy_decides_what_is_refused() {
        let server_only =
            "import socket\ns = socket.create_connection(('example.org', 80))\nprint(s)\n";
        let decided = fleetbox_review::BuiltinReviewer::shipped()
            .review_code(server_only)
            .unwrap()
            .decision;
        assert_eq!(decided, Decision::RunOnServerOnly);
        let ordinary = CodeReview::shipped(ReviewPolicy::default_for(false));
        let why = ordinary.judge(server_only, &[]).unwrap_err();
        assert!(why.contains("run_on_server_only"), "{why}");
        let hardened = CodeReview::shipped(ReviewPolicy::default_for(true));
        assert_eq!(hardened.judge(server_only, &[]), Ok(()));
        // A job that asks for the network declares its client; the same code runs here then,
        // and the verdict without the declaration is not reused for it (nor the other way).
        let declared = fleetbox_review::DECLARED_BY_NETWORK;
        assert_eq!(ordinary.judge(server_only, declared), Ok(()));
        assert!(ordinary.judge(server_only, &[]).is_err());
        // Held code (starting programs and the network): refused unless hardened.
        let held = "import subprocess, socket\nsubprocess.run(['true'])\n";
        let decided = fleetbox_review::BuiltinReviewer::shipped()
            .review_code(held)
            .unwrap()
            .decision;
        assert_eq!(decided, Decision::Hold);
        assert!(ordinary.judge(held, &[]).unwrap_err().contains("`hold`"));
        assert_eq!(hardened.judge(held, &[]), Ok(()));
        let bomb = "import os\nwhile True:\n    os.fork()\n";
        assert!(hardened.judge(bomb, &[]).is_err());
        let strict =
            ReviewPolicy::from_toml("refuse = [\"reject\", \"hold\", \"run_on_server_only\"]")
                .unwrap();
        assert_eq!(strict.refuse.len(), 3);
        assert!(ReviewPolicy::from_toml("refuse = [\"maybe\"]").is_err());
        assert!(ReviewPolicy::from_toml("refused = []").is_err());
    }
}
