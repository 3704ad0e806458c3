//! What an agent tells the coordinator about its machine.

use fleetbox_proto::api::MachineFacts;
use fleetbox_sandbox::Backend;

pub fn machine_facts(
    backend: Backend,
    python: Option<&std::path::Path>,
    machine_id: Option<&str>,
) -> MachineFacts {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
    };
    // systemd's id, else D-Bus's, else the host name: whatever tells two machines apart.
    let machine_id = machine_id
        .map(str::to_string)
        .or_else(|| read("/etc/machine-id"))
        .or_else(|| read("/var/lib/dbus/machine-id"))
        .or_else(|| read("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    MachineFacts {
        machine_id,
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: mem_total().unwrap_or(0),
        python: fleetbox_sandbox::python::resolve(python)
            .map(|p| p.version)
            .unwrap_or_else(|e| format!("unavailable: {e}")),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        backend: backend.as_str().into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
