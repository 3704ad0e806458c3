//! `fleetbox agents [release ID | harden ID [--off]]`: the fleet as the coordinator sees it,
//! with each agent's trust and quarantine; an admin releases a quarantined agent, or marks one
//! to run server-only code.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::jobs_cmd::{Conn, runtime};
use crate::term;

#[derive(Debug, Args)]
pub struct AgentsArgs {
    #[command(subcommand)]
    pub command: Option<AgentsCommand>,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Let a quarantined agent lease again; its strikes and trust start over.
    Release {
        /// The agent's id (`fleetbox agents` lists them).
        id: String,
    },
    /// Cut an agent off: its tokens stop working and its client certificates go on the CRL
    /// (every coordinator within a second). Revoke the enrolment token it used too, or it
    /// can enrol again.
    Revoke {
        /// The agent's id.
        id: String,
    },
    /// Mark an agent (one on gVisor, say) to run code the review decided
    /// `run_on_server_only`, which ordinary agents are never given.
    Harden {
        /// The agent's id (`fleetbox agents` lists them).
        id: String,
        /// Take the mark back.
        #[arg(long)]
        off: bool,
    },
}

pub fn agents(args: AgentsArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        match &args.command {
            Some(AgentsCommand::Release { id }) => {
                client.release_agent(id).await?;
                println!("{} released", term::for_stdout(id));
                return Ok(ExitCode::SUCCESS);
            }
            Some(AgentsCommand::Revoke { id }) => {
                client.revoke_agent(id).await?;
                println!("{} revoked", term::for_stdout(id));
                return Ok(ExitCode::SUCCESS);
            }
            Some(AgentsCommand::Harden { id, off }) => {
                client.mark_hardened(id, !off).await?;
                let what = if *off { "no longer runs" } else { "runs" };
                println!("{} {what} server-only code", term::for_stdout(id));
                return Ok(ExitCode::SUCCESS);
            }
            None => {}
        }
        let list = client.agents().await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&list)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:<22} {:<16} {:<8} {:>6} {:>7}  trust (python/backend: in a row, valid/invalid, re-checked, errors of results)",
            "AGENT", "NAME", "STATE", "LEASES", "STRIKES"
        );
        for a in &list.agents {
            let state = if a.quarantined.is_some() {
                "QUARANTINED".to_string()
            } else {
                a.state.as_str().to_string()
            };
            let trust: Vec<String> = a
                .trust
                .iter()
                .map(|t| {
                    format!(
                        "{}/{}: {} in a row, {}/{}, {:.0}%, {:.0}% errors of {}",
                        t.python,
                        t.backend,
                        t.consecutive_valid,
                        t.valid,
                        t.invalid,
                        t.recheck_rate * 100.0,
                        t.error_rate * 100.0,
                        t.results
                    )
                })
                .collect();
            println!(
                "{:<22} {:<16} {:<8} {:>6} {:>7}  {}",
                term::for_stdout(&a.id),
                term::for_stdout(&a.name),
                state,
                a.leases,
                a.strikes,
                if trust.is_empty() {
                    "new (every result re-checked)".to_string()
                } else {
                    term::for_stdout(&trust.join("; ")).into_owned()
                }
            );
            if a.hardened {
                println!("{:<22} hardened: runs server-only code", "");
            }
            if let Some(why) = &a.quarantined {
                println!("{:<22} quarantined: {}", "", term::for_stdout(why));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
