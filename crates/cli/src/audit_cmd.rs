//! `fleetbox audit list|verify|checkpoints|keys|export|prune`: the tamper-evident audit log
//! of a coordinator, and verification of a copy against checkpoints and keys pinned elsewhere.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetbox_proto::Millis;

use crate::jobs_cmd::{Conn, runtime};
use crate::term;

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Entries oldest first, filtered.
    List(ListArgs),
    /// Recompute the hash chain on the coordinator; names the first entry that was edited,
    /// deleted, inserted or reordered, and exits 1 if there is one.
    Verify(VerifyArgs),
    /// The signed checkpoints of the chain head, as JSON lines: keep them somewhere the
    /// coordinator cannot reach. The signing key goes to stderr.
    Checkpoints(CheckpointsArgs),
    /// The coordinator's audit signing key and the keys it believes, one per line: the file
    /// `verify --trusted-keys` takes.
    Keys(CheckpointsArgs),
    /// Every entry as JSON lines with its hashes (`> log.jsonl`), for `verify --file`.
    Export(ExportArgs),
    /// Remove entries up to a checkpointed one (export them first); verify still holds,
    /// anchored on that checkpoint.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The last entry to remove: one that has a checkpoint (`fleetbox audit checkpoints`).
    #[arg(long)]
    pub before: i64,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only entries this recent, e.g. `1h` (the first one is then checked against a
    /// checkpoint of the entry before it, when there is one).
    #[arg(long, value_parser = |s: &str| s.parse::<Millis>().map_err(|e| e.to_string()))]
    pub since: Option<Millis>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only entries about this job.
    #[arg(long)]
    pub job: Option<String>,
    /// Only entries about this agent.
    #[arg(long)]
    pub agent: Option<String>,
    /// Only this action, e.g. `shard.accepted`.
    #[arg(long)]
    pub action: Option<String>,
    /// Only entries this recent, e.g. `1h`, `30m`.
    #[arg(long, value_parser = |s: &str| s.parse::<Millis>().map_err(|e| e.to_string()))]
    pub since: Option<Millis>,
    /// Print JSON lines (one entry per line, with its hashes) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Print the verification as JSON.
    #[arg(long)]
    pub json: bool,
    /// Verify an exported log (JSON lines of `fleetbox audit export`) here, offline, instead
    /// of asking the coordinator.
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// Verify a database directly (a copy, say), without a coordinator: a PostgreSQL URL, a
    /// `sqlite://` URL, or a data directory. Needs `--trusted-keys`.
    #[arg(long, conflicts_with = "file")]
    pub database: Option<String>,
    /// The tenant whose log `--database` verifies.
    #[arg(long, default_value = "default", requires = "database")]
    pub tenant: String,
    /// Checkpoints kept elsewhere (JSON lines of `fleetbox audit checkpoints`, a shipped
    /// copy) to check the exported log or the database against: each must be there, alike.
    #[arg(long)]
    pub checkpoints: Option<std::path::PathBuf>,
    /// The public keys believed (hex, one per line: `fleetbox audit keys`, or the key each
    /// coordinator printed at start). A checkpoint or prune signed by any other key fails.
    #[arg(long)]
    pub trusted_keys: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub conn: Conn,
}

