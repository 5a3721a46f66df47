//! Per-worker upstream connection pools: HTTP/1.1 (one request per connection at a time, idle
//! connections reused) and HTTP/2 (one multiplexed connection per host). A worker's pools are
//! only touched from that worker's thread, so they use `Rc`/`RefCell` and no locks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::circuit_breakers::Held;
use super::cluster::{Cluster, ClusterStats, Host, HostAddress, LbState, Pick};
use super::outlier_detection::Report;
use crate::tls::client::Alpn;
use crate::worker::LocalExec;

/// A request body sent upstream: the downstream body as it streams, or (when the request may be
/// retried) an attempt's view of the recorded body.
pub type UpstreamBody =
    Either<crate::http::stream_timeouts::DownstreamBody, crate::http::replay::ReplayBody>;

/// Why an upstream request failed before response headers, in Envoy's reset-reason words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetReason {
    /// The connection could not be made; the OS error number, 0 when there is none (a failed
    /// handshake).
    ConnectionFailure(i32),
    ConnectionTimeout,
    ConnectionTermination,
    ProtocolError,
    /// The upstream refused the HTTP/2 stream (`REFUSED_STREAM`).
    RefusedStream,
    /// A circuit breaker refused the request (`max_requests`, `max_pending_requests`).
    Overflow,
    /// Not an upstream failure: the downstream request body could not be decoded while it was
    /// being forwarded (bad chunking and the like).
    DownstreamBody,
    /// The TLS handshake with the host failed.
    Tls(crate::tls::TlsFailure),
}

impl ResetReason {
    /// Envoy's reset reason string as it appears in local-reply bodies.
    pub fn as_str(&self) -> &'static str {
        match self {
            ResetReason::ConnectionFailure(_) | ResetReason::Tls(_) => "remote connection failure",
            ResetReason::ConnectionTimeout => "connection timeout",
            ResetReason::ConnectionTermination => "connection termination",
            ResetReason::ProtocolError => "protocol error",
            ResetReason::RefusedStream => "remote refused stream reset",
            ResetReason::Overflow => "overflow",
            ResetReason::DownstreamBody => "downstream protocol error",
        }
    }
    /// Envoy's `%UPSTREAM_TRANSPORT_FAILURE_REASON%`: why the connection could not be made.
    pub fn transport_failure_reason(&self) -> Option<String> {
        match self {
            ResetReason::ConnectionFailure(errno) if *errno != 0 => {
                let e = std::io::Error::from_raw_os_error(*errno).to_string();
                let text = e.split(" (os error").next().unwrap_or(&e);
                Some(format!("delayed_connect_error:_{}", text.replace(' ', "_")))
            }
            ResetReason::Tls(f) => Some(f.reason()),
            _ => None,
        }
    }

    /// Envoy's `%RESPONSE_CODE_DETAILS%` for a reset before the response started.
    pub fn details(&self) -> String {
        let reason = match self {
            ResetReason::ConnectionFailure(_) | ResetReason::Tls(_) => "remote_connection_failure",
            ResetReason::ConnectionTimeout => "connection_timeout",
            ResetReason::ConnectionTermination => "connection_termination",
            ResetReason::ProtocolError => "protocol_error",
            ResetReason::RefusedStream => "remote_refused_stream_reset",
            ResetReason::Overflow => "overflow",
            ResetReason::DownstreamBody => "downstream_protocol_error",
        };
        match self.transport_failure_reason() {
            Some(t) => format!("upstream_reset_before_response_started{{{reason}|{t}}}"),
            None => format!("upstream_reset_before_response_started{{{reason}}}"),
        }
    }

    /// Envoy's response flag.
    pub fn flag(&self) -> &'static str {
        match self {
            ResetReason::ConnectionFailure(_)
            | ResetReason::ConnectionTimeout
            | ResetReason::Tls(_) => "UF",
            ResetReason::ConnectionTermination => "UC",
            ResetReason::ProtocolError => "UPE",
            ResetReason::RefusedStream => "UR",
            ResetReason::Overflow => "UO",
            ResetReason::DownstreamBody => "DPE",
        }
    }
}

