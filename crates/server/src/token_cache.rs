//! The tokens a coordinator has looked up, believed until the database says they changed.
//!
//! A request's token used to be read from the database whenever it had not been read in the
//! last half second, which for a fleet of agents meant a read for nearly every heartbeat. Now a
//! looked-up token is believed for up to [`BELIEVED`], and [`follow`] reads, four times a
//! second, the tokens whose rows changed in the last minute (revoked, rotated, an agent revoked,
//! a credential cut short: each sets `tokens.changed_at`) and forgets them here, so a
//! revocation on any coordinator is refused by every other within about a quarter of a second.
//! The minute's overlap also covers a lookup that raced a revocation (it is forgotten again on
//! the next read) and coordinators' clocks up to a minute apart. If the changes could not be
//! read recently (the database is slow or down), nothing cached is believed: every request
//! reads its token, as before.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::State;
use crate::store::{Principal, now_ms};

/// The longest a looked-up token is believed without being read again.
pub const BELIEVED: Duration = Duration::from_secs(60);
/// How often the changed tokens are read.
const FOLLOW: Duration = Duration::from_millis(250);
/// The cache is used only while the changes were read this recently.
const FRESH: Duration = Duration::from_millis(750);
/// How far back each read looks.
const OVERLAP_MS: i64 = 60_000;
/// Entries kept at most (the oldest go first when it is full).
const CAPACITY: usize = 100_000;

#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, (Principal, Instant)>>,
    /// When the changed tokens were last read.
    followed: Mutex<Option<Instant>>,
}

impl TokenCache {
    /// The token of `hash`, if it was looked up within [`BELIEVED`] and the changes are being
    /// followed.
    pub fn get(&self, hash: &str) -> Option<Principal> {
        let fresh = self
            .followed
            .lock()
            .expect("token cache")
            .is_some_and(|at| at.elapsed() < FRESH);
        if !fresh {
            return None;
        }
        self.entries
            .lock()
            .expect("token cache")
            .get(hash)
            .filter(|(_, at)| at.elapsed() < BELIEVED)
            .map(|(p, _)| p.clone())
    }

    pub fn put(&self, hash: &str, principal: &Principal) {
        let mut entries = self.entries.lock().expect("token cache");
        if entries.len() >= CAPACITY {
            entries.retain(|_, (_, at)| at.elapsed() < BELIEVED / 2);
        }
        entries.insert(hash.to_string(), (principal.clone(), Instant::now()));
    }

    /// Forget every token (one was revoked here: refuse it at once).
    pub fn clear(&self) {
        self.entries.lock().expect("token cache").clear();
    }

    fn forget<'a>(&self, hashes: impl IntoIterator<Item = &'a str>) {
        let mut entries = self.entries.lock().expect("token cache");
        for h in hashes {
            entries.remove(h);
        }
    }
}

/// Read the changed tokens every [`FOLLOW`] and forget them, until the coordinator stops.
pub async fn follow(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let mut cursor = now_ms();
    loop {
        match state.store.tokens_changed_since(cursor - OVERLAP_MS).await {
            Ok(changed) => {
                state.tokens.forget(changed.iter().map(|(h, _)| h.as_str()));
                cursor = changed.iter().map(|(_, at)| *at).fold(cursor, i64::max);
                *state.tokens.followed.lock().expect("token cache") = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading changed tokens; not believing cached ones")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW) => {}
            _ = shutdown.changed() => return,
        }
    }
}
