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
        let (append, verify, memory) = one(&Store::sqlite_url(dir.path()), entries, batch).await?;
        println!(
            "  sqlite      append {append:9.0} entries/s (target 50000, {:.2}x)   verify {verify:10.0} entries/s (target 1000000, {:.2}x)",
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
                let (append, verify, _) = one(&url, entries, batch).await?;
                println!(
                    "  postgresql  append {append:9.0} entries/s                        verify {verify:10.0} entries/s (target 1000000, {:.2}x)",
                    verify / 1_000_000.0
                );
            }
            Err(_) => println!("  postgresql  skipped: set {PG_VAR}=postgres://..."),
        }
        Ok(())
    })
}

async fn one(url: &str, entries: usize, batch: usize) -> Result<(f64, f64, f64), String> {
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
            .audit_verify("default")
            .await
            .map_err(|e| e.to_string())?;
        rates.push(v.entries as f64 / started.elapsed().as_secs_f64());
        if !v.ok || v.entries as usize != entries {
            return Err(format!("the bench's own log did not verify: {v:?}"));
        }
    }
    rates.sort_by(f64::total_cmp);
    let verify = rates[1];
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
    let (n, _) = verify_export(&records, &[]).map_err(|p| format!("{p:?}"))?;
    let in_memory = n as f64 / started.elapsed().as_secs_f64();
    store.close().await;
    Ok((append, verify, in_memory))
}
