//! Environments a job asks for: built once per requirements hash, in the sandbox, read-only to
//! the programs that use them, one build for concurrent runs, a clear error for a bad one.
//! These tests reach the package index (PyPI) the test machine is configured with.

use std::sync::Arc;

use fleetbox_proto::{EnvironmentSpec, Status};
use fleetbox_sandbox::environment::{EnvConfig, EnvError, Environments, Installer};
use fleetbox_sandbox::{RunRequest, Sandbox};

use crate::support::{self, JAIL, PROCESS, Setup, show};

/// A small pure-Python package the host's interpreter does not have.
const SMALL: &str = "six==1.16.0";

fn spec(reqs: &[&str]) -> EnvironmentSpec {
    EnvironmentSpec {
        requirements: reqs.iter().map(|s| s.to_string()).collect(),
        requirements_file: None,
    }
}

fn environments(setup: Setup, cache: &std::path::Path, installer: Installer) -> Arc<Environments> {
    let sandbox: Arc<dyn Sandbox> = Arc::from(support::sandbox(setup));
    let mut config = EnvConfig::new(cache);
    config.installer = installer;
    Environments::new(config, sandbox, None)
}

fn run_in(
    setup: Setup,
    envs: &Arc<Environments>,
    spec: &EnvironmentSpec,
    code: &str,
) -> fleetbox_proto::ExecutionReport {
    let held = envs.get(spec).unwrap_or_else(|e| panic!("{e}"));
    let mut req = RunRequest::new(code.as_bytes().to_vec(), None, support::limits());
    req.environment = Some(held.environment.clone());
    support::sandbox(setup).run(&req)
}

#[test]
fn a_job_environment_is_built_once_and_used_in_every_backend() {
    let cache = tempfile::tempdir().unwrap();
    let envs = environments(
        support::JAIL_ALLOW,
        cache.path(),
        Installer::Uv(support::uv()),
    );
    let want = spec(&[SMALL]);
    let code = "import six, sys\nprint(six.__version__, sys.prefix == sys.base_prefix)\n";
    for setup in [JAIL, PROCESS, JAIL] {
        let r = run_in(setup, &envs, &want, code);
        assert_eq!(r.status, Status::Ok, "{setup:?}: {}", show(&r));
        assert_eq!(r.stdout, "1.16.0 False\n", "{setup:?}");
        let env = r
            .environment
            .as_ref()
            .expect("the report names the environment");
        assert_eq!(env.hash, want.hash());
        assert!(
            env.packages
                .iter()
                .any(|p| p.name == "six" && p.version == "1.16.0"),
            "{:?}",
            env.packages
        );
    }
    assert_eq!(envs.builds(), 1, "one build for every run");
    // The host's packages are not in it: the environment is what was asked for.
    let r = run_in(JAIL, &envs, &want, "import numpy\n");
    assert_eq!(r.status, Status::Error, "{}", show(&r));
    assert_eq!(r.exception.as_ref().unwrap().kind, "ModuleNotFoundError");
    // A second cache (another agent) builds its own, once.
    let other = tempfile::tempdir().unwrap();
    let envs2 = environments(JAIL, other.path(), Installer::Uv(support::uv()));
    let held = envs2.get(&want).unwrap();
    assert!(held.built, "{}", held.note());
    drop(held);
    let held = envs2.get(&want).unwrap();
    assert!(!held.built);
    assert!(
        held.note().contains("reused from the cache"),
        "{}",
        held.note()
    );
}

#[test]
fn the_environment_is_read_only_to_the_program() {
    let cache = tempfile::tempdir().unwrap();
    let envs = environments(JAIL, cache.path(), Installer::Uv(support::uv()));
    let want = spec(&[SMALL]);
    let code = r#"
import os, six, sys
target = os.path.dirname(six.__file__)
results = []
for path in [os.path.join(target, "evil.py"), six.__file__, os.path.join(sys.prefix, "bin", "evil")]:
    try:
        open(path, "a").write("x")
        results.append("wrote")
    except OSError as e:
        results.append(type(e).__name__)
print(results)
"#;
    for setup in [JAIL, PROCESS] {
        let r = run_in(setup, &envs, &want, code);
        assert_eq!(r.status, Status::Ok, "{setup:?}: {}", show(&r));
        assert!(!r.stdout.contains("wrote"), "{setup:?}: {}", r.stdout);
    }
    // Nothing changed for the next run.
    let r = run_in(
        JAIL,
        &envs,
        &want,
        "import six, os\nprint(sorted(os.listdir(os.path.dirname(six.__file__)))[:3])\n",
    );
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert!(!r.stdout.contains("evil"), "{}", r.stdout);
}

