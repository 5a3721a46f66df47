//! The HTTP connection manager at run time: serves one downstream connection (HTTP/1.1 or h2c),
//! applies Envoy's request-header policies, routes, runs the filter chain and hands the request to
//! the router.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::body::RequestBody;
use hyper_util::rt::TokioIo;

use super::conn_manager_config::{Codec, HcmConfig, ServerHeader, UnderscoreAction};
use super::local_reply::LocalReply;
use super::local_reply_config::ReplyContext;
use super::stream_log::{PendingLog, ReplyFacts, StreamBody, StreamFacts, StreamOrigin};
use crate::http::stream_timeouts::IdleTimedBody;
use crate::listener::drain::ConnDrain;
use crate::listener::stream::{Accepted, Downstream, Prefixed};
use crate::router::route_config::{RouteAction, RouteInput};
use crate::upstream::pool::PooledBody;
use crate::worker::{LocalExec, WorkerCtx};
use petrel_filters::header_formatter::FormatContext;
use petrel_filters::http_filter::{
    FilterStatus, HttpFilter, RequestHead, ResponseHead, StreamInfo,
};

pub type ResponseBody = Either<Full<Bytes>, IdleTimedBody<PooledBody>>;

/// Headers Envoy removes from edge requests (external, with `use_remote_address`).
const EDGE_ONLY: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
];

/// Headers Envoy removes from every request that is not internal (`cleanInternalHeaders`).
const INTERNAL_ONLY: &[&str] = &[
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-ip-tags",
    "x-envoy-max-retries",
    "x-envoy-original-url",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
];

pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// The local address when `original_dst` restored it (the ORIGINAL_DST clusters' host).
    pub original_dst: Option<SocketAddr>,
    /// The SNI the listener filters read (`tls_inspector`).
    pub server_name: Option<Arc<str>>,
    /// The TLS Petrel terminated, when it did.
    pub tls: Option<Arc<crate::tls::info::TlsInfo>>,
    /// What the network filters set.
    pub filter_state: Arc<petrel_filters::filter_state::FilterState>,
    /// The downstream peer TCP metadata exchange found.
    pub mx_peer: Option<Arc<petrel_filters::workload_metadata::WorkloadMetadata>>,
    /// The codec answered a protocol error (the connection's `DPE`, for listener logs).
    pub codec_error: Cell<bool>,
}

impl ConnInfo {
    /// `%REQUESTED_SERVER_NAME%`: the SNI `tls_inspector` read (Envoy does not take it from
    /// the handshake it terminates).
    pub fn requested_server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or("")
    }
}

/// Serves one accepted connection until it closes.
/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one accepted connection until it closes: HTTP/1.1 with Petrel's codec, HTTP/2 with
/// hyper's, chosen by the codec setting (AUTO looks for the HTTP/2 preface, as Envoy does).
/// What a listener's access log reads of a finished connection.
#[derive(Default)]
pub struct ConnEnd {
    /// `HTTP/1.1` or `HTTP/2` once the codec is known (empty before, and after a protocol
    /// error, as Envoy's connection shows it).
    pub protocol: &'static str,
    /// `DPE` after a protocol error.
    pub flags: &'static str,
    pub tls: Option<Arc<crate::tls::info::TlsInfo>>,
    pub filter_state: Option<Arc<petrel_filters::filter_state::FilterState>>,
}

pub async fn serve(
    accepted: Accepted,
    info: ConnInfo,
    hcm: Arc<HcmConfig>,
    ctx: Rc<WorkerCtx>,
    drain: ConnDrain,
) -> ConnEnd {
    let mut end = ConnEnd::default();
    hcm.stats.downstream_cx_total.inc();
    hcm.stats.downstream_cx_active.inc();
    let opened = Instant::now();
    let tls = accepted.is_tls();
    if tls {
        hcm.stats.downstream_cx_ssl_total.inc();
        hcm.stats.downstream_cx_ssl_active.inc();
    }
    // Connections still open when the listener's drain time is over are closed.
    let filters = accepted.filters.clone();
    tokio::select! {
        _ = async {
            if let Some(crate::listener::stream::Outcome::Up(mut up)) = accepted.establish().await {
                // Istio's TCP metadata exchange ahead of the connection manager: the peer it
                // learns is every stream's downstream peer unless headers say otherwise.
                let mx_peer = match crate::network::metadata_exchange(&filters) {
                    Some(mx) => {
                        let alpn = up.tls.as_ref().map_or("", |t| t.alpn.as_str());
                        mx.exchange(&mut up.stream, &mut up.initial, alpn).await
                    }
                    None => None,
                };
                end.tls = up.tls.clone();
                end.filter_state = Some(up.filter_state.clone());
                let info = ConnInfo {
                    tls: up.tls,
                    filter_state: up.filter_state,
                    mx_peer,
                    ..info
                };
                let (protocol, codec_error) =
                    serve_codec(up.stream, up.initial, info, &hcm, ctx, &drain).await;
                (end.protocol, end.flags) = if codec_error {
                    ("", "DPE")
                } else {
                    (protocol, "")
                };
            }
        } => {}
        _ = drain.finished() => {}
    }
    hcm.stats
        .downstream_cx_length_ms
        .record(opened.elapsed().as_millis() as u64);
    hcm.stats.downstream_cx_active.dec();
    if tls {
        hcm.stats.downstream_cx_ssl_active.dec();
    }
    end
}

