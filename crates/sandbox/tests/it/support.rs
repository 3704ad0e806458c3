//! Shared helpers: fixtures, running them in a backend, checking processes are gone.

use std::path::PathBuf;

use fleetbox_proto::{ByteSize, ExecutionReport, Limits, Millis, Status};
use fleetbox_sandbox::{Backend, RunRequest, SandboxConfig, SeccompMode};

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// The jail's helper: this crate's `fleetbox-jail-init` (the test executable is
/// multi-threaded, so the jail starts through the helper rather than a direct clone).
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fleetbox-jail-init"))
}

/// Limits small enough that hostile fixtures end quickly.
pub fn limits() -> Limits {
    Limits {
        timeout: Millis(5000),
        cpu_time: Millis(5000),
        memory: ByteSize::mib(128),
        max_output: ByteSize::kib(64),
        ..Limits::default()
    }
}

/// How a test wants the sandbox set up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub backend: Backend,
    pub cgroups: bool,
    pub seccomp: SeccompMode,
}

pub const PROCESS: Setup = Setup {
    backend: Backend::Process,
    cgroups: true,
    seccomp: SeccompMode::Deny,
};
pub const PROCESS_NO_CGROUP: Setup = Setup {
    backend: Backend::Process,
    cgroups: false,
    seccomp: SeccompMode::Deny,
};
pub const JAIL: Setup = Setup {
    backend: Backend::Jail,
    cgroups: true,
    seccomp: SeccompMode::Deny,
};
pub const JAIL_NO_CGROUP: Setup = Setup {
    backend: Backend::Jail,
    cgroups: false,
    seccomp: SeccompMode::Deny,
};
/// The jail with the allow-list policy (`resources/seccomp/allow.json`).
pub const JAIL_ALLOW: Setup = Setup {
    backend: Backend::Jail,
    cgroups: true,
    seccomp: SeccompMode::Allow,
};

pub fn run_code(
    setup: Setup,
    code: &[u8],
    input: Option<&[u8]>,
    limits: Limits,
) -> ExecutionReport {
    let sandbox = sandbox(setup);
    let req = RunRequest::new(code.to_vec(), input.map(<[u8]>::to_vec), limits);
    sandbox.run(&req)
}

/// A sandbox set up as `setup` says.
pub fn sandbox(setup: Setup) -> Box<dyn fleetbox_sandbox::Sandbox> {
    fleetbox_sandbox::open(
        setup.backend,
        SandboxConfig {
            use_cgroups: setup.cgroups,
            seccomp: setup.seccomp,
            // The jail's helper is a binary of its own, not this test executable.
            jail_helper: Some(bin()),
            ..SandboxConfig::default()
        },
    )
    .expect("open sandbox")
}

pub fn run(setup: Setup, name: &str, limits: Limits) -> ExecutionReport {
    run_code(setup, &fixture(name), None, limits)
}

/// True when `pid` no longer runs (absent, or a zombie waiting for its reaper).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 2..].chars().next();
            state == Some('Z') || state == Some('X')
        }
    }
}

/// Pretty report for assertion messages.
pub fn show(r: &ExecutionReport) -> String {
    serde_json::to_string_pretty(r).unwrap()
}

/// The `process` fixtures and how each must end, in every backend and start mode.
pub fn fixture_verdicts() -> Vec<(&'static str, Status, Limits)> {
    let quick = |timeout_ms: u64| Limits {
        timeout: Millis(timeout_ms),
        cpu_time: Millis(1000),
        ..limits()
    };
    vec![
        ("clean_exit.py", Status::Ok, limits()),
        ("exception.py", Status::Error, limits()),
        ("syntax_error.py", Status::Error, limits()),
        ("nonzero_exit.py", Status::Error, limits()),
        ("sleep_past_timeout.py", Status::Timeout, quick(500)),
        ("busy_loop.py", Status::Timeout, quick(10_000)),
        ("memory_bomb.py", Status::MemoryLimit, limits()),
        ("fork_bomb.py", Status::Error, limits()),
        ("output_flood.py", Status::OutputLimit, limits()),
        ("double_fork.py", Status::Ok, limits()),
        ("big_file.py", Status::OutputLimit, limits()),
        ("host_env.py", Status::Ok, limits()),
        ("files_created.py", Status::Ok, limits()),
        // A signal the program sent itself is its own doing: `error`, not a retried `killed`.
        ("killed.py", Status::Error, limits()),
        ("fake_memory_error.py", Status::Error, limits()),
        ("fake_cpu_limit.py", Status::Error, limits()),
    ]
}

/// A sandbox configuration for runs under `work_root`, with `warm` jails kept ready.
pub fn sandbox_config(work_root: &std::path::Path, warm: usize) -> SandboxConfig {
    SandboxConfig {
        jail_helper: Some(bin()),
        work_root: work_root.to_path_buf(),
        warm,
        ..SandboxConfig::default()
    }
}

/// The names left under `root` (empty when every run cleaned up).
pub fn left_under(root: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The `uv` binary the environment tests build with: `FLEETBOX_TEST_UV`, else the one the
/// `uv` package from PyPI carries (the test script installs it), else one on `PATH`.
pub fn uv() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEETBOX_TEST_UV") {
        return PathBuf::from(p);
    }
    for python in ["python3", "/usr/bin/python3"] {
        if let Ok(out) = std::process::Command::new(python)
            .args(["-c", "import uv; print(uv.find_uv_bin())"])
            .output()
            && out.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    match fleetbox_sandbox::environment::Installer::parse("uv") {
        Ok(fleetbox_sandbox::environment::Installer::Uv(p)) => p,
        _ => panic!("no uv: the test script installs it (`pip install uv`)"),
    }
}

/// The image the `docker` tests run in (see `docker::image::test_image`; the test script
/// builds it first).
pub fn docker_image() -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fleetbox_sandbox::docker::image::test_image())
}

/// A `docker` sandbox on the test image, under `runtime` (`None`: runc), with `warm`
/// containers kept ready.
pub fn docker_config(runtime: Option<&str>, warm: usize) -> SandboxConfig {
    SandboxConfig {
        warm,
        docker: fleetbox_sandbox::docker::DockerConfig {
            image: docker_image(),
            runtime: runtime.map(str::to_string),
            host: None,
        },
        ..SandboxConfig::default()
    }
}
