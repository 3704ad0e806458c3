#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    fleetbox::main()
}
