//! Result review: which shards and agents stand out from the rest of their job.
//!
//! [`review`] looks at one finished job's shards: their numeric values, run time, CPU, peak
//! memory and output size (a shard that stands out), each agent's results against its peers'
//! (an agent that stands out), and failures (an error rate that spikes, for the job or for one
//! agent). [`outliers`] is the statistic under all of it.
//!
//! Robust statistics, so that the outliers themselves cannot hide one another: the median and
//! the median absolute deviation (MAD), and the modified z-score of Iglewicz and Hoaglin,
//! `0.6745 · (x − median) / MAD`, with `|z| > 3.5` an outlier. When more than half the values
//! are equal (MAD = 0), the mean absolute deviation stands in (`1.2533 · meanAD`); when every
//! value is the same, nothing stands out.

/// A shard whose value stands out.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlier {
    pub shard: u64,
    pub value: f64,
    pub median: f64,
    /// The modified z-score.
    pub score: f64,
}

/// Fewest values worth judging.
pub const MIN_VALUES: usize = 5;
/// `|z|` above which a value is an outlier.
pub const THRESHOLD: f64 = 3.5;

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The outliers among `(shard, value)`, most extreme first.
pub fn outliers(values: &[(u64, f64)]) -> Vec<Outlier> {
    let finite: Vec<(u64, f64)> = values
        .iter()
        .copied()
        .filter(|(_, v)| v.is_finite())
        .collect();
    if finite.len() < MIN_VALUES {
        return Vec::new();
    }
    let mut sorted: Vec<f64> = finite.iter().map(|(_, v)| *v).collect();
    sorted.sort_by(f64::total_cmp);
    let (med, scale) = scale_of(&sorted);
    if scale <= 0.0 {
        return Vec::new();
    }
    let mut out: Vec<Outlier> = finite
        .iter()
        .map(|&(shard, value)| Outlier {
            shard,
            value,
            median: med,
            score: (value - med) / scale,
        })
        .filter(|o| o.score.abs() > THRESHOLD)
        .collect();
    out.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
    out
}

/// One shard of a finished job, as result review sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardFacts {
    pub shard: u64,
    /// Who ran the attempt that settled it.
    pub agent: String,
    /// Whether it failed (rejected or dead) rather than being accepted.
    pub failed: bool,
    /// Its value, when it is a number.
    pub value: Option<f64>,
    pub wall_ms: f64,
    pub cpu_ms: f64,
    pub peak_memory: f64,
    pub output_bytes: f64,
}

/// Something result review found.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    /// `outlier` (a shard), `agent_outlier` (an agent against its peers), `error_rate`.
    pub kind: &'static str,
    /// `value`, `wall_ms`, `cpu_ms`, `peak_memory`, `output_bytes`, `errors`.
    pub metric: &'static str,
    /// How far out: a modified z-score, or for error rates the failed share (0–1).
    pub score: f64,
    pub shards: Vec<u64>,
    pub agents: Vec<String>,
    pub explanation: String,
}

/// A resource measure only counts as an outlier when it is also this many times the median.
const RESOURCE_FACTOR: f64 = 3.0;
/// A job whose failed share passes this (with at least [`MIN_FAILURES`]) has an error spike.
pub const ERROR_RATE: f64 = 0.2;
pub const MIN_FAILURES: usize = 3;
/// Results an agent needs in a job before it is compared with its peers.
pub const MIN_AGENT_SHARDS: usize = 3;

