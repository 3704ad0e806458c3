//! Heartbeats kept in memory and written together: each agent's latest beat (when it came, the
//! load it reported) waits here, and the scheduler writes every waiting beat in one transaction
//! at each of its ticks (every 250 ms), and before the coordinator stops. A thousand agents
//! beating every two seconds cost four writes a second, not five hundred.
//!
//! A beat is stamped when it arrives, not when it is written, so an agent's `last_seen` is what
//! it would have been; it reaches the database at most a tick later. The lost-agent sweep reads
//! the database, so the agent timeout must exceed the heartbeat by that tick (checked at
//! start). Coordinators sharing a database each write the beats they received; a row only
//! moves forward (`last_seen` never goes back), so the database settles which beat is latest.

use std::collections::HashMap;
use std::sync::Mutex;

use fleetbox_proto::api::AgentLoad;

use crate::store::{Store, StoreError, now_ms};

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
