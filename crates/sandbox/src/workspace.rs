//! The per-run directory: code, input, the writable workspace, and what the program left there.
//!
//! ```text
//! <root>/fleetbox-run-XXXXXX/
//!   main.py        the program (read-only to it in the jail)
//!   work/          the workspace: cwd, input.json, output.json, created files
//!   tmp/           TMPDIR for the process backend
//!   root/          mount point of the jail's new root
//! ```

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fleetbox_proto::{ByteSize, FileEntry};
use sha2::{Digest, Sha256};

use crate::SandboxError;
use crate::walk;

/// What failed when a run's workspace could not be given to its own user: a supervisor running
/// as root needs `CAP_CHOWN` (and `CAP_SETUID`/`CAP_SETGID` to run as that user), which a
/// container started with its capabilities dropped does not have.
const HAND_OVER: &str = "hand over (chown to the run's own user: a root supervisor needs CAP_CHOWN, CAP_SETUID and CAP_SETGID)";

pub const CODE_FILE: &str = "main.py";
pub use fleetbox_proto::job::{INPUT_FILE, OUTPUT_FILE};

pub use fleetbox_proto::job::check_file_name;

const RUN_DIR_PREFIX: &str = "fleetbox-run-";
/// A run directory kept after its run (out of the age-based sweep's pattern).
const KEPT_PREFIX: &str = "fleetbox-kept-";
/// A run directory whose removal failed, waiting for the next sweep.
const TRASH_PREFIX: &str = "fleetbox-trash-";
/// Entries a kept workspace's copy (and a new one's hand-over) looks at, at most: the
/// workspace's inode quota holds far fewer.
const KEEP_MAX_ENTRIES: usize = 4_000_000;

/// The pid in `<prefix><pid>-<rest>`, the names of run directories and run cgroups.
pub(crate) fn stale_owner(name: &str, prefix: &str) -> Option<i32> {
    let rest = name.strip_prefix(prefix)?;
    let (pid, tail) = rest.split_once('-')?;
    if tail.is_empty() {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Remove the run directories under `root` whose owning process is gone (killed before it
/// could clean up) and that are older than `min_age`, and every directory an earlier removal
/// could not finish (`fleetbox-trash-…`). Kept directories (`--keep-workspace`) are never
/// touched: they are renamed out of the pattern when kept.
pub fn sweep_stale(root: &Path, min_age: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let stale = if name.starts_with(TRASH_PREFIX) {
            true
        } else if let Some(pid) = stale_owner(&name, KEPT_PREFIX) {
            // Kept for an agent to collect, and its owner died first: still on its tmpfs. (Kept
            // for a person, the workspace was copied onto the disk and is left alone.)
            !crate::sys::alive(pid) && on_own_mount(&entry.path())
        } else if let Some(pid) = stale_owner(&name, RUN_DIR_PREFIX) {
            let old = meta
                .modified()
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age));
            old && !crate::sys::alive(pid)
        } else {
            false
        };
        if stale {
            unmount_workspace(&entry.path());
            match crate::remove::remove_tree(&entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "could not remove a leftover run directory; tried again at the next sweep")
                }
            }
        }
    }
    removed
}

