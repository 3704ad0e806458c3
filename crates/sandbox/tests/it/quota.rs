//! The workspace is a filesystem of its own with a size and a file-count cap (a tmpfs mounted
//! over it on the host when the supervisor is root): a run cannot fill the host's disk or its
//! inodes, and hitting the cap is reported by what the supervisor measured.

use std::time::Duration;

use fleetbox_proto::{ByteSize, ExecutionReport, Limits, Status};
use fleetbox_sandbox::jail::JailSandbox;
use fleetbox_sandbox::{Backend, RunRequest, Sandbox};

use crate::support::{fixture, left_under, limits, sandbox_config as config, show};

fn request(what: &str) -> RunRequest {
    let l = Limits {
        workspace_size: ByteSize::mib(8),
        workspace_files: 200,
        ..limits()
    };
    let input = serde_json::to_vec(&serde_json::json!({ "what": what })).unwrap();
    RunRequest::new(fixture("escape/fill_workspace.py"), Some(input), l)
}

fn assert_capped(r: &ExecutionReport, what: &str) {
    assert_eq!(r.status, Status::OutputLimit, "{what}: {}", show(r));
    let v = r
        .violations
        .iter()
        .find(|v| v.kind == "workspace_limit")
        .unwrap_or_else(|| panic!("{what}: no workspace_limit violation: {}", show(r)));
    let want = if what == "bytes" { "8MiB" } else { "200 files" };
    assert!(v.detail.contains(want), "{}", v.detail);
    assert!(
        r.limits
            .enforcement
            .iter()
            .any(|e| e.limit == "workspace_size"),
        "{}",
        show(r)
    );
    let total: u64 = r.files.iter().map(|f| f.bytes).sum();
    assert!(total <= 8 << 20, "{total} bytes kept");
    assert!(r.files.len() <= 200, "{} files", r.files.len());
}

/// Nothing left under `root`: no run directory, no mounted workspace.
fn assert_all_gone(root: &std::path::Path) {
    assert!(left_under(root).is_empty(), "{:?}", left_under(root));
    assert_eq!(mounts_under(root), 0, "every workspace tmpfs is unmounted");
}

fn mounts_under(root: &std::path::Path) -> usize {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root))
        .count()
}

#[test]
fn the_workspace_is_capped_in_process_runs() {
    let root = tempfile::tempdir().unwrap();
    let sb = fleetbox_sandbox::open(Backend::Process, config(root.path(), 0)).unwrap();
    for what in ["bytes", "files"] {
        assert_capped(&sb.run(&request(what)), what);
    }
    assert_all_gone(root.path());
}

#[test]
fn the_workspace_is_capped_in_cold_and_warm_jails() {
    let root = tempfile::tempdir().unwrap();
    let sb = JailSandbox::new(config(root.path(), 1)).unwrap();
    for what in ["bytes", "files"] {
        let cold = sb.run(&request(what));
        assert_capped(&cold, what);
    }
    let req = request("bytes");
    assert!(
        sb.wait_warm(&req.limits, Duration::from_secs(10)),
        "no warm jail came"
    );
    let warm = sb.run(&req);
    assert!(
        warm.notes.iter().any(|n| n.starts_with("warm start")),
        "{}",
        show(&warm)
    );
    assert_capped(&warm, "bytes");
    drop(sb);
    assert_all_gone(root.path());
}

