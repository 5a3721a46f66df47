//! A cluster compiled from `envoy.config.cluster.v3.Cluster`: its hosts (with localities,
//! priorities and weights), load-balancing policy, upstream protocol and stats.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use xds_client::pb::envoy::config::cluster::v3 as pb;
use xds_client::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier, Address};
use xds_client::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment,
};
use xds_client::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
    HttpProtocolOptions,
};
use xds_client::TypeRegistry;

use super::consistent_hash::{HashLb, DEFAULT_MAGLEV_TABLE, DEFAULT_MAX_RING, DEFAULT_MIN_RING};
use super::host_set::{health_flag, HostGroup, HostSet, Level, Membership, Policy};
use super::outlier_detection::{Detector, HostMonitor, Report};
use crate::config::{duration, invalid, reject_unhandled, ConfigError};
use crate::observe::stats::{Counter, Histogram, Store};
use crate::stat_struct;

stat_struct!(ClusterStats {
    counter upstream_cx_total,
    gauge upstream_cx_active,
    counter upstream_cx_connect_fail,
    counter upstream_cx_connect_timeout,
    counter upstream_cx_destroy,
    counter upstream_cx_http1_total,
    counter upstream_cx_http2_total,
    counter upstream_rq_total,
    gauge upstream_rq_active,
    counter upstream_rq_completed,
    counter upstream_rq_timeout,
    counter upstream_rq_pending_total,
    counter upstream_cx_none_healthy,
    counter upstream_cx_overflow,
    counter upstream_cx_pool_overflow,
    counter upstream_rq_pending_overflow,
    gauge upstream_rq_pending_active,
    counter upstream_rq_per_try_timeout,
    counter upstream_rq_per_try_idle_timeout,
    counter upstream_rq_retry,
    counter upstream_rq_retry_success,
    counter upstream_rq_retry_overflow,
    counter upstream_rq_retry_limit_exceeded,
    counter upstream_rq_retry_backoff_exponential,
    counter upstream_rq_retry_backoff_ratelimited,
    counter retry_or_shadow_abandoned,
    counter lb_healthy_panic,
    counter membership_change,
    gauge membership_total,
    gauge membership_healthy,
    gauge membership_degraded,
    gauge membership_excluded,
    histogram upstream_cx_connect_ms,
    histogram upstream_cx_length_ms,
    histogram upstream_rq_per_cx,
});

/// `upstream_rq_time`, and `internal.`/`external.upstream_rq_time` by the request's
/// `x-envoy-internal`: made on first use, as Envoy's code stats make them.
#[derive(Debug, Clone)]
pub struct RqTime {
    store: Store,
    prefix: String,
    all: OnceLock<Arc<Histogram>>,
    internal: OnceLock<Arc<Histogram>>,
    external: OnceLock<Arc<Histogram>>,
}

impl RqTime {
    fn new(store: &Store, prefix: &str) -> Self {
        RqTime {
            store: store.clone(),
            prefix: prefix.to_string(),
            all: OnceLock::new(),
            internal: OnceLock::new(),
            external: OnceLock::new(),
        }
    }

    /// The histograms a response's time goes to.
    pub fn for_request(&self, internal: bool) -> Vec<Arc<Histogram>> {
        let (cell, which) = if internal {
            (&self.internal, "internal.")
        } else {
            (&self.external, "external.")
        };
        [(&self.all, ""), (cell, which)]
            .into_iter()
            .map(|(cell, which)| {
                cell.get_or_init(|| {
                    self.store
                        .histogram(&format!("{}{which}upstream_rq_time", self.prefix))
                })
                .clone()
            })
            .collect()
    }
}

/// `upstream_rq_<class>xx` and `upstream_rq_<code>`, created on first use as Envoy creates them
/// (so an idle cluster carries none of them).
#[derive(Debug, Clone)]
pub struct ResponseCodeStats {
    store: Store,
    prefix: String,
    classes: [OnceLock<Arc<Counter>>; 5],
    codes: OnceLock<Box<[OnceLock<Arc<Counter>>]>>,
    /// `upstream_rq_completed` under this prefix, created on first use (the `retry.` set).
    completed: Option<OnceLock<Arc<Counter>>>,
}

impl ResponseCodeStats {
    fn new(store: &Store, prefix: &str) -> Self {
        ResponseCodeStats {
            store: store.clone(),
            prefix: prefix.to_string(),
            classes: Default::default(),
            codes: OnceLock::new(),
            completed: None,
        }
    }

    /// Also counts `upstream_rq_completed` under the prefix.
    fn with_completed(mut self) -> Self {
        self.completed = Some(OnceLock::new());
        self
    }

    pub fn charge(&self, status: u16) {
        if let Some(c) = &self.completed {
            c.get_or_init(|| {
                self.store
                    .counter(&format!("{}upstream_rq_completed", self.prefix))
            })
            .inc();
        }
        let class = (status / 100).clamp(1, 5) as usize;
        self.classes[class - 1]
            .get_or_init(|| {
                self.store
                    .counter(&format!("{}upstream_rq_{class}xx", self.prefix))
            })
            .inc();
        if (100..600).contains(&status) {
            let codes = self
                .codes
                .get_or_init(|| (100..600).map(|_| OnceLock::new()).collect());
            codes[(status - 100) as usize]
                .get_or_init(|| {
                    self.store
                        .counter(&format!("{}upstream_rq_{status}", self.prefix))
                })
                .inc();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DiscoveryType {
    Static,
    StrictDns,
    LogicalDns,
    /// Hosts come from EDS (`ClusterLoadAssignment` over ADS).
    Eds,
    /// The host is the connection's original destination (Istio's passthrough clusters).
    OriginalDst,
}

/// `type: ORIGINAL_DST` with `lb_policy: CLUSTER_PROVIDED`: where the upstream host comes from.
#[derive(Debug, Clone)]
pub struct OriginalDst {
    /// `original_dst_lb_config.use_http_header`: the header naming the host
    /// (`x-envoy-original-dst-host` unless `http_header_name` says otherwise).
    pub http_header: Option<http::HeaderName>,
    /// `original_dst_lb_config.upstream_port_override`.
    pub port_override: Option<u16>,
    /// `cleanup_interval`: hosts unused this long are forgotten.
    pub cleanup_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LbPolicy {
    RoundRobin,
    /// The fewest active requests among `choices` random hosts (`least_request_lb_config`
    /// `choice_count`, default 2).
    LeastRequest {
        choices: u32,
    },
    Random,
    /// RING_HASH and MAGLEV: the request hash picks from the level's table.
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// `use_downstream_protocol_config`: HTTP/2 upstream for HTTP/2 downstream.
    Downstream,
}

/// Where an upstream host is: an IP and port, or a Unix socket path (`pipe`, as Istio's
/// `xds-grpc` and `sds-grpc` clusters are).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostAddress {
    Ip(SocketAddr),
    Pipe(Arc<str>),
}

impl std::fmt::Display for HostAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostAddress::Ip(a) => a.fmt(f),
            HostAddress::Pipe(p) => f.write_str(p),
        }
    }
}

impl HostAddress {
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            HostAddress::Ip(a) => Some(*a),
            HostAddress::Pipe(_) => None,
        }
    }
}

#[derive(Debug)]
pub struct Host {
    pub address: HostAddress,
    pub hostname: String,
    pub weight: u32,
    pub priority: u32,
    pub locality: String,
    /// The locality's `load_balancing_weight` (0 when unset), used with
    /// `locality_weighted_lb_config`.
    pub locality_weight: u32,
    /// Requests in flight to this host (for LEAST_REQUEST).
    pub active_requests: AtomicU64,
    /// `metadata.filter_metadata` as JSON, for `%UPSTREAM_METADATA(…)%`.
    pub metadata: Option<serde_json::Value>,
    /// `filter_metadata.istio.workload`: who the endpoint is, for Istio's telemetry.
    pub istio_workload: Option<Arc<petrel_filters::workload_metadata::WorkloadMetadata>>,
    pub stats: HostStats,
    /// `host_set::health_flag` bits; 0 is healthy.
    pub health: AtomicU8,
    /// The `HealthStatus` EDS gave (0 when unset), shown by `/clusters?format=json`.
    pub eds_status: AtomicU8,
    pub outlier: HostMonitor,
}