/// Mount the size- and inode-capped tmpfs over `work` (owned by the run's uid).
fn mount_quota(work: &Path, q: &Quota, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let (uid, gid) = owner.unwrap_or((0, 0));
    let opts = format!(
        "size={},nr_inodes={},mode=0700,uid={uid},gid={gid}",
        q.bytes.max(4096),
        q.files.max(16)
    );
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let target = c(work.as_os_str().as_encoded_bytes())?;
    let (fstype, data) = (c(b"tmpfs")?, c(opts.as_bytes())?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `dir/work` is a mount of its own.
fn on_own_mount(dir: &Path) -> bool {
    match (
        std::fs::symlink_metadata(dir),
        std::fs::symlink_metadata(dir.join("work")),
    ) {
        (Ok(d), Ok(w)) => d.dev() != w.dev(),
        _ => false,
    }
}

/// Detach the workspace's tmpfs, if `dir/work` is a mount of its own.
fn unmount_workspace(dir: &Path) {
    if !on_own_mount(dir) {
        return;
    }
    let work = dir.join("work");
    if let Ok(c) = std::ffi::CString::new(work.as_os_str().as_encoded_bytes()) {
        // SAFETY: `c` is a NUL-terminated path; MNT_DETACH never blocks.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            tracing::warn!(path = %work.display(), error = %std::io::Error::last_os_error(), "could not unmount a workspace");
        }
    }
}

/// Copy a kept workspace off its tmpfs onto the disk and unmount the tmpfs, so that it outlives
/// the process that kept it (`fleetbox run --keep-workspace`) without holding memory. Returns
/// how many entries were left out (too deep to name, unreadable, or not kept: see below).
///
/// What a hostile program left must not become a weapon on the host: the kept directory is
/// `0700`; copies belong to this process's user with their mode masked to `0o777` (no setuid,
/// setgid or sticky bit); device nodes, FIFOs, sockets and symlinks that point outside the
/// workspace are never recreated; a hard-linked file is copied once and linked again, and runs
/// of zero bytes become holes, so the copy takes what the workspace's quota counted, not a
/// sparse file's apparent size. A workspace that was never on a tmpfs of its own is defanged
/// in place the same way.
pub fn persist_kept(dir: &Path) -> std::io::Result<usize> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let work = dir.join("work");
    if !on_own_mount(dir) {
        return Ok(defang_in_place(&work));
    }
    let copy = dir.join("work.disk");
    fs_err::create_dir(&copy)?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o700))?;
    let mut skipped = 0;
    let mut copied_inodes: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
    let left_out = walk::walk(&work, walk::Bounds::new(KEEP_MAX_ENTRIES), |e| {
        let to = copy.join(e.rel);
        let ok = if e.is_dir() {
            std::fs::create_dir(&to).is_ok()
                && std::fs::set_permissions(&to, safe_mode(e.mode() | 0o700)).is_ok()
        } else if e.is_file() {
            match copied_inodes.get(&e.inode()) {
                Some(first) => std::fs::hard_link(first, &to).is_ok(),
                None => {
                    let ok = e
                        .open()
                        .and_then(|src| copy_holes(src, &to, e.mode()))
                        .is_ok();
                    if ok && e.nlink() > 1 {
                        copied_inodes.insert(e.inode(), to.clone());
                    }
                    ok
                }
            }
        } else if e.is_symlink() {
            e.read_link().is_ok_and(|target| {
                stays_inside(e.rel, &target) && std::os::unix::fs::symlink(target, &to).is_ok()
            })
        } else {
            false
        };
        if !ok {
            skipped += 1;
        }
    });
    skipped += left_out.unreadable + left_out.too_deep + usize::from(left_out.cut_short);
    unmount_workspace(dir);
    fs_err::remove_dir(&work)?;
    fs_err::rename(&copy, &work)?;
    Ok(skipped)
}

/// A mode with only the permission bits: never setuid, setgid or sticky.
fn safe_mode(mode: u32) -> std::fs::Permissions {
    std::fs::Permissions::from_mode(mode & 0o777)
}

/// Whether a symlink at `rel` (relative to the workspace) pointing at `target` stays inside
/// the workspace, read without following anything.
fn stays_inside(rel: &Path, target: &Path) -> bool {
    use std::path::Component;
    if target.is_absolute() {
        return false;
    }
    let mut depth: Vec<&std::ffi::OsStr> =
        rel.parent().map(|p| p.iter().collect()).unwrap_or_default();
    for part in target.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::Normal(name) => depth.push(name),
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Copy an open regular file with its runs of zeros left as holes.
fn copy_holes(mut src: std::fs::File, to: &Path, mode: u32) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])?;
        }
        len += n as u64;
    }
    dst.set_len(len)?;
    dst.set_permissions(safe_mode(mode))
}

/// A kept workspace that stays where it ran: setuid, setgid and sticky bits cleared; device
/// nodes, FIFOs, sockets and symlinks pointing outside removed. Returns how many were removed.
fn defang_in_place(work: &Path) -> usize {
    let mut removed = 0;
    walk::walk(work, walk::Bounds::new(KEEP_MAX_ENTRIES), |e| {
        let keep = if e.is_dir() || e.is_file() {
            if e.mode() & 0o7000 != 0 {
                e.chmod(e.mode() & 0o777);
            }
            true
        } else if e.is_symlink() {
            e.read_link().is_ok_and(|t| stays_inside(e.rel, &t))
        } else {
            false
        };
        if !keep && e.unlink() {
            removed += 1;
        }
    });
    removed
}

/// Remove a run directory whatever a program left in it (any depth, unreadable directories,
/// symlinks: see [`crate::remove`]). One that cannot be removed now is renamed
/// `fleetbox-trash-…` so that [`sweep_stale`] tries again; returns whether it is gone.
pub fn discard(path: &Path) -> bool {
    unmount_workspace(path);
    match crate::remove::remove_tree(path) {
        Ok(()) => true,
        Err(e) => {
            let trash = path
                .file_name()
                .map(|n| path.with_file_name(format!("{TRASH_PREFIX}{}", n.to_string_lossy())));
            let moved = trash.is_some_and(|t| std::fs::rename(path, t).is_ok());
            tracing::warn!(path = %path.display(), error = %e, moved_to_trash = moved, "could not remove a run directory");
            false
        }
    }
}

