//! Listeners compiled from `envoy.config.listener.v3.Listener` (bootstrap or LDS), bound once per
//! worker with SO_REUSEPORT so that the kernel spreads connections across workers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use xds_client::pb::envoy::config::core::v3::Address;
use xds_client::pb::envoy::config::listener::v3 as pb;
use xds_client::TypeRegistry;

pub mod connection;
pub mod drain;
pub mod filter_chain_match;
pub mod http_inspector;
pub mod listener_filters;
pub mod manager;
pub mod stream;
pub mod tls_inspector;
pub mod wire_bytes;

use filter_chain_match::{ChainMatch, ConnectionFacts};

use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::http::conn_manager_config::{self, HcmConfig};
use crate::observe::stats::Store;
use crate::stat_struct;

stat_struct!(ListenerStats {
    counter downstream_cx_total,
    gauge downstream_cx_active,
    counter downstream_cx_destroy,
    counter no_filter_chain_match,
    counter downstream_pre_cx_timeout,
    counter downstream_listener_filter_remote_close,
    counter downstream_global_cx_overflow,
    histogram downstream_cx_length_ms,
});

/// Downstream connections open on listeners that count toward the overload manager's global
/// limit (process-wide, as the limit is).
pub static GLOBAL_DOWNSTREAM_CONNECTIONS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// `bind_to_port: false` listeners only receive connections handed off by a
    /// `use_original_dst` listener.
    pub bind_to_port: bool,
    pub use_original_dst: bool,
    /// `traffic_direction: INBOUND` (`/drain_listeners?inboundonly` drains these).
    pub inbound: bool,
    /// `ignore_global_conn_limit`: not counted toward the overload manager's connection limit.
    pub ignore_global_conn_limit: bool,
    pub listener_filters: listener_filters::ListenerFilters,
    pub chains: Vec<FilterChain>,
    /// The chains' matchers, in order, for selection.
    matchers: Vec<ChainMatch>,
    pub default_chain: Option<ChainTarget>,
    pub stats: ListenerStats,
    pub source: pb::Listener,
    /// Route configurations the chains fetch by RDS (with their `initial_fetch_timeout`): the
    /// listener warms until all are known.
    pub rds: BTreeMap<String, crate::config::dynamic::Wait>,
    pub drain: drain::Drain,
    /// `access_log`: one line per connection when it closes (and for a connection no chain
    /// takes, with flag `NR`).
    pub access_logs: crate::observe::access_log::AccessLogs,
}

/// The active listeners of a snapshot, by name and by address (for `use_original_dst`).
#[derive(Debug, Default, Clone)]
pub struct ListenerSet {
    list: Vec<Arc<Listener>>,
    by_name: HashMap<String, Arc<Listener>>,
    by_address: HashMap<SocketAddr, Arc<Listener>>,
}

impl ListenerSet {
    pub fn new(list: Vec<Arc<Listener>>) -> Self {
        let by_name = list.iter().map(|l| (l.name.clone(), l.clone())).collect();
        let by_address = list.iter().map(|l| (l.address, l.clone())).collect();
        ListenerSet {
            list,
            by_name,
            by_address,
        }
    }
    pub fn iter(&self) -> std::slice::Iter<'_, Arc<Listener>> {
        self.list.iter()
    }
    pub fn len(&self) -> usize {
        self.list.len()
    }
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
    pub fn get(&self, name: &str) -> Option<&Arc<Listener>> {
        self.by_name.get(name)
    }
    /// The listener a redirected connection belongs to: the exact address, else a wildcard
    /// address on the same port (Envoy's lookup for `use_original_dst`).
    pub fn for_original_destination(&self, dst: SocketAddr) -> Option<&Arc<Listener>> {
        self.by_address.get(&dst).or_else(|| {
            let any: std::net::IpAddr = match dst {
                SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
            };
            self.by_address.get(&SocketAddr::new(any, dst.port()))
        })
    }
}

