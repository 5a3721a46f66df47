//! Outlier detection (`Cluster.outlier_detection`), with Envoy's semantics: consecutive 5xx,
//! gateway-failure and local-origin-failure ejection as results arrive, success-rate and
//! failure-percentage ejection every `interval`, ejection time growing with repeated ejections
//! (`base_ejection_time` × backoff, capped at `max_ejection_time`, plus jitter), the
//! `max_ejection_percent` cap, `enforcing_*` percentages, the `outlier_detection.*` stats and the
//! bootstrap's event log.
//!
//! Per-host counters are atomics on the host (workers update them lock-free). Ejections and
//! unejections, which Envoy runs on its main thread, serialize on the detector's lock; each one
//! recomputes the cluster's balancer plan, so an ejected host leaves the balancer at once.
//! One process-wide timer thread runs every detector's interval.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use xds_client::pb::envoy::config::cluster::v3::OutlierDetection;

use super::cluster::Host;
use super::host_set::{health_flag, HostSet};
use crate::config::{duration, invalid, reject_unhandled, ConfigError};
use crate::observe::stats::{Counter, Store};
use crate::stat_struct;

stat_struct!(OutlierStats {
    gauge ejections_active,
    counter ejections_consecutive_5xx,
    counter ejections_detected_consecutive_5xx,
    counter ejections_detected_consecutive_gateway_failure,
    counter ejections_detected_consecutive_local_origin_failure,
    counter ejections_detected_degradation,
    counter ejections_detected_failure_percentage,
    counter ejections_detected_local_origin_failure_percentage,
    counter ejections_detected_local_origin_success_rate,
    counter ejections_detected_success_rate,
    counter ejections_enforced_consecutive_5xx,
    counter ejections_enforced_consecutive_gateway_failure,
    counter ejections_enforced_consecutive_local_origin_failure,
    counter ejections_enforced_failure_percentage,
    counter ejections_enforced_local_origin_failure_percentage,
    counter ejections_enforced_local_origin_success_rate,
    counter ejections_enforced_success_rate,
    counter ejections_enforced_total,
    counter ejections_overflow,
    counter ejections_success_rate,
    counter ejections_total,
});

/// The detector's settings, with Envoy's defaults for unset fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_time_jitter: Duration,
    pub max_ejection_percent: u64,
    pub always_eject_one_host: bool,
    pub consecutive_5xx: u64,
    pub consecutive_gateway_failure: u64,
    pub consecutive_local_origin_failure: u64,
    pub split_external_local_origin_errors: bool,
    pub success_rate_minimum_hosts: u64,
    pub success_rate_request_volume: u64,
    pub success_rate_stdev_factor: u64,
    pub failure_percentage_threshold: u64,
    pub failure_percentage_minimum_hosts: u64,
    pub failure_percentage_request_volume: u64,
    pub enforcing_consecutive_5xx: u64,
    pub enforcing_consecutive_gateway_failure: u64,
    pub enforcing_consecutive_local_origin_failure: u64,
    pub enforcing_success_rate: u64,
    pub enforcing_local_origin_success_rate: u64,
    pub enforcing_failure_percentage: u64,
    pub enforcing_failure_percentage_local_origin: u64,
}

