//! Summaries of repeated measurements: min, median, max and nearest-rank percentiles.

/// A summary of `n` samples (milliseconds, MiB, MiB/s: whatever unit the samples have).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Smallest sample.
    pub min: f64,
    /// Median: the middle sample, or the mean of the two middle ones for an even count.
    pub median: f64,
    /// Largest sample.
    pub max: f64,
    /// 50th percentile (nearest rank: always one of the samples).
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
}

/// Summarizes `samples`; `None` when there are none. NaN samples are ignored.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Summary {
        n,
        min: sorted[0],
        median,
        max: sorted[n - 1],
        p50: percentile_sorted(&sorted, 50.0),
        p95: percentile_sorted(&sorted, 95.0),
    })
}

/// The nearest-rank `p`th percentile (0 < p <= 100) of ascending `sorted` samples: the smallest
/// sample with at least `p` percent of the samples at or below it. `NaN` for no samples.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// `a / b`, or `None` when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_has_no_summary() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::NAN]), None);
    }

    #[test]
    fn one_sample() {
        let s = summarize(&[7.0]).unwrap();
        assert_eq!(
            (s.n, s.min, s.median, s.max, s.p50, s.p95),
            (1, 7.0, 7.0, 7.0, 7.0, 7.0)
        );
    }

    #[test]
    fn odd_count_median_is_the_middle_sample() {
        let s = summarize(&[5.0, 1.0, 3.0, 9.0, 7.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 5.0, 9.0));
        assert_eq!(s.p50, 5.0);
        assert_eq!(s.p95, 9.0);
    }

    #[test]
    fn even_count_median_is_the_mean_of_the_middle_two() {
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        // Nearest rank: ceil(0.5 * 4) = 2nd sample.
        assert_eq!(s.p50, 2.0);
        assert_eq!(s.p95, 4.0);
    }

    #[test]
    fn percentiles_of_one_to_hundred() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = summarize(&v).unwrap();
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p95, 95.0);
        assert_eq!(s.median, 50.5);
        let mut sorted = v.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(percentile_sorted(&sorted, 99.0), 99.0);
        assert_eq!(percentile_sorted(&sorted, 100.0), 100.0);
        assert_eq!(percentile_sorted(&sorted, 0.1), 1.0);
    }

    #[test]
    fn p95_of_thirty_samples_is_the_29th() {
        let v: Vec<f64> = (1..=30).map(f64::from).collect();
        assert_eq!(summarize(&v).unwrap().p95, 29.0);
    }

    #[test]
    fn ratio_needs_a_positive_divisor() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }
}