struct IdleH1 {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
    used: u32,
    local: UpstreamConn,
}

/// The pool's HTTP/2 connection and what the access log reads of it.
#[derive(Clone)]
struct H2Conn {
    sender: http2::SendRequest<UpstreamBody>,
    local: UpstreamConn,
}

/// What the access log reads of the upstream connection a response came on: its local
/// address (`%UPSTREAM_LOCAL_ADDRESS%`) and its TLS (`%UPSTREAM_PEER_URI_SAN%`, …).
#[derive(Clone, Default)]
pub struct UpstreamConn {
    pub local: Option<SocketAddr>,
    pub tls: Option<Arc<crate::tls::info::TlsInfo>>,
    /// Requests sent on the connection (`upstream_rq_per_cx` when it closes).
    pub requests: Arc<std::sync::atomic::AtomicU64>,
}

impl UpstreamConn {
    fn sent_one(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

fn with_local<B>(mut resp: Response<B>, conn: UpstreamConn) -> Response<B> {
    if conn.local.is_some() || conn.tls.is_some() {
        resp.extensions_mut().insert(conn);
    }
    resp
}

/// What a request waiting in a pool's queue is given: a connection, or leave to open one
/// because a connection of this pool closed.
enum Slot {
    Ready(IdleH1),
    Connect,
}

#[derive(Default)]
struct HostPool {
    idle: RefCell<Vec<IdleH1>>,
    h2: RefCell<Option<H2Conn>>,
    /// Whether an HTTP/2 connection is being opened, and the requests waiting for it (they
    /// queue on it as Envoy's pending streams do, rather than each opening its own).
    h2_opening: std::cell::Cell<bool>,
    h2_waiters: RefCell<Vec<tokio::sync::oneshot::Sender<H2Opened>>>,
    /// Requests waiting for a connection (Envoy's pending requests), oldest first.
    waiters: RefCell<std::collections::VecDeque<tokio::sync::oneshot::Sender<Slot>>>,
    /// This pool's connections, open or opening.
    conns: std::cell::Cell<usize>,
    /// The ALPN its TLS connections offer instead of the cluster's.
    alpn: Option<Arc<[Vec<u8>]>>,
    /// The cluster's `max_connection_pools` slot this pool holds.
    _slot: Option<Held>,
    /// Where the pool is kept, so that it leaves once it has no connection and no waiting
    /// request (Envoy removes idle pools, giving back their `max_connection_pools` slot).
    home: Option<(std::rc::Weak<PoolMap>, String, PoolKey)>,
}

impl HostPool {
    /// A connection finished a request: the oldest waiting request gets it, else it idles.
    fn release(&self, mut c: IdleH1) {
        loop {
            let Some(w) = self.waiters.borrow_mut().pop_front() else {
                break;
            };
            match w.send(Slot::Ready(c)) {
                Ok(()) => return,
                Err(Slot::Ready(back)) => c = back,
                Err(Slot::Connect) => return,
            }
        }
        self.idle.borrow_mut().push(c);
    }

    /// A connection closed: the oldest waiting request may open a new one; with none waiting
    /// and no connection left, the pool leaves.
    fn closed(&self) {
        self.conns.set(self.conns.get().saturating_sub(1));
        loop {
            let Some(w) = self.waiters.borrow_mut().pop_front() else {
                break;
            };
            if w.send(Slot::Connect).is_ok() {
                return;
            }
        }
        self.leave_if_idle();
    }

    /// Leaves the pool map when no connection is open or opening and nothing waits.
    fn leave_if_idle(&self) {
        if self.conns.get() > 0 || self.h2_opening.get() || !self.waiters.borrow().is_empty() {
            return;
        }
        self.idle.borrow_mut().clear();
        *self.h2.borrow_mut() = None;
        if let Some((map, cluster, key)) = &self.home {
            let Some(map) = map.upgrade() else {
                return;
            };
            let mut map = map.borrow_mut();
            if let Some(pools) = map.get_mut(cluster) {
                if pools
                    .get(key)
                    .is_some_and(|p| std::ptr::eq(Rc::as_ptr(p), self))
                {
                    pools.remove(key);
                }
            }
        }
    }

    /// A ready idle connection, if any (stale ones are dropped).
    fn take_idle(&self, idle_timeout: Option<std::time::Duration>) -> Option<IdleH1> {
        let mut idle = self.idle.borrow_mut();
        while let Some(c) = idle.pop() {
            let stale = idle_timeout.is_some_and(|t| c.since.elapsed() >= t);
            if !stale && c.sender.is_ready() {
                return Some(c);
            }
        }
        None
    }
}

/// A request counted as pending (`upstream_rq_pending_active`, `max_pending_requests`) while
/// it waits for a connection.
pub struct Pending<'a> {
    stats: &'a ClusterStats,
    _held: Held,
}

impl<'a> Pending<'a> {
    pub fn start(cluster: &'a Cluster) -> Pending<'a> {
        cluster.stats.upstream_rq_pending_total.inc();
        cluster.stats.upstream_rq_pending_active.inc();
        Pending {
            stats: &cluster.stats,
            _held: Held::take(&cluster.resources, |r| &r.pending_requests),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.stats.upstream_rq_pending_active.dec();
    }
}

/// Envoy's checks before a request may join a pool: `max_requests`, then (when it would have
/// to wait for a connection) `max_pending_requests`. Both overflow as `upstream_rq_pending_overflow`.
fn overflowed(cluster: &Cluster) -> ResetReason {
    cluster.stats.upstream_rq_pending_overflow.inc();
    ResetReason::Overflow
}

/// A pool's key: host, HTTP/2 or not, and what keeps a stream's connections apart.
type PoolKey = (HostAddress, bool, PoolApart);

/// What a stream brings that its upstream connections must match (Envoy's pool hash).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PoolApart {
    /// The ALPN override the connections offer (`istio.alpn`).
    pub alpn: Option<Arc<[Vec<u8>]>>,
    /// The filter state objects shared with upstream (`istio_authn`'s principals, …).
    pub filter_state: Option<u64>,
}

/// One cluster's pools.
type ClusterPools = HashMap<PoolKey, Rc<HostPool>>;

/// Every cluster's pools, by cluster name.
type PoolMap = RefCell<HashMap<String, ClusterPools>>;

/// An ORIGINAL_DST host: its cluster and address.
type OriginalDstKey = (String, std::net::SocketAddr);

/// One worker's pools and balancer state, for every cluster.
#[derive(Default)]
pub struct WorkerUpstreams {
    /// Pools by cluster, then host address and protocol (clusters never share connections: their
    /// settings differ).
    pools: Rc<PoolMap>,
    lb: RefCell<HashMap<String, Rc<LbState>>>,
    /// ORIGINAL_DST hosts by cluster and address, with their last use.
    original_dst: RefCell<HashMap<OriginalDstKey, (Arc<Host>, Instant)>>,
    original_dst_swept: std::cell::Cell<Option<Instant>>,
}

impl WorkerUpstreams {
    /// The host a request or connection goes to: the balancer's choice, or for ORIGINAL_DST
    /// clusters the original destination (from the configured header, else the connection's
    /// restored local address). None is Envoy's "no healthy upstream".
    pub fn choose_host(
        &self,
        cluster: &Cluster,
        original_dst: Option<std::net::SocketAddr>,
        headers: Option<&http::HeaderMap>,
        pick: Pick<'_>,
    ) -> Option<Arc<Host>> {
        let Some(od) = &cluster.original_dst else {
            let lb = self.lb_state(&cluster.name);
            return cluster.choose(&lb, pick);
        };
        let from_header = od
            .http_header
            .as_ref()
            .and_then(|h| headers?.get(h))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<std::net::SocketAddr>().ok());
        let mut addr = from_header.or(original_dst)?;
        if let Some(p) = od.port_override {
            addr.set_port(p);
        }
        Some(self.original_dst_host(cluster, od.cleanup_interval, addr))
    }

