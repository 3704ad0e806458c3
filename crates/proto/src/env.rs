//! Every environment variable Fleetbox reads, in one place.
//!
//! Layering is `defaults < fleetbox.toml < environment < flags`. Only the CLI reads them: most
//! through clap (`env = ...`, so `--help` shows them), the rest in `crates/cli/src/config.rs`
//! (run settings such as `FLEETBOX_CGROUP_ROOT` and `FLEETBOX_JAIL_TRACE`) or where a command
//! starts (`DOCKER_HOST`, logging, tracing). The libraries take them as configuration.

/// Backend for `fleetbox run` (seed name): `local`/`process`, `jail`, `docker`.
pub const SANDBOX_TYPE: &str = "SANDBOX_TYPE";
/// Wall-clock timeout in seconds (seed name); any duration string is accepted too.
pub const SANDBOX_TIMEOUT_SEC: &str = "SANDBOX_TIMEOUT_SEC";
/// Output cap per stream in KiB (seed name); any size string is accepted too.
pub const SANDBOX_MAX_OUTPUT_KB: &str = "SANDBOX_MAX_OUTPUT_KB";
/// Docker image for the `docker` backend (seed name; default `python:3.11-slim`).
pub const DOCKER_IMAGE: &str = "DOCKER_IMAGE";
/// Give `docker` runs network access (seed name; default `false`).
pub const DOCKER_NETWORK_ENABLED: &str = "DOCKER_NETWORK_ENABLED";
/// CPU limit of `docker` runs in cores (seed name; default `0.5`).
pub const DOCKER_CPU_LIMIT: &str = "DOCKER_CPU_LIMIT";
/// Memory limit of `docker` runs (seed name and units, e.g. `256m`; default `256m`).
pub const DOCKER_MEMORY_LIMIT: &str = "DOCKER_MEMORY_LIMIT";
/// OCI runtime of `docker` runs (e.g. `runsc` for gVisor; default: the daemon's).
pub const DOCKER_RUNTIME: &str = "DOCKER_RUNTIME";
/// The Docker daemon's address (`unix:///var/run/docker.sock` when unset).
pub const DOCKER_HOST: &str = "DOCKER_HOST";
/// Memory limit (size string).
pub const FLEETBOX_MEMORY: &str = "FLEETBOX_MEMORY";
/// CPU time limit (duration string).
pub const FLEETBOX_CPU_TIME: &str = "FLEETBOX_CPU_TIME";
/// Python interpreter to run programs with (default: `/usr/bin/python3`, else `python3` on PATH).
pub const FLEETBOX_PYTHON: &str = "FLEETBOX_PYTHON";
/// Path of `fleetbox.toml` (default: `./fleetbox.toml` when present).
pub const FLEETBOX_CONFIG: &str = "FLEETBOX_CONFIG";
/// Directory in which run directories are created (default: the system temp dir).
pub const FLEETBOX_WORK_ROOT: &str = "FLEETBOX_WORK_ROOT";
/// Parent cgroup for runs (v2: absolute path; v1: path inside each hierarchy).
pub const FLEETBOX_CGROUP_ROOT: &str = "FLEETBOX_CGROUP_ROOT";
/// Set to `1` to run without cgroups (rlimits and process-group kill only).
pub const FLEETBOX_NO_CGROUPS: &str = "FLEETBOX_NO_CGROUPS";
/// `tracing` filter for Fleetbox's own logs (e.g. `fleetbox=debug`).
pub const FLEETBOX_LOG: &str = "FLEETBOX_LOG";
/// Log format: `text` (default; colours only on a terminal) or `json`.
pub const FLEETBOX_LOG_FORMAT: &str = "FLEETBOX_LOG_FORMAT";
/// The OpenTelemetry collector's base URL (OTLP/HTTP, `/v1/traces` appended): the coordinator
/// and agents export their spans there when it (or the next) is set; off otherwise.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The full URL spans are posted to (OTLP/HTTP), instead of the base URL above.
pub const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `true` turns span export off whatever the variables above say.
pub const OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
/// The `service.name` of exported spans (default `fleetbox-server`, `fleetbox-agent`, or
/// `fleetbox` for `fleetbox up`).
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// `0`/`false` switches follow-up rules off on a coordinator (they are recorded, not run).
pub const FLEETBOX_FOLLOWUPS: &str = "FLEETBOX_FOLLOWUPS";
/// The original sandbox's switch for follow-ups, honoured too: `0` turns them off.
pub const DEMO_FOLLOWUP_ENABLED: &str = "DEMO_FOLLOWUP_ENABLED";
/// Set to `1` to time the jail's start-up phases; the report's `notes` lists them.
pub const FLEETBOX_JAIL_TRACE: &str = "FLEETBOX_JAIL_TRACE";
/// Warm jails an agent keeps built ahead of its shards (`fleetbox agent --warm`).
pub const FLEETBOX_WARM: &str = "FLEETBOX_WARM";
/// The jail's seccomp policy on agents and `fleetbox run`: `deny` (default) or `allow`.
pub const FLEETBOX_SECCOMP: &str = "FLEETBOX_SECCOMP";
/// What builds job environments: `auto`, `uv`, `pip` or a path to a `uv` binary.
pub const FLEETBOX_INSTALLER: &str = "FLEETBOX_INSTALLER";
/// The package index job environments install from.
pub const FLEETBOX_INDEX_URL: &str = "FLEETBOX_INDEX_URL";

