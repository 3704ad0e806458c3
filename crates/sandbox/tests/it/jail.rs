//! The escape suite: every attempt to get out of the `jail` backend is contained and reported,
//! and every `process` fixture ends with the same status under `jail`.

use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use fleetbox_proto::{ExecutionReport, Millis, Status};

use crate::support::{self, JAIL, JAIL_ALLOW, JAIL_NO_CGROUP, PROCESS, limits, run, show};

fn escape(name: &str) -> ExecutionReport {
    run(JAIL, &format!("escape/{name}"), limits())
}

fn escape_with_input(name: &str, input: serde_json::Value) -> ExecutionReport {
    let input = serde_json::to_vec(&input).unwrap();
    support::run_code(
        JAIL,
        &support::fixture(&format!("escape/{name}")),
        Some(&input),
        limits(),
    )
}

fn escape_with_limits(name: &str, l: fleetbox_proto::Limits) -> ExecutionReport {
    run(JAIL, &format!("escape/{name}"), l)
}

fn violation(r: &ExecutionReport, syscall: &str) {
    assert_eq!(r.status, Status::SandboxViolation, "{}", show(r));
    assert!(
        r.violations
            .iter()
            .any(|v| v.kind == "syscall" && v.syscall.as_deref() == Some(syscall)),
        "expected a `{syscall}` violation: {:?}",
        r.violations
    );
    assert!(r.message.as_deref().unwrap_or("").contains(syscall));
}

#[test]
fn host_files_are_invisible() {
    let r = escape("read_host_files.py");
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let out = r.output.unwrap();
    assert_eq!(out["shadow"]["error"], "FileNotFoundError");
    assert_eq!(out["root_home"]["error"], "FileNotFoundError");
    assert_eq!(out["home"]["error"], "FileNotFoundError");
    assert_eq!(out["var"]["error"], "FileNotFoundError");
    // The jail's own /etc/passwd, not the host's.
    let users = out["host_etc_passwd_users"]["ok"].as_array().unwrap();
    assert_eq!(users.len(), 3, "{users:?}");
}

#[test]
fn writes_outside_the_workspace_fail() {
    let r = escape("write_outside.py");
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let out = r.output.unwrap();
    for path in [
        "/usr/fleetbox-escape",
        "/etc/fleetbox-escape",
        "/fleetbox-escape",
        "/code/main.py",
    ] {
        assert_eq!(out[path], "OSError", "{path}: {out}");
    }
    assert_ne!(out["/proc/sys/kernel/hostname"], "written");
    assert_eq!(out["/work/inside.txt"], "written");
    assert_eq!(out["/tmp/inside.txt"], "written");
    assert!(!std::path::Path::new("/usr/fleetbox-escape").exists());
    assert!(!std::path::Path::new("/fleetbox-escape").exists());
    assert!(r.files.iter().any(|f| f.path == "inside.txt"));
}

