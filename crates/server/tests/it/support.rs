//! The store's own helper beside the shared ones (`fleetbox-testkit`).

use fleetbox_proto::{Limits, Reducer};
use fleetbox_server::store::NewJob;
pub use fleetbox_testkit::{BOTH, Coordinator, Db, database, spec};

/// A job of `n` shards whose inputs are `0..n`.
pub fn new_job(id: &str, n: u64, max_attempts: u32) -> NewJob {
    NewJob {
        id: id.into(),
        tenant_id: "default".into(),
        name: id.into(),
        spec: serde_json::json!({}),
        code: "pass".into(),
        code_sha256: "x".into(),
        limits: Limits::default(),
        reducer: Reducer::Sum,
        priority: 0,
        max_attempts,
        inputs: (0..n).map(|i| serde_json::json!(i)).collect(),
        actor: "admin:test".into(),
        environment: None,
        files: Default::default(),
        backend: None,
        review: None,
        has_rules: false,
        lineage: None,
        rerun_of: None,
        // The settle tests drive reports by hand; server re-checks have tests of their own.
        verify: fleetbox_proto::VerifySpec {
            recheck: fleetbox_proto::Recheck::None,
            ..Default::default()
        },
    }
}

/// A helper process (a stand-in server, Prometheus) killed when the test ends, however it ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
