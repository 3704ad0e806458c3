//! Building a small Python image from the host's own interpreter, for hosts that reach no image
//! registry (`fleetbox image build`), and running one command in an image.
//!
//! The image holds the interpreter, its standard library (without `test/`), the shared
//! libraries it and its extension modules link (as `ldd` lists them), the C library's family and
//! `libgcc_s` (loaded at run time by glibc, linked by tools such as `uv`), the host's
//! `ld.so.cache`, and optionally packages installed from the package index into
//! `/usr/local/lib/pythonX.Y/dist-packages` (a directory Debian's interpreter searches). It is
//! handed to the daemon as a tar stream through the Engine API's image import.
//!
//! With [`ImageSpec::fleetbox`] the image is Fleetbox's own: the binary at
//! `/usr/local/bin/fleetbox` with the libraries it links and the host's CA bundle, and
//! `fleetbox` as its entry point (`docker run IMAGE server ...`, `docker run IMAGE agent ...`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
};
use futures_util::StreamExt;

use super::{DockerError, remove};

/// Label naming the layout version of images this code builds; [`ensure`] rebuilds an image of
/// an older layout.
pub const LAYOUT_LABEL: &str = "fleetbox.image-layout";
const LAYOUT: &str = "6";

/// What to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// `name:tag` (default [`super::BUILT_IMAGE`]).
    pub name: String,
    /// The host interpreter to copy (default `/usr/bin/python3`).
    pub python: PathBuf,
    /// Requirements installed into the image from the package index.
    pub packages: Vec<String>,
    /// A `fleetbox` binary to put in the image as its entry point.
    pub fleetbox: Option<PathBuf>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            name: super::BUILT_IMAGE.into(),
            python: PathBuf::from("/usr/bin/python3"),
            packages: Vec::new(),
            fleetbox: None,
        }
    }
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Built {
    pub name: String,
    pub id: String,
    pub python_version: String,
    pub bytes: u64,
    pub files: u64,
    /// The packages installed beyond the standard library (`name==version`), as the image's
    /// `fleetbox.packages` label also says; empty when built without `--with`.
    pub packages: Vec<String>,
}

/// The label listing an image's installed packages (`name==version,...`, empty for none).
pub const PACKAGES_LABEL: &str = "fleetbox.packages";

/// `name==version` of every distribution installed in `dir` (from its `*.dist-info`).
fn installed_in(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".dist-info")?;
            let (pkg, version) = stem.rsplit_once('-')?;
            Some(format!("{pkg}=={version}"))
        })
        .collect();
    out.sort();
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Build(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// Build the root filesystem in a temporary directory and import it as `spec.name`.
/// `progress` hears each step.
pub async fn build(
    d: &Docker,
    spec: &ImageSpec,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Built, ImageError> {
    let tmp = tempfile::tempdir().map_err(io("creating a build directory"))?;
    let root = tmp.path().join("root");
    progress(&format!(
        "copying the interpreter {} and its libraries",
        spec.python.display()
    ));
    let (version, files) = {
        let root = root.clone();
        let python = spec.python.clone();
        let fleetbox = spec.fleetbox.clone();
        tokio::task::spawn_blocking(move || make_root(&root, &python, fleetbox.as_deref()))
            .await
            .map_err(|e| ImageError::Build(e.to_string()))??
    };
    let mut installed = Vec::new();
    if !spec.packages.is_empty() {
        progress(&format!("installing {}", spec.packages.join(", ")));
        let target = root.join(format!("usr/local/lib/python{version}/dist-packages"));
        let python = spec.python.clone();
        let packages = spec.packages.clone();
        let dir = target.clone();
        tokio::task::spawn_blocking(move || install(&python, &target, &packages))
            .await
            .map_err(|e| ImageError::Build(e.to_string()))??;
        installed = installed_in(&dir);
    }
    progress("packing the image");
    let tar = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || pack(&root))
            .await
            .map_err(|e| ImageError::Build(e.to_string()))??
    };
    let bytes = tar.len() as u64;
    let (repo, tag) = match spec.name.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
        _ => (spec.name.clone(), "latest".to_string()),
    };
    progress(&format!(
        "importing {} MB into the daemon as {repo}:{tag}",
        bytes / 1_000_000
    ));
    let mut changes = vec![
        format!(
            "LABEL fleetbox.python={version} {LAYOUT_LABEL}={LAYOUT} {PACKAGES_LABEL}=\"{}\"",
            installed.join(",")
        ),
        "ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8".to_string(),
        "WORKDIR /work".to_string(),
    ];
    if spec.fleetbox.is_some() {
        changes.extend([
            "ENTRYPOINT [\"fleetbox\"]".to_string(),
            "CMD [\"--help\"]".to_string(),
        ]);
    } else {
        changes.push("CMD [\"python3\"]".to_string());
    }
    let opts = CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(&repo)
        .tag(&tag)
        .changes(changes)
        .build();
    // The image this one replaces under the same name, removed once nothing names it.
    let replaced = d
        .inspect_image(&format!("{repo}:{tag}"))
        .await
        .ok()
        .and_then(|i| i.id);
    let mut stream = d.create_image(
        Some(opts),
        Some(bollard::body_full(bytes::Bytes::from(tar))),
        None,
    );
    while let Some(step) = stream.next().await {
        let step = step.map_err(DockerError::from_connect)?;
        if let Some(e) = step.error_detail.and_then(|e| e.message) {
            return Err(ImageError::Build(format!(
                "the daemon refused the image: {e}"
            )));
        }
    }
    let inspected = d
        .inspect_image(&format!("{repo}:{tag}"))
        .await
        .map_err(DockerError::from_connect)?;
    if let Some(old) = replaced.filter(|old| Some(old) != inspected.id.as_ref()) {
        remove_if_untagged(d, &old).await;
    }
    Ok(Built {
        name: format!("{repo}:{tag}"),
        id: inspected.id.unwrap_or_default(),
        python_version: version,
        bytes,
        files,
        packages: installed,
    })
}

