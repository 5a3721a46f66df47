//! A cluster's hosts by priority and the balancer's plan over them: which priority levels take
//! what share of requests and which of their hosts are eligible, as Envoy's
//! `LoadBalancerBase` computes it (priority load from health and the overprovisioning factor,
//! per-priority panic below `healthy_panic_threshold`, load by host count in total panic).
//!
//! The plan is recomputed when health changes (outlier ejection, EDS health) and swapped in
//! whole; the request path only loads it. Health-only changes that come within
//! `common_lb_config.update_merge_window` (default 1 s) of the last delivered one are delivered
//! together at the window's end, as Envoy's cluster manager merges them before workers see them.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::cluster::Host;
use super::consistent_hash::{HashLb, HashTable};
use crate::observe::stats::Gauge;

/// Envoy's default `overprovisioning_factor` (a percentage: 140 means 1.4).
pub const DEFAULT_OVERPROVISIONING: u32 = 140;
/// Envoy's default `common_lb_config.healthy_panic_threshold`.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 50.0;

/// Bits of `Host::health` (Envoy's health flags that Petrel sets).
pub mod health_flag {
    /// Ejected by outlier detection.
    pub const FAILED_OUTLIER_CHECK: u8 = 1;
    /// EDS said UNHEALTHY or TIMEOUT.
    pub const FAILED_EDS_HEALTH: u8 = 2;
    /// EDS said DRAINING: excluded from balancing altogether (not counted as a host).
    pub const EDS_STATUS_DRAINING: u8 = 4;
    /// The bits EDS sets (the rest belong to outlier detection).
    pub const FROM_EDS: u8 = FAILED_EDS_HEALTH | EDS_STATUS_DRAINING;
}

/// How priority levels share load and when they panic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub overprovisioning: u32,
    pub panic_threshold: f64,
    /// `common_lb_config.update_merge_window`; zero delivers every change at once.
    pub update_merge_window: Duration,
    /// RING_HASH or MAGLEV: each level carries its table.
    pub hash: Option<HashLb>,
    /// `locality_weighted_lb_config`: a locality is picked by weight before a host.
    pub locality_weighted: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            overprovisioning: DEFAULT_OVERPROVISIONING,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
            update_merge_window: Duration::from_secs(1),
            hash: None,
            locality_weighted: false,
        }
    }
}

/// One priority level.
#[derive(Debug)]
pub struct Level {
    /// Cumulative load up to and including this level, out of 100.
    pub upto: u32,
    /// The level's health (percent, overprovisioned, at most 100), for retries that skip
    /// priorities already tried.
    pub health: u64,
    /// The eligible hosts: the healthy ones, or all of the level's hosts in panic.
    pub all: HostGroup,
    /// With locality weights: each locality's eligible hosts after the cumulative effective
    /// weight up to it.
    pub localities: Vec<(f64, HostGroup)>,
    pub panic: bool,
    /// The consistent-hash table over `hosts` (RING_HASH and MAGLEV clusters).
    pub table: Option<HashTable>,
}

/// Hosts one balancer pick chooses among.
#[derive(Debug, Default)]
pub struct HostGroup {
    pub hosts: Vec<Arc<Host>>,
    /// Whether any host has a weight other than 1, and the weights' sum.
    pub weighted: bool,
    pub total_weight: u64,
}

impl HostGroup {
    fn new(hosts: Vec<Arc<Host>>) -> Self {
        HostGroup {
            weighted: hosts.iter().any(|h| h.weight != 1),
            total_weight: hosts.iter().map(|h| h.weight as u64).sum(),
            hosts,
        }
    }
}

/// Envoy's effective locality weights: each locality's weight times its share of eligible
/// hosts, overprovisioned and capped at one; localities that come to zero are left out.
fn localities(
    level: &[&Arc<Host>],
    eligible: &[Arc<Host>],
    overprovisioning: u32,
) -> Vec<(f64, HostGroup)> {
    let mut names: Vec<&str> = Vec::new();
    for h in level {
        if !names.contains(&h.locality.as_str()) {
            names.push(&h.locality);
        }
    }
    let mut upto = 0.0;
    let mut out = Vec::new();
    for name in names {
        let total = level
            .iter()
            .filter(|h| h.locality == name && !excluded(h))
            .count();
        let hosts: Vec<Arc<Host>> = eligible
            .iter()
            .filter(|h| h.locality == name)
            .cloned()
            .collect();
        let weight = level
            .iter()
            .find(|h| h.locality == name)
            .map_or(0, |h| h.locality_weight);
        let availability = match total {
            0 => 0.0,
            t => (overprovisioning as f64 / 100.0 * hosts.len() as f64 / t as f64).min(1.0),
        };
        let effective = weight as f64 * availability;
        if effective > 0.0 && !hosts.is_empty() {
            upto += effective;
            out.push((upto, HostGroup::new(hosts)));
        }
    }
    out
}

