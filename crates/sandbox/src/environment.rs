//! Virtual environments for jobs that ask for packages (`[environment] requirements`).
//!
//! [`Environments`] keeps a cache directory of virtual environments, one per requirements hash
//! and interpreter. The first run that needs one builds it, the others that need it meanwhile
//! wait for that build; later runs find it ready. The build itself runs in the sandbox it serves
//! (a `jail` sees only the new environment's directory, writable, the installer binary and the
//! optional wheelhouse, with the host network so the installer reaches the package index), since
//! installing a package runs its code. Finished environments belong to root and are read-only to
//! the programs that use them (in a jail, also bound read-only). The cache is capped in bytes and
//! evicts the least recently used environments no run is using.
//!
//! ```text
//! <root>/<key>/        the virtual environment (`bin/python` → the host's interpreter)
//! <root>/<key>.json    written last: the environment is ready (hash, packages, size)
//! ```

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fleetbox_proto::{ByteSize, EnvironmentInfo, EnvironmentSpec, Limits, Millis, Package, Status};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Environment, Mount, RunRequest, Sandbox, python};

/// The program that builds an environment inside the sandbox (input: [`BuildInput`]).
const BUILD_SCRIPT: &str = include_str!("environment_build.py");
/// A failed build is remembered this long: the other shards of the job fail at once with the
/// same message instead of each building again.
const FAILED_FOR: Duration = Duration::from_secs(60);
/// A failed build is tried once more after this pause.
const BUILD_RETRY_AFTER: Duration = Duration::from_secs(2);
/// Most bytes of the installer's message kept in an error.
const MESSAGE_MAX: usize = 4000;

/// Where and how environments are built.
#[derive(Debug, Clone)]
pub struct EnvConfig {
    /// The cache directory.
    pub root: PathBuf,
    /// Bytes the cache may hold; least recently used environments go first.
    pub max_bytes: u64,
    /// What installs the packages.
    pub installer: Installer,
    /// The package index (`--index-url`); the installer's default (PyPI) when absent.
    pub index_url: Option<String>,
    /// A directory of wheels to install from (`--find-links`), bound read-only into builds.
    pub find_links: Option<PathBuf>,
    /// Install from `find_links` only, never an index (air-gapped fleets).
    pub no_index: bool,
    /// How long one build may take.
    pub build_timeout: Duration,
}

impl EnvConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        EnvConfig {
            root: root.into(),
            max_bytes: 10 << 30,
            installer: Installer::Auto,
            index_url: None,
            find_links: None,
            no_index: false,
            build_timeout: Duration::from_secs(600),
        }
    }
}

/// What installs an environment's packages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installer {
    /// `uv` if one is on `PATH` (a real binary, not a shim), else `pip`.
    Auto,
    /// This `uv` binary (`uv venv`, `uv pip install`).
    Uv(PathBuf),
    /// The interpreter's own `venv` and `pip` modules.
    Pip,
}

impl Installer {
    /// `auto`, `pip`, `uv` (found on `PATH`) or a path to a `uv` binary.
    pub fn parse(s: &str) -> Result<Installer, String> {
        match s {
            "auto" => Ok(Installer::Auto),
            "pip" => Ok(Installer::Pip),
            "uv" => find_uv()
                .map(Installer::Uv)
                .ok_or_else(|| "no `uv` binary on PATH (give its path instead)".to_string()),
            path => {
                let p = PathBuf::from(path);
                if is_elf(&p) {
                    Ok(Installer::Uv(p))
                } else {
                    Err(format!(
                        "`{path}` is not a `uv` binary (expected auto, pip, uv or a path to uv)"
                    ))
                }
            }
        }
    }
}

/// Why a run could not get its environment: the run is a `sandbox_error` with this message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EnvError {
    #[error("building the environment {hash} failed: {message}")]
    Build { hash: String, message: String },
    #[error("the environment cache failed: {0}")]
    Cache(String),
}

/// What `<key>.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    hash: String,
    python: String,
    packages: Vec<Package>,
    bytes: u64,
    build_ms: u64,
}

/// What the build script reads from its input.
#[derive(Serialize)]
struct BuildInput<'a> {
    dir: &'a Path,
    requirements: Vec<String>,
    uv: Option<&'a Path>,
    index_url: Option<&'a str>,
    find_links: Option<&'a Path>,
    no_index: bool,
}

#[derive(Default)]
struct Books {
    /// One lock per key: the first run builds, the rest wait on it.
    building: HashMap<String, Arc<Mutex<()>>>,
    /// Runs holding each environment: never evicted while used.
    in_use: HashMap<String, usize>,
    failed: HashMap<String, (Instant, EnvError)>,
}