pub fn socket_addr(a: &Option<Address>, path: &str) -> Result<SocketAddr, ConfigError> {
    use xds_client::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(sa)) => {
            let ip: std::net::IpAddr = sa.address.parse().map_err(|_| {
                invalid(
                    format!("{path}.socket_address.address"),
                    format!("malformed IP address: {}", sa.address),
                )
            })?;
            let port = match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) if p <= 65535 => p as u16,
                _ => {
                    return Err(invalid(
                        format!("{path}.socket_address.port_value"),
                        "a port in [0, 65535] is required",
                    ))
                }
            };
            if sa.protocol != 0 || sa.ipv4_compat || !sa.resolver_name.is_empty() {
                return Err(ConfigError::Unsupported {
                    path: path.into(),
                    fields: "'protocol', 'ipv4Compat' or 'resolver_name'".into(),
                });
            }
            Ok(SocketAddr::new(ip, port))
        }
        Some(_) => Err(ConfigError::Unsupported {
            path: path.into(),
            fields: "'pipe' or 'envoy_internal_address' (comes with xDS support, issue #4)".into(),
        }),
        None => Err(invalid(path, "address is required")),
    }
}

/// What a filter chain ends in: its terminal network filter.
#[derive(Debug, Clone)]
pub enum Terminal {
    Http(Arc<HcmConfig>),
    Tcp(Arc<crate::tcp::proxy::TcpProxyConfig>),
}

/// What serves a connection a chain took: its transport socket (TLS Petrel terminates, or
/// plaintext) and its terminal filter.
#[derive(Debug, Clone)]
pub struct ChainTarget {
    pub tls: Option<Arc<crate::tls::server::ServerTls>>,
    /// `transport_socket_connect_timeout`: how long the TLS handshake may take.
    pub handshake_timeout: Option<std::time::Duration>,
    /// The network filters ahead of the terminal one.
    pub network_filters: Arc<[crate::network::NetworkFilter]>,
    pub terminal: Terminal,
}

/// One filter chain: what it matches and what serves the connection.
#[derive(Debug)]
pub struct FilterChain {
    pub matcher: ChainMatch,
    pub target: ChainTarget,
}

impl Listener {
    /// Whether the SDS secrets of every chain's TLS have arrived (else it warms).
    pub fn tls_ready(&self) -> bool {
        self.chains
            .iter()
            .map(|c| &c.target)
            .chain(self.default_chain.iter())
            .filter_map(|t| t.tls.as_ref())
            .all(|t| t.ready())
    }

