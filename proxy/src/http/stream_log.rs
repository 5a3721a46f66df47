//! What an HTTP stream's access log reads, gathered while the stream runs, and the response body
//! that writes the log once the last byte has gone downstream (or the stream was cut short), as
//! Envoy logs on stream completion.
//!
//! None of this exists for a connection manager without access logs.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::conn_manager::ResponseBody;
use crate::observe::access_log::{log_all, AccessLogs};
use crate::observe::formatter::{RequestLine, StreamValues, UpstreamValues};
use petrel_filters::http_filter::BodyEncoder;

/// Facts about one stream that the connection manager and the router learn.
#[derive(Default)]
pub struct StreamFacts {
    /// The request headers as the router last shaped them.
    pub request_headers: Option<HeaderMap>,
    pub method: Option<http::Method>,
    pub path: String,
    pub authority: String,
    pub scheme: String,
    pub route_name: Option<String>,
    pub cluster: Option<String>,
    /// The client address after `x-forwarded-for` processing.
    pub downstream_remote: Option<SocketAddr>,
    pub upstream_host: Option<crate::upstream::cluster::HostAddress>,
    pub upstream_local: Option<SocketAddr>,
    pub transport_failure_reason: Option<String>,
    /// The upstream connection's TLS.
    pub upstream_tls: Option<Arc<crate::tls::info::TlsInfo>>,
    /// `%RESPONSE_CODE_DETAILS%` when the router knows more than its local reply says.
    pub details: Option<String>,
    pub attempts: u32,
    /// What the filters wrote (`%DYNAMIC_METADATA%`).
    pub dynamic_metadata: petrel_filters::http_filter::DynamicMetadata,
    /// Flags that do not come with a local reply (`URX`, `DI`, …).
    pub flags: Vec<&'static str>,
    /// Request body bytes read from downstream.
    pub received: Arc<AtomicU64>,
    /// The route's cluster's Istio metadata.
    pub cluster_istio: Option<Arc<petrel_filters::workload_metadata::IstioClusterMetadata>>,
    /// The chosen endpoint's `istio.workload`.
    pub upstream_workload: Option<Arc<petrel_filters::workload_metadata::WorkloadMetadata>>,
    /// The peers the peer metadata filter found.
    pub peers: petrel_filters::http_filter::StreamPeers,
    /// A gRPC request's message counts (`grpc_stats`).
    pub grpc: Option<super::grpc_stats::GrpcStream>,
}

impl StreamFacts {
    /// Takes what a request that ends before routing shows: its line and headers.
    pub fn note_request<B>(&mut self, req: http::Request<B>) {
        let (parts, _) = req.into_parts();
        self.path = parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        self.authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        self.request_headers = Some(parts.headers);
    }
}

/// How a local reply describes itself to the access log (set on every local response).
#[derive(Clone, Copy)]
pub struct ReplyFacts {
    pub flag: &'static str,
    pub details: &'static str,
}

/// Envoy's flag order when several are set (the order of its `ResponseFlag` enum).
const FLAG_ORDER: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

fn join_flags(mut flags: Vec<&'static str>) -> String {
    flags.sort_by_key(|f| FLAG_ORDER.iter().position(|o| o == f));
    flags.dedup();
    flags.join(",")
}

/// Where the stream came from and when.
pub struct StreamOrigin {
    pub start: Instant,
    pub start_time: SystemTime,
    pub remote: SocketAddr,
    pub direct_remote: SocketAddr,
    pub local: SocketAddr,
    pub protocol: &'static str,
    pub tls: Option<Arc<crate::tls::info::TlsInfo>>,
    pub server_name: String,
    pub filter_state: Arc<petrel_filters::filter_state::FilterState>,
}

/// The span still to be finished for a stream, and the worker that reports it.
pub struct PendingSpan {
    pub trace: crate::observe::tracing::ActiveTrace,
    pub ctx: std::rc::Rc<crate::worker::WorkerCtx>,
}

/// The access log still to be written (and span finished) for a stream.
pub struct PendingLog {
    pub trace: Option<PendingSpan>,
    pub logs: AccessLogs,
    pub istio_stats: Arc<[Arc<crate::observe::istio_stats::IstioStats>]>,
    pub grpc_stats: Option<Arc<super::grpc_stats::GrpcStatsConfig>>,
    pub facts: StreamFacts,
    pub origin: StreamOrigin,
    pub response_headers: HeaderMap,
    pub status: u16,
    pub reply: Option<ReplyFacts>,
}

/// The downstream response body: the stream's body as the encoder filters rewrite it, and its
/// pending access log.
pub struct StreamBody {
    inner: ResponseBody,
    log: Option<Box<PendingLog>>,
    sent: u64,
    ended: bool,
    failed: bool,
    /// The encoder filters' body rewriters (compressors), in encoding order.
    encoders: Vec<Box<dyn BodyEncoder>>,
    /// Trailers held back while the encoders' last bytes go out.
    held_trailers: Option<Frame<Bytes>>,
    /// The encoders have had their last chunk.
    encoders_done: bool,
    /// `downstream_rq_time`: the milliseconds from the stream's start to its end.
    rq_time: Option<(Instant, Arc<crate::observe::stats::Histogram>)>,
    /// `grpc-status` of the response trailers (Istio's stats read it).
    trailer_grpc_status: Option<u32>,
}

