//! `fleetbox agent install` and the shipped systemd units: what it writes (modes included),
//! hostile flags refused, and `systemd-analyze verify` accepting every unit without a warning.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::bin;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `systemd-analyze verify UNIT`: it must pass and say nothing (an unknown key is only a
/// warning to it, so a warning fails here).
fn verify(unit: &Path) {
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing in CI"
        );
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{}: {said}",
        unit.display()
    );
}

#[test]
fn agent_install_writes_a_unit_systemd_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    // A configuration left world-readable by an earlier install is made private again.
    std::fs::create_dir_all(root.join("etc/fleetbox")).unwrap();
    std::fs::write(root.join("etc/fleetbox/agent.env"), "old").unwrap();
    std::fs::set_permissions(
        root.join("etc/fleetbox/agent.env"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = Command::new(bin())
        .args([
            "agent",
            "install",
            "--server",
            "https://coord.example.org:8443",
        ])
        .args([
            "--token",
            "fbx_enroll_abc",
            "--slots",
            "4",
            "--name",
            "gpu-1",
        ])
        .arg("--ca-cert")
        .arg(&ca)
        .arg("--root")
        .arg(&root)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "wrote /etc/fleetbox/agent.env",
        "made /var/lib/fleetbox-agent",
        "wrote /etc/systemd/system/fleetbox-agent.service",
        "systemctl daemon-reload && systemctl enable --now fleetbox-agent",
    ] {
        assert!(said.contains(line), "{line}: {said}");
    }
    let env = root.join("etc/fleetbox/agent.env");
    assert_eq!(mode(&env), 0o600);
    let text = std::fs::read_to_string(&env).unwrap();
    assert_eq!(
        text,
        "FLEETBOX_SERVER=https://coord.example.org:8443\nFLEETBOX_TOKEN=fbx_enroll_abc\nFLEETBOX_CA_CERT=/etc/fleetbox/ca.pem\n"
    );
    assert!(root.join("etc/fleetbox/ca.pem").exists());
    assert_eq!(mode(&root.join("var/lib/fleetbox-agent")), 0o700);
    let unit = root.join("etc/systemd/system/fleetbox-agent.service");
    let u = std::fs::read_to_string(&unit).unwrap();
    let exec = format!(
        "ExecStart={} agent --state /var/lib/fleetbox-agent --slots 4 --name gpu-1",
        bin().display()
    );
    assert!(u.contains(&exec), "{u}");
    assert!(!u.contains("EnvironmentFile=/etc/fleetbox/agent.env\nExecStart=/usr/local"));
    verify(&unit);
}

#[test]
fn the_shipped_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd");
    for name in ["fleetbox-server.service", "fleetbox-agent.service"] {
        // Their binary is /usr/local/bin/fleetbox on a real host; here, this build's.
        let text = std::fs::read_to_string(repo.join(name))
            .unwrap()
            .replace("/usr/local/bin/fleetbox", &bin().display().to_string());
        let unit = dir.path().join(name);
        std::fs::write(&unit, text).unwrap();
        verify(&unit);
    }
}

#[test]
fn hostile_install_flags_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--token", "tok\nFLEETBOX_SERVER=http://evil"),
        ("--token", "two words"),
        ("--server", "ftp://coord"),
        ("--name", "x --backend process"),
    ] {
        let mut args = vec!["agent", "install"];
        for (f, default) in [("--server", "http://coord:8080"), ("--token", "t")] {
            if f != flag {
                args.extend([f, default]);
            }
        }
        args.extend([flag, value]);
        let out = Command::new(bin())
            .args(&args)
            .arg("--root")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag} {value:?}: {err}");
        assert!(
            !dir.path().join("etc/fleetbox/agent.env").exists(),
            "{flag} {value:?} wrote the configuration"
        );
    }
}