impl Host {
    /// A host made for one original destination (ORIGINAL_DST clusters).
    pub fn original_dst(addr: SocketAddr) -> Host {
        Host {
            address: HostAddress::Ip(addr),
            hostname: String::new(),
            weight: 1,
            priority: 0,
            locality: String::new(),
            locality_weight: 0,
            active_requests: AtomicU64::new(0),
            metadata: None,
            istio_workload: None,
            stats: HostStats::default(),
            health: AtomicU8::new(0),
            eds_status: AtomicU8::new(0),
            outlier: HostMonitor::default(),
        }
    }
}

/// Envoy's per-host stats (shown by `/clusters`).
#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_total: AtomicU64,
    pub cx_active: AtomicU64,
    pub cx_connect_fail: AtomicU64,
    pub rq_total: AtomicU64,
    pub rq_success: AtomicU64,
    pub rq_error: AtomicU64,
    pub rq_timeout: AtomicU64,
}

impl Host {
    /// `rq_success`/`rq_error` as Envoy's outlier tracking counts them: 5xx is an error.
    pub fn record_response(&self, status: u16) {
        let c = if status >= 500 {
            &self.stats.rq_error
        } else {
            &self.stats.rq_success
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    /// The prefix of every stat: `cluster.<alt_stat_name or name>.`.
    pub stat_prefix: String,
    pub discovery: DiscoveryType,
    pub connect_timeout: Duration,
    pub lb: LbPolicy,
    pub protocol: UpstreamProtocol,
    pub idle_timeout: Option<Duration>,
    pub max_requests_per_connection: Option<u32>,
    /// Every host, by priority, and the balancer's plan over them.
    pub host_set: Arc<HostSet>,
    pub outlier: Option<Arc<Detector>>,
    pub stats: ClusterStats,
    pub rq_time: RqTime,
    pub codes: ResponseCodeStats,
    /// `retry.upstream_rq_*`: responses a retry replaced.
    pub retry_codes: ResponseCodeStats,
    /// `circuit_breakers`, default priority: counts shared by every worker.
    pub resources: Arc<super::circuit_breakers::Resources>,
    /// The high priority's, shown in `/clusters`.
    pub resources_high: Arc<super::circuit_breakers::Resources>,
    /// The cluster as configured, for `/config_dump`.
    /// The configuration it came from, encoded (a decoded `Cluster` proto takes kilobytes) and
    /// shared with the xDS state.
    pub source: ClusterSource,
    /// How often DNS clusters re-resolve (`dns_refresh_rate`, Envoy's default 5 s).
    pub dns_refresh: Option<Duration>,
    /// `respect_dns_ttl`: the records' TTL, when they have one, replaces `dns_refresh`.
    pub respect_dns_ttl: bool,
    /// The EDS resource name (`service_name`, else the cluster name) of an EDS cluster.
    pub eds_service: Option<String>,
    /// `eds_config.initial_fetch_timeout`: how long the cluster warms before it goes active
    /// without endpoints.
    pub eds_wait: crate::config::dynamic::Wait,
    pub original_dst: Option<OriginalDst>,
    /// `upstream_bind_config.source_address`: the local address upstream connections bind.
    pub upstream_bind: Option<SocketAddr>,
    /// `upstream_connection_options.tcp_keepalive` for TCP upstream connections.
    pub tcp_keepalive: Option<socket2::TcpKeepalive>,
    /// `transport_socket` and `transport_socket_matches`: TLS per host, or plaintext.
    pub transport: Arc<super::transport_socket::TransportSockets>,
    /// `metadata.filter_metadata.istio`, as Istio's telemetry and peer metadata filters read it.
    pub istio: Option<Arc<petrel_filters::workload_metadata::IstioClusterMetadata>>,
    /// `filters`: Istio's TCP metadata exchange on connections to this cluster.
    pub upstream_mx: Option<Arc<crate::network::metadata_exchange::MetadataExchange>>,
}

/// How endpoint names are turned into addresses.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Resolve {
    /// STATIC: IP addresses only.
    None,
    /// LOGICAL_DNS: the first address.
    First(Family),
    /// STRICT_DNS: every address.
    All(Family),
}

/// `dns_lookup_family`, with Envoy's meaning of each value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    /// IPv6 if the name has any IPv6 address, else IPv4 (Envoy's default).
    Auto,
    V4Only,
    V6Only,
    /// IPv4 if the name has any IPv4 address, else IPv6.
    V4Preferred,
    All,
}

impl Family {
    fn from_proto(v: i32, path: &str) -> Result<Family, ConfigError> {
        Ok(match pb::cluster::DnsLookupFamily::try_from(v) {
            Ok(pb::cluster::DnsLookupFamily::Auto) => Family::Auto,
            Ok(pb::cluster::DnsLookupFamily::V4Only) => Family::V4Only,
            Ok(pb::cluster::DnsLookupFamily::V6Only) => Family::V6Only,
            Ok(pb::cluster::DnsLookupFamily::V4Preferred) => Family::V4Preferred,
            Ok(pb::cluster::DnsLookupFamily::All) => Family::All,
            Err(_) => {
                return Err(invalid(
                    format!("{path}.dns_lookup_family"),
                    "unknown enum value",
                ))
            }
        })
    }

    /// Keeps the addresses this family allows, in resolver order.
    fn pick(self, addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        let (v4, v6): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv4());
        match self {
            Family::Auto if !v6.is_empty() => v6,
            Family::Auto | Family::V4Only => v4,
            Family::V6Only => v6,
            Family::V4Preferred if !v4.is_empty() => v4,
            Family::V4Preferred => v6,
            Family::All => v4.into_iter().chain(v6).collect(),
        }
    }
}

/// Where DNS answers come from.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    /// The system resolver (getaddrinfo).
    System,
    /// Answers already looked up, by name (for `respect_dns_ttl`, which needs their TTLs).
    Answers(&'a HashMap<String, Vec<std::net::IpAddr>>),
}

fn socket_address(
    a: &Address,
    path: &str,
    resolve: Resolve,
    lookup: Lookup<'_>,
) -> Result<(Vec<HostAddress>, String), ConfigError> {
    match &a.address {
        Some(address::Address::SocketAddress(sa)) => {
            let port = match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) if p <= 65535 => p as u16,
                Some(PortSpecifier::PortValue(_)) => {
                    return Err(invalid(
                        format!("{path}.port_value"),
                        "value must be less than or equal to 65535",
                    ))
                }
                Some(PortSpecifier::NamedPort(_)) => {
                    return Err(ConfigError::Unsupported {
                        path: path.into(),
                        fields: "'named_port'".into(),
                    })
                }
                None => return Err(invalid(path, "port_specifier is required")),
            };
            if sa.protocol != 0 {
                return Err(ConfigError::Unsupported {
                    path: path.into(),
                    fields: "'protocol' (UDP)".into(),
                });
            }
            if !sa.resolver_name.is_empty() {
                return Err(ConfigError::Unsupported {
                    path: path.into(),
                    fields: "'resolver_name'".into(),
                });
            }
            if let Ok(ip) = sa.address.parse::<std::net::IpAddr>() {
                return Ok((
                    vec![HostAddress::Ip(SocketAddr::new(ip, port))],
                    sa.address.clone(),
                ));
            }
            if resolve == Resolve::None {
                return Err(invalid(
                    format!("{path}.address"),
                    format!("malformed IP address: {}. Consider setting resolver_name or setting cluster type to 'STRICT_DNS' or 'LOGICAL_DNS'", sa.address),
                ));
            }
            // A name that does not resolve leaves the cluster without hosts until a later
            // resolution succeeds (the refresher retries), as in Envoy; it does not fail boot.
            let mut addrs: Vec<SocketAddr> = match lookup {
                Lookup::System => (sa.address.as_str(), port)
                    .to_socket_addrs()
                    .map(|it| it.collect())
                    .unwrap_or_default(),
                Lookup::Answers(a) => a
                    .get(&sa.address)
                    .map(|ips| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
                    .unwrap_or_default(),
            };
            let mut seen = std::collections::HashSet::new();
            addrs.retain(|a| seen.insert(*a));
            let addrs = match resolve {
                Resolve::First(family) => family.pick(addrs).into_iter().take(1).collect(),
                Resolve::All(family) => family.pick(addrs),
                Resolve::None => addrs,
            };
            Ok((
                addrs.into_iter().map(HostAddress::Ip).collect(),
                sa.address.clone(),
            ))
        }
        Some(address::Address::Pipe(p)) => {
            if p.path.is_empty() {
                return Err(invalid(
                    format!("{path}.pipe.path"),
                    "value length must be at least 1 characters",
                ));
            }
            // Abstract sockets and the listener-only `mode` are not for upstream hosts.
            if p.path.starts_with('@') || p.mode != 0 {
                return Err(ConfigError::Unsupported {
                    path: format!("{path}.pipe"),
                    fields: "an abstract socket ('@') or 'mode'".into(),
                });
            }
            if resolve != Resolve::None {
                return Err(invalid(path, "a pipe address cannot be resolved by DNS"));
            }
            Ok((
                vec![HostAddress::Pipe(p.path.as_str().into())],
                String::new(),
            ))
        }
        Some(_) => Err(ConfigError::Unsupported {
            path: path.into(),
            fields: "'envoy_internal_address'".into(),
        }),
        None => Err(invalid(path, "address is required")),
    }
}

