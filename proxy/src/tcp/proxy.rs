//! `envoy.filters.network.tcp_proxy`: connects each downstream connection to a host of a cluster
//! (or a weighted choice of clusters) and copies bytes both ways, half-closes included, until
//! both sides are done or the connection is idle for `idle_timeout`.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::listener::stream::{Accepted, Downstream, Outcome};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use xds_client::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    tcp_proxy::ClusterSpecifier, TcpProxy,
};

use crate::config::{duration, invalid, reject_unhandled, ConfigError};
use crate::listener::drain::Drain;
use crate::observe::stats::Store;
use crate::stat_struct;
use crate::upstream::outlier_detection::Report;
use crate::upstream::pool::ResetReason;
use crate::worker::WorkerCtx;

stat_struct!(TcpProxyStats {
    counter downstream_cx_total,
    counter downstream_cx_no_route,
    counter downstream_cx_rx_bytes_total,
    counter downstream_cx_tx_bytes_total,
    counter idle_timeout,
    counter max_downstream_connection_duration,
});

#[derive(Debug)]
pub struct TcpProxyConfig {
    /// `(cluster, cumulative weight)`; one entry for `cluster`.
    clusters: Vec<(String, u64)>,
    idle_timeout: Option<Duration>,
    max_connect_attempts: u32,
    max_duration: Option<Duration>,
    pub stats: TcpProxyStats,
    /// `access_log`: one line per connection, when it closes.
    access_logs: crate::observe::access_log::AccessLogs,
}

pub fn compile(pb: &TcpProxy, store: &Store, path: &str) -> Result<TcpProxyConfig, ConfigError> {
    let mut rest = pb.clone();
    let stat_prefix = std::mem::take(&mut rest.stat_prefix);
    if stat_prefix.is_empty() {
        return Err(invalid(
            format!("{path}.stat_prefix"),
            "value length must be at least 1 characters",
        ));
    }
    let clusters = match rest.cluster_specifier.take() {
        Some(ClusterSpecifier::Cluster(c)) => vec![(c, 1)],
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let wp = format!("{path}.weighted_clusters");
            let mut total = 0u64;
            let mut out = Vec::new();
            for (i, c) in w.clusters.iter().enumerate() {
                let mut crest = c.clone();
                let name = std::mem::take(&mut crest.name);
                total += std::mem::take(&mut crest.weight) as u64;
                reject_unhandled(&crest, &format!("{wp}.clusters[{i}]"))?;
                out.push((name, total));
            }
            if out.is_empty() || total == 0 {
                return Err(invalid(
                    format!("{wp}.clusters"),
                    "value must contain at least 1 item(s) with a weight",
                ));
            }
            out
        }
        _ => return Err(invalid(path, "cluster_specifier is required")),
    };
    // Envoy's default idle timeout is one hour; 0 disables it.
    let idle = duration::or(
        &rest.idle_timeout.take(),
        Duration::from_secs(3600),
        &format!("{path}.idle_timeout"),
    )?;
    let max_connect_attempts = rest.max_connect_attempts.take().map_or(1, |v| v.value);
    if max_connect_attempts == 0 {
        return Err(invalid(
            format!("{path}.max_connect_attempts"),
            "value must be greater than or equal to 1",
        ));
    }
    let max_duration = match rest.max_downstream_connection_duration.take() {
        Some(d) => {
            let d = duration::to_std(&d, &format!("{path}.max_downstream_connection_duration"))?;
            (!d.is_zero()).then_some(d)
        }
        None => None,
    };
    let access_logs = crate::observe::access_log::compile_all(
        &std::mem::take(&mut rest.access_log),
        store,
        &format!("{path}.access_log"),
    )?;
    reject_unhandled(&rest, path)?;
    Ok(TcpProxyConfig {
        access_logs,
        clusters,
        idle_timeout: (!idle.is_zero()).then_some(idle),
        max_connect_attempts,
        max_duration,
        stats: TcpProxyStats::new(store, &format!("tcp.{stat_prefix}.")),
    })
}