/// A kept workspace is the agent's to collect: its tmpfs stays until the agent discards it,
/// and a sweep removes one whose owner died (here: the pid of a process that has exited).
#[test]
fn kept_workspaces_are_unmounted_when_discarded() {
    let root = tempfile::tempdir().unwrap();
    let sb = fleetbox_sandbox::open(Backend::Process, config(root.path(), 0)).unwrap();
    let mut req = RunRequest::new(b"open('kept.txt', 'w').write('x')".to_vec(), None, limits());
    req.keep_workspace = true;
    let r = sb.run(&req);
    assert_eq!(r.status, Status::Ok, "{}", show(&r));
    let kept = std::path::PathBuf::from(r.workspace.unwrap());
    assert!(kept.join("work/kept.txt").exists());
    assert_eq!(mounts_under(root.path()), 1);
    assert!(fleetbox_sandbox::workspace::discard(&kept));
    assert_all_gone(root.path());

    // Kept again, and its owner is gone before it collected the files: the sweep unmounts it.
    let kept = std::path::PathBuf::from(sb.run(&req).workspace.unwrap());
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let orphan = root.path().join(format!("fleetbox-kept-{dead}-orphan"));
    std::fs::rename(&kept, &orphan).unwrap();
    assert_eq!(mounts_under(root.path()), 1);
    fleetbox_sandbox::sweep_stale(&config(root.path(), 0));
    assert_all_gone(root.path());
}

/// A kept workspace (`--keep-workspace`) brings nothing dangerous to the host, whatever the
/// program planted: no setuid/setgid/sticky bits, no device nodes or FIFOs, no symlink out,
/// a sparse file still sparse and a hard link still one file, in a directory only its owner
/// can enter; in the process backend and in the jail.
#[test]
fn a_kept_workspace_plants_nothing_on_the_host() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = tempfile::tempdir().unwrap();
    let process = fleetbox_sandbox::open(Backend::Process, config(root.path(), 0)).unwrap();
    let jail: Box<dyn Sandbox> = Box::new(JailSandbox::new(config(root.path(), 0)).unwrap());
    for (name, sb) in [("process", process), ("jail", jail)] {
        let mut req = RunRequest::new(fixture("escape/plant_in_kept_workspace.py"), None, limits());
        req.keep_workspace = true;
        let r = sb.run(&req);
        assert_eq!(r.status, Status::Ok, "{name}: {}", show(&r));
        let planted: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        for what in ["setuid", "sparse", "links", "fifo", "out_abs", "inside"] {
            assert_eq!(
                planted[what], true,
                "{name}: {what} was not planted: {planted}"
            );
        }
        let kept = std::path::PathBuf::from(r.workspace.unwrap());
        let skipped = fleetbox_sandbox::workspace::persist_kept(&kept).unwrap();
        assert!(
            skipped >= 3,
            "{name}: the FIFO and the symlinks out: {skipped}"
        );
        let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode();
        assert_eq!(
            mode(&kept) & 0o7777,
            0o700,
            "{name}: the kept directory is its owner's"
        );
        let work = kept.join("work");
        for entry in walkdir(&work) {
            let m = std::fs::symlink_metadata(&entry).unwrap();
            assert_eq!(
                m.mode() & 0o7000,
                0,
                "{name}: {} keeps a special bit",
                entry.display()
            );
            let t = m.file_type();
            assert!(
                t.is_file() || t.is_dir() || t.is_symlink(),
                "{name}: {} is neither file, directory nor symlink",
                entry.display()
            );
        }
        assert!(!work.join("fifo").exists(), "{name}");
        assert!(
            std::fs::symlink_metadata(work.join("out_abs")).is_err(),
            "{name}"
        );
        assert!(
            std::fs::symlink_metadata(work.join("out_rel")).is_err(),
            "{name}"
        );
        assert_eq!(
            std::fs::read_link(work.join("inside")).unwrap(),
            std::path::Path::new("d/../a")
        );
        let sparse = std::fs::metadata(work.join("sparse")).unwrap();
        assert_eq!(sparse.len(), 60 << 20, "{name}");
        assert!(
            sparse.blocks() * 512 < 1 << 20,
            "{name}: {} bytes on disk",
            sparse.blocks() * 512
        );
        let (a, b) = (
            std::fs::metadata(work.join("a")).unwrap(),
            std::fs::metadata(work.join("b")).unwrap(),
        );
        assert_eq!(
            (a.ino(), a.nlink()),
            (b.ino(), 2),
            "{name}: one file, linked twice"
        );
        assert!(fleetbox_sandbox::workspace::discard(&kept));
    }
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walkdir(&p));
        }
        out.push(p);
    }
    out
}