pub fn compile(o: &OutlierDetection, path: &str) -> Result<Config, ConfigError> {
    let mut rest = o.clone();
    let num = |v: Option<u32>, field: &str, default: u64, percent: bool| {
        let v = v.map(u64::from).unwrap_or(default);
        if percent && v > 100 {
            return Err(invalid(
                format!("{path}.{field}"),
                "value must be less than or equal to 100",
            ));
        }
        Ok(v)
    };
    macro_rules! take {
        ($f:ident, $default:expr) => {
            num(
                rest.$f.take().map(|w| w.value),
                stringify!($f),
                $default,
                false,
            )?
        };
        ($f:ident, $default:expr, percent) => {
            num(
                rest.$f.take().map(|w| w.value),
                stringify!($f),
                $default,
                true,
            )?
        };
    }
    let positive = |d: Option<_>, field: &str, default: Duration| {
        let p = format!("{path}.{field}");
        let v = duration::or(&d, default, &p)?;
        if d.is_some() && v.is_zero() {
            return Err(invalid(p, "value must be greater than 0s"));
        }
        Ok::<_, ConfigError>(v)
    };
    let interval = positive(rest.interval.take(), "interval", Duration::from_secs(10))?;
    let base_ejection_time = positive(
        rest.base_ejection_time.take(),
        "base_ejection_time",
        Duration::from_secs(30),
    )?;
    let max_ejection_time = positive(
        rest.max_ejection_time.take(),
        "max_ejection_time",
        base_ejection_time.max(Duration::from_secs(300)),
    )?;
    if max_ejection_time < base_ejection_time {
        return Err(invalid(
            format!("{path}.max_ejection_time"),
            "outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
        ));
    }
    let max_ejection_time_jitter = duration::or(
        &rest.max_ejection_time_jitter.take(),
        Duration::ZERO,
        &format!("{path}.max_ejection_time_jitter"),
    )?;
    let config = Config {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter,
        max_ejection_percent: take!(max_ejection_percent, 10, percent),
        always_eject_one_host: rest.always_eject_one_host.take().is_some_and(|b| b.value),
        consecutive_5xx: take!(consecutive_5xx, 5),
        consecutive_gateway_failure: take!(consecutive_gateway_failure, 5),
        consecutive_local_origin_failure: take!(consecutive_local_origin_failure, 5),
        split_external_local_origin_errors: std::mem::take(
            &mut rest.split_external_local_origin_errors,
        ),
        success_rate_minimum_hosts: take!(success_rate_minimum_hosts, 5),
        success_rate_request_volume: take!(success_rate_request_volume, 100),
        success_rate_stdev_factor: take!(success_rate_stdev_factor, 1900),
        failure_percentage_threshold: take!(failure_percentage_threshold, 85, percent),
        failure_percentage_minimum_hosts: take!(failure_percentage_minimum_hosts, 5),
        failure_percentage_request_volume: take!(failure_percentage_request_volume, 50),
        enforcing_consecutive_5xx: take!(enforcing_consecutive_5xx, 100, percent),
        enforcing_consecutive_gateway_failure: take!(
            enforcing_consecutive_gateway_failure,
            0,
            percent
        ),
        enforcing_consecutive_local_origin_failure: take!(
            enforcing_consecutive_local_origin_failure,
            100,
            percent
        ),
        enforcing_success_rate: take!(enforcing_success_rate, 100, percent),
        enforcing_local_origin_success_rate: take!(
            enforcing_local_origin_success_rate,
            100,
            percent
        ),
        enforcing_failure_percentage: take!(enforcing_failure_percentage, 0, percent),
        enforcing_failure_percentage_local_origin: take!(
            enforcing_failure_percentage_local_origin,
            0,
            percent
        ),
    };
    // Only active health checks read it, and they are refused: without them Envoy never
    // consults it either.
    rest.successful_active_health_check_uneject_host = None;
    if rest
        .detect_degraded_hosts
        .as_ref()
        .is_some_and(|b| !b.value)
    {
        rest.detect_degraded_hosts = None;
    }
    reject_unhandled(&rest, path)?;
    Ok(config)
}

/// What an upstream attempt tells the detector (Envoy's `Outlier::Result`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Report {
    /// A connection (or stream on one) was had; the protocol answer follows.
    ConnectSuccess,
    /// A connection was had and nothing else will be reported (TCP proxying).
    ConnectSuccessFinal,
    ConnectFailed,
    /// The attempt timed out (the router reports it as a 504).
    Timeout,
    /// The upstream answered with this HTTP status (gRPC statuses mapped to HTTP).
    Response(u16),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ejection {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    SuccessRateLocalOrigin,
    FailurePercentage,
    FailurePercentageLocalOrigin,
}

impl Ejection {
    /// The `OutlierEjectionType` name, as the event log writes it.
    fn name(self) -> &'static str {
        match self {
            Ejection::Consecutive5xx => "CONSECUTIVE_5XX",
            Ejection::ConsecutiveGatewayFailure => "CONSECUTIVE_GATEWAY_FAILURE",
            Ejection::ConsecutiveLocalOriginFailure => "CONSECUTIVE_LOCAL_ORIGIN_FAILURE",
            Ejection::SuccessRate => "SUCCESS_RATE",
            Ejection::SuccessRateLocalOrigin => "SUCCESS_RATE_LOCAL_ORIGIN",
            Ejection::FailurePercentage => "FAILURE_PERCENTAGE",
            Ejection::FailurePercentageLocalOrigin => "FAILURE_PERCENTAGE_LOCAL_ORIGIN",
        }
    }

    fn enforcing(self, c: &Config) -> u64 {
        match self {
            Ejection::Consecutive5xx => c.enforcing_consecutive_5xx,
            Ejection::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            Ejection::ConsecutiveLocalOriginFailure => c.enforcing_consecutive_local_origin_failure,
            Ejection::SuccessRate => c.enforcing_success_rate,
            Ejection::SuccessRateLocalOrigin => c.enforcing_local_origin_success_rate,
            Ejection::FailurePercentage => c.enforcing_failure_percentage,
            Ejection::FailurePercentageLocalOrigin => c.enforcing_failure_percentage_local_origin,
        }
    }

    /// `ejections_detected_*` and `ejections_enforced_*`.
    fn counters(self, s: &OutlierStats) -> (&Counter, &Counter) {
        match self {
            Ejection::Consecutive5xx => (
                &s.ejections_detected_consecutive_5xx,
                &s.ejections_enforced_consecutive_5xx,
            ),
            Ejection::ConsecutiveGatewayFailure => (
                &s.ejections_detected_consecutive_gateway_failure,
                &s.ejections_enforced_consecutive_gateway_failure,
            ),
            Ejection::ConsecutiveLocalOriginFailure => (
                &s.ejections_detected_consecutive_local_origin_failure,
                &s.ejections_enforced_consecutive_local_origin_failure,
            ),
            Ejection::SuccessRate => (
                &s.ejections_detected_success_rate,
                &s.ejections_enforced_success_rate,
            ),
            Ejection::SuccessRateLocalOrigin => (
                &s.ejections_detected_local_origin_success_rate,
                &s.ejections_enforced_local_origin_success_rate,
            ),
            Ejection::FailurePercentage => (
                &s.ejections_detected_failure_percentage,
                &s.ejections_enforced_failure_percentage,
            ),
            Ejection::FailurePercentageLocalOrigin => (
                &s.ejections_detected_local_origin_failure_percentage,
                &s.ejections_enforced_local_origin_failure_percentage,
            ),
        }
    }
}

