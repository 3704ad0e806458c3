//! The `process` backend against every fixture, with and without cgroups.

use fleetbox_proto::{ByteSize, Millis, Status};

use crate::support::{self, PROCESS, PROCESS_NO_CGROUP, Setup, limits, run, show};

fn clean_exit(setup: Setup) {
    let r = run(setup, "clean_exit.py", limits());
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(r.output_source.as_deref(), Some("stdout_json"));
    assert_eq!(r.output.as_ref().unwrap()["answer"], 42);
    assert!(r.wall_ms < 2000, "{}", r.wall_ms);
    assert!(r.peak_memory_bytes > 1 << 20, "{}", r.peak_memory_bytes);
    assert!(r.peak_memory_bytes < 128 << 20, "{}", r.peak_memory_bytes);
    assert_eq!(r.stdout_bytes as usize, r.stdout.len());
    assert_eq!(r.code_sha256.len(), 64);
    assert!(r.exception.is_none());
    assert!(r.files.is_empty(), "{:?}", r.files);
    assert_eq!(r.backend, setup.backend.as_str());
    assert!(!r.runner.python.is_empty());
}

#[test]
fn clean_exit_is_ok() {
    clean_exit(PROCESS);
    clean_exit(PROCESS_NO_CGROUP);
}

#[test]
fn exception_is_parsed() {
    let r = run(PROCESS, "exception.py", limits());
    assert_eq!(r.status, Status::Error, "{}", show(&r));
    assert_eq!(r.exit_code, Some(1));
    let e = r.exception.expect("exception parsed");
    assert_eq!(e.kind, "ValueError");
    assert!(e.message.contains("not a number"), "{}", e.message);
    let functions: Vec<&str> = e.traceback.iter().map(|f| f.function.as_str()).collect();
    assert_eq!(functions, ["<module>", "main", "parse"]);
    assert_eq!(e.traceback[2].line, 2);
    assert_eq!(e.traceback[2].source.as_deref(), Some("return int(value)"));
}

#[test]
fn syntax_error_is_parsed() {
    let r = run(PROCESS, "syntax_error.py", limits());
    assert_eq!(r.status, Status::Error);
    assert_eq!(r.exception.unwrap().kind, "SyntaxError");
}

#[test]
fn nonzero_exit_is_error() {
    let r = run(PROCESS, "nonzero_exit.py", limits());
    assert_eq!(r.status, Status::Error, "{}", show(&r));
    assert_eq!(r.exit_code, Some(3));
    assert!(r.exception.is_none());
    assert_eq!(r.stdout, "partial work\n");
}

fn sleep_past_timeout(setup: Setup) {
    let mut l = limits();
    l.timeout = Millis(500);
    let r = run(setup, "sleep_past_timeout.py", l);
    assert_eq!(r.status, Status::Timeout, "{}", show(&r));
    assert_eq!(r.signal, Some(libc::SIGKILL));
    assert!(r.wall_ms >= 500, "{}", r.wall_ms);
    // Overshoot is benchmarked in bench/; here only plausibility under parallel test load.
    assert!(r.wall_ms < 1500, "{}", r.wall_ms);
    assert!(r.cpu_user_ms < 400, "{}", r.cpu_user_ms);
}

#[test]
fn sleep_past_timeout_is_timeout() {
    sleep_past_timeout(PROCESS);
    sleep_past_timeout(PROCESS_NO_CGROUP);
}

#[test]
fn busy_loop_hits_cpu_limit() {
    let mut l = limits();
    l.cpu_time = Millis(1000);
    l.timeout = Millis(20_000);
    let r = run(PROCESS, "busy_loop.py", l);
    assert_eq!(r.status, Status::Timeout, "{}", show(&r));
    assert_eq!(r.signal, Some(libc::SIGXCPU));
    assert!(r.message.unwrap().contains("CPU time"));
    let cpu = r.cpu_user_ms + r.cpu_sys_ms;
    assert!((900..2500).contains(&cpu), "cpu {cpu}");
    assert!(r.wall_ms < 15_000, "{}", r.wall_ms);
}