impl StreamBody {
    pub fn new(inner: ResponseBody, log: Option<Box<PendingLog>>) -> Self {
        StreamBody {
            inner,
            log,
            sent: 0,
            ended: false,
            failed: false,
            encoders: Vec::new(),
            held_trailers: None,
            encoders_done: false,
            rq_time: None,
            trailer_grpc_status: None,
        }
    }

    /// Records the stream's length in `histogram` when it ends.
    pub fn time_with(&mut self, start: Instant, histogram: Arc<crate::observe::stats::Histogram>) {
        self.rq_time = Some((start, histogram));
    }

    /// Rewrites the body through these encoders (none: passes it as it is).
    pub fn encode_with(&mut self, encoders: Vec<Box<dyn BodyEncoder>>) {
        self.encoders = encoders;
    }

    fn encode(&mut self, data: Bytes, end: bool) -> Bytes {
        self.encoders_done |= end;
        self.encoders.iter_mut().fold(data, |d, e| e.encode(d, end))
    }

    /// The next frame as the encoders make it.
    fn poll_encoded(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, <ResponseBody as Body>::Error>>> {
        if self.encoders.is_empty() {
            return Pin::new(&mut self.inner).poll_frame(cx);
        }
        if let Some(t) = self.held_trailers.take() {
            return Poll::Ready(Some(Ok(t)));
        }
        if self.encoders_done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    let end = self.inner.is_end_stream();
                    Poll::Ready(Some(Ok(Frame::data(self.encode(data, end)))))
                }
                Err(trailers) => {
                    // Trailers end the stream: the encoders finish first.
                    self.held_trailers = Some(trailers);
                    Poll::Ready(Some(Ok(Frame::data(self.encode(Bytes::new(), true)))))
                }
            },
            Poll::Ready(None) => {
                Poll::Ready(Some(Ok(Frame::data(self.encode(Bytes::new(), true)))))
            }
            other => other,
        }
    }

    pub fn inner_mut(&mut self) -> &mut ResponseBody {
        &mut self.inner
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let r = this.poll_encoded(cx);
        if this.log.is_some() {
            match &r {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        this.sent += d.len() as u64;
                    }
                    if let Some(t) = f.trailers_ref() {
                        this.ended = true;
                        this.trailer_grpc_status = grpc_status(t);
                    }
                }
                Poll::Ready(Some(Err(_))) => this.failed = true,
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => {}
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        if self.encoders.is_empty() {
            self.inner.is_end_stream()
        } else {
            self.encoders_done && self.held_trailers.is_none()
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.encoders.is_empty() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        if let Some((start, h)) = self.rq_time.take() {
            h.record(start.elapsed().as_millis() as u64);
        }
        let Some(log) = self.log.take() else { return };
        let bodiless = matches!(log.status, 204 | 304)
            || log.facts.method.as_ref() == Some(&http::Method::HEAD);
        let complete = self.ended || bodiless || self.inner.is_end_stream();
        let mut flags = log.facts.flags.clone();
        if let Some(r) = log.reply {
            if !r.flag.is_empty() {
                flags.push(r.flag);
            }
        }
        if self.failed {
            // The upstream reset the stream after its headers.
            flags.push("UR");
        } else if !complete {
            flags.push("DC");
        }
        let flags = join_flags(flags);
        write(&log, &flags, self.sent);
        let grpc_status = self
            .trailer_grpc_status
            .or_else(|| grpc_status(&log.response_headers))
            .unwrap_or_else(|| super::local_reply::http_to_grpc_status(log.status));
        if !log.istio_stats.is_empty() {
            report_istio_stats(&log, &flags, self.sent, grpc_status);
        }
        if let (Some(gs), Some(g), Some(cluster)) =
            (&log.grpc_stats, &log.facts.grpc, &log.facts.cluster)
        {
            gs.charge(cluster, g, Some(grpc_status));
        }
        if let Some(t) = log.trace {
            finish_span(t, &log.facts, &log.origin, log.status, &flags, self.sent);
        }
    }
}

fn finish_span(
    t: PendingSpan,
    f: &StreamFacts,
    o: &StreamOrigin,
    status: u16,
    flags: &str,
    sent: u64,
) {
    let end = crate::observe::tracing::StreamEnd {
        request_headers: f.request_headers.as_ref(),
        method: f.method.as_ref().map_or("", |m| m.as_str()),
        authority: &f.authority,
        path: &f.path,
        protocol: o.protocol,
        direct_remote: o.direct_remote.ip(),
        status,
        flags,
        cluster: f.cluster.as_deref(),
        received: f.received.load(Ordering::Relaxed),
        sent,
        metadata: &f.dynamic_metadata,
    };
    let PendingSpan { trace, ctx } = t;
    let driver = trace.span.driver.clone();
    if let Some(json) = trace.config.finish(trace.span, &end, &trace.route_tags) {
        crate::observe::tracing::reporter::report(&ctx, &driver, json);
    }
}

fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Istio's stats filters, which Envoy runs as access logs.
fn report_istio_stats(log: &PendingLog, flags: &str, sent: u64, grpc_status: u32) {
    use crate::observe::istio_stats::{HttpOutcome, PeerFacts};
    let f = &log.facts;
    let o = &log.origin;
    let grpc = f
        .request_headers
        .as_ref()
        .is_some_and(super::local_reply::is_grpc);
    let facts = PeerFacts {
        host: Some(f.authority.as_str()).filter(|a| !a.is_empty()),
        route_name: f.route_name.as_deref().unwrap_or(""),
        cluster: f.cluster.as_deref(),
        cluster_istio: f.cluster_istio.as_deref(),
        upstream_workload: f.upstream_workload.as_deref(),
        upstream_tls: f.upstream_tls.as_deref(),
        downstream_tls: o.tls.as_deref(),
        filter_state: &o.filter_state,
        downstream_peer: f.peers.downstream.as_deref(),
        upstream_peer: f.peers.upstream.as_deref(),
        flags,
    };
    let outcome = HttpOutcome {
        grpc,
        status: log.status,
        grpc_status: Some(grpc_status),
        // `grpc_stats`' filter state, when it keeps one.
        messages: f
            .grpc
            .as_ref()
            .filter(|_| log.grpc_stats.as_ref().is_some_and(|g| g.emit_filter_state))
            .map(|g| (g.request.get(), g.response.get())),
        duration: o.start.elapsed(),
        request_bytes: wire_request_bytes(f),
        response_bytes: wire_response_bytes(log, sent),
    };
    for s in log.istio_stats.iter() {
        s.report_http(&facts, &outcome);
    }
}

/// The request as an HTTP/1.1 message: request line, headers and body (Envoy's downstream
/// bytes meter counts wire bytes; for HTTP/2 this is the uncompressed equivalent).
fn wire_request_bytes(f: &StreamFacts) -> u64 {
    let method = f.method.as_ref().map_or(0, |m| m.as_str().len());
    // `METHOD PATH HTTP/1.1\r\n`, the headers, the blank line.
    let line = method + 1 + f.path.len() + 11;
    (line + f.request_headers.as_ref().map_or(0, header_block_len) + 2) as u64
        + f.received.load(Ordering::Relaxed)
}

fn wire_response_bytes(log: &PendingLog, sent: u64) -> u64 {
    // `HTTP/1.1 200 OK\r\n` with its reason phrase, the headers, the blank line.
    let reason = http::StatusCode::from_u16(log.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map_or(0, str::len);
    (13 + reason + 2 + header_block_len(&log.response_headers) + 2) as u64 + sent
}

/// `name: value\r\n` for every header.
fn header_block_len(h: &HeaderMap) -> usize {
    h.iter()
        .map(|(k, v)| k.as_str().len() + 2 + v.len() + 2)
        .sum()
}

fn write(log: &PendingLog, flags: &str, sent: u64) {
    if log.logs.is_empty() {
        return;
    }
    let f = &log.facts;
    let o = &log.origin;
    let remote = f.downstream_remote.unwrap_or(o.remote);
    let mut v = StreamValues::new(o.start_time, remote, o.local);
    v.downstream_direct_remote = o.direct_remote;
    v.request_headers = f.request_headers.as_ref();
    v.request_line = Some(RequestLine {
        method: f.method.as_ref().map_or("", |m| m.as_str()),
        path: &f.path,
        authority: &f.authority,
        scheme: &f.scheme,
    });
    v.response_headers = Some(&log.response_headers);
    v.response_code = log.status;
    v.response_flags = flags;
    v.response_code_details = match (&f.details, log.reply) {
        (Some(d), _) => d,
        (None, Some(r)) => r.details,
        (None, None) => "via_upstream",
    };
    v.protocol = o.protocol;
    v.downstream_tls = o.tls.as_deref();
    v.requested_server_name = &o.server_name;
    v.dynamic_metadata = Some(&f.dynamic_metadata);
    v.filter_state = Some(&o.filter_state);
    v.route_name = f.route_name.as_deref().unwrap_or("");
    v.bytes_received = f.received.load(Ordering::Relaxed);
    v.bytes_sent = sent;
    v.duration = Some(o.start.elapsed());
    v.upstream = UpstreamValues {
        cluster: f.cluster.as_deref(),
        cluster_stat_name: None,
        host: f.upstream_host.as_ref(),
        local: f.upstream_local,
        transport_failure_reason: f.transport_failure_reason.as_deref(),
        attempts: f.attempts,
        tls: f.upstream_tls.as_deref(),
    };
    log_all(&log.logs, &v);
}
