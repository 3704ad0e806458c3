//! Coordinator throughput: no-op tasks through the real HTTP API, with in-process fake
//! executors that lease in batches and report in batches (no sandbox). Measures the
//! coordinator and its store, on SQLite and, when a URL is given, on PostgreSQL.
//! Targets on a 2-core machine: 10,000 tasks/s on SQLite, 5,000 tasks/s on PostgreSQL.

use fleetbox_proto::JobState;
use std::time::{Duration, Instant};

use fleetbox_client::Client;
use fleetbox_proto::JobSpec;
use fleetbox_proto::api::EnrollRequest;
use fleetbox_server::ServerConfig;

/// Set to a PostgreSQL URL (a database the bench may create databases from) to measure it too.
pub const PG_VAR: &str = "FLEETBOX_BENCH_DATABASE_URL";

pub fn run(tasks: usize, executors: usize, batch: u32, rounds: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        println!(
            "throughput: {tasks} no-op tasks, {executors} fake executors, batches of {batch}; \
             {rounds} rounds with the audit log and {rounds} without, interleaved, medians"
        );
        let sqlite = rounds_of(None, tasks, executors, batch, rounds).await?;
        println!(
            "  sqlite      submit {:7.0} tasks/s   lease+report {:7.0} tasks/s   (target 10000, {:.2}x)",
            sqlite.submit,
            sqlite.with,
            sqlite.with / 10_000.0
        );
        sqlite.print_audit_cost("sqlite");
        match std::env::var(PG_VAR) {
            Ok(base) => {
                let pg = rounds_of(Some(&base), tasks, executors, batch, rounds).await?;
                println!(
                    "  postgresql  submit {:7.0} tasks/s   lease+report {:7.0} tasks/s   (target 5000, {:.2}x)",
                    pg.submit,
                    pg.with,
                    pg.with / 5_000.0
                );
                pg.print_audit_cost("postgresql");
            }
            Err(_) => println!("  postgresql  skipped: set {PG_VAR}=postgres://... (scripts/start-postgres prints one)"),
        }
        Ok(())
    })
}

/// Medians over interleaved rounds with the audit log on and off.
struct Rounds {
    submit: f64,
    with: f64,
    without: f64,
    /// Every round's lease+report rate, on and off, in the order they ran.
    each: Vec<(f64, f64)>,
}

impl Rounds {
    /// What the audit log costs: lease+report with it against the same runs without it.
    fn print_audit_cost(&self, store: &str) {
        let rounds: Vec<String> = self
            .each
            .iter()
            .map(|(on, off)| format!("{on:.0}/{off:.0}"))
            .collect();
        println!(
            "  {store:<11} audit off {:7.0} tasks/s   audit on is {:.1}% slower (target under 10%; rounds on/off: {})",
            self.without,
            (1.0 - self.with / self.without) * 100.0,
            rounds.join(" ")
        );
    }
}

/// One store's rounds: each runs on a fresh database, on then off, so drift on the machine
/// (the page cache, PostgreSQL's autovacuum, another process) falls on both sides alike. One
/// pair is noise here (a single pair measured anywhere from -4% to +19%); medians are not.
async fn rounds_of(
    pg: Option<&str>,
    tasks: usize,
    executors: usize,
    batch: u32,
    rounds: usize,
) -> Result<Rounds, String> {
    let mut submits = Vec::new();
    let mut each = Vec::new();
    for _ in 0..rounds.max(1) {
        let mut pair = [0.0; 2];
        for (slot, audit) in [(0, true), (1, false)] {
            let url = match pg {
                Some(base) => Some(fresh_database(base).await?),
                None => None,
            };
            let (submit, rate) = one(url, tasks, executors, batch, audit).await?;
            if audit {
                submits.push(submit);
            }
            pair[slot] = rate;
        }
        each.push((pair[0], pair[1]));
    }
    let with = crate::util::median(each.iter().map(|p| p.0).collect());
    let without = crate::util::median(each.iter().map(|p| p.1).collect());
    Ok(Rounds {
        submit: crate::util::median(submits),
        with,
        without,
        each,
    })
}

pub async fn fresh_database(base: &str) -> Result<String, String> {
    use sqlx::Connection;
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("fb_bench_{}_{n}", std::process::id());
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .map_err(|e| format!("{PG_VAR}: {e}"))?;
    sqlx::Executor::execute(
        &mut conn,
        format!("DROP DATABASE IF EXISTS {name}").as_str(),
    )
    .await
    .map_err(|e| e.to_string())?;
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .map_err(|e| e.to_string())?;
    let (prefix, _) = base.rsplit_once('/').ok_or("database URL without a path")?;
    Ok(format!("{prefix}/{name}"))
}

