//! `fleetbox submit`, `fleetbox jobs`, `fleetbox job`, `fleetbox cancel`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use fleetbox_client::Client;
use fleetbox_proto::JobState;
use fleetbox_proto::api::JobView;
use fleetbox_proto::job::AggregateSpec;
use fleetbox_proto::{JobSpec, env};

use crate::term;

/// Where the client commands find the coordinator.
#[derive(Debug, Args)]
pub struct Conn {
    /// Coordinator URL.
    #[arg(long, global = true, env = env::FLEETBOX_SERVER, default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Admin token (default: read from `DATA/admin.token`).
    #[arg(long, global = true, env = env::FLEETBOX_TOKEN, hide_env_values = true)]
    pub token: Option<String>,
    /// The coordinator's data directory, to find its admin token (and `tls/ca.pem`).
    #[arg(long, global = true, env = env::FLEETBOX_DATA, default_value = "fleetbox-data")]
    pub data: PathBuf,
    /// A CA certificate (PEM) to trust besides the system's for an `https://` coordinator
    /// [default: `DATA/tls/ca.pem` when it exists].
    #[arg(long, global = true, env = env::FLEETBOX_CA_CERT, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

impl Conn {
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => {
                let path = self.data.join("admin.token");
                fs_err::read_to_string(&path)
                    .map(|t| t.trim().to_string())
                    .with_context(|| {
                        format!(
                            "no `--token`/`{}` given and no admin token at `{}`",
                            env::FLEETBOX_TOKEN,
                            path.display()
                        )
                    })?
            }
        };
        Ok(Client::trusting(&self.server, &token, &self.trust()?))
    }

    /// `--ca-cert`, else the CA of a `--tls auto` coordinator in `--data`, else the system's.
    pub(crate) fn trust(&self) -> anyhow::Result<fleetbox_client::Trust> {
        let auto = self.data.join("tls").join("ca.pem");
        let path = match &self.ca_cert {
            Some(p) => Some(p.clone()),
            None => auto.exists().then_some(auto),
        };
        Ok(fleetbox_client::Trust::from_option(path.as_deref())?)
    }
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Job spec (`.toml` or `.json`).
    pub spec: PathBuf,
    /// Wait for the result, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long.
    #[arg(long, value_parser = |s: &str| s.parse::<fleetbox_proto::Millis>().map_err(|e| e.to_string()))]
    pub timeout: Option<fleetbox_proto::Millis>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in this state.
    #[arg(long)]
    pub state: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct JobArgs {
    pub id: String,
    /// Print the result (value + summary) instead of the job.
    #[arg(long, conflicts_with = "shards")]
    pub result: bool,
    /// Print the shards (all of them, fetched page by page).
    #[arg(long)]
    pub shards: bool,
    /// With `--shards`: only shards in this state (`queued`, `leased`, `accepted`, `rejected`, `dead`).
    #[arg(long, requires = "shards")]
    pub state: Option<String>,
    /// List the files the accepted shards wrote (shard, path, bytes, sha256 for
    /// `fleetbox blob`).
    #[arg(long, conflicts_with_all = ["result", "shards"])]
    pub files: bool,
    /// Save the file an accepted shard wrote at this path (relative to its workspace) to
    /// `--output`, or stdout.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["result", "shards", "files"])]
    pub file: Option<String>,
    /// With `--file`: the shard that wrote it, when several did.
    #[arg(long, requires = "file")]
    pub shard: Option<u64>,
    /// With `--file`: where to write it.
    #[arg(short, long, requires = "file")]
    pub output: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// A `needs_review` job: check its tainted shards again (values an agent later caught
    /// lying got accepted unchecked) and fold it again.
    #[arg(long, conflicts_with_all = ["result", "shards"])]
    pub rerun_tainted: bool,
    /// Print the chain of follow-up jobs this job belongs to, as a tree.
    #[arg(long, conflicts_with_all = ["result", "shards", "rerun_tainted"])]
    pub chain: bool,
    /// Print the completed job's receipt (JSON): its result, each accepted shard's signed
    /// report hash and verdict, the audit entries recording them and the proof that they are
    /// in a signed checkpoint. `fleetbox receipt verify` checks it offline.
    #[arg(long, conflicts_with_all = ["result", "shards", "rerun_tainted", "chain"])]
    pub receipt: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct BlobArgs {
    /// The sha256 of a stored stream, output, result or shard file (see `fleetbox job ID --shards --json` and the report's `files`).
    pub sha256: String,
    /// Write to this file instead of stdout.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Args)]
pub struct McpArgs {
    #[command(flatten)]
    pub conn: Conn,
}

/// `fleetbox mcp`: MCP on stdio until the client closes it. Stdout carries the protocol, so
/// everything else goes to stderr.
pub fn mcp(args: McpArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fleetbox_mcp::serve_stdio(client))
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    pub id: String,
    /// Also cancel its follow-up jobs (and theirs) that have not finished.
    #[arg(long)]
    pub chain: bool,
    #[command(flatten)]
    pub conn: Conn,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Read a spec file and inline the files it names (relative to the spec's directory),
/// follow-up rules' `job_file`s included.
pub fn load_spec(path: &Path) -> anyhow::Result<JobSpec> {
    let spec = read_spec(path, &mut Vec::new())?;
    // Validate here too, so mistakes are caught before anything is sent.
    spec.plan()
        .map_err(|e| anyhow::anyhow!("invalid job spec `{}`: {e}", path.display()))?;
    Ok(spec)
}

/// One spec file with what it names inlined; `within` are the files being read above it.
fn read_spec(path: &Path, within: &mut Vec<PathBuf>) -> anyhow::Result<JobSpec> {
    let text = fs_err::read_to_string(path)?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    let mut spec = if is_json {
        JobSpec::from_json(text.as_bytes())
    } else {
        JobSpec::from_toml(&text)
    }
    .map_err(|e| anyhow::anyhow!("invalid job spec `{}`: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let read = |field: &str, rel: &str| -> anyhow::Result<String> {
        let p = base.join(rel);
        fs_err::read_to_string(&p).with_context(|| format!("`{field}` in `{}`", path.display()))
    };
    if spec.code.is_none()
        && let Some(file) = spec.code_file.take()
    {
        spec.code = Some(read("code_file", &file)?);
    }
    if spec.shards.text.is_none()
        && let Some(file) = spec.shards.lines.take()
    {
        spec.shards.text = Some(read("shards.lines", &file)?);
    }
    if let Some(AggregateSpec::Table(t)) = &mut spec.aggregate
        && t.code.is_none()
        && let Some(file) = t.code_file.take()
    {
        t.code = Some(read("aggregate.code_file", &file)?);
    }
    if let Some(env) = &mut spec.environment
        && let Some(file) = env.requirements_file.take()
    {
        let text = read("environment.requirements_file", &file)?;
        let listed = fleetbox_proto::EnvironmentSpec::parse_requirements_txt(&text)
            .map_err(|e| anyhow::anyhow!("invalid job spec `{}`: {e}", path.display()))?;
        env.requirements.extend(listed);
    }
    let me = fs_err::canonicalize(path)?;
    within.push(me.clone());
    for (i, rule) in spec.followup.iter_mut().enumerate() {
        // An inline child names its files as a spec does (`code_file`, `aggregate.code_file`).
        if let Some(serde_json::Value::Object(then)) = &mut rule.then {
            inline_code_file(then, &format!("followup[{i}].then"), &read)?;
            if let Some(serde_json::Value::Object(agg)) = then.get_mut("aggregate") {
                inline_code_file(agg, &format!("followup[{i}].then.aggregate"), &read)?;
            }
        }
        let Some(file) = rule.job_file.take() else {
            continue;
        };
        let child = fs_err::canonicalize(base.join(&file))
            .with_context(|| format!("`followup[{i}].job_file` in `{}`", path.display()))?;
        rule.then = Some(if child == me {
            // A rule that starts its own job again (its caps end the chain).
            serde_json::Value::String("self".into())
        } else if within.contains(&child) {
            bail!(
                "`followup[{i}].job_file` in `{}` names `{file}`, which includes this file: such a cycle cannot be inlined (a rule may name its own file, which runs its own job again)",
                path.display()
            );
        } else {
            serde_json::to_value(read_spec(&child, within)?)?
        });
    }
    within.pop();
    Ok(spec)
}

/// `code_file` in a table of a spec, read and sent as `code` (unless `code` is there too).
fn inline_code_file(
    table: &mut serde_json::Map<String, serde_json::Value>,
    at: &str,
    read: &dyn Fn(&str, &str) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    if table.contains_key("code") {
        return Ok(());
    }
    if let Some(serde_json::Value::String(file)) = table.remove("code_file") {
        let code = read(&format!("{at}.code_file"), &file)?;
        table.insert("code".into(), serde_json::Value::String(code));
    }
    Ok(())
}

pub fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let spec = load_spec(&args.spec)?;
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let job = client.submit(&spec).await?;
        eprintln!(
            "fleetbox: submitted `{}` as {} ({} shards)",
            job.name, job.id, job.shards.total
        );
        if !args.wait {
            println!("{}", job.id);
            return Ok(ExitCode::SUCCESS);
        }
        wait(&client, &job, args.timeout.map(|t| t.as_duration())).await
    })
}

async fn wait(
    client: &Client,
    job: &JobView,
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let view = loop {
        let view = client.job(&job.id).await?;
        let line = progress_line(&view, started.elapsed());
        if tty {
            eprint!("\r{line}\x1b[K");
        } else if line != last_line && view.shards.settled() != 0 {
            // Not a terminal: a line per change, at most every half second.
            eprintln!("{line}");
        }
        last_line = line;
        if view.state.is_final() || view.state == JobState::NeedsReview {
            break view;
        }
        if let Some(t) = timeout
            && started.elapsed() > t
        {
            if tty {
                eprintln!();
            }
            bail!(
                "gave up waiting for {} after {:?} (it keeps running)",
                job.id,
                t
            );
        }
        tokio::time::sleep(Duration::from_millis(if tty { 200 } else { 500 })).await;
    };
    if tty {
        eprintln!();
    }
    let result = client.result(&job.id).await?;
    // Only a completed job has a result to print: a failed one says why on stderr, and a
    // script reading stdout gets nothing rather than `null`.
    if view.state == JobState::Completed {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &result.result)?;
        writeln!(out)?;
    }
    if let Some(s) = &result.summary {
        eprintln!(
            "fleetbox: {} {}: {}/{} shards accepted ({} failed, {} dead), {} attempts, {:.1}s, shard median {}ms, reducer `{}`",
            view.id,
            view.state,
            s.shards_accepted,
            s.shards_total,
            s.shards_failed,
            s.shards_dead,
            s.attempts,
            s.duration_ms as f64 / 1000.0,
            s.shard_wall_ms.median,
            s.reducer
        );
        for note in &s.notes {
            eprintln!("fleetbox: note: {}", term::for_stderr(note));
        }
    }
    if let Some(e) = &result.error {
        eprintln!("fleetbox: {}: {}", view.state, term::for_stderr(e));
    }
    Ok(if view.state == JobState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn progress_line(view: &JobView, elapsed: Duration) -> String {
    let c = &view.shards;
    let width = 30usize;
    let done = if c.total == 0 {
        0
    } else {
        (c.settled() as usize * width) / c.total as usize
    };
    format!(
        "[{}{}] {}/{} shards ({} ok, {} failed, {} dead, {} running, {} being checked) {} {:.1}s",
        "#".repeat(done),
        ".".repeat(width - done),
        c.settled(),
        c.total,
        c.accepted,
        c.rejected,
        c.dead,
        c.leased,
        c.reported,
        view.state,
        elapsed.as_secs_f64()
    )
}

pub fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let list = client.jobs(args.state.as_deref(), args.limit).await?;
        let mut out = std::io::stdout().lock();
        if args.json {
            serde_json::to_writer_pretty(&mut out, &list)?;
            writeln!(out)?;
            return Ok(ExitCode::SUCCESS);
        }
        writeln!(
            out,
            "{:<22} {:<12} {:>9} {:>7} {:<10} NAME",
            "ID", "STATE", "SHARDS", "FAILED", "REDUCER"
        )?;
        for j in list.jobs {
            writeln!(
                out,
                "{:<22} {:<12} {:>9} {:>7} {:<10} {}",
                j.id,
                j.state,
                format!("{}/{}", j.shards.accepted, j.shards.total),
                j.shards.rejected + j.shards.dead,
                j.reducer,
                term::for_stdout(&j.name)
            )?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn job(args: JobArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let mut out = std::io::stdout().lock();
        if args.rerun_tainted {
            let r = client.rerun_tainted(&args.id).await?;
            writeln!(
                out,
                "{}: {} tainted shard(s) are being checked again; the job folds again after",
                term::for_stdout(&args.id),
                r["rechecked"]
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        if args.receipt {
            let receipt = client.receipt(&args.id).await?;
            serde_json::to_writer_pretty(&mut out, &receipt)?;
            writeln!(out)?;
            return Ok(ExitCode::SUCCESS);
        }
        if args.chain {
            let chain = client.chain(&args.id).await?;
            if args.json {
                serde_json::to_writer_pretty(&mut out, &chain)?;
                writeln!(out)?;
            } else {
                print_chain(&mut out, &chain)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        if args.result {
            let r = client.result(&args.id).await?;
            serde_json::to_writer_pretty(&mut out, &r)?;
        } else if args.shards {
            print_shards(
                &client,
                &args.id,
                args.state.as_deref(),
                args.json,
                &mut out,
            )
            .await?;
        } else if args.files {
            print_files(&client, &args.id, args.json, &mut out).await?;
        } else if let Some(path) = &args.file {
            save_file(&client, &args.id, path, args.shard, args.output.as_deref()).await?;
            return Ok(ExitCode::SUCCESS);
        } else if args.json {
            let j = client.job(&args.id).await?;
            serde_json::to_writer_pretty(&mut out, &j)?;
        } else {
            let j = client.job(&args.id).await?;
            print_job(&mut out, &j)?;
        }
        writeln!(out)?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let j = if args.chain {
            client.cancel_chain(&args.id).await?
        } else {
            client.cancel(&args.id).await?
        };
        eprintln!("fleetbox: {} is {}", j.id, j.state);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn blob(args: BlobArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let bytes = client.get_blob(&args.sha256).await?;
        match &args.output {
            Some(path) => fs_err::write(path, &bytes)?,
            None => term::write_untrusted(
                &mut std::io::stdout().lock(),
                &bytes,
                term::stdout_is_terminal(),
            )?,
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The files accepted shards wrote, from each one's chosen report.
async fn print_files(
    client: &fleetbox_client::Client,
    id: &str,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let files = shard_files(client, id).await?;
    if json {
        let rows: Vec<_> = files
            .iter()
            .map(|(shard, f)| serde_json::json!({ "shard": shard, "path": f.path, "bytes": f.bytes, "sha256": f.sha256 }))
            .collect();
        serde_json::to_writer_pretty(&mut *out, &rows)?;
        return Ok(());
    }
    write!(out, "{:>6} {:>10} {:<64} PATH", "SHARD", "BYTES", "SHA256")?;
    for (shard, f) in &files {
        write!(
            out,
            "\n{shard:>6} {:>10} {:<64} {}",
            f.bytes,
            f.sha256.as_deref().unwrap_or("-"),
            term::for_stdout(&f.path)
        )?;
    }
    if !files.is_empty() {
        write!(
            out,
            "\n(save one with `fleetbox job {id} --file PATH [--shard N] -o FILE`)"
        )?;
    }
    Ok(())
}

/// The file at `path` that an accepted shard wrote, to `output` or stdout.
async fn save_file(
    client: &fleetbox_client::Client,
    id: &str,
    path: &str,
    shard: Option<u64>,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let found: Vec<(u64, fleetbox_proto::FileEntry)> = shard_files(client, id)
        .await?
        .into_iter()
        .filter(|(s, f)| f.path == path && shard.is_none_or(|want| want == *s))
        .collect();
    let (shard, file) = match found.as_slice() {
        [] => bail!("no accepted shard of `{id}` wrote `{path}` (see `fleetbox job {id} --files`)"),
        [one] => one,
        many => bail!(
            "shards {} of `{id}` wrote `{path}`: choose one with `--shard N`",
            many.iter()
                .map(|(s, _)| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let Some(sha) = &file.sha256 else {
        bail!(
            "shard {shard} wrote `{path}` but it was not hashed (past the hashing budget), so it was not kept"
        );
    };
    let bytes = client.get_blob(sha).await?;
    match output {
        Some(to) => {
            fs_err::write(to, &bytes)?;
            eprintln!(
                "fleetbox: shard {shard}'s `{}` ({} bytes) saved to `{}`",
                term::for_stderr(path),
                bytes.len(),
                to.display()
            );
        }
        None => term::write_untrusted(
            &mut std::io::stdout().lock(),
            &bytes,
            term::stdout_is_terminal(),
        )?,
    }
    Ok(())
}

/// Every file accepted shards wrote, with the shard, from each one's chosen report.
async fn shard_files(
    client: &fleetbox_client::Client,
    id: &str,
) -> anyhow::Result<Vec<(u64, fleetbox_proto::FileEntry)>> {
    let mut files = Vec::new();
    let mut from = 0;
    loop {
        let page = client.shards_page(id, from, 1000, Some("accepted")).await?;
        for shard in &page.shards {
            let detail = client.shard(id, shard.index).await?;
            let Some(chosen) = detail.attempts.iter().find(|a| a.chosen) else {
                continue;
            };
            let listed: Vec<fleetbox_proto::FileEntry> = chosen
                .report
                .get("files")
                .cloned()
                .map(serde_json::from_value)
                .transpose()?
                .unwrap_or_default();
            files.extend(listed.into_iter().map(|f| (shard.index, f)));
        }
        match page.next {
            Some(next) => from = next,
            None => break,
        }
    }
    Ok(files)
}

/// A job for a person: what `fleetbox jobs` shows of it, and the rest on lines of their own.
fn print_job(out: &mut impl Write, j: &fleetbox_proto::api::JobView) -> std::io::Result<()> {
    let c = &j.shards;
    let paused = if j.paused { " (paused)" } else { "" };
    writeln!(out, "job       {}  {}", j.id, term::for_stdout(&j.name))?;
    writeln!(out, "state     {}{paused}", j.state)?;
    writeln!(
        out,
        "shards    {}/{} settled: {} ok, {} failed, {} dead, {} queued, {} running, {} being checked",
        c.settled(),
        c.total,
        c.accepted,
        c.rejected,
        c.dead,
        c.queued,
        c.leased,
        c.reported
    )?;
    writeln!(
        out,
        "reducer   {}    priority {}    max_attempts {}",
        j.reducer, j.priority, j.max_attempts
    )?;
    writeln!(out, "created   {}", term::time(j.created_at))?;
    if let Some(f) = j.finished_at {
        writeln!(out, "finished  {}", term::time(f))?;
    }
    if let Some(e) = &j.error {
        writeln!(out, "error     {}", term::for_stdout(e))?;
    }
    if let Some(t) = &j.trace_id {
        writeln!(out, "trace     {t}")?;
    }
    write!(
        out,
        "more      fleetbox job {0} --result | --shards | --files | --json",
        j.id
    )
}

/// A chain as a tree: each job under the job whose rule made it.
fn print_chain(out: &mut impl Write, chain: &fleetbox_proto::api::JobChain) -> std::io::Result<()> {
    fn walk(
        out: &mut impl Write,
        chain: &fleetbox_proto::api::JobChain,
        job: &JobView,
        prefix: &str,
        last: bool,
        root: bool,
    ) -> std::io::Result<()> {
        let (branch, below) = match (root, last) {
            (true, _) => ("", ""),
            (false, true) => ("└─ ", "   "),
            (false, false) => ("├─ ", "│  "),
        };
        let rule = job
            .lineage
            .as_ref()
            .map(|l| format!(" (rule `{}`)", term::for_stdout(&l.rule)))
            .unwrap_or_default();
        let planning = if job.planning { ", rules pending" } else { "" };
        writeln!(
            out,
            "{prefix}{branch}{} {} `{}` {}/{} shards{planning}{rule}",
            job.id,
            job.state,
            term::for_stdout(&job.name),
            job.shards.accepted,
            job.shards.total
        )?;
        let children: Vec<&JobView> = chain
            .jobs
            .iter()
            .filter(|j| {
                j.lineage
                    .as_ref()
                    .is_some_and(|l| l.parent_job_id == job.id)
            })
            .collect();
        let next = format!("{prefix}{below}");
        for (i, child) in children.iter().enumerate() {
            walk(out, chain, child, &next, i + 1 == children.len(), false)?;
        }
        Ok(())
    }
    match chain.jobs.iter().find(|j| j.id == chain.root) {
        Some(root) => walk(out, chain, root, "", true, true)?,
        None => writeln!(out, "{}: no such chain", chain.root)?,
    }
    for n in &chain.notifications {
        writeln!(
            out,
            "notify `{}` from {} to {}: {} after {} tr{}{}",
            term::for_stdout(&n.rule),
            n.job_id,
            term::for_stdout(&n.url),
            n.state,
            n.tries,
            if n.tries == 1 { "y" } else { "ies" },
            n.last_error
                .as_deref()
                .map(|e| format!(" (last error: {})", term::for_stdout(e)))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}

/// The shards, page by page as they arrive: a job of a million shards is never whole in
/// memory (`--json` writes one array, an element at a time).
async fn print_shards(
    client: &Client,
    id: &str,
    state: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if json {
        write!(out, "[")?;
    } else {
        write!(
            out,
            "{:>6} {:<9} {:>8} {:<17} {:>8} {:<22} ERROR",
            "SHARD", "STATE", "ATTEMPTS", "STATUS", "WALL_MS", "AGENT"
        )?;
    }
    let (mut from, mut first) = (0, true);
    loop {
        let page = client.shards_page(id, from, 1000, state).await?;
        for sh in page.shards {
            if json {
                write!(out, "{}\n  ", if first { "" } else { "," })?;
                serde_json::to_writer(&mut *out, &sh)?;
            } else {
                write!(
                    out,
                    "\n{:>6} {:<9} {:>8} {:<17} {:>8} {:<22} {}",
                    sh.index,
                    sh.state,
                    sh.attempts,
                    sh.status.map(|s| s.as_str()).unwrap_or_default(),
                    sh.wall_ms.map(|w| w.to_string()).unwrap_or_default(),
                    sh.agent_id.unwrap_or_default(),
                    term::for_stdout(&sh.error.unwrap_or_default())
                )?;
            }
            first = false;
        }
        match page.next {
            Some(next) => from = next,
            None => break,
        }
    }
    if json {
        write!(out, "{}]", if first { "" } else { "\n" })?;
    }
    Ok(())
}
