//! `fleetbox tenant ...` and `fleetbox token ...`: tenants with their caps, and the scoped,
//! expiring tokens that speak for them.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use fleetbox_proto::Millis;
use fleetbox_proto::tenancy::{
    PoolCreate, Scope, TenantCaps, TenantCreate, TenantUpdate, TenantView, TokenCreate,
    TokenIssued, TokenView,
};

use crate::jobs_cmd::{Conn, runtime};
use crate::term;

#[derive(Debug, Args)]
pub struct TenantArgs {
    #[command(subcommand)]
    pub command: TenantCommand,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// A tenant's caps as flags (left out: unchanged on `update`, none on `create`).
#[derive(Debug, Args, Default)]
pub struct CapFlags {
    /// Its shards leased at once, over every agent.
    #[arg(long)]
    pub max_running_shards: Option<u64>,
    /// Shards it may submit in any 24 hours.
    #[arg(long)]
    pub max_shards_per_day: Option<u64>,
    /// CPU seconds its shards may use in any 24 hours.
    #[arg(long)]
    pub max_cpu_seconds_per_day: Option<u64>,
    /// Bytes of blobs it may own (`10GiB`): outputs, streams, files and results.
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_blob_bytes: Option<fleetbox_proto::ByteSize>,
    /// Submissions a second (`2`, `0.5`, `2/s`); above it `429` with `Retry-After`.
    #[arg(long, value_parser = parse_rate)]
    pub submit_rate: Option<f64>,
    /// Its share of shared agents against other tenants with work [default: 1].
    #[arg(long)]
    pub weight: Option<u32>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.trim().trim_end_matches("/s");
    n.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0)
        .ok_or_else(|| format!("`{s}` is not a positive rate (like `2` or `0.5/s`)"))
}

impl CapFlags {
    fn caps(&self) -> TenantCaps {
        TenantCaps {
            max_running_shards: self.max_running_shards,
            max_shards_per_day: self.max_shards_per_day,
            max_cpu_seconds_per_day: self.max_cpu_seconds_per_day,
            max_blob_bytes: self.max_blob_bytes.map(|b| b.0),
            submit_rate: self.submit_rate,
            weight: self.weight,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Make a tenant (the operator: an admin token of the `default` tenant).
    Create {
        /// Its id: lowercase letters, digits, `-` and `_`.
        name: String,
        #[command(flatten)]
        caps: CapFlags,
    },
    /// Every tenant (the operator), or your own.
    List,
    /// One tenant: its caps and what it used in the last 24 hours.
    Show { name: String },
    /// Change a tenant's caps (the operator).
    Update {
        name: String,
        #[command(flatten)]
        caps: CapFlags,
        /// Remove a cap (`max_running_shards`, `submit_rate`, ...); repeatable.
        #[arg(long)]
        clear: Vec<String>,
    },
}

pub fn tenant(args: TenantArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let shown = match args.command {
            TenantCommand::Create { name, caps } => vec![
                client
                    .create_tenant(&TenantCreate {
                        name,
                        caps: caps.caps(),
                    })
                    .await?,
            ],
            TenantCommand::List => client.tenants().await?.tenants,
            TenantCommand::Show { name } => vec![client.tenant(&name).await?],
            TenantCommand::Update { name, caps, clear } => vec![
                client
                    .update_tenant(
                        &name,
                        &TenantUpdate {
                            caps: caps.caps(),
                            clear,
                        },
                    )
                    .await?,
            ],
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&shown)?);
        } else {
            print_tenants(&shown);
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn print_tenants(tenants: &[TenantView]) {
    let cap = |c: Option<u64>| c.map_or_else(|| "-".to_string(), |c| c.to_string());
    println!(
        "{:<20} {:>15} {:>17} {:>19} {:>23} {:>8} {:>6}",
        "TENANT",
        "RUNNING/CAP",
        "SHARDS 24H/CAP",
        "CPU-S 24H/CAP",
        "BLOB BYTES/CAP",
        "RATE/S",
        "WEIGHT"
    );
    for t in tenants {
        println!(
            "{:<20} {:>15} {:>17} {:>19} {:>23} {:>8} {:>6}",
            term::for_stdout(&t.id),
            format!("{}/{}", t.running_shards, cap(t.caps.max_running_shards)),
            format!("{}/{}", t.shards_today, cap(t.caps.max_shards_per_day)),
            format!(
                "{:.0}/{}",
                t.cpu_seconds_today,
                cap(t.caps.max_cpu_seconds_per_day)
            ),
            format!("{}/{}", t.blob_bytes, cap(t.caps.max_blob_bytes)),
            t.caps
                .submit_rate
                .map_or_else(|| "-".to_string(), |r| r.to_string()),
            t.caps.weight.unwrap_or(1),
        );
    }
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `--scope read,submit`, parsed whole (clap would take a `Vec` for repeated values).
#[derive(Debug, Clone)]
pub struct Scopes(Vec<Scope>);

fn parse_scopes(s: &str) -> Result<Scopes, String> {
    Scope::parse_list(s)
        .map(Scopes)
        .map_err(|w| format!("`{w}` is not a scope (read, submit, review, admin)"))
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token. Its secret is printed once; only its hash is kept.
    Create {
        /// The tenant it speaks for (default: your token's; another needs the operator).
        #[arg(long)]
        tenant: Option<String>,
        /// What it may do: `read`, `submit`, `review`, `admin`, comma-separated.
        #[arg(long, value_parser = parse_scopes)]
        scope: Option<Scopes>,
        /// An enrolment token for agents instead (they join the tenant).
        #[arg(long, conflicts_with = "scope")]
        enroll: bool,
        /// How many agents it may enrol (with `--enroll`).
        #[arg(long, requires = "enroll")]
        uses: Option<u64>,
        /// The pool its agents join (with `--enroll`; default the tenant's own, which for
        /// `default` is the shared pool).
        #[arg(long, requires = "enroll")]
        pool: Option<String>,
        /// How long it works: `30d`, `12h`, `90m`.
        #[arg(long, value_parser = |s: &str| s.parse::<Millis>().map_err(|e| e.to_string()))]
        ttl: Option<Millis>,
        /// A name to know it by.
        #[arg(long)]
        name: Option<String>,
    },
    /// A tenant's tokens, never their secrets.
    List {
        /// Another tenant's (the operator).
        #[arg(long)]
        tenant: Option<String>,
        /// Include agents' own tokens.
        #[arg(long)]
        agents: bool,
    },
    /// Revoke a token: every coordinator refuses it within a second.
    Revoke { id: String },
    /// Replace a token by a new one (same tenant, scopes, expiry); the old one is revoked.
    Rotate { id: String },
}

pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let issued = match args.command {
            TokenCommand::Create {
                tenant,
                scope,
                enroll,
                uses,
                pool,
                ttl,
                name,
            } => {
                let scopes = scope.map(|s| s.0).unwrap_or_default();
                if !enroll && scopes.is_empty() {
                    anyhow::bail!("give `--scope read,submit,...` or `--enroll`");
                }
                client
                    .create_token(&TokenCreate {
                        tenant,
                        name,
                        scopes,
                        enroll,
                        uses,
                        pool,
                        ttl_seconds: ttl.map(|t| t.0.div_ceil(1000)),
                    })
                    .await?
            }
            TokenCommand::Rotate { id } => client.rotate_token(&id).await?,
            TokenCommand::List { tenant, agents } => {
                let mut list = client.tokens(tenant.as_deref()).await?.tokens;
                if !agents {
                    list.retain(|t| t.kind != "agent");
                }
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    print_tokens(&list);
                }
                return Ok(ExitCode::SUCCESS);
            }
            TokenCommand::Revoke { id } => {
                let t = client.revoke_token(&id).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&t)?);
                } else {
                    println!("{} revoked", term::for_stdout(&t.id));
                }
                return Ok(ExitCode::SUCCESS);
            }
        };
        print_issued(&issued, args.json)?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The secret alone on stdout (for `$(fleetbox token create ...)`), what it is on stderr.
