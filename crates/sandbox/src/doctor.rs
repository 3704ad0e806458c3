//! `fleetbox doctor`: what this host has of what each backend needs, and for each miss the
//! one-line fix.
//!
//! Every check is two parts: gathering what the host says (sysctls, a probe in a child
//! process, the Docker daemon's answer) and judging it ([`judge`] and the `*_check`
//! functions, pure and unit-tested), so a check can be shown failing without a broken host.

use std::path::{Path, PathBuf};

use crate::Backend;

/// What the doctor is asked about: a backend, with gVisor as the docker backend on `runsc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Process,
    Jail,
    Docker,
    Gvisor,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        match s {
            "process" => Some(Target::Process),
            "jail" => Some(Target::Jail),
            "docker" => Some(Target::Docker),
            "gvisor" | "runsc" => Some(Target::Gvisor),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Target::Process => "process",
            Target::Jail => "jail",
            Target::Docker => "docker",
            Target::Gvisor => "gvisor",
        }
    }

    pub fn of(backend: Backend, runtime: Option<&str>) -> Target {
        match backend {
            Backend::Process => Target::Process,
            Backend::Jail => Target::Jail,
            Backend::Docker if runtime == Some("runsc") => Target::Gvisor,
            Backend::Docker => Target::Docker,
        }
    }
}

/// One thing the host has or lacks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// The backend cannot run without it (a miss otherwise only weakens a limit).
    pub required: bool,
    pub detail: String,
    /// The one line that fixes a miss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: true,
            required: false,
            detail: detail.into(),
            fix: None,
        }
    }

    fn miss(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            required: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn required(mut self, yes: bool) -> Check {
        self.required = yes;
        self
    }
}

/// Whether the target can run: no required check missed.
pub fn can_run(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok || !c.required)
}

/// Where `/proc` and `/sys` are read (tests point it at a tree of their own).
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
}

impl Host {
    pub fn real() -> Host {
        Host { root: "/".into() }
    }

    pub fn at(root: &Path) -> Host {
        Host { root: root.into() }
    }

    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(path.trim_start_matches('/')))
            .ok()
            .map(|s| s.trim().to_string())
    }

    fn exists(&self, path: &str) -> bool {
        self.root.join(path.trim_start_matches('/')).exists()
    }

    /// Inside a container (Docker's default seccomp profile blocks `unshare`).
    fn in_container(&self) -> bool {
        self.exists("/.dockerenv")
            || self
                .read("/proc/1/cgroup")
                .is_some_and(|c| c.contains("docker") || c.contains("containerd"))
    }
}

/// What the host's sysctls say about user namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsernsFacts {
    pub has_ns: bool,
    pub max: Option<String>,
    pub debian_clone: Option<String>,
    pub apparmor_restrict: Option<String>,
    pub root: bool,
    pub in_container: bool,
}

impl UsernsFacts {
    pub fn of(host: &Host, root: bool) -> UsernsFacts {
        UsernsFacts {
            has_ns: host.exists("/proc/self/ns/user"),
            max: host.read("/proc/sys/user/max_user_namespaces"),
            debian_clone: host.read("/proc/sys/kernel/unprivileged_userns_clone"),
            apparmor_restrict: host.read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
            root,
            in_container: host.in_container(),
        }
    }
}

