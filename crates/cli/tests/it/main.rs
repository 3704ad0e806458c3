//! Integration tests for the `fleetbox` binary with real processes: the commands, and whole
//! clusters of `fleetbox server`/`agent`/`up` processes. The sandbox backends have their own
//! suite in `crates/sandbox/tests`.

mod cli;
mod cluster;
mod compose;
mod doctor;
mod egress;
mod install;
mod kubernetes;
mod support;