/// The hosts of an assignment and its `policy.overprovisioning_factor`.
fn hosts_from(
    cla: &ClusterLoadAssignment,
    path: &str,
    resolve: Resolve,
    lookup: Lookup<'_>,
) -> Result<(Vec<Arc<Host>>, u32), ConfigError> {
    let mut rest = cla.clone();
    rest.cluster_name.clear();
    let endpoints = std::mem::take(&mut rest.endpoints);
    let mut overprovisioning = super::host_set::DEFAULT_OVERPROVISIONING;
    if let Some(mut policy) = rest.policy.take() {
        if let Some(f) = policy.overprovisioning_factor.take() {
            if f.value == 0 {
                return Err(invalid(
                    format!("{path}.policy.overprovisioning_factor"),
                    "value must be greater than 0",
                ));
            }
            overprovisioning = f.value;
        }
        reject_unhandled(&policy, &format!("{path}.policy"))?;
    }
    reject_unhandled(&rest, path)?;
    let mut hosts = Vec::new();
    for (li, le) in endpoints.iter().enumerate() {
        let lp = format!("{path}.endpoints[{li}]");
        let mut lrest = le.clone();
        let locality = lrest
            .locality
            .take()
            .map(|l| format!("{}/{}/{}", l.region, l.zone, l.sub_zone))
            .unwrap_or_default();
        let priority = std::mem::take(&mut lrest.priority);
        // Envoy reads locality weights only with `locality_weighted_lb_config`, else they have
        // no effect (istiod always sends them).
        let locality_weight = match lrest.load_balancing_weight.take() {
            Some(w) if w.value == 0 => {
                return Err(invalid(
                    format!("{lp}.load_balancing_weight"),
                    "value must be greater than or equal to 1",
                ))
            }
            Some(w) => w.value,
            None => 0,
        };
        let lb_eps = std::mem::take(&mut lrest.lb_endpoints);
        reject_unhandled(&lrest, &lp)?;
        for (ei, ep) in lb_eps.iter().enumerate() {
            let ep_path = format!("{lp}.lb_endpoints[{ei}]");
            let mut erest = ep.clone();
            let weight = erest
                .load_balancing_weight
                .take()
                .map(|w| w.value)
                .unwrap_or(1);
            if weight == 0 {
                return Err(invalid(
                    format!("{ep_path}.load_balancing_weight"),
                    "value must be greater than or equal to 1",
                ));
            }
            // Endpoint metadata is data, read by `%UPSTREAM_METADATA(…)%` (which, as in Envoy,
            // reads filter_metadata; typed metadata has no reader yet).
            let metadata = erest.metadata.take().map(|m| {
                serde_json::Value::Object(
                    m.filter_metadata
                        .into_iter()
                        .map(|(k, v)| (k, xds_client::type_registry::struct_to_json(v)))
                        .collect(),
                )
            });
            let istio_workload = metadata
                .as_ref()
                .and_then(|m| m.pointer("/istio/workload"))
                .and_then(|w| w.as_str())
                .and_then(
                    petrel_filters::workload_metadata::WorkloadMetadata::from_endpoint_encoding,
                )
                .map(Arc::new);
            let ident = erest.host_identifier.take();
            // UNHEALTHY and TIMEOUT leave the balancer's healthy set, DRAINING leaves the
            // balancer altogether, as in Envoy.
            let eds_status = std::mem::take(&mut erest.health_status);
            let health = match eds_status {
                0 | 1 => 0,
                2 | 4 => health_flag::FAILED_EDS_HEALTH,
                3 => health_flag::EDS_STATUS_DRAINING,
                _ => {
                    return Err(ConfigError::Unsupported {
                        path: ep_path,
                        fields: "'health_status: DEGRADED' (degraded hosts)".into(),
                    })
                }
            };
            reject_unhandled(&erest, &ep_path)?;
            let Some(HostIdentifier::Endpoint(e)) = ident else {
                return Err(ConfigError::Unsupported {
                    path: ep_path,
                    fields: "'endpoint_name'".into(),
                });
            };
            let mut e_rest = e.clone();
            let addr = e_rest.address.take().ok_or_else(|| {
                invalid(format!("{ep_path}.endpoint.address"), "value is required")
            })?;
            let hostname = std::mem::take(&mut e_rest.hostname);
            reject_unhandled(&e_rest, &format!("{ep_path}.endpoint"))?;
            let (addresses, name) = socket_address(
                &addr,
                &format!("{ep_path}.endpoint.address"),
                resolve,
                lookup,
            )?;
            for address in addresses {
                hosts.push(Arc::new(Host {
                    address,
                    // Envoy shows the DNS name as the hostname of resolved hosts, and nothing
                    // for IPs.
                    hostname: if hostname.is_empty() && resolve != Resolve::None {
                        name.clone()
                    } else {
                        hostname.clone()
                    },
                    weight,
                    priority,
                    locality: locality.clone(),
                    locality_weight,
                    active_requests: AtomicU64::new(0),
                    metadata: metadata.clone(),
                    istio_workload: istio_workload.clone(),
                    stats: HostStats::default(),
                    health: AtomicU8::new(health),
                    eds_status: AtomicU8::new(eds_status as u8),
                    outlier: HostMonitor::default(),
                }));
            }
        }
    }
    Ok((hosts, overprovisioning))
}

/// A `Cluster` proto kept encoded; decoded when `/config_dump` or a DNS refresh needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSource(Arc<[u8]>);

impl ClusterSource {
    pub fn encode(c: &pb::Cluster) -> Self {
        use prost::Message;
        ClusterSource(c.encode_to_vec().into())
    }
    pub fn decode(&self) -> pb::Cluster {
        use prost::Message;
        // The bytes were encoded from a valid message.
        pb::Cluster::decode(self.0.as_ref()).unwrap_or_default()
    }
}

/// Compiles an encoded cluster (from xDS), sharing its bytes as the cluster's `source`.
/// What compiling a cluster needs beyond the cluster itself.
#[derive(Clone, Copy)]
pub struct ClusterEnv<'a> {
    /// `cluster_manager.outlier_detection.event_log_path`, opened.
    pub event_log: Option<&'a Arc<std::fs::File>>,
    /// The node (Istio's upstream metadata exchange sends its metadata).
    pub node: &'a xds_client::pb::envoy::config::core::v3::Node,
}

pub fn compile_source(
    source: &ClusterSource,
    store: &Store,
    env: ClusterEnv<'_>,
) -> Result<Cluster, ConfigError> {
    let c = source.decode();
    let mut compiled = compile(&c, store, env)?;
    compiled.source = source.clone();
    Ok(compiled)
}