/// The workspace's own filesystem: a tmpfs of this many bytes and inodes, mounted over
/// `work/` on the host so that a run cannot fill the host's disk (or its inodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub bytes: u64,
    pub files: u64,
}

impl Quota {
    pub fn of(limits: &fleetbox_proto::Limits) -> Quota {
        Quota {
            bytes: limits.workspace_size.0,
            files: limits.workspace_files,
        }
    }
}

/// A run directory, removed on drop unless kept.
pub struct RunDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub input_sha256: Option<String>,
    /// Files put in the workspace before the run (name, SHA-256): not listed as created while
    /// they are unchanged.
    pub given: Vec<(String, String)>,
    /// The quota the workspace is held to, when its tmpfs could be mounted.
    pub quota: Option<Quota>,
    /// The run's host uid, held until the workspace is gone (dropped after it).
    uid: Option<crate::process::UidLease>,
}

impl RunDir {
    /// Create the directory, write the code and the input, and hand the workspace to `owner`
    /// (the unprivileged uid the program runs as) when we are root.
    pub fn create(
        root: &Path,
        code: &[u8],
        input: Option<&[u8]>,
        owner: Option<(u32, u32)>,
        quota: Option<Quota>,
    ) -> Result<RunDir, SandboxError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| SandboxError::Workspace { what, path, source }
        };
        fs_err::create_dir_all(root).map_err(io("create the workspace root", root))?;
        // The owner's pid in the name lets a later sweep find directories whose owner died.
        let dir = tempfile::Builder::new()
            .prefix(&format!("{RUN_DIR_PREFIX}{}-", std::process::id()))
            .tempdir_in(root)
            .map_err(io("create a run directory in", root))?;
        let path = dir.path().to_path_buf();
        // Traversable (not listable) by the unprivileged uid the program runs as.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o711))
            .map_err(io("set permissions on", &path))?;
        let code_path = path.join(CODE_FILE);
        fs_err::write(&code_path, code).map_err(io("write the program to", &code_path))?;
        std::fs::set_permissions(&code_path, std::fs::Permissions::from_mode(0o644))
            .map_err(io("set permissions on", &code_path))?;
        let work = path.join("work");
        let tmp = path.join("tmp");
        for d in [&work, &tmp] {
            fs_err::create_dir(d).map_err(io("create", d))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(io("set permissions on", d))?;
        }
        // Only a supervisor running as root may mount; elsewhere the workspace is a plain
        // directory (the report's `limits.enforced` says which).
        let quota = quota.filter(|q| crate::sys::is_root() && mount_quota(&work, q, owner).is_ok());
        let input_sha256 = match input {
            Some(bytes) => {
                let p = work.join(INPUT_FILE);
                fs_err::write(&p, bytes).map_err(io("write the input to", &p))?;
                Some(sha256_hex(bytes))
            }
            None => None,
        };
        if let Some((uid, gid)) = owner {
            for d in [&work, &tmp] {
                chown_tree(d, uid, gid).map_err(io(HAND_OVER, d))?;
            }
        }
        Ok(RunDir {
            dir: Some(dir),
            path,
            input_sha256,
            given: Vec::new(),
            quota,
            uid: None,
        })
    }

    /// Keep the run's uid taken for as long as this directory lives.
    pub fn hold_uid(&mut self, lease: Option<crate::process::UidLease>) {
        self.uid = lease;
    }

    /// Put the request's attached files in the workspace (names checked with
    /// [`check_file_name`]), owned by `owner` when given.
    pub fn add_files(
        &mut self,
        files: &[(String, Vec<u8>)],
        owner: Option<(u32, u32)>,
    ) -> Result<(), SandboxError> {
        let work = self.work();
        for (name, bytes) in files {
            check_file_name(name).map_err(|why| SandboxError::Workspace {
                what: "accept the attached file",
                path: PathBuf::from(name),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
            })?;
            let path = work.join(name);
            let io = |what: &'static str| {
                let path = path.clone();
                move |source| SandboxError::Workspace { what, path, source }
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io("create the directory of"))?;
            }
            // Never follow or reuse an entry that exists.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io("write the attached file"))?;
            std::io::Write::write_all(&mut f, bytes).map_err(io("write the attached file"))?;
            self.given
                .push((listed_name(Path::new(name)), sha256_hex(bytes)));
        }
        if let Some((uid, gid)) = owner
            && !files.is_empty()
        {
            chown_tree(&work, uid, gid).map_err(|source| SandboxError::Workspace {
                what: HAND_OVER,
                path: work.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Whether the workspace's tmpfs is full (of bytes or of inodes), as seen after the run.
    pub fn workspace_full(&self) -> Option<&'static str> {
        self.quota?;
        let c = std::ffi::CString::new(self.work().as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs is plain old data, filled by statvfs(3).
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated and `st` writable.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        if st.f_favail == 0 {
            Some("files")
        } else if st.f_bavail == 0 {
            Some("bytes")
        } else {
            None
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn code(&self) -> PathBuf {
        self.path.join(CODE_FILE)
    }
    pub fn work(&self) -> PathBuf {
        self.path.join("work")
    }
    pub fn tmp(&self) -> PathBuf {
        self.path.join("tmp")
    }

    /// Keep the directory after the run; returns where it is.
    /// Kept directories are renamed `fleetbox-kept-…`, out of reach of [`sweep_stale`].
    pub fn keep(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
            if let Some(name) = self.path.file_name().and_then(|n| n.to_str())
                && let Some(rest) = name.strip_prefix(RUN_DIR_PREFIX)
            {
                let kept = self.path.with_file_name(format!("{KEPT_PREFIX}{rest}"));
                if std::fs::rename(&self.path, &kept).is_ok() {
                    self.path = kept;
                }
            }
        }
        self.path.clone()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Never `TempDir`'s own removal: it recurses, and a deep tree overflows the stack.
        if let Some(dir) = self.dir.take() {
            discard(&dir.keep());
        }
    }
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    let mut result = Ok(());
    walk::walk(dir, walk::Bounds::new(KEEP_MAX_ENTRIES), |e| {
        if result.is_ok() {
            result = e.chown(uid, gid);
        }
    });
    result
}

/// A workspace path as the report lists it: UTF-8 as it is, with a backslash written `\\` and
/// every byte that is not UTF-8 written `\xNN`, so that distinct names stay distinct (a lossy
/// conversion made `a\xff` and `a\xfe` the same `a\u{fffd}`). [`path_from_listed`] inverts it.
pub fn listed_name(rel: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in rel.as_os_str().as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The path a [`listed_name`] stands for, relative to the workspace.
pub fn path_from_listed(listed: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = listed.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
                continue;
            }
            if bytes.get(i + 1) == Some(&b'x')
                && let Some(b) = listed
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Files the program left in `work`, excluding the input we wrote there ourselves (unless the
/// program changed it). The first `max_files` by path are listed, and hashed until
/// `max_hashed` bytes; the walk itself is bounded by `bounds`.
pub struct Listing {
    pub files: Vec<FileEntry>,
    /// Something was left out: past `max_files`, or past the walk's bounds (see `note`).
    pub truncated: bool,
    /// Why the listing is incomplete beyond `max_files` (entries unreadable, too deep, or past
    /// the walk's cap).
    pub note: Option<String>,
    /// A file that reached the `RLIMIT_FSIZE` cap exactly.
    pub at_file_size_limit: Option<String>,
}

pub fn list_files(
    work: &Path,
    input_sha256: Option<&str>,
    given: &[(String, String)],
    max_files: u32,
    max_hashed: ByteSize,
    file_size_limit: u64,
    workspace_files: u64,
) -> Listing {
    // The first `max_files` paths seen so far, largest on top: bounded memory whatever the
    // program left.
    let mut first: std::collections::BinaryHeap<(String, PathBuf, u64)> = Default::default();
    let mut truncated = false;
    let mut at_limit: Option<String> = None;
    let bounds = walk::Bounds::new(
        usize::try_from(workspace_files)
            .unwrap_or(usize::MAX)
            .saturating_add(1024),
    );
    let skipped = walk::walk(work, bounds, |e| {
        if !e.is_file() {
            return;
        }
        let rel = listed_name(e.rel);
        let bytes = e.size();
        if bytes >= file_size_limit && at_limit.as_ref().is_none_or(|a| rel < *a) {
            at_limit = Some(rel.clone());
        }
        // The input we wrote and the files given before the run are not listed unchanged.
        let given_hash = given
            .iter()
            .find(|(name, _)| *name == rel)
            .map(|(_, h)| h.as_str());
        let ours = if rel == INPUT_FILE {
            input_sha256
        } else {
            given_hash
        };
        if let Some(ours) = ours
            && e.open().ok().and_then(hash_file).as_deref() == Some(ours)
        {
            return;
        }
        first.push((rel, e.rel.to_path_buf(), bytes));
        if first.len() > max_files as usize {
            first.pop();
            truncated = true;
        }
    });
    let mut hash_budget = max_hashed.0;
    let files = first
        .into_sorted_vec()
        .into_iter()
        .map(|(path, rel, bytes)| {
            let sha256 = (bytes <= hash_budget)
                .then(|| {
                    hash_budget -= bytes;
                    walk::open_beneath(work, &rel).ok().and_then(hash_file)
                })
                .flatten();
            FileEntry {
                path,
                bytes,
                sha256,
            }
        })
        .collect();
    Listing {
        files,
        truncated: truncated || skipped.any(),
        note: skipped.explain(bounds),
        at_file_size_limit: at_limit,
    }
}

fn hash_file(mut file: std::fs::File) -> Option<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return None,
        }
    }
    Some(hex::encode(hasher.finalize()))
}

/// What `output.json` held, if the program wrote one.
pub enum OutputFile {
    Absent,
    Json(serde_json::Value),
    NotJson(String),
    TooLarge(u64),
}

pub fn read_output_file(work: &Path, cap: u64) -> OutputFile {
    let path = work.join(OUTPUT_FILE);
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return OutputFile::Absent;
    };
    if !meta.is_file() {
        return OutputFile::Absent;
    }
    if meta.size() > cap {
        return OutputFile::TooLarge(meta.size());
    }
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(v) => OutputFile::Json(v),
            Err(_) => OutputFile::NotJson(String::from_utf8_lossy(&bytes).into_owned()),
        },
        Err(_) => OutputFile::Absent,
    }
}