/// Serves the connection with the codec it speaks; returns Envoy's name for that protocol.
async fn serve_codec(
    mut stream: Downstream,
    mut initial: bytes::BytesMut,
    info: ConnInfo,
    hcm: &Arc<HcmConfig>,
    ctx: Rc<WorkerCtx>,
    drain: &ConnDrain,
) -> (&'static str, bool) {
    use tokio::io::AsyncReadExt;
    let _ = stream.tcp().set_nodelay(true);
    let info = Rc::new(info);
    let conn = info.clone();
    initial.reserve(16 * 1024);
    let h2 = match hcm.codec {
        Codec::Http2 => true,
        Codec::Http1 => false,
        Codec::Auto => {
            // Read until the bytes can no longer be the preface (or are all of it).
            loop {
                let n = initial.len().min(H2_PREFACE.len());
                if initial[..n] != H2_PREFACE[..n] {
                    break false;
                }
                if n == H2_PREFACE.len() {
                    break true;
                }
                match stream.read_buf(&mut initial).await {
                    Ok(0) | Err(_) => return ("", false),
                    Ok(_) => {}
                }
            }
        }
    };
    if h2 {
        hcm.stats.downstream_cx_http2_total.inc();
        serve_h2(
            Prefixed::new(stream, initial.freeze()),
            info,
            hcm,
            ctx,
            drain,
        )
        .await;
        ("HTTP/2", conn.codec_error.get())
    } else {
        hcm.stats.downstream_cx_http1_total.inc();
        super::h1::conn::serve(stream, initial, info, hcm.clone(), ctx, drain).await;
        ("HTTP/1.1", conn.codec_error.get())
    }
}

async fn serve_h2(
    io: Prefixed<Downstream>,
    info: Rc<ConnInfo>,
    hcm: &Arc<HcmConfig>,
    ctx: Rc<WorkerCtx>,
    drain: &ConnDrain,
) {
    let h = hcm.clone();
    let idle = Rc::new(ConnIdle {
        active: Cell::new(0),
        last: Cell::new(tokio::time::Instant::now()),
    });
    let idle_svc = idle.clone();
    // A draining listener's HTTP/2 connection gets GOAWAY once a stream ends while the drain
    // says to close (Envoy's `drainClose()` check on stream completion).
    let goaway = Rc::new(tokio::sync::Notify::new());
    let (goaway_svc, drain_svc) = (goaway.clone(), drain.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (hcm, ctx, info, idle) = (h.clone(), ctx.clone(), info.clone(), idle_svc.clone());
        let (goaway, drain) = (goaway_svc.clone(), drain_svc.clone());
        let fut = async move {
            idle.active.set(idle.active.get() + 1);
            let resp = handle(req.map(RequestBody::H2), &hcm, &ctx, &info).await;
            idle.active.set(idle.active.get() - 1);
            idle.last.set(tokio::time::Instant::now());
            if drain.should_close() {
                goaway.notify_one();
            }
            Ok::<_, Infallible>(resp)
        };
        // The request's future is ~11 KB; boxed once, hyper's per-stream task holds a pointer
        // instead of copying the whole state into and out of the task cell.
        Box::pin(fut)
    });
    let conn = hyper::server::conn::http2::Builder::new(LocalExec)
        .max_header_list_size(hcm.max_request_headers_kb * 1024)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = idle.expired(hcm.idle_timeout), if !shutting_down => {
                // Envoy closes a connection with no active streams after idle_timeout.
                hcm.stats.downstream_cx_idle_timeout.inc();
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            _ = goaway.notified(), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
    };
    if result.is_err() {
        hcm.stats.downstream_cx_protocol_error.inc();
    }
}

/// Envoy's answer to a request its HTTP/1.1 codec cannot accept: counted as a request, sent
/// through the local-reply path, and the connection closed.
pub fn codec_error_response(
    hcm: &HcmConfig,
    info: &ConnInfo,
    e: &super::h1::head::HeadError,
) -> Response<StreamBody> {
    let (status, body, details) = e.reply();
    info.codec_error.set(true);
    let start = Instant::now();
    let stats = &hcm.stats;
    stats.downstream_rq_total.inc();
    stats.downstream_rq_http1_total.inc();
    let start_time = SystemTime::now();
    let form = ReplyForm {
        grpc: false,
        h2: false,
        remote: info.remote,
        local: info.local,
        start_time,
    };
    let mut r = LocalReply::new(status, body, "DPE", details);
    r.headers
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    let resp = local_response(hcm, &r, form, None);
    stats.response_class(resp.status().as_u16());
    hcm.listener_stats.response_class(resp.status().as_u16());
    stats.downstream_rq_completed.inc();
    hcm.listener_stats.downstream_rq_completed.inc();
    let facts = hcm.observes_streams().then(StreamFacts::default);
    with_log(hcm, resp, facts, info, start, start_time, false, None)
}