/// User namespaces: the sysctls and a real attempt (`probe`: the errno of `unshare` in a
/// child, `None` when it worked).
pub fn userns_check(f: &UsernsFacts, probe: Option<i32>) -> Check {
    const NAME: &str = "user namespaces";
    if !f.has_ns {
        return Check::miss(
            NAME,
            "the kernel has no user namespaces",
            "use a kernel built with CONFIG_USER_NS=y, or run with --backend docker",
        );
    }
    if f.max.as_deref() == Some("0") {
        return Check::miss(
            NAME,
            "disabled: user.max_user_namespaces = 0",
            "sysctl -w user.max_user_namespaces=15000 (and keep it in /etc/sysctl.d/)",
        );
    }
    if !f.root && f.debian_clone.as_deref() == Some("0") {
        return Check::miss(
            NAME,
            "unprivileged ones are disabled: kernel.unprivileged_userns_clone = 0",
            "sysctl -w kernel.unprivileged_userns_clone=1, or run the agent as root",
        );
    }
    if !f.root && f.apparmor_restrict.as_deref() == Some("1") && probe.is_some() {
        return Check::miss(
            NAME,
            "AppArmor restricts unprivileged ones: kernel.apparmor_restrict_unprivileged_userns = 1 (Ubuntu 23.10 and later)",
            "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or run the agent as root, or give fleetbox an AppArmor profile with `userns,`",
        );
    }
    match probe {
        None => Check::ok(NAME, "a user namespace can be made"),
        Some(errno) if f.in_container && errno == libc::EPERM => Check::miss(
            NAME,
            "unshare(CLONE_NEWUSER) is refused in this container (Docker's default seccomp profile)",
            CONTAINER_FIX,
        ),
        Some(errno) if errno == libc::ENOSPC => Check::miss(
            NAME,
            "the user namespace limit is reached (user.max_user_namespaces)",
            "sysctl -w user.max_user_namespaces=15000",
        ),
        Some(errno) => Check::miss(
            NAME,
            format!(
                "unshare(CLONE_NEWUSER) failed: {}",
                std::io::Error::from_raw_os_error(errno)
            ),
            "check the kernel's user namespace settings (user.max_user_namespaces, AppArmor, SELinux), or run with --backend docker",
        ),
    }
}

/// What a Docker container needs for the jail, measured with Docker 20.10 on runc: the
/// capability to make namespaces, no seccomp or AppArmor profile in the way, and `/proc` not
/// masked (masked paths make the kernel refuse the jail's own `/proc`).
pub const CONTAINER_FIX: &str = "run the container with --cap-add SYS_ADMIN --security-opt seccomp=unconfined --security-opt apparmor=unconfined --security-opt systempaths=unconfined, or give containerised agents --backend docker --docker-runtime runsc";

/// Mount, PID and network namespaces (inside a user namespace unless root; `probe` as for
/// user ones).
pub fn namespaces_check(probe: Option<i32>, in_container: bool) -> Check {
    const NAME: &str = "mount, pid, net namespaces";
    match probe {
        None => Check::ok(NAME, "can be made"),
        Some(errno) if in_container => Check::miss(
            NAME,
            format!(
                "unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET) is refused in this container: {}",
                std::io::Error::from_raw_os_error(errno)
            ),
            CONTAINER_FIX,
        ),
        Some(errno) => Check::miss(
            NAME,
            format!(
                "unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET) failed: {}",
                std::io::Error::from_raw_os_error(errno)
            ),
            "use a kernel with CONFIG_PID_NS, CONFIG_NET_NS and CONFIG_USER_NS, outside a container that forbids them",
        ),
    }
}

/// Cgroups: the layout found (`cgroup_v1`/`cgroup_v2`) or why runs would go without.
pub fn cgroups_check(found: Result<&str, &str>) -> Check {
    const NAME: &str = "cgroups";
    match found {
        Ok(version) => Check::ok(
            NAME,
            format!("{version}: memory, pids and cpu limits are enforced per run"),
        ),
        Err(why) if why.contains("v2") => Check::miss(
            NAME,
            format!(
                "{why}: runs go without cgroup limits (memory falls back to RLIMIT_AS, processes to RLIMIT_NPROC)"
            ),
            "run the agent as root, or under systemd with Delegate=yes (a unit with `Delegate=memory pids cpu`)",
        ),
        Err(why) => Check::miss(
            NAME,
            format!(
                "{why}: runs go without cgroup limits (memory falls back to RLIMIT_AS, processes to RLIMIT_NPROC)"
            ),
            "mount cgroup v2 (`mount -t cgroup2 none /sys/fs/cgroup`) or the v1 memory and pids controllers, and run the agent as root",
        ),
    }
}

