//! A cluster's `circuit_breakers`: per-priority thresholds and the cluster-wide counts they
//! bound (Envoy's `ResourceManagerImpl`), shared by every worker, with Envoy's
//! `circuit_breakers.<priority>.*_open` and `remaining_*` gauges.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use xds_client::pb::envoy::config::cluster::v3 as pb;
use xds_client::pb::envoy::config::core::v3::RoutingPriority;

use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::{Gauge, Store};

/// One bounded count: its limit, its current value and its gauges.
#[derive(Debug)]
pub struct Resource {
    max: u64,
    current: AtomicU64,
    open: Arc<Gauge>,
    remaining: Option<Arc<Gauge>>,
    /// Retries under a `retry_budget`: Envoy keeps `remaining_retries` at zero once used.
    budgeted: bool,
}

impl Resource {
    fn new(
        store: &Store,
        prefix: &Arc<str>,
        open: &'static str,
        remaining: &'static str,
        max: u64,
        track: bool,
    ) -> Self {
        let r = Resource {
            max,
            current: AtomicU64::new(0),
            open: store.gauge_in(prefix, open),
            remaining: track.then(|| store.gauge_in(prefix, remaining)),
            budgeted: false,
        };
        // Envoy sets only the remaining gauges at creation; `*_open` move with the counts.
        if let Some(g) = &r.remaining {
            g.set(max as i64);
        }
        r
    }

    pub fn can_create(&self) -> bool {
        self.current.load(Ordering::Relaxed) < self.max
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn count(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }

    pub fn inc(&self) {
        let now = self.current.fetch_add(1, Ordering::Relaxed) + 1;
        self.publish(now);
    }

    pub fn dec(&self) {
        let now = self
            .current
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        self.publish(now);
    }

    fn publish(&self, now: u64) {
        self.open.set((now >= self.max) as i64);
        if let Some(r) = &self.remaining {
            // Stored as the bits of Envoy's unsigned gauge (no limit is u64::MAX).
            r.set(if self.budgeted {
                0
            } else {
                self.max.saturating_sub(now) as i64
            });
        }
    }
}

/// The counts one priority's thresholds bound.
#[derive(Debug)]
pub struct Resources {
    pub connections: Resource,
    pub pending_requests: Resource,
    pub requests: Resource,
    pub retries: Resource,
    pub connection_pools: Resource,
    retry_budget: Option<RetryBudget>,
}

/// `retry_budget`: retries in flight bounded by a share of the active and pending requests,
/// never below `min_retry_concurrency` (it replaces `max_retries`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct RetryBudget {
    percent: f64,
    min_concurrency: u64,
}

impl Resources {
    /// Whether one more retry may be scheduled (Envoy's `retries().canCreate()`).
    pub fn retries_can_create(&self) -> bool {
        let Some(b) = self.retry_budget else {
            return self.retries.can_create();
        };
        if let Some(r) = &self.retries.remaining {
            r.set(0);
        }
        let active = self.requests.count() + self.pending_requests.count();
        let max = ((b.percent / 100.0 * active as f64) as u64).max(b.min_concurrency);
        self.retries.count() < max
    }
}

/// A held unit of a resource, given back when dropped.
#[derive(Debug)]
pub struct Held {
    resources: Arc<Resources>,
    which: fn(&Resources) -> &Resource,
}

impl Held {
    pub fn take(resources: &Arc<Resources>, which: fn(&Resources) -> &Resource) -> Held {
        which(resources).inc();
        Held {
            resources: resources.clone(),
            which,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        (self.which)(&self.resources).dec();
    }
}

/// Envoy's defaults for a priority without thresholds.
const DEFAULT_MAX: u64 = 1024;
const DEFAULT_MAX_RETRIES: u64 = 3;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Limits {
    connections: u64,
    pending_requests: u64,
    requests: u64,
    retries: u64,
    connection_pools: u64,
    track_remaining: bool,
    retry_budget: Option<RetryBudget>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: DEFAULT_MAX,
            pending_requests: DEFAULT_MAX,
            requests: DEFAULT_MAX,
            retries: DEFAULT_MAX_RETRIES,
            connection_pools: u64::MAX,
            track_remaining: false,
            retry_budget: None,
        }
    }
}

impl Resources {
    fn new(store: &Store, prefix: &str, l: Limits) -> Resources {
        let t = l.track_remaining;
        let prefix: Arc<str> = prefix.into();
        let prefix = &prefix;
        Resources {
            connections: Resource::new(store, prefix, "cx_open", "remaining_cx", l.connections, t),
            pending_requests: Resource::new(
                store,
                prefix,
                "rq_pending_open",
                "remaining_pending",
                l.pending_requests,
                t,
            ),
            requests: Resource::new(store, prefix, "rq_open", "remaining_rq", l.requests, t),
            retries: Resource {
                budgeted: l.retry_budget.is_some(),
                ..Resource::new(
                    store,
                    prefix,
                    "rq_retry_open",
                    "remaining_retries",
                    l.retries,
                    t,
                )
            },
            connection_pools: Resource::new(
                store,
                prefix,
                "cx_pool_open",
                "remaining_cx_pools",
                l.connection_pools,
                t,
            ),
            retry_budget: l.retry_budget,
        }
    }
}

/// Both priorities' resources. Routes in Petrel always use the default priority; the high one is
/// shown in `/clusters` and its gauges, as Envoy shows both.
#[derive(Debug, Clone)]
pub struct CircuitBreakers {
    pub default: Arc<Resources>,
    pub high: Arc<Resources>,
}

