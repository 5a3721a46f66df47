//! Istio's stats filter (`istio.stats`, `stats.PluginConfig`), HTTP and network: the standard
//! Istio metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, `istio_tcp_*`) with Istio's labels, made from
//! who the peers are (the peer metadata filter's discovery, else the endpoint's `istio.workload`
//! metadata), the cluster's `istio.services`, the TLS identities and the stream's outcome, and
//! the `istio_build` gauge. Stats live in Envoy's custom namespace `istiocustom`, so Prometheus
//! shows them without it and without `envoy_`.
//!
//! The report is made when the stream ends (HTTP: as an access log; TCP: when the peer is known,
//! every `tcp_reporting_duration`, and at close). Label sets are resolved once per worker and
//! then found in a worker-local map: the request path takes no lock for a label set seen before.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use petrel_filters::filter_state::FilterState;
use petrel_filters::workload_metadata::{IstioClusterMetadata, WorkloadMetadata};
use xds_client::pb::envoy::config::core::v3::Node;
use xds_client::pb::google::protobuf::{value::Kind, Any, Struct};

use crate::config::{invalid, ConfigError};
use crate::listener::TrafficDirection;
use crate::observe::stats::{Counter, Histogram, Store};
use crate::tls::info::TlsInfo;

pub const TYPE_URL: &str = "type.googleapis.com/stats.PluginConfig";
const NAMESPACE: &str = "istiocustom";

mod pb {
    /// `stats.PluginConfig` as `xds-client/proto/istio/stats.proto` declares it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginConfig {
        #[prost(bool, tag = "6")]
        pub disable_host_header_fallback: bool,
        #[prost(message, optional, tag = "7")]
        pub tcp_reporting_duration: Option<xds_client::pb::google::protobuf::Duration>,
        #[prost(message, repeated, tag = "8")]
        pub metrics: Vec<MetricConfig>,
        #[prost(message, repeated, tag = "9")]
        pub definitions: Vec<MetricDefinition>,
        #[prost(int32, tag = "10")]
        pub reporter: i32,
        #[prost(message, optional, tag = "11")]
        pub rotation_interval: Option<xds_client::pb::google::protobuf::Duration>,
        #[prost(message, optional, tag = "12")]
        pub graceful_deletion_interval: Option<xds_client::pb::google::protobuf::Duration>,
    }
    impl prost::Name for PluginConfig {
        const NAME: &'static str = "PluginConfig";
        const PACKAGE: &'static str = "stats";
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricConfig {
        #[prost(map = "string, string", tag = "1")]
        pub dimensions: std::collections::HashMap<String, String>,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(string, repeated, tag = "3")]
        pub tags_to_remove: Vec<String>,
        #[prost(string, tag = "4")]
        pub r#match: String,
        #[prost(bool, tag = "5")]
        pub drop: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricDefinition {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
        #[prost(int32, tag = "3")]
        pub r#type: i32,
    }
}

/// The standard metrics, by the names `metrics[].name` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    RequestsTotal,
    RequestDuration,
    RequestBytes,
    ResponseBytes,
    RequestMessages,
    ResponseMessages,
    TcpOpened,
    TcpClosed,
    TcpSent,
    TcpReceived,
}

const METRICS: [(Metric, &str); 10] = [
    (Metric::RequestsTotal, "requests_total"),
    (Metric::RequestDuration, "request_duration_milliseconds"),
    (Metric::RequestBytes, "request_bytes"),
    (Metric::ResponseBytes, "response_bytes"),
    (Metric::RequestMessages, "request_messages_total"),
    (Metric::ResponseMessages, "response_messages_total"),
    (Metric::TcpOpened, "tcp_connections_opened_total"),
    (Metric::TcpClosed, "tcp_connections_closed_total"),
    (Metric::TcpSent, "tcp_sent_bytes_total"),
    (Metric::TcpReceived, "tcp_received_bytes_total"),
];

impl Metric {
    fn stat_name(self) -> String {
        let short = METRICS
            .iter()
            .find(|(m, _)| *m == self)
            .map_or("", |(_, n)| n);
        format!("{NAMESPACE}.istio_{short}")
    }
}

/// The standard labels, which `tags_to_remove` may name.
const STANDARD_TAGS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
];

