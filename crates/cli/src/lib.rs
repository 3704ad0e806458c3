//! The `fleetbox` command: argument parsing and wiring. Business logic lives in the library
//! crates; this one turns flags, environment and `fleetbox.toml` into their inputs and their
//! results into output and exit codes.

#![forbid(unsafe_code)]

mod agents_cmd;
mod audit_cmd;
mod cluster;
mod config;
mod doctor_cmd;
mod exit;
mod image_cmd;
mod install_cmd;
mod jobs_cmd;
mod receipt_cmd;
#[cfg(test)]
mod reference;
mod review_cmd;
mod run;
mod server_agents;
mod session_cmd;
mod tenancy_cmd;
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
    Server(Box<cluster::ServerArgs>),
    /// Run an agent: lease shards from a coordinator and run them in the sandbox.
    Agent(Box<cluster::AgentArgs>),
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
    /// Job receipts: `verify FILE --trusted-keys KEYS` checks one offline.
    Receipt(receipt_cmd::ReceiptArgs),
    /// The agents, their trust and quarantine; `release ID` lets a quarantined one lease again.
    Agents(agents_cmd::AgentsArgs),
    /// Serve the Model Context Protocol on stdin/stdout (for Claude Desktop, Cursor, any MCP
    /// client), calling the coordinator at `--server` with `--token`.
    Mcp(jobs_cmd::McpArgs),
    /// The code review, offline: `review check FILE...` prints findings, risk and decision.
    Review(review_cmd::ReviewArgs),
    /// Images for the `docker` backend: `image build` makes one from this host's Python.
    Image(image_cmd::ImageArgs),
    /// Tenants and their caps: `tenant create|list|show|update`.
    Tenant(tenancy_cmd::TenantArgs),
    /// Scoped, expiring tokens: `token create|list|revoke|rotate`.
    Token(tenancy_cmd::TokenArgs),
    /// Pools of agents: `pool create|list`.
    Pool(tenancy_cmd::PoolArgs),
    /// Sessions: one interpreter on one agent kept between calls (`session open|run|list|close`).
    Session(session_cmd::SessionArgs),
    /// Whether this host can run a backend (namespaces, cgroups, seccomp, Landlock, Python,
    /// docker, runsc), and for each miss the one-line fix.
    Doctor(doctor_cmd::DoctorArgs),
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
    // reqwest 0.13 (the span exporter, the S3 client) takes rustls' process-wide provider:
    // ring, as every TLS configuration here names explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cli, spans) = match Cli::try_parse() {
        Ok(cli) => {
            let service = match cli.command {
                Command::Server(_) => "fleetbox-server",
                Command::Agent(_) => "fleetbox-agent",
                _ => "fleetbox",
            };
            let spans = init_logging(cli.log_format, service);
            (cli, spans)
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
        Command::Server(args) => cluster::server(cli.config.as_deref(), *args),
        Command::Agent(args) => cluster::agent(cli.config.as_deref(), *args),
        Command::Submit(args) => jobs_cmd::submit(args),
        Command::Jobs(args) => jobs_cmd::jobs(args),
        Command::Job(args) => jobs_cmd::job(args),
        Command::Cancel(args) => jobs_cmd::cancel(args),
        Command::Blob(args) => jobs_cmd::blob(args),
        Command::Audit(args) => audit_cmd::audit(args),
        Command::Receipt(args) => receipt_cmd::receipt(args),
        Command::Agents(args) => agents_cmd::agents(args),
        Command::Mcp(args) => jobs_cmd::mcp(args),
        Command::Review(args) => review_cmd::review(args),
        Command::Image(args) => image_cmd::image(args),
        Command::Tenant(args) => tenancy_cmd::tenant(args),
        Command::Token(args) => tenancy_cmd::token(args),
        Command::Pool(args) => tenancy_cmd::pool(args),
        Command::Doctor(args) => doctor_cmd::doctor(args),
        Command::Session(args) => session_cmd::session(args),
    };
    if let Some(provider) = spans
        && let Err(e) = provider.shutdown()
    {
        eprintln!("fleetbox: warning: the last spans were not exported: {e}");
    }
    match result {
        Ok(code) => code,
        // The reader went away (`fleetbox job ID | head`): nothing to say, as ripgrep does.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetbox: error: {}", error_chain(&e));
            // A coordinator or agent failing at run time is not a usage error; a spec the
            // coordinator refused (a syntax error in its code, a rule it cannot compile) is,
            // as when the CLI refuses it itself.
            let refused_spec = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<fleetbox_client::ClientError>(),
                    Some(fleetbox_client::ClientError::Api { code, .. }) if code == "invalid_spec"
                )
            });
            let runtime = !refused_spec
                && e.chain().any(|c| {
                    c.is::<fleetbox_client::ClientError>()
                        || c.is::<fleetbox_server::StartError>()
                        || c.is::<fleetbox_agent::AgentError>()
                });
            ExitCode::from(if runtime { 1 } else { EXIT_USAGE })
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
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