/// The response with its access log (when the connection manager has any) and its span (when
/// it traces), both written once the stream ends.
#[allow(clippy::too_many_arguments)]
fn with_log(
    hcm: &HcmConfig,
    resp: Response<ResponseBody>,
    facts: Option<StreamFacts>,
    info: &ConnInfo,
    start: Instant,
    start_time: SystemTime,
    h2: bool,
    trace: Option<super::stream_log::PendingSpan>,
) -> Response<StreamBody> {
    let log = facts.map(|facts| {
        Box::new(PendingLog {
            trace,
            logs: hcm.access_logs.clone(),
            istio_stats: hcm.istio_stats.clone(),
            grpc_stats: hcm.grpc_stats.clone(),
            facts,
            origin: StreamOrigin {
                start,
                start_time,
                remote: info.remote,
                direct_remote: info.remote,
                local: info.local,
                protocol: if h2 { "HTTP/2" } else { "HTTP/1.1" },
                tls: info.tls.clone(),
                server_name: info.requested_server_name().to_string(),
                filter_state: info.filter_state.clone(),
            },
            response_headers: resp.headers().clone(),
            status: resp.status().as_u16(),
            reply: resp.extensions().get::<ReplyFacts>().copied(),
        })
    });
    resp.map(|b| StreamBody::new(b, log))
}

/// Per-connection idle tracking for `common_http_protocol_options.idle_timeout`.
struct ConnIdle {
    active: Cell<usize>,
    last: Cell<tokio::time::Instant>,
}

impl ConnIdle {
    async fn expired(&self, timeout: Option<std::time::Duration>) {
        let Some(t) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let deadline = self.last.get() + t;
            if self.active.get() == 0 && tokio::time::Instant::now() >= deadline {
                return;
            }
            if self.active.get() > 0 {
                // A stream is open: look again one idle period later.
                tokio::time::sleep(t).await;
            } else {
                tokio::time::sleep_until(deadline).await;
            }
        }
    }
}