    /// One host per original destination, kept while used and forgotten `cleanup_interval`
    /// after its last use (Envoy's host map for ORIGINAL_DST clusters).
    fn original_dst_host(
        &self,
        cluster: &Cluster,
        cleanup: std::time::Duration,
        addr: std::net::SocketAddr,
    ) -> Arc<Host> {
        let now = Instant::now();
        let mut hosts = self.original_dst.borrow_mut();
        let key = (cluster.name.clone(), addr);
        let host = match hosts.get_mut(&key) {
            Some((h, used)) => {
                *used = now;
                h.clone()
            }
            None => {
                let h = Arc::new(Host::original_dst(addr));
                hosts.insert(key, (h.clone(), now));
                h
            }
        };
        if self
            .original_dst_swept
            .get()
            .is_none_or(|at| at + cleanup <= now)
        {
            self.original_dst_swept.set(Some(now));
            hosts.retain(|_, (h, used)| Arc::strong_count(h) > 1 || *used + cleanup > now);
        }
        host
    }

    pub fn lb_state(&self, cluster: &str) -> Rc<LbState> {
        if let Some(s) = self.lb.borrow().get(cluster) {
            return s.clone();
        }
        self.lb
            .borrow_mut()
            .entry(cluster.to_string())
            .or_default()
            .clone()
    }

