//! The audit log's own costs: appends per second (batched, as the coordinator writes them:
//! many entries per transaction), and verification per second, on SQLite and, when a URL is
//! given, on PostgreSQL. Targets on a 2-core machine: 50,000 appends/s on SQLite, 1,000,000
//! entries/s verified. Its cost on the coordinator's throughput is the `throughput` bench
//! before and after the log (numbers in issue 10's note).

use std::time::Instant;

use fleetbox_server::store::Store;
use fleetbox_server::store::audit::{Action, AuditFilter, Entry, Record, verify_export};

use crate::throughput::{PG_VAR, fresh_database};

pub fn run(entries: usize, batch: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        println!("audit: {entries} entries appended in transactions of {batch}, then verified");
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (append, verify, memory, read) =
            one(&Store::sqlite_url(dir.path()), entries, batch).await?;
        println!(
            "  sqlite      append {append:9.0} entries/s (target 50000, {:.2}x)   verify {verify:10.0} entries/s (target 1000000, {:.2}x; reading alone {read:.0}/s)",
            append / 50_000.0,
            verify / 1_000_000.0
        );
        println!(
            "  in memory   chain check {memory:10.0} entries/s (target 1000000, {:.2}x)",
            memory / 1_000_000.0
        );
        match std::env::var(PG_VAR) {
            Ok(base) => {
                let url = fresh_database(&base).await?;
                let (append, verify, _, read) = one(&url, entries, batch).await?;
                println!(
                    "  postgresql  append {append:9.0} entries/s                        verify {verify:10.0} entries/s (target 1000000, {:.2}x; reading alone {read:.0}/s)",
                    verify / 1_000_000.0
                );
                // The chain head's row lock: what it costs writers that share a tenant.
                let url = fresh_database(&base).await?;
                let (one_writer, four) = contention(&url, entries, batch).await?;
                println!(
                    "  postgresql  head lock: 1 appender {one_writer:9.0} entries/s, 4 concurrent appenders on one tenant {four:9.0} entries/s together ({:.2}x)",
                    four / one_writer
                );
            }
            Err(_) => println!("  postgresql  skipped: set {PG_VAR}=postgres://..."),
        }
        Ok(())
    })
}

async fn one(url: &str, entries: usize, batch: usize) -> Result<(f64, f64, f64, f64), String> {
    let store = Store::open(url).await.map_err(|e| e.to_string())?;
    // Entries shaped like the hot path's: an accepted shard with its output hash.
    let entry = |i: usize| {
        Entry::new("default", "agent:agt_bench", Action::ShardAccepted)
            .job("job_bench")
            .task(i as i64)
            .lease(&format!("lease_{i}"))
            .agent("agt_bench")
            .details(serde_json::json!({
                "output_sha256": "0".repeat(64),
                "late": false,
            }))
    };
    let started = Instant::now();
    let mut i = 0;
    while i < entries {
        let n = batch.min(entries - i);
        store
            .audit((i..i + n).map(entry).collect())
            .await
            .map_err(|e| e.to_string())?;
        i += n;
    }
    let append = entries as f64 / started.elapsed().as_secs_f64();
    // Verification reads the whole chain back: the median of three runs.
    let mut rates = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let v = store
            .audit_verify("default", &fleetbox_server::store::audit::Pins::default())
            .await
            .map_err(|e| e.to_string())?;
        rates.push(v.entries as f64 / started.elapsed().as_secs_f64());
        if !v.ok || v.entries as usize != entries {
            return Err(format!("the bench's own log did not verify: {v:?}"));
        }
    }
    rates.sort_by(f64::total_cmp);
    let verify = rates[1];
    // Reading alone, the way verification reads (no hashing): the floor the store sets.
    let started = Instant::now();
    let read = store
        .audit_read_all("default")
        .await
        .map_err(|e| e.to_string())?;
    let read = read as f64 / started.elapsed().as_secs_f64();
    // The chain check alone, on entries in memory (`fleetbox audit verify --file` after
    // reading its file): what verification costs without the database read.
    let mut records = Vec::with_capacity(entries);
    loop {
        let page = store
            .audit_list(
                "default",
                &AuditFilter {
                    after_seq: records.last().map_or(0, |r: &Record| r.seq),
                    limit: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        if page.is_empty() {
            break;
        }
        records.extend(page);
    }
    let started = Instant::now();
    let (n, _) = verify_export(&records, &[], &Default::default()).map_err(|p| format!("{p:?}"))?;
    let in_memory = n as f64 / started.elapsed().as_secs_f64();
    store.close().await;
    Ok((append, verify, in_memory, read))
}

/// Appends per second by one writer, then by four writers at once on the same tenant (their
/// transactions queue on the chain head's row lock), each in transactions of `batch`.
async fn contention(url: &str, entries: usize, batch: usize) -> Result<(f64, f64), String> {
    let store = Store::open(url).await.map_err(|e| e.to_string())?;
    let entry = |i: usize| {
        Entry::new("default", "server", Action::ShardAccepted)
            .job("job_lock")
            .task(i as i64)
            .details(serde_json::json!({"late": false}))
    };
    let write = |store: Store, from: usize, n: usize| async move {
        let mut i = from;
        while i < from + n {
            let k = batch.min(from + n - i);
            store
                .audit((i..i + k).map(entry).collect())
                .await
                .map_err(|e| e.to_string())?;
            i += k;
        }
        Ok::<(), String>(())
    };
    let half = entries / 2;
    let started = Instant::now();
    write(store.clone(), 0, half).await?;
    let one = half as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let quarter = half / 4;
    let writers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(write(store.clone(), half + w * quarter, quarter)))
        .collect();
    for w in writers {
        w.await.map_err(|e| e.to_string())??;
    }
    let four = (4 * quarter) as f64 / started.elapsed().as_secs_f64();
    let v = store
        .audit_verify("default", &fleetbox_server::store::audit::Pins::default())
        .await
        .map_err(|e| e.to_string())?;
    if !v.ok || v.entries as usize != half + 4 * quarter {
        return Err(format!(
            "the contended log did not verify as one chain: {v:?}"
        ));
    }
    store.close().await;
    Ok((one, four))
}
