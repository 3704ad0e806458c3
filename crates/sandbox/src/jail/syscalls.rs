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
);

#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
const ARCH: &[(&str, i64)] = table!(
    SYS_iopl, SYS_ioperm, SYS_uselib, SYS_ustat, SYS_sysfs, SYS__sysctl,
    SYS_nfsservctl, SYS_modify_ldt, SYS_inotify_init,
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

fn all() -> impl Iterator<Item = (&'static str, i64)> {
    COMMON
        .iter()
        .chain(ARCH.iter())
        .map(|(n, nr)| (n.strip_prefix("SYS_").unwrap_or(n), *nr))
}

pub fn number(name: &str) -> Option<i64> {
    all().find(|(n, _)| *n == name).map(|(_, nr)| nr)
}

pub fn name(nr: i64) -> Option<&'static str> {
    all().find(|(_, x)| *x == nr).map(|(n, _)| n)
}
