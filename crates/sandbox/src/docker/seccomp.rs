//! The containers' seccomp profile, in Docker's format, derived from the jail's two policies:
//! the allow-list (`resources/seccomp/allow.json`) is what reaches the kernel, the deny list's
//! argument checks (`jail.json`) hold within it, and its quiet refusals (`clone3`: `ENOSYS`)
//! come first. Every other call, one a newer kernel adds included, fails with `EPERM`, and only
//! the native architecture is listed, so the i386 `int 0x80` and x32 ABIs are refused too.
//!
//! Docker's format cannot say "any family but these" in one rule (runc turns two conditions on
//! one argument into two rules, ORed), so the calls the deny list checks by argument get the
//! allowed values spelled out ([`argument_rules`]); a unit test holds them equal to the deny
//! list's checks over every value that matters. The profile is shipped as
//! `resources/seccomp/docker.json` (a test keeps that file equal to what this builds) and passed
//! inline on every container (`security_opt: seccomp=<json>`).

use serde_json::{Value, json};

use crate::jail::seccomp::{AllowList, Policy, PolicyError};
use crate::jail::syscalls;

/// `resources/seccomp/docker.json`, as shipped.
pub const SHIPPED: &str = include_str!("../../../../resources/seccomp/docker.json");

const AF_INET: u64 = 2;
/// Socket families Linux knows (`AF_MAX`).
const AF_MAX: u64 = 46;
/// Socket types (`SOCK_STREAM` … `SOCK_DCCP`; `SOCK_PACKET` is 10), under the type's flags.
const SOCK_TYPES: [u64; 6] = [1, 2, 3, 4, 5, 6];
const SOCK_TYPE_MASK: u64 = 0xf;
/// The persona values `personality` may be called with: the query and PER_LINUX variants.
const PERSONAS: [u64; 5] = [0, 8, 0x2_0000, 0x2_0008, 0xffff_ffff];
const CLONE_NEW_FLAGS: u64 = 0x7e02_0000;

/// Argument checks of the deny list a container does without, and why: the jail refuses a
/// filter of the program's own because it would answer forbidden calls before the jail's
/// listener could report them; a container has no listener to hide anything from, and a filter
/// can only take calls away. (A check by `!=` could not hold anyway: the kernel reads these
/// arguments as 32 bits, a profile compares 64.)
const NOT_CHECKED: [&str; 2] = ["seccomp", "prctl"];

/// Names gVisor's own syscall table spells differently (`runsc --oci-seccomp` looks a profile's
/// names up there, and ignores the ones it does not know, as runc does): listed under both.
/// Until 2023 gVisor named 270 `pselect`; without the alias every `select.select` with a
/// timeout failed with `EPERM` inside gVisor.
const GVISOR_NAMES: [(&str, &str); 1] = [("pselect6", "pselect")];

/// The syscalls the deny list checks by argument, and the values allowed for each.
fn argument_rules() -> Vec<(&'static str, Vec<Vec<Cond>>)> {
    let families = (1..AF_MAX).filter(|f| ![AF_INET, 16, 17, 40].contains(f));
    let mut socket: Vec<Vec<Cond>> = families.map(|f| vec![Cond::Eq(0, f)]).collect();
    socket.extend(
        SOCK_TYPES
            .iter()
            .map(|&t| vec![Cond::Eq(0, AF_INET), Cond::MaskedEq(1, SOCK_TYPE_MASK, t)]),
    );
    vec![
        ("socket", socket),
        (
            "personality",
            PERSONAS.iter().map(|&p| vec![Cond::Eq(0, p)]).collect(),
        ),
        ("prlimit64", vec![vec![Cond::Eq(0, 0)]]),
        ("clone", vec![vec![Cond::MaskedEq(0, CLONE_NEW_FLAGS, 0)]]),
    ]
}

/// One condition on an argument, compared in 64 bits as libseccomp does: only equalities, so
/// that a value with high bits the kernel ignores is never let through.
#[derive(Debug, Clone, Copy)]
enum Cond {
    Eq(u8, u64),
    MaskedEq(u8, u64, u64),
}

impl Cond {
    #[cfg(test)]
    fn holds(&self, args: &[u64; 6]) -> bool {
        match *self {
            Cond::Eq(i, v) => args[i as usize] == v,
            Cond::MaskedEq(i, m, v) => args[i as usize] & m == v,
        }
    }

    fn to_json(self) -> Value {
        let (index, op, value, two) = match self {
            Cond::Eq(i, v) => (i, "SCMP_CMP_EQ", v, 0),
            Cond::MaskedEq(i, m, v) => (i, "SCMP_CMP_MASKED_EQ", m, v),
        };
        json!({"index": index, "value": value, "valueTwo": two, "op": op})
    }
}

fn docker_arch() -> &'static str {
    match syscalls::NATIVE_ARCH {
        "aarch64" => "SCMP_ARCH_AARCH64",
        "riscv64" => "SCMP_ARCH_RISCV64",
        _ => "SCMP_ARCH_X86_64",
    }
}

