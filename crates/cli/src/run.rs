//! `fleetbox run FILE|-`: one program, one report.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use fleetbox_proto::{ByteSize, ExecutionReport, Millis};
use fleetbox_sandbox::{Backend, RunRequest, SandboxConfig};

use crate::config::{FileConfig, RunFlags, resolve_run};
use crate::exit::exit_code_for;
use crate::term;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The Python program, or `-` to read it from standard input.
    pub file: PathBuf,
    /// `process` (alias `local`), `jail` or `docker`. Env: `SANDBOX_TYPE`.
    #[arg(long)]
    pub backend: Option<String>,
    #[command(flatten)]
    pub docker: crate::cluster::DockerArgs,
    /// Wall-clock timeout, e.g. `500ms`, `5s`. Env: `SANDBOX_TIMEOUT_SEC`.
    #[arg(long, value_parser = crate::config::parse_millis)]
    pub timeout: Option<Millis>,
    /// Memory limit, e.g. `256MiB`. Env: `FLEETBOX_MEMORY`.
    #[arg(long, value_parser = crate::config::parse_size)]
    pub memory: Option<ByteSize>,
    /// CPU time limit (default: the timeout). Env: `FLEETBOX_CPU_TIME`.
    #[arg(long, value_parser = crate::config::parse_millis)]
    pub cpu_time: Option<Millis>,
    /// Bytes kept of stdout and of stderr, e.g. `64KiB`. Env: `SANDBOX_MAX_OUTPUT_KB`.
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_output: Option<ByteSize>,
    /// Bytes the workspace may hold, e.g. `512MiB` (a tmpfs when run as root; its pages count
    /// against `--memory` too).
    #[arg(long, value_parser = crate::config::parse_size)]
    pub workspace_size: Option<ByteSize>,
    /// Keep running past the output cap (the rest is counted, not kept).
    #[arg(long)]
    pub continue_past_output_limit: bool,
    /// JSON input for the program, written to `input.json` (`FLEETBOX_INPUT`).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// `jail`: the seccomp policy, `deny` (the deny list) or `allow` (the measured allow-list;
    /// every other call is denied and reported). `docker` always uses the allow-list profile
    /// (`resources/seccomp/docker.json`). Env: `FLEETBOX_SECCOMP`.
    #[arg(long, env = fleetbox_proto::env::FLEETBOX_SECCOMP, default_value = "deny")]
    pub seccomp: fleetbox_sandbox::SeccompMode,
    /// Keep the run directory and print where it is.
    #[arg(long)]
    pub keep_workspace: bool,
    /// `jail`: the hosts the program may reach, through the egress proxy, comma-separated
    /// (`pypi.org:443,*.pythonhosted.org`); every connection is listed in the report.
    #[arg(long, value_delimiter = ',', value_parser = parse_egress_rule, value_name = "HOST[:PORT]")]
    pub egress: Vec<fleetbox_proto::EgressRule>,
    /// With `--egress`: a hosts file (`ADDRESS NAME...`) the proxy resolves from first.
    #[arg(long, value_name = "FILE")]
    pub egress_hosts: Option<PathBuf>,
    /// Print the full report as JSON instead of the program's output and a summary.
    #[arg(long)]
    pub json: bool,
    /// A file for the workspace, `NAME=PATH` (or `PATH`, named by its file name); repeatable.
    #[arg(long = "file", value_name = "NAME=PATH")]
    pub files: Vec<String>,
    /// Run it on a coordinator's fleet (`POST /v1/run`) instead of here.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// With `--server`: the admin token (default: `DATA/admin.token`).
    #[arg(long, env = fleetbox_proto::env::FLEETBOX_TOKEN, hide_env_values = true)]
    pub token: Option<String>,
    /// With `--server`: the coordinator's data directory, to find its admin token.
    #[arg(long, env = fleetbox_proto::env::FLEETBOX_DATA, default_value = "fleetbox-data")]
    pub data: PathBuf,
    /// With `--server`: a package the run needs (`[environment]`); repeatable.
    #[arg(long = "requirement", value_name = "REQ")]
    pub requirements: Vec<String>,
    /// With `--server`: how long to wait for the answer before leaving the job running.
    #[arg(long, default_value = "60s", value_parser = crate::config::parse_millis)]
    pub wait: Millis,
}

