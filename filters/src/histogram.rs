//! Envoy's histograms: values land in circllhist's log-linear bins (two significant decimal
//! digits: 3 is the bin [3, 3.1), 25 is [25, 26)), recorded lock-free; every stats flush merges
//! them into the last interval's and the cumulative distribution, whose quantiles, bucket counts
//! and (bin-midpoint) sum are what the admin shows — as Envoy's `ParentHistogramImpl` computes
//! them, so the same samples print the same numbers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The quantiles `/stats` shows.
pub const SUPPORTED_QUANTILES: [f64; 10] =
    [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0];

/// Envoy's default bucket bounds (`/stats/prometheus` `le`).
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Decades a u64 spans (10^0 … 10^19).
const DECADES: usize = 20;

/// A bin: zero, or two significant digits `val` (10–99) at decimal exponent `exp`, covering
/// [val/10 · 10^exp, (val+1)/10 · 10^exp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bin {
    Zero,
    At { exp: u8, val: u8 },
}

impl Bin {
    /// circllhist's `int_scale_to_hist_bucket(value, 0)`.
    pub fn of(value: u64) -> Bin {
        if value == 0 {
            return Bin::Zero;
        }
        // 3 is 30 at 10^0 ([3, 3.1)); 10 is 10 at 10^1 ([10, 11)); 123 is 12 at 10^2.
        let (mut v, mut exp) = if value < 10 {
            (value * 10, 0u8)
        } else {
            (value, 1u8)
        };
        while v >= 100 {
            v /= 10;
            exp += 1;
        }
        Bin::At { exp, val: v as u8 }
    }

    fn lower(self) -> f64 {
        match self {
            Bin::Zero => 0.0,
            Bin::At { exp, val } => f64::from(val) / 10.0 * 10f64.powi(i32::from(exp)),
        }
    }

    fn width(self) -> f64 {
        match self {
            Bin::Zero => 0.0,
            Bin::At { exp, .. } => 10f64.powi(i32::from(exp)) / 10.0,
        }
    }

    fn index(self) -> Option<(usize, usize)> {
        match self {
            Bin::Zero => None,
            Bin::At { exp, val } => Some((exp as usize, val as usize - 10)),
        }
    }
}

/// Bins with their counts, ascending.
pub type Distribution = Vec<(Bin, u64)>;

/// What a histogram showed at the last flush.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    pub interval: Distribution,
    pub cumulative: Distribution,
}

#[derive(Debug, Default)]
pub struct Histogram {
    zero: AtomicU64,
    decades: [OnceLock<Box<[AtomicU64; 90]>>; DECADES],
    used: AtomicBool,
    /// Touched only by the stats flush and the admin handlers.
    merged: Mutex<(Distribution, Merged)>,
    /// A stats sink that takes every sample as it is recorded (statsd's timers), with this
    /// histogram's name.
    sink: OnceLock<(std::sync::Arc<str>, std::sync::Arc<dyn SampleSink>)>,
}

/// Where a histogram's samples go as they are recorded.
pub trait SampleSink: Send + Sync + std::fmt::Debug {
    fn sample(&self, name: &str, value: u64);
}

