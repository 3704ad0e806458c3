//! Removing a tree a hostile program built: iterative, with a bounded number of descriptors and a
//! bounded stack, whatever its depth.
//!
//! `std::fs::remove_dir_all` recurses and holds a descriptor per level: a chain of directories
//! tens of thousands deep (a program builds one with `mkdir` + `chdir`, each call shallow) makes
//! it fail with `EMFILE`, and deeper, overflow the supervisor's stack. Here only the directory
//! being emptied is open (two descriptors at a transition, plus one while listing); the way back
//! up is `..`, checked against the device and inode recorded on the way down, so a renamed
//! directory cannot lead the walk out of the tree. Nothing is followed: entries are opened with
//! `O_NOFOLLOW`, symlinks are unlinked as names, and another filesystem mounted inside the tree
//! is never entered.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One directory on the way down: its name in its parent, its identity, and the subdirectories
/// of it not yet emptied.
struct Level {
    name: OsString,
    id: (u64, u64),
    pending: Vec<OsString>,
    listed: bool,
}

/// Remove `root` and everything below it. Entries that cannot be removed are left and the first
/// error is returned after everything else was tried; the walk never panics or recurses.
pub fn remove_tree(root: &Path) -> io::Result<()> {
    let top = match open_dir(libc::AT_FDCWD, &cstr(root.as_os_str())?) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        // A symlink or a file where the tree was: remove the name only.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return std::fs::remove_file(root),
        Err(e) => return Err(e),
    };
    let (dev, ino) = identity(top.as_raw_fd())?;
    let mut first_error: Option<io::Error> = None;
    let mut stack = vec![Level {
        name: OsString::new(),
        id: (dev, ino),
        pending: Vec::new(),
        listed: false,
    }];
    let mut cur = top;
    // Re-listing a directory once after its listed subdirectories are gone picks up entries
    // that failed to open the first time (they are then reported, not retried forever).
    loop {
        let level = stack
            .last_mut()
            .expect("the stack holds the root until the end");
        if !level.listed {
            level.listed = true;
            match list_and_unlink(cur.as_raw_fd()) {
                Ok(subdirs) => level.pending = subdirs,
                Err(e) => keep_first(&mut first_error, e),
            }
        }
        if let Some(name) = level.pending.pop() {
            let c = match cstr(&name) {
                Ok(c) => c,
                Err(e) => {
                    keep_first(&mut first_error, e);
                    continue;
                }
            };
            match open_dir(cur.as_raw_fd(), &c) {
                Ok(child) => match identity(child.as_raw_fd()) {
                    Ok(id) if id.0 == dev => {
                        stack.push(Level {
                            name,
                            id,
                            pending: Vec::new(),
                            listed: false,
                        });
                        cur = child;
                    }
                    Ok(_) => keep_first(
                        &mut first_error,
                        io::Error::other(format!(
                            "`{}` is another filesystem mounted inside the tree: not entered",
                            name.to_string_lossy()
                        )),
                    ),
                    Err(e) => keep_first(&mut first_error, e),
                },
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    if let Err(e) = unlink_at(cur.as_raw_fd(), &c, false) {
                        keep_first(&mut first_error, e);
                    }
                }
                Err(e) => keep_first(&mut first_error, e),
            }
            continue;
        }
        // This directory is as empty as it gets: go up and remove it by name.
        let done = stack.pop().expect("non-empty");
        let Some(parent) = stack.last() else {
            drop(cur);
            return match std::fs::remove_dir(root) {
                Ok(()) => first_error.map_or(Ok(()), Err),
                Err(e) => Err(first_error.unwrap_or(e)),
            };
        };
        let up = open_dir(cur.as_raw_fd(), c"..")?;
        if identity(up.as_raw_fd())? != parent.id {
            return Err(io::Error::other(
                "a directory was moved while the tree was being removed: stopped",
            ));
        }
        cur = up;
        if let Err(e) = unlink_at(cur.as_raw_fd(), &cstr(&done.name)?, true) {
            keep_first(&mut first_error, e);
        }
    }
}

