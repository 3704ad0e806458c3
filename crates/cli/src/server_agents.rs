//! The coordinator's own server agents: in-process agents that run the shards of code the
//! review decided `run_on_server_only` (and nothing else), in the coordinator's sandbox under
//! the limits of its re-checks. Ordinary agents are never given such shards; an operator may
//! mark others (`fleetbox agents harden ID`, agents on gVisor, say).

use std::path::Path;

use fleetbox_agent::{AgentConfig, LocalCaps, ReviewPolicy};
use fleetbox_proto::ByteSize;
use fleetbox_sandbox::{Backend, SandboxConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::EnvArgs;

/// What the server agents are given.
pub struct ServerAgents<'a> {
    pub url: String,
    /// The coordinator's own enroll token: its agents are trusted, and may mark themselves
    /// `hardened` (no one else's label is a mark).
    pub own_token: String,
    pub data: &'a Path,
    pub count: u32,
    pub backend: Backend,
    pub sandbox: SandboxConfig,
}

impl ServerAgents<'_> {
    /// Start them; each stops when `stop` turns `true`. None on the `process` backend: it is
    /// no sandbox, and server-only code must not run beside the coordinator's keys.
    /// The caller says how many started ([`ServerAgents::started`]).
    pub fn spawn(self, stop: &watch::Receiver<bool>) -> anyhow::Result<Vec<JoinHandle<()>>> {
        if self.count == 0 {
            return Ok(Vec::new());
        }
        if self.backend == Backend::Process {
            eprintln!(
                "fleetbox: no server agents on the `process` backend: code the review decides \
                 `run_on_server_only` waits for an agent an operator marks `hardened`"
            );
            return Ok(Vec::new());
        }
        let mut started = Vec::new();
        for i in 1..=self.count {
            let config = self.config(i)?;
            let mut rx = stop.clone();
            started.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                if let Err(e) = fleetbox_agent::run(config, stop).await {
                    eprintln!("fleetbox: server agent failed: {e}");
                }
            }));
        }
        Ok(started)
    }

    /// The line that says what started.
    pub fn started(n: usize, backend: Backend) -> String {
        format!("fleetbox: {n} server agent(s) for server-only code, `{backend}` sandbox")
    }

    fn config(&self, i: u32) -> anyhow::Result<AgentConfig> {
        let name = format!("server-{i}");
        let state_dir = self.data.join("agents").join(&name);
        let caps = LocalCaps {
            max_memory: ByteSize(fleetbox_server::SERVER_MEMORY),
            max_processes: fleetbox_server::SERVER_PROCESSES,
            allow_network: false,
            ..LocalCaps::default()
        };
        let mut sandbox = self.sandbox.clone();
        sandbox.warm = 0;
        Ok(AgentConfig {
            trust: Default::default(),
            server: self.url.clone(),
            token: self.own_token.clone(),
            name,
            labels: vec![fleetbox_server::store::HARDENED.into(), "server".into()],
            slots: 1,
            backend: self.backend,
            sandbox,
            environments: EnvArgs::default().config(state_dir.join("envs"))?,
            state_dir,
            caps,
            drain_timeout: std::time::Duration::from_secs(10),
            prefetch: 0,
            rotate_key: false,
            machine_id: None,
            metrics_listen: None,
            review_policy: ReviewPolicy::default_for(true),
            hardened_only: true,
            max_sessions: 0,
            test_lie_rate: 0.0,
            test_lie_after: 0,
        })
    }
}
