//! Both seccomp policies against CPython's own regression tests (Debian's
//! `libpython3.X-testsuite`, 30 modules run as one program in the jail): the allow-list must fail
//! no test the deny list passes, and both must refuse the same calls.

use std::collections::{BTreeMap, BTreeSet};

use fleetbox_proto::{ByteSize, ExecutionReport, Limits, Millis};

use crate::support::{JAIL, JAIL_ALLOW, Setup, fixture, run_code, show};

/// Per module: tests run, and the names of those that failed.
type Results = BTreeMap<String, (u64, BTreeSet<String>)>;

fn run_suite(setup: Setup) -> (Results, BTreeSet<String>, ExecutionReport) {
    let limits = Limits {
        timeout: Millis(240_000),
        cpu_time: Millis(240_000),
        memory: ByteSize::mib(2048),
        workspace_size: ByteSize::mib(512),
        max_output: ByteSize::mib(4),
        ..Limits::default()
    };
    let r = run_code(setup, &fixture("compat/cpython_tests.py"), None, limits);
    let line = r
        .stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("COMPAT "))
        .unwrap_or_else(|| panic!("the suite did not finish: {}", show(&r)));
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(line).unwrap();
    let results = raw
        .into_iter()
        .map(|(m, v)| {
            let failed = v["failed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect();
            (m, (v["run"].as_u64().unwrap(), failed))
        })
        .collect();
    let refused = r
        .violations
        .iter()
        .filter_map(|v| v.syscall.clone())
        .collect();
    (results, refused, r)
}

#[test]
fn the_allow_list_passes_cpythons_tests_as_the_deny_list_does() {
    assert!(
        std::path::Path::new("/usr/bin/python3").exists()
            && std::process::Command::new("/usr/bin/python3")
                .args(["-c", "import test.test_os"])
                .status()
                .is_ok_and(|s| s.success()),
        "CPython's test suite is not installed: `apt-get install libpython3.11-testsuite` (scripts/test does)"
    );
    let (deny, deny_refused, deny_report) = run_suite(JAIL);
    let (allow, allow_refused, allow_report) = run_suite(JAIL_ALLOW);
    let total = |r: &Results| -> (u64, usize) {
        r.values()
            .fold((0, 0), |(n, f), (run, failed)| (n + run, f + failed.len()))
    };
    eprintln!(
        "deny list: {:?} (tests, failed) in {} ms; allow-list: {:?} in {} ms",
        total(&deny),
        deny_report.wall_ms,
        total(&allow),
        allow_report.wall_ms
    );
    assert_eq!(deny.len(), 30);
    assert!(total(&deny).0 > 3000, "{:?}", total(&deny));
    for (module, (run, failed)) in &allow {
        let (deny_run, deny_failed) = &deny[module];
        assert_eq!(run, deny_run, "{module}: tests run");
        let extra: Vec<_> = failed.difference(deny_failed).collect();
        assert!(
            extra.is_empty(),
            "{module}: failing under the allow-list only: {extra:?}"
        );
    }
    // What the deny list refuses of these tests is what the threat model names: changing the
    // root or the clock, another process's limits, and the socket families it closes.
    assert_eq!(allow_refused, deny_refused);
    for name in &deny_refused {
        assert!(
            ["chroot", "clock_settime", "prlimit64", "socket"].contains(&name.as_str()),
            "unexpected refusal of {name}: {}",
            show(&deny_report)
        );
    }
}