fn keep_first(slot: &mut Option<io::Error>, e: io::Error) {
    slot.get_or_insert(e);
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Open the directory `name` under `dir` for listing, never following a symlink. A directory
/// the program made unreadable is first made `0700` through its own `O_PATH` descriptor (so
/// the mode change lands on that inode, never on whatever a name points at).
fn open_dir(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    match openat(dir, name, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
        other => return other.inspect(|fd| make_owner_rwx(fd.as_raw_fd())),
    }
    let path = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)?;
    let magic = cstr(OsStr::new(&format!("/proc/self/fd/{}", path.as_raw_fd())))?;
    // SAFETY: `magic` is a valid NUL-terminated path; chmod takes no other pointers.
    if unsafe { libc::chmod(magic.as_ptr(), 0o700) } != 0 {
        return Err(io::Error::last_os_error());
    }
    openat(path.as_raw_fd(), c".", flags)
}

/// Owner read, write and search on an open directory, so its entries can be listed and
/// removed when we are its owner but not root.
fn make_owner_rwx(fd: RawFd) {
    // SAFETY: fchmod on a descriptor we hold; failure (not the owner) is harmless here.
    unsafe {
        libc::fchmod(fd, 0o700);
    }
}

fn openat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; openat returns a new descriptor or -1.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn identity(fd: RawFd) -> io::Result<(u64, u64)> {
    // SAFETY: stat is plain old data; fstat fills it for a descriptor we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

fn unlink_at(dir: RawFd, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is NUL-terminated; unlinkat takes no other pointers.
    if unsafe { libc::unlinkat(dir, name.as_ptr(), flags) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    Ok(())
}

/// Unlink every entry of `dir` that is not a directory; return the names of those that are.
fn list_and_unlink(dir: RawFd) -> io::Result<Vec<OsString>> {
    // The listing gets its own descriptor: closedir closes it, `dir` stays open.
    let listing = openat(
        dir,
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    )?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(listing);
    // SAFETY: `raw` is an open directory descriptor whose ownership passes to the DIR stream.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut subdirs = Vec::new();
    let mut names = Vec::new();
    loop {
        // SAFETY: `stream` is a valid DIR stream until closedir below.
        let entry = unsafe { libc::readdir64(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: readdir64 returned a valid entry, valid until the next readdir64 call.
        let (name, kind) = unsafe {
            (
                CStr::from_ptr((*entry).d_name.as_ptr()).to_owned(),
                (*entry).d_type,
            )
        };
        let bytes = name.as_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        names.push((name, kind));
    }
    // SAFETY: `stream` is valid and closed exactly once.
    unsafe { libc::closedir(stream) };
    let mut first_error = None;
    for (name, kind) in names {
        let is_dir = match kind {
            libc::DT_DIR => true,
            libc::DT_UNKNOWN => is_dir_at(dir, &name),
            _ => false,
        };
        if is_dir {
            subdirs.push(OsStr::from_bytes(name.as_bytes()).to_os_string());
        } else if let Err(e) = unlink_at(dir, &name, false) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) if subdirs.is_empty() => Err(e),
        _ => Ok(subdirs),
    }
}

fn is_dir_at(dir: RawFd, name: &CStr) -> bool {
    // SAFETY: stat is plain old data, filled by fstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` writable; the name is not followed.
    let ok = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } == 0;
    ok && st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A chain `depth` deep built with relative `mkdirat` calls (as a program would with
    /// `mkdir` + `chdir`), each level also holding a file.
    fn chain(root: &Path, depth: usize) {
        std::fs::create_dir(root).unwrap();
        let mut cur = open_dir(libc::AT_FDCWD, &cstr(root.as_os_str()).unwrap()).unwrap();
        for _ in 0..depth {
            // SAFETY: literal names; the descriptors are ours.
            unsafe {
                assert_eq!(libc::mkdirat(cur.as_raw_fd(), c"d".as_ptr(), 0o755), 0);
                let f = libc::openat(
                    cur.as_raw_fd(),
                    c"f".as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                assert!(f >= 0);
                libc::close(f);
            }
            cur = open_dir(cur.as_raw_fd(), c"d").unwrap();
        }
    }

    #[test]
    fn a_chain_far_deeper_than_any_descriptor_limit_goes_on_a_small_stack() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("deep");
        chain(&root, 20_000);
        let r = root.clone();
        // As agents run the sandbox: on a 2 MiB thread. std's remove_dir_all fails on this tree.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || remove_tree(&r))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn symlinks_are_removed_as_names_and_unreadable_directories_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep"), root.join("a/b/filelink")).unwrap();
        std::fs::write(root.join("a/b/file"), b"y").unwrap();
        std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(root.join("a"), std::fs::Permissions::from_mode(0o500)).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(outside.join("keep").exists(), "nothing outside was touched");
        // A missing tree is already removed.
        remove_tree(&root).unwrap();
    }
}
