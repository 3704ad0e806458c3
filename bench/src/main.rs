//! Fleetbox benchmarks. Each prints medians and ratios against a baseline measured in the same
//! run, so numbers from different machines compare by ratio.
//!
//! ```text
//! cargo run --release -p fleetbox-bench -- startup   [--runs 50]   # fleetbox run vs bare python3
//! cargo run --release -p fleetbox-bench -- jail      [--runs 50]   # jail vs python3, bwrap, docker
//! ```

mod jail;
mod startup;
mod util;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("help");
    let runs = util::flag(&args, "--runs").unwrap_or(50);
    let result = match which {
        "startup" => startup::run(runs),
        "jail" => jail::run(runs),
        _ => {
            eprintln!("usage: fleetbox-bench startup|jail [--runs N]");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}