/// The profile, built from the shipped policies.
pub fn build() -> Result<Value, PolicyError> {
    let policy = Policy::shipped()?;
    let list = AllowList::shipped()?;
    let checked = argument_rules();
    let is_checked = |n: &str| checked.iter().any(|(c, _)| *c == n);
    debug_assert!(NOT_CHECKED.iter().all(|n| !is_checked(n)));
    let refused: Vec<&str> = policy.refuse.iter().map(|r| r.syscall.as_str()).collect();
    let mut plain: Vec<&str> = list
        .names()
        .filter(|n| !is_checked(n) && !refused.contains(n))
        .collect();
    for (linux, gvisor) in GVISOR_NAMES {
        if plain.contains(&linux) {
            plain.push(gvisor);
        }
    }
    plain.sort_unstable();
    plain.dedup();
    let mut rules = Vec::new();
    for r in &policy.refuse {
        rules.push(json!({
            "names": [r.syscall],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": r.errno,
            "comment": r.why,
        }));
    }
    rules.push(json!({"names": plain, "action": "SCMP_ACT_ALLOW"}));
    let allowed: Vec<&str> = list.names().collect();
    for (name, alternatives) in &checked {
        if !allowed.contains(name) {
            continue;
        }
        for conds in alternatives {
            rules.push(json!({
                "names": [name],
                "action": "SCMP_ACT_ALLOW",
                "args": conds.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
            }));
        }
    }
    Ok(json!({
        "comment": "Fleetbox's container profile, generated from resources/seccomp/allow.json and jail.json by crates/sandbox/src/docker/seccomp.rs; do not edit by hand",
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "architectures": [docker_arch()],
        "syscalls": rules,
    }))
}

/// The profile as the daemon takes it (`security_opt: seccomp=<this>`).
pub fn inline() -> &'static str {
    SHIPPED.trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jail::seccomp::Deny;

    #[test]
    fn the_shipped_profile_is_what_the_policies_build() {
        let built = serde_json::to_string_pretty(&build().unwrap()).unwrap() + "\n";
        if built != SHIPPED {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../resources/seccomp/docker.json"
            );
            if std::env::var_os("FLEETBOX_WRITE_PROFILE").is_some() {
                std::fs::write(path, &built).unwrap();
            }
            panic!(
                "resources/seccomp/docker.json is stale: run this test with FLEETBOX_WRITE_PROFILE=1"
            );
        }
    }

    /// Over every value of the checked arguments that matters, a call the profile allows is one
    /// the deny list lets through, and the other way round.
    #[test]
    fn argument_rules_allow_exactly_what_the_deny_list_lets_through() {
        let policy = Policy::shipped().unwrap();
        let denied = |name: &str, args: &[u64; 6]| {
            policy
                .deny
                .iter()
                .filter(|d: &&Deny| d.syscall == name && !NOT_CHECKED.contains(&name))
                .any(|d| d.matches(args))
        };
        let mut samples: Vec<[u64; 6]> = Vec::new();
        for a0 in (0..64).chain([0x2_0000, 0x2_0008, 0xffff_ffff, 0x1_0000_0002]) {
            for a1 in 0..16u64 {
                for flags in [0, 0x80000, 0x800] {
                    samples.push([a0, a1 | flags, 0, 0, 0, 0]);
                }
            }
        }
        for bit in 0..32 {
            samples.push([1 << bit, 0, 0, 0, 0, 0]);
            samples.push([(1 << bit) | 0x11, 0, 0, 0, 0, 0]);
        }
        for (name, alternatives) in argument_rules() {
            for args in &samples {
                let allowed = alternatives.iter().any(|c| c.iter().all(|c| c.holds(args)));
                // Never more than the deny list lets through ...
                assert!(!allowed || !denied(name, args), "{name}{args:?} is allowed");
                // ... and all of it, for the values programs pass: 32-bit clean, families and
                // types Linux knows (others fail in the kernel either way).
                let clean = args.iter().all(|a| *a <= 0xffff_ffff);
                let known = name != "socket"
                    || ((1..AF_MAX).contains(&args[0])
                        && (args[0] != AF_INET
                            || SOCK_TYPES.contains(&(args[1] & SOCK_TYPE_MASK))
                            || args[1] & SOCK_TYPE_MASK == 10));
                if clean && known && !denied(name, args) {
                    assert!(allowed, "{name}{args:?} is refused");
                }
            }
        }
    }

    #[test]
    fn the_profile_refuses_what_the_threat_model_names() {
        let p = build().unwrap();
        let allowed: Vec<&str> = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] == "SCMP_ACT_ALLOW" && r.get("args").is_none())
            .flat_map(|r| r["names"].as_array().unwrap().iter())
            .map(|n| n.as_str().unwrap())
            .collect();
        for name in [
            "io_uring_setup",
            "io_setup",
            "modify_ldt",
            "ptrace",
            "bpf",
            "userfaultfd",
            "mount",
            "unshare",
            "keyctl",
            "perf_event_open",
            "clone3",
            "socket",
        ] {
            assert!(
                !allowed.contains(&name),
                "{name} is allowed unconditionally"
            );
        }
        assert_eq!(p["architectures"], json!(["SCMP_ARCH_X86_64"]));
        // Every argument check of the deny list is spelled out here, or said to be unneeded.
        let checked = argument_rules();
        for d in Policy::shipped()
            .unwrap()
            .deny
            .iter()
            .filter(|d| !d.args.is_empty())
        {
            assert!(
                checked.iter().any(|(n, _)| *n == d.syscall)
                    || NOT_CHECKED.contains(&d.syscall.as_str()),
                "{}",
                d.syscall
            );
        }
        assert!(allowed.contains(&"read") && allowed.contains(&"chdir"));
    }
}
