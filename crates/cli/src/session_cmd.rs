//! `fleetbox session open|run|list|close`: an interpreter on one agent, kept between calls
//! (`/v1/sessions`), from the shell.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use fleetbox_proto::api::{SessionAnswer, SessionBody, SessionCallBody, SessionView};
use fleetbox_proto::{ByteSize, ExecutionReport, Millis};

use crate::exit::exit_code_for;
use crate::jobs_cmd::{Conn, runtime};
use crate::term;

#[derive(Debug, Args)]
pub struct SessionArgs {
    #[command(subcommand)]
    pub command: SessionCommand,
    /// Print what the coordinator answered as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Open a session and print its id once its interpreter is up.
    Open {
        /// Each call's time limit (a call may ask for another).
        #[arg(long, default_value = "30s", value_parser = crate::config::parse_millis)]
        timeout: Millis,
        /// Memory for the whole session (names kept between calls count).
        #[arg(long, default_value = "256MiB", value_parser = crate::config::parse_size)]
        memory: ByteSize,
        /// Closed after this long without a call.
        #[arg(long, default_value = "10m", value_parser = crate::config::parse_millis)]
        idle: Millis,
        /// Closed after this long whatever happens.
        #[arg(long, default_value = "1h", value_parser = crate::config::parse_millis)]
        lifetime: Millis,
        /// Its name in listings.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run a program (a file, or `-` for standard input) in the session's interpreter: names
    /// from earlier calls are there. Exits as `fleetbox run` does, by the call's status.
    Run {
        /// The session's id (`ses_…`).
        id: String,
        /// The code: a file, or `-`.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// This call's time limit (default the session's).
        #[arg(long, value_parser = crate::config::parse_millis)]
        timeout: Option<Millis>,
    },
    /// The sessions, newest first, with their agent, calls and last use.
    List {
        /// Only those opening or open.
        #[arg(long)]
        live: bool,
    },
    /// Close a session: its interpreter and what it held are gone.
    Close {
        /// The session's id.
        id: String,
    },
}

pub fn session(args: SessionArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    let json = args.json;
    runtime()?.block_on(async move {
        match args.command {
            SessionCommand::Open {
                timeout,
                memory,
                idle,
                lifetime,
                name,
            } => {
                let mut body = SessionBody {
                    idle_timeout_ms: Some(idle.0),
                    max_lifetime_ms: Some(lifetime.0),
                    name,
                    ..Default::default()
                };
                body.limits.timeout = timeout;
                body.limits.memory = memory;
                let answer = client.open_session(&body).await?;
                if json {
                    print_json(&answer)?;
                } else if answer.session.state == "open" {
                    println!("{}", answer.session.id);
                } else {
                    eprintln!("fleetbox: {}", describe(&answer.session));
                }
                Ok(ExitCode::from(u8::from(answer.session.state != "open")))
            }
            SessionCommand::Run { id, file, timeout } => {
                let code = crate::run::read_code(&file)?;
                let body = SessionCallBody {
                    code: String::from_utf8(code).context("the program is not UTF-8")?,
                    timeout_ms: timeout.map(|t| t.0),
                    wait_ms: None,
                };
                let answer = client.session_run(&id, &body).await?;
                call_result(answer, json)
            }
            SessionCommand::List { live } => {
                let list = client.sessions(live).await?;
                if json {
                    print_json(&list)?;
                    return Ok(ExitCode::SUCCESS);
                }
                println!(
                    "{:<22} {:<8} {:<22} {:>6}  LAST USE",
                    "SESSION", "STATE", "AGENT", "CALLS"
                );
                for s in &list.sessions {
                    println!(
                        "{:<22} {:<8} {:<22} {:>6}  {}",
                        term::for_stdout(&s.id),
                        s.state,
                        term::for_stdout(s.agent_id.as_deref().unwrap_or("-")),
                        s.calls,
                        term::time(s.last_used_at)
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            SessionCommand::Close { id } => {
                let view = client.close_session(&id).await?;
                if json {
                    print_json(&view)?;
                } else {
                    println!("{}", describe(&view));
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// A call's report as `fleetbox run` prints one, and its exit code.
fn call_result(answer: SessionAnswer, json: bool) -> anyhow::Result<ExitCode> {
    let Some(report) = answer.report else {
        eprintln!(
            "fleetbox: call {} of session {} is `{}`: {}",
            answer.call,
            answer.session.id,
            answer.state,
            answer.error.unwrap_or_else(|| "still running".into())
        );
        return Ok(ExitCode::from(1));
    };
    if json {
        print_json(&report)?;
    }
    let report: ExecutionReport =
        serde_json::from_value(report).context("the coordinator's report")?;
    if !json {
        crate::run::print_human(&report)?;
    }
    Ok(ExitCode::from(exit_code_for(report.status)))
}

fn describe(s: &SessionView) -> String {
    let mut line = format!("session {} is {}", term::for_stdout(&s.id), s.state);
    if let Some(why) = &s.end_reason {
        line.push_str(": ");
        line.push_str(&term::for_stdout(why));
    }
    line
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
