//! Warm jails: built ahead of the run, with the interpreter started and waiting. A run in one
//! must be indistinguishable to the program (and in its report) from a cold run, and a pool
//! must leave nothing behind.

use std::time::Duration;

use fleetbox_proto::{ExecutionReport, Limits, Status};
use fleetbox_sandbox::jail::JailSandbox;
use fleetbox_sandbox::{RunRequest, Sandbox, SandboxConfig};

use crate::support::{self, bin, fixture, limits, show};

fn sandbox(warm: usize, work_root: &std::path::Path) -> JailSandbox {
    JailSandbox::new(SandboxConfig {
        jail_helper: Some(bin()),
        work_root: work_root.to_path_buf(),
        warm,
        ..SandboxConfig::default()
    })
    .expect("jail sandbox")
}

fn is_warm(r: &ExecutionReport) -> bool {
    r.notes.iter().any(|n| n.starts_with("warm start"))
}

/// Run `req` in a jail the pool has ready (waiting for one first).
fn run_warm(sb: &JailSandbox, req: &RunRequest) -> ExecutionReport {
    assert!(
        sb.wait_warm(&req.limits, Duration::from_secs(10)),
        "no warm jail came"
    );
    let r = sb.run(req);
    assert!(is_warm(&r), "not a warm start: {}", show(&r));
    r
}

fn req(name: &str, limits: Limits) -> RunRequest {
    RunRequest::new(fixture(name), None, limits)
}

#[test]
fn warm_runs_end_as_cold_runs_do() {
    let root = tempfile::tempdir().unwrap();
    // Three: the cases alternate between three sets of limits.
    let warm = sandbox(3, root.path());
    let cold = sandbox(0, root.path());
    let mut cases = support::fixture_verdicts();
    for name in [
        "escape/mount.py",
        "escape/ptrace.py",
        "escape/ctypes_syscall.py",
    ] {
        cases.push((name, Status::SandboxViolation, limits()));
    }
    // The first run with new limits finds nothing built and starts cold; it asks for one.
    let mut primed: Vec<Limits> = Vec::new();
    for (_, _, l) in &cases {
        if !primed.contains(l) {
            let first = warm.run(&req("clean_exit.py", l.clone()));
            assert_eq!(first.status, Status::Ok, "{}", show(&first));
            assert!(!is_warm(&first), "{}", show(&first));
            primed.push(l.clone());
        }
    }
    for (name, expected, l) in &cases {
        let w = run_warm(&warm, &req(name, l.clone()));
        let c = cold.run(&req(name, l.clone()));
        assert_eq!(w.status, *expected, "{name} warm: {}", show(&w));
        assert_eq!(c.status, *expected, "{name} cold: {}", show(&c));
        // What the program wrote, and how it failed, are the same: no frame of the boot script
        // shows in a traceback.
        if matches!(expected, Status::Error | Status::Ok) && *name != "double_fork.py" {
            assert_eq!(w.stderr, c.stderr, "{name}");
            assert_eq!(w.exit_code, c.exit_code, "{name}");
            assert_eq!(w.exception, c.exception, "{name}");
        }
        let syscalls = |r: &ExecutionReport| -> Vec<Option<String>> {
            r.violations.iter().map(|v| v.syscall.clone()).collect()
        };
        assert_eq!(syscalls(&w), syscalls(&c), "{name}");
        // The clock starts when the program arrives, not when the jail was built.
        if *expected == Status::Timeout {
            assert!(w.wall_ms >= 500 && w.wall_ms < 1500, "{}", show(&w));
        }
    }
    drop(warm);
    drop(cold);
    // Every jail, warm ones never used included, is gone with its run directory.
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn the_program_cannot_tell_a_warm_start() {
    let root = tempfile::tempdir().unwrap();
    let warm = sandbox(1, root.path());
    let cold = sandbox(0, root.path());
    let probe = |sb: &JailSandbox, w: bool| {
        let mut r = RunRequest::new(fixture("main_module.py"), Some(b"{}".to_vec()), limits());
        r.env
            .push(("FLEETBOX_SHARD_INDEX".to_string(), "7".to_string()));
        let rep = if w { run_warm(sb, &r) } else { sb.run(&r) };
        assert_eq!(rep.status, Status::Ok, "{}", show(&rep));
        rep.output.unwrap()
    };
    let _ = warm.run(&RunRequest::new(b"pass".to_vec(), None, limits()));
    let w = probe(&warm, true);
    let c = probe(&cold, false);
    assert_eq!(w, c);
    assert_eq!(w["file"], "/code/main.py");
    assert_eq!(w["argv"], serde_json::json!(["/code/main.py"]));
    assert_eq!(w["loader"], "SourceFileLoader");
    assert_eq!(w["stdin"], "");
    assert_eq!(w["env"]["FLEETBOX_SHARD_INDEX"], "7");
    assert_eq!(w["env"]["FLEETBOX_INPUT"], "input.json");
    assert_eq!(w["main_is_this_module"], true);
    assert_eq!(w["fds"], serde_json::json!(["0", "1", "2", "3"]));

    // Each run gets its own input, environment and jail: nothing of one reaches the next.
    for (i, numbers) in [[1, 2, 3], [10, 20, 30], [5, 5, 5]].iter().enumerate() {
        let input = serde_json::to_vec(&serde_json::json!({ "numbers": numbers })).unwrap();
        let mut r = RunRequest::new(fixture("shard_input.py"), Some(input), limits());
        r.env
            .push(("FLEETBOX_SHARD_INDEX".to_string(), i.to_string()));
        let rep = run_warm(&warm, &r);
        assert_eq!(rep.status, Status::Ok, "{}", show(&rep));
        let out = rep.output.unwrap();
        assert_eq!(out["sum"], numbers.iter().sum::<i32>());
        assert_eq!(out["shard"], i.to_string());
    }
    let write = b"open('/work/left.txt', 'w').write('x')\nimport os\nprint(os.listdir('/work'))\n";
    let first = run_warm(&warm, &RunRequest::new(write.to_vec(), None, limits()));
    assert_eq!(first.stdout, "['left.txt']\n", "{}", show(&first));
    let second = run_warm(&warm, &RunRequest::new(write.to_vec(), None, limits()));
    assert_eq!(second.stdout, "['left.txt']\n", "{}", show(&second));
}

#[test]
fn a_run_with_other_limits_starts_cold_and_the_pool_follows() {
    let root = tempfile::tempdir().unwrap();
    let warm = sandbox(1, root.path());
    let pass = |l: Limits| RunRequest::new(b"pass".to_vec(), None, l);
    let small = Limits {
        memory: fleetbox_proto::ByteSize::mib(96),
        ..limits()
    };
    let _ = warm.run(&pass(limits()));
    assert!(warm.wait_warm(&limits(), Duration::from_secs(10)));
    // Other limits: the jail waiting was built for different ones, so this one starts cold.
    let r = warm.run(&pass(small.clone()));
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert!(!is_warm(&r), "{}", show(&r));
    // ... and the next with those limits is warm, with the memory limit it asked for.
    let r = run_warm(
        &warm,
        &RunRequest::new(fixture("memory_bomb.py"), None, small.clone()),
    );
    assert_eq!(r.status, Status::MemoryLimit, "{}", show(&r));
    assert_eq!(r.limits.limits.memory, small.memory);
}

#[test]
fn back_to_back_runs_take_jails_still_starting() {
    // As an agent runs shards: no waiting for the pool, so a run often takes a jail whose
    // interpreter has not said it is ready yet. Every run must still be right.
    let root = tempfile::tempdir().unwrap();
    let warm = sandbox(1, root.path());
    let mut warm_starts = 0;
    for i in 0..50 {
        let mut r = RunRequest::new(
            b"import os\nprint(os.environ['FLEETBOX_SHARD_INDEX'])\n".to_vec(),
            None,
            limits(),
        );
        r.env
            .push(("FLEETBOX_SHARD_INDEX".to_string(), i.to_string()));
        let rep = warm.run(&r);
        assert_eq!(rep.status, Status::Ok, "run {i}: {}", show(&rep));
        assert_eq!(rep.stdout, format!("{i}\n"), "run {i}: {}", show(&rep));
        warm_starts += usize::from(is_warm(&rep));
    }
    assert!(warm_starts >= 35, "{warm_starts} of 50 started warm");
}

#[test]
fn cancel_stops_a_warm_run() {
    let root = tempfile::tempdir().unwrap();
    let warm = sandbox(1, root.path());
    let _ = warm.run(&RunRequest::new(b"pass".to_vec(), None, limits()));
    let mut req = RunRequest::new(
        b"import os, time\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)\n".to_vec(),
        None,
        limits(),
    );
    let cancel = fleetbox_sandbox::Cancel::new().unwrap();
    req.cancel = Some(cancel.clone());
    let trigger = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.cancel("job cancelled");
    });
    let started = std::time::Instant::now();
    let r = run_warm(&warm, &req);
    trigger.join().unwrap();
    assert_eq!(r.status, Status::Killed, "{}", show(&r));
    assert_eq!(r.message.as_deref(), Some("cancelled: job cancelled"));
    assert!(started.elapsed() < Duration::from_secs(3), "{}", show(&r));
}