/// An HTTP/1.1 WebSocket upgrade request (`connection: upgrade` + `upgrade: websocket`).
fn is_websocket_upgrade(h: &HeaderMap) -> bool {
    let conn_upgrade = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    conn_upgrade
        && h.get(http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// How a local reply must be shaped for the request it answers, and the stream facts that
/// `local_reply_config` formats may read.
#[derive(Clone, Copy, Debug)]
pub struct ReplyForm {
    pub grpc: bool,
    pub h2: bool,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub start_time: SystemTime,
}

/// Turns a local reply into the response sent downstream.
pub fn local_response(
    hcm: &HcmConfig,
    reply: &LocalReply,
    form: ReplyForm,
    request_headers: Option<&HeaderMap>,
) -> Response<ResponseBody> {
    let mapped;
    let reply = if hcm.local_reply.is_empty() {
        reply
    } else {
        let mut r = reply.clone();
        let format = FormatContext {
            downstream_remote: form.remote,
            downstream_local: form.local,
            protocol: if form.h2 { "HTTP/2" } else { "HTTP/1.1" },
            request_headers,
            upstream: None,
            start_time: form.start_time,
        };
        hcm.local_reply.apply(
            &mut r,
            &ReplyContext {
                request_headers,
                format: &format,
            },
        );
        mapped = r;
        &mapped
    };
    let (status, headers, body) = if form.grpc {
        reply.render_grpc()
    } else {
        reply.render()
    };
    let mut resp = Response::new(Either::Left(Full::new(body)));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    apply_server_header(hcm, resp.headers_mut());
    if hcm.observes_streams() {
        resp.extensions_mut().insert(ReplyFacts {
            flag: reply.flag,
            details: reply.details,
        });
    }
    resp
}

/// `server_name` with `server_header_transformation`.
pub fn apply_server_header(hcm: &HcmConfig, h: &mut HeaderMap) {
    match hcm.server_header {
        ServerHeader::Overwrite => {
            h.insert(http::header::SERVER, hcm.server_name.clone());
        }
        ServerHeader::AppendIfAbsent => {
            if !h.contains_key(http::header::SERVER) {
                h.insert(http::header::SERVER, hcm.server_name.clone());
            }
        }
        ServerHeader::PassThrough => {}
    }
}

/// Whether a peer is internal: Envoy 1.40 counts only the `internal_address_config` ranges.
fn is_internal(hcm: &HcmConfig, addr: &SocketAddr) -> bool {
    hcm.internal_cidrs.iter().any(|c| c.contains(addr.ip()))
}

/// Handles one request from either codec, keeping the connection manager's stats; the response
/// body writes the access logs when the stream ends.
pub async fn handle(
    req: Request<RequestBody>,
    hcm: &HcmConfig,
    ctx: &Rc<WorkerCtx>,
    info: &ConnInfo,
) -> Response<StreamBody> {
    let start = Instant::now();
    let start_time = SystemTime::now();
    let stats = &hcm.stats;
    stats.downstream_rq_total.inc();
    stats.downstream_rq_active.inc();
    let h2 = req.version() == http::Version::HTTP_2;
    if h2 {
        stats.downstream_rq_http2_total.inc();
    } else {
        stats.downstream_rq_http1_total.inc();
    }
    let (req, facts) = if !hcm.observes_streams() {
        (req, None)
    } else {
        let mut f = StreamFacts {
            method: Some(req.method().clone()),
            ..Default::default()
        };
        let received = f.received.clone();
        let mut req = req.map(|b| b.counted(received));
        if let Some(gs) = &hcm.grpc_stats {
            f.grpc = gs.start(req.headers(), req.uri().path());
            if let Some(g) = &f.grpc {
                let inspector = super::grpc_stats::FrameInspector::new(g.request.clone());
                req = req.map(|b| super::body::RequestBody::GrpcCounted(Box::new(b), inspector));
            }
        }
        (req, Some(RefCell::new(f)))
    };
    let mut encoders = Vec::new();
    let mut trace = None;
    let resp = process(
        req,
        hcm,
        ctx,
        info,
        Began { start, start_time },
        facts.as_ref(),
        &mut encoders,
        &mut trace,
    )
    .await;
    let status = resp.status().as_u16();
    stats.response_class(status);
    hcm.listener_stats.response_class(status);
    stats.downstream_rq_completed.inc();
    hcm.listener_stats.downstream_rq_completed.inc();
    stats.downstream_rq_active.dec();
    let facts = facts.map(RefCell::into_inner);
    if let Some(g) = facts.as_ref().and_then(|f| f.grpc.as_ref()) {
        // Sees the response body as it leaves, after the other encoders.
        encoders.push(Box::new(super::grpc_stats::FrameInspector::new(
            g.response.clone(),
        )));
    }
    let trace = trace.map(|t| super::stream_log::PendingSpan {
        trace: t,
        ctx: ctx.clone(),
    });
    let mut resp = with_log(hcm, resp, facts, info, start, start_time, h2, trace);
    resp.body_mut().encode_with(encoders);
    resp.body_mut()
        .time_with(start, hcm.stats.downstream_rq_time.clone());
    resp
}

/// A local reply to a request that ends before routing; the access log keeps its headers.
fn early_reply(
    hcm: &HcmConfig,
    reply: &LocalReply,
    form: ReplyForm,
    req: Request<RequestBody>,
    facts: Option<&RefCell<StreamFacts>>,
) -> Response<ResponseBody> {
    let resp = local_response(hcm, reply, form, Some(req.headers()));
    if let Some(f) = facts {
        f.borrow_mut().note_request(req);
    }
    resp
}

/// When a stream began.
struct Began {
    start: Instant,
    start_time: SystemTime,
}

/// `encoders`: what the encoder filters ask to do to the response body, in encoding order;
/// `trace`: the stream's span, to finish when the stream ends.
#[allow(clippy::too_many_arguments)]
async fn process(
    mut req: Request<RequestBody>,
    hcm: &HcmConfig,
    ctx: &Rc<WorkerCtx>,
    info: &ConnInfo,
    began: Began,
    facts: Option<&RefCell<StreamFacts>>,
    encoders: &mut Vec<Box<dyn petrel_filters::http_filter::BodyEncoder>>,
    trace: &mut Option<crate::observe::tracing::ActiveTrace>,
) -> Response<ResponseBody> {
    let Began { start, start_time } = began;
    let h2 = req.version() == http::Version::HTTP_2;
    let mut form = ReplyForm {
        grpc: crate::http::local_reply::is_grpc(req.headers()),
        h2,
        remote: info.remote,
        local: info.local,
        start_time,
    };
    // Envoy's HTTP/1 codec refuses HTTP/1.0 unless accept_http_10 is set (which is refused).
    if req.version() == http::Version::HTTP_10 || req.version() == http::Version::HTTP_09 {
        return early_reply(
            hcm,
            &LocalReply::new(
                StatusCode::UPGRADE_REQUIRED,
                "Upgrade Required",
                "",
                "low_version",
            ),
            form,
            req,
            facts,
        );
    }
    let upgrade = is_websocket_upgrade(req.headers());
    // Header count and underscore policies.
    if req.headers().len() > hcm.max_headers_count as usize {
        return early_reply(
            hcm,
            &LocalReply::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                Bytes::new(),
                "DPE",
                "too_many_headers",
            ),
            form,
            req,
            facts,
        );
    }
    if hcm.underscores != UnderscoreAction::Allow {
        let bad: Vec<HeaderName> = req
            .headers()
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .cloned()
            .collect();
        if !bad.is_empty() {
            if hcm.underscores == UnderscoreAction::RejectRequest {
                return early_reply(
                    hcm,
                    &LocalReply::new(
                        StatusCode::BAD_REQUEST,
                        Bytes::new(),
                        "DPE",
                        "unexpected_underscore",
                    ),
                    form,
                    req,
                    facts,
                );
            }
            for k in bad {
                req.headers_mut().remove(k);
            }
        }
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mut path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let fragment = req
        .extensions()
        .get::<super::h1::FragmentInPath>()
        .is_some()
        && ctx.snapshot().runtime.reject_path_with_fragment;
    if fragment || !hcm.path_policy.is_noop() {
        use super::path_normalization::PathOutcome;
        let outcome = if fragment {
            PathOutcome::Reject
        } else {
            hcm.path_policy.apply(&path)
        };
        match outcome {
            PathOutcome::Continue(p) => path = p,
            PathOutcome::Reject => {
                return early_reply(
                    hcm,
                    &LocalReply::new(
                        StatusCode::BAD_REQUEST,
                        Bytes::new(),
                        "",
                        "path_normalization_failed",
                    ),
                    form,
                    req,
                    facts,
                );
            }
            PathOutcome::Redirect(p) => {
                let mut r = LocalReply::new(
                    StatusCode::TEMPORARY_REDIRECT,
                    Bytes::new(),
                    "",
                    "path_normalization_redirect",
                );
                if let Ok(v) = HeaderValue::from_str(&p) {
                    r.headers.insert(http::header::LOCATION, v);
                }
                return early_reply(hcm, &r, form, req, facts);
            }
        }
    }

    // Remote address, x-forwarded-for, x-forwarded-proto, sanitising.
    let connection_scheme = if info.tls.is_some() { "https" } else { "http" };
    let headers = req.headers_mut();
    let xff = HeaderName::from_static("x-forwarded-for");
    let external;
    if hcm.use_remote_address {
        external = !is_internal(hcm, &info.remote);
        if !hcm.skip_xff_append {
            // Envoy appends its own address, not the peer's, when the peer is on loopback.
            let appended = if info.remote.ip().is_loopback() {
                hcm.local_address
            } else {
                info.remote.ip()
            };
            let ip = appended.to_string();
            let v = match headers.get(&xff).and_then(|v| v.to_str().ok()) {
                Some(prev) if !prev.is_empty() => format!("{prev},{ip}"),
                _ => ip,
            };
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(xff.clone(), v);
            }
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(connection_scheme),
        );
    } else {
        external = false;
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert(
                HeaderName::from_static("x-forwarded-proto"),
                HeaderValue::from_static(connection_scheme),
            );
        }
    }
    crate::http::header_scan::remove_names(headers, &["x-envoy-internal"]);
    // Without use_remote_address Envoy takes the client address from x-forwarded-for, skipping
    // xff_num_trusted_hops entries from the right.
    let remote = if hcm.use_remote_address {
        info.remote
    } else {
        headers
            .get(&xff)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').nth(hcm.xff_num_trusted_hops as usize))
            .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 0))
            .unwrap_or(info.remote)
    };
    form.remote = remote;
    // Internal: the peer (use_remote_address) or a lone x-forwarded-for entry is in
    // internal_address_config.
    let internal = if hcm.use_remote_address {
        !external
    } else {
        let single_xff = headers
            .get(&xff)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.contains(','));
        single_xff && remote != info.remote && is_internal(hcm, &remote)
    };
    if internal {
        headers.insert(
            HeaderName::from_static("x-envoy-internal"),
            HeaderValue::from_static("true"),
        );
    }
    if external {
        crate::http::header_scan::remove_names(headers, EDGE_ONLY);
        if let Ok(v) = HeaderValue::from_str(&info.remote.ip().to_string()) {
            headers.insert(HeaderName::from_static("x-envoy-external-address"), v);
        }
    }
    // Whatever is not internal may not steer Envoy (retries, timeouts, tracing).
    if !internal {
        crate::http::header_scan::remove_names(headers, INTERNAL_ONLY);
    }
    hcm.client_cert.apply(headers, info.tls.as_deref());
    let rid = HeaderName::from_static("x-request-id");
    if hcm.generate_request_id
        && (!headers.contains_key(&rid) || (external && !hcm.preserve_external_request_id))
    {
        if let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
            headers.insert(rid.clone(), v);
        }
    }

    let snapshot = ctx.snapshot();
    let routes = hcm.route_table(&snapshot);
    if !internal {
        for h in &routes.internal_only_headers {
            req.headers_mut().remove(h);
        }
    }
    let scheme = if hcm.use_remote_address {
        connection_scheme
    } else {
        req.headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(connection_scheme)
    }
    .to_string();
    // A virtual host that requires TLS redirects plain requests to https before any route
    // matches (Envoy's SSL redirect route).
    if let Some(vh) = routes
        .any_require_tls
        .then(|| routes.virtual_host(&host))
        .flatten()
    {
        use crate::router::route_config::RequireTls;
        let secure = req
            .headers()
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
        let redirect = !secure
            && match vh.require_tls {
                RequireTls::All => true,
                RequireTls::ExternalOnly => !internal,
                RequireTls::None => false,
            };
        if redirect {
            let mut r = LocalReply::new(
                StatusCode::MOVED_PERMANENTLY,
                Bytes::new(),
                "",
                "direct_response",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{path}")) {
                r.headers.insert(http::header::LOCATION, v);
            }
            return early_reply(hcm, &r, form, req, facts);
        }
    }
    let draw = rand::random_range(0..1_000_000u64);
    let method = req.method().clone();
    let selected = routes.route(&RouteInput {
        host: &host,
        path: &path,
        headers: req.headers(),
        method: &method,
        scheme: &scheme,
        draw,
    });
    if let Some(f) = facts {
        let mut f = f.borrow_mut();
        f.path.clone_from(&path);
        f.authority.clone_from(&host);
        f.scheme.clone_from(&scheme);
        f.downstream_remote = Some(remote);
        f.route_name = selected
            .map(|(_, r)| r.name.clone())
            .filter(|n| !n.is_empty());
    }
    // Tracing decides once the route is known (its `tracing` overrides the sampling).
    let mut decorated = None;
    if let Some(tc) = &hcm.tracing {
        let route = selected.map(|(_, r)| r);
        let reason = tc.decide(req.headers_mut(), route.and_then(|r| r.tracing.as_ref()));
        let decorator = route.and_then(|r| r.decorator.as_ref());
        let (span, op) = tc.start(req.headers_mut(), &host, reason, decorator, start_time);
        decorated = op;
        *trace = span.map(|span| crate::observe::tracing::ActiveTrace {
            span,
            config: tc.clone(),
            route_tags: route
                .and_then(|r| r.tracing.as_ref())
                .map(|t| t.custom_tags.clone())
                .unwrap_or_default(),
        });
    }
    let request_id = req.headers().get(&rid).cloned();
    // Envoy hands a forced trace's id back to the caller.
    let force_trace = req.headers().contains_key("x-envoy-force-trace");
    // The HTTP filter chain: decoders in order, then the router (the route was chosen before the
    // chain ran, as Envoy caches it), then encoders in reverse order on whatever answers.
    let peer = info.tls.as_ref().and_then(|t| t.peer.as_ref());
    let stream_info = StreamInfo {
        downstream_remote: remote,
        downstream_local: info.local,
        protocol: if h2 { "HTTP/2" } else { "HTTP/1.1" },
        start_time,
        downstream_direct_remote: info.remote,
        requested_server_name: info.requested_server_name(),
        peer: peer.map(|p| petrel_filters::http_filter::PeerCert {
            uri_sans: &p.uri_sans,
            dns_sans: &p.dns_sans,
            subject: &p.subject,
        }),
        scheme: &scheme,
        authority: &host,
        filter_state: &info.filter_state,
    };
    let mut chain: Vec<Box<dyn HttpFilter>> = hcm.filters.iter().map(|f| f.create()).collect();
    let end_stream = http_body::Body::is_end_stream(req.body());
    let mut filter_reply = None;
    let mut upstream_alpn = None;
    let mut dynamic_metadata = petrel_filters::http_filter::DynamicMetadata::new();
    // The weighted cluster is chosen with the route, before the filters run (a fault's
    // `upstream_cluster` sees it), as Envoy's route entry does.
    let weighted_draw = rand::random::<u64>();
    let header_cluster = selected.and_then(|(_, route)| route.header_cluster(req.headers()));
    let route_cluster = selected.and_then(|(_, route)| {
        header_cluster
            .as_deref()
            .or_else(|| route.cluster_name(weighted_draw))
    });
    let cluster_istio = route_cluster
        .filter(|_| hcm.reads_cluster_istio)
        .and_then(|c| snapshot.clusters.get(c))
        .and_then(|c| c.istio.as_deref());
    let route_info = selected.map(|(vh, route)| petrel_filters::http_filter::RouteInfo {
        cluster: route_cluster,
        cluster_istio,
        configs: [&route.per_filter, &vh.per_filter],
    });
    let mut peers = petrel_filters::http_filter::StreamPeers {
        downstream: info.mx_peer.clone(),
        upstream: None,
    };
    for filter in chain.iter_mut() {
        let mut head = RequestHead {
            method: &method,
            path: &path,
            headers: req.headers_mut(),
            info: &stream_info,
            route: route_info,
            upstream_alpn: &mut upstream_alpn,
            dynamic_metadata: &mut dynamic_metadata,
            peers: &mut peers,
        };
        let mut status = filter.decode_headers(&mut head, end_stream);
        // A fault delay holds the request, then the filter says how it goes on.
        while let FilterStatus::Pause(d) = status {
            tokio::time::sleep(d).await;
            status = filter.resume(&mut head);
        }
        if let FilterStatus::LocalReply(r) = status {
            filter_reply = Some(LocalReply::from(*r));
            break;
        }
    }
    if let Some(f) = facts {
        if !dynamic_metadata.is_empty() {
            f.borrow_mut().dynamic_metadata = std::mem::take(&mut dynamic_metadata);
        }
    }
    let keep_headers = |req: &mut Request<RequestBody>| {
        if let Some(f) = facts {
            f.borrow_mut().request_headers = Some(std::mem::take(req.headers_mut()));
        }
    };
    let mut resp = match (filter_reply, selected) {
        (Some(r), _) => {
            let resp = local_response(hcm, &r, form, Some(req.headers()));
            keep_headers(&mut req);
            resp
        }
        (None, None) => {
            hcm.stats.no_route.inc();
            let resp = local_response(
                hcm,
                &LocalReply::route_not_found(),
                form,
                Some(req.headers()),
            );
            keep_headers(&mut req);
            resp
        }
        (None, Some((vh, route))) => {
            if let Some(t) = trace.as_ref() {
                t.span.inject(req.headers_mut());
            }
            let routed = Routed {
                hcm,
                ctx,
                info,
                remote,
                form,
                upgrade,
                snapshot: &snapshot,
                h2,
                start,
                start_time,
                weighted_draw,
                header_cluster: header_cluster.clone(),
                facts,
                upstream_alpn: upstream_alpn.clone(),
            };
            routed
                .respond(req, vh, route, &routes, &scheme, &host, &path)
                .await
        }
    };
    // A response to HEAD has no body whatever the upstream's headers say.
    let end_stream = http_body::Body::is_end_stream(resp.body()) || method == http::Method::HEAD;
    for filter in chain.iter_mut().rev() {
        let mut status = resp.status();
        let mut head = ResponseHead {
            status: &mut status,
            headers: resp.headers_mut(),
            info: &stream_info,
            end_stream,
            peers: &mut peers,
            cluster: route_cluster,
            cluster_istio,
        };
        if let FilterStatus::LocalReply(r) = filter.encode_headers(&mut head) {
            resp = local_response(hcm, &LocalReply::from(*r), form, None);
            break;
        }
        *resp.status_mut() = status;
    }
    if let Some(f) = facts {
        f.borrow_mut().peers = peers;
    }
    encoders.extend(
        chain
            .iter_mut()
            .rev()
            .filter_map(|f| f.response_body_encoder()),
    );
    if let Some(bps) = chain
        .iter()
        .filter_map(|f| f.response_bytes_per_second())
        .min()
    {
        if let Either::Right(body) = resp.body_mut() {
            body.throttle(bps);
        }
    }
    if let Some(tc) = &hcm.tracing {
        tc.on_response(
            resp.headers_mut(),
            trace.as_mut().map(|t| &mut t.span),
            decorated.as_deref(),
        );
    }
    if hcm.always_set_request_id_in_response || force_trace {
        if let Some(id) = request_id {
            resp.headers_mut().insert(rid, id);
        }
    }
    resp
}

