//! Heartbeats kept in memory and written together: each agent's latest beat (when it came, the
//! load it reported) waits here, and [`run`] writes every waiting beat in one transaction every
//! [`FLUSH`], and before the coordinator stops. A thousand agents beating every two seconds
//! cost four writes a second, not five hundred. It is a task of its own, not a step of the
//! scheduler's loop: a long retention pass there must not hold beats back while other
//! coordinators' sweeps read `last_seen`.
//!
//! A beat is stamped when it arrives, not when it is written, so an agent's `last_seen` is what
//! it would have been; it reaches the database at most [`FLUSH`] later. The lost-agent sweeps
//! read the database, so the agent timeout must exceed the heartbeat by that much (checked at
//! start). Coordinators sharing a database each write the beats they received; a row only
//! moves forward (`last_seen` never goes back), so the database settles which beat is latest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetbox_proto::api::AgentLoad;
use tokio::sync::watch;

use crate::State;
use crate::store::{Store, StoreError, now_ms};

/// How often the waiting beats are written.
pub const FLUSH: Duration = Duration::from_millis(250);

/// One agent's latest beat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    pub agent_id: String,
    /// When it arrived (ms since the epoch).
    pub at: i64,
    /// The load it reported, as JSON.
    pub load: String,
}

/// The beats not written yet, by agent.
#[derive(Debug, Default)]
pub struct Heartbeats {
    waiting: Mutex<HashMap<String, Beat>>,
}

impl Heartbeats {
    /// Keep `agent`'s beat, replacing an earlier one not yet written.
    pub fn record(&self, agent: &str, load: &AgentLoad) {
        let beat = Beat {
            agent_id: agent.to_string(),
            at: now_ms(),
            load: serde_json::to_string(load).unwrap_or_else(|_| "{}".into()),
        };
        self.waiting
            .lock()
            .expect("heartbeats")
            .insert(agent.to_string(), beat);
    }

    /// How many beats wait.
    pub fn len(&self) -> usize {
        self.waiting.lock().expect("heartbeats").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write every waiting beat in one transaction; how many. Beats that fail to be written
    /// wait for the next flush (newer ones received meanwhile win).
    pub async fn flush(&self, store: &Store) -> Result<usize, StoreError> {
        let beats: Vec<Beat> = {
            let mut waiting = self.waiting.lock().expect("heartbeats");
            waiting.drain().map(|(_, b)| b).collect()
        };
        if beats.is_empty() {
            return Ok(0);
        }
        match store.touch_agents(&beats).await {
            Ok(()) => Ok(beats.len()),
            Err(e) => {
                let mut waiting = self.waiting.lock().expect("heartbeats");
                for b in beats {
                    waiting.entry(b.agent_id.clone()).or_insert(b);
                }
                Err(e)
            }
        }
    }
}

/// Write the waiting beats every [`FLUSH`] until the coordinator stops (its shutdown writes
/// the last ones, after the HTTP server has stopped taking beats).
pub async fn run(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if let Err(e) = state.heartbeats.flush(&state.store).await {
            tracing::error!(error = %e, "writing heartbeats");
        }
        tokio::select! {
            _ = tokio::time::sleep(FLUSH) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_later_beat_replaces_its_earlier_one() {
        let h = Heartbeats::default();
        h.record("a", &AgentLoad::default());
        let busy = AgentLoad {
            busy: 3,
            ..Default::default()
        };
        h.record("a", &busy);
        h.record("b", &AgentLoad::default());
        assert_eq!(h.len(), 2);
        let waiting = h.waiting.lock().unwrap();
        assert_eq!(waiting["a"].load, serde_json::to_string(&busy).unwrap());
    }
}