#[cfg(test)]
mod sweep_tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn age(path: &Path, secs: u64) {
        let f = std::fs::File::open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn owner_pids_are_parsed_from_names() {
        assert_eq!(
            stale_owner("fleetbox-run-123-abc", RUN_DIR_PREFIX),
            Some(123)
        );
        assert_eq!(stale_owner("run-77-0", "run-"), Some(77));
        assert_eq!(stale_owner("fleetbox-run-abcdef", RUN_DIR_PREFIX), None);
        assert_eq!(stale_owner("fleetbox-run-12-", RUN_DIR_PREFIX), None);
        assert_eq!(stale_owner("fleetbox-kept-12-x", RUN_DIR_PREFIX), None);
        assert_eq!(stale_owner("run--1-0", "run-"), None);
    }

    #[test]
    fn only_old_directories_of_dead_owners_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let make = |name: &str, secs: u64| {
            let p = root.path().join(name);
            std::fs::create_dir_all(p.join("work/sub")).unwrap();
            std::fs::write(p.join("work/sub/f"), b"x").unwrap();
            // A program can leave a read-only directory behind.
            std::fs::set_permissions(p.join("work/sub"), std::fs::Permissions::from_mode(0o500))
                .unwrap();
            age(&p, secs);
            p
        };
        let stale = make(&format!("fleetbox-run-{dead}-aaaa"), 3600);
        let young = make(&format!("fleetbox-run-{dead}-bbbb"), 0);
        let mine = make(&format!("fleetbox-run-{me}-cccc"), 3600);
        let kept = make(&format!("fleetbox-kept-{dead}-dddd"), 3600);
        let other = make("unrelated", 3600);
        assert_eq!(sweep_stale(root.path(), Duration::from_secs(60)), 1);
        assert!(!stale.exists());
        for p in [young, mine, kept, other] {
            assert!(p.exists(), "{}", p.display());
        }
    }
}

#[cfg(test)]
mod name_tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    #[test]
    fn names_that_are_not_utf8_stay_distinct_and_come_back() {
        let names: [&[u8]; 6] = [
            b"plain.txt",
            b"a\xff",
            b"a\xfe",
            b"back\\slash",
            b"back\\xff",
            "é/ü".as_bytes(),
        ];
        let listed: Vec<String> = names
            .iter()
            .map(|n| listed_name(Path::new(OsStr::from_bytes(n))))
            .collect();
        assert_eq!(listed[0], "plain.txt");
        assert_eq!(listed[1], "a\\xff");
        assert_eq!(listed[3], "back\\\\slash");
        assert_eq!(listed[5], "é/ü");
        let mut unique = listed.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{listed:?}");
        for (n, l) in names.iter().zip(&listed) {
            assert_eq!(path_from_listed(l).as_os_str().as_bytes(), *n, "{l}");
        }
    }
}
