//! Percentiles of one run and medians across runs.

use std::time::Instant;

/// Percentiles of one run's round-trip samples, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Percentiles {
    /// Median.
    pub(crate) p50: f64,
    /// 99th percentile.
    pub(crate) p99: f64,
    /// 99.9th percentile.
    pub(crate) p999: f64,
}

/// The nearest-rank `q`-quantile (0 < q <= 1) of sorted, non-empty samples.
fn nearest_rank(sorted: &[u64], q: f64) -> f64 {
    let n = sorted.len();
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted[rank - 1] as f64
}

/// p50/p99/p99.9 of `samples` (sorted in place); `None` if empty.
pub(crate) fn percentiles(samples: &mut [u64]) -> Option<Percentiles> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    Some(Percentiles {
        p50: nearest_rank(samples, 0.50),
        p99: nearest_rank(samples, 0.99),
        p999: nearest_rank(samples, 0.999),
    })
}

/// The median of `values` (mean of the middle two for an even count);
/// `NaN` if empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median cost of one `Instant::now()` (ns), as seen by back-to-back calls.
pub(crate) fn timer_overhead_ns() -> f64 {
    let mut d: Vec<f64> = (0..10_000)
        .map(|_| {
            let a = Instant::now();
            let b = Instant::now();
            b.duration_since(a).as_nanos() as f64
        })
        .collect();
    d.sort_by(f64::total_cmp);
    median(&d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut s: Vec<u64> = (1..=1000).rev().collect();
        let p = percentiles(&mut s).unwrap();
        assert_eq!((p.p50, p.p99, p.p999), (500.0, 990.0, 999.0));
        let p = percentiles(&mut [7]).unwrap();
        assert_eq!((p.p50, p.p99, p.p999), (7.0, 7.0, 7.0));
        assert!(percentiles(&mut []).is_none());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert!(timer_overhead_ns() >= 0.0);
    }
}