/// `--file` arguments as (name, content).
fn read_files(args: &[String]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    args.iter()
        .map(|a| {
            let (name, path) = match a.split_once('=') {
                Some((n, p)) => (n.to_string(), PathBuf::from(p)),
                None => {
                    let p = PathBuf::from(a);
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .with_context(|| format!("`--file {a}` names no file"))?;
                    (name, p)
                }
            };
            fleetbox_proto::job::check_file_name(&name)
                .map_err(|why| anyhow::anyhow!("`--file {a}`: {why}"))?;
            let bytes = fs_err::read(&path).with_context(|| format!("`--file {a}`"))?;
            Ok((name, bytes))
        })
        .collect()
}

pub(crate) fn parse_egress_rule(s: &str) -> Result<fleetbox_proto::EgressRule, String> {
    fleetbox_proto::EgressRule::parse(s)
}

pub fn run(config: Option<&Path>, args: RunArgs) -> anyhow::Result<ExitCode> {
    let file = FileConfig::load(config)?;
    let settings = resolve_run(
        &file,
        RunFlags {
            backend: args.backend.clone(),
            timeout: args.timeout,
            cpu_time: args.cpu_time,
            memory: args.memory,
            max_output: args.max_output,
            workspace_size: args.workspace_size,
            docker_image: args.docker.docker_image.clone(),
            docker_runtime: args.docker.docker_runtime.clone(),
        },
    )?;
    let backend: Backend = settings
        .backend
        .parse()
        .with_context(|| "invalid `--backend` / `SANDBOX_TYPE`".to_string())?;
    let code = read_code(&args.file)?;
    let input = match &args.input {
        Some(path) => {
            let bytes = fs_err::read(path).context("reading `--input`")?;
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .with_context(|| format!("`--input {}` is not valid JSON", path.display()))?;
            Some(bytes)
        }
        None => None,
    };
    let mut limits = settings.limits;
    limits.continue_past_output_limit = args.continue_past_output_limit;
    if !args.egress.is_empty() {
        if !limits.network.is_off() {
            anyhow::bail!(
                "`--egress` and the host's network (`DOCKER_NETWORK_ENABLED`) exclude each other"
            );
        }
        limits.network = fleetbox_proto::Network::Allow(args.egress.clone());
    } else if args.egress_hosts.is_some() {
        anyhow::bail!("`--egress-hosts` needs `--egress`");
    }
    let files = read_files(&args.files)?;
    if let Some(server) = &args.server {
        return run_remote(server, &args, code, input, limits, files);
    }
    if !args.requirements.is_empty() {
        anyhow::bail!("`--requirement` needs `--server`: environments are built by agents");
    }
    let mut req = RunRequest::new(code, input, limits);
    req.files = files;
    req.keep_workspace = args.keep_workspace;
    let sandbox = fleetbox_sandbox::open(
        backend,
        SandboxConfig {
            python: settings.python,
            work_root: settings.work_root,
            use_cgroups: settings.use_cgroups,
            jail_helper: None,
            // One run per process: nothing to build ahead.
            warm: 0,
            seccomp: args.seccomp,
            docker: settings.docker,
            cgroup_root: settings.cgroup_root,
            trace: settings.trace,
            egress_hosts: args.egress_hosts.clone(),
        },
    )?;
    let report = sandbox.run(&req);
    // A kept workspace must outlive this process without holding memory: off its tmpfs.
    if let Some(ws) = &report.workspace {
        match fleetbox_sandbox::workspace::persist_kept(Path::new(ws)) {
            Ok(0) => {}
            Ok(n) => eprintln!(
                "fleetbox: {n} entries of the kept workspace were left out (device nodes, FIFOs, \
                 sockets, symlinks out of the workspace, or unreadable)"
            ),
            Err(e) => eprintln!("fleetbox: the kept workspace stays on its tmpfs: {e}"),
        }
    }
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_human(&report)?;
    }
    Ok(ExitCode::from(exit_code_for(report.status)))
}

