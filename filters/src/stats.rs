//! Envoy-named stats: counters, gauges and text readouts kept as atomics.
//!
//! A stat is created (or found) by name when configuration is compiled, and the compiled config
//! holds the `Arc` to its atomic: the request path increments without any name lookup. The store's
//! map is only touched at compile time and by the admin handlers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::histogram::Histogram;

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

/// A stat's name: most are a shared prefix (`cluster.<name>.`) and a static field name, kept
/// as such so that a cluster's hundred stats do not each own a copy of its name. Ordered and
/// compared as the whole name.
#[derive(Debug, Clone)]
enum StatName {
    Split(Arc<str>, &'static str),
    Whole(Box<str>),
    Tagged(Arc<TaggedName>),
}

/// A stat made with explicit tags (Istio's telemetry makes them so): its name is the
/// tag-extracted name followed by each tag's name and value, and tag extraction leaves it alone.
#[derive(Debug)]
struct TaggedName {
    full: String,
    extracted: String,
    tags: Vec<(String, String)>,
}

impl TaggedName {
    fn new(extracted: &str, tags: &[(&str, &str)]) -> TaggedName {
        let mut full = extracted.to_string();
        for (k, v) in tags {
            full.push('.');
            full.push_str(k);
            full.push('.');
            full.push_str(v);
        }
        TaggedName {
            full,
            extracted: extracted.to_string(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

impl StatName {
    fn parts(&self) -> (&str, &str) {
        match self {
            StatName::Split(p, s) => (p, s),
            StatName::Whole(w) => (w, ""),
            StatName::Tagged(t) => (&t.full, ""),
        }
    }
    fn bytes(&self) -> impl Iterator<Item = u8> + '_ {
        let (a, b) = self.parts();
        a.bytes().chain(b.bytes())
    }
}

impl std::fmt::Display for StatName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = self.parts();
        write!(f, "{a}{b}")
    }
}

impl PartialEq for StatName {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for StatName {}

impl PartialOrd for StatName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StatName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes().cmp(other.bytes())
    }
}

#[derive(Default)]
struct Maps {
    counters: BTreeMap<StatName, Arc<Counter>>,
    gauges: BTreeMap<StatName, Arc<Gauge>>,
    histograms: BTreeMap<StatName, Arc<Histogram>>,
    text: BTreeMap<String, String>,
    /// The names and tags of the stats made with explicit tags, by full name.
    tagged: BTreeMap<String, Arc<TaggedName>>,
    /// Envoy's custom stat namespaces: shown in Prometheus without the namespace and without
    /// `envoy_` (Istio's `istiocustom`).
    custom_namespaces: Vec<String>,
    sample_sink: Option<Arc<dyn crate::histogram::SampleSink>>,
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
        self.counter_named(StatName::Whole(name.into()))
    }
    pub fn gauge(&self, name: &str) -> Arc<Gauge> {
        self.gauge_named(StatName::Whole(name.into()))
    }
    /// `prefix` + `field`, the prefix shared with the other stats of its owner.
    pub fn counter_in(&self, prefix: &Arc<str>, field: &'static str) -> Arc<Counter> {
        self.counter_named(StatName::Split(prefix.clone(), field))
    }
    pub fn gauge_in(&self, prefix: &Arc<str>, field: &'static str) -> Arc<Gauge> {
        self.gauge_named(StatName::Split(prefix.clone(), field))
    }
    pub fn histogram(&self, name: &str) -> Arc<Histogram> {
        self.histogram_named(StatName::Whole(name.into()))
    }
    pub fn histogram_in(&self, prefix: &Arc<str>, field: &'static str) -> Arc<Histogram> {
        self.histogram_named(StatName::Split(prefix.clone(), field))
    }
    /// A counter with explicit tags (see [`TaggedName`]).
    pub fn counter_tagged(&self, extracted: &str, tags: &[(&str, &str)]) -> Arc<Counter> {
        let name = self.tagged_name(extracted, tags);
        self.counter_named(name)
    }
    pub fn gauge_tagged(&self, extracted: &str, tags: &[(&str, &str)]) -> Arc<Gauge> {
        let name = self.tagged_name(extracted, tags);
        self.gauge_named(name)
    }
    pub fn histogram_tagged(&self, extracted: &str, tags: &[(&str, &str)]) -> Arc<Histogram> {
        let name = self.tagged_name(extracted, tags);
        self.histogram_named(name)
    }
    fn tagged_name(&self, extracted: &str, tags: &[(&str, &str)]) -> StatName {
        let t = TaggedName::new(extracted, tags);
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let t = m
            .tagged
            .entry(t.full.clone())
            .or_insert_with(|| Arc::new(t));
        StatName::Tagged(t.clone())
    }
    /// Registers an Envoy custom stat namespace (`istiocustom`).
    pub fn register_custom_namespace(&self, ns: &str) {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if !m.custom_namespaces.iter().any(|n| n == ns) {
            m.custom_namespaces.push(ns.to_string());
        }
    }
    fn histogram_named(&self, name: StatName) -> Arc<Histogram> {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let sink = m.sample_sink.clone();
        m.histograms
            .entry(name)
            .or_insert_with_key(|n| {
                let h = Arc::new(Histogram::default());
                if let Some(s) = sink {
                    h.send_samples_to(&n.to_string(), s);
                }
                h
            })
            .clone()
    }

    /// Every histogram, those made later too, sends its samples to `sink` as they are recorded.
    pub fn set_sample_sink(&self, sink: Arc<dyn crate::histogram::SampleSink>) {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        for (name, h) in &m.histograms {
            h.send_samples_to(&name.to_string(), sink.clone());
        }
        m.sample_sink = Some(sink);
    }

    /// The stats flush: every histogram's samples since the last one become its interval.
    pub fn merge_histograms(&self) {
        let all: Vec<Arc<Histogram>> = {
            let m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            m.histograms.values().cloned().collect()
        };
        for h in all {
            h.merge();
        }
    }

    fn counter_named(&self, name: StatName) -> Arc<Counter> {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        m.counters.entry(name).or_default().clone()
    }
    fn gauge_named(&self, name: StatName) -> Arc<Gauge> {
        let mut m = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        m.gauges.entry(name).or_default().clone()
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
                .map(|(k, v)| (k.to_string(), v.value(), v.used()))
                .collect(),
            // Envoy's gauges are unsigned 64-bit: that is how they are shown.
            gauges: m
                .gauges
                .iter()
                .map(|(k, v)| (k.to_string(), v.value() as u64, v.used()))
                .collect(),
            text: m.text.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            histograms: m
                .histograms
                .iter()
                .map(|(k, v)| (k.to_string(), v.merged(), v.used()))
                .collect(),
            tagged: m
                .tagged
                .iter()
                .map(|(k, t)| (k.clone(), (t.extracted.clone(), t.tags.clone())))
                .collect(),
            custom_namespaces: m.custom_namespaces.clone(),
        }
    }
}

pub struct StatsSnapshot {
    pub counters: Vec<(String, u64, bool)>,
    pub gauges: Vec<(String, u64, bool)>,
    pub text: Vec<(String, String)>,
    /// As of the last stats flush, as Envoy shows them.
    pub histograms: Vec<(String, crate::histogram::Merged, bool)>,
    /// Stats made with explicit tags: full name → (tag-extracted name, tags).
    pub tagged: std::collections::HashMap<String, (String, Vec<(String, String)>)>,
    pub custom_namespaces: Vec<String>,
}