/// Which side of the traffic this proxy reports as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// An outbound sidecar listener (`reporter="source"`).
    ClientSidecar,
    /// An inbound sidecar listener (`reporter="destination"`).
    ServerSidecar,
    /// `reporter: SERVER_GATEWAY` (`reporter="waypoint"`).
    ServerGateway,
}

impl Reporter {
    fn label(self) -> &'static str {
        match self {
            Reporter::ClientSidecar => "source",
            Reporter::ServerSidecar => "destination",
            Reporter::ServerGateway => "waypoint",
        }
    }
    fn is_server(self) -> bool {
        self != Reporter::ClientSidecar
    }
}

/// This proxy's own workload, from its node metadata.
#[derive(Debug, Default)]
struct Local {
    workload_name: String,
    namespace: String,
    canonical_name: String,
    canonical_revision: String,
    cluster_name: String,
    app_name: String,
    app_version: String,
}

fn string_field<'a>(s: &'a Struct, key: &str) -> &'a str {
    match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(v)) => v,
        _ => "",
    }
}

impl Local {
    fn of(metadata: &Struct) -> Local {
        let labels = match metadata.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
            Some(Kind::StructValue(l)) => l.clone(),
            _ => Struct::default(),
        };
        Local {
            workload_name: string_field(metadata, "WORKLOAD_NAME").into(),
            namespace: string_field(metadata, "NAMESPACE").into(),
            canonical_name: string_field(&labels, "service.istio.io/canonical-name").into(),
            canonical_revision: string_field(&labels, "service.istio.io/canonical-revision").into(),
            cluster_name: string_field(metadata, "CLUSTER_ID").into(),
            app_name: string_field(&labels, "app").into(),
            app_version: string_field(&labels, "version").into(),
        }
    }
}

/// One `istio.stats` filter's compiled config.
#[derive(Debug)]
pub struct IstioStats {
    id: usize,
    reporter: Reporter,
    local: Local,
    disable_host_header_fallback: bool,
    /// How often an open TCP connection reports its bytes.
    pub tcp_reporting_duration: Duration,
    dropped: Vec<Metric>,
    /// `tags_to_remove`: (metric, or every metric; label).
    removed: Vec<(Option<Metric>, &'static str)>,
    store: Store,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl IstioStats {
    pub fn compile(
        any: &Any,
        node: &Node,
        direction: TrafficDirection,
        store: &Store,
        path: &str,
    ) -> Result<IstioStats, ConfigError> {
        let cfg: pb::PluginConfig = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, format!("cannot decode stats.PluginConfig: {e}")))?;
        if !cfg.definitions.is_empty() {
            return Err(invalid(
                format!("{path}.definitions"),
                "custom metric definitions (CEL value expressions) are not supported",
            ));
        }
        for (field, set) in [
            ("rotation_interval", &cfg.rotation_interval),
            (
                "graceful_deletion_interval",
                &cfg.graceful_deletion_interval,
            ),
        ] {
            if set.as_ref().is_some_and(|d| d.seconds != 0 || d.nanos != 0) {
                return Err(invalid(
                    format!("{path}.{field}"),
                    "rotating the Istio stats scope is not supported",
                ));
            }
        }
        let reporter = match cfg.reporter {
            0 => match direction {
                TrafficDirection::Inbound => Reporter::ServerSidecar,
                _ => Reporter::ClientSidecar,
            },
            1 => Reporter::ServerGateway,
            _ => return Err(invalid(format!("{path}.reporter"), "unknown enum value")),
        };
        let mut dropped = Vec::new();
        let mut removed = Vec::new();
        for (i, m) in cfg.metrics.iter().enumerate() {
            let mp = format!("{path}.metrics[{i}]");
            if !m.dimensions.is_empty() {
                return Err(invalid(
                    format!("{mp}.dimensions"),
                    "dimensions (CEL expressions) are not supported",
                ));
            }
            let metric = METRICS
                .iter()
                .find(|(_, n)| *n == m.name)
                .map(|(metric, _)| *metric);
            if m.drop {
                // As in Istio, a drop names one standard metric; anything else drops nothing.
                dropped.extend(metric);
                continue;
            }
            for tag in &m.tags_to_remove {
                match STANDARD_TAGS.iter().find(|t| *t == tag) {
                    // Istio skips a non-standard tag (with a log line) and so does Petrel.
                    None => crate::plog!(info, "filter", "{mp}: tag is not standard: {tag}"),
                    Some(t) if m.name.is_empty() => removed.push((None, *t)),
                    Some(t) => {
                        if let Some(metric) = metric {
                            removed.push((Some(metric), *t));
                        }
                    }
                }
            }
        }
        let tcp_reporting_duration = match &cfg.tcp_reporting_duration {
            Some(d) => {
                crate::config::duration::to_std(d, &format!("{path}.tcp_reporting_duration"))?
            }
            None => Duration::from_secs(5),
        };
        let metadata = node.metadata.clone().unwrap_or_default();
        store.register_custom_namespace(NAMESPACE);
        let version = string_field(&metadata, "ISTIO_VERSION");
        store
            .gauge_tagged(
                &format!("{NAMESPACE}.istio_build"),
                &[
                    ("component", "proxy"),
                    (
                        "tag",
                        if version.is_empty() {
                            "unknown"
                        } else {
                            version
                        },
                    ),
                ],
            )
            .set(1);
        Ok(IstioStats {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            reporter,
            local: Local::of(&metadata),
            disable_host_header_fallback: cfg.disable_host_header_fallback,
            tcp_reporting_duration,
            dropped,
            removed,
            store: store.clone(),
        })
    }