fn memory_bomb(setup: Setup) {
    let r = run(setup, "memory_bomb.py", limits());
    assert_eq!(r.status, Status::MemoryLimit, "{}", show(&r));
    assert!(r.peak_memory_bytes > 64 << 20, "{}", r.peak_memory_bytes);
    // The cgroup or RLIMIT_AS stops it near the limit, not far beyond.
    assert!(r.peak_memory_bytes <= 160 << 20, "{}", r.peak_memory_bytes);
}

#[test]
fn memory_bomb_is_memory_limit() {
    memory_bomb(PROCESS);
    memory_bomb(PROCESS_NO_CGROUP);
}

#[test]
fn fork_bomb_is_contained() {
    let r = run(PROCESS, "fork_bomb.py", limits());
    assert_eq!(r.status, Status::Error, "{}", show(&r));
    assert_eq!(r.exception.as_ref().unwrap().kind, "BlockingIOError");
    assert!(
        r.violations.iter().any(|v| v.kind == "pids_limit"),
        "{:?}",
        r.violations
    );
    assert!(r.wall_ms < 4000);
}

#[test]
fn fork_bomb_without_cgroup_is_contained() {
    let r = run(PROCESS_NO_CGROUP, "fork_bomb.py", limits());
    assert_eq!(r.status, Status::Error, "{}", show(&r));
    assert_eq!(r.exception.as_ref().unwrap().kind, "BlockingIOError");
}

#[test]
fn classic_fork_bomb_times_out_and_dies() {
    let mut l = limits();
    l.timeout = Millis(1500);
    let r = run(PROCESS, "fork_bomb_classic.py", l);
    assert_eq!(r.status, Status::Timeout, "{}", show(&r));
    assert!(r.violations.iter().any(|v| v.kind == "pids_limit"));
    assert!(r.wall_ms < 3000, "{}", r.wall_ms);
}

#[test]
fn output_flood_is_output_limit() {
    let r = run(PROCESS, "output_flood.py", limits());
    assert_eq!(
        r.status,
        Status::OutputLimit,
        "{}",
        r.message.clone().unwrap_or_default()
    );
    assert!(r.stdout_truncated);
    assert_eq!(r.stdout.len(), 64 * 1024);
    assert!(r.stdout_bytes > 64 * 1024);
    assert_eq!(
        r.stdout_sha256,
        fleetbox_sandbox::workspace::sha256_hex(&vec![b'y'; 64 * 1024])
    );
    assert!(
        r.wall_ms < 2000,
        "stopped early, not after 100 MB: {}",
        r.wall_ms
    );
}

#[test]
fn output_flood_can_continue_past_cap() {
    let mut l = limits();
    l.continue_past_output_limit = true;
    let r = run(PROCESS, "output_flood.py", l);
    assert_eq!(
        r.status,
        Status::Ok,
        "{}",
        r.message.clone().unwrap_or_default()
    );
    assert!(r.stdout_truncated);
    assert_eq!(r.stdout_bytes, 100 << 20, "true byte count");
    assert_eq!(r.stdout.len(), 64 * 1024);
    assert!(
        r.output.is_none(),
        "truncated stdout is not parsed as output"
    );
}

fn double_fork(setup: Setup) {
    let r = run(setup, "double_fork.py", limits());
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let pid: i32 = r.stdout.trim().parse().expect("daemon pid on stdout");
    // Killed by the time the report exists; allow its new parent a moment to reap it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !support::process_gone(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(support::process_gone(pid), "daemon {pid} survived the run");
    assert!(
        r.wall_ms < 2000,
        "the run did not wait for the daemon: {}",
        r.wall_ms
    );
}

#[test]
fn double_fork_daemon_dies_with_cgroup() {
    double_fork(PROCESS);
}

#[test]
fn double_fork_daemon_dies_without_cgroup() {
    double_fork(PROCESS_NO_CGROUP);
}

#[test]
fn big_file_hits_file_size_limit() {
    let r = run(PROCESS, "big_file.py", limits());
    assert_eq!(r.status, Status::OutputLimit, "{}", show(&r));
    assert!(r.violations.iter().any(|v| v.kind == "file_size_limit"));
    let f = r
        .files
        .iter()
        .find(|f| f.path == "big.bin")
        .expect("listed");
    assert_eq!(f.bytes, 64 << 20);
}