/// Coordinator URL for the client commands and agents (default `http://127.0.0.1:8080`).
pub const FLEETBOX_SERVER: &str = "FLEETBOX_SERVER";
/// API token: admin token for the client commands, enrollment token for `fleetbox agent`.
pub const FLEETBOX_TOKEN: &str = "FLEETBOX_TOKEN";
/// A CA certificate (PEM) the client commands and agents trust besides the system's, for an
/// `https://` coordinator (default for client commands: `DATA/tls/ca.pem` when it exists).
pub const FLEETBOX_CA_CERT: &str = "FLEETBOX_CA_CERT";
/// Coordinator data directory: SQLite database, blobs, bootstrap tokens (default `./fleetbox-data`).
pub const FLEETBOX_DATA: &str = "FLEETBOX_DATA";
/// Address the coordinator listens on (default `127.0.0.1:8080`).
pub const FLEETBOX_LISTEN: &str = "FLEETBOX_LISTEN";
/// `postgres://...` to use PostgreSQL instead of the embedded SQLite.
pub const FLEETBOX_DATABASE_URL: &str = "FLEETBOX_DATABASE_URL";
/// Fixed bootstrap admin token (otherwise generated once and kept in the data directory).
pub const FLEETBOX_ADMIN_TOKEN: &str = "FLEETBOX_ADMIN_TOKEN";
/// Fixed enrollment token (otherwise generated once and kept in the data directory).
pub const FLEETBOX_ENROLL_TOKEN: &str = "FLEETBOX_ENROLL_TOKEN";
/// Agent state directory: identity and outbox (default `./fleetbox-agent`).
pub const FLEETBOX_AGENT_STATE: &str = "FLEETBOX_AGENT_STATE";
/// Agent: run jobs that ask for `limits.network = true` (`--allow-network`).
pub const FLEETBOX_ALLOW_NETWORK: &str = "FLEETBOX_ALLOW_NETWORK";

/// Shard contract: path of this shard's JSON input, relative to the working directory.
pub const FLEETBOX_INPUT: &str = "FLEETBOX_INPUT";
/// Shard contract: this shard's index (0-based).
pub const FLEETBOX_SHARD_INDEX: &str = "FLEETBOX_SHARD_INDEX";
/// Shard contract: how many shards the job has.
pub const FLEETBOX_SHARD_COUNT: &str = "FLEETBOX_SHARD_COUNT";
/// Shard contract: the job's id.
pub const FLEETBOX_JOB_ID: &str = "FLEETBOX_JOB_ID";

/// `fleetbox server --blob-store`: an S3-compatible bucket for blobs (`s3://bucket/prefix`).
pub const FLEETBOX_BLOB_STORE: &str = "FLEETBOX_BLOB_STORE";
/// The S3 endpoint when it is not AWS's (`--s3-endpoint`), as the AWS tools name it.
pub const AWS_ENDPOINT_URL: &str = "AWS_ENDPOINT_URL";
/// The bucket's region (the AWS tools' names; `us-east-1` when neither is set).
pub const AWS_REGION: &str = "AWS_REGION";
pub const AWS_DEFAULT_REGION: &str = "AWS_DEFAULT_REGION";
/// The bucket's credentials, as the AWS tools name them.
pub const AWS_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const AWS_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