    pub fn reporter(&self) -> Reporter {
        self.reporter
    }

    /// The labels `metric` carries of `tags` (`tags_to_remove` applied).
    fn tags_for<'t>(
        &self,
        metric: Metric,
        tags: &'t [(&'static str, String)],
    ) -> Vec<(&'t str, &'t str)> {
        tags.iter()
            .filter(|(k, _)| {
                !self
                    .removed
                    .iter()
                    .any(|(m, t)| t == k && m.is_none_or(|m| m == metric))
            })
            .map(|(k, v)| (*k, v.as_str()))
            .collect()
    }

    fn counter(&self, metric: Metric, tags: &[(&'static str, String)]) -> Option<Arc<Counter>> {
        (!self.dropped.contains(&metric)).then(|| {
            self.store
                .counter_tagged(&metric.stat_name(), &self.tags_for(metric, tags))
        })
    }

    fn histogram(&self, metric: Metric, tags: &[(&'static str, String)]) -> Option<Arc<Histogram>> {
        (!self.dropped.contains(&metric)).then(|| {
            self.store
                .histogram_tagged(&metric.stat_name(), &self.tags_for(metric, tags))
        })
    }
}

/// What the labels are made from, for HTTP streams and TCP connections alike.
pub struct PeerFacts<'a> {
    /// `:authority`, the destination service's fallback.
    pub host: Option<&'a str>,
    pub route_name: &'a str,
    pub cluster: Option<&'a str>,
    pub cluster_istio: Option<&'a IstioClusterMetadata>,
    /// The chosen endpoint's `istio.workload` metadata.
    pub upstream_workload: Option<&'a WorkloadMetadata>,
    pub upstream_tls: Option<&'a TlsInfo>,
    pub downstream_tls: Option<&'a TlsInfo>,
    pub filter_state: &'a FilterState,
    /// What peer metadata discovery found.
    pub downstream_peer: Option<&'a WorkloadMetadata>,
    pub upstream_peer: Option<&'a WorkloadMetadata>,
    /// Envoy's short response flags (empty: none).
    pub flags: &'a str,
}

fn or<'v>(v: &'v str, default: &'v str) -> &'v str {
    if v.is_empty() {
        default
    } else {
        v
    }
}

/// The namespace in a SPIFFE principal (`…/ns/<namespace>/sa/…`).
fn principal_namespace(principal: &str) -> Option<&str> {
    let begin = principal.find("/ns/")? + 4;
    let rest = &principal[begin..];
    Some(rest.split('/').next().unwrap_or(rest))
}

fn first_uri_san(names: Option<&crate::tls::info::CertNames>) -> &str {
    names
        .and_then(|n| n.uri_sans.first())
        .map_or("", String::as_str)
}

const PASSTHROUGH_NAMES: [&str; 5] = [
    "BlackHoleCluster",
    "PassthroughCluster",
    "InboundPassthroughCluster",
    "InboundPassthroughClusterIpv4",
    "InboundPassthroughClusterIpv6",
];

impl IstioStats {
    /// The peer and service labels in Istio's order, and whether the connection is mutual TLS
    /// (known on the server side only).
    fn peer_tags(&self, f: &PeerFacts<'_>, tags: &mut Vec<(&'static str, String)>) -> Option<bool> {
        let server = self.reporter.is_server();
        let peer = if server {
            f.downstream_peer
        } else {
            f.upstream_peer.or(f.upstream_workload)
        };
        let mut service_host = if self.disable_host_header_fallback {
            ""
        } else {
            f.host.unwrap_or("")
        };
        let mut service_host_name = service_host;
        let name_fallback;
        if f.route_name == "block_all" {
            service_host_name = "BlackHoleCluster";
        } else if f.route_name == "allow_any" {
            service_host_name = "PassthroughCluster";
        } else if let Some(cluster) = f.cluster {
            if let Some(special) = PASSTHROUGH_NAMES.iter().find(|n| **n == cluster) {
                service_host_name = special;
            } else if let Some(m) = f.cluster_istio.filter(|m| m.has_service) {
                if let Some(h) = &m.service_host {
                    service_host = h;
                }
                service_host_name = match &m.service_name {
                    Some(n) => n,
                    None => {
                        name_fallback = service_host.split('.').next().unwrap_or("");
                        name_fallback
                    }
                };
            }
        }
        let (peer_san, local_san, mutual_tls) = if server {
            let state = |k| f.filter_state.get(k).map_or("", |o| o.plain.as_str());
            let (mut peer_san, mut local_san) = (
                state(crate::network::istio_authn::PEER_PRINCIPAL),
                state(crate::network::istio_authn::LOCAL_PRINCIPAL),
            );
            if peer_san.is_empty() && local_san.is_empty() {
                peer_san = first_uri_san(f.downstream_tls.and_then(|t| t.peer.as_ref()));
                local_san = first_uri_san(f.downstream_tls.and_then(|t| t.local.as_ref()));
            }
            (
                peer_san,
                local_san,
                Some(!peer_san.is_empty() && !local_san.is_empty()),
            )
        } else {
            (
                first_uri_san(f.upstream_tls.and_then(|t| t.peer.as_ref())),
                first_uri_san(f.upstream_tls.and_then(|t| t.local.as_ref())),
                None,
            )
        };
        let peer_namespace = principal_namespace(peer_san)
            .filter(|n| !n.is_empty())
            .or(peer.map(|p| p.namespace_name.as_str()))
            .unwrap_or("");
        let pv = |get: fn(&WorkloadMetadata) -> &str, default: &'static str| -> &str {
            or(peer.map_or("", get), default)
        };
        let l = &self.local;
        let mut put = |k: &'static str, v: &str| tags.push((k, v.to_string()));
        if server {
            put("source_workload", pv(|m| &m.workload_name, "unknown"));
            put(
                "source_canonical_service",
                pv(|m| &m.canonical_name, "unknown"),
            );
            put(
                "source_canonical_revision",
                pv(|m| &m.canonical_revision, "latest"),
            );
            put("source_workload_namespace", or(peer_namespace, "unknown"));
            put("source_principal", or(peer_san, "unknown"));
            put("source_app", pv(|m| &m.app_name, "unknown"));
            put("source_version", pv(|m| &m.app_version, "unknown"));
            put("source_cluster", pv(|m| &m.cluster_name, "unknown"));
            if self.reporter == Reporter::ServerGateway {
                // The destination is the endpoint the upstream discovery found.
                let ep = f.upstream_peer;
                let ev = |get: fn(&WorkloadMetadata) -> &str| ep.map_or("unknown", get);
                let evn = |get: fn(&WorkloadMetadata) -> &str| or(ep.map_or("", get), "unknown");
                let canonical = ev(|m| &m.canonical_name);
                put("destination_workload", ev(|m| &m.workload_name));
                put("destination_workload_namespace", evn(|m| &m.namespace_name));
                put("destination_principal", ev(|m| &m.identity));
                put("destination_app", evn(|m| &m.app_name));
                put("destination_version", ev(|m| &m.app_version));
                put("destination_service", or(service_host, canonical));
                put("destination_canonical_service", canonical);
                put(
                    "destination_canonical_revision",
                    ev(|m| &m.canonical_revision),
                );
                put("destination_service_name", or(service_host_name, canonical));
            } else {
                put("destination_workload", &l.workload_name);
                put("destination_workload_namespace", &l.namespace);
                put("destination_principal", or(local_san, "unknown"));
                put("destination_app", &l.app_name);
                put("destination_version", &l.app_version);
                put("destination_service", or(service_host, &l.canonical_name));
                put("destination_canonical_service", &l.canonical_name);
                put("destination_canonical_revision", &l.canonical_revision);
                put(
                    "destination_service_name",
                    or(service_host_name, &l.canonical_name),
                );
            }
            put("destination_service_namespace", &l.namespace);
            put("destination_cluster", &l.cluster_name);
        } else {
            put("source_workload", &l.workload_name);
            put("source_canonical_service", &l.canonical_name);
            put("source_canonical_revision", &l.canonical_revision);
            put("source_workload_namespace", &l.namespace);
            put("source_principal", or(local_san, "unknown"));
            put("source_app", &l.app_name);
            put("source_version", &l.app_version);
            put("source_cluster", &l.cluster_name);
            put("destination_workload", pv(|m| &m.workload_name, "unknown"));
            put(
                "destination_workload_namespace",
                or(peer_namespace, "unknown"),
            );
            put("destination_principal", or(peer_san, "unknown"));
            put("destination_app", pv(|m| &m.app_name, "unknown"));
            put("destination_version", pv(|m| &m.app_version, "unknown"));
            put("destination_service", or(service_host, "unknown"));
            put(
                "destination_canonical_service",
                pv(|m| &m.canonical_name, "unknown"),
            );
            put(
                "destination_canonical_revision",
                pv(|m| &m.canonical_revision, "latest"),
            );
            put("destination_service_name", or(service_host_name, "unknown"));
            put(
                "destination_service_namespace",
                or(peer_namespace, "unknown"),
            );
            put("destination_cluster", pv(|m| &m.cluster_name, "unknown"));
        }
        mutual_tls
    }

    /// `reporter` and the peer labels, every metric's first ones.
    fn reporter_and_peer_tags(
        &self,
        f: &PeerFacts<'_>,
    ) -> (Vec<(&'static str, String)>, Option<bool>) {
        let mut tags: Vec<(&'static str, String)> = Vec::with_capacity(25);
        tags.push(("reporter", self.reporter.label().to_string()));
        let mutual_tls = self.peer_tags(f, &mut tags);
        (tags, mutual_tls)
    }

    fn flag_tags(tags: &mut Vec<(&'static str, String)>, flags: &str, mutual_tls: Option<bool>) {
        tags.push(("response_flags", or(flags, "-").to_string()));
        tags.push((
            "connection_security_policy",
            match mutual_tls {
                Some(true) => "mutual_tls",
                Some(false) => "none",
                None => "unknown",
            }
            .to_string(),
        ));
    }
}

/// How an HTTP stream ended.
pub struct HttpOutcome {
    pub grpc: bool,
    pub status: u16,
    /// `grpc-status` of the trailers, else of the headers, else from the HTTP status.
    pub grpc_status: Option<u32>,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// gRPC messages each way, from `grpc_stats`' filter state.
    pub messages: Option<(u64, u64)>,
}

/// The HTTP metrics of one label set.
struct HttpSeries {
    requests: Option<Arc<Counter>>,
    duration: Option<Arc<Histogram>>,
    request_bytes: Option<Arc<Histogram>>,
    response_bytes: Option<Arc<Histogram>>,
}

/// A worker's resolved metrics, by filter, metric (or series kind) and label values.
type Cache<T> = RefCell<HashMap<(usize, u8, String), T>>;

thread_local! {
    static HTTP_SERIES: Cache<Arc<HttpSeries>> = RefCell::new(HashMap::new());
    static TCP_SERIES: Cache<Arc<TcpSeries>> = RefCell::new(HashMap::new());
    static MESSAGE_COUNTERS: Cache<Option<Arc<Counter>>> = RefCell::new(HashMap::new());
}

/// The cached entry for `tags`, made by `make` the first time this worker sees them.
fn cached<T: Clone>(
    cache: &'static std::thread::LocalKey<Cache<T>>,
    id: usize,
    kind: u8,
    tags: &[(&'static str, String)],
    make: impl FnOnce() -> T,
) -> T {
    let mut values = String::with_capacity(tags.iter().map(|(_, v)| v.len() + 1).sum());
    for (_, v) in tags {
        values.push_str(v);
        values.push('\u{0}');
    }
    let key = (id, kind, values);
    cache.with(|m| {
        if let Some(s) = m.borrow().get(&key) {
            return s.clone();
        }
        let s = make();
        m.borrow_mut().insert(key, s.clone());
        s
    })
}

impl IstioStats {
    /// A counter of `tags` for `metric`, resolved once per worker.
    fn cached_counter(
        &self,
        metric: Metric,
        tags: &[(&'static str, String)],
    ) -> Option<Arc<Counter>> {
        cached(&MESSAGE_COUNTERS, self.id, metric as u8, tags, || {
            self.counter(metric, tags)
        })
    }
}

impl IstioStats {
    /// Records one finished HTTP stream.
    pub fn report_http(&self, f: &PeerFacts<'_>, o: &HttpOutcome) {
        let (mut tags, mutual_tls) = self.reporter_and_peer_tags(f);
        // Istio counts a gRPC stream's messages with the peer labels only.
        if let (true, Some((requests, responses))) = (o.grpc, o.messages) {
            for (metric, n) in [
                (Metric::RequestMessages, requests),
                (Metric::ResponseMessages, responses),
            ] {
                if let Some(c) = self.cached_counter(metric, &tags) {
                    c.add(n);
                }
            }
        }
        tags.push((
            "request_protocol",
            if o.grpc { "grpc" } else { "http" }.into(),
        ));
        tags.push(("response_code", o.status.to_string()));
        tags.push((
            "grpc_response_status",
            match (o.grpc, o.grpc_status) {
                (true, Some(s)) => s.to_string(),
                _ => String::new(),
            },
        ));
        Self::flag_tags(&mut tags, f.flags, mutual_tls);
        let series = cached(&HTTP_SERIES, self.id, 0, &tags, || {
            Arc::new(HttpSeries {
                requests: self.counter(Metric::RequestsTotal, &tags),
                duration: self.histogram(Metric::RequestDuration, &tags),
                request_bytes: self.histogram(Metric::RequestBytes, &tags),
                response_bytes: self.histogram(Metric::ResponseBytes, &tags),
            })
        });
        if let Some(c) = &series.requests {
            c.inc();
        }
        if let Some(h) = &series.duration {
            h.record(o.duration.as_millis() as u64);
        }
        if let Some(h) = &series.request_bytes {
            h.record(o.request_bytes);
        }
        if let Some(h) = &series.response_bytes {
            h.record(o.response_bytes);
        }
    }
}

/// The TCP metrics of one label set.
struct TcpSeries {
    opened: Option<Arc<Counter>>,
    closed: Option<Arc<Counter>>,
    sent: Option<Arc<Counter>>,
    received: Option<Arc<Counter>>,
}

/// What one connection has reported to one stats filter so far.
#[derive(Default)]
pub struct TcpReport {
    series: Option<Arc<TcpSeries>>,
    sent: u64,
    received: u64,
}

impl IstioStats {
    /// Reports a TCP connection as Istio does: nothing until its peer is known from metadata
    /// exchange (`down_read`/`up_read`: the exchange with that side is over, found or not) or
    /// the connection ends; then it is opened, and its downstream bytes (both ways) are added
    /// at each report; at the end it is closed.
    #[allow(clippy::too_many_arguments)]
    pub fn report_tcp(
        &self,
        r: &mut TcpReport,
        f: &PeerFacts<'_>,
        down_read: bool,
        up_read: bool,
        sent: u64,
        received: u64,
        end: bool,
    ) {
        let peer_read = if self.reporter.is_server() {
            down_read
        } else {
            up_read
        };
        if r.series.is_none() {
            if !peer_read && !end {
                return;
            }
            let (mut tags, mutual_tls) = self.reporter_and_peer_tags(f);
            tags.push(("request_protocol", "tcp".into()));
            Self::flag_tags(&mut tags, f.flags, mutual_tls);
            let series = cached(&TCP_SERIES, self.id, 0, &tags, || {
                Arc::new(TcpSeries {
                    opened: self.counter(Metric::TcpOpened, &tags),
                    closed: self.counter(Metric::TcpClosed, &tags),
                    sent: self.counter(Metric::TcpSent, &tags),
                    received: self.counter(Metric::TcpReceived, &tags),
                })
            });
            if let Some(c) = &series.opened {
                c.inc();
            }
            r.series = Some(series);
        }
        let Some(series) = &r.series else { return };
        if let Some(c) = &series.sent {
            c.add(sent.saturating_sub(r.sent));
        }
        if let Some(c) = &series.received {
            c.add(received.saturating_sub(r.received));
        }
        (r.sent, r.received) = (sent, received);
        if end {
            if let Some(c) = &series.closed {
                c.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        xds_client::TypeRegistry::global()
            .from_json(
                &serde_json::json!({"id": "n", "metadata": {
                    "WORKLOAD_NAME": "ratings-v1", "NAMESPACE": "default",
                    "CLUSTER_ID": "server-cluster", "ISTIO_VERSION": "1.5-dev",
                    "LABELS": {"app": "ratings", "version": "v1",
                        "service.istio.io/canonical-name": "ratings",
                        "service.istio.io/canonical-revision": "version-1"}}}),
                false,
            )
            .unwrap()
    }

    fn compile(
        cfg: serde_json::Value,
        dir: TrafficDirection,
        store: &Store,
    ) -> Result<IstioStats, ConfigError> {
        let any: Any = xds_client::TypeRegistry::global()
            .from_json(
                &serde_json::json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": TYPE_URL, "value": cfg}),
                false,
            )
            .unwrap();
        IstioStats::compile(&any, &node(), dir, store, "f")
    }

    fn facts<'a>(state: &'a FilterState, peer: Option<&'a WorkloadMetadata>) -> PeerFacts<'a> {
        PeerFacts {
            host: Some("127.0.0.1:9080"),
            route_name: "r",
            cluster: Some("c"),
            cluster_istio: None,
            upstream_workload: None,
            upstream_tls: None,
            downstream_tls: None,
            filter_state: state,
            downstream_peer: peer,
            upstream_peer: peer,
            flags: "",
        }
    }

    fn outcome() -> HttpOutcome {
        HttpOutcome {
            grpc: false,
            status: 200,
            grpc_status: None,
            duration: Duration::from_millis(3),
            request_bytes: 10,
            response_bytes: 20,
            messages: None,
        }
    }

    #[test]
    fn server_labels_in_istio_order() {
        let store = Store::default();
        let s = compile(serde_json::json!({}), TrafficDirection::Inbound, &store).unwrap();
        assert_eq!(s.reporter(), Reporter::ServerSidecar);
        let state = FilterState::default();
        let peer = WorkloadMetadata {
            workload_name: "productpage-v1".into(),
            namespace_name: "default".into(),
            canonical_name: "productpage-v1".into(),
            canonical_revision: "version-1".into(),
            app_name: "productpage".into(),
            app_version: "v1".into(),
            cluster_name: "client-cluster".into(),
            ..Default::default()
        };
        s.report_http(&facts(&state, Some(&peer)), &outcome());
        s.report_http(&facts(&state, Some(&peer)), &outcome());
        let snap = store.snapshot();
        let (name, value, _) = snap
            .counters
            .iter()
            .find(|c| c.0.starts_with("istiocustom.istio_requests_total"))
            .unwrap();
        assert_eq!(*value, 2);
        assert_eq!(
            snap.tagged[name]
                .1
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            [
                "reporter=destination",
                "source_workload=productpage-v1",
                "source_canonical_service=productpage-v1",
                "source_canonical_revision=version-1",
                "source_workload_namespace=default",
                "source_principal=unknown",
                "source_app=productpage",
                "source_version=v1",
                "source_cluster=client-cluster",
                "destination_workload=ratings-v1",
                "destination_workload_namespace=default",
                "destination_principal=unknown",
                "destination_app=ratings",
                "destination_version=v1",
                "destination_service=127.0.0.1:9080",
                "destination_canonical_service=ratings",
                "destination_canonical_revision=version-1",
                "destination_service_name=127.0.0.1:9080",
                "destination_service_namespace=default",
                "destination_cluster=server-cluster",
                "request_protocol=http",
                "response_code=200",
                "grpc_response_status=",
                "response_flags=-",
                "connection_security_policy=none",
            ]
        );
        let build = snap
            .gauges
            .iter()
            .find(|g| g.0.starts_with("istiocustom.istio_build"))
            .unwrap();
        assert_eq!(
            build.0,
            "istiocustom.istio_build.component.proxy.tag.1.5-dev"
        );
    }

    #[test]
    fn client_without_peer_uses_cluster_service_and_endpoint() {
        let store = Store::default();
        let s = compile(serde_json::json!({}), TrafficDirection::Outbound, &store).unwrap();
        let state = FilterState::default();
        let svc = IstioClusterMetadata {
            has_service: true,
            service_host: Some("server.default.svc.cluster.local".into()),
            ..Default::default()
        };
        let ep = WorkloadMetadata::from_endpoint_encoding(
            "ratings-v1;default;ratings;version-1;server-cluster",
        )
        .unwrap();
        let mut f = facts(&state, None);
        f.cluster_istio = Some(&svc);
        f.upstream_workload = Some(&ep);
        s.report_http(&f, &outcome());
        let snap = store.snapshot();
        let name = &snap
            .counters
            .iter()
            .find(|c| c.0.starts_with("istiocustom.istio_requests_total"))
            .unwrap()
            .0;
        let tags: HashMap<_, _> = snap.tagged[name].1.iter().cloned().collect();
        assert_eq!(tags["reporter"], "source");
        assert_eq!(
            tags["destination_service"],
            "server.default.svc.cluster.local"
        );
        assert_eq!(tags["destination_service_name"], "server");
        assert_eq!(tags["destination_workload"], "ratings-v1");
        assert_eq!(tags["destination_app"], "unknown");
        assert_eq!(tags["destination_canonical_revision"], "version-1");
        assert_eq!(tags["connection_security_policy"], "unknown");
    }

    #[test]
    fn drop_and_tag_removal() {
        let store = Store::default();
        let s = compile(
            serde_json::json!({"metrics": [
                {"name": "request_duration_milliseconds", "drop": true},
                {"name": "requests_total", "tags_to_remove": ["response_flags", "not_a_tag"]},
                {"tags_to_remove": ["source_principal"]}
            ]}),
            TrafficDirection::Outbound,
            &store,
        )
        .unwrap();
        let state = FilterState::default();
        s.report_http(&facts(&state, None), &outcome());
        let snap = store.snapshot();
        assert!(!snap
            .histograms
            .iter()
            .any(|h| h.0.contains("istio_request_duration")));
        let name = &snap
            .counters
            .iter()
            .find(|c| c.0.starts_with("istiocustom.istio_requests_total"))
            .unwrap()
            .0;
        let keys: Vec<&str> = snap.tagged[name]
            .1
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert!(!keys.contains(&"response_flags") && !keys.contains(&"source_principal"));
        let bytes = &snap
            .histograms
            .iter()
            .find(|h| h.0.contains("istio_request_bytes"))
            .unwrap()
            .0;
        let keys: Vec<&str> = snap.tagged[bytes]
            .1
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert!(keys.contains(&"response_flags") && !keys.contains(&"source_principal"));
    }

    #[test]
    fn unsupported_parts_are_refused_by_name() {
        let store = Store::default();
        for (cfg, field) in [
            (
                serde_json::json!({"definitions": [{"name": "x", "value": "1"}]}),
                "f.definitions",
            ),
            (
                serde_json::json!({"metrics": [{"dimensions": {"a": "request.host"}}]}),
                "f.metrics[0].dimensions",
            ),
            (
                serde_json::json!({"rotation_interval": "60s"}),
                "f.rotation_interval",
            ),
        ] {
            let e = compile(cfg, TrafficDirection::Outbound, &store).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn principal_namespaces() {
        assert_eq!(
            principal_namespace("spiffe://cluster.local/ns/foo/sa/bar"),
            Some("foo")
        );
        assert_eq!(
            principal_namespace("spiffe://cluster.local/ns/foo"),
            Some("foo")
        );
        assert_eq!(principal_namespace("spiffe://x/y"), None);
    }
}