pub fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        AuditCommand::List(a) => list(a),
        AuditCommand::Verify(a) => verify(a),
        AuditCommand::Checkpoints(a) => checkpoints(a),
        AuditCommand::Keys(a) => keys(a),
        AuditCommand::Prune(a) => {
            let client = a.conn.client()?;
            runtime()?.block_on(async move {
                let r = client.audit_prune(a.before).await?;
                eprintln!(
                    "fleetbox: pruned {} entries up to {}",
                    r["pruned"], a.before
                );
                Ok(ExitCode::SUCCESS)
            })
        }
        AuditCommand::Export(a) => list(ListArgs {
            job: None,
            agent: None,
            action: None,
            since: a.since,
            json: true,
            conn: a.conn,
        }),
    }
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    let mut base = Vec::new();
    for (k, v) in [
        ("job", &args.job),
        ("agent", &args.agent),
        ("action", &args.action),
    ] {
        if let Some(v) = v {
            if !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                anyhow::bail!("`--{k} {v}`: ids and actions are letters, digits, `.`, `_`, `-`");
            }
            base.push(format!("{k}={v}"));
        }
    }
    if let Some(since) = args.since {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        base.push(format!("since={}", now - since.0 as i64));
    }
    runtime()?.block_on(async move {
        let mut out = std::io::stdout().lock();
        let mut after = 0;
        loop {
            let mut q = base.clone();
            q.push(format!("after={after}"));
            q.push("limit=5000".into());
            let page = client.audit(&q.join("&")).await?;
            for e in &page.entries {
                if args.json {
                    serde_json::to_writer(&mut out, e)?;
                    writeln!(out)?;
                } else {
                    let at = humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(e.at.max(0) as u64),
                    );
                    let subject = [
                        e.job_id.as_deref(),
                        e.task_id.map(|t| format!("task {t}")).as_deref(),
                        e.agent_id.as_deref(),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ");
                    writeln!(
                        out,
                        "{:>8} {at} {:<18} {:<26} {} {}",
                        e.seq,
                        e.action,
                        e.actor,
                        subject,
                        term::for_stdout(&e.details.to_string())
                    )?;
                }
            }
            match page.next_after {
                Some(n) => after = n,
                None => break,
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn keys(args: CheckpointsArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let keys = client.audit_keys().await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}  # this coordinator", keys.public_key)?;
        for key in keys.trusted.iter().filter(|k| **k != keys.public_key) {
            writeln!(out, "{key}")?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn checkpoints(args: CheckpointsArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let keys = client.audit_keys().await?;
        eprintln!(
            "fleetbox: signed with ed25519 key {} (believed: {})",
            keys.public_key,
            keys.trusted.join(", ")
        );
        let mut out = std::io::stdout().lock();
        for c in client.audit_checkpoints().await? {
            serde_json::to_writer(&mut out, &c)?;
            writeln!(out)?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// JSON lines of `T` from `path`, naming the line that does not parse.
fn read_lines<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<Vec<T>> {
    let text = fs_err::read_to_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}: line {}", path.display(), i + 1))
        })
        .collect()
}

/// The keys of `--trusted-keys`, required with anything signed to check.
fn trusted_keys(args: &VerifyArgs) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let Some(path) = &args.trusted_keys else {
        anyhow::bail!(
            "`--trusted-keys FILE` is needed: the public keys you pinned (printed by each \
             coordinator at start and by `fleetbox audit keys`). A checkpoint is only as good as \
             the key it is believed with; the one it names itself proves nothing"
        );
    };
    Ok(fleetbox_server::custody::read_trusted_keys(path)?
        .into_iter()
        .collect())
}

fn verify_file(args: &VerifyArgs, file: &std::path::Path) -> anyhow::Result<ExitCode> {
    use fleetbox_server::store::audit::{Record, verify_export};
    let records: Vec<Record> = read_lines::<fleetbox_proto::api::AuditRecord>(file)?
        .into_iter()
        .map(Record::from_api)
        .collect();
    let (checkpoints, keys) = match &args.checkpoints {
        Some(p) => (read_lines(p)?, trusted_keys(args)?),
        None => Default::default(),
    };
    match verify_export(&records, &checkpoints, &keys) {
        Ok((n, last)) => {
            eprintln!(
                "fleetbox: `{}` verified: {n} entries up to {last}, {} checkpoint(s) checked",
                file.display(),
                checkpoints.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(p) => {
            eprintln!(
                "fleetbox: `{}` FAILED verification at entry {}: {}",
                file.display(),
                p.seq,
                p.what
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// Verify a database (a copy, say) with the pins given here, without a coordinator.
fn verify_database(args: &VerifyArgs, database: &str) -> anyhow::Result<ExitCode> {
    let keys = trusted_keys(args)?;
    let checkpoints = match &args.checkpoints {
        Some(p) => fleetbox_server::custody::read_checkpoints(p)?,
        None => Vec::new(),
    };
    let url = if std::path::Path::new(database).is_dir() {
        fleetbox_server::store::Store::sqlite_url(std::path::Path::new(database))
    } else {
        database.to_string()
    };
    let pins = fleetbox_server::store::audit::Pins { keys, checkpoints };
    runtime()?.block_on(async move {
        let store = fleetbox_server::store::Store::open(&url).await?;
        let v = store.audit_verify(&args.tenant, &pins).await?;
        report(args, &v)
    })
}

/// Print a verification as asked; exit 1 when it failed.
fn report(
    args: &VerifyArgs,
    v: &fleetbox_proto::api::AuditVerification,
) -> anyhow::Result<ExitCode> {
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, v)?;
        writeln!(out)?;
    } else if v.ok {
        eprintln!(
            "fleetbox: audit log of `{}` verified: {} entries, chain head at {}",
            v.tenant_id, v.entries, v.head_seq
        );
    } else if let Some(p) = &v.problem {
        eprintln!(
            "fleetbox: audit log of `{}` FAILED verification at entry {}: {}",
            v.tenant_id, p.seq, p.what
        );
    }
    Ok(if v.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    if let Some(file) = &args.file {
        return verify_file(&args, file);
    }
    if let Some(database) = &args.database {
        return verify_database(&args, database);
    }
    if args.checkpoints.is_some() || args.trusted_keys.is_some() {
        anyhow::bail!(
            "`--checkpoints` and `--trusted-keys` go with `--file` or `--database`; a \
             coordinator verifies with its own journal and `--audit-trusted-keys`"
        );
    }
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let v = client.audit_verify().await?;
        report(&args, &v)
    })
}