    /// The chain for a connection (`filter_chain_match`, then `default_filter_chain`).
    pub fn chain_for(&self, facts: &ConnectionFacts<'_>) -> Option<&ChainTarget> {
        let matchers: &[ChainMatch] = &self.matchers;
        match filter_chain_match::select(matchers, facts) {
            Some(i) => Some(&self.chains[i].target),
            None => self.default_chain.as_ref(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_chain(
    env: &ListenerEnv<'_>,
    direction: TrafficDirection,
    fc: &pb::FilterChain,
    fcp: &str,
    lprefix: &str,
    known_clusters: &HashSet<String>,
    store: &Store,
) -> Result<(ChainMatch, ChainTarget), ConfigError> {
    let mut fc_rest = fc.clone();
    let filters = std::mem::take(&mut fc_rest.filters);
    let matcher = ChainMatch::compile(
        fc_rest.filter_chain_match.take().as_ref(),
        &format!("{fcp}.filter_chain_match"),
    )?;
    fc_rest.name.clear();
    // Chain metadata is data for filters and loggers.
    fc_rest.metadata = None;
    let tls = crate::config::transport_socket::<
        xds_client::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext,
    >(
        fc_rest.transport_socket.take().as_ref(),
        &format!("{fcp}.transport_socket"),
    )?
    .map(|ctx| {
        crate::tls::server::ServerTls::compile(
            &ctx,
            store,
            lprefix,
            &format!("{fcp}.transport_socket.typed_config"),
        )
        .map(Arc::new)
    })
    .transpose()?;
    let handshake_timeout = match fc_rest.transport_socket_connect_timeout.take() {
        Some(d) => {
            let d = crate::config::duration::to_std(
                &d,
                &format!("{fcp}.transport_socket_connect_timeout"),
            )?;
            (!d.is_zero()).then_some(d)
        }
        None => None,
    };
    reject_unhandled(&fc_rest, fcp)?;
    // The last filter is the terminal one; the others Petrel lacks are refused by name with the
    // issue that brings them.
    let Some((last, others)) = filters.split_last() else {
        return Err(invalid(
            format!("{fcp}.filters"),
            "a filter chain needs filters",
        ));
    };
    let url_of = |f: &pb::Filter, i: usize| match &f.config_type {
        Some(pb::filter::ConfigType::TypedConfig(any)) => {
            Ok((TypeRegistry::effective_type_url(any), any.clone()))
        }
        _ => Err(invalid(
            format!("{fcp}.filters[{i}]"),
            "typed_config is required",
        )),
    };
    let mut network_filters = Vec::new();
    for (i, f) in others.iter().enumerate() {
        let (url, any) = url_of(f, i)?;
        if let Some(filter) = crate::network::compile(
            &url,
            &any,
            env,
            direction,
            store,
            &format!("{fcp}.filters[{i}].typed_config"),
        )? {
            network_filters.push(filter);
            continue;
        }
        return Err(ConfigError::UnsupportedExtension {
            path: format!("{fcp}.filters[{i}] ('{}')", f.name),
            why: petrel_filters::extensions::refusal(&url),
            type_url: url,
        });
    }
    let i = others.len();
    let fp = format!("{fcp}.filters[{i}]");
    let (url, any) = url_of(last, i)?;
    let terminal = match url.as_str() {
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" => {
            // Istio puts its network stats filter in TCP chains only (HTTP chains have the HTTP
            // one); Petrel reports connections from tcp_proxy.
            if let Some(i) = network_filters
                .iter()
                .position(|f| matches!(f, crate::network::NetworkFilter::IstioStats(_)))
            {
                return Err(ConfigError::Unsupported {
                    path: format!("{fcp}.filters[{i}]"),
                    fields: "'istio.stats' network filter ahead of http_connection_manager".into(),
                });
            }
            let hcm_pb = TypeRegistry::global().unpack(&any)?;
            Terminal::Http(Arc::new(conn_manager_config::compile(
                env,
                direction,
                &hcm_pb,
                lprefix,
                known_clusters,
                store,
                &format!("{fp}.typed_config"),
            )?))
        }
        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy" => {
            let tcp_pb = TypeRegistry::global().unpack(&any)?;
            Terminal::Tcp(Arc::new(crate::tcp::proxy::compile(
                &tcp_pb,
                store,
                &format!("{fp}.typed_config"),
            )?))
        }
        _ => {
            return Err(ConfigError::UnsupportedExtension {
                path: format!("{fp} ('{}')", last.name),
                why: petrel_filters::extensions::refusal(&url),
                type_url: url,
            })
        }
    };
    Ok((
        matcher,
        ChainTarget {
            tls,
            handshake_timeout,
            network_filters: network_filters.into(),
            terminal,
        },
    ))
}

/// A listener's `traffic_direction`: tracing and Istio's telemetry tell client from server by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficDirection {
    Unspecified,
    Inbound,
    Outbound,
}

impl TrafficDirection {
    fn of(v: i32) -> TrafficDirection {
        match v {
            1 => TrafficDirection::Inbound,
            2 => TrafficDirection::Outbound,
            _ => TrafficDirection::Unspecified,
        }
    }
    /// OUTBOUND connection managers make client spans (Envoy's egress operation).
    pub fn egress(self) -> bool {
        self == TrafficDirection::Outbound
    }
}

/// What compiling a listener needs beyond the listener itself.
pub struct ListenerEnv<'a> {
    /// The proxy's own address (`x-forwarded-for` for loopback peers, Zipkin endpoints).
    pub local_address: std::net::IpAddr,
    /// The bootstrap's tracer.
    pub tracing: Option<&'a std::sync::Arc<crate::observe::tracing::ZipkinDriver>>,
    pub node: &'a xds_client::pb::envoy::config::core::v3::Node,
}

