//! `fleetbox review check FILE...`: the coordinator's code review, offline, like a linter.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetbox_proto::Decision;
use fleetbox_review::{BuiltinReviewer, Reviewer, RuleSet};

use crate::jobs_cmd::{Conn, runtime};

#[derive(Debug, Args)]
pub struct ReviewArgs {
    #[command(subcommand)]
    pub command: ReviewCommand,
}

#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// Review Python files: `file:line:col rule severity message`, then the risk and the
    /// decision. Exit 1 when any file's decision is not `run` (or it does not parse).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// JSON lines: one review per file.
        #[arg(long)]
        json: bool,
        /// Rules and policy (default: the shipped `resources/review/rules.toml`).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
    /// The review queue: what was flagged for a person (held jobs), newest first.
    List {
        /// `open`, `approved` or `rejected`.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Approve a flag: a held job starts.
    Approve {
        id: i64,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Reject a flag: a held job is cancelled with the reason.
    Reject {
        id: i64,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Re-run a flag's shards (its job must have finished): a child job runs them again,
    /// each checked by the coordinator's sandbox, and its result folds over the job's values.
    Rerun {
        id: i64,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

pub fn review(args: ReviewArgs) -> anyhow::Result<ExitCode> {
    let (files, json, policy) = match args.command {
        ReviewCommand::Check {
            files,
            json,
            policy,
        } => (files, json, policy),
        ReviewCommand::List {
            status,
            job,
            kind,
            json,
            conn,
        } => return list(conn, status, job, kind, json),
        ReviewCommand::Approve { id, note, conn } => return decide(conn, id, true, note),
        ReviewCommand::Reject { id, note, conn } => return decide(conn, id, false, note),
        ReviewCommand::Rerun { id, note, conn } => {
            let client = conn.client()?;
            let flag = runtime()?.block_on(client.rerun_flag(id, note.as_deref()))?;
            eprintln!(
                "fleetbox: flag {} rerun (job {}): its shards run again as {}",
                flag.id,
                flag.job_id,
                flag.rerun_job_id.as_deref().unwrap_or("?")
            );
            println!("{}", flag.rerun_job_id.unwrap_or_default());
            return Ok(ExitCode::SUCCESS);
        }
    };
    let reviewer = match &policy {
        None => BuiltinReviewer::shipped(),
        Some(path) => {
            let text = fs_err::read_to_string(path)?;
            BuiltinReviewer::new(
                RuleSet::parse(&text).with_context(|| format!("`--policy {}`", path.display()))?,
            )
        }
    };
    let mut out = std::io::stdout().lock();
    let mut clean = true;
    for file in &files {
        let code = fs_err::read_to_string(file)?;
        let name = file.display();
        match reviewer.review_code(&code) {
            Ok(r) => {
                clean &= r.decision == Decision::Run;
                if json {
                    let line = serde_json::json!({ "file": name.to_string(), "review": r });
                    writeln!(out, "{line}")?;
                    continue;
                }
                for f in &r.findings {
                    let severity = serde_json::to_value(f.severity)?;
                    writeln!(
                        out,
                        "{name}:{}:{} {} {} {}",
                        f.line,
                        f.column,
                        f.rule,
                        severity.as_str().unwrap_or_default(),
                        f.message
                    )?;
                }
                writeln!(
                    out,
                    "{name}: risk {}, decision {}",
                    r.risk,
                    r.decision.as_str()
                )?;
            }
            Err(e) => {
                clean = false;
                if json {
                    let line = serde_json::json!({
                        "file": name.to_string(),
                        "syntax_error": { "line": e.line, "column": e.column, "message": e.message },
                    });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(
                        out,
                        "{name}:{}:{} syntax-error {}",
                        e.line, e.column, e.message
                    )?;
                }
            }
        }
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn list(
    conn: Conn,
    status: Option<String>,
    job: Option<String>,
    kind: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = conn.client()?;
    let query: Vec<String> = [("status", status), ("job", job), ("kind", kind)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
    let flags = runtime()?.block_on(client.review_flags(&query.join("&")))?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &flags)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:>6}  {:<8}  {:<9}  {:<22}  details",
        "id", "kind", "status", "job"
    )?;
    for f in &flags.flags {
        let details = match (f.details["decision"].as_str(), f.details["risk"].as_u64()) {
            (Some(d), Some(r)) => format!(
                "{d}, risk {r}: {}",
                f.details["findings"]
                    .as_array()
                    .map(|fs| fs
                        .iter()
                        .filter_map(|x| Some(format!("{}@{}", x["rule"].as_str()?, x["line"])))
                        .collect::<Vec<_>>()
                        .join(" "))
                    .unwrap_or_default()
            ),
            _ => f.details.to_string(),
        };
        writeln!(
            out,
            "{:>6}  {:<8}  {:<9}  {:<22}  {details}",
            f.id, f.kind, f.status, f.job_id
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn decide(conn: Conn, id: i64, approve: bool, note: Option<String>) -> anyhow::Result<ExitCode> {
    let client = conn.client()?;
    let flag = runtime()?.block_on(client.decide_flag(id, approve, note.as_deref()))?;
    eprintln!(
        "fleetbox: flag {} {} (job {})",
        flag.id, flag.status, flag.job_id
    );
    Ok(ExitCode::SUCCESS)
}