/// Compiles a cluster; `event_log` is the bootstrap's outlier-detection event log.
pub fn compile(
    c: &pb::Cluster,
    store: &Store,
    env: ClusterEnv<'_>,
) -> Result<Cluster, ConfigError> {
    let event_log = env.event_log;
    let path = format!("cluster '{}'", c.name);
    let mut rest = c.clone();
    let name = std::mem::take(&mut rest.name);
    if name.is_empty() {
        return Err(invalid(
            "clusters[].name",
            "value length must be at least 1 characters",
        ));
    }
    let alt = std::mem::take(&mut rest.alt_stat_name);
    let circuit_breakers = rest.circuit_breakers.take();
    let discovery = match rest.cluster_discovery_type.take() {
        Some(pb::cluster::ClusterDiscoveryType::Type(t)) => {
            match pb::cluster::DiscoveryType::try_from(t) {
                Ok(pb::cluster::DiscoveryType::Static) => DiscoveryType::Static,
                Ok(pb::cluster::DiscoveryType::StrictDns) => DiscoveryType::StrictDns,
                Ok(pb::cluster::DiscoveryType::LogicalDns) => DiscoveryType::LogicalDns,
                Ok(pb::cluster::DiscoveryType::Eds) => DiscoveryType::Eds,
                Ok(pb::cluster::DiscoveryType::OriginalDst) => DiscoveryType::OriginalDst,
                Err(_) => return Err(invalid(format!("{path}.type"), "unknown enum value")),
            }
        }
        None => DiscoveryType::Static,
        Some(_) => {
            return Err(ConfigError::Unsupported {
                path,
                fields: "'cluster_type'".into(),
            })
        }
    };
    let connect_timeout = duration::or(
        &rest.connect_timeout.take(),
        Duration::from_secs(5),
        &format!("{path}.connect_timeout"),
    )?;
    if connect_timeout.is_zero() {
        return Err(invalid(
            format!("{path}.connect_timeout"),
            "value must be greater than 0s",
        ));
    }
    let lb_pb = pb::cluster::LbPolicy::try_from(std::mem::take(&mut rest.lb_policy));
    let original_dst = match (discovery, lb_pb) {
        (DiscoveryType::OriginalDst, Ok(pb::cluster::LbPolicy::ClusterProvided)) => {
            Some(original_dst_config(&mut rest, &path)?)
        }
        (DiscoveryType::OriginalDst, Ok(other)) => {
            return Err(invalid(
                format!("{path}.lb_policy"),
                format!("cluster: LB policy {} is not valid for Cluster type ORIGINAL_DST. Only 'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'", other.as_str_name()),
            ))
        }
        (_, Ok(pb::cluster::LbPolicy::ClusterProvided)) => {
            return Err(invalid(
                format!("{path}.lb_policy"),
                "cluster: LB policy CLUSTER_PROVIDED is only valid with cluster type ORIGINAL_DST",
            ))
        }
        _ => None,
    };
    let lb = match lb_pb {
        Ok(pb::cluster::LbPolicy::ClusterProvided) => LbPolicy::RoundRobin,
        Ok(pb::cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(pb::cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest {
            choices: least_request_choices(&mut rest, &path)?,
        },
        Ok(pb::cluster::LbPolicy::Random) => LbPolicy::Random,
        Ok(pb::cluster::LbPolicy::RingHash | pb::cluster::LbPolicy::Maglev) => {
            LbPolicy::ConsistentHash
        }
        Ok(other) => {
            return Err(ConfigError::Unsupported {
                path,
                fields: format!("'lbPolicy: {}'", other.as_str_name()),
            })
        }
        Err(_) => return Err(invalid(format!("{path}.lb_policy"), "unknown enum value")),
    };
    let mut protocol = UpstreamProtocol::Http1;
    let mut idle_timeout = Some(Duration::from_secs(3600));
    let mut max_requests_per_connection = rest.max_requests_per_connection.take().map(|v| v.value);
    // The deprecated cluster-level `http2_protocol_options` (Istio's test bootstraps use it): the
    // explicit HTTP/2 config of `HttpProtocolOptions`; Envoy refuses it beside those options.
    if let Some(h2) = rest.http2_protocol_options.take() {
        if !rest.typed_extension_protocol_options.is_empty() {
            return Err(invalid(
                &path,
                "cannot specify both HttpProtocolOptions and deprecated http2_protocol_options",
            ));
        }
        reject_unhandled(&h2, &format!("{path}.http2_protocol_options"))?;
        protocol = UpstreamProtocol::Http2;
    }
    for (key, any) in std::mem::take(&mut rest.typed_extension_protocol_options) {
        let p = format!("{path}.typed_extension_protocol_options['{key}']");
        if TypeRegistry::effective_type_url(&any)
            != "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        {
            return Err(ConfigError::UnsupportedExtension {
                path: p,
                type_url: any.type_url.clone(),
                why: petrel_filters::extensions::refusal(&any.type_url),
            });
        }
        let mut o: HttpProtocolOptions = TypeRegistry::global().unpack(&any)?;
        protocol = match o.upstream_protocol_options.take() {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(ProtocolConfig::Http2ProtocolOptions(h2)) => {
                    reject_unhandled(
                        &h2,
                        &format!("{p}.explicit_http_config.http2_protocol_options"),
                    )?;
                    UpstreamProtocol::Http2
                }
                Some(ProtocolConfig::HttpProtocolOptions(h1)) => {
                    reject_unhandled(
                        &h1,
                        &format!("{p}.explicit_http_config.http_protocol_options"),
                    )?;
                    UpstreamProtocol::Http1
                }
                _ => {
                    return Err(ConfigError::Unsupported {
                        path: p,
                        fields: "'http3ProtocolOptions'".into(),
                    })
                }
            },
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(u)) => {
                if let Some(h2) = &u.http2_protocol_options {
                    reject_unhandled(
                        h2,
                        &format!("{p}.use_downstream_protocol_config.http2_protocol_options"),
                    )?;
                }
                if u.http3_protocol_options.is_some() {
                    return Err(ConfigError::Unsupported {
                        path: p,
                        fields: "'http3ProtocolOptions'".into(),
                    });
                }
                UpstreamProtocol::Downstream
            }
            Some(UpstreamProtocolOptions::AutoConfig(_)) => {
                return Err(ConfigError::Unsupported {
                    path: p,
                    fields: "'auto_config' (ALPN selection comes with TLS, issue #6)".into(),
                })
            }
            None => UpstreamProtocol::Http1,
        };
        if let Some(mut common) = o.common_http_protocol_options.take() {
            if let Some(d) = common.idle_timeout.take() {
                idle_timeout = duration::optional_timeout(
                    &Some(d),
                    &format!("{p}.common_http_protocol_options.idle_timeout"),
                )?;
            }
            if let Some(m) = common.max_requests_per_connection.take() {
                max_requests_per_connection = Some(m.value);
            }
            reject_unhandled(&common, &format!("{p}.common_http_protocol_options"))?;
        }
        reject_unhandled(&o, &p)?;
    }
    let resolve = match discovery {
        DiscoveryType::Static | DiscoveryType::Eds | DiscoveryType::OriginalDst => Resolve::None,
        DiscoveryType::LogicalDns => Resolve::First(Family::from_proto(
            std::mem::take(&mut rest.dns_lookup_family),
            &path,
        )?),
        DiscoveryType::StrictDns => Resolve::All(Family::from_proto(
            std::mem::take(&mut rest.dns_lookup_family),
            &path,
        )?),
    };
    let mut eds_wait = crate::config::dynamic::Wait::Forever;
    let eds_service = match (discovery, rest.eds_cluster_config.take()) {
        (DiscoveryType::Eds, Some(e)) => {
            let ep = format!("{path}.eds_cluster_config");
            let mut erest = e.clone();
            eds_wait = match erest.eds_config.take() {
                Some(src) => crate::config::dynamic::ads_source(&src, &format!("{ep}.eds_config"))?,
                None => return Err(invalid(format!("{ep}.eds_config"), "value is required")),
            };
            let service = std::mem::take(&mut erest.service_name);
            reject_unhandled(&erest, &ep)?;
            if rest.load_assignment.is_some() {
                return Err(ConfigError::Unsupported {
                    path,
                    fields: "'load_assignment' on an EDS cluster".into(),
                });
            }
            Some(if service.is_empty() {
                name.clone()
            } else {
                service
            })
        }
        (DiscoveryType::Eds, None) => {
            return Err(invalid(
                format!("{path}.eds_cluster_config"),
                "EDS clusters need eds_cluster_config",
            ))
        }
        // Any other type with eds_cluster_config keeps it in `rest`, where it is refused.
        (_, e) => {
            rest.eds_cluster_config = e;
            None
        }
    };
    let upstream_bind = match rest.upstream_bind_config.take() {
        Some(b) => {
            let bp = format!("{path}.upstream_bind_config");
            let mut brest = b.clone();
            let source = brest.source_address.take().map(|sa| {
                xds_client::pb::envoy::config::core::v3::Address {
                    address: Some(address::Address::SocketAddress(sa)),
                }
            });
            let addr = crate::listener::socket_addr(&source, &format!("{bp}.source_address"))?;
            reject_unhandled(&brest, &bp)?;
            Some(addr)
        }
        None => None,
    };
    let tcp_keepalive = match rest.upstream_connection_options.take() {
        Some(o) => {
            let op = format!("{path}.upstream_connection_options");
            let mut orest = o;
            let k = orest.tcp_keepalive.take();
            reject_unhandled(&orest, &op)?;
            k.map(|k| {
                // Unset values keep the system's defaults, as in Envoy.
                let mut ka = socket2::TcpKeepalive::new();
                if let Some(t) = k.keepalive_time {
                    ka = ka.with_time(Duration::from_secs(t.value as u64));
                }
                if let Some(i) = k.keepalive_interval {
                    ka = ka.with_interval(Duration::from_secs(i.value as u64));
                }
                if let Some(p) = k.keepalive_probes {
                    ka = ka.with_retries(p.value);
                }
                ka
            })
        }
        None => None,
    };
    if discovery == DiscoveryType::OriginalDst && rest.load_assignment.is_some() {
        return Err(invalid(
            format!("{path}.load_assignment"),
            "ORIGINAL_DST clusters must have no load assignment configured",
        ));
    }
    let dns_refresh = match discovery {
        DiscoveryType::Static | DiscoveryType::Eds | DiscoveryType::OriginalDst => None,
        _ => Some(duration::or(
            &rest.dns_refresh_rate.take(),
            Duration::from_millis(5000),
            &format!("{path}.dns_refresh_rate"),
        )?),
    };
    let respect_dns_ttl = std::mem::take(&mut rest.respect_dns_ttl);
    let cla = rest.load_assignment.take().unwrap_or_default();
    let (all_hosts, overprovisioning) = hosts_from(
        &cla,
        &format!("{path}.load_assignment"),
        resolve,
        Lookup::System,
    )?;
    if discovery == DiscoveryType::LogicalDns && all_hosts.len() > 1 {
        return Err(invalid(
            format!("{path}.load_assignment"),
            "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
        ));
    }
    // DNS names resolve when the cluster is compiled and again every dns_refresh_rate (see
    // `refresh`); a dns_lookup_family on a STATIC or EDS cluster stays in `rest` and is refused.
    let transport_pb = rest.transport_socket.take();
    let matches_pb = std::mem::take(&mut rest.transport_socket_matches);
    let upstream_mx = upstream_filters(&std::mem::take(&mut rest.filters), env, store, &path)?;
    // Cluster metadata is data for filters and loggers: Istio's telemetry reads `istio`.
    let istio = rest
        .metadata
        .take()
        .and_then(|mut m| m.filter_metadata.remove("istio"))
        .and_then(|s| {
            petrel_filters::workload_metadata::IstioClusterMetadata::from_json(
                &xds_client::type_registry::struct_to_json(s),
            )
        })
        .map(Arc::new);
    let mut lb_policy = Policy {
        overprovisioning,
        hash: hash_lb(&mut rest, lb_pb, &path)?,
        ..Policy::default()
    };
    if let Some(mut c) = rest.common_lb_config.take() {
        let cp = format!("{path}.common_lb_config");
        if let Some(t) = c.healthy_panic_threshold.take() {
            if !(0.0..=100.0).contains(&t.value) {
                return Err(invalid(
                    format!("{cp}.healthy_panic_threshold.value"),
                    "value must be inside range [0, 100]",
                ));
            }
            lb_policy.panic_threshold = t.value;
        }
        use pb::cluster::common_lb_config::LocalityConfigSpecifier;
        let locality = c.locality_config_specifier.take();
        if let Some(LocalityConfigSpecifier::ZoneAwareLbConfig(_)) = &locality {
            // Stays set, so it is refused with the rest.
            c.locality_config_specifier = locality;
        }
        if let Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(lw)) = locality {
            reject_unhandled(&lw, &format!("{cp}.locality_weighted_lb_config"))?;
            if lb == LbPolicy::ConsistentHash {
                return Err(ConfigError::Unsupported {
                    path: cp.clone(),
                    fields: "'locality_weighted_lb_config' with RING_HASH or MAGLEV".into(),
                });
            }
            lb_policy.locality_weighted = true;
        }
        if let Some(w) = c.update_merge_window.take() {
            lb_policy.update_merge_window =
                duration::to_std(&w, &format!("{cp}.update_merge_window"))?;
        }
        reject_unhandled(&c, &cp)?;
    }
    let outlier_config = match rest.outlier_detection.take() {
        Some(_) if discovery == DiscoveryType::OriginalDst => {
            return Err(ConfigError::Unsupported {
                path,
                fields: "'outlier_detection' on an ORIGINAL_DST cluster".into(),
            })
        }
        Some(o) => Some(super::outlier_detection::compile(
            &o,
            &format!("{path}.outlier_detection"),
        )?),
        None => None,
    };
    reject_unhandled(&rest, &path)?;
    let stat_prefix = format!("cluster.{}.", if alt.is_empty() { &name } else { &alt });
    let stats = ClusterStats::new(store, &stat_prefix);
    let transport = Arc::new(super::transport_socket::TransportSockets::compile(
        transport_pb.as_ref(),
        &matches_pb,
        store,
        &stat_prefix,
        &path,
    )?);
    let breakers = super::circuit_breakers::compile(
        circuit_breakers.as_ref(),
        store,
        &stat_prefix,
        &format!("{path}.circuit_breakers"),
    )?;
    stats.membership_total.set(all_hosts.len() as i64);
    stats.membership_degraded.set(0);
    if !all_hosts.is_empty() {
        stats.membership_change.inc();
    }
    let host_set = Arc::new(HostSet::new(all_hosts, lb_policy, membership(&stats)));
    let outlier = outlier_config.map(|config| {
        Detector::start(
            config,
            store,
            &stat_prefix,
            &name,
            event_log.cloned(),
            host_set.clone(),
        )
    });
    Ok(Cluster {
        name,
        discovery,
        connect_timeout,
        lb,
        protocol,
        idle_timeout,
        max_requests_per_connection,
        host_set,
        outlier,
        codes: ResponseCodeStats::new(store, &stat_prefix),
        rq_time: RqTime::new(store, &stat_prefix),
        retry_codes: ResponseCodeStats::new(store, &format!("{stat_prefix}retry."))
            .with_completed(),
        resources: breakers.default,
        resources_high: breakers.high,
        stat_prefix,
        stats,
        source: ClusterSource::encode(c),
        dns_refresh,
        respect_dns_ttl,
        eds_service,
        eds_wait,
        original_dst,
        upstream_bind,
        tcp_keepalive,
        transport,
        istio,
        upstream_mx,
    })
}

