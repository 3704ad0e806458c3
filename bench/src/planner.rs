//! The planner's costs: compiling and name-checking a rule, evaluating one over results of
//! growing size (against a plain Rust filter of the same data, the baseline), refusing a
//! nested expression by its step bound, and the latency from a parent's completion to its
//! child's creation on an in-process coordinator (against the parent's own run time).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetbox_proto::JobState;
use fleetbox_server::planner::expr::{Rule, Vars};
use fleetbox_testkit::{Coordinator, Db};
use serde_json::json;

use crate::util::ms;

fn median(mut t: Vec<Duration>) -> Duration {
    t.sort();
    t[t.len() / 2]
}

pub fn run(runs: usize, chains: usize) -> Result<(), String> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let source = "summary.success_rate == 1.0 && result.filter(x, x >= summary.accepted * 5).size() > 0";
        let compile = median(
            (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    let _ = Rule::compile(source);
                    t.elapsed()
                })
                .collect(),
        );
        println!("planner: median of {runs} runs");
        println!("  compile + name check of a rule   {:8.3} ms", ms(compile));
        let filter = Arc::new(Rule::compile("result.filter(x, x >= summary.accepted * 5)").map_err(|e| e.to_string())?);
        for n in [1_000u64, 100_000, 500_000, 1_000_000] {
            let items: Vec<u64> = (0..n).collect();
            let vars = Arc::new(Vars::new([
                ("summary", json!({"accepted": 4})),
                ("result", json!(items)),
                ("job", json!({})),
            ]));
            let steps = filter.steps(&vars);
            let t = Instant::now();
            let out = match filter.evaluate(vars.clone()).await {
                Ok(out) => out,
                Err(e) => {
                    println!(
                        "  filter over {n:>9} items        refused in {:.3} ms: {e}",
                        ms(t.elapsed())
                    );
                    continue;
                }
            };
            let cel = t.elapsed();
            let t = Instant::now();
            let plain: Vec<u64> = items.iter().copied().filter(|x| *x >= 20).collect();
            let rust = t.elapsed().max(Duration::from_nanos(1));
            assert_eq!(out.as_array().map(Vec::len), Some(plain.len()));
            println!(
                "  filter over {n:>9} items        {:8.3} ms   ({:.1} M items/s; bound {steps} steps; plain Rust {:.3} ms, {:.0}x)",
                ms(cel),
                n as f64 / cel.as_secs_f64() / 1e6,
                ms(rust),
                cel.as_secs_f64() / rust.as_secs_f64()
            );
        }
        let bomb = Arc::new(
            Rule::compile("result.all(a, result.all(b, result.all(c, a + b + c >= 0)))")
                .map_err(|e| e.to_string())?,
        );
        let vars = Arc::new(Vars::new([("result", json!((0..3000).collect::<Vec<u64>>()))]));
        let t = Instant::now();
        let refused = bomb.evaluate(vars).await;
        println!(
            "  3 nested passes over 3,000 items {:8.3} ms   refused by the step bound: {}",
            ms(t.elapsed()),
            refused.is_err()
        );

        // Parent completion to child creation, in-process coordinator and agent.
        let mut c = Coordinator::start(Db::Sqlite)
            .await
            .ok_or("no coordinator")?;
        c.agent("a", Default::default());
        let spec = fleetbox_proto::JobSpec::from_toml(
            "name = \"p\"\ncode = \"print(1)\"\nshards = { count = 1 }\n\
             [[followup]]\nwhen = \"result == [1]\"\n[followup.then]\nname = \"c\"\ncode = \"print(2)\"\nshards = { count = 1 }\n",
        )
        .map_err(|e| e.to_string())?;
        let (mut gaps, mut runs_ms) = (Vec::new(), Vec::new());
        for _ in 0..chains {
            let parent = c.run(&spec, Duration::from_secs(60)).await;
            if parent.state != JobState::Completed {
                return Err(format!("parent ended {:?}", parent.state));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            let chain = loop {
                let chain = c.client.chain(&parent.id).await.map_err(|e| e.to_string())?;
                if chain.jobs.len() == 2 {
                    break chain;
                }
                if Instant::now() > deadline {
                    return Err("no child".into());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let p = &chain.jobs[0];
            let finished = p.finished_at.unwrap_or(p.created_at);
            gaps.push(Duration::from_millis((chain.jobs[1].created_at - finished).max(0) as u64));
            runs_ms.push(Duration::from_millis((finished - p.created_at).max(0) as u64));
        }
        let (gap, own) = (median(gaps), median(runs_ms));
        println!(
            "  parent done -> child created     {:8.3} ms   (median of {chains}; the parent's own submit-to-result {:.0} ms, ratio {:.2})",
            ms(gap),
            ms(own),
            gap.as_secs_f64() / own.as_secs_f64().max(1e-9)
        );
        c.stop().await;
        Ok(())
    })
}
