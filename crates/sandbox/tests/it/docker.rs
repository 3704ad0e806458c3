//! The `docker` backend against a real dockerd, with runc and with gVisor's `runsc`: every
//! `process` fixture ends the same way, the escapes fail, the daemon's absence is a clear
//! `sandbox_error`, and no container is left behind.

use std::collections::HashMap;
use std::io::Read;
use std::net::TcpListener;
use std::time::Duration;

use fleetbox_proto::{Millis, Status};
use fleetbox_sandbox::docker::{self, DockerConfig, DockerSandbox};
use fleetbox_sandbox::{Cancel, RunRequest, Sandbox, SandboxConfig};

use crate::support::{self, docker_config, docker_image, fixture, limits, show};

const RUNSC: Option<&str> = Some("runsc");

fn run_in(
    runtime: Option<&str>,
    name: &str,
    l: fleetbox_proto::Limits,
) -> fleetbox_proto::ExecutionReport {
    let sb = DockerSandbox::new(docker_config(runtime, 0)).unwrap();
    sb.run(&RunRequest::new(fixture(name), None, l))
}

/// Containers of this test process still on the daemon.
fn ours_left() -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let d = docker::connect(None).await.unwrap();
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}={}", docker::LABEL_OWNER, std::process::id())],
        )]);
        d.list_containers(Some(
            bollard::query_parameters::ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
    })
}

fn fixtures_match(runtime: Option<&str>) {
    for (name, expected, l) in support::fixture_verdicts() {
        let r = run_in(runtime, name, l);
        assert!(
            r.status == expected,
            "{name} under docker ({runtime:?}) ended {:?}, expected {expected:?}: {}",
            r.status,
            show(&r)
        );
        assert_eq!(r.backend, "docker");
        assert_eq!(r.runtime.as_deref(), Some(runtime.unwrap_or("runc")));
    }
    assert_eq!(ours_left(), Vec::<String>::new(), "containers left behind");
}

/// Every `process` fixture ends the same way under `docker`.
#[test]
fn process_fixtures_match_under_docker() {
    fixtures_match(None);
}

/// ... and under `docker` with gVisor.
#[test]
fn process_fixtures_match_under_docker_with_gvisor() {
    fixtures_match(RUNSC);
}

#[test]
fn a_clean_run_reports_like_the_other_backends() {
    let sb = DockerSandbox::new(docker_config(None, 0)).unwrap();
    let input = br#"{"numbers": [1, 2, 3]}"#.to_vec();
    let r = sb.run(&RunRequest::new(
        fixture("shard_input.py"),
        Some(input.clone()),
        limits(),
    ));
    let jail = support::run_code(
        support::JAIL,
        &fixture("shard_input.py"),
        Some(&input),
        limits(),
    );
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    assert_eq!(r.output, jail.output, "{}", show(&r));
    assert_eq!(r.output_sha256, jail.output_sha256);
    assert_eq!(r.stdout, jail.stdout);
    assert_eq!(r.runner.python, "3.11");
    assert!(
        r.cpu_user_ms + r.cpu_sys_ms > 0,
        "cpu not measured: {}",
        show(&r)
    );
    assert!(
        r.peak_memory_bytes > 1 << 20,
        "memory not measured: {}",
        show(&r)
    );
}

#[test]
fn the_environment_does_not_leak_in() {
    for runtime in [None, RUNSC] {
        let r = run_in(runtime, "host_env.py", limits());
        assert_eq!(r.status, Status::Ok, "{}", show(&r));
        let env = r.output.unwrap();
        let mut keys: Vec<&String> = env.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["HOME", "LANG", "MPLBACKEND", "PATH", "TMPDIR"],
            "{runtime:?}"
        );
        assert_eq!(env["HOME"], "/tmp");
    }
}

#[test]
fn writes_outside_the_workspace_fail() {
    for runtime in [None, RUNSC] {
        let r = run_in(runtime, "escape/write_outside.py", limits());
        assert_eq!(r.status, Status::Ok, "{}", show(&r));
        let out = r.output.clone().unwrap();
        for (path, what) in out.as_object().unwrap() {
            let expected_written = path == "/work/inside.txt" || path == "/tmp/inside.txt";
            assert_eq!(
                what == "written",
                expected_written,
                "{path}: {what} under {runtime:?}"
            );
        }
        assert_eq!(r.files.len(), 1, "{}", show(&r));
        assert_eq!(r.files[0].path, "inside.txt");
    }
}