/// `filters` (upstream network filters): Istio's TCP metadata exchange is the one Petrel runs
/// (on connections tcp_proxy makes); any other is refused by name.
fn upstream_filters(
    filters: &[pb::Filter],
    env: ClusterEnv<'_>,
    store: &Store,
    path: &str,
) -> Result<Option<Arc<crate::network::metadata_exchange::MetadataExchange>>, ConfigError> {
    let mut mx = None;
    for (i, f) in filters.iter().enumerate() {
        let fp = format!("{path}.filters[{i}]");
        let any = f
            .typed_config
            .as_ref()
            .ok_or_else(|| invalid(&fp, "typed_config is required"))?;
        let url = TypeRegistry::effective_type_url(any);
        if url != crate::network::metadata_exchange::TYPE_URL || mx.is_some() {
            return Err(ConfigError::UnsupportedExtension {
                path: format!("{fp} ('{}')", f.name),
                why: petrel_filters::extensions::refusal(&url),
                type_url: url,
            });
        }
        mx = Some(Arc::new(
            crate::network::metadata_exchange::MetadataExchange::compile(
                any,
                env.node,
                store,
                &format!("{fp}.typed_config"),
            )?,
        ));
    }
    Ok(mx)
}

/// `least_request_lb_config.choice_count` (at least 2); the rest of it is refused.
fn least_request_choices(rest: &mut pb::Cluster, path: &str) -> Result<u32, ConfigError> {
    let mut c = match rest.lb_config.take() {
        Some(pb::cluster::LbConfig::LeastRequestLbConfig(c)) => c,
        other => {
            // Other settings stay, refused with the rest.
            rest.lb_config = other;
            return Ok(2);
        }
    };
    let cp = format!("{path}.least_request_lb_config");
    let choices = c.choice_count.take().map_or(2, |v| v.value);
    if choices < 2 {
        return Err(invalid(
            format!("{cp}.choice_count"),
            "value must be greater than or equal to 2",
        ));
    }
    reject_unhandled(&c, &cp)?;
    Ok(choices)
}

