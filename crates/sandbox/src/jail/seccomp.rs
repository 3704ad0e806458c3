//! The jail's seccomp policy: loaded from `resources/seccomp/jail.json` (embedded at build time),
//! compiled with `seccompiler`, installed with a user-notification listener so that every denied
//! syscall reaches the report with its name.
//!
//! Two filters are stacked. The `refuse` filter returns an errno quietly (libc probes `clone3`
//! and falls back). The `deny` filter is compiled with a placeholder `SECCOMP_RET_TRACE` action
//! that we rewrite to `SECCOMP_RET_USER_NOTIF` (seccompiler has no such action); the supervisor
//! receives each notification, records it and answers `EPERM`. Non-native calling conventions
//! (i386 `int 0x80`, x32) are killed: seccompiler's arch check kills foreign `AUDIT_ARCH`
//! values, and we prepend a check for the x32 bit.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

use super::syscalls;

/// The policy as shipped.
pub const POLICY_JSON: &str = include_str!("../../../../resources/seccomp/jail.json");
/// The allow-list as shipped: the syscalls measured from Python and the scientific stack.
pub const ALLOW_JSON: &str = include_str!("../../../../resources/seccomp/allow.json");

/// Which calls the jail's filter lets through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Everything but the deny list (`jail.json`).
    #[default]
    Deny,
    /// Only the allow-list (`allow.json`), and within it the deny list's argument checks still
    /// apply; every other call is denied and reported by name.
    Allow,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deny" | "deny-list" => Ok(Mode::Deny),
            "allow" | "allow-list" => Ok(Mode::Allow),
            other => Err(format!("`{other}`: expected `deny` or `allow`")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Mode::Deny => "deny",
            Mode::Allow => "allow",
        })
    }
}

