//! The `fleetbox` command: argument parsing and wiring. Business logic lives in the library
//! crates; this one turns flags, environment and `fleetbox.toml` into their inputs and their
//! results into output and exit codes.

mod config;
mod exit;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use exit::{EXIT_USAGE, exit_code_for};

#[derive(Debug, Parser)]
#[command(name = "fleetbox", version, about = "A distributed sandbox for Python")]
struct Cli {
    /// Configuration file (default: `./fleetbox.toml` when present).
    #[arg(long, global = true, env = fleetbox_proto::env::FLEETBOX_CONFIG)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one Python program in the sandbox and report what happened.
    Run(run::RunArgs),
}

/// Parse arguments, run the command, map the result to an exit code.
pub fn main() -> ExitCode {
    // The jail's helper is this same binary; it must not parse flags or start logging.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == fleetbox_sandbox::jail::init::INIT_ARG)
    {
        fleetbox_sandbox::jail::init::helper_main();
    }
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::run(cli.config.as_deref(), args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetbox: error: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(fleetbox_proto::env::FLEETBOX_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