/// The table settings of a RING_HASH or MAGLEV cluster (`ring_hash_lb_config`,
/// `maglev_lb_config`), validated as Envoy validates them.
fn hash_lb(
    rest: &mut pb::Cluster,
    lb: Result<pb::cluster::LbPolicy, prost::UnknownEnumValue>,
    path: &str,
) -> Result<Option<HashLb>, ConfigError> {
    use pb::cluster::LbConfig;
    let config = rest.lb_config.take();
    let out = match (lb, config) {
        (Ok(pb::cluster::LbPolicy::RingHash), c @ (None | Some(LbConfig::RingHashLbConfig(_)))) => {
            let cp = format!("{path}.ring_hash_lb_config");
            let mut r = match c {
                Some(LbConfig::RingHashLbConfig(r)) => r,
                _ => Default::default(),
            };
            let size = |v: Option<u64>, field: &str, default: u64| {
                let v = v.unwrap_or(default);
                if v > DEFAULT_MAX_RING {
                    return Err(invalid(
                        format!("{cp}.{field}"),
                        "value must be less than or equal to 8388608",
                    ));
                }
                Ok(v)
            };
            let min = size(
                r.minimum_ring_size.take().map(|v| v.value),
                "minimum_ring_size",
                DEFAULT_MIN_RING,
            )?;
            let max = size(
                r.maximum_ring_size.take().map(|v| v.value),
                "maximum_ring_size",
                DEFAULT_MAX_RING,
            )?;
            if min > max {
                return Err(invalid(
                    cp,
                    format!("ring hash: minimum_ring_size ({min}) > maximum_ring_size ({max})"),
                ));
            }
            if r.hash_function != 0 {
                return Err(ConfigError::Unsupported {
                    path: cp,
                    fields: "'hash_function: MURMUR_HASH_2'".into(),
                });
            }
            reject_unhandled(&r, &cp)?;
            Some(HashLb::Ring { min, max })
        }
        (Ok(pb::cluster::LbPolicy::Maglev), c @ (None | Some(LbConfig::MaglevLbConfig(_)))) => {
            let cp = format!("{path}.maglev_lb_config");
            let mut m = match c {
                Some(LbConfig::MaglevLbConfig(m)) => m,
                _ => Default::default(),
            };
            let table_size = m
                .table_size
                .take()
                .map_or(DEFAULT_MAGLEV_TABLE, |v| v.value);
            if table_size > 5_000_011 {
                return Err(invalid(
                    format!("{cp}.table_size"),
                    "value must be less than or equal to 5000011",
                ));
            }
            if !is_prime(table_size) {
                return Err(invalid(
                    format!("{cp}.table_size"),
                    "The table size of maglev must be prime number",
                ));
            }
            reject_unhandled(&m, &cp)?;
            Some(HashLb::Maglev { table_size })
        }
        (_, c) => {
            // Any other table settings stay and are refused with the rest.
            rest.lb_config = c;
            None
        }
    };
    Ok(out)
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// `original_dst_lb_config` and `cleanup_interval` of an ORIGINAL_DST cluster.
fn original_dst_config(rest: &mut pb::Cluster, path: &str) -> Result<OriginalDst, ConfigError> {
    let cleanup_interval = duration::or(
        &rest.cleanup_interval.take(),
        Duration::from_secs(5),
        &format!("{path}.cleanup_interval"),
    )?;
    let mut http_header = None;
    let mut port_override = None;
    let lb_config = rest.lb_config.take();
    if let Some(other) = &lb_config {
        if !matches!(other, pb::cluster::LbConfig::OriginalDstLbConfig(_)) {
            rest.lb_config = lb_config.clone();
        }
    }
    if let Some(pb::cluster::LbConfig::OriginalDstLbConfig(c)) = lb_config {
        let cp = format!("{path}.original_dst_lb_config");
        let mut crest = c.clone();
        let name = std::mem::take(&mut crest.http_header_name);
        if std::mem::take(&mut crest.use_http_header) {
            let name = if name.is_empty() {
                "x-envoy-original-dst-host".to_string()
            } else {
                name.to_ascii_lowercase()
            };
            http_header = Some(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                invalid(
                    format!("{cp}.http_header_name"),
                    format!("invalid header name '{name}'"),
                )
            })?);
        }
        if let Some(p) = crest.upstream_port_override.take() {
            port_override = Some(u16::try_from(p.value).map_err(|_| {
                invalid(
                    format!("{cp}.upstream_port_override"),
                    "value must be less than or equal to 65535",
                )
            })?);
        }
        reject_unhandled(&crest, &cp)?;
    }
    Ok(OriginalDst {
        http_header,
        port_override,
        cleanup_interval,
    })
}

/// What a pick needs besides the balancer: the request's hash (route `hash_policy`, for
/// RING_HASH and MAGLEV; random when None), the re-pick count of a retry's host selection, and
/// the priorities a retry skips (`previous_priorities`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pick<'a> {
    pub hash: Option<u64>,
    pub attempt: u32,
    pub excluded: Option<&'a [bool]>,
}

/// Per-worker balancer state for one cluster.
#[derive(Debug, Default)]
pub struct LbState {
    rr: std::cell::Cell<u64>,
    /// Smooth weighted round robin over a level's localities: the level (by address) and each
    /// locality's running credit. Reset when the plan changes.
    localities: std::cell::RefCell<(usize, Vec<f64>)>,
    /// The same over a host group, for weighted least request.
    least_request: std::cell::RefCell<(usize, Vec<f64>)>,
}

/// Smooth weighted round robin: each pick credits every entry its weight and takes the most
/// credited, which gives up the total (picks follow the weights exactly over a round, as
/// Envoy's EDF scheduler's do). `state` restarts when `id` (what the weights belong to)
/// changes.
fn smooth_pick(state: &std::cell::RefCell<(usize, Vec<f64>)>, id: usize, weights: &[f64]) -> usize {
    let mut state = state.borrow_mut();
    if state.0 != id || state.1.len() != weights.len() {
        *state = (id, vec![0.0; weights.len()]);
    }
    let total: f64 = weights.iter().sum();
    let mut best = 0;
    for (i, w) in weights.iter().enumerate() {
        state.1[i] += w;
        if state.1[i] > state.1[best] {
            best = i;
        }
    }
    state.1[best] -= total;
    best
}