/// `resources/seccomp/allow.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowList {
    pub version: u32,
    #[allow(dead_code)]
    pub description: String,
    /// Syscall names measured (`scripts/seccomp-measure`), on every architecture.
    pub allow: Vec<String>,
    /// Names the measurement cannot see or the corpus does not reach, each with why.
    #[serde(default)]
    pub also: Vec<Also>,
    /// Names that exist only on some architectures (`{"x86_64": {"allow": [...], "also": [...]}}`).
    #[serde(default)]
    pub arch: BTreeMap<String, ArchAllow>,
    /// What the allow-list refuses beyond the deny list, each with why.
    #[serde(default)]
    pub not_allowed: Vec<Also>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Also {
    pub syscall: String,
    #[allow(dead_code)]
    pub why: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchAllow {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub also: Vec<Also>,
}

impl AllowList {
    pub fn shipped() -> Result<AllowList, PolicyError> {
        let list: AllowList = serde_json::from_str(ALLOW_JSON)?;
        if list.version != 1 {
            return Err(PolicyError::Version(list.version));
        }
        for name in list.names() {
            if syscalls::number(name).is_none() {
                return Err(PolicyError::UnknownSyscall(name.to_string()));
            }
        }
        Ok(list)
    }

    /// The names that apply on this architecture.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        let arch = self.arch.get(syscalls::NATIVE_ARCH);
        self.allow
            .iter()
            .chain(self.also.iter().map(|a| &a.syscall))
            .chain(
                arch.into_iter()
                    .flat_map(|a| a.allow.iter().chain(a.also.iter().map(|x| &x.syscall))),
            )
            .map(String::as_str)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub version: u32,
    #[allow(dead_code)]
    pub description: String,
    pub deny: Vec<Deny>,
    pub refuse: Vec<Refuse>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deny {
    pub syscall: String,
    #[serde(default)]
    pub args: Vec<ArgCheck>,
    pub label: Option<String>,
    /// Only on this architecture (for syscalls other architectures lack).
    pub arch: Option<String>,
}

/// One condition on an argument; all conditions of an entry must hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgCheck {
    pub index: u8,
    pub eq: Option<u64>,
    pub ne: Option<u64>,
    /// Any of these bits set (expanded to one rule per bit).
    pub mask_any: Option<u64>,
    /// `[mask, value]`: the argument's bits under `mask` equal `value` (a socket type under
    /// its `SOCK_NONBLOCK`/`SOCK_CLOEXEC` flags).
    pub mask_eq: Option<[u64; 2]>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refuse {
    pub syscall: String,
    pub errno: u32,
    #[allow(dead_code)]
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("seccomp policy is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("seccomp policy version `{0}` is not supported (expected 1)")]
    Version(u32),
    #[error("seccomp policy names unknown syscall `{0}`")]
    UnknownSyscall(String),
    #[error("seccomp policy entry for `{0}` has an argument check with no operator")]
    EmptyCheck(String),
    #[error("compiling the seccomp filter failed: {0}")]
    Compile(String),
}

/// Placeholder action value rewritten to `SECCOMP_RET_USER_NOTIF`.
const NOTIFY_MARK: u32 = 0xf1ee;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

impl Policy {
    pub fn load(json: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = serde_json::from_str(json)?;
        if policy.version != 1 {
            return Err(PolicyError::Version(policy.version));
        }
        for name in policy
            .deny
            .iter()
            .filter(|d| d.applies())
            .map(|d| &d.syscall)
            .chain(policy.refuse.iter().map(|r| &r.syscall))
        {
            if syscalls::number(name).is_none() {
                return Err(PolicyError::UnknownSyscall(name.clone()));
            }
        }
        for d in &policy.deny {
            if d.args.iter().any(|a| {
                a.eq.is_none() && a.ne.is_none() && a.mask_any.is_none() && a.mask_eq.is_none()
            }) {
                return Err(PolicyError::EmptyCheck(d.syscall.clone()));
            }
        }
        Ok(policy)
    }

    pub fn shipped() -> Result<Policy, PolicyError> {
        Self::load(POLICY_JSON)
    }

    fn arch() -> Result<TargetArch, PolicyError> {
        TargetArch::try_from(syscalls::NATIVE_ARCH).map_err(|e| PolicyError::Compile(e.to_string()))
    }

    /// The quiet-errno filter and the notifying filter: the deny list, followed by the
    /// allow-list when one is given (a call the deny list lets through must then be on it).
    pub fn compile(
        &self,
        allow: Option<&AllowList>,
    ) -> Result<(BpfProgram, BpfProgram), PolicyError> {
        let arch = Self::arch()?;
        let compile_err = |e: seccompiler::BackendError| PolicyError::Compile(e.to_string());

        // Refusals with different errnos would need one filter each; the policy has one errno.
        let mut refuse_rules = BTreeMap::new();
        let mut errno = libc::ENOSYS as u32;
        for r in &self.refuse {
            let nr = syscalls::number(&r.syscall).expect("validated on load");
            refuse_rules.insert(nr, vec![]);
            errno = r.errno;
        }
        let refuse: BpfProgram = SeccompFilter::new(
            refuse_rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch,
        )
        .and_then(TryInto::try_into)
        .map_err(compile_err)?;

        let mut deny_rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        let mut unconditional = Vec::new();
        for d in self.deny.iter().filter(|d| d.applies()) {
            let nr = syscalls::number(&d.syscall).expect("validated on load");
            if d.args.is_empty() {
                unconditional.push(nr);
            } else {
                deny_rules
                    .entry(nr)
                    .or_default()
                    .extend(d.rules().map_err(compile_err)?);
            }
        }
        // An empty rule list matches every call of that syscall.
        for nr in unconditional {
            deny_rules.insert(nr, vec![]);
        }
        let mut deny: BpfProgram = SeccompFilter::new(
            deny_rules,
            SeccompAction::Allow,
            SeccompAction::Trace(NOTIFY_MARK),
            arch,
        )
        .and_then(TryInto::try_into)
        .map_err(compile_err)?;
        rewrite_to_notify(&mut deny);
        if let Some(list) = allow {
            deny = then_allow_list(deny, list, arch)?;
        }
        // Non-native calls are the deny filter's to notify (so the supervisor sees them; a
        // program that kills itself with SIGSYS cannot fake one): its arch check notifies
        // instead of killing, and so does an x32 check in front of it. The refuse filter lets
        // them through to it (ERRNO or KILL from it would win over the notification).
        let mut refuse = refuse;
        rewrite_returns(
            &mut refuse,
            libc::SECCOMP_RET_KILL_PROCESS,
            libc::SECCOMP_RET_ALLOW,
        );
        rewrite_returns(
            &mut deny,
            libc::SECCOMP_RET_KILL_PROCESS,
            SECCOMP_RET_USER_NOTIF,
        );
        let deny = with_x32_check(deny, SECCOMP_RET_USER_NOTIF);
        Ok((refuse, deny))
    }

    /// The policy entry a notified call matched, for the report's detail.
    pub fn describe(&self, nr: i64, args: &[u64; 6]) -> (String, String) {
        let name = syscalls::name(nr)
            .map(str::to_string)
            .unwrap_or_else(|| format!("syscall_{nr}"));
        let label = self
            .deny
            .iter()
            .filter(|d| d.applies() && d.syscall == name)
            .find(|d| d.matches(args))
            .and_then(|d| d.label.clone())
            .unwrap_or_else(|| format!("{name}()"));
        (name, label)
    }
}

impl Deny {
    fn applies(&self) -> bool {
        self.arch
            .as_deref()
            .is_none_or(|a| a == syscalls::NATIVE_ARCH)
    }

    /// seccompiler rules: conditions in one rule are ANDed, rules are ORed. `mask_any` turns
    /// into one rule per bit.
    fn rules(&self) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        let mut base = Vec::new();
        let mut any_bits = Vec::new();
        for a in &self.args {
            if let Some(v) = a.eq {
                base.push(SeccompCondition::new(
                    a.index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    v,
                )?);
            }
            if let Some(v) = a.ne {
                base.push(SeccompCondition::new(
                    a.index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Ne,
                    v,
                )?);
            }
            if let Some([mask, value]) = a.mask_eq {
                base.push(SeccompCondition::new(
                    a.index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(mask),
                    value,
                )?);
            }
            if let Some(mask) = a.mask_any {
                for bit in (0..64).map(|b| 1u64 << b).filter(|b| mask & b != 0) {
                    any_bits.push((a.index, bit));
                }
            }
        }
        if self.args.is_empty() {
            return Ok(vec![]);
        }
        if any_bits.is_empty() {
            return Ok(vec![SeccompRule::new(base)?]);
        }
        any_bits
            .into_iter()
            .map(|(index, bit)| {
                let mut conds = base.clone();
                conds.push(SeccompCondition::new(
                    index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(bit),
                    bit,
                )?);
                SeccompRule::new(conds)
            })
            .collect()
    }

    pub(crate) fn matches(&self, args: &[u64; 6]) -> bool {
        self.args.iter().all(|a| {
            let v = args[a.index as usize] & 0xffff_ffff;
            a.eq.is_none_or(|e| v == e)
                && a.ne.is_none_or(|n| v != n)
                && a.mask_any.is_none_or(|m| v & m != 0)
                && a.mask_eq.is_none_or(|[m, e]| v & m == e)
        })
    }
}

/// `deny` followed by the allow-list: every `ret ALLOW` of the deny program jumps to the
/// allow-list program instead, whose calls are allowed and every other call notified. One
/// program, so that one listener hears both (a process may have only one).
fn then_allow_list(
    deny: BpfProgram,
    list: &AllowList,
    arch: TargetArch,
) -> Result<BpfProgram, PolicyError> {
    let compile_err = |e: seccompiler::BackendError| PolicyError::Compile(e.to_string());
    let rules: BTreeMap<i64, Vec<SeccompRule>> = list
        .names()
        .map(|n| (syscalls::number(n).expect("validated on load"), vec![]))
        .collect();
    let mut allow: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Trace(NOTIFY_MARK),
        SeccompAction::Allow,
        arch,
    )
    .and_then(TryInto::try_into)
    .map_err(compile_err)?;
    rewrite_to_notify(&mut allow);
    let start = deny.len();
    let mut out = deny;
    for (i, ins) in out.iter_mut().enumerate() {
        if ins.code == 0x06 && ins.k == libc::SECCOMP_RET_ALLOW {
            // BPF_JMP|BPF_JA: to the first instruction of the allow-list program.
            ins.code = 0x05;
            ins.k = (start - (i + 1)) as u32;
        }
    }
    out.extend(allow);
    if out.len() > 4096 - 3 {
        return Err(PolicyError::Compile(format!(
            "the combined filter has {} instructions, over the kernel's 4096",
            out.len()
        )));
    }
    Ok(out)
}

fn rewrite_to_notify(prog: &mut BpfProgram) {
    rewrite_returns(
        prog,
        libc::SECCOMP_RET_TRACE | NOTIFY_MARK,
        SECCOMP_RET_USER_NOTIF,
    );
}

/// Every `ret from` of `prog` becomes `ret to`.
fn rewrite_returns(prog: &mut BpfProgram, from: u32, to: u32) {
    const BPF_RET_K: u16 = 0x06;
    for ins in prog.iter_mut() {
        if ins.code == BPF_RET_K && ins.k == from {
            ins.k = to;
        }
    }
}

/// Prepend: load the syscall number; if the x32 bit is set, return `action`. Inserting at the
/// front leaves every relative jump of the compiled program intact.
fn with_x32_check(prog: BpfProgram, action: u32) -> BpfProgram {
    if syscalls::NATIVE_ARCH != "x86_64" {
        return prog;
    }
    use seccompiler::sock_filter;
    let ld_nr = sock_filter {
        code: 0x20,
        jt: 0,
        jf: 0,
        k: 0,
    }; // BPF_LD|BPF_W|BPF_ABS, nr
    let jset = sock_filter {
        code: 0x45,
        jt: 0,
        jf: 1,
        k: X32_SYSCALL_BIT,
    }; // BPF_JMP|BPF_JSET|BPF_K
    let kill = sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: action,
    };
    let mut out = vec![ld_nr, jset, kill];
    out.extend(prog);
    out
}