/// `--server`: the same run on a coordinator's fleet, printed the same way.
fn run_remote(
    server: &str,
    args: &RunArgs,
    code: Vec<u8>,
    input: Option<Vec<u8>>,
    limits: fleetbox_proto::Limits,
    files: Vec<(String, Vec<u8>)>,
) -> anyhow::Result<ExitCode> {
    if args.backend.is_some() {
        anyhow::bail!("`--backend` does not apply with `--server`: agents run their own");
    }
    if args.keep_workspace {
        anyhow::bail!("`--keep-workspace` does not apply with `--server`");
    }
    if args.egress_hosts.is_some() {
        anyhow::bail!(
            "`--egress-hosts` does not apply with `--server`: each agent resolves with its own (`fleetbox agent --egress-hosts`)"
        );
    }
    let code = String::from_utf8(code).context("the program is not UTF-8 text")?;
    let input = match input {
        Some(bytes) => Some(serde_json::from_slice(&bytes)?),
        None => None,
    };
    let body = fleetbox_proto::api::RunBody {
        code,
        input,
        limits,
        files: fleetbox_proto::job::encode_files(&files),
        environment: (!args.requirements.is_empty()).then(|| fleetbox_proto::EnvironmentSpec {
            requirements: args.requirements.clone(),
            requirements_file: None,
        }),
        wait_ms: Some(args.wait.0),
        ..Default::default()
    };
    let client = crate::jobs_cmd::Conn {
        server: server.to_string(),
        token: args.token.clone(),
        data: args.data.clone(),
        ca_cert: std::env::var_os(fleetbox_proto::env::FLEETBOX_CA_CERT).map(Into::into),
    }
    .client()?;
    let answer = crate::jobs_cmd::runtime()?.block_on(client.run(&body))?;
    let Some(report) = answer.report else {
        if answer.state.is_final() {
            eprintln!(
                "fleetbox: job {} ended `{}` without running: {}",
                answer.job_id,
                answer.state,
                answer.error.unwrap_or_default()
            );
        } else {
            eprintln!(
                "fleetbox: still running as job {} (`fleetbox job {} --result` later)",
                answer.job_id, answer.job_id
            );
        }
        return Ok(ExitCode::from(1));
    };
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        let status = report["status"].as_str().unwrap_or("sandbox_error");
        let status = fleetbox_proto::Status::ALL
            .into_iter()
            .find(|s| s.as_str() == status)
            .unwrap_or(fleetbox_proto::Status::SandboxError);
        return Ok(ExitCode::from(exit_code_for(status)));
    }
    let report: ExecutionReport =
        serde_json::from_value(report).context("the coordinator's report")?;
    print_human(&report)?;
    eprintln!("fleetbox: ran as job {}", answer.job_id);
    Ok(ExitCode::from(exit_code_for(report.status)))
}

pub(crate) fn read_code(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading the program from standard input")?;
        return Ok(buf);
    }
    Ok(fs_err::read(path)?)
}

pub(crate) fn print_human(r: &ExecutionReport) -> anyhow::Result<()> {
    // The program's bytes reach a terminal with their control sequences shown, not obeyed.
    let mut out = std::io::stdout().lock();
    term::write_untrusted(&mut out, r.stdout.as_bytes(), term::stdout_is_terminal())?;
    out.flush()?;
    let mut err = std::io::stderr().lock();
    let err_tty = term::stderr_is_terminal();
    term::write_untrusted(&mut err, r.stderr.as_bytes(), err_tty)?;
    let mut line = format!(
        "fleetbox: {} in {}ms (cpu {}ms, peak {}, {}) [{}]",
        r.status,
        r.wall_ms,
        r.cpu_user_ms + r.cpu_sys_ms,
        ByteSize(r.peak_memory_bytes / 1024 * 1024),
        match (r.exit_code, &r.signal_name) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => s.clone(),
            (None, None) => "not started".into(),
        },
        r.backend,
    );
    if let Some(m) = &r.message {
        line.push_str(": ");
        line.push_str(m);
    }
    if r.stdout_truncated || r.stderr_truncated {
        line.push_str(&format!(
            " (output truncated: stdout {} bytes, stderr {} bytes)",
            r.stdout_bytes, r.stderr_bytes
        ));
    }
    // The message carries the program's exception text.
    term::write_untrusted(&mut err, line.as_bytes(), err_tty)?;
    writeln!(err)?;
    for v in &r.violations {
        writeln!(err, "fleetbox: violation: {}: {}", v.kind, v.detail)?;
    }
    if !r.egress.is_empty() || r.egress_direct_refused > 0 {
        let allowed = r.egress.iter().filter(|c| c.allowed).count();
        writeln!(
            err,
            "fleetbox: egress: {allowed} connections allowed, {} refused, {} packets around the proxy refused",
            r.egress.len() - allowed,
            r.egress_direct_refused
        )?;
        // Names the program asked for: shown as untrusted text.
        for c in r.egress.iter().filter(|c| !c.allowed).take(10) {
            let line = format!(
                "fleetbox: egress refused: {} {}:{}: {}\n",
                c.method, c.host, c.port, c.detail
            );
            term::write_untrusted(&mut err, line.as_bytes(), err_tty)?;
        }
    }
    if let Some(ws) = &r.workspace {
        writeln!(err, "fleetbox: workspace kept at {ws}")?;
    }
    Ok(())
}
