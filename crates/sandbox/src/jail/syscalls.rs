//! Syscall names and numbers for the native architecture, for the names the seccomp policy uses.
//! A unit test checks every name in `resources/seccomp/jail.json` resolves here.

macro_rules! table {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name as i64)),*]
    };
}

#[rustfmt::skip]
const COMMON: &[(&str, i64)] = table!(
    SYS_mount, SYS_umount2, SYS_pivot_root, SYS_chroot, SYS_move_mount, SYS_open_tree,
    SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick, SYS_mount_setattr, SYS_ptrace,
    SYS_process_vm_readv, SYS_process_vm_writev, SYS_kcmp, SYS_pidfd_getfd, SYS_kexec_load,
    SYS_kexec_file_load, SYS_bpf, SYS_keyctl, SYS_add_key, SYS_request_key, SYS_perf_event_open,
    SYS_unshare, SYS_setns, SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
    SYS_userfaultfd, SYS_open_by_handle_at, SYS_name_to_handle_at, SYS_init_module,
    SYS_finit_module, SYS_delete_module, SYS_reboot, SYS_swapon, SYS_swapoff, SYS_acct,
    SYS_quotactl, SYS_syslog, SYS_settimeofday, SYS_clock_settime, SYS_clock_adjtime,
    SYS_adjtimex, SYS_sethostname, SYS_setdomainname, SYS_vhangup, SYS_fanotify_init,
    SYS_lookup_dcookie, SYS_personality, SYS_socket, SYS_clone, SYS_clone3,
    SYS_io_setup, SYS_io_submit, SYS_io_getevents, SYS_io_cancel,
    SYS_io_destroy, SYS_inotify_init1, SYS_inotify_add_watch, SYS_prlimit64, SYS_seccomp,
    SYS_prctl,
    SYS_accept, SYS_accept4, SYS_bind, SYS_brk, SYS_capget, SYS_clock_getres, SYS_clock_gettime,
    SYS_clock_nanosleep, SYS_close, SYS_close_range, SYS_connect, SYS_copy_file_range, SYS_dup,
    SYS_dup3, SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_pwait, SYS_eventfd2, SYS_execve,
    SYS_execveat, SYS_exit, SYS_exit_group, SYS_faccessat, SYS_faccessat2, SYS_fadvise64,
    SYS_fallocate, SYS_fchdir, SYS_fchmod, SYS_fchmodat, SYS_fchown, SYS_fchownat, SYS_fcntl,
    SYS_fdatasync, SYS_fgetxattr, SYS_flistxattr, SYS_flock, SYS_fsetxattr, SYS_fstatfs, SYS_fsync,
    SYS_ftruncate, SYS_futex, SYS_get_mempolicy, SYS_get_robust_list, SYS_getcpu, SYS_getcwd,
    SYS_getdents64, SYS_getegid, SYS_geteuid, SYS_getgid, SYS_getgroups, SYS_getitimer,
    SYS_getpeername, SYS_getpgid, SYS_getpid, SYS_getppid, SYS_getpriority, SYS_getrandom,
    SYS_getresgid, SYS_getresuid, SYS_getrusage, SYS_getsid, SYS_getsockname, SYS_getsockopt,
    SYS_gettid, SYS_gettimeofday, SYS_getuid, SYS_getxattr, SYS_ioctl, SYS_kill, SYS_lgetxattr,
    SYS_linkat, SYS_listen, SYS_listxattr, SYS_llistxattr, SYS_lseek, SYS_lsetxattr, SYS_madvise,
    SYS_mbind, SYS_membarrier, SYS_memfd_create, SYS_mincore, SYS_mkdirat, SYS_mmap, SYS_mprotect,
    SYS_mremap, SYS_msync, SYS_munmap, SYS_nanosleep, SYS_newfstatat, SYS_openat, SYS_pipe2,
    SYS_ppoll, SYS_pread64, SYS_preadv, SYS_pselect6, SYS_pwrite64, SYS_pwritev, SYS_read,
    SYS_readlinkat, SYS_readv, SYS_recvfrom, SYS_recvmmsg, SYS_recvmsg, SYS_renameat, SYS_renameat2,
    SYS_rseq, SYS_rt_sigaction, SYS_rt_sigpending, SYS_rt_sigprocmask, SYS_rt_sigreturn,
    SYS_rt_sigsuspend, SYS_rt_sigtimedwait, SYS_sched_getaffinity, SYS_sched_getparam,
    SYS_sched_getscheduler, SYS_sched_setaffinity, SYS_sched_yield, SYS_sendfile, SYS_sendmmsg,
    SYS_sendmsg, SYS_sendto, SYS_set_mempolicy, SYS_set_robust_list, SYS_set_tid_address,
    SYS_setitimer, SYS_setpgid, SYS_setpriority, SYS_setsid, SYS_setsockopt, SYS_setxattr,
    SYS_shutdown, SYS_sigaltstack, SYS_socketpair, SYS_splice, SYS_statfs, SYS_statx, SYS_symlinkat,
    SYS_sysinfo, SYS_tgkill, SYS_timerfd_create, SYS_timerfd_gettime, SYS_timerfd_settime,
    SYS_times, SYS_tkill, SYS_truncate, SYS_umask, SYS_uname, SYS_unlinkat, SYS_utimensat,
    SYS_wait4, SYS_waitid, SYS_write, SYS_writev,
);

