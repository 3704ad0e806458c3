//! Sessions: one interpreter kept across calls, in the process backend and in the jail. Names
//! survive calls; a call past its limit is interrupted and the session lives on; a call that
//! will not stop ends it; memory is capped across calls; output is capped per call; nothing is
//! left behind.

use std::time::Duration;

use fleetbox_proto::{ByteSize, ExecutionReport, SessionOutcome, Status};
use fleetbox_sandbox::RunRequest;
use fleetbox_sandbox::session::Session;

use crate::support::{JAIL, PROCESS, Setup, limits, process_gone, sandbox, show};

const SETUPS: [Setup; 2] = [PROCESS, JAIL];

fn open(setup: Setup, memory: ByteSize) -> Session {
    let mut l = limits();
    l.memory = memory;
    sandbox(setup)
        .open_session(
            RunRequest::new(Vec::new(), Some(br#"{"index": 0}"#.to_vec()), l),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{setup:?}: {e}"))
}

fn call(s: &mut Session, code: &str, timeout_ms: u64) -> ExecutionReport {
    s.call(code.as_bytes(), Duration::from_millis(timeout_ms))
}

fn outcome(r: &ExecutionReport) -> SessionOutcome {
    r.session.as_ref().expect("a session call says so").outcome
}

#[test]
fn names_survive_calls_and_each_call_has_its_own_report() {
    for setup in SETUPS {
        let mut s = open(setup, ByteSize::mib(256));
        let r = call(&mut s, "x = 41", 5000);
        assert_eq!(r.status, Status::Ok, "{setup:?}: {}", show(&r));
        assert_eq!(outcome(&r), SessionOutcome::Kept);
        // The session's input is no call's file.
        assert!(r.files.is_empty(), "{setup:?}: {}", show(&r));
        let r = call(&mut s, "print(x + 1)", 5000);
        assert_eq!(r.status, Status::Ok, "{setup:?}: {}", show(&r));
        assert_eq!(r.stdout, "42\n");
        assert_eq!(r.output, Some(serde_json::json!(42)));
        assert_eq!(r.session.as_ref().unwrap().call, 2);
        assert!(r.runner.python.starts_with("3."), "{}", show(&r));
        // An exception is the call's, with its traceback and source line; the session lives on.
        let r = call(&mut s, "def f():\n    return 1 / 0\nf()", 5000);
        assert_eq!(r.status, Status::Error, "{setup:?}: {}", show(&r));
        let e = r.exception.as_ref().expect("an exception");
        assert_eq!(e.kind, "ZeroDivisionError", "{}", show(&r));
        assert!(
            e.traceback
                .iter()
                .any(|f| f.source.as_deref() == Some("return 1 / 0")),
            "{}",
            show(&r)
        );
        assert_eq!(outcome(&r), SessionOutcome::Kept);
        // Files the call wrote are listed; stdin is empty, not the channel.
        let r = call(
            &mut s,
            "import sys\nopen('a.txt', 'w').write('hi')\nprint(repr(sys.stdin.read()))",
            5000,
        );
        assert_eq!(r.stdout, "''\n", "{setup:?}: {}", show(&r));
        assert!(
            r.files.iter().any(|f| f.path == "a.txt" && f.bytes == 2),
            "{}",
            show(&r)
        );
        // Its files are where the report says, for the agent to upload.
        let workspace = std::path::PathBuf::from(r.workspace.as_deref().expect("a workspace"));
        assert_eq!(
            std::fs::read_to_string(workspace.join("work/a.txt")).unwrap(),
            "hi",
            "{setup:?}"
        );
        let r = call(&mut s, "print(x)", 5000);
        assert_eq!(r.stdout, "41\n", "{setup:?}: {}", show(&r));
        // Only what this call changed: not a.txt again, not what the session started with; a
        // name that is not UTF-8 is listed as reports list it.
        assert!(r.files.is_empty(), "{setup:?}: {}", show(&r));
        let r = call(
            &mut s,
            "open('a.txt', 'a').write('!')\nopen(b'n\\xff', 'w').write('x')",
            5000,
        );
        let mut listed: Vec<&str> = r.files.iter().map(|f| f.path.as_str()).collect();
        listed.sort();
        assert_eq!(listed, ["a.txt", "n\\xff"], "{setup:?}: {}", show(&r));
        // A call that moves elsewhere still has its workspace's files listed.
        let r = call(
            &mut s,
            "import os\nos.mkdir('d')\nos.chdir('d')\nopen('b.txt', 'w').write('b')",
            5000,
        );
        assert!(
            r.files.iter().any(|f| f.path == "d/b.txt"),
            "{setup:?}: {}",
            show(&r)
        );
        let end = s.close("test over");
        assert_eq!(end.status, Status::Killed, "{setup:?}: {}", show(&end));
        assert!(!workspace.exists(), "{setup:?}: the workspace is removed");
    }
}

#[test]
fn a_call_past_its_limit_is_interrupted_and_the_session_lives_on() {
    for setup in SETUPS {
        let mut s = open(setup, ByteSize::mib(256));
        call(&mut s, "x = 41", 5000);
        let r = call(
            &mut s,
            "import time\nwhile True:\n    time.sleep(0.01)",
            500,
        );
        assert_eq!(r.status, Status::Timeout, "{setup:?}: {}", show(&r));
        assert_eq!(outcome(&r), SessionOutcome::Kept, "{}", show(&r));
        // Interrupted at its limit, answered before the grace ran out (else it would be ended).
        let limit = 500 + fleetbox_sandbox::session::GRACE.as_millis() as u64;
        assert!(r.wall_ms >= 450 && r.wall_ms < limit, "{}", show(&r));
        assert_eq!(r.exception.as_ref().unwrap().kind, "KeyboardInterrupt");
        let r = call(&mut s, "print(x + 1)", 5000);
        assert_eq!(r.stdout, "42\n", "{setup:?}: {}", show(&r));
    }
}

#[test]
fn a_call_that_will_not_stop_ends_the_session_and_the_next_call_says_so() {
    for setup in SETUPS {
        let mut s = open(setup, ByteSize::mib(256));
        let stubborn = "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass";
        let r = call(&mut s, stubborn, 300);
        assert_eq!(r.status, Status::Timeout, "{setup:?}: {}", show(&r));
        assert_eq!(outcome(&r), SessionOutcome::Ended, "{}", show(&r));
        assert!(
            r.message.as_deref().unwrap().contains("did not stop"),
            "{}",
            show(&r)
        );
        assert!(!s.alive());
        let r = call(&mut s, "print(1)", 1000);
        assert_eq!(r.status, Status::SandboxError, "{}", show(&r));
        assert_eq!(outcome(&r), SessionOutcome::Ended);
    }
}

#[test]
fn memory_is_capped_across_calls() {
    for setup in SETUPS {
        let mut s = open(setup, ByteSize::mib(200));
        let r = call(
            &mut s,
            "a = bytearray(120 << 20)\na[::4096] = b'x' * len(a[::4096])",
            5000,
        );
        assert_eq!(r.status, Status::Ok, "{setup:?}: {}", show(&r));
        let r = call(
            &mut s,
            "b = bytearray(120 << 20)\nb[::4096] = b'x' * len(b[::4096])",
            5000,
        );
        let refused = r.status == Status::MemoryLimit
            || r.exception
                .as_ref()
                .is_some_and(|e| e.kind == "MemoryError");
        assert!(
            refused,
            "{setup:?}: the second 120 MiB fit in 200: {}",
            show(&r)
        );
    }
}

#[test]
fn output_is_capped_per_call_and_the_session_lives_on() {
    for setup in SETUPS {
        let mut s = open(setup, ByteSize::mib(256));
        let r = call(&mut s, "while True:\n    print('x' * 1000)", 1000);
        assert_eq!(r.status, Status::Timeout, "{setup:?}: {}", show(&r));
        assert!(r.stdout_truncated, "{}", show(&r));
        assert!(r.stdout.len() as u64 <= limits().max_output.0);
        assert!(r.stdout_bytes > limits().max_output.0);
        let r = call(&mut s, "print('still here')", 5000);
        assert_eq!(r.stdout, "still here\n", "{setup:?}: {}", show(&r));
    }
}

#[test]
fn closing_a_session_leaves_no_process_behind() {
    for setup in SETUPS {
        let mut s = open(setup, ByteSize::mib(256));
        let r = call(&mut s, "import os\nprint(os.getpid())", 5000);
        assert_eq!(r.status, Status::Ok, "{}", show(&r));
        let r = call(
            &mut s,
            "import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid)",
            5000,
        );
        assert_eq!(r.status, Status::Ok, "{setup:?}: {}", show(&r));
        let end = s.close("test over");
        assert_eq!(end.status, Status::Killed, "{}", show(&end));
        if setup.backend == fleetbox_sandbox::Backend::Process {
            let pid: i32 = r.stdout.trim().parse().unwrap();
            assert!(process_gone(pid), "the session's child {pid} outlived it");
        }
    }
}
