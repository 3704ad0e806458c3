//! Stopping a run from outside, in every backend: it ends `killed` with the reason, at once.

use std::time::{Duration, Instant};

use fleetbox_proto::Status;
use fleetbox_sandbox::{Cancel, RunRequest};

use crate::support::{JAIL, PROCESS, PROCESS_NO_CGROUP, Setup, limits, sandbox, show};

fn cancelled_sleeper(setup: Setup) {
    let sandbox = sandbox(setup);
    let mut req = RunRequest::new(
        b"import os, time\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)\n".to_vec(),
        None,
        limits(),
    );
    let cancel = Cancel::new().unwrap();
    req.cancel = Some(cancel.clone());
    let trigger = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.cancel("job cancelled");
    });
    let started = Instant::now();
    let r = sandbox.run(&req);
    trigger.join().unwrap();
    assert_eq!(r.status, Status::Killed, "{}", show(&r));
    assert_eq!(r.message.as_deref(), Some("cancelled: job cancelled"));
    // Well before the 5 s timeout of `limits()`.
    assert!(started.elapsed() < Duration::from_secs(3), "{}", show(&r));
}

#[test]
fn cancel_stops_a_process_run() {
    cancelled_sleeper(PROCESS);
}

#[test]
fn cancel_stops_a_process_run_without_cgroups() {
    cancelled_sleeper(PROCESS_NO_CGROUP);
}

#[test]
fn cancel_stops_a_jail_run() {
    cancelled_sleeper(JAIL);
}