#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const ARCH: &[(&str, i64)] = table!(
    SYS_iopl, SYS_ioperm, SYS_uselib, SYS_ustat, SYS_sysfs, SYS__sysctl,
    SYS_nfsservctl, SYS_modify_ldt, SYS_inotify_init,
    SYS_access, SYS_alarm, SYS_arch_prctl, SYS_chmod, SYS_chown, SYS_creat, SYS_dup2,
    SYS_epoll_wait, SYS_fstat, SYS_getpgrp, SYS_getrlimit, SYS_lchown, SYS_link, SYS_lstat,
    SYS_mkdir, SYS_open, SYS_pipe, SYS_poll, SYS_readlink, SYS_rename, SYS_rmdir, SYS_select,
    SYS_setrlimit, SYS_stat, SYS_symlink, SYS_unlink, SYS_vfork,
);

#[cfg(not(target_arch = "x86_64"))]
const ARCH: &[(&str, i64)] = &[];

/// The native architecture's name as the policy file spells it.
pub const NATIVE_ARCH: &str = std::env::consts::ARCH;

/// The `AUDIT_ARCH_*` value seccomp reports for native calls.
#[cfg(target_arch = "x86_64")]
pub const NATIVE_AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
pub const NATIVE_AUDIT_ARCH: u32 = 0xC000_00B7;
#[cfg(target_arch = "riscv64")]
pub const NATIVE_AUDIT_ARCH: u32 = 0xC000_00F3;

/// Calls added since Linux 5.1 have one number on every architecture; these are the ones the
/// `libc` crate does not name yet.
const UNIFIED: &[(&str, i64)] = &[
    ("cachestat", 451),
    ("fchmodat2", 452),
    ("futex_wake", 454),
    ("futex_wait", 455),
    ("futex_requeue", 456),
    ("statmount", 457),
    ("listmount", 458),
    ("lsm_get_self_attr", 459),
    ("lsm_set_self_attr", 460),
    ("lsm_list_modules", 461),
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
    ("open_tree_attr", 467),
    ("file_getattr", 468),
    ("file_setattr", 469),
];

fn all() -> impl Iterator<Item = (&'static str, i64)> {
    COMMON
        .iter()
        .chain(ARCH.iter())
        .map(|(n, nr)| (n.strip_prefix("SYS_").unwrap_or(n), *nr))
        .chain(UNIFIED.iter().copied())
}

pub fn number(name: &str) -> Option<i64> {
    #[cfg(target_arch = "x86_64")]
    if let Some((_, nr)) = super::syscall_names::X86_64
        .iter()
        .find(|(n, _)| *n == name)
    {
        return Some(*nr);
    }
    all().find(|(n, _)| *n == name).map(|(_, nr)| nr)
}

/// The name of syscall `nr`: every x86_64 syscall has one (a call the allow-list denies is
/// reported by name); elsewhere the names the policies use.
pub fn name(nr: i64) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    if let Some((n, _)) = super::syscall_names::X86_64.iter().find(|(_, x)| *x == nr) {
        return Some(n);
    }
    all().find(|(_, x)| *x == nr).map(|(n, _)| n)
}