/// Remove a superseded image when no tag names it any more; a container still using it (or
/// any other refusal) keeps it, since it is only tidying.
async fn remove_if_untagged(d: &Docker, id: &str) {
    let untagged = d
        .inspect_image(id)
        .await
        .is_ok_and(|i| i.repo_tags.is_none_or(|t| t.is_empty()));
    if untagged {
        let _ = d
            .remove_image(
                id,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
    }
}

/// True when the daemon has an image `name` made by this version's layout.
pub async fn is_current(d: &Docker, name: &str) -> bool {
    d.inspect_image(name).await.is_ok_and(|i| {
        i.config
            .and_then(|c| c.labels)
            .and_then(|l| l.get(LAYOUT_LABEL).cloned())
            .as_deref()
            == Some(LAYOUT)
    })
}

/// Build `spec.name` unless the daemon has it already; true when it was built. A file lock
/// keeps processes on this host (parallel test processes) from building it at once.
pub async fn ensure(d: &Docker, spec: &ImageSpec) -> Result<bool, ImageError> {
    if is_current(d, &spec.name).await {
        return Ok(false);
    }
    let lock = std::fs::File::create(std::env::temp_dir().join("fleetbox-image-build.lock"))
        .map_err(io("creating the image build lock"))?;
    let lock = tokio::task::spawn_blocking(move || {
        // SAFETY: flock on a descriptor we own; it is released when the file is closed.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        lock
    })
    .await
    .map_err(|e| ImageError::Build(e.to_string()))?;
    let built = if is_current(d, &spec.name).await {
        false
    } else {
        build(d, spec, &|_| {}).await?;
        true
    };
    drop(lock);
    Ok(built)
}

/// The image named `FLEETBOX_TEST_DOCKER_IMAGE`, else [`super::BUILT_IMAGE`], built from this
/// host's Python on the local daemon when it lacks it: what the test suites and benchmarks run
/// in. Panics with what to do when no daemon answers.
pub async fn test_image() -> String {
    let name = std::env::var("FLEETBOX_TEST_DOCKER_IMAGE")
        .unwrap_or_else(|_| super::BUILT_IMAGE.to_string());
    let d = super::connect(None)
        .await
        .expect("the docker tests need a running dockerd (scripts/start-docker starts one)");
    let spec = ImageSpec {
        name: name.clone(),
        ..Default::default()
    };
    ensure(&d, &spec).await.expect("build the test image");
    name
}

/// Lay out the image's root: returns the interpreter's `X.Y` and how many files were copied.
fn make_root(
    root: &Path,
    python: &Path,
    fleetbox: Option<&Path>,
) -> Result<(String, u64), ImageError> {
    let real = std::fs::canonicalize(python).map_err(io(format!(
        "finding the interpreter `{}`",
        python.display()
    )))?;
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let version = name
        .strip_prefix("python")
        .filter(|v| v.contains('.'))
        .ok_or_else(|| {
            ImageError::Build(format!(
                "`{}` does not look like a versioned interpreter (pythonX.Y)",
                real.display()
            ))
        })?
        .to_string();
    let stdlib = PathBuf::from(format!("/usr/lib/python{version}"));
    if !stdlib.is_dir() {
        return Err(ImageError::Build(format!(
            "the standard library `{}` is missing",
            stdlib.display()
        )));
    }
    for d in [
        "usr/bin",
        "usr/lib",
        "usr/lib64",
        "tmp",
        "work",
        "code",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(d)).map_err(io(format!("creating {d}")))?;
    }
    // Sticky and world-writable, as on any host: the daemon copies this mode onto the tmpfs it
    // mounts over /tmp.
    std::fs::set_permissions(
        root.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .map_err(io("setting the mode of /tmp"))?;
    for (link, to) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(to, root.join(link)).map_err(io(format!("linking {link}")))?;
    }
    let mut files = 0u64;
    let bin = root.join("usr/bin").join(&name);
    std::fs::copy(&real, &bin).map_err(io("copying the interpreter"))?;
    files += 1;
    for alias in ["python3", "python"] {
        std::os::unix::fs::symlink(&name, root.join("usr/bin").join(alias))
            .map_err(io("linking python3"))?;
    }
    // The standard library, without its test suite.
    let mut objects = vec![real.clone()];
    if let Some(bin) = fleetbox {
        let to = root.join("usr/local/bin/fleetbox");
        std::fs::create_dir_all(root.join("usr/local/bin"))
            .map_err(io("creating /usr/local/bin"))?;
        std::fs::copy(bin, &to).map_err(io(format!("copying {}", bin.display())))?;
        files += 1;
        objects.push(bin.to_path_buf());
        // Outgoing HTTPS (an S3 bucket, a model, webhooks) trusts the system's roots.
        let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if bundle.is_file() {
            std::fs::create_dir_all(root.join("etc/ssl/certs")).map_err(io("creating /etc/ssl"))?;
            std::fs::copy(bundle, root.join("etc/ssl/certs/ca-certificates.crt"))
                .map_err(io("copying the CA bundle"))?;
        }
    }
    let mut stack = vec![stdlib.clone()];
    while let Some(dir) = stack.pop() {
        let rel = dir.strip_prefix("/").unwrap_or(&dir);
        std::fs::create_dir_all(root.join(rel)).map_err(io("copying the standard library"))?;
        let entries = std::fs::read_dir(&dir).map_err(io(format!("reading {}", dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                if path.parent() == Some(stdlib.as_path())
                    && matches!(
                        entry.file_name().to_str(),
                        Some("test" | "idlelib" | "turtledemo" | "tkinter")
                    )
                {
                    continue;
                }
                stack.push(path);
            } else if meta.is_file() {
                let to = root.join(path.strip_prefix("/").unwrap_or(&path));
                std::fs::copy(&path, &to).map_err(io(format!("copying {}", path.display())))?;
                files += 1;
                if path.extension().is_some_and(|e| e == "so") {
                    objects.push(path);
                }
            } else if meta.file_type().is_symlink()
                && let Ok(target) = std::fs::read_link(&path)
            {
                let to = root.join(path.strip_prefix("/").unwrap_or(&path));
                let _ = std::os::unix::fs::symlink(target, to);
            }
        }
    }
    // Every shared library the interpreter and its extension modules link.
    let mut libs = BTreeSet::new();
    for object in &objects {
        let out = Command::new("ldd")
            .arg(object)
            .output()
            .map_err(io("running ldd (install libc-bin)"))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
    }
    // The C library's whole family and libgcc_s, linked or not: glibc opens libgcc_s to unwind
    // a thread that is cancelled or exits (`pthread_exit`), and tools bound in at run time (the
    // environment installer, `uv`) link them; a slim Debian image has them all too.
    for name in [
        "libgcc_s.so.1",
        "libm.so.6",
        "librt.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "libutil.so.1",
        "libresolv.so.2",
    ] {
        let found = [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
        ]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|lib| lib.is_file());
        libs.extend(found);
    }
    for lib in &libs {
        // `/lib/...` and `/lib64/...` are links into `/usr` in the image, as on merged-/usr hosts.
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        let rel = if rel.starts_with("lib") {
            Path::new("usr").join(rel)
        } else {
            rel.to_path_buf()
        };
        let to = root.join(rel);
        if to.exists() {
            continue;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating a library directory"))?;
        }
        std::fs::copy(lib, &to).map_err(io(format!("copying {}", lib.display())))?;
        files += 1;
    }
    for etc in ["ld.so.cache", "mime.types"] {
        let from = Path::new("/etc").join(etc);
        if from.is_file() {
            std::fs::copy(&from, root.join("etc").join(etc)).map_err(io("copying /etc"))?;
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )
    .map_err(io("writing /etc/passwd"))?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")
        .map_err(io("writing /etc/group"))?;
    Ok((version, files))
}

/// Install requirements into the image's package directory with `uv` if it is on `PATH`,
/// else the host interpreter's `pip`.
fn install(python: &Path, target: &Path, packages: &[String]) -> Result<(), ImageError> {
    std::fs::create_dir_all(target).map_err(io("creating the package directory"))?;
    let uv = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("uv"))
            .find(|p| p.is_file())
    });
    let mut cmd = match uv {
        Some(uv) => {
            let mut c = Command::new(uv);
            c.args(["pip", "install", "--python"]).arg(python);
            c
        }
        None => {
            let mut c = Command::new(python);
            c.args([
                "-m",
                "pip",
                "install",
                "--no-cache-dir",
                "--disable-pip-version-check",
            ]);
            c
        }
    };
    cmd.arg("--target").arg(target).args(packages);
    let out = cmd
        .output()
        .map_err(io("running the installer (uv or pip)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ImageError::Build(format!(
            "installing {} failed:\n{}",
            packages.join(", "),
            tail.join("\n")
        )));
    }
    Ok(())
}

