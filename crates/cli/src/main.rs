fn main() -> std::process::ExitCode {
    fleetbox::main()
}