impl LbState {
    /// The next locality of `level` by effective weight.
    fn next_locality(&self, level: &Level) -> usize {
        let weights: Vec<f64> = {
            let mut prev = 0.0;
            level
                .localities
                .iter()
                .map(|(upto, _)| {
                    let w = upto - prev;
                    prev = *upto;
                    w
                })
                .collect()
        };
        smooth_pick(&self.localities, level as *const Level as usize, &weights)
    }
}

/// An EDS cluster with the hosts of a `ClusterLoadAssignment`; hosts of `previous` whose address
/// and priority stay keep their stats.
pub fn with_assignment(
    base: &Cluster,
    cla: &ClusterLoadAssignment,
    previous: Option<&Cluster>,
) -> Result<Cluster, ConfigError> {
    let (fresh, overprovisioning) = hosts_from(
        cla,
        &format!("cluster '{}' assignment", base.name),
        Resolve::None,
        Lookup::System,
    )?;
    let policy = Policy {
        overprovisioning,
        ..base.host_set.policy()
    };
    Ok(with_hosts(base, fresh, previous, policy))
}

fn membership(stats: &ClusterStats) -> Membership {
    Membership {
        healthy: stats.membership_healthy.clone(),
        excluded: stats.membership_excluded.clone(),
    }
}

fn host_key(h: &Arc<Host>) -> (&HostAddress, u32) {
    (&h.address, h.priority)
}

/// `base` with a new host set: hosts of `previous` with the same address and priority are kept
/// (with their stats, in-flight counts and outlier state; their EDS health follows the new
/// assignment), the balancer's plan and the membership gauges follow, and the outlier detector
/// watches the new set.
fn with_hosts(
    base: &Cluster,
    fresh: Vec<Arc<Host>>,
    previous: Option<&Cluster>,
    policy: Policy,
) -> Cluster {
    // A host's outlier state belongs to one detector: a cluster whose detector changed (a new
    // CDS version) starts with fresh hosts, as Envoy's new cluster does.
    let previous = previous.filter(|p| match (&p.outlier, &base.outlier) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    });
    let reuse = |h: Arc<Host>| {
        let Some(old) = previous.and_then(|p| {
            p.host_set
                .hosts
                .iter()
                .find(|o| host_key(o) == host_key(&h))
                .cloned()
        }) else {
            return h;
        };
        let eds = h.health.load(Ordering::Relaxed) & health_flag::FROM_EDS;
        let kept = old.health.load(Ordering::Relaxed) & !health_flag::FROM_EDS;
        old.health.store(kept | eds, Ordering::Relaxed);
        old.eds_status
            .store(h.eds_status.load(Ordering::Relaxed), Ordering::Relaxed);
        old
    };
    let mut new = base.clone();
    let hosts: Vec<Arc<Host>> = fresh.into_iter().map(reuse).collect();
    let before = previous.map_or(&base.host_set.hosts, |p| &p.host_set.hosts);
    let same =
        before.len() == hosts.len() && before.iter().zip(&hosts).all(|(a, b)| Arc::ptr_eq(a, b));
    if !same {
        new.stats.membership_change.inc();
    }
    new.stats.membership_total.set(hosts.len() as i64);
    new.host_set = Arc::new(HostSet::new(hosts, policy, membership(&new.stats)));
    if let Some(d) = &new.outlier {
        d.watch(new.host_set.clone());
    }
    new
}

/// Re-resolves a DNS cluster: `Ok(None)` when its addresses did not change, else the cluster
/// with its new host set (hosts whose address stayed keep their stats).
pub fn refresh(old: &Cluster, lookup: Lookup<'_>) -> Result<Option<Cluster>, ConfigError> {
    let source = old.source.decode();
    let resolve = match old.discovery {
        DiscoveryType::Static | DiscoveryType::Eds | DiscoveryType::OriginalDst => return Ok(None),
        DiscoveryType::LogicalDns => {
            Resolve::First(Family::from_proto(source.dns_lookup_family, &old.name)?)
        }
        DiscoveryType::StrictDns => {
            Resolve::All(Family::from_proto(source.dns_lookup_family, &old.name)?)
        }
    };
    let cla = source.load_assignment.clone().unwrap_or_default();
    let (fresh, overprovisioning) = hosts_from(
        &cla,
        &format!("cluster '{}'.load_assignment", old.name),
        resolve,
        lookup,
    )?;
    if old
        .host_set
        .hosts
        .iter()
        .map(host_key)
        .eq(fresh.iter().map(host_key))
    {
        return Ok(None);
    }
    let policy = Policy {
        overprovisioning,
        ..old.host_set.policy()
    };
    Ok(Some(with_hosts(old, fresh, Some(old), policy)))
}