fn pack(root: &Path) -> Result<Vec<u8>, ImageError> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    // Modes as they are on disk (the sticky, world-writable /tmp among them).
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", root)
        .map_err(io("packing the image"))?;
    b.into_inner().map_err(io("packing the image"))
}

/// Run one command in `image` (no network, read-only, no capabilities, as `nobody`) and return
/// its standard output; a non-zero exit is an error carrying its standard error.
pub async fn run_once(
    d: &Docker,
    image: &str,
    runtime: Option<&str>,
    cmd: &[&str],
) -> Result<String, DockerError> {
    let body = ContainerCreateBody {
        image: Some(image.into()),
        cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
        user: Some("65534:65534".into()),
        network_disabled: Some(true),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        labels: Some(HashMap::from([
            (
                super::LABEL_OWNER.to_string(),
                std::process::id().to_string(),
            ),
            (super::LABEL_HOST.to_string(), super::hostname()),
        ])),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            runtime: runtime.map(str::to_string),
            memory: Some(256 << 20),
            pids_limit: Some(256),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = d
        .create_container(Some(CreateContainerOptionsBuilder::new().build()), body)
        .await
        .map_err(|e| DockerError::from_api(e, image, runtime))?;
    let id = created.id;
    let result = async {
        let mut attached = d
            .attach_container(
                &id,
                Some(
                    AttachContainerOptionsBuilder::new()
                        .stream(true)
                        .stdout(true)
                        .stderr(true)
                        .build(),
                ),
            )
            .await
            .map_err(|e| DockerError::from_api(e, image, runtime))?;
        d.start_container(&id, None)
            .await
            .map_err(|e| DockerError::from_api(e, image, runtime))?;
        let mut out = Vec::new();
        let mut err = Vec::new();
        let collect = async {
            while let Some(Ok(frame)) = attached.output.next().await {
                match frame {
                    LogOutput::StdOut { message } => out.extend_from_slice(&message),
                    LogOutput::StdErr { message } => err.extend_from_slice(&message),
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), collect).await;
        let _ = d.wait_container(&id, None).next().await;
        let code = d
            .inspect_container(&id, None)
            .await
            .ok()
            .and_then(|i| i.state?.exit_code)
            .unwrap_or(-1);
        if code != 0 {
            return Err(DockerError::Api(format!(
                "`{}` in image `{image}` exited with {code}: {}",
                cmd.join(" "),
                String::from_utf8_lossy(&err).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
    .await;
    remove(d, &id).await;
    result
}
