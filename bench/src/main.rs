//! Fleetbox benchmarks. Each prints medians and ratios against a baseline measured in the same
//! run, so numbers from different machines compare by ratio.
//!
//! ```text
//! cargo run --release -p fleetbox-bench -- startup   [--runs 50]   # fleetbox run vs bare python3
//! cargo run --release -p fleetbox-bench -- jail      [--runs 50]   # jail vs python3, bwrap, docker
//! cargo run --release -p fleetbox-bench -- docker    [--runs 20]   # docker backend vs docker run, runsc, jail
//! cargo run --release -p fleetbox-bench -- throughput [--tasks 50000] [--executors 4] [--batch 500] [--rounds 5]
//! cargo run --release -p fleetbox-bench -- tenancy   [--tasks 20000] [--executors 4] [--batch 200] [--rounds 3] [--tenants 10]
//! cargo run --release -p fleetbox-bench -- e2e       [--shards 500] [--backend process]
//! cargo run --release -p fleetbox-bench -- audit     [--entries 200000] [--batch 1000]
//! cargo run --release -p fleetbox-bench -- verify    [--shards 300] [--runs 10]
//! cargo run --release -p fleetbox-bench -- trust     [--runs 3000]  # the adaptive policy simulated
//! cargo run --release -p fleetbox-bench -- env       [--runs 50] [--builds 3]
//! cargo run --release -p fleetbox-bench -- run       [--calls 200]
//! cargo run --release -p fleetbox-bench -- idle      [--agents 1000] [--seconds 20]   # idle agents' cost
//! cargo run --release -p fleetbox-bench -- scale     [--shards 1000000] [--executors 4] [--batch 500]
//! cargo run --release -p fleetbox-bench -- review    [--runs 50]
//! cargo run --release -p fleetbox-bench -- planner   [--runs 50] [--chains 20]
//! ```

#![forbid(unsafe_code)]

mod audit;
mod docker;
mod e2e;
mod env;
mod idle;
mod jail;
mod planner;
mod review;
mod run;
mod scale;
mod startup;
mod throughput;
mod trust_sim;
mod util;
mod verify;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("help");
    let runs = util::flag(&args, "--runs").unwrap_or(50);
    let result = match which {
        "startup" => startup::run(runs),
        "jail" => jail::run(runs),
        "docker" => docker::run(util::flag(&args, "--runs").unwrap_or(20)),
        "throughput" => throughput::run(
            util::flag(&args, "--tasks").unwrap_or(50_000),
            util::flag(&args, "--executors").unwrap_or(4),
            util::flag(&args, "--batch").unwrap_or(500) as u32,
            util::flag(&args, "--rounds").unwrap_or(5),
        ),
        "tenancy" => throughput::tenancy(
            util::flag(&args, "--tasks").unwrap_or(20_000),
            util::flag(&args, "--executors").unwrap_or(4),
            util::flag(&args, "--batch").unwrap_or(200) as u32,
            util::flag(&args, "--rounds").unwrap_or(3),
            util::flag(&args, "--tenants").unwrap_or(10),
        ),
        "audit" => audit::run(
            util::flag(&args, "--entries").unwrap_or(200_000),
            util::flag(&args, "--batch").unwrap_or(1000),
        ),
        "verify" => verify::run(
            util::flag(&args, "--shards").unwrap_or(300),
            util::flag(&args, "--runs").unwrap_or(10),
        ),
        "review" => review::run(runs),
        "trust" => trust_sim::run(util::flag(&args, "--runs").unwrap_or(3000)),
        "planner" => planner::run(runs, util::flag(&args, "--chains").unwrap_or(20)),
        "run" => run::run(util::flag(&args, "--calls").unwrap_or(200)),
        "idle" => idle::run(
            util::flag(&args, "--agents").unwrap_or(1000),
            util::flag(&args, "--seconds").unwrap_or(20) as u64,
        ),
        "env" => env::run(runs, util::flag(&args, "--builds").unwrap_or(3)),
        "scale" => scale::run(
            util::flag(&args, "--shards").unwrap_or(1_000_000),
            util::flag(&args, "--executors").unwrap_or(4),
            util::flag(&args, "--batch").unwrap_or(500) as u32,
        ),
        "e2e" => e2e::run(
            util::flag(&args, "--shards").unwrap_or(500),
            args.iter()
                .position(|a| a == "--backend")
                .and_then(|i| args.get(i + 1))
                .map(String::as_str)
                .unwrap_or("process"),
        ),
        _ => {
            eprintln!(
                "usage: fleetbox-bench startup|jail|docker|throughput|tenancy|idle|scale|e2e|audit|verify|trust|env|run|review|planner [--runs N] [--tasks N] [--shards N] [--entries N]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}