    /// The host's pool for this protocol; a new one takes a `max_connection_pools` slot.
    fn pool(
        &self,
        cluster: &Cluster,
        addr: &HostAddress,
        h2: bool,
        apart: PoolApart,
    ) -> Option<Rc<HostPool>> {
        let alpn = apart.alpn.clone();
        let key = (addr.clone(), h2, apart);
        if let Some(p) = self
            .pools
            .borrow()
            .get(&cluster.name)
            .and_then(|m| m.get(&key))
        {
            return Some(p.clone());
        }
        if !cluster.resources.connection_pools.can_create() {
            cluster.stats.upstream_cx_pool_overflow.inc();
            return None;
        }
        let pool = Rc::new(HostPool {
            alpn,
            _slot: Some(Held::take(&cluster.resources, |r| &r.connection_pools)),
            home: Some((
                Rc::downgrade(&self.pools),
                cluster.name.clone(),
                key.clone(),
            )),
            ..Default::default()
        });
        self.pools
            .borrow_mut()
            .entry(cluster.name.clone())
            .or_default()
            .insert(key, pool.clone());
        Some(pool)
    }

    /// Sends an upgrade request on a connection of its own (it becomes a tunnel, never pooled).
    pub async fn send_upgrade(
        &self,
        cluster: &Cluster,
        host: &Arc<Host>,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ResetReason> {
        let (io, held, local) = tcp(cluster, host, Alpn::Http1).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|_| ResetReason::ConnectionFailure(0))?;
        cluster.stats.upstream_cx_http1_total.inc();
        local.sent_one();
        track(
            &cluster.stats,
            host,
            conn.with_upgrades(),
            held,
            None,
            local.requests.clone(),
        );
        // Envoy counts an upstream request once it has a connection to go on.
        let _request = attach(cluster, host);
        let resp = sender.send_request(req).await.map_err(|e| classify(&e))?;
        Ok(with_local(resp, local))
    }

