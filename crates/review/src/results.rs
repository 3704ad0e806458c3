//! Result review: which shards' values stand out from the rest of their job.
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
    let med = median(&sorted);
    let mut dev: Vec<f64> = sorted.iter().map(|v| (v - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    let mad = median(&dev);
    let scale = if mad > 0.0 {
        mad / 0.6745
    } else {
        let mean_ad = dev.iter().sum::<f64>() / dev.len() as f64;
        1.2533 * mean_ad
    };
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
}