fn install(prog: &BpfProgram, flags: libc::c_ulong) -> std::io::Result<libc::c_long> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, a valid BPF program (seccompiler's `sock_filter` has the
    // kernel's layout) that outlives the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// Both filters compiled, in a form that travels in the jail's configuration: the supervisor
/// compiles the policy once per process and every run's program only installs the result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Compiled {
    /// `(code, jt, jf, k)` for each instruction of the quiet-errno filter.
    refuse: Vec<(u16, u8, u8, u32)>,
    /// The same for the notifying deny filter.
    deny: Vec<(u16, u8, u8, u32)>,
}

impl Compiled {
    pub fn new(policy: &Policy, allow: Option<&AllowList>) -> Result<Compiled, PolicyError> {
        let (refuse, deny) = policy.compile(allow)?;
        let flat = |p: BpfProgram| p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect();
        Ok(Compiled {
            refuse: flat(refuse),
            deny: flat(deny),
        })
    }

    /// Install both filters in the calling process (after `no_new_privs`); returns the listener.
    pub fn install(&self) -> std::io::Result<OwnedFd> {
        let prog = |v: &[(u16, u8, u8, u32)]| -> BpfProgram {
            v.iter()
                .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
                .collect()
        };
        install_filters(&prog(&self.refuse), &prog(&self.deny))
    }
}