    /// Sends a request to `host`, over a pooled connection or a new one, within the cluster's
    /// circuit breakers.
    pub async fn send(
        &self,
        cluster: &Cluster,
        host: &Arc<Host>,
        h2: bool,
        req: Request<UpstreamBody>,
        attached: Option<&tokio::sync::Notify>,
        mut apart: PoolApart,
    ) -> Result<Response<PooledBody>, ResetReason> {
        if !cluster.resources.requests.can_create() {
            return Err(overflowed(cluster));
        }
        // An ALPN override only matters to TLS connections: plaintext hosts share one pool.
        if cluster.transport.for_host(host).is_none() {
            apart.alpn = None;
        }
        let Some(pool) = self.pool(cluster, &host.address, h2, apart) else {
            return Err(ResetReason::Overflow);
        };
        if h2 {
            let existing = pool.h2.borrow().clone().filter(|c| c.sender.is_ready());
            let mut sender = match existing {
                Some(s) => s,
                None => {
                    if !cluster.resources.pending_requests.can_create() {
                        return Err(overflowed(cluster));
                    }
                    // The request waits for a new connection: Envoy counts it as pending.
                    let _pending = Pending::start(cluster);
                    // Boxed: the connect path is rare and would otherwise size every send().
                    Box::pin(h2_connection(cluster, host, &pool)).await?
                }
            };
            let request = attach(cluster, host);
            if let Some(a) = attached {
                a.notify_one();
            }
            sender.local.sent_one();
            let resp = sender
                .sender
                .send_request(req)
                .await
                .map_err(|e| classify(&e))?;
            let resp = resp.map(|b| PooledBody {
                inner: b,
                give_back: None,
                _request: Some(request),
            });
            return Ok(with_local(resp, sender.local.clone()));
        }
        let (mut sender, used, local) = match pool.take_idle(cluster.idle_timeout) {
            Some(c) => (c.sender, c.used, c.local),
            None => {
                if !cluster.resources.pending_requests.can_create() {
                    return Err(overflowed(cluster));
                }
                let _pending = Pending::start(cluster);
                Box::pin(self.wait_for_h1(cluster, host, &pool)).await?
            }
        };
        let request = attach(cluster, host);
        if let Some(a) = attached {
            a.notify_one();
        }
        local.sent_one();
        let resp = sender.send_request(req).await.map_err(|e| classify(&e))?;
        let used = used + 1;
        let reuse = cluster.max_requests_per_connection.is_none_or(|m| used < m);
        let resp = with_local(resp, local.clone());
        let give_back = reuse.then(|| GiveBack {
            pool,
            sender,
            used,
            local,
        });
        Ok(resp.map(|b| PooledBody {
            inner: b,
            give_back,
            _request: Some(request),
        }))
    }

    /// A pending HTTP/1.1 request gets a connection: a new one when `max_connections` allows (or
    /// this pool has none at all, as Envoy always lets a pool open its first), else the next one
    /// this pool frees.
    async fn wait_for_h1(
        &self,
        cluster: &Cluster,
        host: &Arc<Host>,
        pool: &Rc<HostPool>,
    ) -> Result<(http1::SendRequest<UpstreamBody>, u32, UpstreamConn), ResetReason> {
        loop {
            if cluster.resources.connections.can_create() || pool.conns.get() == 0 {
                let (sender, local) = connect_h1(cluster, host, pool).await?;
                return Ok((sender, 0, local));
            }
            cluster.stats.upstream_cx_overflow.inc();
            let (tx, rx) = tokio::sync::oneshot::channel();
            pool.waiters.borrow_mut().push_back(tx);
            match rx.await {
                Ok(Slot::Ready(c)) if c.sender.is_ready() => {
                    return Ok((c.sender, c.used, c.local))
                }
                // A connection closed (or the one handed over died): try to open one.
                _ => continue,
            }
        }
    }
}

/// A request attached to a connection: counted against `max_requests` until its response ends.
/// The request has a connection to go on (Envoy's pool-ready: counted, and reported to the
/// outlier detector as a connect success).
fn attach(cluster: &Cluster, host: &Arc<Host>) -> Held {
    cluster.report_outlier(host, Report::ConnectSuccess);
    cluster.stats.upstream_rq_total.inc();
    host.stats.rq_total.fetch_add(1, Ordering::Relaxed);
    Held::take(&cluster.resources, |r| &r.requests)
}

fn classify(e: &hyper::Error) -> ResetReason {
    // A "user" error here is our request body failing: the downstream sent a body the codec
    // could not decode.
    if e.is_user() {
        ResetReason::DownstreamBody
    } else if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        ResetReason::ProtocolError
    } else if refused_stream(e) {
        ResetReason::RefusedStream
    } else {
        ResetReason::ConnectionTermination
    }
}

/// An HTTP/2 `REFUSED_STREAM` reset from the upstream.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// A connection to an upstream host: TCP, a Unix socket for `pipe` hosts, or TLS over TCP when
/// the host's transport socket says so.
pub enum HostStream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
    Tls(
        Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        Arc<crate::tls::info::TlsInfo>,
    ),
}