/// Seccomp filters, from `/proc/sys/kernel/seccomp/actions_avail`.
pub fn seccomp_check(actions: Option<&str>) -> Check {
    const NAME: &str = "seccomp";
    let Some(actions) = actions else {
        return Check::miss(
            NAME,
            "the kernel has no seccomp filters (no /proc/sys/kernel/seccomp/actions_avail)",
            "use a kernel built with CONFIG_SECCOMP_FILTER=y",
        );
    };
    let have: Vec<&str> = actions.split_whitespace().collect();
    let missing: Vec<&str> = ["kill_process", "errno", "log"]
        .into_iter()
        .filter(|a| !have.contains(a))
        .collect();
    if missing.is_empty() {
        Check::ok(NAME, format!("filters with {}", have.join(", ")))
    } else {
        Check::miss(
            NAME,
            format!("the kernel lacks the filter actions {}", missing.join(", ")),
            "use a kernel of 4.14 or later",
        )
    }
}

/// Landlock: the ABI the kernel offers (`Err(errno)`: none).
pub fn landlock_check(abi: Result<i64, i32>) -> Check {
    const NAME: &str = "landlock";
    match abi {
        Ok(v) if v >= 5 => Check::ok(NAME, format!("ABI {v}: every rule the jail asks for")),
        Ok(v) => Check::ok(
            NAME,
            format!(
                "ABI {v}: the jail's rules need 5 in full; older ABIs enforce fewer (each run's report says which)"
            ),
        ),
        Err(errno) if errno == libc::EOPNOTSUPP => Check::miss(
            NAME,
            "in the kernel but off: the filesystem is confined by the mount namespace alone",
            "boot with landlock in the LSM list (e.g. lsm=landlock,lockdown,yama,apparmor)",
        ),
        Err(_) => Check::miss(
            NAME,
            "not in this kernel: the filesystem is confined by the mount namespace alone",
            "use a kernel of 5.13 or later built with CONFIG_SECURITY_LANDLOCK=y",
        ),
    }
}