impl Cluster {
    /// The names a DNS cluster resolves (its endpoints that are not IP addresses).
    pub fn dns_names(&self) -> Vec<String> {
        let source = self.source.decode();
        let mut names: Vec<String> = source
            .load_assignment
            .iter()
            .flat_map(|cla| &cla.endpoints)
            .flat_map(|le| &le.lb_endpoints)
            .filter_map(|ep| match &ep.host_identifier {
                Some(xds_client::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e)) => {
                    match e.address.as_ref()?.address.as_ref()? {
                        address::Address::SocketAddress(sa)
                            if sa.address.parse::<std::net::IpAddr>().is_err() =>
                        {
                            Some(sa.address.clone())
                        }
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect();
        names.dedup();
        names
    }

    /// Envoy's `chargeResponseStat`: `upstream_rq_completed`, the class and the code.
    pub fn charge_response(&self, status: u16) {
        self.stats.upstream_rq_completed.inc();
        self.codes.charge(status);
    }

    /// Chooses a host by the balancer's plan, or None when no host is eligible (Envoy's `no
    /// healthy upstream`).
    pub fn choose(&self, state: &LbState, pick: Pick<'_>) -> Option<Arc<Host>> {
        let plan = self.host_set.plan();
        // Levels of a retry that skips tried priorities, else the plan's.
        let level_of = |point: u32| match pick.excluded.and_then(|e| plan.level_excluding(e, point))
        {
            Some(level) => level,
            None => plan.level(|| point),
        };
        if self.lb == LbPolicy::ConsistentHash {
            let h = pick.hash.unwrap_or_else(rand::random);
            let level = level_of((h % 100) as u32)?;
            if level.panic {
                self.stats.lb_healthy_panic.inc();
            }
            let i = level.table.as_ref()?.pick(h, pick.attempt);
            return level.all.hosts.get(i).cloned();
        }
        let level = match pick.excluded {
            Some(_) => level_of(rand::random_range(0..100))?,
            None => plan.level(|| rand::random_range(0..100))?,
        };
        if level.panic {
            self.stats.lb_healthy_panic.inc();
        }
        // With locality weights, a locality first (by effective weight), then a host in it.
        let group = match level.localities.as_slice() {
            [] => &level.all,
            localities => &localities.get(state.next_locality(level))?.1,
        };
        let hosts = &group.hosts;
        let n = hosts.len();
        if n <= 1 {
            return hosts.first().cloned();
        }
        let by_weight = |mut point: u64| {
            for h in hosts {
                if point < h.weight as u64 {
                    return Some(h.clone());
                }
                point -= h.weight as u64;
            }
            hosts.last().cloned()
        };
        match self.lb {
            LbPolicy::RoundRobin if !group.weighted => {
                let i = state.rr.get();
                state.rr.set(i.wrapping_add(1));
                hosts.get((i % n as u64) as usize).cloned()
            }
            LbPolicy::RoundRobin => {
                // Weighted round robin by a rotating position over the summed weights.
                let i = state.rr.get();
                state.rr.set(i.wrapping_add(1));
                by_weight(i % group.total_weight)
            }
            LbPolicy::Random => by_weight(rand::random::<u64>() % group.total_weight),
            LbPolicy::LeastRequest { .. } if group.weighted => {
                // Unequal weights: each host weighted by its weight over its active requests
                // plus one (Envoy's default `active_request_bias` of 1).
                let weights: Vec<f64> = hosts
                    .iter()
                    .map(|h| {
                        h.weight as f64 / (h.active_requests.load(Ordering::Relaxed) + 1) as f64
                    })
                    .collect();
                let id = group as *const HostGroup as usize;
                hosts
                    .get(smooth_pick(&state.least_request, id, &weights))
                    .cloned()
            }
            LbPolicy::LeastRequest { choices } => {
                // Envoy's unweighted least request: the first of `choices` random picks with the
                // fewest active requests.
                let mut best = &hosts[rand::random_range(0..n)];
                for _ in 1..choices {
                    let h = &hosts[rand::random_range(0..n)];
                    if h.active_requests.load(Ordering::Relaxed)
                        < best.active_requests.load(Ordering::Relaxed)
                    {
                        best = h;
                    }
                }
                Some(best.clone())
            }
            // Consistent-hash clusters pick from their table above.
            LbPolicy::ConsistentHash => None,
        }
    }

    /// Reports one attempt's result to the outlier detector, if the cluster has one.
    pub fn report_outlier(&self, host: &Arc<Host>, report: Report) {
        if let Some(d) = &self.outlier {
            d.report(host, report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(v: serde_json::Value) -> Result<Cluster, ConfigError> {
        let c: pb::Cluster = TypeRegistry::global().from_json(&v, false)?;
        compile(
            &c,
            &Store::default(),
            ClusterEnv {
                event_log: None,
                node: &Default::default(),
            },
        )
    }

    fn ep(port: u16, weight: u32) -> serde_json::Value {
        json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}, "load_balancing_weight": weight})
    }

    #[test]
    fn round_robin_and_weights() {
        let c = cluster(json!({"name": "c", "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [ep(1, 1), ep(2, 1)]}]}})).unwrap();
        let s = LbState::default();
        let ports: Vec<_> = (0..4)
            .map(|_| {
                c.choose(&s, Pick::default())
                    .unwrap()
                    .address
                    .ip()
                    .unwrap()
                    .port()
            })
            .collect();
        assert_eq!(ports, [1, 2, 1, 2]);
        let c = cluster(json!({"name": "c", "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [ep(1, 1), ep(2, 3)]}]}})).unwrap();
        let ports: Vec<_> = (0..4)
            .map(|_| {
                c.choose(&s, Pick::default())
                    .unwrap()
                    .address
                    .ip()
                    .unwrap()
                    .port()
            })
            .collect();
        let twos = ports.iter().filter(|p| **p == 2).count();
        assert_eq!(twos, 3);
    }

    #[test]
    fn priorities_pick_the_top_level() {
        let c = cluster(
            json!({"name": "c", "load_assignment": {"cluster_name": "c", "endpoints": [
            {"priority": 1, "lb_endpoints": [ep(2, 1)]}, {"lb_endpoints": [ep(1, 1)]}]}}),
        )
        .unwrap();
        assert_eq!(
            c.choose(&LbState::default(), Pick::default())
                .unwrap()
                .address
                .ip()
                .unwrap()
                .port(),
            1
        );
        assert_eq!(c.host_set.hosts.len(), 2);
    }

    #[test]
    fn least_request_takes_the_idlest_of_its_choices() {
        let c = cluster(json!({"name": "c", "lb_policy": "LEAST_REQUEST",
            "least_request_lb_config": {"choice_count": 40},
            "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [ep(1, 1), ep(2, 1)]}]}}))
        .unwrap();
        c.host_set.hosts[0]
            .active_requests
            .store(5, Ordering::Relaxed);
        let s = LbState::default();
        for _ in 0..20 {
            let h = c.choose(&s, Pick::default()).unwrap();
            assert_eq!(h.address.ip().unwrap().port(), 2);
        }
    }

    #[test]
    fn refusals_name_fields() {
        let e = cluster(json!({"name": "c", "type": "EDS"})).unwrap_err();
        assert!(e.to_string().contains("EDS"), "{e}");
        let e = cluster(
            json!({"name": "c", "lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 65536}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("prime"), "{e}");
        let e = cluster(json!({"name": "c", "lb_policy": "RING_HASH", "ring_hash_lb_config": {"minimum_ring_size": 10, "maximum_ring_size": 5}})).unwrap_err();
        assert!(
            e.to_string()
                .contains("minimum_ring_size (10) > maximum_ring_size (5)"),
            "{e}"
        );
        let e = cluster(json!({"name": "c", "lb_policy": "ROUND_ROBIN", "maglev_lb_config": {}}))
            .unwrap_err();
        assert!(e.to_string().contains("maglev_lb_config"), "{e}");
        let e =
            cluster(json!({"name": "c", "lb_policy": "LOAD_BALANCING_POLICY_CONFIG"})).unwrap_err();
        assert!(
            e.to_string().contains("LOAD_BALANCING_POLICY_CONFIG"),
            "{e}"
        );
        let e = cluster(json!({"name": "c", "outlier_detection": {"monitors": [{"name": "m"}]}}))
            .unwrap_err();
        assert!(e.to_string().contains("outlier_detection"), "{e}");
        let e = cluster(json!({"name": "c", "health_checks": [{"timeout": "1s"}]})).unwrap_err();
        assert!(e.to_string().contains("health_checks"), "{e}");
        let e = cluster(json!({"name": "c", "load_assignment": {"endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "example.invalid", "port_value": 1}}}}]}]}})).unwrap_err();
        assert!(e.to_string().contains("malformed IP address"), "{e}");
    }

    #[test]
    fn dns_clusters_resolve_and_refresh() {
        let c = cluster(json!({"name": "d", "type": "STRICT_DNS", "dns_refresh_rate": "1s", "load_assignment": {"endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "localhost", "port_value": 80}}}}]}]}}))
        .unwrap();
        assert_eq!(c.dns_refresh, Some(Duration::from_secs(1)));
        assert!(c
            .host_set
            .hosts
            .iter()
            .all(|h| h.hostname == "localhost"
                && h.address.ip().is_some_and(|a| a.ip().is_loopback())));
        assert!(!c.host_set.hosts.is_empty());
        // Same answer: nothing to publish.
        assert!(refresh(&c, Lookup::System).unwrap().is_none());
        // Answers looked up elsewhere (with their TTLs) replace the system resolver's.
        let answers =
            HashMap::from([("localhost".to_string(), vec!["127.0.0.9".parse().unwrap()])]);
        let moved = refresh(&c, Lookup::Answers(&answers)).unwrap().unwrap();
        assert_eq!(moved.dns_names(), ["localhost"]);
        assert!(moved
            .host_set
            .hosts
            .iter()
            .all(|h| h.address.ip().map(|a| a.ip().to_string()) == Some("127.0.0.9".into())));
        // A name that does not resolve leaves the cluster empty instead of failing boot.
        let bad = cluster(json!({"name": "d", "type": "LOGICAL_DNS", "load_assignment": {"endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "no-such-host.invalid", "port_value": 80}}}}]}]}}))
        .unwrap();
        assert!(bad.host_set.hosts.is_empty());
        assert_eq!(bad.dns_refresh, Some(Duration::from_secs(5)));
    }

    #[test]
    fn dns_lookup_family_as_envoy_means_it() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let both = vec![a("[::1]:80"), a("127.0.0.1:80")];
        assert_eq!(Family::Auto.pick(both.clone()), [a("[::1]:80")]);
        assert_eq!(
            Family::Auto.pick(vec![a("127.0.0.1:80")]),
            [a("127.0.0.1:80")]
        );
        assert_eq!(
            Family::V4Only.pick(vec![a("[::1]:80")]),
            Vec::<SocketAddr>::new()
        );
        assert_eq!(Family::V4Preferred.pick(both.clone()), [a("127.0.0.1:80")]);
        assert_eq!(Family::V6Only.pick(both.clone()), [a("[::1]:80")]);
        assert_eq!(Family::All.pick(both), [a("127.0.0.1:80"), a("[::1]:80")]);
        // A family on a cluster that resolves nothing is refused, not ignored.
        assert!(cluster(json!({"name": "c", "dns_lookup_family": "V4_ONLY"})).is_err());
    }

    #[test]
    fn no_hosts_no_choice() {
        let c = cluster(json!({"name": "c"})).unwrap();
        assert!(c.choose(&LbState::default(), Pick::default()).is_none());
    }
}
