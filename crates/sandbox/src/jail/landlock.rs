//! Landlock: read-only everywhere the program can see, read-write only in its workspace,
//! `/tmp`, `/dev/shm`, the harmless device nodes, and (for the sandbox's own work: building an
//! environment) the paths it is given. Best effort: on kernels without Landlock
//! (or with an older ABI) the report says how much was enforced.

use landlock::{
    ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    path_beneath_rules,
};

/// Apply to the calling process; `writable` are more paths the process may write under.
/// Returns `fully_enforced`, `partially_enforced`, `not_enforced` or `error: ...`.
pub fn restrict(writable: &[&std::path::Path]) -> String {
    let abi = ABI::V5;
    let result = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                ["/work", "/tmp", "/dev/shm"],
                AccessFs::from_all(abi),
            ))
        })
        .and_then(|r| r.add_rules(path_beneath_rules(writable, AccessFs::from_all(abi))))
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                [
                    "/dev/null",
                    "/dev/zero",
                    "/dev/full",
                    "/dev/urandom",
                    "/dev/random",
                ],
                AccessFs::from_all(abi),
            ))
        })
        .and_then(|r| r.restrict_self());
    match result {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => "fully_enforced",
            RulesetStatus::PartiallyEnforced => "partially_enforced",
            RulesetStatus::NotEnforced => "not_enforced",
        }
        .to_string(),
        Err(e) => format!("error: {e}"),
    }
}
