//! Envoy-named stats: counters, gauges and text readouts kept as atomics.
//!
//! A stat is created (or found) by name when configuration is compiled, and the compiled config
//! holds the `Arc` to its atomic: the request path increments without any name lookup. The store's
//! map is only touched at compile time and by the admin handlers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct Counter {
    value: AtomicU64,
    used: AtomicBool,
}

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }
    pub fn value(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
    pub fn used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }
}

/// Envoy gauges import modes matter for hot restart only; Petrel keeps the value.
#[derive(Debug, Default)]
pub struct Gauge {
    value: AtomicI64,
    used: AtomicBool,
}

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    #[inline]
    pub fn dec(&self) {
        self.add(-1)
    }
    #[inline]
    pub fn add(&self, n: i64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        self.mark();
    }
    pub fn set(&self, v: i64) {
        self.value.store(v, Ordering::Relaxed);
        self.mark();
    }
    fn mark(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }
    pub fn value(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
    pub fn used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Maps {
    counters: BTreeMap<String, Arc<Counter>>,
    gauges: BTreeMap<String, Arc<Gauge>>,
    text: BTreeMap<String, String>,
}

/// The process's stat store.
#[derive(Default, Clone)]
pub struct Store {
    maps: Arc<Mutex<Maps>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    pub fn counter(&self, name: &str) -> Arc<Counter> {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        m.counters.entry(name.to_string()).or_default().clone()
    }
    pub fn gauge(&self, name: &str) -> Arc<Gauge> {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        m.gauges.entry(name.to_string()).or_default().clone()
    }
    pub fn set_text(&self, name: &str, value: &str) {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        m.text.insert(name.to_string(), value.to_string());
    }

    /// A consistent copy for the admin handlers.
    pub fn snapshot(&self) -> StatsSnapshot {
        let m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        StatsSnapshot {
            counters: m
                .counters
                .iter()
                .map(|(k, v)| (k.clone(), v.value(), v.used()))
                .collect(),
            gauges: m
                .gauges
                .iter()
                .map(|(k, v)| (k.clone(), v.value(), v.used()))
                .collect(),
            text: m.text.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

pub struct StatsSnapshot {
    pub counters: Vec<(String, u64, bool)>,
    pub gauges: Vec<(String, i64, bool)>,
    pub text: Vec<(String, String)>,
}

/// Declares a struct of stats resolved under one prefix, Envoy style:
/// `stat_struct!(ListenerStats { counter downstream_cx_total, gauge downstream_cx_active })`.
#[macro_export]
macro_rules! stat_struct {
    ($name:ident { $($kind:ident $field:ident),* $(,)? }) => {
        #[derive(Debug, Clone)]
        pub struct $name {
            $(pub $field: $crate::stat_struct!(@ty $kind),)*
        }
        impl $name {
            pub fn new(store: &$crate::observe::stats::Store, prefix: &str) -> Self {
                $name {
                    $($field: store.$kind(&format!("{}{}", prefix, stringify!($field))),)*
                }
            }
        }
    };
    (@ty counter) => { std::sync::Arc<$crate::observe::stats::Counter> };
    (@ty gauge) => { std::sync::Arc<$crate::observe::stats::Gauge> };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_atomic() {
        let s = Store::default();
        let a = s.counter("x.y");
        let b = s.counter("x.y");
        a.inc();
        b.add(2);
        assert_eq!(s.counter("x.y").value(), 3);
        let snap = s.snapshot();
        assert_eq!(snap.counters, vec![("x.y".to_string(), 3, true)]);
    }

    #[test]
    fn unused_gauge_is_reported_unused() {
        let s = Store::default();
        let g = s.gauge("g");
        assert!(!g.used());
        g.inc();
        g.dec();
        assert!(g.used());
        assert_eq!(g.value(), 0);
    }
}