/// The cache of environments of one sandbox.
pub struct Environments {
    config: EnvConfig,
    sandbox: Arc<dyn Sandbox>,
    /// The sandbox's interpreter (`None`: its default search).
    python: Option<PathBuf>,
    uv: Option<PathBuf>,
    books: Mutex<Books>,
    builds: AtomicU64,
    retries: AtomicU64,
}

/// An environment held for one run; the cache keeps it while this lives.
pub struct EnvGuard {
    pub environment: Environment,
    /// Built for this request (false: it was ready, or another run built it meanwhile).
    pub built: bool,
    /// How long getting it took (the build, or the wait for another run's build).
    pub waited: Duration,
    key: String,
    owner: Arc<Environments>,
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        let mut books = self.owner.books();
        if let Some(n) = books.in_use.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                books.in_use.remove(&self.key);
            }
        }
    }
}

impl EnvGuard {
    /// A note for the run's report: where its environment came from.
    pub fn note(&self) -> String {
        let how = if self.built {
            format!("built for this run in {} ms", self.waited.as_millis())
        } else if self.waited > Duration::from_millis(50) {
            format!(
                "built by another run meanwhile (waited {} ms)",
                self.waited.as_millis()
            )
        } else {
            "reused from the cache".to_string()
        };
        format!("environment {}: {how}", short(&self.environment.info.hash))
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

impl Environments {
    /// A cache under `config.root`, building with `sandbox` (whose interpreter is `python`).
    pub fn new(
        mut config: EnvConfig,
        sandbox: Arc<dyn Sandbox>,
        python: Option<PathBuf>,
    ) -> Arc<Environments> {
        // A jail binds the environment at the same path: it must not depend on a working
        // directory.
        if let Ok(root) = std::path::absolute(&config.root) {
            config.root = root;
        }
        let uv = match &config.installer {
            Installer::Auto => find_uv(),
            Installer::Uv(p) => Some(p.clone()),
            Installer::Pip => None,
        };
        Arc::new(Environments {
            config,
            sandbox,
            python,
            uv,
            books: Mutex::new(Books::default()),
            builds: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        })
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds started by this cache so far.
    pub fn builds(&self) -> u64 {
        self.builds.load(Ordering::SeqCst)
    }

    /// Builds that failed and were tried again.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::SeqCst)
    }

    /// The installer builds use: `uv` (with its path) or `pip`.
    pub fn installer(&self) -> String {
        match &self.uv {
            Some(p) => format!("uv ({})", p.display()),
            None => "pip".into(),
        }
    }

    /// The environment for `spec`, built first if needed; blocks while it is built.
    pub fn get(self: &Arc<Self>, spec: &EnvironmentSpec) -> Result<EnvGuard, EnvError> {
        let started = Instant::now();
        let hash = spec.hash();
        let py =
            python::resolve(self.python.as_deref()).map_err(|e| EnvError::Cache(e.to_string()))?;
        // Built for the interpreter runs use: a container image's when the sandbox has one.
        let interpreter = match self.sandbox.interpreter_key() {
            Some(k) => k.map_err(EnvError::Cache)?,
            None => format!("{} {}", py.real.display(), py.version),
        };
        let key = {
            let mut h = Sha256::new();
            for part in [
                hash.as_str(),
                &interpreter,
                if self.uv.is_some() { "uv" } else { "pip" },
            ] {
                h.update(part.as_bytes());
                h.update(b"\n");
            }
            hex::encode(&h.finalize()[..16])
        };
        if let Some(guard) = self.ready(&key, started, false)? {
            return Ok(guard);
        }
        let lock = self
            .books()
            .building
            .entry(key.clone())
            .or_default()
            .clone();
        let _building = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Built (or failed) by the run we waited for?
        if let Some(guard) = self.ready(&key, started, false)? {
            return Ok(guard);
        }
        {
            let mut books = self.books();
            if let Some((at, err)) = books.failed.get(&key) {
                if at.elapsed() < FAILED_FOR {
                    return Err(err.clone());
                }
                books.failed.remove(&key);
            }
        }
        self.builds.fetch_add(1, Ordering::SeqCst);
        // An installer's failure may be the package index's moment (a reset connection, a 503):
        // one more try after a pause before the failure is remembered for the job's other runs.
        let built = match self.build(&key, &hash, spec, &py) {
            Err(EnvError::Build { .. }) => {
                self.retries.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(BUILD_RETRY_AFTER);
                self.build(&key, &hash, spec, &py)
            }
            other => other,
        };
        match built {
            Ok(()) => {
                let guard = self
                    .ready(&key, started, true)?
                    .ok_or_else(|| EnvError::Cache("the built environment vanished".into()))?;
                self.evict();
                Ok(guard)
            }
            Err(e) => {
                self.books().failed.insert(key, (Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The environment if it is ready, held for a run.
    fn ready(
        self: &Arc<Self>,
        key: &str,
        started: Instant,
        built: bool,
    ) -> Result<Option<EnvGuard>, EnvError> {
        let meta_path = self.config.root.join(format!("{key}.json"));
        let dir = self.config.root.join(key);
        // Checked and held under the books' lock: eviction takes it too.
        let mut books = self.books();
        let text = match std::fs::read(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(EnvError::Cache(format!(
                    "reading `{}`: {e}",
                    meta_path.display()
                )));
            }
        };
        let Ok(meta) = serde_json::from_slice::<Meta>(&text) else {
            // Damaged: build it again.
            let _ = std::fs::remove_file(&meta_path);
            return Ok(None);
        };
        // A link to the interpreter the environment was built for (a container image's may not
        // exist on the host).
        if dir.join("bin/python").symlink_metadata().is_err() {
            let _ = std::fs::remove_file(&meta_path);
            return Ok(None);
        }
        // Least recently used goes first: the marker's mtime is the last use.
        if let Ok(f) = std::fs::File::options().append(true).open(&meta_path) {
            let _ = f.set_modified(SystemTime::now());
        }
        *books.in_use.entry(key.to_string()).or_default() += 1;
        Ok(Some(EnvGuard {
            environment: Environment {
                python: dir.join("bin/python"),
                dir,
                info: EnvironmentInfo {
                    hash: meta.hash,
                    packages: meta.packages,
                },
            },
            built,
            waited: started.elapsed(),
            key: key.to_string(),
            owner: self.clone(),
        }))
    }

    fn build(
        &self,
        key: &str,
        hash: &str,
        spec: &EnvironmentSpec,
        py: &python::Python,
    ) -> Result<(), EnvError> {
        let started = Instant::now();
        let io = |what: &str, path: &Path, e: std::io::Error| {
            EnvError::Cache(format!("{what} `{}`: {e}", path.display()))
        };
        let root = &self.config.root;
        std::fs::create_dir_all(root).map_err(|e| io("creating", root, e))?;
        let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755));
        let dir = root.join(key);
        if dir.symlink_metadata().is_ok() {
            crate::remove::remove_tree(&dir).map_err(|e| io("removing a half-built", &dir, e))?;
        }
        std::fs::create_dir(&dir).map_err(|e| io("creating", &dir, e))?;
        // The build runs as a per-run uid we do not know yet: it may write here until it ends.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| io("opening", &dir, e))?;

        let mut limits = Limits {
            timeout: Millis(self.config.build_timeout.as_millis() as u64),
            cpu_time: Millis(self.config.build_timeout.as_millis() as u64),
            memory: ByteSize::mib(4096),
            max_output: ByteSize::mib(1),
            continue_past_output_limit: true,
            cpus: 2.0,
            max_processes: 512,
            max_file_size: ByteSize::mib(2048),
            max_open_files: 4096,
            tmp_size: ByteSize::mib(2048),
            workspace_size: ByteSize::mib(64),
            ..Limits::default()
        };
        limits.network = fleetbox_proto::Network::Host;
        let uv = match &self.uv {
            Some(uv) => Some(self.staged(uv).map_err(|e| {
                let _ = crate::remove::remove_tree(&dir);
                EnvError::Cache(format!("copying `{}` into the cache: {e}", uv.display()))
            })?),
            None => None,
        };
        let input = BuildInput {
            dir: &dir,
            requirements: spec.canonical(),
            uv: uv.as_deref(),
            index_url: self.config.index_url.as_deref(),
            find_links: self.config.find_links.as_deref(),
            no_index: self.config.no_index,
        };
        let input = serde_json::to_vec(&input).map_err(|e| EnvError::Cache(e.to_string()))?;
        let mut req = RunRequest::new(BUILD_SCRIPT, Some(input), limits);
        req.runner_id = "environment-build".into();
        req.mounts.push(Mount {
            path: dir.clone(),
            writable: true,
        });
        for path in [uv.as_ref(), self.config.find_links.as_ref()]
            .into_iter()
            .flatten()
        {
            req.mounts.push(Mount {
                path: path.clone(),
                writable: false,
            });
        }
        let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if certs.is_file() {
            for var in ["SSL_CERT_FILE", "PIP_CERT"] {
                req.env.push((var.into(), certs.display().to_string()));
            }
            // A container sees only what is bound into it (a jail has the host's certificates).
            if self.sandbox.backend() == crate::Backend::Docker {
                req.mounts.push(Mount {
                    path: certs.to_path_buf(),
                    writable: false,
                });
            }
        }
        req.env.extend(
            [
                ("UV_NO_CACHE", "1"),
                ("UV_PYTHON_DOWNLOADS", "never"),
                ("PIP_NO_CACHE_DIR", "1"),
                ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
                ("PIP_NO_INPUT", "1"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        tracing::info!(environment = short(hash), installer = %self.installer(), "building an environment");
        let report = self.sandbox.run(&req);
        let failed = |message: String| {
            let _ = crate::remove::remove_tree(&dir);
            EnvError::Build {
                hash: hash.to_string(),
                message,
            }
        };
        if report.status != Status::Ok {
            let mut message = report.message.clone().unwrap_or_default();
            let said = report.stderr.trim();
            if !said.is_empty() {
                if !message.is_empty() {
                    message.push_str(": ");
                }
                let tail = said.len().saturating_sub(MESSAGE_MAX);
                let tail = (tail..said.len())
                    .find(|i| said.is_char_boundary(*i))
                    .unwrap_or(said.len());
                message.push_str(&said[tail..]);
            }
            if message.is_empty() {
                message = format!("the build ended `{}`", report.status);
            }
            return Err(failed(message));
        }
        let packages: Vec<Package> = match report
            .output
            .as_ref()
            .and_then(|o| o.get("packages"))
            .map(|p| serde_json::from_value(p.clone()))
        {
            Some(Ok(p)) => p,
            _ => {
                return Err(failed(
                    "the build did not list the packages it installed".into(),
                ));
            }
        };
        seal(&dir).map_err(|e| failed(format!("making it read-only: {e}")))?;
        let meta = Meta {
            hash: hash.to_string(),
            python: py.real.display().to_string(),
            packages,
            bytes: tree_bytes(&dir),
            build_ms: started.elapsed().as_millis() as u64,
        };
        let meta_path = root.join(format!("{key}.json"));
        let tmp = root.join(format!("{key}.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&meta).unwrap_or_default())
            .and_then(|()| std::fs::rename(&tmp, &meta_path))
            .map_err(|e| failed(format!("recording it in `{}`: {e}", meta_path.display())))?;
        tracing::info!(
            environment = short(hash),
            ms = meta.build_ms,
            bytes = meta.bytes,
            packages = meta.packages.len(),
            "environment built"
        );
        Ok(())
    }

    /// The installer binary, copied into the cache (`.bin/`): a jail binds it from there, since
    /// where it was installed (a version manager under `/root`) may be closed to the build's uid.
    fn staged(&self, binary: &Path) -> std::io::Result<PathBuf> {
        let bin = self.config.root.join(".bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "installer".into());
        let target = bin.join(&name);
        let source = std::fs::metadata(binary)?;
        if let Ok(have) = std::fs::metadata(&target)
            && have.len() == source.len()
            && have.modified()? >= source.modified()?
        {
            return Ok(target);
        }
        let tmp = bin.join(format!("{name}.{}.tmp", std::process::id()));
        std::fs::copy(binary, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &target)?;
        Ok(target)
    }

    /// Remove the least recently used environments no run holds until the cache fits.
    fn evict(&self) {
        let books = self.books();
        let Ok(entries) = std::fs::read_dir(&self.config.root) else {
            return;
        };
        let mut ready: Vec<(SystemTime, String, u64)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let key = name.strip_suffix(".json")?.to_string();
                let used = e.metadata().ok()?.modified().ok()?;
                let meta: Meta = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                Some((used, key, meta.bytes))
            })
            .collect();
        let mut total: u64 = ready.iter().map(|(_, _, b)| b).sum();
        ready.sort();
        for (_, key, bytes) in ready {
            if total <= self.config.max_bytes {
                break;
            }
            if books.in_use.contains_key(&key) {
                continue;
            }
            let _ = std::fs::remove_file(self.config.root.join(format!("{key}.json")));
            let dir = self.config.root.join(&key);
            if let Err(e) = crate::remove::remove_tree(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove an evicted environment");
            }
            tracing::info!(environment = %key, bytes, "evicted an environment (cache over its size cap)");
            total = total.saturating_sub(bytes);
        }
    }
}

/// Make a built environment root's and read-only to everyone else.
fn seal(dir: &Path) -> std::io::Result<()> {
    let root = crate::sys::is_root();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = path.symlink_metadata()?;
        if root {
            std::os::unix::fs::lchown(&path, Some(0), Some(0))?;
        }
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7555;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & !0o6000))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    // Its top directory traversable by the runs' uids.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555))
}

/// Bytes of the regular files under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

/// A `uv` binary on `PATH` (a real executable: version managers' shims are shell scripts that a
/// jail cannot run).
fn find_uv() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("uv"))
        .find(|p| is_elf(p))
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}
