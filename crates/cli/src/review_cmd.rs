//! `fleetbox review check FILE...`: the coordinator's code review, offline, like a linter.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use fleetbox_proto::Decision;
use fleetbox_review::{BuiltinReviewer, Reviewer, RuleSet};

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
}

pub fn review(args: ReviewArgs) -> anyhow::Result<ExitCode> {
    let ReviewCommand::Check {
        files,
        json,
        policy,
    } = args.command;
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