impl TcpProxyConfig {
    fn pick(&self) -> &str {
        let total = self.clusters.last().map_or(1, |(_, t)| *t);
        let draw = rand::random_range(0..total);
        self.clusters
            .iter()
            .find(|(_, t)| draw < *t)
            .map_or("", |(n, _)| n.as_str())
    }
}

/// What a connection's access log reads.
#[derive(Default)]
struct TcpFacts {
    flag: &'static str,
    cluster: Option<String>,
    host: Option<crate::upstream::cluster::HostAddress>,
    upstream_local: Option<SocketAddr>,
    upstream_tls: Option<Arc<crate::tls::info::TlsInfo>>,
    downstream_tls: Option<Arc<crate::tls::info::TlsInfo>>,
    dynamic_metadata: petrel_filters::http_filter::DynamicMetadata,
    filter_state: Arc<petrel_filters::filter_state::FilterState>,
    received: Cell<u64>,
    sent: Cell<u64>,
    cluster_istio: Option<Arc<petrel_filters::workload_metadata::IstioClusterMetadata>>,
    upstream_workload: Option<Arc<petrel_filters::workload_metadata::WorkloadMetadata>>,
    /// What TCP metadata exchange learnt of each side (None inside: the exchange is over and
    /// the peer unknown).
    down_peer: RefCell<Option<Peer>>,
    up_peer: RefCell<Option<Peer>>,
    /// One per Istio stats filter of the chain.
    reports: RefCell<Vec<crate::observe::istio_stats::TcpReport>>,
}

type Peer = Option<Arc<petrel_filters::workload_metadata::WorkloadMetadata>>;

/// Proxies one connection once its transport socket is up.
pub async fn serve(
    accepted: Accepted,
    original_dst: Option<SocketAddr>,
    server_name: Option<Arc<str>>,
    cfg: Arc<TcpProxyConfig>,
    listener_logs: crate::observe::access_log::AccessLogs,
    ctx: Rc<WorkerCtx>,
    drain: Drain,
) {
    // The listener's access log sees the connection as tcp_proxy's does.
    let logged = !cfg.access_logs.is_empty() || !listener_logs.is_empty();
    let start = std::time::Instant::now();
    let start_time = std::time::SystemTime::now();
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let (remote, local) = if logged {
        (
            accepted.tcp.peer_addr().unwrap_or(unknown),
            original_dst.unwrap_or_else(|| accepted.tcp.local_addr().unwrap_or(unknown)),
        )
    } else {
        (unknown, unknown)
    };
    let mut facts = TcpFacts::default();
    let filters = accepted.filters.clone();
    let (up, allowed) = match accepted.establish().await {
        Some(Outcome::Up(up)) => (Some(up), true),
        Some(Outcome::Denied(up)) => (Some(up), false),
        None => (None, false),
    };
    facts.reports = RefCell::new(
        crate::network::istio_stats(&filters)
            .map(|_| Default::default())
            .collect(),
    );
    if let Some(up) = up {
        facts.downstream_tls = up.tls;
        facts.dynamic_metadata = up.dynamic_metadata;
        facts.filter_state = up.filter_state;
        if allowed {
            relay(
                up.stream,
                up.initial,
                original_dst,
                &cfg,
                &filters,
                ctx,
                drain,
                &mut facts,
            )
            .await;
        }
    }
    report_istio_stats(&filters, &facts, true);
    if !logged {
        return;
    }
    let mut v = crate::observe::formatter::StreamValues::new(start_time, remote, local);
    v.response_flags = facts.flag;
    v.bytes_received = facts.received.get();
    v.bytes_sent = facts.sent.get();
    v.duration = Some(start.elapsed());
    v.upstream.cluster = facts.cluster.as_deref();
    v.upstream.host = facts.host.as_ref();
    v.upstream.local = facts.upstream_local;
    v.upstream.tls = facts.upstream_tls.as_deref();
    v.downstream_tls = facts.downstream_tls.as_deref();
    v.dynamic_metadata = Some(&facts.dynamic_metadata);
    v.filter_state = Some(&facts.filter_state);
    v.requested_server_name = server_name.as_deref().unwrap_or("");
    crate::observe::access_log::log_all(&cfg.access_logs, &v);
    crate::observe::access_log::log_all(&listener_logs, &v);
}