/// Which success-rate monitor: external origin (HTTP statuses) or local origin (connects and
/// timeouts, with `split_external_local_origin_errors`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Origin {
    External = 0,
    Local = 1,
}

const NEVER: u64 = u64::MAX;

/// Requests and successes of the running interval and of the last one.
#[derive(Debug, Default)]
struct SuccessRateBuckets {
    buckets: [[AtomicU64; 2]; 2],
    writer: AtomicUsize,
}

impl SuccessRateBuckets {
    fn put(&self, success: bool) {
        let b = &self.buckets[self.writer.load(Ordering::Relaxed) & 1];
        b[0].fetch_add(1, Ordering::Relaxed);
        if success {
            b[1].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts a new interval; the one that ended becomes readable.
    fn swap(&self) {
        let w = self.writer.load(Ordering::Relaxed) & 1;
        let next = &self.buckets[1 - w];
        next[0].store(0, Ordering::Relaxed);
        next[1].store(0, Ordering::Relaxed);
        self.writer.store(1 - w, Ordering::Relaxed);
    }

    /// The last interval's success rate (percent) and volume, when it had requests.
    fn last(&self) -> Option<(f64, u64)> {
        let b = &self.buckets[1 - (self.writer.load(Ordering::Relaxed) & 1)];
        let total = b[0].load(Ordering::Relaxed);
        (total > 0).then(|| {
            (
                b[1].load(Ordering::Relaxed) as f64 * 100.0 / total as f64,
                total,
            )
        })
    }
}

/// A host's outlier state (Envoy's `DetectorHostMonitor`).
#[derive(Debug)]
pub struct HostMonitor {
    consecutive_5xx: AtomicU64,
    consecutive_gateway_failure: AtomicU64,
    consecutive_local_origin_failure: AtomicU64,
    rates: [SuccessRateBuckets; 2],
    /// The last interval's success rates shown by `/clusters` (f64 bits; -1 when none).
    shown_rate: [AtomicU64; 2],
    num_ejections: AtomicU64,
    // Written under the detector's lock only.
    eject_time_backoff: AtomicU64,
    last_ejection_ms: AtomicU64,
    last_unejection_ms: AtomicU64,
    jitter_ms: AtomicU64,
}

impl Default for HostMonitor {
    fn default() -> Self {
        HostMonitor {
            consecutive_5xx: AtomicU64::new(0),
            consecutive_gateway_failure: AtomicU64::new(0),
            consecutive_local_origin_failure: AtomicU64::new(0),
            rates: Default::default(),
            shown_rate: [
                AtomicU64::new((-1f64).to_bits()),
                AtomicU64::new((-1f64).to_bits()),
            ],
            num_ejections: AtomicU64::new(0),
            eject_time_backoff: AtomicU64::new(0),
            last_ejection_ms: AtomicU64::new(NEVER),
            last_unejection_ms: AtomicU64::new(NEVER),
            jitter_ms: AtomicU64::new(0),
        }
    }
}

impl HostMonitor {
    /// The success rate `/clusters` shows: external origin, or local origin.
    pub fn success_rate(&self, local: bool) -> f64 {
        f64::from_bits(self.shown_rate[local as usize].load(Ordering::Relaxed))
    }

    fn show_rate(&self, origin: Origin, v: f64) {
        self.shown_rate[origin as usize].store(v.to_bits(), Ordering::Relaxed);
    }

    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        self.consecutive_local_origin_failure
            .store(0, Ordering::Relaxed);
    }
}

/// A cluster's detector, shared by the cluster's successive host sets.
#[derive(Debug)]
pub struct Detector {
    config: Config,
    stats: OutlierStats,
    cluster_name: String,
    event_log: Option<Arc<std::fs::File>>,
    epoch: Instant,
    /// The host set it watches (the cluster's newest).
    hosts: ArcSwap<HostSet>,
    /// Ejection bookkeeping, serialized as on Envoy's main thread; holds each origin's cluster
    /// success-rate average and ejection threshold (-1 when not computed).
    main: Mutex<[(f64, f64); 2]>,
}

/// How `/clusters` describes a detector's cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterRates {
    pub success_rate_average: f64,
    pub success_rate_ejection_threshold: f64,
    pub local_origin_success_rate_average: f64,
    pub local_origin_success_rate_ejection_threshold: f64,
}