fn print_issued(t: &TokenIssued, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(t)?);
        return Ok(());
    }
    println!("{}", t.token);
    eprintln!(
        "token {} for tenant `{}` ({}{}{}): shown once, keep it",
        t.view.id,
        term::for_stdout(&t.view.tenant),
        if t.view.scopes.is_empty() {
            t.view.kind.clone()
        } else {
            Scope::join(&t.view.scopes)
        },
        t.view
            .expires_at
            .map(|e| format!(", expires {}", term::time(e)))
            .unwrap_or_default(),
        t.view
            .uses_left
            .map(|u| format!(", {u} uses"))
            .unwrap_or_default(),
    );
    Ok(())
}

fn print_tokens(list: &[TokenView]) {
    println!(
        "{:<13} {:<11} {:<24} {:<16} {:<20} STATE",
        "ID", "KIND", "SCOPES", "NAME", "EXPIRES"
    );
    for t in list {
        let state = match (t.revoked_at, t.uses_left) {
            (Some(_), _) => "revoked".to_string(),
            (None, Some(0)) => "used up".to_string(),
            (None, Some(u)) => format!("{u} uses left"),
            (None, None) => "active".to_string(),
        };
        println!(
            "{:<13} {:<11} {:<24} {:<16} {:<20} {state}",
            t.id,
            t.kind,
            Scope::join(&t.scopes),
            term::for_stdout(t.name.as_deref().unwrap_or("-")),
            t.expires_at.map_or_else(|| "never".to_string(), term::time),
        );
    }
}

#[derive(Debug, Args)]
pub struct PoolArgs {
    #[command(subcommand)]
    pub command: PoolCommand,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Make a pool; agents join it with an enrolment token made with `--pool NAME`.
    Create {
        name: String,
        /// Its owner (default: your token's tenant; another needs the operator).
        #[arg(long)]
        tenant: Option<String>,
        /// Serves every tenant (the operator's pools only).
        #[arg(long)]
        shared: bool,
    },
    /// The pools your tenant may use (the operator: every pool).
    List,
}

pub fn pool(args: PoolArgs) -> anyhow::Result<ExitCode> {
    let client = args.conn.client()?;
    runtime()?.block_on(async move {
        let pools = match args.command {
            PoolCommand::Create {
                name,
                tenant,
                shared,
            } => vec![
                client
                    .create_pool(&PoolCreate {
                        name,
                        tenant,
                        shared,
                    })
                    .await?,
            ],
            PoolCommand::List => client.pools().await?.pools,
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&pools)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:<20} {:<20} {:<8} AGENTS ONLINE",
            "POOL", "OWNER", "SHARED"
        );
        for p in &pools {
            println!(
                "{:<20} {:<20} {:<8} {}",
                term::for_stdout(&p.name),
                term::for_stdout(&p.tenant),
                if p.shared { "yes" } else { "no" },
                p.agents_online
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
