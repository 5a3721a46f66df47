//! Envoy-named stats (kept in `petrel_filters::stats` so filters can own theirs), and the
//! `stat_struct!` macro the proxy declares its stat groups with.

pub use petrel_filters::stats::*;

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
                // One copy of the prefix for all of them.
                let prefix: std::sync::Arc<str> = prefix.into();
                $name {
                    $($field: $crate::stat_struct!(@make store, prefix, $kind, $field),)*
                }
            }
        }
    };
    (@make $store:ident, $prefix:ident, counter, $field:ident) => {
        $store.counter_in(&$prefix, stringify!($field))
    };
    (@make $store:ident, $prefix:ident, gauge, $field:ident) => {
        $store.gauge_in(&$prefix, stringify!($field))
    };
    (@make $store:ident, $prefix:ident, histogram, $field:ident) => {
        $store.histogram_in(&$prefix, stringify!($field))
    };
    (@ty counter) => { std::sync::Arc<$crate::observe::stats::Counter> };
    (@ty gauge) => { std::sync::Arc<$crate::observe::stats::Gauge> };
    (@ty histogram) => { std::sync::Arc<$crate::observe::stats::Histogram> };
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
    fn shared_prefix_names_are_whole_names() {
        let s = Store::default();
        let prefix: std::sync::Arc<str> = "cluster.a.".into();
        let split = s.counter_in(&prefix, "upstream_rq_total");
        split.inc();
        assert_eq!(s.counter("cluster.a.upstream_rq_total").value(), 1);
        s.counter("cluster.a.b.x").inc();
        s.counter_in(&prefix, "zz").inc();
        let names: Vec<String> = s.snapshot().counters.into_iter().map(|c| c.0).collect();
        // Sorted as whole names, whichever form each was made in.
        assert_eq!(
            names,
            [
                "cluster.a.b.x",
                "cluster.a.upstream_rq_total",
                "cluster.a.zz"
            ]
        );
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
