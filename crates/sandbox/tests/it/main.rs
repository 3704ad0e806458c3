//! Integration tests for the sandbox backends, with real processes. Hostile programs live as
//! files in `tests/fixtures/` at the workspace root.

mod cancel;
mod cleanup;
mod compat;
mod docker;
mod environment;
mod jail;
mod process;
mod quota;
mod session;
mod support;
mod warm;