crate::listener::stream::delegate_read!(HostStream, Tcp, Unix, Tls);
crate::listener::stream::delegate_write!(HostStream, Tcp, Unix, Tls);

impl HostStream {
    /// The local address of a TCP connection (with or without TLS) and its TLS facts.
    pub fn facts(&self) -> UpstreamConn {
        match self {
            HostStream::Tcp(t) => UpstreamConn {
                local: t.local_addr().ok(),
                ..Default::default()
            },
            HostStream::Tls(t, info) => UpstreamConn {
                local: t.get_ref().0.local_addr().ok(),
                tls: Some(info.clone()),
                ..Default::default()
            },
            HostStream::Unix(_) => UpstreamConn::default(),
        }
    }
}

/// A connection before its transport socket.
enum Connected {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn connect(
    address: &HostAddress,
    bind: Option<std::net::SocketAddr>,
    keepalive: Option<&socket2::TcpKeepalive>,
) -> std::io::Result<Connected> {
    match address {
        HostAddress::Ip(a) => {
            let sock = if a.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            // `upstream_bind_config` (Istio binds inbound passthrough to 127.0.0.6).
            if let Some(b) = bind {
                sock.bind(b)?;
            }
            if let Some(k) = keepalive {
                socket2::SockRef::from(&sock).set_tcp_keepalive(k)?;
            }
            let s = sock.connect(*a).await?;
            let _ = s.set_nodelay(true);
            Ok(Connected::Tcp(s))
        }
        HostAddress::Pipe(p) => Ok(Connected::Unix(
            tokio::net::UnixStream::connect(p.as_ref()).await?,
        )),
    }
}

/// A connection for a pool, with its local address (none for a pipe).
async fn tcp(
    cluster: &Cluster,
    host: &Host,
    alpn: Alpn,
) -> Result<(TokioIo<HostStream>, Held, UpstreamConn), ResetReason> {
    connect_host(cluster, host, alpn).await.map(|(s, held)| {
        let conn = s.facts();
        (TokioIo::new(s), held, conn)
    })
}

/// A TCP proxy's connection to `host`, as Envoy's TCP pool gives it: a stream pending until its
/// own connection is up; refused when the cluster is at `max_connections` (no connection can be
/// shared) or at `max_pending_requests`.
pub async fn connect_tcp(
    cluster: &Cluster,
    host: &Host,
) -> Result<(HostStream, Held), ResetReason> {
    if !cluster.resources.pending_requests.can_create() {
        cluster.stats.upstream_rq_pending_overflow.inc();
        return Err(ResetReason::Overflow);
    }
    if !cluster.resources.connections.can_create() {
        cluster.stats.upstream_cx_overflow.inc();
        return Err(ResetReason::Overflow);
    }
    let _pending = Pending::start(cluster);
    connect_host(cluster, host, Alpn::None).await
}

/// Opens a connection to `host` within the cluster's `connect_timeout`, counting it; the
/// returned hold keeps it counted against `max_connections` until dropped.
pub async fn connect_host(
    cluster: &Cluster,
    host: &Host,
    alpn: Alpn,
) -> Result<(HostStream, Held), ResetReason> {
    let stats = &cluster.stats;
    let held = Held::take(&cluster.resources, |r| &r.connections);
    stats.upstream_cx_total.inc();
    host.stats.cx_total.fetch_add(1, Ordering::Relaxed);
    let failed = |reason| {
        stats.upstream_cx_connect_fail.inc();
        host.stats.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
        Err(reason)
    };
    // The connect timeout covers the TLS handshake too (Envoy's connection is up once the
    // transport socket is).
    let connecting = async {
        let s = connect(
            &host.address,
            cluster.upstream_bind,
            cluster.tcp_keepalive.as_ref(),
        )
        .await
        .map_err(|e| ResetReason::ConnectionFailure(e.raw_os_error().unwrap_or(0)))?;
        match (s, cluster.transport.for_host(host)) {
            (Connected::Tcp(t), Some(tls)) => {
                let peer = t
                    .peer_addr()
                    .map(|a| a.ip())
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
                tls.connect(t, alpn, peer)
                    .await
                    .map(|(s, info)| HostStream::Tls(Box::new(s), info))
                    .map_err(|e| ResetReason::Tls(crate::tls::TlsFailure::of(&e)))
            }
            (Connected::Tcp(t), None) => Ok(HostStream::Tcp(t)),
            (Connected::Unix(u), _) => Ok(HostStream::Unix(u)),
        }
    };
    let started = Instant::now();
    match tokio::time::timeout(cluster.connect_timeout, connecting).await {
        Ok(Ok(s)) => {
            stats
                .upstream_cx_connect_ms
                .record(started.elapsed().as_millis() as u64);
            Ok((s, held))
        }
        Ok(Err(reason)) => failed(reason),
        Err(_) => {
            stats.upstream_cx_connect_timeout.inc();
            failed(ResetReason::ConnectionTimeout)
        }
    }
}

/// Keeps `upstream_cx_active`/`upstream_cx_destroy` (cluster) and `cx_active` (host) right for
/// a connection task, holds its `max_connections` slot, and tells its pool when it closes.
fn track<F: std::future::Future + 'static>(
    stats: &ClusterStats,
    host: &Arc<Host>,
    conn: F,
    held: Held,
    pool: Option<Rc<HostPool>>,
    requests: Arc<std::sync::atomic::AtomicU64>,
) {
    let stats = stats.clone();
    let host = host.clone();
    stats.upstream_cx_active.inc();
    host.stats.cx_active.fetch_add(1, Ordering::Relaxed);
    let opened = Instant::now();
    tokio::task::spawn_local(async move {
        let _ = conn.await;
        stats
            .upstream_cx_length_ms
            .record(opened.elapsed().as_millis() as u64);
        stats
            .upstream_rq_per_cx
            .record(requests.load(Ordering::Relaxed));
        stats.upstream_cx_active.dec();
        stats.upstream_cx_destroy.inc();
        host.stats.cx_active.fetch_sub(1, Ordering::Relaxed);
        drop(held);
        if let Some(p) = pool {
            p.closed();
        }
    });
}