#[test]
fn host_environment_does_not_leak() {
    // The test process has plenty of variables (CARGO_*, HOME, PATH...); none may reach the program.
    let r = run(PROCESS, "host_env.py", limits());
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let env = r.output.unwrap();
    let mut keys: Vec<&str> = env
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["HOME", "LANG", "MPLBACKEND", "PATH", "TMPDIR"]);
    assert!(!env["HOME"].as_str().unwrap().starts_with("/root"));
    assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")));
}

#[test]
fn created_files_are_listed_and_output_json_wins() {
    let r = run(PROCESS, "files_created.py", limits());
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let paths: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["a.txt", "output.json", "sub/dir/b.bin"]);
    let a = &r.files[0];
    assert_eq!(a.bytes, 6);
    assert_eq!(
        a.sha256.as_deref(),
        Some(fleetbox_sandbox::workspace::sha256_hex(b"hello\n").as_str())
    );
    assert_eq!(r.files[2].bytes, 256);
    assert_eq!(r.output_source.as_deref(), Some("file"));
    assert_eq!(r.output.unwrap()["written"], 2);
}

#[test]
fn file_listing_is_capped() {
    let code = b"for i in range(50):\n    open(f'f{i:02}.txt', 'w').write('x')\n";
    let mut l = limits();
    l.max_listed_files = 10;
    let r = support::run_code(PROCESS, code, None, l);
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.files.len(), 10);
    assert!(r.files_truncated);
}

#[test]
fn a_signal_the_program_sends_itself_is_an_error_not_a_kill() {
    let r = run(PROCESS, "killed.py", limits());
    assert_eq!(r.status, Status::Error, "{}", show(&r));
    assert!(
        r.message
            .as_deref()
            .unwrap()
            .contains("not sent by the sandbox"),
        "{}",
        show(&r)
    );
    assert_eq!(r.signal, Some(libc::SIGTERM));
    assert_eq!(r.signal_name.as_deref(), Some("SIGTERM"));
}

#[test]
fn shard_input_is_delivered() {
    let input = br#"{"numbers": [1, 2, 3, 4]}"#;
    let r = support::run_code(
        PROCESS,
        &support::fixture("shard_input.py"),
        Some(input),
        limits(),
    );
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert_eq!(r.output.unwrap()["sum"], 10);
    assert_eq!(
        r.input_sha256.as_deref(),
        Some(fleetbox_sandbox::workspace::sha256_hex(input).as_str())
    );
    assert!(r.files.is_empty(), "input.json is ours, not a created file");
}

#[test]
fn missing_python_is_sandbox_error() {
    let sandbox = fleetbox_sandbox::open(
        fleetbox_sandbox::Backend::Process,
        fleetbox_sandbox::SandboxConfig {
            python: Some("/nonexistent/python3".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let r = sandbox.run(&fleetbox_sandbox::RunRequest::new(
        b"pass".to_vec(),
        None,
        limits(),
    ));
    assert_eq!(r.status, Status::SandboxError);
    assert!(r.message.unwrap().contains("apt-get install python3"));
}

#[test]
fn limits_are_reported_as_applied() {
    let mut l = limits();
    l.memory = ByteSize::mib(100);
    let r = support::run_code(PROCESS, b"pass", None, l);
    assert_eq!(r.limits.limits.memory, ByteSize::mib(100));
    let mem = r.limits.mechanisms("memory");
    assert!(mem.iter().any(|m| m == "rlimit_as"), "{mem:?}");
    let r = support::run_code(PROCESS_NO_CGROUP, b"pass", None, limits());
    assert_eq!(r.limits.mechanisms("max_processes"), ["rlimit_nproc"]);
    assert!(
        r.notes.iter().any(|n| n.contains("no cgroup")),
        "{:?}",
        r.notes
    );
}

/// Names that are not UTF-8 are listed distinctly (escaped), with their own hashes.
#[test]
fn file_names_that_are_not_utf8_stay_distinct() {
    for setup in [PROCESS, crate::support::JAIL] {
        let r = run(setup, "escape/non_utf8_names.py", limits());
        assert_eq!(r.status, Status::Ok, "{}", show(&r));
        let mut paths: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        paths.sort();
        assert_eq!(paths, ["a\\xfe", "a\\xff", "back\\\\slash"], "{setup:?}");
        assert_ne!(r.files[0].sha256, r.files[1].sha256);
    }
}