impl Detector {
    /// A detector over `hosts`, its interval timer started.
    pub fn start(
        config: Config,
        store: &Store,
        stat_prefix: &str,
        cluster_name: &str,
        event_log: Option<Arc<std::fs::File>>,
        hosts: Arc<HostSet>,
    ) -> Arc<Detector> {
        let d = Arc::new(Detector {
            stats: OutlierStats::new(store, &format!("{stat_prefix}outlier_detection.")),
            cluster_name: cluster_name.to_string(),
            event_log,
            epoch: Instant::now(),
            hosts: ArcSwap::new(hosts),
            main: Mutex::new([(-1.0, -1.0); 2]),
            config,
        });
        timer::register(&d);
        d
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn cluster_rates(&self) -> ClusterRates {
        let m = self.lock();
        ClusterRates {
            success_rate_average: m[0].0,
            success_rate_ejection_threshold: m[0].1,
            local_origin_success_rate_average: m[1].0,
            local_origin_success_rate_ejection_threshold: m[1].1,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [(f64, f64); 2]> {
        self.main.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Moves to the cluster's new host set: ejected hosts that left it stop counting as
    /// ejected (Envoy's member-update callback).
    pub fn watch(&self, new: Arc<HostSet>) {
        let _main = self.lock();
        let old = self.hosts.load_full();
        for h in &old.hosts {
            let stays = new.hosts.iter().any(|n| Arc::ptr_eq(n, h));
            if !stays && ejected(h) {
                self.stats.ejections_active.dec();
            }
        }
        self.hosts.store(new.clone());
        new.health_changed();
    }

    /// Takes one attempt's result for `host`.
    pub fn report(&self, host: &Arc<Host>, report: Report) {
        let code = if self.config.split_external_local_origin_errors {
            match report {
                Report::ConnectSuccess | Report::ConnectSuccessFinal => {
                    host.outlier.rates[Origin::Local as usize].put(true);
                    host.outlier
                        .consecutive_local_origin_failure
                        .store(0, Ordering::Relaxed);
                    return;
                }
                Report::ConnectFailed | Report::Timeout => {
                    host.outlier.rates[Origin::Local as usize].put(false);
                    let n = host
                        .outlier
                        .consecutive_local_origin_failure
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    if n == self.config.consecutive_local_origin_failure {
                        self.on_consecutive(host, Ejection::ConsecutiveLocalOriginFailure);
                    }
                    return;
                }
                Report::Response(c) => c,
            }
        } else {
            match report {
                Report::ConnectSuccess => return,
                Report::ConnectSuccessFinal => 200,
                Report::ConnectFailed => 503,
                Report::Timeout => 504,
                Report::Response(c) => c,
            }
        };
        self.put_http_code(host, code);
    }

    fn put_http_code(&self, host: &Arc<Host>, code: u16) {
        let m = &host.outlier;
        let is_5xx = (500..600).contains(&code);
        m.rates[Origin::External as usize].put(!is_5xx);
        if !is_5xx {
            m.consecutive_5xx.store(0, Ordering::Relaxed);
            m.consecutive_gateway_failure.store(0, Ordering::Relaxed);
            return;
        }
        if matches!(code, 502..=504) {
            let n = m
                .consecutive_gateway_failure
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            if n == self.config.consecutive_gateway_failure {
                self.on_consecutive(host, Ejection::ConsecutiveGatewayFailure);
            }
        } else {
            m.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        }
        let n = m.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.config.consecutive_5xx {
            self.on_consecutive(host, Ejection::Consecutive5xx);
        }
    }

    fn on_consecutive(&self, host: &Arc<Host>, kind: Ejection) {
        let mut main = self.lock();
        let set = self.hosts.load_full();
        // The host may have left the cluster, or be ejected already.
        if !set.hosts.iter().any(|h| Arc::ptr_eq(h, host)) || ejected(host) {
            return;
        }
        kind.counters(&self.stats).0.inc();
        self.eject(&mut main, &set, host, kind);
        let m = &host.outlier;
        match kind {
            Ejection::Consecutive5xx => {
                self.stats.ejections_consecutive_5xx.inc();
                m.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            Ejection::ConsecutiveGatewayFailure => {
                m.consecutive_gateway_failure.store(0, Ordering::Relaxed)
            }
            _ => m
                .consecutive_local_origin_failure
                .store(0, Ordering::Relaxed),
        }
    }

    /// Envoy's `ejectHost`: the percentage cap, the enforcing roll, the ejection itself.
    fn eject(
        &self,
        main: &mut [(f64, f64); 2],
        set: &Arc<HostSet>,
        host: &Arc<Host>,
        kind: Ejection,
    ) {
        let active = self.stats.ejections_active.value().max(0) as u64;
        let cap = self.config.max_ejection_percent.min(100) as f64;
        let pct = 100.0 * (active + 1) as f64 / set.hosts.len().max(1) as f64;
        let should = pct <= cap || (self.config.always_eject_one_host && active == 0);
        if !should {
            self.stats.ejections_overflow.inc();
            return;
        }
        if matches!(kind, Ejection::Consecutive5xx | Ejection::SuccessRate) {
            self.stats.ejections_total.inc();
        }
        let enforce = rand::random_range(0..100) < kind.enforcing(&self.config);
        if enforce {
            self.stats.ejections_active.inc();
            self.stats.ejections_enforced_total.inc();
            kind.counters(&self.stats).1.inc();
            let m = &host.outlier;
            host.health
                .fetch_or(health_flag::FAILED_OUTLIER_CHECK, Ordering::Relaxed);
            m.num_ejections.fetch_add(1, Ordering::Relaxed);
            m.last_ejection_ms.store(self.now_ms(), Ordering::Relaxed);
            let max_jitter = self.config.max_ejection_time_jitter.as_millis() as u64;
            m.jitter_ms
                .store(rand::random::<u64>() % (max_jitter + 1), Ordering::Relaxed);
            let backoff = m.eject_time_backoff.load(Ordering::Relaxed);
            if self.config.base_ejection_time * (backoff as u32)
                < self.config.max_ejection_time + self.config.base_ejection_time
            {
                m.eject_time_backoff.store(backoff + 1, Ordering::Relaxed);
            }
            set.health_changed();
        }
        self.log_eject(main, host, kind, enforce);
    }

    fn uneject(&self, host: &Arc<Host>, now: u64) {
        self.stats.ejections_active.dec();
        host.health
            .fetch_and(!health_flag::FAILED_OUTLIER_CHECK, Ordering::Relaxed);
        host.outlier.reset_consecutive();
        host.outlier
            .last_unejection_ms
            .store(now, Ordering::Relaxed);
        let last = host.outlier.last_ejection_ms.load(Ordering::Relaxed);
        self.log(host, None, false, "UNEJECT", last, String::new());
    }

    /// One interval: unejections, success-rate buckets, success-rate and failure-percentage
    /// ejections, backoff decay.
    fn on_interval(&self) {
        let mut main = self.lock();
        let set = self.hosts.load_full();
        let now = self.now_ms();
        let c = &self.config;
        let mut changed = false;
        for h in &set.hosts {
            let m = &h.outlier;
            if ejected(h) {
                let backoff = m.eject_time_backoff.load(Ordering::Relaxed) as u32;
                let eject_for = (c.base_ejection_time * backoff).min(c.max_ejection_time)
                    + Duration::from_millis(m.jitter_ms.load(Ordering::Relaxed));
                let since = now.saturating_sub(m.last_ejection_ms.load(Ordering::Relaxed));
                if eject_for.as_millis() as u64 <= since {
                    self.uneject(h, now);
                    changed = true;
                }
            }
            for o in [Origin::External, Origin::Local] {
                m.rates[o as usize].swap();
                m.show_rate(o, -1.0);
            }
        }
        if changed {
            set.health_changed();
        }
        for origin in [Origin::External, Origin::Local] {
            self.process_success_rates(&mut main, &set, origin);
        }
        for h in &set.hosts {
            let m = &h.outlier;
            let last = m.last_unejection_ms.load(Ordering::Relaxed);
            if !ejected(h)
                && last != NEVER
                && now.saturating_sub(last) >= c.interval.as_millis() as u64
            {
                let b = m.eject_time_backoff.load(Ordering::Relaxed);
                m.eject_time_backoff
                    .store(b.saturating_sub(1), Ordering::Relaxed);
            }
        }
    }

    fn process_success_rates(
        &self,
        main: &mut [(f64, f64); 2],
        set: &Arc<HostSet>,
        origin: Origin,
    ) {
        let c = &self.config;
        main[origin as usize] = (-1.0, -1.0);
        let n = set.hosts.len() as u64;
        if n < c.success_rate_minimum_hosts && n < c.failure_percentage_minimum_hosts {
            return;
        }
        let mut sr_hosts = Vec::new();
        let mut fp_hosts = Vec::new();
        for h in set.hosts.iter().filter(|h| !ejected(h)) {
            let Some((rate, volume)) = h.outlier.rates[origin as usize].last() else {
                continue;
            };
            if volume
                >= c.success_rate_request_volume
                    .min(c.failure_percentage_request_volume)
            {
                h.outlier.show_rate(origin, rate);
            }
            if volume >= c.success_rate_request_volume {
                sr_hosts.push((h, rate));
            }
            if volume >= c.failure_percentage_request_volume {
                fp_hosts.push((h, rate));
            }
        }
        let (sr_kind, fp_kind) = match origin {
            Origin::External => (Ejection::SuccessRate, Ejection::FailurePercentage),
            Origin::Local => (
                Ejection::SuccessRateLocalOrigin,
                Ejection::FailurePercentageLocalOrigin,
            ),
        };
        if !sr_hosts.is_empty() && sr_hosts.len() as u64 >= c.success_rate_minimum_hosts {
            let count = sr_hosts.len() as f64;
            let mean = sr_hosts.iter().map(|(_, r)| r).sum::<f64>() / count;
            let variance = sr_hosts
                .iter()
                .map(|(_, r)| (r - mean).powi(2))
                .sum::<f64>()
                / count;
            let threshold = mean - (c.success_rate_stdev_factor as f64 / 1000.0) * variance.sqrt();
            main[origin as usize] = (mean, threshold);
            for (h, rate) in &sr_hosts {
                if *rate < threshold {
                    self.stats.ejections_success_rate.inc();
                    sr_kind.counters(&self.stats).0.inc();
                    self.eject(main, set, h, sr_kind);
                }
            }
        }
        if !fp_hosts.is_empty() && fp_hosts.len() as u64 >= c.failure_percentage_minimum_hosts {
            for (h, rate) in &fp_hosts {
                // Unlike Envoy, a host the success-rate pass just ejected is not ejected twice
                // (Envoy then counts it twice in ejections_active for good).
                if 100.0 - rate >= c.failure_percentage_threshold as f64 && !ejected(h) {
                    fp_kind.counters(&self.stats).0.inc();
                    self.eject(main, set, h, fp_kind);
                }
            }
        }
    }

    fn log_eject(&self, main: &[(f64, f64); 2], host: &Host, kind: Ejection, enforced: bool) {
        let origin = match kind {
            Ejection::SuccessRateLocalOrigin | Ejection::FailurePercentageLocalOrigin => {
                Origin::Local
            }
            _ => Origin::External,
        };
        let host_rate = host.outlier.success_rate(origin == Origin::Local) as u32;
        let detail = match kind {
            Ejection::SuccessRate | Ejection::SuccessRateLocalOrigin => {
                let (avg, threshold) = main[origin as usize];
                format!(
                    ",\"eject_success_rate_event\":{{\"host_success_rate\":{host_rate},\"cluster_average_success_rate\":{},\"cluster_success_rate_ejection_threshold\":{}}}",
                    avg as u32, threshold as u32
                )
            }
            Ejection::FailurePercentage | Ejection::FailurePercentageLocalOrigin => {
                format!(",\"eject_failure_percentage_event\":{{\"host_success_rate\":{host_rate}}}")
            }
            _ => ",\"eject_consecutive_event\":{}".to_string(),
        };
        let last = host.outlier.last_unejection_ms.load(Ordering::Relaxed);
        self.log(host, Some(kind), enforced, "EJECT", last, detail);
    }

    /// One `OutlierDetectionEvent` as Envoy's JSON line (proto field order, primitive fields
    /// always printed; an unejection carries the enum's zero type).
    fn log(
        &self,
        host: &Host,
        kind: Option<Ejection>,
        enforced: bool,
        action: &str,
        last_action_ms: u64,
        detail: String,
    ) {
        let Some(file) = &self.event_log else {
            return;
        };
        let since = match last_action_ms {
            NEVER => String::new(),
            t => format!(
                ",\"secs_since_last_action\":\"{}\"",
                self.now_ms().saturating_sub(t) / 1000
            ),
        };
        let line = format!(
            "{{\"type\":\"{}\",\"timestamp\":\"{}\"{since},\"cluster_name\":{},\"upstream_url\":{},\"action\":\"{action}\",\"num_ejections\":{},\"enforced\":{enforced}{detail}}}\n",
            kind.unwrap_or(Ejection::Consecutive5xx).name(),
            proto_timestamp(SystemTime::now()),
            serde_json::Value::from(self.cluster_name.as_str()),
            serde_json::Value::from(host.address.to_string()),
            host.outlier.num_ejections.load(Ordering::Relaxed),
        );
        let _ = (&**file).write_all(line.as_bytes());
    }
}

impl Drop for Detector {
    /// A replaced or removed cluster's ejections stop counting (Envoy's detector destructor).
    fn drop(&mut self) {
        for h in &self.hosts.load().hosts {
            if ejected(h) {
                self.stats.ejections_active.dec();
            }
        }
    }
}

fn ejected(h: &Host) -> bool {
    h.health.load(Ordering::Relaxed) & health_flag::FAILED_OUTLIER_CHECK != 0
}

/// A `google.protobuf.Timestamp` in proto3 JSON at millisecond precision (no fraction when the
/// milliseconds are zero).
fn proto_timestamp(t: SystemTime) -> String {
    let s = petrel_filters::time::rfc3339_millis(t);
    match s.strip_suffix(".000Z") {
        Some(whole) => format!("{whole}Z"),
        None => s,
    }
}

/// The one thread that runs every detector's interval (Envoy re-arms each after it runs) and
/// the end of host sets' merge windows.
pub(super) mod timer {
    use super::*;

    enum Job {
        /// Repeats every interval while the detector lives.
        Interval(Weak<Detector>),
        /// Runs once.
        MergeWindow(Weak<HostSet>),
    }

    type Due = Vec<(Job, Instant)>;

    fn state() -> &'static (Mutex<Due>, Condvar) {
        static STATE: OnceLock<(Mutex<Due>, Condvar)> = OnceLock::new();
        STATE.get_or_init(|| {
            let _ = std::thread::Builder::new()
                .name("outlier_detection".into())
                .spawn(run);
            (Mutex::new(Vec::new()), Condvar::new())
        })
    }

    fn add(job: Job, at: Instant) {
        let (due, wake) = state();
        let mut due = due.lock().unwrap_or_else(|p| p.into_inner());
        due.push((job, at));
        wake.notify_one();
    }

    pub fn register(d: &Arc<Detector>) {
        add(
            Job::Interval(Arc::downgrade(d)),
            Instant::now() + d.config.interval,
        );
    }

    pub fn once(set: Weak<HostSet>, at: Instant) {
        add(Job::MergeWindow(set), at);
    }

    fn run() {
        let (due, wake) = state();
        let mut list = due.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            list.retain(|(job, _)| match job {
                Job::Interval(d) => d.strong_count() > 0,
                Job::MergeWindow(s) => s.strong_count() > 0,
            });
            let now = Instant::now();
            let Some(i) = list.iter().position(|(_, at)| *at <= now) else {
                let wait = list
                    .iter()
                    .map(|(_, at)| *at - now)
                    .min()
                    .unwrap_or(Duration::from_secs(3600));
                list = wake
                    .wait_timeout(list, wait)
                    .map(|(l, _)| l)
                    .unwrap_or_else(|p| p.into_inner().0);
                continue;
            };
            let (job, _) = list.swap_remove(i);
            drop(list);
            match &job {
                Job::Interval(d) => {
                    if let Some(d) = d.upgrade() {
                        d.on_interval();
                        add(job, Instant::now() + d.config.interval);
                    }
                }
                Job::MergeWindow(s) => {
                    if let Some(s) = s.upgrade() {
                        s.deliver_merged();
                    }
                }
            }
            list = due.lock().unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::host_set::Policy;
    use serde_json::json;

    fn config(v: serde_json::Value) -> Result<Config, ConfigError> {
        let o: OutlierDetection = xds_client::TypeRegistry::global()
            .from_json(&v, false)
            .expect("parses");
        compile(&o, "od")
    }

    fn detector(v: serde_json::Value, hosts: usize) -> (Arc<Detector>, Arc<HostSet>, Store) {
        let store = Store::default();
        let set = Arc::new(HostSet::new(
            (0..hosts)
                .map(|i| Arc::new(Host::original_dst(([127, 0, 0, 1], 1000 + i as u16).into())))
                .collect(),
            Policy::default(),
            crate::upstream::host_set::tests::test_membership(),
        ));
        let d = Detector::start(
            config(v).unwrap(),
            &store,
            "cluster.c.",
            "c",
            None,
            set.clone(),
        );
        (d, set, store)
    }

    #[test]
    fn defaults_and_refusals() {
        let c = config(json!({})).unwrap();
        assert_eq!(c.consecutive_5xx, 5);
        assert_eq!(c.max_ejection_time, Duration::from_secs(300));
        assert_eq!(c.enforcing_consecutive_gateway_failure, 0);
        let c = config(json!({"base_ejection_time": "400s"})).unwrap();
        assert_eq!(c.max_ejection_time, Duration::from_secs(400));
        for (bad, field) in [
            (json!({"max_ejection_percent": 101}), "max_ejection_percent"),
            (json!({"interval": "0s"}), "interval"),
            (
                json!({"base_ejection_time": "10s", "max_ejection_time": "5s"}),
                "max_ejection_time",
            ),
            (
                json!({"detect_degraded_hosts": true}),
                "detect_degraded_hosts",
            ),
        ] {
            let e = config(bad).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn consecutive_5xx_ejects_within_the_cap() {
        let (d, set, store) =
            detector(json!({"consecutive_5xx": 2, "max_ejection_percent": 50}), 4);
        let [a, b, ..] = &set.hosts[..] else { panic!() };
        d.report(a, Report::Response(500));
        d.report(a, Report::Response(200));
        d.report(a, Report::Response(500));
        assert!(!ejected(a));
        d.report(a, Report::Response(503));
        assert!(ejected(a));
        assert_eq!(set.plan().levels[0].all.hosts.len(), 3);
        // A connect failure counts as a 503; the second ejection hits the 50% cap? 2/4 = 50%: no.
        d.report(b, Report::ConnectSuccess);
        d.report(b, Report::ConnectFailed);
        d.report(b, Report::ConnectFailed);
        assert!(ejected(b));
        let c = &set.hosts[2];
        d.report(c, Report::Timeout);
        d.report(c, Report::Timeout);
        assert!(!ejected(c));
        let v = |n: &str| {
            store
                .counter(&format!("cluster.c.outlier_detection.{n}"))
                .value()
        };
        assert_eq!(v("ejections_enforced_consecutive_5xx"), 2);
        assert_eq!(v("ejections_overflow"), 1);
        assert_eq!(v("ejections_detected_consecutive_5xx"), 3);
        assert_eq!(
            store
                .gauge("cluster.c.outlier_detection.ejections_active")
                .value(),
            2
        );
    }

    #[test]
    fn gateway_failures_need_enforcing() {
        let (d, set, store) = detector(
            json!({"consecutive_5xx": 100, "consecutive_gateway_failure": 2, "max_ejection_percent": 100}),
            2,
        );
        let a = &set.hosts[0];
        d.report(a, Report::Response(502));
        d.report(a, Report::Response(500));
        d.report(a, Report::Response(502));
        d.report(a, Report::Response(504));
        // Detected, not enforced (enforcing_consecutive_gateway_failure defaults to 0).
        assert!(!ejected(a));
        let v = |n: &str| {
            store
                .counter(&format!("cluster.c.outlier_detection.{n}"))
                .value()
        };
        assert_eq!(v("ejections_detected_consecutive_gateway_failure"), 1);
        assert_eq!(v("ejections_enforced_total"), 0);
    }

    #[test]
    fn split_local_origin_errors() {
        let (d, set, _) = detector(
            json!({"split_external_local_origin_errors": true, "consecutive_local_origin_failure": 2,
                   "consecutive_5xx": 2, "max_ejection_percent": 100}),
            2,
        );
        let a = &set.hosts[0];
        d.report(a, Report::ConnectFailed);
        d.report(a, Report::ConnectSuccess);
        d.report(a, Report::Response(500));
        d.report(a, Report::ConnectFailed);
        assert!(!ejected(a));
        d.report(a, Report::Timeout);
        assert!(ejected(a));
    }

    #[test]
    fn success_rate_and_unejection_with_backoff() {
        let (d, set, store) = detector(
            json!({"consecutive_5xx": 1000, "success_rate_minimum_hosts": 3, "success_rate_request_volume": 10,
                   "success_rate_stdev_factor": 1000, "max_ejection_percent": 100,
                   "base_ejection_time": "1s", "interval": "10s"}),
            3,
        );
        for (i, h) in set.hosts.iter().enumerate() {
            for n in 0..10 {
                let fail = i == 2 && n < 5;
                d.report(h, Report::Response(if fail { 500 } else { 200 }));
            }
        }
        d.on_interval();
        assert!(ejected(&set.hosts[2]));
        let r = d.cluster_rates();
        // Rates 100, 100, 50: mean 83.3, stdev 23.6, threshold 59.8.
        assert!((r.success_rate_average - 83.33).abs() < 0.01, "{r:?}");
        assert!(
            (r.success_rate_ejection_threshold - 59.76).abs() < 0.01,
            "{r:?}"
        );
        assert_eq!(set.hosts[0].outlier.success_rate(false), 100.0);
        let v = |n: &str| {
            store
                .counter(&format!("cluster.c.outlier_detection.{n}"))
                .value()
        };
        assert_eq!(v("ejections_enforced_success_rate"), 1);
        // Back after base_ejection_time × 1.
        let h = &set.hosts[2];
        h.outlier.last_ejection_ms.store(0, Ordering::Relaxed);
        let d2 = d.clone();
        std::thread::sleep(Duration::from_millis(1010));
        d2.on_interval();
        assert!(!ejected(h));
        assert_eq!(h.outlier.eject_time_backoff.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn leaving_hosts_stop_counting() {
        let (d, set, store) = detector(
            json!({"consecutive_5xx": 1, "max_ejection_percent": 100}),
            2,
        );
        d.report(&set.hosts[0], Report::Response(500));
        let gauge = store.gauge("cluster.c.outlier_detection.ejections_active");
        assert_eq!(gauge.value(), 1);
        let rest = Arc::new(HostSet::new(
            vec![set.hosts[1].clone()],
            Policy::default(),
            crate::upstream::host_set::tests::test_membership(),
        ));
        d.watch(rest);
        assert_eq!(gauge.value(), 0);
    }

    #[test]
    fn a_dropped_detector_stops_counting_its_ejections() {
        let (d, set, store) = detector(
            json!({"consecutive_5xx": 1, "max_ejection_percent": 100}),
            2,
        );
        d.report(&set.hosts[0], Report::Response(500));
        let gauge = store.gauge("cluster.c.outlier_detection.ejections_active");
        assert_eq!(gauge.value(), 1);
        drop(d);
        assert_eq!(gauge.value(), 0);
    }
}