/// Every priority level, by priority; empty when the cluster has no host at all.
#[derive(Debug, Default)]
pub struct Plan {
    pub levels: Vec<Level>,
    /// The one level with load, when only one has any (the common case).
    single: Option<usize>,
}

impl Plan {
    /// The level for a request, by a number in 0..100 (unused when one level takes all).
    pub fn level(&self, point: impl FnOnce() -> u32) -> Option<&Level> {
        if let Some(i) = self.single {
            return self.levels.get(i);
        }
        if self.levels.is_empty() {
            return None;
        }
        let p = point();
        self.levels
            .iter()
            .find(|l| p < l.upto)
            .or(self.levels.last())
    }

    /// Envoy's `previous_priorities` retry priority: the load spread again over the levels not
    /// `excluded`, or None when none of them is available (the caller starts over).
    pub fn level_excluding(&self, excluded: &[bool], point: u32) -> Option<Option<&Level>> {
        let health: Vec<u64> = self
            .levels
            .iter()
            .enumerate()
            .map(|(p, l)| {
                if excluded.get(p) == Some(&true) {
                    0
                } else {
                    l.health
                }
            })
            .collect();
        let total = health.iter().sum::<u64>().min(100);
        if total == 0 {
            return None;
        }
        let mut load = vec![0u64; health.len()];
        let mut left = 100u64;
        // Repeated passes hand rounding leftovers to the first available levels, as Envoy does.
        while left > 0 {
            for (p, h) in health.iter().enumerate() {
                let delta = left.min(h * 100 / total);
                load[p] += delta;
                left -= delta;
            }
        }
        let mut upto = 0;
        for (p, l) in load.iter().enumerate() {
            upto += *l as u32;
            if point < upto {
                return Some(self.levels.get(p));
            }
        }
        Some(self.levels.last())
    }
}

/// Every host of a cluster (all priorities, in configuration order) and the plan over them.
#[derive(Debug)]
pub struct HostSet {
    pub hosts: Vec<Arc<Host>>,
    policy: Policy,
    plan: ArcSwap<Plan>,
    membership: Membership,
    merge: Mutex<Merge>,
}

/// The cluster's `membership_healthy` and `membership_excluded` gauges.
#[derive(Debug, Clone)]
pub struct Membership {
    pub healthy: Arc<Gauge>,
    pub excluded: Arc<Gauge>,
}

/// When the plan was last delivered, and whether a merged delivery is scheduled.
#[derive(Debug, Default)]
struct Merge {
    last_delivered: Option<Instant>,
    scheduled: bool,
}

pub fn healthy(h: &Host) -> bool {
    h.health.load(Ordering::Relaxed) == 0
}

fn excluded(h: &Host) -> bool {
    h.health.load(Ordering::Relaxed) & health_flag::EDS_STATUS_DRAINING != 0
}

