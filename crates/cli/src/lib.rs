//! The `fleetbox` command: argument parsing and wiring. Business logic lives in the library
//! crates; this one turns flags, environment and `fleetbox.toml` into their inputs and their
//! results into output and exit codes.

mod agents_cmd;
mod audit_cmd;
mod cluster;
mod config;
mod exit;
mod image_cmd;
mod jobs_cmd;
mod review_cmd;
mod run;
mod term;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use exit::{EXIT_USAGE, exit_code_for};

#[derive(Debug, Parser)]
#[command(name = "fleetbox", version, about = "A distributed sandbox for Python")]
struct Cli {
    /// Configuration file (default: `./fleetbox.toml` when present).
    #[arg(long, global = true, env = fleetbox_proto::env::FLEETBOX_CONFIG)]
    config: Option<std::path::PathBuf>,
    /// Log lines as `text` (colours only on a terminal) or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = fleetbox_proto::env::FLEETBOX_LOG_FORMAT)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one Python program in the sandbox and report what happened.
    Run(run::RunArgs),
    /// Coordinator, local agents and SQLite in one process: the quickest way to start.
    Up(cluster::UpArgs),
    /// Run the coordinator (HTTP API, store, scheduler, aggregation).
    Server(cluster::ServerArgs),
    /// Run an agent: lease shards from a coordinator and run them in the sandbox.
    Agent(cluster::AgentArgs),
    /// Submit a job spec (TOML or JSON); `--wait` shows progress and prints the result.
    Submit(jobs_cmd::SubmitArgs),
    /// List jobs.
    Jobs(jobs_cmd::JobsArgs),
    /// Show one job, its result (`--result`) or its shards (`--shards`).
    Job(jobs_cmd::JobArgs),
    /// Cancel a job: its unsettled shards become `dead`.
    Cancel(jobs_cmd::CancelArgs),
    /// Download a stored blob (a large stream or output, a result, a file a shard wrote).
    Blob(jobs_cmd::BlobArgs),
    /// The tamper-evident audit log: `list` its entries, `verify` its hash chain.
    Audit(audit_cmd::AuditArgs),
    /// The agents, their trust and quarantine; `release ID` lets a quarantined one lease again.
    Agents(agents_cmd::AgentsArgs),
    /// Serve the Model Context Protocol on stdin/stdout (for Claude Desktop, Cursor, any MCP
    /// client), calling the coordinator at `--server` with `--token`.
    Mcp(jobs_cmd::McpArgs),
    /// The code review, offline: `review check FILE...` prints findings, risk and decision.
    Review(review_cmd::ReviewArgs),
    /// Images for the `docker` backend: `image build` makes one from this host's Python.
    Image(image_cmd::ImageArgs),
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
    let cli = match Cli::try_parse() {
        Ok(cli) => {
            init_logging(cli.log_format);
            cli
        }
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
        Command::Up(args) => cluster::up(cli.config.as_deref(), args),
        Command::Server(args) => cluster::server(cli.config.as_deref(), args),
        Command::Agent(args) => cluster::agent(cli.config.as_deref(), args),
        Command::Submit(args) => jobs_cmd::submit(args),
        Command::Jobs(args) => jobs_cmd::jobs(args),
        Command::Job(args) => jobs_cmd::job(args),
        Command::Cancel(args) => jobs_cmd::cancel(args),
        Command::Blob(args) => jobs_cmd::blob(args),
        Command::Audit(args) => audit_cmd::audit(args),
        Command::Agents(args) => agents_cmd::agents(args),
        Command::Mcp(args) => jobs_cmd::mcp(args),
        Command::Review(args) => review_cmd::review(args),
        Command::Image(args) => image_cmd::image(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetbox: error: {}", error_chain(&e));
            // A coordinator or agent failing at run time is not a usage error.
            let runtime = e.chain().any(|c| {
                c.is::<fleetbox_client::ClientError>()
                    || c.is::<fleetbox_server::StartError>()
                    || c.is::<fleetbox_agent::AgentError>()
            });
            ExitCode::from(if runtime { 1 } else { EXIT_USAGE })
        }
    }
}

/// The error and its causes, skipping a cause whose text the message above already includes
/// (our error types print their source inline).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env(fleetbox_proto::env::FLEETBOX_LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        // Colour codes only where a person reads them: a log file stays plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