/// What answering a routed request needs from the connection manager.
struct Routed<'a> {
    hcm: &'a HcmConfig,
    ctx: &'a Rc<WorkerCtx>,
    info: &'a ConnInfo,
    remote: SocketAddr,
    form: ReplyForm,
    upgrade: bool,
    snapshot: &'a Arc<crate::config::snapshot::Snapshot>,
    h2: bool,
    start: Instant,
    start_time: SystemTime,
    weighted_draw: u64,
    header_cluster: Option<String>,
    facts: Option<&'a RefCell<StreamFacts>>,
    upstream_alpn: Option<Arc<petrel_filters::http_filter::UpstreamAlpn>>,
}

impl Routed<'_> {
    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &self,
        req: Request<RequestBody>,
        vh: &crate::router::route_config::VirtualHost,
        route: &crate::router::route_config::Route,
        routes: &crate::router::route_config::RouteTable,
        scheme: &str,
        host: &str,
        path: &str,
    ) -> Response<ResponseBody> {
        let (hcm, form) = (self.hcm, self.form);
        // An upgrade the listener does not allow is refused once routed (so route response
        // headers still apply), as Envoy's router does.
        let refused_upgrade = self.upgrade && !hcm.websocket;
        if let (Some(f), false) = (
            self.facts,
            matches!(route.action, RouteAction::Forward(_)) && !refused_upgrade,
        ) {
            // A local answer: the access log sees the request as it is.
            f.borrow_mut().request_headers = Some(req.headers().clone());
        }
        let mut resp = match &route.action {
            _ if refused_upgrade => {
                hcm.stats.downstream_rq_ws_on_non_ws_route.inc();
                let mut r =
                    LocalReply::new(StatusCode::FORBIDDEN, Bytes::new(), "", "upgrade_failed");
                r.headers
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                local_response(hcm, &r, form, Some(req.headers()))
            }
            RouteAction::Direct { status, body } => {
                hcm.stats.rq_direct_response.inc();
                let mut r = LocalReply::new(
                    *status,
                    body.clone().unwrap_or_default(),
                    "",
                    "direct_response",
                );
                // Envoy says where a 201 created the resource: the request's own URL.
                if *status == StatusCode::CREATED {
                    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{path}")) {
                        r.headers.insert(http::header::LOCATION, v);
                    }
                }
                local_response(hcm, &r, form, Some(req.headers()))
            }
            RouteAction::Redirect(rd) => {
                // Envoy counts route redirects as direct responses.
                hcm.stats.rq_direct_response.inc();
                let location = redirect_location(rd, scheme, host, path, route.matched_prefix());
                let mut r = LocalReply::new(rd.status, Bytes::new(), "", "direct_response");
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers.insert(http::header::LOCATION, v);
                }
                local_response(hcm, &r, form, Some(req.headers()))
            }
            RouteAction::Forward(fwd) => {
                let input = crate::router::upstream_request::Forward {
                    hcm,
                    ctx: self.ctx,
                    info: self.info,
                    remote: self.remote,
                    form,
                    upgrade: self.upgrade,
                    snapshot: self.snapshot,
                    routes,
                    vh,
                    route,
                    fwd,
                    path,
                    h2: self.h2,
                    start: self.start,
                    start_time: self.start_time,
                    weighted_draw: self.weighted_draw,
                    header_cluster: self.header_cluster.clone(),
                    facts: self.facts,
                    upstream_alpn: self.upstream_alpn.clone(),
                };
                crate::router::upstream_request::forward(req, input).await
            }
        };
        // Response header mutations: route, then virtual host, then route configuration.
        let chosen = resp
            .extensions()
            .get::<crate::router::upstream_request::ChosenHost>()
            .map(|c| c.0.clone());
        let fctx = FormatContext {
            downstream_remote: self.remote,
            downstream_local: self.info.local,
            protocol: if self.h2 { "HTTP/2" } else { "HTTP/1.1" },
            request_headers: None,
            upstream: chosen
                .as_ref()
                .map(|h| petrel_filters::header_formatter::UpstreamInfo {
                    address: &h.address,
                    metadata: h.metadata.as_ref(),
                }),
            start_time: self.start_time,
        };
        let levels = [
            &route.response_headers,
            &vh.response_headers,
            &routes.response_headers,
        ];
        if routes.most_specific_header_mutations_wins {
            for m in levels.iter().rev() {
                m.apply(resp.headers_mut(), &fctx);
            }
        } else {
            for m in levels {
                m.apply(resp.headers_mut(), &fctx);
            }
        }
        resp
    }
}