/// The interpreter, and which of the scientific packages it has.
pub fn python_check(found: Result<(String, String), String>) -> Vec<Check> {
    match found {
        Err(why) => vec![Check::miss(
            "python",
            why,
            "apt install python3 (or give its path with --python)",
        )],
        Ok((python, missing)) => {
            let mut out = vec![Check::ok("python", python)];
            out.push(if missing.is_empty() {
                Check::ok("scientific packages", "numpy, pandas and scipy import")
            } else {
                Check::miss(
                    "scientific packages",
                    format!("not installed: {missing}"),
                    format!(
                        "apt install {} (or ask for them per job with `environment`)",
                        missing
                            .split(", ")
                            .map(|m| format!("python3-{m}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                )
            });
            out
        }
    }
}

/// Everything `target` needs, gathered from this host.
pub async fn examine(
    target: Target,
    python: Option<&Path>,
    docker: &crate::docker::DockerConfig,
) -> Vec<Check> {
    let host = Host::real();
    let mut out = Vec::new();
    match target {
        Target::Jail => {
            let root = crate::sys::is_root();
            let facts = UsernsFacts::of(&host, root);
            out.push(
                userns_check(&facts, probe_unshare(libc::CLONE_NEWUSER, false)).required(true),
            );
            out.push(
                namespaces_check(
                    probe_unshare(
                        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET,
                        !root,
                    ),
                    facts.in_container,
                )
                .required(true),
            );
            out.push(cgroups_check(
                crate::cgroup::Cgroups::detect(None).map(|c| c.version()),
            ));
            out.push(
                seccomp_check(
                    host.read("/proc/sys/kernel/seccomp/actions_avail")
                        .as_deref(),
                )
                .required(true),
            );
            out.push(landlock_check(landlock_abi()));
            out.extend(python_checks(python));
        }
        Target::Process => out.extend(python_checks(python)),
        Target::Docker | Target::Gvisor => {
            out.extend(docker_checks(target, docker).await);
        }
    }
    out
}

fn python_checks(explicit: Option<&Path>) -> Vec<Check> {
    let found = crate::python::resolve(explicit)
        .map_err(|e| e.to_string())
        .and_then(|py| {
            let probe = std::process::Command::new(&py.path)
                .args([
                    "-c",
                    "import importlib.util as u; print(', '.join(m for m in ('numpy', 'pandas', 'scipy') if u.find_spec(m) is None))",
                ])
                .output()
                .map_err(|e| format!("`{}` does not run: {e}", py.path.display()))?;
            if !probe.status.success() {
                return Err(format!("`{}` does not run Python code", py.path.display()));
            }
            let missing = String::from_utf8_lossy(&probe.stdout).trim().to_string();
            Ok((format!("{} (Python {})", py.path.display(), py.version), missing))
        });
    let mut checks = python_check(found);
    if let Some(first) = checks.first_mut() {
        first.required = true;
    }
    checks
}

async fn docker_checks(target: Target, config: &crate::docker::DockerConfig) -> Vec<Check> {
    let daemon = match crate::docker::connect(config.host.as_deref()).await {
        Ok(d) => d,
        Err(e) => {
            return vec![
                Check::miss(
                    "docker daemon",
                    e.to_string(),
                    "apt install docker.io && systemctl start docker (or `dockerd &`)",
                )
                .required(true),
            ];
        }
    };
    let mut out = Vec::new();
    let info = daemon.info().await;
    let version = info
        .as_ref()
        .ok()
        .and_then(|i| i.server_version.clone())
        .unwrap_or_else(|| "?".into());
    out.push(Check::ok("docker daemon", format!("Docker {version}")).required(true));
    let image = daemon.inspect_image(&config.image).await;
    out.push(
        match image {
            Ok(_) => Check::ok("image", format!("`{}` is on this host", config.image)),
            Err(_) => Check::miss(
                "image",
                format!("`{}` is not on this host", config.image),
                format!("fleetbox image build --name {}", config.image),
            ),
        }
        .required(true),
    );
    if target == Target::Gvisor {
        let runtimes: Vec<String> = info
            .ok()
            .and_then(|i| i.runtimes)
            .map(|r| r.into_keys().collect())
            .unwrap_or_default();
        out.push(
            if runtimes.iter().any(|r| r == "runsc") {
                Check::ok("gvisor runtime", "`runsc` is registered with the daemon")
            } else {
                Check::miss(
                    "gvisor runtime",
                    format!(
                        "`runsc` is not registered with the daemon (it has: {})",
                        runtimes.join(", ")
                    ),
                    "install gVisor's runsc, then `runsc install && systemctl restart docker`",
                )
            }
            .required(true),
        );
    }
    out
}

/// Try `unshare(flags)` in a child process (first into a user namespace when `in_userns`):
/// `None` when it worked, else the errno.
fn probe_unshare(flags: libc::c_int, in_userns: bool) -> Option<i32> {
    // SAFETY: the child only calls async-signal-safe functions (unshare, _exit) before exiting.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return Some(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        if pid == 0 {
            if in_userns && libc::unshare(libc::CLONE_NEWUSER) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            let code = if libc::unshare(flags) == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(code);
        }
        let mut status = 0;
        if libc::waitpid(pid, &mut status, 0) < 0 {
            return Some(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        match libc::WEXITSTATUS(status) {
            0 if libc::WIFEXITED(status) => None,
            code => Some(code),
        }
    }
}

/// The Landlock ABI version (`landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`).
fn landlock_abi() -> Result<i64, i32> {
    // SAFETY: with a null attribute and size 0 the call only returns the ABI version.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    if v < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(files: &[(&str, &str)]) -> (tempfile::TempDir, Host) {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let h = Host::at(dir.path());
        (dir, h)
    }

    #[test]
    fn each_user_namespace_setting_is_named_with_its_fix() {
        let (_d, ok) = host(&[
            ("/proc/self/ns/user", ""),
            ("/proc/sys/user/max_user_namespaces", "15000"),
        ]);
        assert!(userns_check(&UsernsFacts::of(&ok, false), None).ok);
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<i32>, &'a str, &'a str);
        let cases: [Case; 5] = [
            (&[], None, "no user namespaces", "CONFIG_USER_NS"),
            (
                &[
                    ("/proc/self/ns/user", ""),
                    ("/proc/sys/user/max_user_namespaces", "0"),
                ],
                None,
                "max_user_namespaces = 0",
                "sysctl -w user.max_user_namespaces=",
            ),
            (
                &[
                    ("/proc/self/ns/user", ""),
                    ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                ],
                None,
                "unprivileged_userns_clone = 0",
                "sysctl -w kernel.unprivileged_userns_clone=1",
            ),
            (
                &[
                    ("/proc/self/ns/user", ""),
                    (
                        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
                        "1",
                    ),
                ],
                Some(libc::EACCES),
                "AppArmor",
                "apparmor_restrict_unprivileged_userns=0",
            ),
            (
                &[("/proc/self/ns/user", ""), ("/.dockerenv", "")],
                Some(libc::EPERM),
                "container",
                "seccomp=unconfined",
            ),
        ];
        for (files, probe, detail, fix) in cases {
            let (_d, h) = host(files);
            let c = userns_check(&UsernsFacts::of(&h, false), probe);
            assert!(!c.ok, "{files:?}");
            assert!(c.detail.contains(detail), "{c:?}");
            assert!(c.fix.as_deref().unwrap().contains(fix), "{c:?}");
        }
        // Root is not held back by the unprivileged switches.
        let (_d, h) = host(&[
            ("/proc/self/ns/user", ""),
            ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ]);
        assert!(userns_check(&UsernsFacts::of(&h, true), None).ok);
    }

    #[test]
    fn the_other_checks_judge_what_the_host_said() {
        assert!(cgroups_check(Ok("cgroup_v2")).ok);
        let v2 = cgroups_check(Err(
            "cgroup v2 is mounted but no writable parent group was found",
        ));
        assert!(!v2.ok && v2.fix.unwrap().contains("Delegate="));
        assert!(!cgroups_check(Err("no cgroup mounts")).ok);
        assert!(
            seccomp_check(Some(
                "kill_process kill_thread trap errno user_notif trace log allow"
            ))
            .ok
        );
        assert!(!seccomp_check(None).ok);
        assert!(!seccomp_check(Some("kill_thread trap errno allow")).ok);
        assert!(landlock_check(Ok(6)).ok);
        assert!(landlock_check(Ok(3)).detail.contains("ABI 3"));
        assert!(
            landlock_check(Err(libc::EOPNOTSUPP))
                .fix
                .unwrap()
                .contains("lsm=")
        );
        assert!(!landlock_check(Err(libc::ENOSYS)).ok);
        let py = python_check(Ok((
            "/usr/bin/python3 (Python 3.11)".into(),
            "pandas, scipy".into(),
        )));
        assert!(py[0].ok && !py[1].ok);
        assert_eq!(
            py[1].fix.as_deref(),
            Some(
                "apt install python3-pandas python3-scipy (or ask for them per job with `environment`)"
            )
        );
        let checks = [Check::ok("a", ""), Check::miss("b", "", "x")];
        assert!(can_run(&checks));
        assert!(!can_run(&[Check::miss("b", "", "x").required(true)]));
    }

    #[test]
    fn this_host_can_make_the_jails_namespaces() {
        // The test machines run the jail (see ENVIRONMENT.md): the probes must agree.
        if crate::jail::host_supports_jail().is_err() {
            return;
        }
        assert_eq!(probe_unshare(libc::CLONE_NEWUSER, false), None);
        assert_eq!(
            probe_unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET,
                !crate::sys::is_root()
            ),
            None
        );
        assert!(landlock_abi().is_ok());
    }
}
