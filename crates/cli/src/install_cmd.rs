//! `fleetbox agent install`: the systemd unit, its configuration and its state directory, so
//! a machine joins the fleet with one command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use fleetbox_proto::env;

/// The unit shipped in `deploy/systemd/`, its `ExecStart` filled in at install.
const AGENT_UNIT: &str = include_str!("../../../deploy/systemd/fleetbox-agent.service");
const STATE: &str = "/var/lib/fleetbox-agent";
const CONFIG_DIR: &str = "/etc/fleetbox";

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The coordinator's URL.
    #[arg(long)]
    pub server: String,
    /// An enrolment token (`fleetbox token create --enroll`): kept in `/etc/fleetbox/agent.env`,
    /// readable by root only.
    #[arg(long, hide_env_values = true)]
    pub token: String,
    /// Shards run at once.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// Sandbox backend (`jail` where the host supports it; `fleetbox doctor` checks).
    #[arg(long)]
    pub backend: Option<String>,
    /// The coordinator's CA (for `--tls auto`): copied to `/etc/fleetbox/ca.pem`.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Name shown on the coordinator (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// The binary the unit runs [default: this one].
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
    /// Write under this directory instead of `/` (to look before installing, or for an image).
    #[arg(long, default_value = "/", value_name = "DIR")]
    pub root: PathBuf,
}

pub fn install(args: InstallArgs) -> anyhow::Result<ExitCode> {
    for (flag, value) in [("--server", &args.server), ("--token", &args.token)] {
        if value.is_empty()
            || value
                .chars()
                .any(|c| c.is_control() || c == ' ' || c == '"')
        {
            bail!("`{flag}` must be one word without spaces, quotes or control characters");
        }
    }
    if !(args.server.starts_with("http://") || args.server.starts_with("https://")) {
        bail!("`--server` must be an http:// or https:// URL");
    }
    if let Some(name) = &args.name
        && (name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    {
        bail!("`--name` may hold letters, digits, `-`, `_` and `.`");
    }
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("finding this binary")?,
    };
    let at = |path: &str| args.root.join(path.trim_start_matches('/'));
    let config_dir = at(CONFIG_DIR);
    fs_err::create_dir_all(&config_dir)?;

    let mut lines = vec![
        format!("{}={}", env::FLEETBOX_SERVER, args.server),
        format!("{}={}", env::FLEETBOX_TOKEN, args.token),
    ];
    if let Some(backend) = &args.backend {
        lines.push(format!("{}={backend}", env::SANDBOX_TYPE));
    }
    if let Some(ca) = &args.ca_cert {
        let target = format!("{CONFIG_DIR}/ca.pem");
        fs_err::copy(ca, at(&target)).with_context(|| format!("copying `{}`", ca.display()))?;
        println!("copied {} to {target}", ca.display());
        lines.push(format!("{}={target}", env::FLEETBOX_CA_CERT));
    }
    let env_file = format!("{CONFIG_DIR}/agent.env");
    write_private(&at(&env_file), &(lines.join("\n") + "\n"))?;
    println!("wrote {env_file} (mode 0600: it holds the token)");

    let state = at(STATE);
    fs_err::create_dir_all(&state)?;
    set_mode(&state, 0o700)?;
    println!("made {STATE} (mode 0700: the agent's identity, keys and outbox)");

    let unit_path = "/etc/systemd/system/fleetbox-agent.service";
    fs_err::create_dir_all(at("/etc/systemd/system"))?;
    fs_err::write(at(unit_path), unit(&bin, &args))?;
    println!("wrote {unit_path} (runs {})", bin.display());
    println!("next: systemctl daemon-reload && systemctl enable --now fleetbox-agent");
    Ok(ExitCode::SUCCESS)
}

/// The shipped unit with this install's `ExecStart`.
fn unit(bin: &Path, args: &InstallArgs) -> String {
    let mut exec = format!(
        "ExecStart={} agent --state {STATE} --slots {}",
        bin.display(),
        args.slots
    );
    if let Some(name) = &args.name {
        exec.push_str(&format!(" --name {name}"));
    }
    AGENT_UNIT
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                exec.clone()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing `{}`", path.display()))?;
    // An existing file keeps its mode on open: set it.
    set_mode(path, 0o600)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