/// Install both filters in the calling process (after `no_new_privs`); returns the listener.
pub fn install_filters(refuse: &BpfProgram, deny: &BpfProgram) -> std::io::Result<OwnedFd> {
    install(refuse, 0)?;
    let fd = install(
        deny,
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER as libc::c_ulong,
    )?;
    // SAFETY: with NEW_LISTENER the kernel returns a fresh descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `_IOWR('!', 0, struct seccomp_notif)` and `_IOWR('!', 1, struct seccomp_notif_resp)`.
const SECCOMP_IOCTL_NOTIF_RECV: libc::c_ulong = 0xc050_2100;
const SECCOMP_IOCTL_NOTIF_SEND: libc::c_ulong = 0xc018_2101;

/// One denied call, as the listener saw it.
pub struct Notification {
    pub nr: i64,
    pub args: [u64; 6],
    pub pid: u32,
    /// The `AUDIT_ARCH_*` of the call's calling convention.
    pub arch: u32,
}

impl Notification {
    /// A call through another calling convention than the native one (i386 `int 0x80`, x32).
    pub fn non_native(&self) -> Option<&'static str> {
        if self.arch != syscalls::NATIVE_AUDIT_ARCH {
            Some("a syscall through a foreign calling convention (e.g. i386 `int 0x80`)")
        } else if syscalls::NATIVE_ARCH == "x86_64"
            && self.nr as u64 & u64::from(X32_SYSCALL_BIT) != 0
        {
            Some("an x32 syscall")
        } else {
            None
        }
    }
}

