//! Latency samples and their percentiles.

use std::time::Duration;

/// Every request's latency of a run, sorted.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    sorted: Vec<Duration>,
}

/// The percentiles a run reports, fortio's set.
pub const PERCENTILES: [f64; 5] = [50.0, 75.0, 90.0, 99.0, 99.9];

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Latencies { sorted: samples }
    }

    pub fn count(&self) -> usize {
        self.sorted.len()
    }

    pub fn min(&self) -> Duration {
        self.sorted.first().copied().unwrap_or_default()
    }

    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }

    pub fn sum(&self) -> Duration {
        self.sorted.iter().sum()
    }

    pub fn mean(&self) -> Duration {
        match self.count() {
            0 => Duration::ZERO,
            n => self.sum() / n as u32,
        }
    }

    /// Standard deviation in seconds.
    pub fn stddev(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let mean = self.mean().as_secs_f64();
        let var = self
            .sorted
            .iter()
            .map(|d| (d.as_secs_f64() - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        var.sqrt()
    }

    /// The nearest-rank percentile: the smallest sample with at least `p` % of the samples at
    /// or below it (exact, where fortio interpolates within histogram buckets).
    pub fn percentile(&self, p: f64) -> Duration {
        let n = self.sorted.len();
        if n == 0 {
            return Duration::ZERO;
        }
        // The epsilon keeps 99.9 % of 1000 at rank 999 despite binary fractions.
        let rank = ((p / 100.0) * n as f64 - 1e-9).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn percentiles_of_known_samples() {
        let ms = Duration::from_millis;
        let l = Latencies::new((1..=1000).rev().map(ms).collect());
        assert_eq!(l.percentile(50.0), ms(500));
        assert_eq!(l.percentile(75.0), ms(750));
        assert_eq!(l.percentile(99.0), ms(990));
        assert_eq!(l.percentile(99.9), ms(999));
        assert_eq!(l.percentile(100.0), ms(1000));
        assert_eq!(l.percentile(0.0), ms(1));
        assert_eq!(
            (l.min(), l.max(), l.mean()),
            (ms(1), ms(1000), Duration::from_micros(500_500))
        );
        let two = Latencies::new(vec![ms(10), ms(30)]);
        assert_eq!(two.percentile(50.0), ms(10));
        assert_eq!(two.percentile(51.0), ms(30));
        assert!((two.stddev() - 0.010).abs() < 1e-9);
        let none = Latencies::new(Vec::new());
        assert_eq!(
            (none.percentile(50.0), none.mean(), none.stddev()),
            (Duration::ZERO, Duration::ZERO, 0.0)
        );
    }

    proptest! {
        #[test]
        fn a_percentile_has_that_share_at_or_below_it(
            v in proptest::collection::vec(0u64..10_000, 1..200),
            p in 0.0f64..=100.0,
        ) {
            let l = Latencies::new(v.iter().map(|&x| Duration::from_micros(x)).collect());
            let q = l.percentile(p);
            let at_or_below = v.iter().filter(|&&x| Duration::from_micros(x) <= q).count();
            let below = v.iter().filter(|&&x| Duration::from_micros(x) < q).count();
            prop_assert!(at_or_below as f64 >= p / 100.0 * v.len() as f64 - 1e-9);
            prop_assert!((below as f64) < (p / 100.0 * v.len() as f64).max(1.0));
        }
    }
}