/// The median of `sorted` and the spread a modified z-score divides by: MAD / 0.6745, or
/// 1.2533 · the mean absolute deviation when the MAD is 0.
fn scale_of(sorted: &[f64]) -> (f64, f64) {
    let med = median(sorted);
    let mut dev: Vec<f64> = sorted.iter().map(|v| (v - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    let mad = median(&dev);
    let scale = if mad > 0.0 {
        mad / 0.6745
    } else {
        1.2533 * dev.iter().sum::<f64>() / dev.len() as f64
    };
    (med, scale)
}

/// Review one finished job's shards; most extreme first, at most `limit`.
pub fn review(facts: &[ShardFacts], limit: usize) -> Vec<Anomaly> {
    let mut out = Vec::new();
    let ok: Vec<&ShardFacts> = facts.iter().filter(|f| !f.failed).collect();
    type Measure = fn(&ShardFacts) -> Option<f64>;
    // (metric, measure, the least excess over the median that counts; `None`: a value, judged
    // both ways by its z-score alone).
    let measures: [(&'static str, Measure, Option<f64>); 5] = [
        ("value", |f| f.value, None),
        ("wall_ms", |f| Some(f.wall_ms), Some(1000.0)),
        ("cpu_ms", |f| Some(f.cpu_ms), Some(1000.0)),
        (
            "peak_memory",
            |f| Some(f.peak_memory),
            Some(64.0 * 1024.0 * 1024.0),
        ),
        (
            "output_bytes",
            |f| Some(f.output_bytes),
            Some(64.0 * 1024.0),
        ),
    ];
    // Resources count only on the costly side, by a real factor and a real amount (a shard
    // 3.6 MADs slower but 2 ms slower is noise).
    let costly = |floor: Option<f64>, value: f64, median: f64| match floor {
        None => true,
        Some(floor) => value >= median * RESOURCE_FACTOR && value - median >= floor,
    };
    for (metric, get, floor) in measures {
        let values: Vec<(u64, f64)> = ok.iter().filter_map(|f| Some((f.shard, get(f)?))).collect();
        for o in outliers(&values) {
            if !costly(floor, o.value, o.median) {
                continue;
            }
            let agent = ok
                .iter()
                .find(|f| f.shard == o.shard)
                .map(|f| f.agent.clone())
                .unwrap_or_default();
            out.push(Anomaly {
                kind: "outlier",
                metric,
                score: o.score,
                shards: vec![o.shard],
                agents: vec![agent.clone()],
                explanation: format!(
                    "shard {}: {metric} {} is far from the job's median {} (robust z-score {:.1}; run by {agent})",
                    o.shard, o.value, o.median, o.score
                ),
            });
        }
        // Agents against their peers: one agent's median against everyone else's spread.
        let mut agents: Vec<&str> = ok.iter().map(|f| f.agent.as_str()).collect();
        agents.sort_unstable();
        agents.dedup();
        if agents.len() < 2 {
            continue;
        }
        for agent in agents {
            let (mut mine, mut others) = (Vec::new(), Vec::new());
            for f in &ok {
                if let Some(v) = get(f).filter(|v| v.is_finite()) {
                    if f.agent == agent {
                        mine.push(v);
                    } else {
                        others.push(v);
                    }
                }
            }
            if mine.len() < MIN_AGENT_SHARDS || others.len() < MIN_VALUES {
                continue;
            }
            mine.sort_by(f64::total_cmp);
            others.sort_by(f64::total_cmp);
            let theirs = scale_of(&others);
            if theirs.1 <= 0.0 {
                continue;
            }
            let m = median(&mine);
            let score = (m - theirs.0) / theirs.1;
            if score.abs() <= THRESHOLD || !costly(floor, m, theirs.0) {
                continue;
            }
            out.push(Anomaly {
                kind: "agent_outlier",
                metric,
                score,
                shards: ok
                    .iter()
                    .filter(|f| f.agent == agent)
                    .map(|f| f.shard)
                    .collect(),
                agents: vec![agent.to_string()],
                explanation: format!(
                    "agent {agent}: the median {metric} of its {} shards is {m}, its peers' is {} (robust z-score {score:.1})",
                    mine.len(),
                    theirs.0
                ),
            });
        }
    }
    // Failures: for the job, and for an agent that fails where its peers do not.
    let failed: Vec<&ShardFacts> = facts.iter().filter(|f| f.failed).collect();
    if !facts.is_empty() && failed.len() >= MIN_FAILURES {
        let rate = failed.len() as f64 / facts.len() as f64;
        if rate > ERROR_RATE {
            out.push(Anomaly {
                kind: "error_rate",
                metric: "errors",
                score: rate,
                shards: failed.iter().map(|f| f.shard).collect(),
                agents: Vec::new(),
                explanation: format!(
                    "{} of {} shards failed ({:.0}%)",
                    failed.len(),
                    facts.len(),
                    rate * 100.0
                ),
            });
        }
        let mut agents: Vec<&str> = facts.iter().map(|f| f.agent.as_str()).collect();
        agents.sort_unstable();
        agents.dedup();
        for agent in agents.iter().filter(|_| agents.len() > 1) {
            let mine: Vec<&&ShardFacts> = failed.iter().filter(|f| f.agent == *agent).collect();
            let ran = facts.iter().filter(|f| f.agent == *agent).count();
            let (others_failed, others_ran) = (failed.len() - mine.len(), facts.len() - ran);
            if mine.len() < MIN_FAILURES || others_ran == 0 {
                continue;
            }
            let (own, peers) = (
                mine.len() as f64 / ran as f64,
                others_failed as f64 / others_ran as f64,
            );
            if own > 0.5 && own > 2.0 * peers {
                out.push(Anomaly {
                    kind: "agent_outlier",
                    metric: "errors",
                    score: own,
                    shards: mine.iter().map(|f| f.shard).collect(),
                    agents: vec![agent.to_string()],
                    explanation: format!(
                        "agent {agent}: {} of its {ran} shards failed ({:.0}%), its peers {:.0}%",
                        mine.len(),
                        own * 100.0,
                        peers * 100.0
                    ),
                });
            }
        }
    }
    out.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
    out.truncate(limit);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(values: &[f64]) -> Vec<(u64, f64)> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, *v))
            .collect()
    }

    #[test]
    fn one_wild_value_is_named_and_uniform_results_are_not() {
        let mut v: Vec<f64> = (0..40).map(|i| 100.0 + (i % 7) as f64).collect();
        v[17] = 1e6;
        let o = outliers(&shards(&v));
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!(o[0].shard, 17);
        assert!(o[0].score > 1000.0);
        let uniform: Vec<f64> = (0..40).map(|i| 100.0 + (i % 7) as f64).collect();
        assert!(outliers(&shards(&uniform)).is_empty());
        assert!(outliers(&shards(&[5.0; 30])).is_empty());
    }

    #[test]
    fn mostly_equal_values_still_show_the_odd_one() {
        let mut v = vec![10.0; 30];
        v[3] = 500.0;
        let o = outliers(&shards(&v));
        assert_eq!(o.iter().map(|o| o.shard).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn too_few_values_are_not_judged() {
        assert!(outliers(&shards(&[1.0, 2.0, 1e9])).is_empty());
    }

    fn facts(n: u64, agent: impl Fn(u64) -> &'static str) -> Vec<ShardFacts> {
        (0..n)
            .map(|i| ShardFacts {
                shard: i,
                agent: agent(i).to_string(),
                failed: false,
                value: Some(100.0 + (i % 5) as f64),
                wall_ms: 50.0 + (i % 3) as f64,
                cpu_ms: 40.0 + (i % 4) as f64,
                peak_memory: 20e6 + (i % 3) as f64 * 1e5,
                output_bytes: 4.0,
            })
            .collect()
    }

    #[test]
    fn uniform_jobs_have_no_anomalies() {
        assert!(review(&facts(30, |i| if i % 2 == 0 { "a" } else { "b" }), 20).is_empty());
    }

    #[test]
    fn a_slow_shard_a_memory_hog_and_a_lying_agent_are_named() {
        let mut f = facts(30, |i| ["a", "b", "c"][(i % 3) as usize]);
        f[4].wall_ms = 5000.0;
        f[9].peak_memory = 900e6;
        // Agent c's values are all off by a lot.
        for x in f.iter_mut().filter(|x| x.agent == "c") {
            x.value = Some(x.value.unwrap() + 1000.0);
        }
        let found = review(&f, 50);
        let has = |kind: &str, metric: &str, what: &dyn Fn(&Anomaly) -> bool| {
            found
                .iter()
                .any(|a| a.kind == kind && a.metric == metric && what(a))
        };
        assert!(
            has("outlier", "wall_ms", &|a| a.shards == [4]),
            "{found:#?}"
        );
        assert!(
            has("outlier", "peak_memory", &|a| a.shards == [9]),
            "{found:#?}"
        );
        assert!(
            has("agent_outlier", "value", &|a| a.agents == ["c"]),
            "{found:#?}"
        );
        assert!(
            !has("agent_outlier", "value", &|a| a.agents != ["c"]),
            "{found:#?}"
        );
        // A faster shard is not an anomaly.
        let mut g = facts(30, |_| "a");
        g[2].wall_ms = 1.0;
        assert!(review(&g, 20).is_empty(), "{:#?}", review(&g, 20));
    }

    #[test]
    fn error_spikes_for_the_job_and_for_one_agent() {
        let mut f = facts(20, |i| if i < 10 { "a" } else { "b" });
        for x in f.iter_mut().filter(|x| x.agent == "b").take(6) {
            x.failed = true;
        }
        let found = review(&f, 20);
        assert!(
            found
                .iter()
                .any(|a| a.kind == "error_rate" && a.shards.len() == 6),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|a| a.kind == "agent_outlier" && a.metric == "errors" && a.agents == ["b"]),
            "{found:#?}"
        );
        let mut few = facts(20, |_| "a");
        few[0].failed = true;
        assert!(review(&few, 20).is_empty());
    }
}