#[test]
fn runs_racing_for_one_environment_trigger_one_build() {
    let cache = tempfile::tempdir().unwrap();
    let envs = environments(JAIL, cache.path(), Installer::Uv(support::uv()));
    let want = spec(&["attrs==23.2.0"]);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let envs = envs.clone();
            let want = want.clone();
            std::thread::spawn(move || {
                envs.get(&want)
                    .map(|g| (g.built, g.environment.dir.clone()))
            })
        })
        .collect();
    let got: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert_eq!(envs.builds(), 1);
    assert_eq!(got.iter().filter(|(built, _)| *built).count(), 1);
    assert!(got.iter().all(|(_, dir)| *dir == got[0].1));
}

#[test]
fn a_bad_requirement_is_a_clear_error_and_is_not_rebuilt_by_every_shard() {
    let cache = tempfile::tempdir().unwrap();
    let envs = environments(JAIL, cache.path(), Installer::Uv(support::uv()));
    let bad = spec(&["fleetbox-no-such-package-zzq==1.0"]);
    let err = envs.get(&bad).err().expect("a package that does not exist");
    let EnvError::Build { hash, message } = &err else {
        panic!("{err}");
    };
    assert_eq!(hash, &bad.hash());
    assert!(
        message.contains("fleetbox-no-such-package-zzq"),
        "the installer's message names the requirement: {message}"
    );
    // The job's other shards get the same answer at once.
    let again = envs.get(&bad).err().expect("still failing");
    assert_eq!(again.to_string(), err.to_string());
    assert_eq!(envs.builds(), 1);
    // Nothing half-built is left in the cache.
    let left: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".bin")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn pip_builds_when_there_is_no_uv() {
    let cache = tempfile::tempdir().unwrap();
    let envs = environments(support::JAIL_ALLOW, cache.path(), Installer::Pip);
    let want = spec(&[SMALL]);
    let r = run_in(JAIL, &envs, &want, "import six\nprint(six.__version__)\n");
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert_eq!(r.stdout, "1.16.0\n");
}

#[test]
fn the_cache_evicts_the_least_recently_used_environment_no_run_holds() {
    let cache = tempfile::tempdir().unwrap();
    let sandbox: Arc<dyn Sandbox> = Arc::from(support::sandbox(JAIL));
    let mut config = EnvConfig::new(cache.path());
    config.installer = Installer::Uv(support::uv());
    // Smaller than any one environment: only what a run holds stays.
    config.max_bytes = 1;
    let envs = Environments::new(config, sandbox, None);
    let a = spec(&[SMALL]);
    let b = spec(&["attrs==23.2.0"]);
    let held_a = envs.get(&a).unwrap();
    let dir_a = held_a.environment.dir.clone();
    // While a run holds `a`, building `b` leaves it alone.
    let held_b = envs.get(&b).unwrap();
    assert!(dir_a.exists(), "an environment in use is never evicted");
    drop(held_a);
    drop(held_b);
    // The next build evicts both older, unheld environments.
    let c = spec(&["iniconfig==2.0.0"]);
    let held_c = envs.get(&c).unwrap();
    assert!(
        !dir_a.exists(),
        "the least recently used environment was evicted"
    );
    assert!(held_c.environment.dir.exists());
    drop(held_c);
    // An evicted environment is built again when asked for.
    let again = envs.get(&a).unwrap();
    assert!(again.built);
    assert_eq!(envs.builds(), 4);
}

/// A directory the sandbox can read (0755), for a wheelhouse.
fn wheelhouse() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

/// `SMALL`'s wheel, fetched from the index into `dir`.
fn download_small(dir: &std::path::Path) {
    let got = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "-q", "--no-deps", "-d"])
        .arg(dir)
        .arg(SMALL)
        .status()
        .unwrap();
    assert!(got.success(), "pip download {SMALL}");
}