impl HostSet {
    pub fn new(hosts: Vec<Arc<Host>>, policy: Policy, membership: Membership) -> Self {
        let set = HostSet {
            plan: ArcSwap::from_pointee(plan(&hosts, policy)),
            hosts,
            policy,
            membership,
            merge: Mutex::default(),
        };
        set.count_membership();
        set
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn plan(&self) -> arc_swap::Guard<Arc<Plan>> {
        self.plan.load()
    }

    /// A host's health changed: the membership gauge follows at once, the balancer's plan at
    /// once or at the end of the merge window.
    pub fn health_changed(self: &Arc<Self>) {
        self.count_membership();
        let window = self.policy.update_merge_window;
        let now = Instant::now();
        let mut m = self.merge.lock().unwrap_or_else(|p| p.into_inner());
        let in_window = m.last_delivered.is_some_and(|t| now - t <= window);
        if window.is_zero() || !in_window {
            m.last_delivered = Some(now);
            // A scheduled delivery is overtaken by this one (Envoy cancels its timer).
            m.scheduled = false;
            drop(m);
            self.deliver();
        } else if !m.scheduled {
            m.scheduled = true;
            super::outlier_detection::timer::once(Arc::downgrade(self), now + window);
        }
    }

    /// The scheduled end of a merge window.
    pub fn deliver_merged(&self) {
        let mut m = self.merge.lock().unwrap_or_else(|p| p.into_inner());
        if !m.scheduled {
            return;
        }
        m.scheduled = false;
        m.last_delivered = Some(Instant::now());
        drop(m);
        self.deliver();
    }

    fn deliver(&self) {
        self.plan.store(Arc::new(plan(&self.hosts, self.policy)));
    }

    fn count_membership(&self) {
        let count = |f: fn(&Host) -> bool| self.hosts.iter().filter(|h| f(h)).count() as i64;
        self.membership.healthy.set(count(healthy));
        self.membership.excluded.set(count(excluded));
    }
}

/// Envoy's priority load, panic and total-panic computation over `hosts`.
fn plan(hosts: &[Arc<Host>], policy: Policy) -> Plan {
    let levels = hosts.iter().map(|h| h.priority + 1).max().unwrap_or(0) as usize;
    if levels == 0 {
        return Plan::default();
    }
    let mut total = vec![0u64; levels];
    let mut up = vec![0u64; levels];
    for h in hosts.iter().filter(|h| !excluded(h)) {
        total[h.priority as usize] += 1;
        if healthy(h) {
            up[h.priority as usize] += 1;
        }
    }
    let health: Vec<u64> = (0..levels)
        .map(|p| match total[p] {
            0 => 0,
            t => (policy.overprovisioning as u64 * up[p] / t).min(100),
        })
        .collect();
    let normalized = health.iter().sum::<u64>().min(100);
    let panic: Vec<bool> = (0..levels)
        .map(|p| {
            let pct = match total[p] {
                0 => 0.0,
                t => 100.0 * up[p] as f64 / t as f64,
            };
            policy.panic_threshold > 0.0 && pct < policy.panic_threshold.min(100.0)
        })
        .collect();
    let mut load = vec![0u64; levels];
    if panic.iter().all(|p| *p) {
        // Total panic: load follows host counts (all to the first level when there are none).
        let sum: u64 = total.iter().sum();
        let mut left = 100;
        for p in 0..levels {
            load[p] = 100 * total[p] / sum.max(1);
            left -= load[p];
        }
        let first = total.iter().position(|t| *t > 0).unwrap_or(0);
        load[first] += left;
    } else {
        // With nothing healthy and no panic (threshold 0) everything goes to the first level,
        // whose healthy hosts are none, so requests find no upstream.
        let mut left = 100u64;
        for p in 0..levels {
            load[p] = left.min((health[p] * 100).checked_div(normalized).unwrap_or(0));
            left -= load[p];
        }
        let first = health.iter().position(|h| *h > 0).unwrap_or(0);
        load[first] += left;
    }
    let mut upto = 0;
    let mut out = Vec::new();
    for p in 0..levels {
        upto += load[p] as u32;
        let eligible: Vec<Arc<Host>> = hosts
            .iter()
            // In panic Envoy uses every host of the level, excluded ones included.
            .filter(|h| h.priority as usize == p && (panic[p] || healthy(h)))
            .cloned()
            .collect();
        let in_level: Vec<&Arc<Host>> = hosts.iter().filter(|h| h.priority as usize == p).collect();
        out.push(Level {
            upto,
            health: health[p],
            table: policy.hash.and_then(|lb| HashTable::build(lb, &eligible)),
            localities: if policy.locality_weighted {
                localities(&in_level, &eligible, policy.overprovisioning)
            } else {
                Vec::new()
            },
            all: HostGroup::new(eligible),
            panic: panic[p],
        });
    }
    let with_load: Vec<usize> = (0..levels).filter(|p| load[*p] > 0).collect();
    Plan {
        levels: out,
        single: (with_load.len() == 1).then(|| with_load[0]),
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::observe::stats::Store;

    pub fn test_membership() -> Membership {
        let s = Store::default();
        Membership {
            healthy: s.gauge("h"),
            excluded: s.gauge("e"),
        }
    }

    fn host(port: u16, priority: u32, up: bool) -> Arc<Host> {
        let mut h = Host::original_dst(([127, 0, 0, 1], port).into());
        h.priority = priority;
        if !up {
            h.health = health_flag::FAILED_OUTLIER_CHECK.into();
        }
        Arc::new(h)
    }

    fn loads(hosts: Vec<Arc<Host>>, threshold: f64) -> Vec<(u32, usize, bool)> {
        let set = HostSet::new(
            hosts,
            Policy {
                overprovisioning: 140,
                panic_threshold: threshold,
                update_merge_window: Duration::ZERO,
                hash: None,
                locality_weighted: false,
            },
            test_membership(),
        );
        let plan = set.plan();
        let mut prev = 0;
        plan.levels
            .iter()
            .map(|l| {
                let share = l.upto - prev;
                prev = l.upto;
                (share, l.all.hosts.len(), l.panic)
            })
            .filter(|(share, _, _)| *share > 0)
            .collect()
    }

    #[test]
    fn all_healthy_top_priority_takes_everything() {
        let l = loads(vec![host(1, 0, true), host(2, 1, true)], 50.0);
        assert_eq!(l, vec![(100, 1, false)]);
    }

    #[test]
    fn unhealthy_hosts_spill_to_the_next_priority() {
        // 1 of 2 healthy: health 70, the rest to priority 1.
        let l = loads(
            vec![host(1, 0, true), host(2, 0, false), host(3, 1, true)],
            50.0,
        );
        assert_eq!(l, vec![(70, 1, false), (30, 1, false)]);
    }

    #[test]
    fn panic_uses_every_host_of_the_level() {
        // 1 of 3 healthy at priority 0 (33% < 50%): panic there, health 46.
        let l = loads(
            vec![
                host(1, 0, true),
                host(2, 0, false),
                host(3, 0, false),
                host(4, 1, true),
            ],
            50.0,
        );
        assert_eq!(l, vec![(46, 3, true), (54, 1, false)]);
    }

    #[test]
    fn total_panic_spreads_by_host_count() {
        let l = loads(
            vec![host(1, 0, false), host(2, 1, false), host(3, 1, false)],
            50.0,
        );
        assert_eq!(l, vec![(34, 1, true), (66, 2, true)]);
    }

    #[test]
    fn threshold_zero_never_panics() {
        let l = loads(vec![host(1, 0, false), host(2, 0, false)], 0.0);
        assert_eq!(l, vec![(100, 0, false)]);
    }

    #[test]
    fn changes_within_the_merge_window_wait_for_its_end() {
        let hosts = vec![host(1, 0, true), host(2, 0, true)];
        let set = Arc::new(HostSet::new(
            hosts,
            Policy {
                update_merge_window: Duration::from_millis(300),
                ..Policy::default()
            },
            test_membership(),
        ));
        let eject = |i: usize| {
            set.hosts[i]
                .health
                .store(health_flag::FAILED_OUTLIER_CHECK, Ordering::Relaxed);
            set.health_changed();
        };
        eject(0);
        assert_eq!(
            set.plan().levels[0].all.hosts.len(),
            1,
            "first change is at once"
        );
        eject(1);
        assert_eq!(set.plan().levels[0].all.hosts.len(), 1, "second waits");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !set.plan().levels[0].panic && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(set.plan().levels[0].panic, "delivered at the window's end");
    }

    #[test]
    fn retries_can_skip_tried_priorities() {
        let set = HostSet::new(
            vec![host(1, 0, true), host(2, 1, true), host(3, 2, true)],
            Policy::default(),
            test_membership(),
        );
        let plan = set.plan();
        assert_eq!(plan.level(|| 99).map(|l| l.all.hosts[0].priority), Some(0));
        // Priority 0 tried: the load spreads over 1 and 2 by health, the first one first.
        let l = plan
            .level_excluding(&[true, false, false], 99)
            .unwrap()
            .unwrap();
        assert_eq!(l.all.hosts[0].priority, 1);
        assert!(plan.level_excluding(&[true, true, true], 0).is_none());
    }

    #[test]
    fn locality_weights_follow_availability() {
        let in_locality = |port: u16, name: &str, weight: u32, up: bool| {
            let mut h = Host::original_dst(([127, 0, 0, 1], port).into());
            h.locality = name.into();
            h.locality_weight = weight;
            if !up {
                h.health = health_flag::FAILED_OUTLIER_CHECK.into();
            }
            Arc::new(h)
        };
        let set = HostSet::new(
            vec![
                in_locality(1, "a", 1, true),
                in_locality(2, "a", 1, false),
                in_locality(3, "b", 3, true),
                in_locality(4, "c", 0, true),
            ],
            Policy {
                locality_weighted: true,
                ..Policy::default()
            },
            test_membership(),
        );
        let plan = set.plan();
        let l: Vec<(f64, usize)> = plan.levels[0]
            .localities
            .iter()
            .map(|(w, g)| ((w * 100.0).round() / 100.0, g.hosts.len()))
            .collect();
        // a: 1 × min(1, 1.4 × 1/2) = 0.7; b: 3; c has no weight.
        assert_eq!(l, vec![(0.7, 1), (3.7, 1)]);
    }

    #[test]
    fn no_hosts_no_levels() {
        assert!(loads(vec![], 50.0).is_empty());
    }
}