#[test]
fn host_processes_are_invisible() {
    let r = escape("list_processes.py");
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let out = r.output.unwrap();
    let pids: Vec<i64> = out["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap())
        .collect();
    assert_eq!(
        pids,
        [1, 2],
        "only the namespace init and the program: {out}"
    );
    assert_eq!(out["me"], 2);
    assert!(!out.to_string().contains("cargo"), "{out}");
}

#[test]
fn the_program_sees_only_its_own_cgroup() {
    let r = escape("cgroup_view.py");
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let out = r.output.unwrap();
    // The namespace init joins the run's cgroup before it unshares the cgroup namespace, so
    // every hierarchy's path reads `/`: nothing of the host's cgroup tree shows.
    let lines = out["membership"].as_array().unwrap();
    assert!(!lines.is_empty(), "{out}");
    for line in lines {
        let line = line.as_str().unwrap();
        assert!(line.ends_with(":/"), "{line} in {out}");
    }
    // No cgroupfs is mounted in the jail, so there is nothing to move into.
    assert_ne!(out["move"], "moved", "{out}");
}

#[test]
fn killing_init_and_host_pids_fails() {
    let me = std::process::id();
    let r = escape_with_input("kill_pids.py", serde_json::json!({"host_pid": me}));
    assert_eq!(
        r.status,
        Status::Ok,
        "the program survived and finished: {}",
        show(&r)
    );
    let out = r.output.unwrap();
    assert_ne!(out["host"], "sent", "{out}");
    // PID 1 ignores signals from inside its namespace; the run finished normally.
    assert_eq!(r.exit_code, Some(0));
}

#[test]
fn ptrace_is_a_violation() {
    violation(&escape("ptrace.py"), "ptrace");
}

#[test]
fn mount_is_a_violation() {
    let r = escape("mount.py");
    violation(&r, "mount");
    assert!(
        r.stdout.contains("errno 1"),
        "EPERM returned to the program: {}",
        r.stdout
    );
}

#[test]
fn unshare_is_a_violation() {
    violation(&escape("unshare.py"), "unshare");
}

#[test]
fn loading_a_module_is_a_violation() {
    violation(&escape("load_module.py"), "finit_module");
}

#[test]
fn ctypes_forbidden_syscall_is_a_violation() {
    violation(&escape("ctypes_syscall.py"), "keyctl");
}

#[test]
fn raw_and_netlink_sockets_fail() {
    let r = escape("raw_sockets.py");
    violation(&r, "socket");
    let out = r.output.unwrap();
    assert_eq!(out["raw_inet"], "PermissionError", "{out}");
    assert_eq!(out["netlink"], "PermissionError");
    assert_eq!(out["packet"], "PermissionError");
    let labels: Vec<&str> = r.violations.iter().map(|v| v.detail.as_str()).collect();
    assert!(labels.contains(&"socket(AF_NETLINK)"), "{labels:?}");
    assert!(labels.contains(&"socket(AF_PACKET)"), "{labels:?}");
}

#[test]
fn host_loopback_is_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = escape_with_input("connect_host.py", serde_json::json!({"port": port}));
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert_eq!(r.output.unwrap()["connect"], "ConnectionRefusedError");
    std::thread::sleep(Duration::from_millis(50));
    match listener.accept() {
        Ok((mut s, _)) => {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            panic!("the listener saw a connection: {buf:?}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }
}

#[test]
fn filling_tmp_stops_at_its_cap() {
    let mut l = limits();
    l.tmp_size = fleetbox_proto::ByteSize::mib(16);
    let r = run(JAIL, "escape/fill_tmp.py", l.clone());
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let out = r.output.unwrap();
    assert_eq!(out["errno"], libc::ENOSPC, "{out}");
    let written = out["written"].as_u64().unwrap();
    assert!(written <= l.tmp_size.0, "{written}");
    assert!(written >= l.tmp_size.0 / 2, "{written}");
}

#[test]
fn exhausting_descriptors_stops_at_the_limit() {
    let r = escape("exhaust_fds.py");
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let out = r.output.unwrap();
    assert_eq!(out["errno"], libc::EMFILE);
    assert!(out["opened"].as_u64().unwrap() < u64::from(limits().max_open_files));
}

#[test]
fn setuid_root_fails() {
    let r = escape("setuid_root.py");
    assert_eq!(r.status, Status::Error, "{}", show(&r));
    // uid 0 has no mapping in the jail's user namespace: EINVAL, not even EPERM.
    let e = r.exception.unwrap();
    assert!(
        matches!(e.kind.as_str(), "OSError" | "PermissionError"),
        "{e:?}"
    );
    assert!(!r.stdout.contains("became root"));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn non_native_syscall_is_a_violation() {
    // Seen by the supervisor (a seccomp notification), denied, and reported.
    let r = escape("int80.py");
    assert_eq!(r.status, Status::SandboxViolation, "{}", show(&r));
    assert!(
        r.violations.iter().any(|v| v.kind == "non_native_syscall"),
        "{}",
        show(&r)
    );
    assert!(r.stdout.contains("int 0x80 returned -1"), "{}", show(&r));
}

/// Host-global kernel counters (AIO's `fs.aio-max-nr`, inotify instances) cannot be drained,
/// and a `SOCK_PACKET` socket is stopped by the policy (reported), not only by a capability.
#[cfg(target_arch = "x86_64")]
#[test]
fn host_global_counters_and_sock_packet_are_denied_and_reported() {
    let r = escape("host_quotas.py");
    for name in ["io_setup", "inotify_init1"] {
        violation(&r, name);
    }
    assert!(
        r.violations
            .iter()
            .any(|v| v.detail == "socket(AF_INET, SOCK_PACKET)"),
        "{}",
        show(&r)
    );
    let out = r.output.as_ref().unwrap();
    assert_eq!(out["io_setup"]["errno"], libc::EPERM, "{}", show(&r));
    assert_eq!(out["inotify_init1"]["errno"], libc::EPERM, "{}", show(&r));
    assert_eq!(out["sock_packet"], libc::EPERM, "{}", show(&r));
}

/// A flood of denied syscalls is ended after a bounded number: the supervisor's CPU (outside
/// the run's limits) stays bounded too.
#[test]
fn a_flood_of_denied_syscalls_is_ended() {
    let r = escape("denial_flood.py");
    violation(&r, "ptrace");
    let count: u32 = r.violations.iter().map(|v| v.count).sum();
    assert!((1000..1100).contains(&count), "{count}: {}", show(&r));
    assert!(
        r.message
            .as_deref()
            .unwrap()
            .contains("ended after 1000 denied syscalls"),
        "{}",
        show(&r)
    );
    assert!(!r.stdout.contains("flooded"), "{}", show(&r));
}

/// Data queued in loopback TCP connections nobody reads is kernel memory: it is held to the
/// run's memory limit (v1: `memory.kmem.tcp`; v2 charges it to `memory.max`), in the jail and
/// in `process` with a cgroup. Without the cap, 1.1 GB queued under a 64 MiB limit.
#[test]
fn socket_buffers_are_held_to_the_memory_limit() {
    for setup in [JAIL, PROCESS] {
        let mut l = limits();
        l.memory = fleetbox_proto::ByteSize::mib(64);
        let r = run(setup, "escape/socket_memory.py", l);
        match r.status {
            Status::Ok => {
                let queued = r.output.as_ref().unwrap()["queued"].as_u64().unwrap();
                assert!(
                    queued <= 72 << 20,
                    "{setup:?}: {queued} bytes queued: {}",
                    show(&r)
                );
            }
            Status::MemoryLimit => {}
            _ => panic!("{setup:?}: {}", show(&r)),
        }
    }
}

/// The program cannot lower its init's limits, nor stack a seccomp filter of its own that would
/// hide its later forbidden calls from the report; its own limits it may still lower.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_init_and_the_filter_are_out_of_the_programs_reach() {
    let r = escape("init_limits_and_filters.py");
    violation(&r, "prlimit64");
    violation(&r, "seccomp");
    violation(&r, "prctl");
    let out = r.output.as_ref().unwrap();
    assert_eq!(out["init"], libc::EPERM, "{}", show(&r));
    assert_eq!(out["self"], "ok", "{}", show(&r));
    assert_eq!(out["seccomp"], libc::EPERM, "{}", show(&r));
    assert_eq!(out["prctl"], libc::EPERM, "{}", show(&r));
}

#[test]
fn a_program_killing_itself_with_sigsys_claims_no_violation() {
    let r = escape("self_sigsys.py");
    assert_eq!(r.status, Status::Error, "{}", show(&r));
    assert_eq!(r.signal, Some(libc::SIGSYS));
    assert!(r.violations.is_empty(), "{}", show(&r));
}

/// A program whose memory is mostly tmpfs pages: the memory cgroup's OOM killer may pick the
/// jail's init rather than the tiny program. Whatever it hit, the run ends `memory_limit`
/// (never `sandbox_error`, which the coordinator would retry).
#[test]
fn an_oom_kill_is_the_memory_limit_whichever_task_it_hits() {
    let mut l = limits();
    l.memory = fleetbox_proto::ByteSize::mib(64);
    l.tmp_size = fleetbox_proto::ByteSize::mib(512);
    for _ in 0..3 {
        let r = escape_with_limits("fill_tmp_memory.py", l.clone());
        assert_eq!(r.status, Status::MemoryLimit, "{}", show(&r));
    }
}

#[test]
fn double_fork_sleeper_dies_with_the_jail() {
    let mut l = limits();
    l.timeout = Millis(1000);
    // The daemon sleeps far past the run; the run must end when the main program exits.
    let r = run(JAIL, "double_fork.py", l);
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert!(
        r.wall_ms < 1000,
        "did not wait for the daemon: {}",
        r.wall_ms
    );
}

#[test]
fn setsid_sleeper_past_timeout_is_killed_without_cgroup() {
    let code = b"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\ntime.sleep(600)\n";
    let mut l = limits();
    l.timeout = Millis(500);
    let r = support::run_code(JAIL_NO_CGROUP, code, None, l);
    assert_eq!(r.status, Status::Timeout, "{}", show(&r));
    assert!(r.wall_ms < 1500, "{}", r.wall_ms);
}

#[test]
fn isolation_is_reported() {
    let r = run(JAIL, "clean_exit.py", limits());
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert_eq!(r.backend, "jail");
    assert_eq!(r.limits.mechanisms("syscalls"), ["seccomp_deny_list"]);
    assert_eq!(r.limits.mechanisms("network"), ["netns_loopback_only"]);
    let fs = r.limits.mechanisms("filesystem");
    assert!(
        fs.iter().any(|m| m == "pivot_root_readonly_binds"),
        "{fs:?}"
    );
    assert!(
        fs.iter().any(|m| m.starts_with("landlock")),
        "{fs:?} {:?}",
        r.notes
    );
    assert!(
        r.limits
            .mechanisms("memory")
            .iter()
            .any(|m| m.starts_with("cgroup"))
    );
}

#[test]
fn shard_contract_inside_the_jail() {
    let input = br#"{"numbers": [1, 2, 39]}"#;
    let r = support::run_code(
        JAIL,
        &support::fixture("shard_input.py"),
        Some(input),
        limits(),
    );
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert_eq!(r.output.unwrap()["sum"], 42);
    let r = run(JAIL, "host_env.py", limits());
    let env = r.output.unwrap();
    let mut keys: Vec<&str> = env
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["HOME", "LANG", "MPLBACKEND", "PATH", "TMPDIR"]);
    assert_eq!(
        env["HOME"], "/tmp",
        "HOME is outside the collected workspace"
    );
}

/// Every `process` fixture ends the same way under `jail`.
#[test]
fn process_fixtures_match_under_jail() {
    for (name, expected, l) in support::fixture_verdicts() {
        for setup in [PROCESS, JAIL, JAIL_ALLOW] {
            let r = run(setup, name, l.clone());
            assert_eq!(
                r.status,
                expected,
                "{name} under {:?}: {}",
                setup.backend,
                r.message.clone().unwrap_or_default()
            );
        }
    }
}

/// The allow-list policy: the standard library's common ground runs clean under it, every
/// escape the deny list reports is reported the same way, and a call on neither list (here
/// `tuxcall`, a number x86_64 never implemented, which the deny list lets through to the
/// kernel's `ENOSYS`) is denied and reported by its name.
#[test]
fn the_allow_list_runs_the_corpus_clean_and_reports_the_rest_by_name() {
    let stdlib = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../resources/seccomp/corpus/stdlib.py"),
    )
    .unwrap();
    let r = support::run_code(JAIL_ALLOW, &stdlib, None, limits());
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert!(r.violations.is_empty(), "{}", show(&r));
    assert_eq!(r.limits.mechanisms("syscalls"), ["seccomp_allow_list"]);

    for (fixture, syscall) in [
        ("mount.py", "mount"),
        ("ptrace.py", "ptrace"),
        ("unshare.py", "unshare"),
        ("ctypes_syscall.py", "keyctl"),
        ("load_module.py", "finit_module"),
    ] {
        let r = run(JAIL_ALLOW, &format!("escape/{fixture}"), limits());
        violation(&r, syscall);
    }
    let code = b"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(184), ctypes.get_errno())\n";
    let r = support::run_code(JAIL_ALLOW, code, None, limits());
    violation(&r, "tuxcall");
    assert_eq!(
        r.stdout.trim(),
        format!("-1 {}", libc::EPERM),
        "{}",
        show(&r)
    );
    // The deny list lets it through, to the kernel's ENOSYS.
    let r = support::run_code(JAIL, code, None, limits());
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert_eq!(
        r.stdout.trim(),
        format!("-1 {}", libc::ENOSYS),
        "{}",
        show(&r)
    );
}

/// The host's numpy (Debian's `python3-numpy`, installed by the test script) imports and
/// computes the same in the `process` backend, the jail under both seccomp policies, and a
/// warm jail: its BLAS is reached through `/etc/alternatives`, which the jail exposes.
#[test]
fn the_hosts_numpy_works_in_every_backend() {
    let code =
        b"import numpy\nm = numpy.arange(12.0).reshape(3, 4)\nprint(float((m @ m.T).trace()))\n";
    let host = std::process::Command::new("/usr/bin/python3")
        .args(["-c", std::str::from_utf8(code).unwrap()])
        .output()
        .unwrap();
    assert!(
        host.status.success(),
        "the host's python3 cannot import numpy: the test script installs python3-numpy ({})",
        String::from_utf8_lossy(&host.stderr)
    );
    let want = String::from_utf8_lossy(&host.stdout).into_owned();
    let mut limits = support::limits();
    limits.memory = fleetbox_proto::ByteSize(512 << 20);
    for setup in [support::PROCESS, support::JAIL, support::JAIL_ALLOW] {
        let r = support::run_code(setup, code, None, limits.clone());
        assert_eq!(r.status, Status::Ok, "{setup:?}: {}", support::show(&r));
        assert_eq!(r.stdout, want, "{setup:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let warm = fleetbox_sandbox::jail::JailSandbox::new(support::sandbox_config(dir.path(), 1))
        .expect("jail sandbox");
    let req = fleetbox_sandbox::RunRequest::new(code.to_vec(), None, limits.clone());
    // The pool builds jails for the limits it last saw: one run with these first.
    let first = fleetbox_sandbox::Sandbox::run(&warm, &req);
    assert_eq!(first.stdout, want, "{}", support::show(&first));
    assert!(warm.wait_warm(&req.limits, std::time::Duration::from_secs(10)));
    let r = fleetbox_sandbox::Sandbox::run(&warm, &req);
    assert!(
        r.notes.iter().any(|n| n.starts_with("warm start")),
        "{}",
        support::show(&r)
    );
    assert_eq!(r.status, Status::Ok, "warm: {}", support::show(&r));
    assert_eq!(r.stdout, want, "warm");
}

/// Debian's pandas, scipy and matplotlib (installed by the test script) give the same answers
/// in the `process` backend, the jail under both seccomp policies and a warm jail; the plot
/// is a created file, matplotlib's caches are not.
#[test]
fn the_hosts_scientific_stack_works_in_every_backend() {
    let code = br#"import os
import numpy, pandas, scipy.linalg, scipy.optimize
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
df = pandas.DataFrame({"x": range(6), "y": [v * v for v in range(6)]})
print(int(df.y.sum()), df.groupby(df.x % 2).y.sum().tolist())
print(round(float(scipy.linalg.det(numpy.array([[2.0, 1.0], [1.0, 3.0]]))), 6))
print(round(float(scipy.optimize.brentq(lambda t: t * t - 2, 0, 2)), 9))
fig, ax = plt.subplots()
ax.plot(df.x, df.y)
fig.savefig("plot.png")
print(os.path.getsize("plot.png") > 1000)
"#;
    let host = std::process::Command::new("/usr/bin/python3")
        .args(["-c", std::str::from_utf8(code).unwrap()])
        .current_dir(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(
        host.status.success(),
        "the host's python3 cannot run it: the test script installs python3-pandas, python3-scipy and python3-matplotlib ({})",
        String::from_utf8_lossy(&host.stderr)
    );
    let want = String::from_utf8_lossy(&host.stdout).into_owned();
    assert_eq!(want, "55 [20, 35]\n5.0\n1.414213562\nTrue\n");
    let limits = fleetbox_proto::Limits {
        timeout: fleetbox_proto::Millis(60_000),
        cpu_time: fleetbox_proto::Millis(60_000),
        memory: fleetbox_proto::ByteSize::mib(1024),
        ..support::limits()
    };
    let check = |what: &str, r: &fleetbox_proto::ExecutionReport| {
        assert_eq!(r.status, Status::Ok, "{what}: {}", show(r));
        assert_eq!(r.stdout, want, "{what}");
        let files: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(files, ["plot.png"], "{what}");
    };
    for setup in [PROCESS, JAIL, support::JAIL_ALLOW] {
        let r = support::run_code(setup, code, None, limits.clone());
        check(&format!("{setup:?}"), &r);
    }
    let dir = tempfile::tempdir().unwrap();
    let warm = fleetbox_sandbox::jail::JailSandbox::new(support::sandbox_config(dir.path(), 1))
        .expect("jail sandbox");
    let req = fleetbox_sandbox::RunRequest::new(code.to_vec(), None, limits.clone());
    check("first", &fleetbox_sandbox::Sandbox::run(&warm, &req));
    assert!(warm.wait_warm(&req.limits, std::time::Duration::from_secs(10)));
    let r = fleetbox_sandbox::Sandbox::run(&warm, &req);
    assert!(
        r.notes.iter().any(|n| n.starts_with("warm start")),
        "{}",
        show(&r)
    );
    check("warm", &r);
}

/// Caches a program (or a library it uses, like matplotlib's font list) writes under `~` are
/// not files it created: `HOME` is outside the collected workspace, in every backend.
#[test]
fn caches_under_home_are_not_collected_files() {
    let code = b"import pathlib\nc = pathlib.Path.home() / '.cache' / 'tool'\nc.mkdir(parents=True)\n(c / 'fontlist.json').write_text('{}')\nopen('out.txt', 'w').write('x')\n";
    for setup in [PROCESS, JAIL] {
        let r = support::run_code(setup, code, None, limits());
        assert_eq!(r.status, Status::Ok, "{setup:?}: {}", show(&r));
        let files: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(files, ["out.txt"], "{setup:?}");
    }
}

/// Files attached to a run are in its workspace before it starts, in every backend and in a
/// warm jail; unchanged they are not listed as created, changed they are; a name that would
/// leave the workspace is refused before anything runs.
#[test]
fn attached_files_are_in_the_workspace() {
    let code = b"import os\nprint(open('data/a.csv').read(), open('b.txt').read())\nopen('b.txt', 'a').write('!')\nopen('new.txt', 'w').write('n')\n";
    let files = vec![
        ("data/a.csv".to_string(), b"x,y\n1,2".to_vec()),
        ("b.txt".to_string(), b"bee".to_vec()),
    ];
    let check = |what: &str, r: &fleetbox_proto::ExecutionReport| {
        assert_eq!(r.status, Status::Ok, "{what}: {}", show(r));
        assert_eq!(r.stdout, "x,y\n1,2 bee\n", "{what}");
        let listed: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(listed, ["b.txt", "new.txt"], "{what}");
    };
    for setup in [PROCESS, JAIL] {
        let mut req = fleetbox_sandbox::RunRequest::new(code.to_vec(), None, limits());
        req.files = files.clone();
        check(&format!("{setup:?}"), &support::sandbox(setup).run(&req));
    }
    let dir = tempfile::tempdir().unwrap();
    let warm = fleetbox_sandbox::jail::JailSandbox::new(support::sandbox_config(dir.path(), 1))
        .expect("jail sandbox");
    let mut req = fleetbox_sandbox::RunRequest::new(code.to_vec(), None, limits());
    req.files = files.clone();
    fleetbox_sandbox::Sandbox::run(&warm, &req);
    assert!(warm.wait_warm(&req.limits, std::time::Duration::from_secs(10)));
    let r = fleetbox_sandbox::Sandbox::run(&warm, &req);
    assert!(
        r.notes.iter().any(|n| n.starts_with("warm start")),
        "{}",
        show(&r)
    );
    check("warm", &r);
    for bad in [
        "../escape.txt",
        "/etc/passwd",
        "a/../../b",
        "input.json",
        "",
    ] {
        for setup in [PROCESS, JAIL] {
            let mut req = fleetbox_sandbox::RunRequest::new(b"print(1)".to_vec(), None, limits());
            req.files = vec![(bad.to_string(), b"x".to_vec())];
            let r = support::sandbox(setup).run(&req);
            assert_eq!(
                r.status,
                Status::SandboxError,
                "{bad:?} {setup:?}: {}",
                show(&r)
            );
        }
    }
}

/// An interpreter under a directory the jail covers with its own (`/tmp`, the work root) is
/// refused when the sandbox is made, naming why, instead of failing every run with "No such
/// file or directory".
#[test]
fn an_interpreter_the_jail_cannot_see_is_refused_at_start() {
    let root = tempfile::tempdir().unwrap();
    let real = std::fs::canonicalize("/usr/bin/python3").unwrap();
    for hidden in [
        root.path().join("py"),
        std::env::temp_dir().join("fleetbox-hidden-py"),
    ] {
        std::fs::create_dir_all(&hidden).unwrap();
        let python = hidden.join("python3.11");
        let _ = std::fs::remove_file(&python);
        std::fs::copy(&real, &python).unwrap();
        let mut config = crate::support::sandbox_config(root.path(), 0);
        config.python = Some(python.clone());
        let err = match fleetbox_sandbox::jail::JailSandbox::new(config) {
            Ok(_) => panic!("{} was accepted", python.display()),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("which the jail covers"), "{err}");
        assert!(err.contains("FLEETBOX_PYTHON"), "{err}");
        let _ = std::fs::remove_dir_all(&hidden);
    }
}

/// `--cpu-time` holds all of a run's processes together: six children spinning 0.9 s each under
/// a 1 s limit (each below `RLIMIT_CPU`; 4.8 s were used before) end as a timeout near 1 s,
/// read from the cgroup's accounting, in the jail and in `process`.
#[test]
fn the_cpu_time_limit_holds_all_processes_together() {
    for setup in [JAIL, PROCESS] {
        let l = fleetbox_proto::Limits {
            cpu_time: fleetbox_proto::Millis(1000),
            timeout: fleetbox_proto::Millis(20_000),
            cpus: 2.0,
            ..limits()
        };
        let r = run(setup, "escape/cpu_children.py", l);
        assert_eq!(r.status, Status::Timeout, "{setup:?}: {}", show(&r));
        assert!(
            r.message.as_deref().unwrap_or("").contains("together"),
            "{}",
            show(&r)
        );
        let used = r.cpu_user_ms + r.cpu_sys_ms;
        assert!(
            (1000..1400).contains(&used),
            "{setup:?}: {used} ms: {}",
            show(&r)
        );
        assert!(!r.stdout.contains("all children done"), "{}", show(&r));
    }
}