impl Histogram {
    #[inline]
    pub fn record(&self, value: u64) {
        match Bin::of(value).index() {
            None => self.zero.fetch_add(1, Ordering::Relaxed),
            Some((d, i)) => self.decades[d]
                .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))))[i]
                .fetch_add(1, Ordering::Relaxed),
        };
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        if let Some((name, sink)) = self.sink.get() {
            sink.sample(name, value);
        }
    }

    /// Sends this histogram's samples to `sink` from now on (a second sink is not taken).
    pub fn send_samples_to(&self, name: &str, sink: std::sync::Arc<dyn SampleSink>) {
        let _ = self.sink.set((name.into(), sink));
    }

    pub fn used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// Everything recorded so far.
    fn current(&self) -> Distribution {
        let mut out = Vec::new();
        let zero = self.zero.load(Ordering::Relaxed);
        if zero > 0 {
            out.push((Bin::Zero, zero));
        }
        for (exp, d) in self.decades.iter().enumerate() {
            if let Some(bins) = d.get() {
                for (i, c) in bins.iter().enumerate() {
                    let c = c.load(Ordering::Relaxed);
                    if c > 0 {
                        out.push((
                            Bin::At {
                                exp: exp as u8,
                                val: (i + 10) as u8,
                            },
                            c,
                        ));
                    }
                }
            }
        }
        out
    }

    /// The stats flush: what came since the last one becomes the interval.
    pub fn merge(&self) {
        let now = self.current();
        let mut m = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        let interval = now
            .iter()
            .filter_map(|(b, c)| {
                let before = m.0.iter().find(|(pb, _)| pb == b).map_or(0, |(_, pc)| *pc);
                (c > &before).then_some((*b, c - before))
            })
            .collect();
        m.1 = Merged {
            interval,
            cumulative: now.clone(),
        };
        m.0 = now;
    }

    /// As of the last flush.
    pub fn merged(&self) -> Merged {
        self.merged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

/// The supported quantiles as Envoy 1.40 prints them (NaN when empty): type-1 quantiles (the
/// `ceil(n·q)`-th sample, the first for q = 0) of the samples taken as spread evenly through
/// their bins — a bin [l, l+w) holding c samples holds them at l + w·k/(c+1), k = 1…c.
pub fn quantiles(d: &Distribution) -> [f64; 10] {
    let total: u64 = d.iter().map(|(_, c)| c).sum();
    let mut out = [f64::NAN; 10];
    if total == 0 {
        return out;
    }
    for (q, o) in SUPPORTED_QUANTILES.iter().zip(out.iter_mut()) {
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut before = 0;
        for (b, c) in d {
            if before + c >= rank {
                let k = (rank - before) as f64;
                *o = b.lower() + b.width() * k / (*c as f64 + 1.0);
                break;
            }
            before += c;
        }
    }
    out
}

/// circllhist's `hist_approx_count_below`: samples in bins wholly at or below `threshold`.
pub fn count_below(d: &Distribution, threshold: f64) -> u64 {
    d.iter()
        .take_while(|(b, _)| b.lower() + b.width() <= threshold)
        .map(|(_, c)| c)
        .sum()
}

/// circllhist's `hist_approx_sum`: each sample at its bin's midpoint.
pub fn approx_sum(d: &Distribution) -> f64 {
    d.iter()
        .map(|(b, c)| (b.lower() + b.width() / 2.0) * *c as f64)
        .sum()
}

pub fn count(d: &Distribution) -> u64 {
    d.iter().map(|(_, c)| c).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_circllhists() {
        assert_eq!(Bin::of(0), Bin::Zero);
        assert_eq!(Bin::of(3), Bin::At { exp: 0, val: 30 });
        assert_eq!(Bin::of(10), Bin::At { exp: 1, val: 10 });
        assert_eq!(Bin::of(25), Bin::At { exp: 1, val: 25 });
        assert_eq!(Bin::of(123), Bin::At { exp: 2, val: 12 });
        assert_eq!(Bin::of(u64::MAX).index().map(|(d, _)| d), Some(19));
        assert!((Bin::of(25).lower() - 25.0).abs() < 1e-9);
        assert!((Bin::of(3).width() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn quantiles_buckets_and_sum_as_envoy_prints_them() {
        let h = Histogram::default();
        // Envoy 1.40 printed these for samples 1, 3, 3 and 7 ms: P0(nan,1.05) P25(nan,1.05)
        // P50(nan,3.033333333333333) P75(nan,3.066666666666667) P90(nan,7.05) … P100(nan,7.05).
        for v in [1, 3, 3, 7] {
            h.record(v);
        }
        h.merge();
        let m = h.merged();
        let q = quantiles(&m.cumulative);
        let want = [
            1.05,
            1.05,
            3.033_333_333_333_333,
            3.066_666_666_666_667,
            7.05,
            7.05,
            7.05,
            7.05,
            7.05,
            7.05,
        ];
        for (got, want) in q.iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{q:?}");
        }
        assert_eq!(count_below(&m.cumulative, 1.0), 0);
        assert_eq!(count_below(&m.cumulative, 5.0), 3);
        assert!((approx_sum(&m.cumulative) - (1.05 + 3.05 * 2.0 + 7.05)).abs() < 1e-9);
        // Nothing new: an empty interval.
        h.merge();
        let m = h.merged();
        assert!(m.interval.is_empty());
        assert!(quantiles(&m.interval)[0].is_nan());
        assert_eq!(count(&m.cumulative), 4);
        // 0 counts in every bucket; 25 only from le=50 (its bin ends at 26).
        let z = Histogram::default();
        z.record(0);
        z.record(25);
        z.merge();
        let c = z.merged().cumulative;
        assert_eq!(count_below(&c, 0.5), 1);
        assert_eq!(count_below(&c, 25.0), 1);
        assert_eq!(count_below(&c, 50.0), 2);
    }
}
