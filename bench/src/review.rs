//! The code review's speed: a 1,000-line program reviewed by the built-in reviewer (Ruff's
//! parser, every shipped rule), median of N runs, against parsing alone. Target: under 5 ms.

use std::time::{Duration, Instant};

use fleetbox_review::{BuiltinReviewer, Reviewer};

use crate::util::ms;

pub fn run(runs: usize) -> Result<(), String> {
    // Ordinary data-processing code with a few risky calls, repeated to 1,000 lines.
    let block = "import json, os\nimport subprocess as sp\n\n\
                 def work(items):\n    total = 0\n    for x in items:\n        total += x * x\n    return total\n\n\
                 data = json.load(open(os.environ.get('FLEETBOX_INPUT', 'input.json')))\n\
                 print(work(data['items']))\nsp.run(['true'])\n";
    let mut code = String::new();
    while code.lines().count() < 1000 {
        code.push_str(block);
    }
    let lines = code.lines().count();
    let reviewer = BuiltinReviewer::shipped();
    let time = |f: &dyn Fn()| {
        let mut t: Vec<Duration> = (0..runs + 3)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed()
            })
            .skip(3)
            .collect();
        t.sort();
        t[t.len() / 2]
    };
    let parse = time(&|| {
        let _ = ruff_python_parser::parse_module(&code);
    });
    let review = time(&|| {
        let _ = reviewer.review_code(&code);
    });
    let r = reviewer.review_code(&code).map_err(|e| e.to_string())?;
    println!("review: a {lines}-line program, median of {runs} runs");
    println!("  parse only          {:7.3} ms", ms(parse));
    println!(
        "  parse + all rules   {:7.3} ms   ({} findings, decision {})   target < 5 ms",
        ms(review),
        r.findings.len(),
        r.decision.as_str()
    );
    Ok(())
}