/// Compiles `circuit_breakers` into both priorities' resources.
pub fn compile(
    cb: Option<&pb::CircuitBreakers>,
    store: &Store,
    stat_prefix: &str,
    path: &str,
) -> Result<CircuitBreakers, ConfigError> {
    let mut default = Limits::default();
    let mut high = Limits::default();
    if let Some(cb) = cb {
        let mut rest = cb.clone();
        let thresholds = std::mem::take(&mut rest.thresholds);
        reject_unhandled(&rest, path)?;
        for (i, t) in thresholds.iter().enumerate() {
            let tp = format!("{path}.thresholds[{i}]");
            let mut trest = *t;
            let limits = match RoutingPriority::try_from(std::mem::take(&mut trest.priority)) {
                Ok(RoutingPriority::Default) => &mut default,
                Ok(RoutingPriority::High) => &mut high,
                Err(_) => return Err(invalid(format!("{tp}.priority"), "unknown enum value")),
            };
            let v = |w: Option<u32>, d: u64| w.map(u64::from).unwrap_or(d);
            *limits = Limits {
                connections: v(trest.max_connections.take().map(|w| w.value), DEFAULT_MAX),
                pending_requests: v(
                    trest.max_pending_requests.take().map(|w| w.value),
                    DEFAULT_MAX,
                ),
                requests: v(trest.max_requests.take().map(|w| w.value), DEFAULT_MAX),
                retries: v(
                    trest.max_retries.take().map(|w| w.value),
                    DEFAULT_MAX_RETRIES,
                ),
                connection_pools: v(trest.max_connection_pools.take().map(|w| w.value), u64::MAX),
                track_remaining: std::mem::take(&mut trest.track_remaining),
                retry_budget: match trest.retry_budget.take() {
                    Some(b) => {
                        let percent = b.budget_percent.map_or(20.0, |p| p.value);
                        if !(0.0..=100.0).contains(&percent) {
                            return Err(invalid(
                                format!("{tp}.retry_budget.budget_percent.value"),
                                "value must be inside range [0, 100]",
                            ));
                        }
                        Some(RetryBudget {
                            percent,
                            min_concurrency: b.min_retry_concurrency.map_or(3, |m| m.value as u64),
                        })
                    }
                    None => None,
                },
            };
            reject_unhandled(&trest, &tp)?;
        }
    }
    Ok(CircuitBreakers {
        default: Arc::new(Resources::new(
            store,
            &format!("{stat_prefix}circuit_breakers.default."),
            default,
        )),
        high: Arc::new(Resources::new(
            store,
            &format!("{stat_prefix}circuit_breakers.high."),
            high,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::pb::google::protobuf::UInt32Value;

    #[test]
    fn thresholds_gauges_and_holds() {
        let store = Store::default();
        let cb = pb::CircuitBreakers {
            thresholds: vec![pb::circuit_breakers::Thresholds {
                max_connections: Some(UInt32Value { value: 1 }),
                max_retries: Some(UInt32Value { value: 2 }),
                track_remaining: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let r = compile(Some(&cb), &store, "cluster.c.", "c")
            .unwrap()
            .default;
        assert!(r.connections.can_create());
        assert_eq!(
            store
                .gauge("cluster.c.circuit_breakers.default.remaining_retries")
                .value(),
            2
        );
        {
            let _h = Held::take(&r, |r| &r.connections);
            assert!(!r.connections.can_create());
            assert_eq!(
                store
                    .gauge("cluster.c.circuit_breakers.default.cx_open")
                    .value(),
                1
            );
            assert_eq!(
                store
                    .gauge("cluster.c.circuit_breakers.default.remaining_cx")
                    .value(),
                0
            );
        }
        assert!(r.connections.can_create());
        assert_eq!(
            store
                .gauge("cluster.c.circuit_breakers.default.cx_open")
                .value(),
            0
        );
        // Defaults: 1024 requests, 3 retries; the high priority has gauges too.
        assert_eq!(r.requests.max, 1024);
        assert_eq!(
            store
                .gauge("cluster.c.circuit_breakers.high.rq_open")
                .value(),
            0
        );
    }

    #[test]
    fn retry_budget_follows_active_requests() {
        let store = Store::default();
        let cb: pb::CircuitBreakers = xds_client::TypeRegistry::global()
            .from_json(
                &serde_json::json!({"thresholds": [{"retry_budget": {"budget_percent": {"value": 50}, "min_retry_concurrency": 1}}]}),
                false,
            )
            .unwrap();
        let r = compile(Some(&cb), &store, "cluster.c.", "c")
            .unwrap()
            .default;
        let _retry = Held::take(&r, |r| &r.retries);
        // One retry in flight, minimum one: no more until there are requests to share.
        assert!(!r.retries_can_create());
        let _a: Vec<Held> = (0..4).map(|_| Held::take(&r, |r| &r.requests)).collect();
        // Half of four active requests: two retries.
        assert!(r.retries_can_create());
        let e = compile(
            Some(
                &xds_client::TypeRegistry::global()
                    .from_json(
                        &serde_json::json!({"thresholds": [{"retry_budget": {"budget_percent": {"value": 120}}}]}),
                        false,
                    )
                    .unwrap(),
            ),
            &store,
            "cluster.d.",
            "d",
        )
        .unwrap_err();
        assert!(e.to_string().contains("budget_percent"), "{e}");
    }
}