/// The hardening fixtures give the same verdicts in a warm jail as in a cold one: host-global
/// counters and a denial flood, the init's limits and a filter of the program's own, a fake
/// SIGSYS death.
#[cfg(target_arch = "x86_64")]
#[test]
fn hardening_fixtures_end_the_same_in_warm_jails() {
    let root = tempfile::tempdir().unwrap();
    let warm = sandbox(1, root.path());
    let cases: [(&str, Status, &[&str]); 4] = [
        (
            "escape/host_quotas.py",
            Status::SandboxViolation,
            &["io_setup", "inotify_init1"],
        ),
        (
            "escape/denial_flood.py",
            Status::SandboxViolation,
            &["ptrace"],
        ),
        (
            "escape/init_limits_and_filters.py",
            Status::SandboxViolation,
            &["prlimit64", "seccomp", "prctl"],
        ),
        ("escape/self_sigsys.py", Status::Error, &[]),
    ];
    // The first run is cold and shows the pool the limits.
    let _ = warm.run(&req("clean_exit.py", limits()));
    for (name, status, syscalls) in cases {
        let r = run_warm(&warm, &req(name, limits()));
        assert_eq!(r.status, status, "{name}: {}", show(&r));
        for s in syscalls {
            assert!(
                r.violations
                    .iter()
                    .any(|v| v.syscall.as_deref() == Some(*s)),
                "{name}: no `{s}` violation: {}",
                show(&r)
            );
        }
        if syscalls.is_empty() {
            assert!(r.violations.is_empty(), "{name}: {}", show(&r));
        }
    }
}