/// How a round's coordinator is reached and who submits to it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// HTTPS with `--tls auto` (every client trusts its CA).
    pub tls: bool,
    /// Tenants that share the tasks (each its own job, its own token); 0 or 1: the default
    /// tenant alone. The executors are the shared pool's.
    pub tenants: usize,
    /// Each tenant in a PostgreSQL schema of its own (`--tenant-schemas`).
    pub schemas: bool,
}

/// The no-op job of `n` shards.
fn noop(n: usize) -> Result<JobSpec, String> {
    JobSpec::from_toml(&format!(
        // The store's and the API's throughput: the coordinator re-checks nothing here (the
        // fake executors run no code; `verify` measures re-checks).
        "name = \"noop\"\ncode = \"pass\"\nshards = {{ count = {n} }}\naggregate = \"count\"\n[verify]\nrecheck = \"none\"\n"
    ))
    .map_err(|e| e.to_string())
}

/// Who submits: the admin alone, or one client per tenant (made here, each with a token), each
/// with its share of `tasks`. Made before the submissions are timed.
async fn submitters(
    admin: &Client,
    tasks: usize,
    tenants: usize,
) -> Result<Vec<(Client, usize)>, String> {
    use fleetbox_proto::tenancy::{Scope, TenantCreate, TokenCreate};
    if tenants <= 1 {
        return Ok(vec![(admin.clone(), tasks)]);
    }
    let mut out = Vec::new();
    for i in 0..tenants {
        let name = format!("t{i}");
        admin
            .create_tenant(&TenantCreate {
                name: name.clone(),
                caps: Default::default(),
            })
            .await
            .map_err(|e| e.to_string())?;
        let token = admin
            .create_token(&TokenCreate {
                tenant: Some(name),
                scopes: vec![Scope::Read, Scope::Submit],
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .token;
        let n = tasks / tenants + usize::from(i < tasks % tenants);
        out.push((admin.with_token(&token), n));
    }
    Ok(out)
}

/// Submit each submitter's no-op job. Returns each job with the client that may read it.
async fn submit_all(
    submitters: Vec<(Client, usize)>,
) -> Result<Vec<(Client, String, usize)>, String> {
    let mut jobs = Vec::new();
    for (client, n) in submitters {
        let job = client.submit(&noop(n)?).await.map_err(|e| e.to_string())?;
        jobs.push((client, job.id, n));
    }
    Ok(jobs)
}

/// Returns (submit tasks/s, lease+report tasks/s).
async fn one(
    database_url: Option<String>,
    tasks: usize,
    executors: usize,
    batch: u32,
    audit: bool,
) -> Result<(f64, f64), String> {
    one_shaped(
        database_url,
        tasks,
        executors,
        batch,
        audit,
        Shape::default(),
    )
    .await
}

/// [`one`] over TLS and/or several tenants.
pub async fn one_shaped(
    database_url: Option<String>,
    tasks: usize,
    executors: usize,
    batch: u32,
    audit: bool,
    shape: Shape,
) -> Result<(f64, f64), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    config.database_url = database_url;
    config.admin_token = Some("bench-admin".into());
    config.enroll_token = Some("bench-enroll".into());
    config.lease_ms = 60_000;
    config.audit = audit;
    config.tenant_schemas = shape.schemas;
    config.tls = shape
        .tls
        .then(|| fleetbox_server::tls::TlsSetting::Auto { names: Vec::new() });
    let server = fleetbox_server::start(config)
        .await
        .map_err(|e| e.to_string())?;
    let trust = if shape.tls {
        fleetbox_client::Trust::from_pem_file(&dir.path().join("tls").join("ca.pem"))
            .map_err(|e| e.to_string())?
    } else {
        fleetbox_client::Trust::default()
    };
    let connect = |token: &str| Client::trusting(&server.url(), token, &trust);
    let admin = connect("bench-admin");
    let submitters = submitters(&admin, tasks, shape.tenants).await?;
    let t0 = Instant::now();
    let jobs = submit_all(submitters).await?;
    let submit_rate = tasks as f64 / t0.elapsed().as_secs_f64();

    let mut agents = Vec::new();
    for i in 0..executors {
        // Each fake executor signs its reports, as agents do (the cost is part of the bench).
        let key = ed25519_dalek::SigningKey::from_bytes(&[i as u8 + 1; 32]);
        let enroll = connect("bench-enroll");
        let r = enroll
            .enroll(&EnrollRequest {
                name: format!("fake-{i}"),
                slots: batch,
                public_key: hex::encode(key.verifying_key().as_bytes()),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        agents.push((connect(&r.agent_token), key));
    }
    let start = Instant::now();
    let mut handles = Vec::new();
    for (agent, key) in agents {
        handles.push(tokio::spawn(crate::scale::execute(agent, key, batch)));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.map_err(|e| e.to_string())??;
    }
    let elapsed = start.elapsed();
    if total != tasks {
        return Err(format!("{total} of {tasks} tasks were leased and reported"));
    }
    // Each job completes (aggregation included) once every report is in.
    for (client, job, n) in &jobs {
        loop {
            let view = client.job(job).await.map_err(|e| e.to_string())?;
            if view.state == JobState::Completed {
                break;
            }
            if start.elapsed() > Duration::from_secs(600) {
                return Err(format!("job stuck in `{}`", view.state));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let result = client.result(job).await.map_err(|e| e.to_string())?;
        if result.result_value() != Some(serde_json::json!(n)) {
            return Err(format!("wrong result {:?}", result.result));
        }
    }
    server.shutdown().await;
    Ok((submit_rate, tasks as f64 / elapsed.as_secs_f64()))
}

/// `fleetbox-bench tenancy`: lease+report throughput over plain HTTP with one tenant (the
/// baseline), over TLS, and with the tasks split over `tenants` tenants on the shared pool;
/// on PostgreSQL too when [`PG_VAR`] is set, there also with a schema per tenant. Interleaved
/// rounds, medians, ratios against each store's baseline.
pub fn tenancy(
    tasks: usize,
    executors: usize,
    batch: u32,
    rounds: usize,
    tenants: usize,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        println!(
            "tenancy: {tasks} no-op tasks, {executors} fake executors, batches of {batch}; \
             {rounds} interleaved rounds, medians"
        );
        let plain = |tenants| Shape {
            tenants,
            ..Shape::default()
        };
        let sqlite = [
            ("plain HTTP, 1 tenant", plain(1)),
            (
                "TLS, 1 tenant",
                Shape {
                    tls: true,
                    tenants: 1,
                    schemas: false,
                },
            ),
            ("plain HTTP, tenants", plain(tenants)),
        ];
        shapes_on(None, &sqlite, (tasks, executors, batch), rounds).await?;
        match std::env::var(PG_VAR) {
            Ok(base) => {
                let postgres = [
                    ("1 tenant", plain(1)),
                    ("tenants, shared tables", plain(tenants)),
                    (
                        "tenants, a schema each",
                        Shape {
                            tls: false,
                            tenants,
                            schemas: true,
                        },
                    ),
                ];
                shapes_on(Some(&base), &postgres, (tasks, executors, batch), rounds).await
            }
            Err(_) => {
                println!("  postgresql skipped: set {PG_VAR}=postgres://...");
                Ok(())
            }
        }
    })
}

/// Rounds of each of `shapes` on one store (`base`: PostgreSQL, a fresh database a run).
async fn shapes_on(
    base: Option<&str>,
    shapes: &[(&str, Shape)],
    (tasks, executors, batch): (usize, usize, u32),
    rounds: usize,
) -> Result<(), String> {
    let store = if base.is_some() {
        "postgresql"
    } else {
        "sqlite"
    };
    let mut rates: Vec<Vec<(f64, f64)>> = vec![Vec::new(); shapes.len()];
    for _ in 0..rounds.max(1) {
        for (i, (_, shape)) in shapes.iter().enumerate() {
            let url = match base {
                Some(base) => Some(fresh_database(base).await?),
                None => None,
            };
            rates[i].push(one_shaped(url, tasks, executors, batch, true, *shape).await?);
        }
    }
    let base = crate::util::median(rates[0].iter().map(|r| r.1).collect());
    for ((name, shape), r) in shapes.iter().zip(&rates) {
        let submit = crate::util::median(r.iter().map(|r| r.0).collect());
        let rate = crate::util::median(r.iter().map(|r| r.1).collect());
        let name = name.replace("tenants", &format!("{} tenants", shape.tenants));
        println!(
            "  {store:<10} {name:<30} submit {submit:7.0} tasks/s   lease+report {rate:7.0} tasks/s   ({:.2}x the baseline)",
            rate / base
        );
    }
    Ok(())
}