fn redirect_location(
    rd: &crate::router::route_config::RedirectAction,
    scheme: &str,
    host: &str,
    path: &str,
    matched_prefix: Option<&str>,
) -> String {
    let scheme = rd.scheme.as_deref().unwrap_or(scheme);
    let (mut hostname, mut port) = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') => {
            (h.to_string(), Some(p.to_string()))
        }
        _ => (host.to_string(), None),
    };
    if let Some(h) = &rd.host {
        hostname = h.clone();
    }
    if let Some(p) = rd.port {
        port = Some(p.to_string());
    } else if rd.scheme.is_some() {
        // A scheme change drops the original port (Envoy keeps only an explicit port_redirect).
        port = None;
    }
    if matches!(
        (scheme, port.as_deref()),
        ("http", Some("80")) | ("https", Some("443"))
    ) {
        port = None;
    }
    let (p, q) = match path.find('?') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    let new_path = if let Some(np) = &rd.path {
        // A path_redirect with its own query replaces the query too.
        if np.contains('?') {
            np.clone()
        } else {
            format!("{np}{q}")
        }
    } else if let Some(rw) = &rd.prefix_rewrite {
        let tail = matched_prefix.and_then(|m| p.get(m.len()..)).unwrap_or("");
        format!("{rw}{tail}{q}")
    } else if let Some((re, sub)) = &rd.regex_rewrite {
        format!("{}{q}", re.replace_all(p, sub.as_str()))
    } else {
        path.to_string()
    };
    let new_path = if rd.strip_query {
        new_path.split('?').next().unwrap_or("").to_string()
    } else {
        new_path
    };
    match port {
        Some(port) => format!("{scheme}://{hostname}:{port}{new_path}"),
        None => format!("{scheme}://{hostname}{new_path}"),
    }
}
