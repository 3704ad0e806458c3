//! The Kubernetes manifests (`deploy/kubernetes`): each variant renders with `kubectl
//! kustomize` and every object validates strictly against two Kubernetes versions' schemas
//! (`kubernetes-validate --strict`, from PyPI; `scripts/test` installs it). No cluster runs here,
//! so what the schemas cannot say (KEDA's object, the wiring between objects) is checked below.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The schemas' versions: an older one the manifests must still fit, and a recent one.
const VERSIONS: [&str; 2] = ["1.30.0", "1.35.0"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// `kubectl` and the validator, or `None` outside CI when either is missing.
fn tools() -> Option<PathBuf> {
    let validator = std::env::var_os("FLEETBOX_TEST_KUBERNETES_VALIDATE").map(PathBuf::from);
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    match validator {
        Some(v) if kubectl && v.exists() => Some(v),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI has kubectl and kubernetes-validate (scripts/test installs them)"
            );
            eprintln!("skipping: needs kubectl and FLEETBOX_TEST_KUBERNETES_VALIDATE");
            None
        }
    }
}

/// YAML documents as JSON, read by the validator's own interpreter (PyYAML comes with it).
fn parse(validator: &Path, yaml: &[u8]) -> Vec<serde_json::Value> {
    use std::io::Write;
    let mut child = Command::new(validator.with_file_name("python"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(yaml).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn render(validator: &Path, variant: &str) -> Vec<serde_json::Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy().join(variant))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {variant}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(validator, &out.stdout)
}

fn find<'a>(objects: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn every_variant_renders_and_validates_strictly() {
    let Some(validator) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![deploy().join("secret.example.yaml")];
    for variant in ["base", "keda", "gvisor"] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(deploy().join(variant))
            .output()
            .unwrap();
        assert!(out.status.success(), "{variant}: {out:?}");
        let file = dir.path().join(format!("{variant}.yaml"));
        std::fs::write(&file, &out.stdout).unwrap();
        files.push(file);
    }
    for version in VERSIONS {
        let out = Command::new(&validator)
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{version}: {said}");
        // The only object without a schema is KEDA's.
        for line in said.lines().filter(|l| !l.contains(" passed for ")) {
            assert!(
                line.contains("kind ScaledObject with api version keda.sh/v1alpha1"),
                "{version}: {line}"
            );
        }
        let passed = said.lines().filter(|l| l.contains(" passed for ")).count();
        assert!(
            passed >= 20,
            "{version}: only {passed} objects validated: {said}"
        );
    }
}

#[test]
fn the_objects_are_wired_to_each_other() {
    let Some(validator) = tools() else { return };
    let base = render(&validator, "base");
    let coordinator = find(&base, "Deployment", "fleetbox-coordinator");
    let pod = &coordinator["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "fleetbox:0.1.0");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(coordinator["spec"]["replicas"], 2);
    // Every secret key a pod reads is one the example Secret has.
    let secret = parse(
        &validator,
        &std::fs::read(deploy().join("secret.example.yaml")).unwrap(),
    )
    .remove(0);
    let keys = secret["stringData"].as_object().unwrap();
    let agent = find(&base, "Deployment", "fleetbox-agent");
    for deployment in [coordinator, agent] {
        let pod = &deployment["spec"]["template"]["spec"];
        for env in pod["containers"][0]["env"].as_array().unwrap() {
            let key = env["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap();
            assert!(keys.contains_key(key), "{key} is not in the example Secret");
        }
        assert_eq!(pod["automountServiceAccountToken"], false);
    }
    let audit = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "audit-key")
        .unwrap();
    assert!(keys.contains_key(audit["secret"]["items"][0]["key"].as_str().unwrap()));
    // The Service selects the coordinators, and agents reach it by its name.
    let service = find(&base, "Service", "fleetbox");
    assert_eq!(
        service["spec"]["selector"],
        coordinator["spec"]["selector"]["matchLabels"]
    );
    let args: Vec<&str> = agent["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--server", "http://fleetbox:8080"])
    );
    assert!(args.windows(2).any(|w| w == ["--backend", "jail"]));
    // Every object lands in the one namespace.
    for o in base.iter().filter(|o| o["kind"] != "Namespace") {
        assert_eq!(o["metadata"]["namespace"], "fleetbox", "{}", o["kind"]);
    }

    // KEDA scales the agents' Deployment on the queue-depth gauge (kept from counters).
    let keda = render(&validator, "keda");
    let scaled = find(&keda, "ScaledObject", "fleetbox-agent");
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "fleetbox-agent");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "prometheus");
    assert!(
        trigger["metadata"]["query"]
            .as_str()
            .unwrap()
            .contains("fleetbox_queue_depth")
    );

    // Under gVisor: the RuntimeClass, no added capability, the process backend, one slot.
    let gvisor = render(&validator, "gvisor");
    assert_eq!(find(&gvisor, "RuntimeClass", "gvisor")["handler"], "runsc");
    let agent = find(&gvisor, "Deployment", "fleetbox-agent");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "gvisor");
    let c = &pod["containers"][0];
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        serde_json::json!([])
    );
    assert_eq!(
        c["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.windows(2).any(|w| w == ["--backend", "process"]));
    assert!(args.windows(2).any(|w| w == ["--slots", "1"]));
}
