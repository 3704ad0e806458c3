//! Integration tests for the `fleetbox` binary and the sandbox backends, with real processes.
//! Hostile programs live as files in `tests/fixtures/`.

mod cancel;
mod cli;
mod cluster;
mod jail;
mod process;
mod support;
mod warm;