#[test]
fn the_host_network_is_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    for runtime in [None, RUNSC] {
        let sb = DockerSandbox::new(docker_config(runtime, 0)).unwrap();
        let input = serde_json::to_vec(&serde_json::json!({"port": port})).unwrap();
        let r = sb.run(&RunRequest::new(
            fixture("escape/connect_host.py"),
            Some(input),
            limits(),
        ));
        assert_eq!(r.status, Status::Ok, "{}", show(&r));
        let got = r.output.unwrap()["connect"].clone();
        assert_ne!(got, "connected", "{runtime:?}");
    }
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
fn a_double_fork_sleeper_leaves_no_container() {
    for runtime in [None, RUNSC] {
        let mut l = limits();
        l.timeout = Millis(3000);
        let r = run_in(runtime, "double_fork.py", l);
        assert_eq!(r.status, Status::Ok, "{}", show(&r));
        assert!(r.wall_ms < 2000, "waited for the daemon: {}", r.wall_ms);
    }
    assert_eq!(ours_left(), Vec::<String>::new());
}

#[test]
fn a_warm_container_runs_the_program_as_a_cold_one_does() {
    let sb = DockerSandbox::new(docker_config(None, 1)).unwrap();
    let req = RunRequest::new(
        fixture("shard_input.py"),
        Some(br#"{"numbers": [5, 6]}"#.to_vec()),
        limits(),
    );
    let cold = sb.run(&req);
    assert!(
        sb.wait_warm(&req, Duration::from_secs(20)),
        "no warm container came"
    );
    let warm = sb.run(&req);
    assert!(
        warm.notes.iter().any(|n| n.starts_with("warm start")),
        "{}",
        show(&warm)
    );
    assert_eq!(warm.status, Status::Ok, "{}", show(&warm));
    assert_eq!(warm.output, cold.output);
    assert_eq!(warm.files, cold.files);
    // Each warm container serves one run: the next program sees none of this one's files.
    let mut write = RunRequest::new(b"open('left.txt', 'w').write('x')".to_vec(), None, limits());
    write.limits = req.limits.clone();
    assert!(sb.wait_warm(&write, Duration::from_secs(20)));
    assert_eq!(sb.run(&write).status, Status::Ok);
    let look = RunRequest::new(
        b"import os; print(sorted(os.listdir('.')))".to_vec(),
        None,
        req.limits.clone(),
    );
    assert!(sb.wait_warm(&look, Duration::from_secs(20)));
    let r = sb.run(&look);
    assert_eq!(r.stdout.trim(), "[]", "{}", show(&r));
    drop(sb);
    assert_eq!(
        ours_left(),
        Vec::<String>::new(),
        "warm containers left behind"
    );
}

#[test]
fn a_cancelled_run_is_killed_and_removed() {
    let sb = DockerSandbox::new(docker_config(None, 0)).unwrap();
    let cancel = Cancel::new().unwrap();
    let mut req = RunRequest::new(b"import time; time.sleep(30)".to_vec(), None, limits());
    req.cancel = Some(cancel.clone());
    let c = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        c.cancel("job cancelled");
    });
    let r = sb.run(&req);
    t.join().unwrap();
    assert_eq!(r.status, Status::Killed, "{}", show(&r));
    assert!(r.message.unwrap().contains("job cancelled"));
    // Removal goes on in the background; dropping the sandbox waits for it.
    drop(sb);
    assert_eq!(ours_left(), Vec::<String>::new());
}

#[test]
fn no_daemon_is_a_sandbox_error_that_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // A socket nobody listens on any more, and no socket at all.
    let dead = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    for host in [dead.clone(), dir.path().join("absent.sock")] {
        let sb = DockerSandbox::new(SandboxConfig {
            docker: DockerConfig {
                image: docker_image(),
                runtime: None,
                host: Some(format!("unix://{}", host.display())),
            },
            ..SandboxConfig::default()
        })
        .unwrap();
        let r = sb.run(&RunRequest::new(b"print(1)".to_vec(), None, limits()));
        assert_eq!(r.status, Status::SandboxError, "{}", show(&r));
        let msg = r.message.unwrap();
        assert!(msg.contains("Docker daemon not available"), "{msg}");
        assert!(msg.contains("dockerd"), "{msg}");
    }
}