/// Istio's stats filters report the connection (see `IstioStats::report_tcp`).
fn report_istio_stats(filters: &[crate::network::NetworkFilter], facts: &TcpFacts, end: bool) {
    let mut reports = facts.reports.borrow_mut();
    if reports.is_empty() {
        return;
    }
    let (down, up) = (facts.down_peer.borrow(), facts.up_peer.borrow());
    let peer = crate::observe::istio_stats::PeerFacts {
        host: None,
        route_name: "",
        cluster: facts.cluster.as_deref(),
        cluster_istio: facts.cluster_istio.as_deref(),
        upstream_workload: facts.upstream_workload.as_deref(),
        upstream_tls: facts.upstream_tls.as_deref(),
        downstream_tls: facts.downstream_tls.as_deref(),
        filter_state: &facts.filter_state,
        downstream_peer: down.as_ref().and_then(|p| p.as_deref()),
        upstream_peer: up.as_ref().and_then(|p| p.as_deref()),
        flags: facts.flag,
    };
    for (s, r) in crate::network::istio_stats(filters).zip(reports.iter_mut()) {
        s.report_tcp(
            r,
            &peer,
            down.is_some(),
            up.is_some(),
            facts.sent.get(),
            facts.received.get(),
            end,
        );
    }
}

/// Reports every `tcp_reporting_duration` (the shortest of the chain's stats filters).
async fn report_periodically(filters: &[crate::network::NetworkFilter], facts: &TcpFacts) {
    let Some(every) = crate::network::istio_stats(filters)
        .map(|s| s.tcp_reporting_duration)
        .filter(|d| !d.is_zero())
        .min()
    else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        report_istio_stats(filters, facts, false);
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    downstream: Downstream,
    initial: BytesMut,
    original_dst: Option<SocketAddr>,
    cfg: &TcpProxyConfig,
    filters: &[crate::network::NetworkFilter],
    ctx: Rc<WorkerCtx>,
    drain: Drain,
    facts: &mut TcpFacts,
) {
    cfg.stats.downstream_cx_total.inc();
    let snap = ctx.snapshot();
    let Some(cluster) = snap.clusters.get(cfg.pick()).cloned() else {
        // Envoy closes the connection (flag NR).
        cfg.stats.downstream_cx_no_route.inc();
        facts.flag = "NR";
        return;
    };
    facts.cluster = Some(cluster.name.clone());
    facts.cluster_istio = cluster.istio.clone();
    let mut upstream = None;
    for _ in 0..cfg.max_connect_attempts {
        let Some(host) =
            ctx.upstreams
                .choose_host(&cluster, original_dst, None, Default::default())
        else {
            // No healthy upstream (flag UH).
            cluster.stats.upstream_cx_none_healthy.inc();
            facts.flag = "UH";
            return;
        };
        facts.host = Some(host.address.clone());
        facts.upstream_workload = host.istio_workload.clone();
        match crate::upstream::pool::connect_tcp(&cluster, &host).await {
            Ok((s, held)) => {
                let conn = s.facts();
                facts.upstream_local = conn.local;
                facts.upstream_tls = conn.tls;
                cluster.report_outlier(&host, Report::ConnectSuccessFinal);
                upstream = Some((s, host, held));
                break;
            }
            // The cluster is full: no attempt is made, as Envoy's TCP pool refuses it (`UO`).
            Err(ResetReason::Overflow) => {
                facts.flag = "UO";
                return;
            }
            Err(ResetReason::ConnectionTimeout) => cluster.report_outlier(&host, Report::Timeout),
            Err(_) => cluster.report_outlier(&host, Report::ConnectFailed),
        }
    }
    // Connection failures (flag UF) close the downstream connection.
    // `_connection` holds the cluster's `max_connections` slot while the relay runs.
    let Some((upstream, host, _connection)) = upstream else {
        facts.flag = "UF";
        return;
    };
    let stats = &cluster.stats;
    stats.upstream_cx_active.inc();
    host.stats
        .cx_active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Envoy's TCP pool counts the proxied connection as a request on its upstream connection.
    stats.upstream_rq_total.inc();
    stats.upstream_rq_active.inc();
    host.stats
        .rq_total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    host.active_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let activity = Rc::new(Cell::new(tokio::time::Instant::now()));
    let (dr, mut dw) = downstream.into_split();
    let (ur, mut uw) = tokio::io::split(upstream);
    let facts: &TcpFacts = facts;
    // Istio's TCP metadata exchange: each side's frame goes first; the peer's is read off the
    // front of what that side sends.
    let down_mx = crate::network::metadata_exchange(filters).and_then(|mx| {
        let alpn = facts
            .downstream_tls
            .as_ref()
            .map_or("", |t| t.alpn.as_str());
        match mx.start(alpn) {
            Some(frame) => Some((mx, frame)),
            None => {
                *facts.down_peer.borrow_mut() = Some(None);
                None
            }
        }
    });
    let up_mx = cluster.upstream_mx.as_deref().and_then(|mx| {
        let alpn = facts.upstream_tls.as_ref().map_or("", |t| t.alpn.as_str());
        match mx.start(alpn) {
            Some(frame) => Some((mx, frame)),
            None => {
                *facts.up_peer.borrow_mut() = Some(None);
                None
            }
        }
    });
    if let Some((_, frame)) = &down_mx {
        let _ = dw.write_all(frame).await;
    }
    if let Some((_, frame)) = &up_mx {
        let _ = uw.write_all(frame).await;
    }
    let up = pump(
        dr,
        uw,
        initial,
        &activity,
        &cfg.stats.downstream_cx_rx_bytes_total,
        &facts.received,
        down_mx.map(|(mx, _)| (mx, &facts.down_peer)),
    );
    let down = pump(
        ur,
        dw,
        BytesMut::new(),
        &activity,
        &cfg.stats.downstream_cx_tx_bytes_total,
        &facts.sent,
        up_mx.map(|(mx, _)| (mx, &facts.up_peer)),
    );
    let both = async { tokio::join!(up, down) };
    let reporting = report_periodically(filters, facts);
    let idle = idle_watch(cfg.idle_timeout, &activity);
    let lifetime = async {
        match cfg.max_duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = both => {}
        _ = idle => cfg.stats.idle_timeout.inc(),
        _ = lifetime => cfg.stats.max_downstream_connection_duration.inc(),
        // The drain time of a removed listener is over.
        _ = drain.finished() => {}
        _ = reporting => {}
    }
    stats.upstream_rq_active.dec();
    host.active_requests
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    stats.upstream_cx_active.dec();
    stats.upstream_cx_destroy.inc();
    host.stats
        .cx_active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// Copies `from` to `to` (after `first`), then half-closes `to` when `from` ends. With a
/// metadata exchange, the peer's frame is first read off the front and kept in `peer`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut first: BytesMut,
    activity: &Cell<tokio::time::Instant>,
    bytes: &crate::observe::stats::Counter,
    moved: &Cell<u64>,
    peer: Option<(
        &crate::network::metadata_exchange::MetadataExchange,
        &RefCell<Option<Peer>>,
    )>,
) {
    if let Some((mx, slot)) = peer {
        let found = mx.read_peer_from(&mut from, &mut first).await;
        activity.set(tokio::time::Instant::now());
        *slot.borrow_mut() = Some(found);
    }
    if !first.is_empty() {
        bytes.add(first.len() as u64);
        moved.set(moved.get() + first.len() as u64);
        if to.write_all(&first).await.is_err() {
            return;
        }
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        activity.set(tokio::time::Instant::now());
        bytes.add(n as u64);
        moved.set(moved.get() + n as u64);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Resolves once nothing has moved for `timeout`.
async fn idle_watch(timeout: Option<Duration>, activity: &Cell<tokio::time::Instant>) {
    let Some(t) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let at = activity.get() + t;
        if tokio::time::Instant::now() >= at {
            return;
        }
        tokio::time::sleep_until(at).await;
    }
}