/// Receive one notification and answer it with `EPERM`. `None` if the caller is already gone.
pub fn receive_and_deny(listener: i32) -> std::io::Result<Option<Notification>> {
    // SAFETY: seccomp_notif is plain data; the kernel requires it zeroed before RECV.
    let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: `req` is a valid, correctly sized seccomp_notif for the kernel to fill.
    if unsafe { libc::ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV as _, &mut req) } != 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::EINTR) => Ok(None),
            _ => Err(err),
        };
    }
    let note = Notification {
        nr: i64::from(req.data.nr),
        args: req.data.args,
        pid: req.pid,
        arch: req.data.arch,
    };
    let resp = libc::seccomp_notif_resp {
        id: req.id,
        val: 0,
        error: -libc::EPERM,
        flags: 0,
    };
    // SAFETY: `resp` is a valid seccomp_notif_resp; ENOENT (caller died) is expected.
    unsafe { libc::ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND as _, &resp) };
    Ok(Some(note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_loads_and_follows_the_deny_list_in_one_program() {
        let p = Policy::shipped().unwrap();
        let list = AllowList::shipped().expect("allow-list loads");
        assert!(list.names().count() > 150);
        let (_, alone) = p.compile(None).unwrap();
        let (_, both) = p.compile(Some(&list)).unwrap();
        assert!(
            both.len() > alone.len() && both.len() < 4096,
            "{}",
            both.len()
        );
        // No path of the deny list allows a call on its own any more: it jumps on.
        assert!(
            !both[..alone.len()]
                .iter()
                .any(|i| i.code == 0x06 && i.k == libc::SECCOMP_RET_ALLOW)
        );
    }

    /// Every syscall the kernel names is allowed, denied by the deny list, or listed as
    /// `not_allowed` with why: exactly one of them. So the allow-list refuses only what the deny
    /// list refuses plus calls no program can make.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_syscall_is_allowed_denied_or_not_allowed_with_why() {
        let p = Policy::shipped().unwrap();
        let list = AllowList::shipped().unwrap();
        let allowed: Vec<&str> = list.names().collect();
        let denied: Vec<&str> = p
            .deny
            .iter()
            .filter(|d| d.args.is_empty())
            .map(|d| d.syscall.as_str())
            .collect();
        // Refused quietly ahead of both policies (clone3: ENOSYS), whatever the lists say.
        let refused: Vec<&str> = p.refuse.iter().map(|r| r.syscall.as_str()).collect();
        let not: Vec<&str> = list
            .not_allowed
            .iter()
            .map(|a| a.syscall.as_str())
            .collect();
        let mut missing = Vec::new();
        for (name, _) in super::super::syscall_names::X86_64 {
            let places = [&allowed, &denied, &not]
                .iter()
                .filter(|l| l.contains(name))
                .count();
            assert!(
                places <= 1,
                "{name} is in {places} of allowed/denied/not_allowed"
            );
            if places == 0 && !refused.contains(name) {
                missing.push(*name);
            }
        }
        assert!(missing.is_empty(), "in no list: {missing:?}");
        for a in &list.not_allowed {
            assert!(syscalls::number(&a.syscall).is_some(), "{}", a.syscall);
        }
        // The family checks the deny list makes with arguments stay on top of the allow-list.
        for (name, args) in [
            ("socket", [40u64, 1, 0, 0, 0, 0]),
            ("personality", [1, 0, 0, 0, 0, 0]),
        ] {
            assert!(
                p.deny.iter().any(|d| d.syscall == name && d.matches(&args)),
                "{name}"
            );
        }
    }

    #[test]
    fn shipped_policy_loads_and_compiles() {
        let p = Policy::shipped().expect("policy loads");
        let (refuse, deny) = p.compile(None).expect("compiles");
        assert!(!refuse.is_empty());
        assert!(deny.iter().any(|i| i.k == SECCOMP_RET_USER_NOTIF));
        assert!(
            !deny
                .iter()
                .any(|i| i.k == libc::SECCOMP_RET_TRACE | NOTIFY_MARK)
        );
    }

    #[test]
    fn isolate_minimum_is_denied() {
        let p = Policy::shipped().unwrap();
        for name in [
            "mount",
            "umount2",
            "ptrace",
            "kexec_load",
            "bpf",
            "keyctl",
            "add_key",
            "perf_event_open",
            "unshare",
            "setns",
            "io_uring_setup",
            "userfaultfd",
            "open_by_handle_at",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "swapon",
        ] {
            assert!(
                p.deny
                    .iter()
                    .any(|d| d.syscall == name && d.args.is_empty()),
                "{name} must be denied unconditionally"
            );
        }
    }

    #[test]
    fn bad_policies_are_rejected() {
        assert!(matches!(Policy::load("{"), Err(PolicyError::Json(_))));
        let unknown =
            r#"{"version":1,"description":"","deny":[{"syscall":"frobnicate"}],"refuse":[]}"#;
        assert!(
            matches!(Policy::load(unknown), Err(PolicyError::UnknownSyscall(s)) if s == "frobnicate")
        );
        let v2 = r#"{"version":2,"description":"","deny":[],"refuse":[]}"#;
        assert!(matches!(Policy::load(v2), Err(PolicyError::Version(2))));
        let empty = r#"{"version":1,"description":"","deny":[{"syscall":"socket","args":[{"index":0}]}],"refuse":[]}"#;
        assert!(matches!(
            Policy::load(empty),
            Err(PolicyError::EmptyCheck(_))
        ));
    }

    #[test]
    fn describe_names_the_matching_entry() {
        let p = Policy::shipped().unwrap();
        let nr = syscalls::number("socket").unwrap();
        let (name, label) = p.describe(nr, &[16, 3, 0, 0, 0, 0]);
        assert_eq!(name, "socket");
        assert_eq!(label, "socket(AF_NETLINK)");
        let (name, label) = p.describe(syscalls::number("mount").unwrap(), &[0; 6]);
        assert_eq!((name.as_str(), label.as_str()), ("mount", "mount()"));
    }
}
