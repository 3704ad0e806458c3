//! The adaptive policy's rules simulated (no coordinator): how many of a liar's results pass
//! before it is quarantined, for BOINC's threshold (10) and Fleetbox's (250). The rules are the
//! coordinator's (`store::verify`): every result re-run until `trusted_after` valid in a row,
//! then a share `max(1/CV, 2%)`; a checked lie resets the run and is a strike that doubles the
//! warm-up (`warm_up`); two strikes quarantine. The numbers `docs/SANDBOX_DISTRIBUTED.md` quotes come from here.

use fleetbox_server::store::verify::{TRUSTED_AFTER, TRUSTED_RATE_FLOOR, adaptive_rate, warm_up};

/// splitmix64: a seeded, reproducible stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A liar's results until its `strikes`-th checked lie (capped at `cap`).
fn until_quarantined(
    rng: &mut Rng,
    lie_rate: f64,
    trusted_after: i64,
    strikes: u32,
    cap: u64,
) -> u64 {
    let (mut cv, mut struck) = (0i64, 0u32);
    for n in 1..=cap {
        let lie = rng.next() < lie_rate;
        if rng.next() < adaptive_rate(cv, warm_up(trusted_after, i64::from(struck))) {
            if lie {
                struck += 1;
                cv = 0;
                if struck >= strikes {
                    return n;
                }
            } else {
                cv += 1;
            }
        }
    }
    cap
}

pub fn run(runs: usize) -> Result<(), String> {
    println!(
        "trust: the adaptive policy simulated, {runs} seeded runs per row, two strikes, floor {}%",
        TRUSTED_RATE_FLOOR * 100.0
    );
    let mut rng = Rng(0x5EED);
    for trusted_after in [10, TRUSTED_AFTER] {
        for (lie_rate, within) in [(0.10, 50), (0.02, 400)] {
            let mut n: Vec<u64> = (0..runs)
                .map(|_| until_quarantined(&mut rng, lie_rate, trusted_after, 2, 1_000_000))
                .collect();
            n.sort_unstable();
            let at = |q: f64| n[((runs as f64 * q) as usize).min(runs - 1)];
            let share = n.iter().filter(|&&x| x <= within).count() as f64 / runs as f64;
            println!(
                "  trusted after {trusted_after:>3}, liar on {:>2.0}%: quarantined after a median of {:>5} of its results (p95 {:>6}); within {within}: {:5.1}% of runs",
                lie_rate * 100.0,
                at(0.5),
                at(0.95),
                share * 100.0
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default policy's promise, on the simulation's seeded stream: a 2% liar quarantined
    /// within 400 of its results in 99% of runs, a 10% liar within 50 in 96%.
    #[test]
    fn the_default_warm_up_catches_a_random_liar_early() {
        let mut rng = Rng(0x5EED);
        let share = |rng: &mut Rng, rate, within| {
            (0..3000)
                .filter(|_| until_quarantined(rng, rate, TRUSTED_AFTER, 2, 100_000) <= within)
                .count() as f64
                / 3000.0
        };
        assert!(share(&mut rng, 0.02, 400) >= 0.99);
        assert!(share(&mut rng, 0.10, 50) >= 0.96);
    }
}
