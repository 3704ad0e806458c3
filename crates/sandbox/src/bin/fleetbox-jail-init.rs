//! The jail's helper on its own: what `fleetbox __jail-init` does, for embedders of the
//! sandbox library that have no `fleetbox` binary to point `SandboxConfig::jail_helper` at
//! (and for this crate's own tests, which run multi-threaded and so take the helper path).

fn main() {
    // Called as `fleetbox-jail-init __jail-init`, like the `fleetbox` binary; anything else
    // is a mistake worth a clear word rather than a half-started jail.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == fleetbox_sandbox::jail::init::INIT_ARG)
    {
        fleetbox_sandbox::jail::init::helper_main();
    }
    #[allow(clippy::print_stderr)]
    {
        eprintln!(
            "fleetbox-jail-init: started by the jail supervisor only (`{}`)",
            fleetbox_sandbox::jail::init::INIT_ARG
        );
    }
    std::process::exit(2);
}
