//! `fleetbox run` as a user types it: flags, environment, config file, exit codes.

use std::process::{Command, Output, Stdio};

use crate::support::{bin, fixtures_dir};

fn fleetbox(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).stdin(Stdio::null());
    for k in [
        "SANDBOX_TYPE",
        "SANDBOX_TIMEOUT_SEC",
        "SANDBOX_MAX_OUTPUT_KB",
        "FLEETBOX_CONFIG",
        "DOCKER_IMAGE",
        "DOCKER_RUNTIME",
        "DOCKER_MEMORY_LIMIT",
        "DOCKER_CPU_LIMIT",
        "DOCKER_NETWORK_ENABLED",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run fleetbox")
}

fn fixture(name: &str) -> String {
    fixtures_dir().join(name).display().to_string()
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn human_output_and_summary() {
    let out = fleetbox(&["run", &fixture("clean_exit.py")], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"answer\": 42, \"items\": [1, 2, 3]}\n"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("fleetbox: ok in "), "{err}");
}

#[test]
fn exit_codes_follow_status() {
    let cases = [
        ("clean_exit.py", 0),
        ("exception.py", 1),
        ("sleep_past_timeout.py", 3),
        ("memory_bomb.py", 4),
        ("output_flood.py", 5),
        // A signal the program sent itself: `error`, not the sandbox's `killed` (6).
        ("killed.py", 1),
    ];
    for (name, code) in cases {
        let out = fleetbox(
            &[
                "run",
                "--timeout",
                "1s",
                "--memory",
                "64MiB",
                &fixture(name),
            ],
            &[],
        );
        assert_eq!(
            out.status.code(),
            Some(code),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn json_report_and_stdin_program() {
    let mut child = Command::new(bin())
        .args(["run", "--json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"print(6 * 7)")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let r = report(&out);
    assert_eq!(r["status"], "ok");
    assert_eq!(r["output"], 42);
    assert_eq!(r["output_source"], "stdout_json");
}

#[test]
fn seed_environment_variables_and_flag_precedence() {
    // SANDBOX_TIMEOUT_SEC is seconds; the flag wins over it.
    let out = fleetbox(
        &["run", "--json", &fixture("sleep_past_timeout.py")],
        &[("SANDBOX_TIMEOUT_SEC", "1")],
    );
    let r = report(&out);
    assert_eq!(r["status"], "timeout");
    assert_eq!(r["limits"]["timeout"], "1s");
    let out = fleetbox(
        &[
            "run",
            "--json",
            "--timeout",
            "300ms",
            &fixture("sleep_past_timeout.py"),
        ],
        &[("SANDBOX_TIMEOUT_SEC", "1")],
    );
    assert_eq!(report(&out)["limits"]["timeout"], "300ms");
    // SANDBOX_MAX_OUTPUT_KB is KiB.
    let out = fleetbox(
        &["run", "--json", &fixture("output_flood.py")],
        &[("SANDBOX_MAX_OUTPUT_KB", "8")],
    );
    let r = report(&out);
    assert_eq!(r["limits"]["max_output"], "8KiB");
    assert_eq!(r["stdout"].as_str().unwrap().len(), 8192);
    // SANDBOX_TYPE=local is the process backend.
    let out = fleetbox(
        &["run", "--json", &fixture("clean_exit.py")],
        &[("SANDBOX_TYPE", "local")],
    );
    assert_eq!(report(&out)["backend"], "process");
}

#[test]
fn config_file_is_below_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("fleetbox.toml");
    std::fs::write(&cfg, "[run]\ntimeout = \"700ms\"\nmemory = \"96MiB\"\n").unwrap();
    let cfg = cfg.display().to_string();
    let out = fleetbox(
        &["--config", &cfg, "run", "--json", &fixture("clean_exit.py")],
        &[],
    );
    let r = report(&out);
    assert_eq!(r["limits"]["timeout"], "700ms");
    assert_eq!(r["limits"]["memory"], "96MiB");
    let out = fleetbox(
        &["--config", &cfg, "run", "--json", &fixture("clean_exit.py")],
        &[("SANDBOX_TIMEOUT_SEC", "2")],
    );
    assert_eq!(report(&out)["limits"]["timeout"], "2s");
}

#[test]
fn malformed_values_name_the_flag() {
    let out = fleetbox(
        &["run", "--timeout", "soon", &fixture("clean_exit.py")],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--timeout"), "{err}");
    let out = fleetbox(
        &["run", "--memory", "12 apples", &fixture("clean_exit.py")],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--memory"));
    let out = fleetbox(
        &["run", &fixture("clean_exit.py")],
        &[("SANDBOX_TIMEOUT_SEC", "forever")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SANDBOX_TIMEOUT_SEC"));
    let out = fleetbox(&["run", "--backend", "vm", &fixture("clean_exit.py")], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`vm`"));
    let out = fleetbox(&["run", "/nonexistent/program.py"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/program.py"));
}

#[test]
fn input_must_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{not json").unwrap();
    let out = fleetbox(
        &[
            "run",
            "--input",
            &bad.display().to_string(),
            &fixture("shard_input.py"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--input"));
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"numbers": [5, 5]}"#).unwrap();
    let out = fleetbox(
        &[
            "run",
            "--json",
            "--input",
            &good.display().to_string(),
            &fixture("shard_input.py"),
        ],
        &[],
    );
    assert_eq!(report(&out)["output"]["sum"], 10);
}

#[test]
fn keep_workspace_keeps_it() {
    let out = fleetbox(
        &[
            "run",
            "--json",
            "--keep-workspace",
            &fixture("files_created.py"),
        ],
        &[],
    );
    let r = report(&out);
    let ws = std::path::PathBuf::from(r["workspace"].as_str().expect("workspace path"));
    assert!(ws.join("work/a.txt").is_file());
    // Copied off the run's tmpfs: nothing stays mounted (or holds memory) after `run` exits.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(ws.to_str().unwrap()), "{mounts}");
    std::fs::remove_dir_all(ws).unwrap();
    let out = fleetbox(&["run", "--json", &fixture("files_created.py")], &[]);
    assert!(report(&out).get("workspace").is_none());
}

#[test]
fn jail_trace_lists_start_up_phases_in_order() {
    let out = fleetbox(
        &[
            "run",
            "--json",
            "--backend",
            "jail",
            &fixture("clean_exit.py"),
        ],
        &[("FLEETBOX_JAIL_TRACE", "1")],
    );
    let r = report(&out);
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    let line = notes
        .iter()
        .find_map(|n| n.strip_prefix("phases (ms): "))
        .unwrap_or_else(|| panic!("no phases note in {notes:?}"));
    let phases: Vec<(&str, f64)> = line
        .split(", ")
        .map(|p| {
            let (name, ms) = p.rsplit_once(' ').unwrap();
            (name, ms.parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = phases.iter().map(|p| p.0).collect();
    for expected in [
        "supervisor_ready",
        "namespaces_created",
        "spawned",
        "cgroup_joined",
        "root_built",
        "program_forked",
        "seccomp_installed",
        "exit_seen",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {line}");
    }
    assert!(phases.windows(2).all(|w| w[0].1 <= w[1].1), "{line}");
    assert_eq!(*names.last().unwrap(), "exit_seen");
    // Without the variable there is no such note.
    let r = report(&fleetbox(
        &[
            "run",
            "--json",
            "--backend",
            "jail",
            &fixture("clean_exit.py"),
        ],
        &[],
    ));
    assert!(!r["notes"].to_string().contains("phases"));
}

/// `fleetbox run` is single-threaded, so it clones the namespace init itself instead of
/// executing the helper (the library tests, multi-threaded, take the helper path). The escape
/// fixtures give the same verdicts this way, and the init hands the program nothing of the
/// supervisor's: no stray descriptors, stdin at `/dev/null`, default signal handling.
#[test]
fn the_cli_clones_the_jail_directly_with_the_same_verdicts() {
    let jail = |file: &str, extra: &[&str]| {
        let mut args = vec!["run", "--json", "--backend", "jail"];
        args.extend_from_slice(extra);
        args.push(file);
        report(&fleetbox(&args, &[("FLEETBOX_JAIL_TRACE", "1")]))
    };
    let violation = |name: &str, syscall: &str| {
        let r = jail(&fixture(&format!("escape/{name}")), &[]);
        assert_eq!(r["status"], "sandbox_violation", "{name}: {r}");
        assert!(
            r["violations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["syscall"] == syscall),
            "{name}: no `{syscall}` violation in {r}"
        );
        r
    };
    let r = violation("mount.py", "mount");
    // Direct: the helper never ran.
    let phases = r["notes"].to_string();
    assert!(phases.contains("namespaces_created"), "{phases}");
    assert!(!phases.contains("helper_start"), "{phases}");
    violation("ptrace.py", "ptrace");
    violation("unshare.py", "unshare");
    violation("load_module.py", "finit_module");
    violation("ctypes_syscall.py", "keyctl");

    let r = jail(&fixture("escape/read_host_files.py"), &[]);
    assert_eq!(r["output"]["shadow"]["error"], "FileNotFoundError", "{r}");
    let r = jail(&fixture("escape/list_processes.py"), &[]);
    assert_eq!(r["output"]["pids"], serde_json::json!([1, 2]), "{r}");
    let r = jail(&fixture("escape/cgroup_view.py"), &[]);
    for line in r["output"]["membership"].as_array().unwrap() {
        assert!(line.as_str().unwrap().ends_with(":/"), "{r}");
    }
    let r = jail(&fixture("escape/write_outside.py"), &[]);
    assert_eq!(r["output"]["/etc/fleetbox-escape"], "OSError", "{r}");
    assert_eq!(r["output"]["/work/inside.txt"], "written", "{r}");

    for (name, status, extra) in [
        ("memory_bomb.py", "memory_limit", &[][..]),
        ("fork_bomb.py", "error", &[]),
        ("double_fork.py", "ok", &[]),
        ("killed.py", "error", &[]),
        ("sleep_past_timeout.py", "timeout", &["--timeout", "500ms"]),
    ] {
        let r = jail(&fixture(name), extra);
        assert_eq!(r["status"], status, "{name}: {r}");
    }

    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.py");
    std::fs::write(
        &probe,
        "import json, os, signal, sys\n\
         print(json.dumps({'fds': sorted(os.listdir('/proc/self/fd')), 'stdin': sys.stdin.read(),\n\
         'sigterm': str(signal.getsignal(signal.SIGTERM)), 'blocked': sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))}))\n",
    )
    .unwrap();
    let r = jail(probe.to_str().unwrap(), &[]);
    assert_eq!(r["status"], "ok", "{r}");
    // 0-2 and the descriptor listdir itself holds open.
    assert_eq!(
        r["output"]["fds"],
        serde_json::json!(["0", "1", "2", "3"]),
        "{r}"
    );
    assert_eq!(r["output"]["stdin"], "", "{r}");
    // `str(signal.SIG_DFL)` is "0".
    assert_eq!(r["output"]["sigterm"], "0", "{r}");
    assert_eq!(r["output"]["blocked"], serde_json::json!([]), "{r}");
}

/// Without root: the jail maps the caller's own uid, goes without cgroups (their files belong
/// to root here) and says so, and still contains every escape. Run as `nobody` through
/// `runuser` when the tests run as root (as in CI); as the caller otherwise.
#[test]
fn the_jail_works_for_an_unprivileged_user() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // The checkout may not be readable by `nobody`: the binary and the fixtures go to a
    // directory that is.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("fleetbox");
    std::fs::copy(bin(), &exe).unwrap();
    let jail = |name: &str, extra: &[&str]| -> serde_json::Value {
        let file = dir.path().join(name.replace('/', "_"));
        std::fs::copy(fixture(name), &file).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut cmd = if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--", "env", "-i", "PATH=/usr/bin:/bin"]);
            c.arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(["run", "--json", "--backend", "jail"])
            .args(extra)
            .arg(&file)
            .current_dir("/")
            .stdin(Stdio::null());
        report(&cmd.output().expect("run fleetbox"))
    };
    let r = jail("clean_exit.py", &[]);
    assert_eq!(r["status"], "ok", "{r}");
    if root {
        assert!(r["notes"].to_string().contains("no cgroup"), "{r}");
    }
    let r = jail("escape/mount.py", &[]);
    assert_eq!(r["status"], "sandbox_violation", "{r}");
    assert_eq!(r["violations"][0]["syscall"], "mount", "{r}");
    let r = jail("escape/read_host_files.py", &[]);
    assert_eq!(r["output"]["shadow"]["error"], "FileNotFoundError", "{r}");
    let r = jail("escape/list_processes.py", &[]);
    assert_eq!(r["output"]["pids"], serde_json::json!([1, 2]), "{r}");
    let r = jail("escape/write_outside.py", &[]);
    assert_eq!(r["output"]["/etc/fleetbox-escape"], "OSError", "{r}");
    assert_eq!(r["output"]["/work/inside.txt"], "written", "{r}");
    let r = jail("double_fork.py", &[]);
    assert_eq!(r["status"], "ok", "{r}");
    let r = jail("sleep_past_timeout.py", &["--timeout", "500ms"]);
    assert_eq!(r["status"], "timeout", "{r}");
}

/// Control sequences in a program's output reach a terminal shown, not obeyed (an OSC 52
/// clipboard write among them); through a pipe and in `--json` the bytes stay exact.
#[test]
fn terminal_escapes_are_shown_on_a_terminal_and_exact_elsewhere() {
    let program = fixture("terminal_escapes.py");
    // `script` gives the command a real pseudo-terminal for stdout and stderr.
    let line = format!("{} run --backend process {program}", bin().display());
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains("out \\x1b]52;c;cHduZWQ=\\x07"), "{seen:?}");
    assert!(seen.contains("\\u{9b}31m"), "{seen:?}");
    assert!(seen.contains("err \\x1b]0;title\\x07"), "{seen:?}");
    assert!(seen.contains("ValueError: bad \\x1b[31m red"), "{seen:?}");
    assert!(
        !seen.contains('\x1b'),
        "a raw ESC reached the terminal: {seen:?}"
    );
    assert!(
        !seen.contains('\u{9b}'),
        "a raw CSI reached the terminal: {seen:?}"
    );

    let piped = fleetbox(&["run", "--backend", "process", &program], &[]);
    let stdout = String::from_utf8_lossy(&piped.stdout);
    assert!(
        stdout.contains("out \x1b]52;c;cHduZWQ=\x07 \x1b[2J \u{9b}31m done"),
        "{stdout:?}"
    );
    let json = fleetbox(&["run", "--json", "--backend", "process", &program], &[]);
    assert_eq!(
        report(&json)["exception"]["message"],
        "bad \u{1b}[31m red",
        "the report keeps the exact text"
    );
}

/// `fleetbox review check`: the coordinator's review offline, like a linter.
#[test]
fn review_check_prints_findings_and_exits_non_zero_unless_the_decision_is_run() {
    let dir = tempfile::tempdir().unwrap();
    let clean = dir.path().join("clean.py");
    let risky = dir.path().join("risky.py");
    let broken = dir.path().join("broken.py");
    std::fs::write(&clean, "import json\nprint(json.dumps([1]))\n").unwrap();
    std::fs::write(&risky, "x = 1\nimport os as o\no.system('id')\n").unwrap();
    std::fs::write(&broken, "def f(:\n").unwrap();
    let out = fleetbox(&["review", "check", clean.to_str().unwrap()], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("risk 0, decision run\n"));
    let out = fleetbox(
        &[
            "review",
            "check",
            clean.to_str().unwrap(),
            risky.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{}:3:1 process.spawn high", risky.display())),
        "{text}"
    );
    assert!(text.contains("decision run_on_server_only"), "{text}");
    let out = fleetbox(
        &["review", "check", "--json", broken.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["syntax_error"]["line"], 1, "{line}");
}

/// The seed's docker mode, as its README configures it: `SANDBOX_TYPE=docker` and the
/// `DOCKER_*` variables in their units; then an image built with a package from the index and
/// used by name; a bad variable is refused by name.
#[test]
fn docker_mode_from_the_seeds_variables_and_a_built_image() {
    let image = format!("fleetbox-cli-test:{}", std::process::id());
    let out = fleetbox(&["image", "build", "--name", &image, "--with", "six"], &[]);
    assert!(
        out.status.success(),
        "image build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&image), "{stdout}");
    // It says plainly what the image holds, and so does its label.
    assert!(stdout.contains("packages: six=="), "{stdout}");
    let label = Command::new("docker")
        .args([
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"fleetbox.packages\"}}",
            &image,
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&label.stdout).starts_with("six=="),
        "{label:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let prog = dir.path().join("six.py");
    std::fs::write(
        &prog,
        "import os, six\nprint(six.__version__ != '', os.getuid() != 0)\n",
    )
    .unwrap();
    let prog = prog.display().to_string();
    let envs = [
        ("SANDBOX_TYPE", "docker"),
        ("DOCKER_IMAGE", image.as_str()),
        ("DOCKER_MEMORY_LIMIT", "100m"),
        ("DOCKER_CPU_LIMIT", "0.25"),
        ("DOCKER_NETWORK_ENABLED", "false"),
    ];
    let out = fleetbox(&["run", "--json", &prog], &envs);
    let r = report(&out);
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["stdout"], "True True\n");
    assert_eq!(r["backend"], "docker");
    assert_eq!(r["runtime"], "runc");
    assert_eq!(r["limits"]["memory"], "100MiB");
    assert_eq!(r["limits"]["cpus"], 0.25);
    // gVisor through the flag.
    let out = fleetbox(
        &["run", "--json", "--docker-runtime", "runsc", &prog],
        &envs,
    );
    let r = report(&out);
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["runtime"], "runsc");
    let out = fleetbox(
        &["run", &prog],
        &[("SANDBOX_TYPE", "docker"), ("DOCKER_CPU_LIMIT", "lots")],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("DOCKER_CPU_LIMIT"));
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
}

/// `--if-outdated` keeps a current image; a rebuild under the same name removes the image it
/// replaced instead of leaving it dangling in the daemon.
#[test]
fn image_rebuilds_leave_no_dangling_images() {
    let image = format!("fleetbox-rebuild-test:{}", std::process::id());
    let id = |name: &str| {
        let out = Command::new("docker")
            .args(["image", "inspect", "--format", "{{.Id}}", name])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let build = |extra: &[&str]| {
        let mut args = vec!["image", "build", "--name", image.as_str()];
        args.extend_from_slice(extra);
        let out = fleetbox(&args, &[]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let said = build(&["--if-outdated"]);
    assert!(said.starts_with(&image), "{said}");
    let first = id(&image).expect("built");
    let said = build(&["--if-outdated"]);
    assert_eq!(said.trim(), "the image is current: nothing built");
    assert_eq!(id(&image).as_deref(), Some(first.as_str()));
    build(&[]);
    let second = id(&image).expect("rebuilt");
    assert_ne!(first, second);
    assert_eq!(
        id(&first),
        None,
        "the replaced image is still in the daemon"
    );
    let out = fleetbox(&["image", "build", "--if-outdated", "--with", "six"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
}

/// Logs going to a file or a pipe carry no colour codes; `--log-format json` writes one JSON
/// object per line.
#[test]
fn logs_are_plain_off_a_terminal_and_json_on_request() {
    // The docker backend's client logs every API call at debug.
    let prog = fixture("clean_exit.py");
    let env = [
        ("FLEETBOX_LOG", "debug"),
        ("SANDBOX_TYPE", "docker"),
        ("DOCKER_IMAGE", fleetbox_sandbox::docker::BUILT_IMAGE),
    ];
    let out = fleetbox(&["run", &prog], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().count() > 1, "no log lines: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a piped log: {err}"
    );
    let out = fleetbox(&["--log-format", "json", "run", &prog], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    let logs: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!logs.is_empty(), "no JSON log lines: {err}");
    for l in logs {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
}

/// A `fleetbox run --backend docker` killed with SIGKILL mid-run leaves its container; the next
/// process that opens the docker backend on this host removes it.
#[test]
fn a_sigkilled_runs_container_is_removed_by_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let prog = dir.path().join("sleep.py");
    std::fs::write(&prog, "import time\ntime.sleep(120)\n").unwrap();
    let image = fleetbox_sandbox::docker::BUILT_IMAGE;
    let mut child = Command::new(bin())
        .args([
            "run",
            "--backend",
            "docker",
            "--docker-image",
            image,
            "--timeout",
            "150s",
        ])
        .arg(&prog)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let label = format!(
        "label={}={}",
        fleetbox_sandbox::docker::LABEL_OWNER,
        child.id()
    );
    let ids = |all: bool| -> Vec<String> {
        let mut args = vec!["ps", "-q", "--filter", label.as_str()];
        if all {
            args.push("-a");
        }
        let out = Command::new("docker").args(&args).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ids(false).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the run's container never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    assert!(!ids(true).is_empty(), "nothing was left to sweep");
    let out = fleetbox(
        &[
            "run",
            "--backend",
            "docker",
            "--docker-image",
            image,
            &fixture("clean_exit.py"),
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        ids(true),
        Vec::<String>::new(),
        "the killed run's container is still there"
    );
}

/// A busy port is one warning and an error that says what to do, not a screenful of retries.
#[test]
fn a_busy_port_says_to_choose_another() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let out = fleetbox(
        &[
            "server",
            "--listen",
            &addr,
            "--data",
            data.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("address in use").count(), 1, "{err}");
    assert!(
        err.contains(&format!("could not listen on `{addr}`")),
        "{err}"
    );
    assert!(err.contains("--listen"), "{err}");
}

/// A root supervisor without the capabilities to give a run its own user (a container started
/// with its capabilities dropped) says which ones it lacks, instead of a bare "Operation not
/// permitted".
#[test]
fn a_root_supervisor_without_cap_chown_names_what_it_lacks() {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let setpriv = std::path::Path::new("/usr/bin/setpriv").exists();
    if !root || !setpriv {
        eprintln!("skipping: needs root and setpriv");
        return;
    }
    let program = tempfile::tempdir().unwrap();
    let path = program.path().join("p.py");
    std::fs::write(&path, "print(1)\n").unwrap();
    let out = Command::new("setpriv")
        .arg("--bounding-set=-chown,-fowner,-dac_override")
        .arg(bin())
        .args(["run", "--backend", "process"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("sandbox_error"), "{said}");
    assert!(said.contains("CAP_CHOWN"), "{said}");
}
