//! Who a lease serves: the agent's pool says which tenants' shards it may take, and in a shared
//! pool the tenant with the fewest running shards for its weight goes first.
//!
//! This is fair share by concurrency, computed from the database at each lease rather than
//! kept as deficit counters in one process: every coordinator sharing the database hands out
//! the same shares, and a restart forgets nothing. A tenant with a million queued shards and
//! one with ten get the same number of running shards (for equal weights) as long as both
//! have work; within a tenant, shards go by priority then age.

use fleetbox_proto::{JobState, TaskState};

use super::settle::Tx;
use super::sql::Sql;
use super::{Doing, StoreError};

/// The pool an agent leases for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PoolOf {
    pub name: String,
    /// The tenant that owns it.
    pub owner: String,
    /// Serves every tenant (else only its owner).
    pub shared: bool,
}

/// The pool of `agent` (`None`: no such agent).
pub(super) async fn pool_of(tx: &mut Tx, agent: &str) -> Result<Option<PoolOf>, StoreError> {
    let row: Option<(String, String, i64)> = Sql::new(
        "SELECT p.name, p.tenant_id, p.shared FROM agents a JOIN pools p ON p.name = a.pool \
         WHERE a.id = ",
    )
    .bind(agent)
    .build_as()
    .fetch_optional(&mut **tx)
    .await
    .doing("reading an agent's pool")?;
    Ok(row.map(|(name, owner, shared)| PoolOf {
        name,
        owner,
        shared: shared != 0,
    }))
}

/// A tenant a lease may serve, with its share so far.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Claim {
    pub tenant: String,
    /// Its shards leased now (over every agent), plus those granted in this call.
    pub running: i64,
    pub weight: i64,
    /// Its running-shards cap, if any.
    pub cap: Option<i64>,
}

/// The tenants `pool` may serve now, but those in `blocked` (past their CPU of the day).
pub(super) async fn claims(
    tx: &mut Tx,
    pool: &PoolOf,
    blocked: &[String],
) -> Result<Vec<Claim>, StoreError> {
    let mut sql = Sql::new(
        "SELECT t.id, t.weight, t.max_running_shards, \
         (SELECT COUNT(*) FROM tasks k WHERE k.tenant_id = t.id AND k.state = ",
    );
    sql.bind(TaskState::Leased.as_str())
        .push(") FROM tenants t WHERE ");
    if pool.shared {
        sql.push("EXISTS (SELECT 1 FROM jobs j WHERE j.tenant_id = t.id AND j.state = ")
            .bind(JobState::Running.as_str())
            .push(" AND j.paused = 0)");
    } else {
        sql.push("t.id = ").bind(pool.owner.as_str());
    }
    let rows: Vec<(String, i64, Option<i64>, i64)> = sql
        .build_as()
        .fetch_all(&mut **tx)
        .await
        .doing("reading tenants' shares")?;
    Ok(rows
        .into_iter()
        .filter(|(tenant, ..)| !blocked.contains(tenant))
        .map(|(tenant, weight, cap, running)| Claim {
            tenant,
            running,
            weight: weight.max(1),
            cap,
        })
        .collect())
}

/// The next tenant to serve and how many of `left` shards to ask for: the claim with the
/// lowest running shards per weight (ties: the first), as many as bring it to the next
/// lowest or its even part of `left` (whichever is more), at least one, within its cap.
/// `None`: no claim may take more.
pub(super) fn next(claims: &[Claim], left: u32) -> Option<(usize, u32)> {
    let room = |c: &Claim| c.cap.map_or(i64::MAX, |cap| cap - c.running);
    let share = |c: &Claim| c.running as f64 / c.weight as f64;
    let open: Vec<usize> = (0..claims.len())
        .filter(|&i| room(&claims[i]) > 0)
        .collect();
    let &best = open.iter().min_by(|&&a, &&b| {
        share(&claims[a])
            .partial_cmp(&share(&claims[b]))
            .unwrap_or(std::cmp::Ordering::Equal)
    })?;
    let c = &claims[best];
    let second = open
        .iter()
        .filter(|&&i| i != best)
        .map(|&i| share(&claims[i]))
        .fold(f64::INFINITY, f64::min);
    // Up to the next one's share: (second - share) * weight more; and at least its part of
    // this call (`left` over the tenants open), so equal shares take a chunk each rather
    // than one shard a statement.
    let fair = f64::from(left.div_ceil(u32::try_from(open.len()).unwrap_or(u32::MAX)));
    let until = if second.is_finite() {
        ((second - share(c)) * c.weight as f64).floor().max(fair)
    } else {
        f64::from(left)
    };
    let n = (until.min(f64::from(left)) as i64).min(room(c)).max(1);
    Some((best, u32::try_from(n).unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(tenant: &str, running: i64, weight: i64, cap: Option<i64>) -> Claim {
        Claim {
            tenant: tenant.into(),
            running,
            weight,
            cap,
        }
    }

    /// Hand out `slots` one lease call of `per_call` at a time, as agents would.
    fn hand_out(mut claims: Vec<Claim>, calls: u32, per_call: u32) -> Vec<i64> {
        for _ in 0..calls {
            let mut left = per_call;
            while left > 0 {
                let Some((i, n)) = next(&claims, left) else {
                    break;
                };
                claims[i].running += i64::from(n);
                left -= n;
            }
        }
        claims.iter().map(|c| c.running).collect()
    }

    #[test]
    fn the_tenant_behind_goes_first_and_catches_up_without_overtaking() {
        // A runs 10 already; B none: B gets the next 10, then they alternate.
        let claims = vec![claim("a", 10, 1, None), claim("b", 0, 1, None)];
        assert_eq!(next(&claims, 4), Some((1, 4)));
        assert_eq!(hand_out(claims.clone(), 1, 10), vec![10, 10]);
        assert_eq!(hand_out(claims, 5, 4), vec![15, 15]);
    }

    #[test]
    fn weights_split_the_slots_and_caps_hold() {
        let claims = vec![claim("a", 0, 1, None), claim("b", 0, 3, None)];
        assert_eq!(hand_out(claims, 10, 4), vec![10, 30]);
        // B is capped at 5: the rest go to A.
        let claims = vec![claim("a", 0, 1, None), claim("b", 0, 1, Some(5))];
        assert_eq!(hand_out(claims, 5, 4), vec![15, 5]);
        // Ten equal tenants split a call of 200 in ten chunks of 20, not 200 steps of one.
        let claims: Vec<Claim> = (0..10)
            .map(|i| claim(&format!("t{i}"), 0, 1, None))
            .collect();
        assert_eq!(next(&claims, 200), Some((0, 20)));
        assert_eq!(hand_out(claims, 1, 200), vec![20; 10]);
        // Everyone at its cap: nothing.
        assert_eq!(next(&[claim("a", 2, 1, Some(2))], 4), None);
        assert_eq!(next(&[], 4), None);
    }
}