/// Log lines to stderr (filtered by `FLEETBOX_LOG`, `warn` by default), and spans to an
/// OpenTelemetry collector over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set. The provider returned must be shut down at
/// exit: it flushes the last spans.
///
/// One filter serves both (per-layer filters lose spans after a dynamic `enabled` check,
/// which sqlx makes after every query: tokio-rs/tracing#2704): with spans exported it also
/// lets Fleetbox's own `info` through, unless `FLEETBOX_LOG` says what to do with `fleetbox`.
fn init_logging(
    format: LogFormat,
    service: &str,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (tracer, provider) = match otlp_tracer(service) {
        Ok(Some((tracer, provider))) => (Some(tracer), Some(provider)),
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("fleetbox: warning: spans are not exported: {e}");
            (None, None)
        }
    };
    let mut directives = std::env::var(fleetbox_proto::env::FLEETBOX_LOG)
        .ok()
        .filter(|d| tracing_subscriber::EnvFilter::try_new(d).is_ok())
        .unwrap_or_else(|| "warn".to_string());
    if tracer.is_some() && !directives.contains("fleetbox") {
        directives.push_str(",fleetbox=info");
    }
    let filter = tracing_subscriber::EnvFilter::new(directives);
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
    });
    // Colour codes only where a person reads them: a log file stays plain text.
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let spans = tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(text)
        .with(spans)
        .try_init();
    provider
}

/// The OpenTelemetry tracer and its provider, when the standard OTLP variables ask for it
/// (and `OTEL_SDK_DISABLED` does not say no). The exporter reads the rest of the standard
/// variables itself (headers, timeout, `OTEL_BSP_*` batching); `OTEL_SERVICE_NAME` overrides
/// `service`.
fn otlp_tracer(
    service: &str,
) -> Result<
    Option<(
        opentelemetry_sdk::trace::SdkTracer,
        opentelemetry_sdk::trace::SdkTracerProvider,
    )>,
    String,
> {
    use opentelemetry::trace::TracerProvider as _;
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !set(fleetbox_proto::env::OTEL_EXPORTER_OTLP_ENDPOINT)
        && !set(fleetbox_proto::env::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
        || std::env::var(fleetbox_proto::env::OTEL_SDK_DISABLED)
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !set(fleetbox_proto::env::OTEL_SERVICE_NAME) {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("fleetbox");
    Ok(Some((tracer, provider)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/CLI.md` is what the commands' definitions say (`FLEETBOX_BLESS=1` rewrites it).
    #[test]
    fn the_cli_reference_is_current() {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.build();
        let text = reference::markdown(&cmd);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/CLI.md");
        if std::env::var_os("FLEETBOX_BLESS").is_some() {
            std::fs::write(&path, &text).unwrap();
            return;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == text,
            "docs/CLI.md is out of date with the commands: run `FLEETBOX_BLESS=1 cargo test -p fleetbox reference` and commit it"
        );
    }
}