/// Environments in `cache` built with uv from the wheelhouse `wheels` alone.
fn air_gapped(cache: &std::path::Path, wheels: &std::path::Path) -> Arc<Environments> {
    let sandbox: Arc<dyn Sandbox> = Arc::from(support::sandbox(JAIL));
    let mut config = EnvConfig::new(cache);
    config.installer = Installer::Uv(support::uv());
    config.find_links = Some(wheels.to_path_buf());
    config.no_index = true;
    Environments::new(config, sandbox, None)
}

/// Air-gapped fleets: `--find-links DIR --no-index` installs from a wheelhouse only.
#[test]
fn a_wheelhouse_serves_an_air_gapped_agent() {
    let wheels = wheelhouse();
    download_small(wheels.path());
    let cache = tempfile::tempdir().unwrap();
    let envs = air_gapped(cache.path(), wheels.path());
    let held = envs.get(&spec(&[SMALL])).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        held.environment
            .info
            .packages
            .iter()
            .any(|p| p.name == "six")
    );
    // Nothing else is reachable: a package not in the wheelhouse is a clear error.
    let err = envs
        .get(&spec(&["attrs==23.2.0"]))
        .err()
        .expect("not in the wheelhouse");
    assert!(err.to_string().contains("attrs"), "{err}");
}

/// A build that fails for a moment (here: the wheel reaches the wheelhouse just after the
/// first try, as an index comes back after a reset) is tried once more before its failure is
/// remembered.
#[test]
fn an_installer_failure_is_tried_once_more_before_it_is_remembered() {
    let fetched = tempfile::tempdir().unwrap();
    download_small(fetched.path());
    let wheels = wheelhouse();
    let cache = tempfile::tempdir().unwrap();
    let envs = air_gapped(cache.path(), wheels.path());
    // The wheel arrives once the first try has failed, during the pause before the next.
    let (from, to) = (fetched.path().to_path_buf(), wheels.path().to_path_buf());
    let watching = envs.clone();
    let arrive = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while watching.retries() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the first try never failed"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for e in std::fs::read_dir(&from).unwrap().flatten() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    });
    let held = envs.get(&spec(&[SMALL])).unwrap_or_else(|e| panic!("{e}"));
    arrive.join().unwrap();
    assert!(
        held.environment
            .info
            .packages
            .iter()
            .any(|p| p.name == "six")
    );
    assert_eq!((envs.builds(), envs.retries()), (1, 1));
}

/// Under `docker` the environment is built in a container, for the image's interpreter (the
/// image has no pip: the installer is bound in), cached apart from the host interpreter's,
/// and used by runs in containers under runc and gVisor.
#[test]
fn a_job_environment_is_built_for_the_images_interpreter_under_docker() {
    let cache = tempfile::tempdir().unwrap();
    let docker: Arc<dyn Sandbox> = Arc::new(
        fleetbox_sandbox::docker::DockerSandbox::new(support::docker_config(None, 0)).unwrap(),
    );
    let mut config = EnvConfig::new(cache.path());
    config.installer = Installer::Uv(support::uv());
    let envs = Environments::new(config, docker.clone(), None);
    let want = spec(&[SMALL]);
    let held = envs.get(&want).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(envs.builds(), 1);
    let code = "import six, sys\nprint(six.__version__, sys.prefix == sys.base_prefix)\n";
    for runtime in [None, Some("runsc")] {
        let sb = fleetbox_sandbox::docker::DockerSandbox::new(support::docker_config(runtime, 0))
            .unwrap();
        let mut req = RunRequest::new(code.as_bytes().to_vec(), None, support::limits());
        req.environment = Some(held.environment.clone());
        let r = sb.run(&req);
        assert_eq!(r.status, Status::Ok, "{runtime:?}: {}", show(&r));
        assert_eq!(r.stdout, "1.16.0 False\n", "{runtime:?}");
        assert_eq!(r.environment.as_ref().unwrap().hash, want.hash());
    }
    drop(held);
    // Found again, not rebuilt; the host interpreter's environment is another one.
    drop(envs.get(&want).unwrap());
    assert_eq!(envs.builds(), 1);
    let host = environments(JAIL, cache.path(), Installer::Uv(support::uv()));
    drop(host.get(&want).unwrap());
    assert_eq!(
        host.builds(),
        1,
        "the jail's environment is built for the host's interpreter"
    );
}
