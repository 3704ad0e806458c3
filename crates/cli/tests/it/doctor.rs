//! `fleetbox doctor` on this host, and with each check made to fail for real in namespaces the
//! test makes: nested user namespaces switched off, the cgroup hierarchy hidden, no Docker
//! daemon. The agent refuses to start on a host that cannot jail, pointing to the doctor.

use std::process::{Command, Output};

use crate::support::bin;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `sh -c script` in new namespaces (`unshare FLAGS`), with `$FLEETBOX` the binary.
fn in_namespaces(flags: &[&str], script: &str) -> Option<Output> {
    let out = Command::new("unshare")
        .args(flags)
        .args(["sh", "-c", script])
        .env("FLEETBOX", bin())
        .output()
        .ok()?;
    // No `unshare` or no right to make namespaces here: the jail tests say so already.
    if text(&out).contains("unshare failed") && !text(&out).contains("fleetbox doctor") {
        return None;
    }
    Some(out)
}

#[test]
fn this_host_can_run_the_jail_and_says_so() {
    if fleetbox_sandbox::jail::host_supports_jail().is_err() {
        return;
    }
    let out = Command::new(bin()).args(["doctor"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    for check in [
        "user namespaces",
        "mount, pid, net namespaces",
        "cgroups",
        "seccomp",
        "landlock",
        "python",
    ] {
        assert!(t.contains(check), "{check}: {t}");
    }
    assert!(t.contains("the jail backend can run here"), "{t}");
    let out = Command::new(bin())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backend"], "jail");
    assert_eq!(v["can_run"], true);
    assert!(v["checks"].as_array().unwrap().len() >= 6);
}

#[test]
fn user_namespaces_switched_off_fail_the_jail_with_the_fix() {
    let script = "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$FLEETBOX\" doctor";
    let Some(out) = in_namespaces(&["--user", "--map-root-user"], script) else {
        return;
    };
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("FAIL  user namespaces"), "{t}");
    assert!(t.contains("max_user_namespaces = 0"), "{t}");
    assert!(
        t.contains("fix: sysctl -w user.max_user_namespaces="),
        "{t}"
    );
    assert!(t.contains("cannot run here"), "{t}");
    // The agent refuses to start there, and points to the doctor.
    let script = "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$FLEETBOX\" agent \
                  --server http://127.0.0.1:9 --token x --backend jail --state \"$(mktemp -d)\"";
    let out = in_namespaces(&["--user", "--map-root-user"], script).unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("fleetbox doctor --backend jail"), "{t}");
}

#[test]
fn a_hidden_cgroup_hierarchy_is_a_warning_with_the_fix() {
    // SAFETY: geteuid has no preconditions.
    if fleetbox_sandbox::jail::host_supports_jail().is_err() || unsafe { libc::geteuid() } != 0 {
        return;
    }
    let script = "mount -t tmpfs none /sys/fs/cgroup && exec \"$FLEETBOX\" doctor";
    let Some(out) = in_namespaces(&["--mount"], script) else {
        return;
    };
    let t = text(&out);
    // The jail still runs (limits fall back to rlimits): a warning, exit 0.
    assert!(out.status.success(), "{t}");
    assert!(t.contains("warn  cgroups"), "{t}");
    assert!(t.contains("fix: mount cgroup v2"), "{t}");
}

#[test]
fn no_docker_daemon_fails_the_docker_backends() {
    for backend in ["docker", "gvisor"] {
        let out = Command::new(bin())
            .args(["doctor", "--backend", backend])
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
            .output()
            .unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(t.contains("FAIL  docker daemon"), "{t}");
        assert!(t.contains("/nonexistent/docker.sock"), "{t}");
        assert!(t.contains("fix: apt install docker.io"), "{t}");
    }
}