async fn connect_h1(
    cluster: &Cluster,
    host: &Arc<Host>,
    pool: &Rc<HostPool>,
) -> Result<(http1::SendRequest<UpstreamBody>, UpstreamConn), ResetReason> {
    let total = &cluster.stats.upstream_cx_http1_total;
    let alpn = pool.alpn.clone().map_or(Alpn::Http1, Alpn::Override);
    open_pooled(cluster, host, pool, total, alpn, |io| {
        http1::Builder::new().handshake(io)
    })
    .await
}

/// Opens one of the pool's connections with `handshake`, counted in the pool from the start (so
/// concurrent requests see it opening) and tracked until it closes.
async fn open_pooled<S, C, Fut>(
    cluster: &Cluster,
    host: &Arc<Host>,
    pool: &Rc<HostPool>,
    total: &crate::observe::stats::Counter,
    alpn: Alpn,
    handshake: impl FnOnce(TokioIo<HostStream>) -> Fut,
) -> Result<(S, UpstreamConn), ResetReason>
where
    Fut: std::future::Future<Output = Result<(S, C), hyper::Error>>,
    C: std::future::Future + 'static,
{
    pool.conns.set(pool.conns.get() + 1);
    let opened = async {
        let (io, held, local) = tcp(cluster, host, alpn).await?;
        let (sender, conn) = handshake(io)
            .await
            .map_err(|_| ResetReason::ConnectionFailure(0))?;
        Ok::<_, ResetReason>((sender, conn, held, local))
    }
    .await;
    match opened {
        Ok((sender, conn, held, local)) => {
            total.inc();
            track(
                &cluster.stats,
                host,
                conn,
                held,
                Some(pool.clone()),
                local.requests.clone(),
            );
            Ok((sender, local))
        }
        Err(e) => {
            pool.closed();
            Err(e)
        }
    }
}

