//! Exit codes of `fleetbox run`: one per report status, documented in the README.

use fleetbox_proto::Status;

/// Bad flags, a malformed value, an unreadable file: nothing ran.
pub const EXIT_USAGE: u8 = 2;

pub fn exit_code_for(status: Status) -> u8 {
    match status {
        Status::Ok => 0,
        Status::Error => 1,
        Status::Timeout => 3,
        Status::MemoryLimit => 4,
        Status::OutputLimit => 5,
        Status::Killed => 6,
        Status::SandboxViolation => 7,
        Status::SandboxError => 8,
        Status::Refused => 9,
    }
}
