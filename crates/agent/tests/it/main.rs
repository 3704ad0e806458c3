//! Integration tests of the agent: in-process agents against an in-process coordinator
//! (`fleetbox-testkit`), on the `process` backend.

mod delivery;
mod metrics;
mod policy;