pub fn compile(
    env: &ListenerEnv<'_>,
    l: &pb::Listener,
    known_clusters: &HashSet<String>,
    store: &Store,
) -> Result<Listener, ConfigError> {
    let path = format!("listener '{}'", l.name);
    let mut rest = l.clone();
    let name = std::mem::take(&mut rest.name);
    if rest.listener_specifier.is_some() {
        // Internal listeners (Istio's HBONE `main_internal`, `connect_originate`) need the
        // internal-listener bootstrap extension, which the table defers.
        let url =
            "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener";
        return Err(ConfigError::UnsupportedExtension {
            path: format!("{path}.internal_listener"),
            why: petrel_filters::extensions::refusal(url),
            type_url: url.into(),
        });
    }
    let address = socket_addr(&rest.address.take(), &format!("{path}.address"))?;
    let chains_pb = std::mem::take(&mut rest.filter_chains);
    let default_pb = rest.default_filter_chain.take();
    let stat_prefix_field = std::mem::take(&mut rest.stat_prefix);
    // Traffic direction decides what `/drain_listeners?inboundonly` drains (and, later, how
    // tracing and Istio telemetry label the traffic).
    let direction = TrafficDirection::of(std::mem::take(&mut rest.traffic_direction));
    let inbound = direction == TrafficDirection::Inbound;
    let ignore_global_conn_limit = std::mem::take(&mut rest.ignore_global_conn_limit);
    // Overload actions are refused, so there is nothing for a listener to bypass.
    rest.bypass_overload_manager = false;
    let bind_to_port = rest.bind_to_port.take().is_none_or(|b| b.value);
    let use_original_dst = rest.use_original_dst.take().is_some_and(|b| b.value);
    let listener_filters =
        listener_filters::ListenerFilters::compile(&mut rest, use_original_dst, store, &path)?;
    let access_logs = crate::observe::access_log::compile_all(
        &std::mem::take(&mut rest.access_log),
        store,
        &format!("{path}.access_log"),
    )?;
    reject_unhandled(&rest, &path)?;
    if chains_pb.is_empty() && default_pb.is_none() {
        return Err(invalid(
            format!("{path}.filter_chains"),
            "no filter chains specified",
        ));
    }
    // Envoy names listener stats by address: `listener.127.0.0.1_10000.` (or the stat_prefix).
    let lprefix = if stat_prefix_field.is_empty() {
        format!("listener.{}_{}.", address.ip(), address.port())
    } else {
        format!("listener.{stat_prefix_field}.")
    };
    let mut chains = Vec::with_capacity(chains_pb.len());
    for (i, fc) in chains_pb.iter().enumerate() {
        let (matcher, target) = compile_chain(
            env,
            direction,
            fc,
            &format!("{path}.filter_chains[{i}]"),
            &lprefix,
            known_clusters,
            store,
        )?;
        if chains.iter().any(|c: &FilterChain| c.matcher == matcher) {
            return Err(invalid(
                format!("{path}.filter_chains[{i}]"),
                format!("error adding listener '{name}': multiple filter chains with the same matching rules are defined"),
            ));
        }
        chains.push(FilterChain { matcher, target });
    }
    let default_chain = match default_pb {
        Some(fc) => Some(
            compile_chain(
                env,
                direction,
                &fc,
                &format!("{path}.default_filter_chain"),
                &lprefix,
                known_clusters,
                store,
            )?
            .1,
        ),
        None => None,
    };
    let matchers = chains.iter().map(|c| c.matcher.clone()).collect();
    let rds = chains
        .iter()
        .map(|c| &c.target)
        .chain(default_chain.iter())
        .map(|t| &t.terminal)
        .filter_map(|t| match t {
            Terminal::Http(h) => match &h.routes {
                conn_manager_config::Routes::Rds(n, w) => Some((n.clone(), *w)),
                conn_manager_config::Routes::Static(_) => None,
            },
            Terminal::Tcp(_) => None,
        })
        .collect();
    Ok(Listener {
        name,
        address,
        bind_to_port,
        use_original_dst,
        inbound,
        ignore_global_conn_limit,
        listener_filters,
        chains,
        matchers,
        default_chain,
        stats: ListenerStats::new(store, &lprefix),
        source: l.clone(),
        rds,
        drain: drain::Drain::default(),
        access_logs,
    })
}

/// Binds a listener socket for one worker (SO_REUSEPORT so every worker accepts on its own).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}