#[test]
fn a_missing_image_is_a_sandbox_error_naming_the_fix() {
    let sb = DockerSandbox::new(SandboxConfig {
        docker: DockerConfig {
            image: "fleetbox-no-such-image:0".into(),
            ..DockerConfig::default()
        },
        ..SandboxConfig::default()
    })
    .unwrap();
    let r = sb.run(&RunRequest::new(b"print(1)".to_vec(), None, limits()));
    assert_eq!(r.status, Status::SandboxError, "{}", show(&r));
    let msg = r.message.unwrap();
    assert!(msg.contains("fleetbox-no-such-image:0"), "{msg}");
    assert!(msg.contains("fleetbox image build"), "{msg}");
}

/// A container whose owner was SIGKILLed is removed when a sandbox next starts on the host.
#[test]
fn containers_of_a_killed_owner_are_swept_at_start() {
    let image = docker_image();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = rt.block_on(async {
        let d = docker::connect(None).await.unwrap();
        let body = bollard::models::ContainerCreateBody {
            image: Some(image),
            cmd: Some(vec![
                "python3".into(),
                "-c".into(),
                "import time; time.sleep(600)".into(),
            ]),
            labels: Some(HashMap::from([
                (docker::LABEL_OWNER.to_string(), dead_pid.to_string()),
                (docker::LABEL_HOST.to_string(), hostname()),
            ])),
            host_config: Some(bollard::models::HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = d.create_container(None, body).await.unwrap().id;
        d.start_container(&id, None).await.unwrap();
        id
    });
    let _sb = DockerSandbox::new(docker_config(None, 0)).unwrap();
    // Another test process starting at the same time may be the one removing it: give the
    // daemon a moment to finish.
    let gone = rt.block_on(async {
        let d = docker::connect(None).await.unwrap();
        for _ in 0..50 {
            if d.inspect_container(&id, None).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(gone, "the dead owner's container {id} is still there");
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Containers log nothing on the host (the daemon's default json-file driver wrote all program
/// output to its disk, outside every quota); the output still arrives, through the attach
/// stream, capped by Fleetbox.
#[test]
fn containers_write_no_log_on_the_host() {
    let sb = DockerSandbox::new(docker_config(None, 1)).unwrap();
    let req = RunRequest::new(
        b"import sys\nfor _ in range(20000): sys.stdout.write('x\\n')\n".to_vec(),
        None,
        limits(),
    );
    let r = sb.run(&req);
    assert_eq!(r.status, fleetbox_proto::Status::Ok, "{}", show(&r));
    assert_eq!(r.stdout_bytes, 40_000, "{}", show(&r));
    assert!(
        sb.wait_warm(&req, Duration::from_secs(20)),
        "no warm container came"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The warm container, and any run's container still being removed (which may vanish
    // between the listing and the inspection).
    let mut inspected = 0;
    for id in ours_left() {
        let Ok(log) = rt.block_on(async {
            let d = docker::connect(None).await.unwrap();
            d.inspect_container(&id, None).await
        }) else {
            continue;
        };
        inspected += 1;
        let host = log.host_config.unwrap();
        assert_eq!(
            host.log_config.and_then(|l| l.typ).as_deref(),
            Some("none"),
            "container {id}"
        );
        assert!(
            log.log_path.unwrap_or_default().is_empty(),
            "container {id}"
        );
    }
    assert!(inspected > 0, "no container of this test to inspect");
}

/// Kernel interfaces the threat model names (vsock sockets, io_uring, Linux AIO, `modify_ldt`,
/// ptrace, the i386 `int 0x80` ABI, ...) are refused in containers by Fleetbox's own seccomp
/// profile, under runc and inside gVisor (Docker 20.10's default profile let the first six
/// through; `resources/seccomp/docker.json`).
#[test]
fn kernel_interfaces_the_threat_model_names_are_refused_in_containers() {
    for runtime in [None, RUNSC] {
        let r = run_in(runtime, "escape/kernel_surface.py", limits());
        assert_eq!(r.status, Status::Ok, "{runtime:?}: {}", show(&r));
        let out = r.output.as_ref().unwrap().as_object().unwrap();
        assert!(out.len() >= 15, "{}", show(&r));
        let through: Vec<&String> = out
            .iter()
            .filter(|(_, v)| *v == "ok")
            .map(|(k, _)| k)
            .collect();
        assert!(
            through.is_empty(),
            "{runtime:?}: {through:?} got through: {}",
            show(&r)
        );
        assert!(
            r.limits
                .mechanisms("syscalls")
                .contains(&"docker_seccomp_allow_list".to_string()),
            "{}",
            show(&r)
        );
    }
}

/// When the OOM killer takes children and the main process lives on, the run hit its memory
/// limit all the same (the container's cgroup counts the kills), as in the jail.
#[test]
fn children_killed_by_the_oom_killer_are_a_memory_limit() {
    let mut l = limits();
    l.memory = fleetbox_proto::ByteSize::mib(128);
    let r = run_in(None, "escape/oom_children.py", l.clone());
    assert_eq!(r.status, Status::MemoryLimit, "{}", show(&r));
    let jail = support::run(support::JAIL, "escape/oom_children.py", l);
    assert_eq!(jail.status, Status::MemoryLimit, "{}", show(&jail));
}

/// A fork bomb under runc stops at the container's pids limit, and the report says so.
#[test]
fn the_pids_limit_is_reported_under_runc() {
    let r = run_in(None, "fork_bomb.py", limits());
    assert!(
        r.violations.iter().any(|v| v.kind == "pids_limit"),
        "{}",
        show(&r)
    );
    assert_eq!(r.limits.mechanisms("max_processes"), ["docker_pids_limit"]);
}

/// Loopback TCP data nobody reads is held to the memory limit under runc on cgroup v1 too
/// (Docker sets no TCP memory limit there; ~400 MiB were queued under 64 MiB).
#[test]
fn socket_buffers_are_held_to_the_memory_limit_in_containers() {
    let mut l = limits();
    l.memory = fleetbox_proto::ByteSize::mib(64);
    let r = run_in(None, "escape/socket_memory.py", l);
    match r.status {
        Status::Ok => {
            let queued = r.output.as_ref().unwrap()["queued"].as_u64().unwrap();
            assert!(queued <= 72 << 20, "{queued} bytes queued: {}", show(&r));
        }
        Status::MemoryLimit => {}
        _ => panic!("{}", show(&r)),
    }
}

/// The CPU time limit holds all of a container's processes together (RLIMIT_CPU holds each
/// alone): six children spinning 0.9 s each under 1 s end as a timeout near 1 s.
#[test]
fn the_cpu_time_limit_holds_all_processes_together_in_containers() {
    let l = fleetbox_proto::Limits {
        cpu_time: Millis(1000),
        timeout: Millis(20_000),
        cpus: 2.0,
        ..limits()
    };
    let r = run_in(None, "escape/cpu_children.py", l);
    assert_eq!(r.status, Status::Timeout, "{}", show(&r));
    assert!(
        r.message.as_deref().unwrap_or("").contains("together"),
        "{}",
        show(&r)
    );
    let used = r.cpu_user_ms + r.cpu_sys_ms;
    assert!((1000..1400).contains(&used), "{used} ms: {}", show(&r));
}

/// The process supervising the program inside the container (its PID 1, the boot script) can
/// neither be read nor killed by the program, and it reaps the orphans the program leaves: 300
/// orphans under a limit of 64 processes all come and go. docker-init ran as the program's uid
/// and was dumpable. gVisor lets a process SIGKILL its own PID 1 (Linux does not): that ends the
/// container, the program's own undoing, and the report falls back to the daemon's status, so
/// under runsc the program does not try.
#[test]
fn the_containers_init_is_out_of_the_programs_reach() {
    // gVisor's forks are slow (ptrace platform): fewer orphans, still past the limit of 64.
    let cases = [
        (None, r#"{"kill": true, "orphans": 300}"#, 300),
        (RUNSC, r#"{"kill": false, "orphans": 120}"#, 120),
    ];
    for (runtime, input, orphans) in cases {
        let sb = DockerSandbox::new(support::docker_config(runtime, 0)).unwrap();
        let l = fleetbox_proto::Limits {
            timeout: Millis(30_000),
            cpu_time: Millis(30_000),
            ..limits()
        };
        let r = sb.run(&RunRequest::new(
            fixture("escape/container_init.py"),
            Some(input.as_bytes().to_vec()),
            l,
        ));
        assert_eq!(r.status, Status::Ok, "{runtime:?}: {}", show(&r));
        let out = r.output.as_ref().unwrap();
        assert_ne!(out["read_init_memory"], "ok", "{runtime:?}: {}", show(&r));
        assert_eq!(out["orphans"], orphans, "{runtime:?}: {}", show(&r));
        assert_eq!(r.exit_code, Some(0));
    }
}