/// What a request waiting on an opening HTTP/2 connection hears: the connection, the failure
/// every waiting request shares, or None when the opener went away (the waiter tries itself).
type H2Opened = Option<Result<H2Conn, ResetReason>>;

/// The pool's HTTP/2 connection once open: opened by the first request that needs it, the
/// others waiting for it.
async fn h2_connection(
    cluster: &Cluster,
    host: &Arc<Host>,
    pool: &Rc<HostPool>,
) -> Result<H2Conn, ResetReason> {
    loop {
        if let Some(s) = pool.h2.borrow().clone().filter(|c| c.sender.is_ready()) {
            return Ok(s);
        }
        if pool.h2_opening.get() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            pool.h2_waiters.borrow_mut().push(tx);
            match rx.await {
                Ok(Some(r)) => return r,
                // The opener was cancelled: try again (perhaps as the opener).
                Ok(None) | Err(_) => continue,
            }
        }
        /// Tells the waiters how the opening ended, or (dropped early) that it was abandoned.
        struct Opening<'a>(&'a HostPool, Option<H2Opened>);
        impl Drop for Opening<'_> {
            fn drop(&mut self) {
                self.0.h2_opening.set(false);
                let outcome = self.1.take().flatten();
                for w in self.0.h2_waiters.take() {
                    let _ = w.send(outcome.clone());
                }
                self.0.leave_if_idle();
            }
        }
        pool.h2_opening.set(true);
        let mut opening = Opening(pool, None);
        let r = connect_h2(cluster, host, pool).await;
        if let Ok(s) = &r {
            *pool.h2.borrow_mut() = Some(s.clone());
        }
        opening.1 = Some(Some(r.clone()));
        return r;
    }
}

async fn connect_h2(
    cluster: &Cluster,
    host: &Arc<Host>,
    pool: &Rc<HostPool>,
) -> Result<H2Conn, ResetReason> {
    let total = &cluster.stats.upstream_cx_http2_total;
    let alpn = pool.alpn.clone().map_or(Alpn::Http2, Alpn::Override);
    let (sender, local) = open_pooled(cluster, host, pool, total, alpn, |io| {
        http2::Builder::new(LocalExec).handshake(io)
    })
    .await?;
    Ok(H2Conn { sender, local })
}

struct GiveBack {
    pool: Rc<HostPool>,
    sender: http1::SendRequest<UpstreamBody>,
    used: u32,
    local: UpstreamConn,
}

/// An upstream response body that returns its HTTP/1.1 connection to the pool once the body has
/// been read to the end (a body dropped early closes the connection, as it must).
pub struct PooledBody {
    inner: Incoming,
    give_back: Option<GiveBack>,
    /// The request's `max_requests` slot, held until the response ends.
    _request: Option<Held>,
}

impl PooledBody {
    /// A body whose connection is not returned to any pool.
    pub fn unpooled(inner: Incoming) -> Self {
        PooledBody {
            inner,
            give_back: None,
            _request: None,
        }
    }

    fn finish(&mut self) {
        self._request = None;
        if let Some(g) = self.give_back.take() {
            g.pool.release(IdleH1 {
                sender: g.sender,
                since: Instant::now(),
                used: g.used,
                local: g.local,
            });
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => this.give_back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;

    /// `upstream_connection_options.tcp_keepalive` reaches the socket.
    #[tokio::test]
    async fn keepalive_is_set_on_upstream_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = HostAddress::Ip(l.local_addr().expect("addr"));
        let ka = socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(300))
            .with_interval(std::time::Duration::from_secs(7));
        let s = connect(&addr, None, Some(&ka)).await.expect("connect");
        let Connected::Tcp(s) = s else {
            panic!("an IP host gives a TCP stream")
        };
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            std::time::Duration::from_secs(300)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            std::time::Duration::from_secs(7)
        );
        let plain = connect(&addr, None, None).await.expect("connect");
        let Connected::Tcp(plain) = plain else {
            panic!("an IP host gives a TCP stream")
        };
        assert!(!socket2::SockRef::from(&plain)
            .keepalive()
            .expect("SO_KEEPALIVE"));
    }
}
