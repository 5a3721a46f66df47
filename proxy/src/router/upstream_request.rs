//! The router filter's forwarding half: pick the cluster and host, shape the upstream request,
//! send it with the route timeout, and turn failures into Envoy's local replies.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::http::body::RequestBody;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::Either;

use super::hash_policy::{Addresses, RequestHash};
use super::route_config::{
    rewrite_path, ClusterChoice, ForwardAction, HostRewrite, Route, RouteTable, VirtualHost,
};
use crate::config::snapshot::Snapshot;
use crate::http::conn_manager::{
    apply_server_header, local_response, ConnInfo, ReplyForm, ResponseBody,
};
use crate::http::conn_manager_config::HcmConfig;
use crate::http::local_reply::LocalReply;
use crate::http::replay::Recording;
use crate::http::stream_timeouts::{DownstreamBody, IdleTimedBody, StreamActivity};
use crate::upstream::async_client::{self, outlier_response, report_reset, Outgoing};
use crate::upstream::circuit_breakers::Held;
use crate::upstream::cluster::UpstreamProtocol;
use crate::upstream::cluster::{Cluster, Host, LbPolicy, Pick};
use crate::upstream::outlier_detection::Report;
use crate::upstream::pool::{PooledBody, ResetReason, UpstreamBody};
use std::time::Duration;

use super::retry_policy::{RetryPolicy, RetryState, RetryStatus};
use super::route_config::{MirrorCluster, MirrorPolicy};
use super::timeouts::Timeouts;
use crate::worker::WorkerCtx;
use petrel_filters::header_formatter::FormatContext;

pub struct Forward<'a> {
    pub hcm: &'a HcmConfig,
    pub ctx: &'a std::rc::Rc<WorkerCtx>,
    pub info: &'a ConnInfo,
    /// The downstream address after XFF processing (Envoy's `downstreamRemoteAddress`).
    pub remote: std::net::SocketAddr,
    pub form: ReplyForm,
    /// A WebSocket upgrade the listener allows: forwarded as a tunnel.
    pub upgrade: bool,
    pub snapshot: &'a Arc<Snapshot>,
    pub routes: &'a RouteTable,
    pub vh: &'a VirtualHost,
    pub route: &'a Route,
    pub fwd: &'a ForwardAction,
    pub path: &'a str,
    pub h2: bool,
    pub start: Instant,
    pub start_time: SystemTime,
    /// The draw that picked the route's weighted cluster before the filters ran.
    pub weighted_draw: u64,
    /// A `cluster_header` route's cluster, read before the filters ran.
    pub header_cluster: Option<String>,
    /// What the access log learns from the router, when there are access logs.
    pub facts: Option<&'a std::cell::RefCell<crate::http::stream_log::StreamFacts>>,
    /// ALPN to offer upstream instead of the cluster's (`istio.alpn`).
    pub upstream_alpn: Option<Arc<petrel_filters::http_filter::UpstreamAlpn>>,
}

const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");

/// What the router adds to every upstream response: `x-envoy-upstream-service-time`, the
/// attempt count when asked for, and the `server` header policy.
fn router_response_headers(f: &Forward<'_>, attempts: u32, headers: &mut http::HeaderMap) {
    let elapsed = f.start.elapsed().as_millis() as u64;
    headers.insert(
        HeaderName::from_static("x-envoy-upstream-service-time"),
        HeaderValue::from(elapsed),
    );
    if f.vh.attempt_count_in_response {
        headers.insert(ATTEMPT_COUNT, HeaderValue::from(attempts));
    }
    apply_server_header(f.hcm, headers);
}

/// Hop-by-hop headers never forwarded upstream.
const HOP_BY_HOP: &[&str] = &[
    "expect",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

fn reply(
    f: &Forward<'_>,
    r: LocalReply,
    request_headers: Option<&http::HeaderMap>,
) -> Response<ResponseBody> {
    local_response(f.hcm, &r, f.form, request_headers)
}

/// A local reply the router sends once attempts have started: with `x-envoy-attempt-count`
/// when the virtual host asks for it, as Envoy's router adds it to its own replies.
fn router_reply(
    f: &Forward<'_>,
    mut r: LocalReply,
    request_headers: Option<&http::HeaderMap>,
    attempts: u32,
) -> Response<ResponseBody> {
    if f.vh.attempt_count_in_response && attempts > 0 {
        r.headers.insert(ATTEMPT_COUNT, HeaderValue::from(attempts));
    }
    reply(f, r, request_headers)
}

/// Tells the access log why the upstream attempt that ends the request failed.
fn note_reset(f: &Forward<'_>, reason: &ResetReason) {
    if let Some(facts) = f.facts {
        let mut facts = facts.borrow_mut();
        facts.details = Some(reason.details());
        facts.transport_failure_reason = reason.transport_failure_reason();
    }
}

/// Tells the access log which local address the upstream connection had.
fn note_upstream_local<B>(f: &Forward<'_>, r: &Response<B>) {
    if let (Some(facts), Some(c)) = (
        f.facts,
        r.extensions().get::<crate::upstream::pool::UpstreamConn>(),
    ) {
        let mut facts = facts.borrow_mut();
        facts.upstream_local = c.local;
        facts.upstream_tls = c.tls.clone();
    }
}

/// The upstream host that answered, for response header formatters.
#[derive(Clone)]
pub struct ChosenHost(pub Arc<crate::upstream::cluster::Host>);

enum Outcome<T> {
    Response(T),
    RouteTimeout,
    PerTryTimeout,
    /// The retry policy's `per_try_idle_timeout` passed with nothing from the upstream.
    PerTryIdleTimeout,
    StreamIdle,
    RequestTimeout,
    /// The route's `max_stream_duration` passed.
    StreamDuration,
}

/// The policy of a route and virtual host without one.
static NO_RETRY_POLICY: std::sync::LazyLock<RetryPolicy> =
    std::sync::LazyLock::new(RetryPolicy::default);

/// Envoy's default retry buffer: the listener's `per_connection_buffer_limit_bytes` default.
const RETRY_BUFFER_LIMIT: usize = 1024 * 1024;

/// How one attempt ended, once the router has looked at it.
enum Attempt {
    /// Upstream response headers (retriable or not).
    Answered(Box<Response<PooledBody>>),
    /// Reset before response headers.
    Reset(ResetReason),
    /// `idle`: the per-try idle timeout rather than the per-try timeout.
    PerTryTimeout { idle: bool },
}

/// A request's upstream attempts: the host chosen for each, the retry state and its hold on
/// the cluster's `max_retries`.
struct Attempts<'a> {
    facts: Option<&'a std::cell::RefCell<crate::http::stream_log::StreamFacts>>,
    cluster: &'a Cluster,
    policy: &'a RetryPolicy,
    retry: Option<RetryState>,
    /// Held from a retry's scheduling until the next decision, as Envoy holds it.
    retry_slot: Option<Held>,
    tried: Vec<Arc<Host>>,
    count: u32,
    /// The request's hash, for RING_HASH and MAGLEV clusters.
    hash: Option<u64>,
    /// `previous_priorities`: the priorities of the attempts it has seen, the ones retries
    /// skip, and whether the skipping has started.
    priorities_tried: Vec<u32>,
    excluded: Vec<bool>,
    skipping: bool,
}

impl Attempts<'_> {
    /// Envoy's retry decision for an attempt's end. `Ok(backoff)` means try again; `Err` gives
    /// the attempt back as the request's outcome.
    fn decide(&mut self, attempt: Attempt, body_replayable: bool) -> Result<Duration, Attempt> {
        let stats = &self.cluster.stats;
        let Some(retry) = self.retry.as_mut() else {
            return Err(attempt);
        };
        let would = match &attempt {
            Attempt::Answered(r) => {
                retry.would_retry_response(self.policy, r.status().as_u16(), r.headers())
            }
            Attempt::Reset(reason) => retry.would_retry_reset(
                reason,
                !matches!(
                    reason,
                    ResetReason::ConnectionFailure(_)
                        | ResetReason::Tls(_)
                        | ResetReason::ConnectionTimeout
                        | ResetReason::Overflow
                ),
            ),
            Attempt::PerTryTimeout { .. } => retry.retries_per_try_timeout(),
        };
        // A retry in progress whose attempt is not retriable succeeded.
        if self.retry_slot.take().is_some() && !would {
            stats.upstream_rq_retry_success.inc();
        }
        if !would {
            return Err(attempt);
        }
        if !body_replayable {
            return Err(attempt);
        }
        let resources = &self.cluster.resources;
        // A response's reset header sets the backoff when the policy reads one.
        let rate_limited = match (&attempt, &self.policy.rate_limited) {
            (Attempt::Answered(r), Some(rl)) => rl.interval(r.headers()),
            _ => None,
        };
        match retry.should_retry(|| resources.retries_can_create(), rate_limited) {
            RetryStatus::Yes(backoff) => {
                stats.upstream_rq_retry.inc();
                if rate_limited.is_some() {
                    stats.upstream_rq_retry_backoff_ratelimited.inc();
                } else {
                    stats.upstream_rq_retry_backoff_exponential.inc();
                }
                self.retry_slot = Some(Held::take(resources, |r| &r.retries));
                if let Some(h) = self.tried.last() {
                    h.stats.rq_error.fetch_add(1, Ordering::Relaxed);
                }
                if let Attempt::Answered(r) = &attempt {
                    self.cluster.retry_codes.charge(r.status().as_u16());
                }
                Ok(backoff)
            }
            RetryStatus::LimitExceeded => {
                stats.upstream_rq_retry_limit_exceeded.inc();
                if let Some(f) = self.facts {
                    f.borrow_mut().flags.push("URX");
                }
                Err(attempt)
            }
            RetryStatus::Overflow => {
                stats.upstream_rq_retry_overflow.inc();
                Err(attempt)
            }
            RetryStatus::No => Err(attempt),
        }
    }

    /// The host for the next attempt: with `previous_hosts`, one not tried yet if the balancer
    /// offers one within `host_selection_retry_max_attempts` re-picks (Envoy's balancers pick
    /// once, then re-pick up to that many times).
    fn choose(&mut self, f: &Forward<'_>, headers: &http::HeaderMap) -> Option<Arc<Host>> {
        // An attempt counts even when no host is found (Envoy's `no healthy upstream` reply
        // carries it).
        self.count += 1;
        let skip = self.skip_tried_priorities();
        let (cluster, hash) = (self.cluster, self.hash);
        let excluded = skip.then_some(&self.excluded[..]);
        let pick = |attempt| {
            f.ctx.upstreams.choose_host(
                cluster,
                f.info.original_dst,
                Some(headers),
                Pick {
                    hash,
                    attempt,
                    excluded,
                },
            )
        };
        let mut host = pick(0)?;
        if self.policy.previous_hosts && !self.tried.is_empty() {
            for attempt in 1..=self.policy.host_selection_max_attempts {
                if !self.tried.iter().any(|t| Arc::ptr_eq(t, &host)) {
                    break;
                }
                host = pick(attempt)?;
            }
        }
        self.priorities_tried.push(host.priority);
        self.tried.push(host.clone());
        if let Some(f) = self.facts {
            let mut f = f.borrow_mut();
            f.attempts = self.count;
            f.upstream_host = Some(host.address.clone());
            f.upstream_workload = host.istio_workload.clone();
        }
        Some(host)
    }

    /// Envoy's `PreviousPrioritiesRetryPriority`: every `update_frequency` attempts the
    /// priorities tried so far are skipped; when nothing is left it starts over.
    fn skip_tried_priorities(&mut self) -> bool {
        let Some(freq) = self.policy.previous_priorities.map(|f| f as usize) else {
            return false;
        };
        let n = self.priorities_tried.len();
        if n >= freq && n.is_multiple_of(freq) {
            let levels = self.cluster.host_set.plan().levels.len();
            self.excluded.resize(levels, false);
            for p in &self.priorities_tried {
                if let Some(e) = self.excluded.get_mut(*p as usize) {
                    *e = true;
                }
            }
            self.skipping = true;
        }
        if !self.skipping {
            return false;
        }
        if self
            .cluster
            .host_set
            .plan()
            .level_excluding(&self.excluded, 0)
            .is_none()
        {
            self.excluded.fill(false);
            self.priorities_tried.clear();
            self.skipping = false;
            return false;
        }
        true
    }
}

pub async fn forward(mut req: Request<RequestBody>, f: Forward<'_>) -> Response<ResponseBody> {
    // Mappers may match on request headers; keep a copy only when there are mappers.
    let reply_headers = (!f.hcm.local_reply.is_empty()).then(|| req.headers().clone());
    let fwd = f.fwd;
    let (cluster_name, weighted) = match &fwd.cluster {
        ClusterChoice::Named(n) => (n.to_string(), None),
        ClusterChoice::Header(_) => (f.header_cluster.clone().unwrap_or_default(), None),
        ClusterChoice::Weighted(w) => {
            let pick = w.pick(f.weighted_draw);
            (pick.name.to_string(), Some(pick))
        }
    };
    let Some(cluster) = f.snapshot.clusters.get(&cluster_name) else {
        if let Some(facts) = f.facts {
            facts.borrow_mut().request_headers = Some(req.headers().clone());
        }
        f.hcm.stats.no_cluster.inc();
        return reply(
            &f,
            LocalReply::cluster_not_found(fwd.cluster_not_found_response_code),
            reply_headers.as_ref(),
        );
    };
    // The timeout and retry headers are consumed before anything else reads the request.
    let policy = fwd.retry_policy.as_deref().or(f.vh.retry_policy.as_deref());
    let timeouts = Timeouts::resolve(fwd, policy, req.headers_mut(), f.form.grpc);
    let policy = policy.unwrap_or(&NO_RETRY_POLICY);
    let retry = RetryState::create(policy, req.headers_mut());
    // The hash is computed only for a balancer that uses it (a cookie is only generated then,
    // as in Envoy).
    let request_hash = match (&fwd.hash_policy, cluster.lb) {
        (Some(p), LbPolicy::ConsistentHash) => p.hash(
            req.headers(),
            f.path,
            &Addresses {
                remote: f.remote,
                peer: f.info.remote,
                local: f.info.local,
            },
        ),
        _ => RequestHash::default(),
    };
    if let Some(facts) = f.facts {
        let mut facts = facts.borrow_mut();
        facts.cluster = Some(cluster_name.clone());
        facts.cluster_istio = cluster.istio.clone();
    }
    let mut attempts = Attempts {
        facts: f.facts,
        cluster,
        policy,
        retry,
        retry_slot: None,
        tried: Vec::new(),
        count: 0,
        hash: request_hash.hash,
        priorities_tried: Vec::new(),
        excluded: Vec::new(),
        skipping: false,
    };
    let Some(mut host) = attempts.choose(&f, req.headers()) else {
        if let Some(facts) = f.facts {
            facts.borrow_mut().request_headers = Some(req.headers().clone());
        }
        return no_healthy_upstream(&f, cluster, reply_headers.as_ref(), attempts.count);
    };

    // Shape the upstream request.
    let mut path = f.path.to_string();
    let downstream_upgrade = if f.upgrade {
        req.extensions()
            .get::<crate::http::h1::H1Upgrade>()
            .and_then(|u| u.take())
    } else {
        None
    };
    // The HTTP/1.1 codec answers `expect: 100-continue` with a 100 once the body is read, which
    // forwarding does; Envoy counts that interim response.
    let continues = !f.h2
        && req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if continues {
        // Envoy charges the interim response like any other: 1xx and completed.
        f.hcm.stats.downstream_rq_1xx.inc();
        f.hcm.stats.downstream_rq_completed.inc();
        f.hcm.listener_stats.downstream_rq_1xx.inc();
        f.hcm.listener_stats.downstream_rq_completed.inc();
    }
    let mut headers = std::mem::take(req.headers_mut());
    if let Some(p) = rewrite_path(
        &path,
        f.route.matched_prefix(),
        fwd.prefix_rewrite.as_deref(),
        fwd.regex_rewrite.as_ref(),
    ) {
        // Envoy keeps the pre-rewrite path for the upstream to see.
        if let Ok(v) = HeaderValue::from_str(&path) {
            headers.insert(HeaderName::from_static("x-envoy-original-path"), v);
        }
        path = p;
    }
    // `te: trailers` is the one value that must survive (gRPC needs it); an upgrade keeps its
    // `connection` and `upgrade`.
    let keep_te = headers
        .get(http::header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("trailers"));
    let hop_by_hop: Vec<&str> = HOP_BY_HOP
        .iter()
        .copied()
        .filter(|h| !(f.upgrade && (*h == "connection" || *h == "upgrade")))
        .filter(|h| !(keep_te && *h == "te"))
        .collect();
    crate::http::header_scan::remove_names(&mut headers, &hop_by_hop);
    let original_host = headers.get(http::header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let method = req.method().clone();
    let literal_host = match (
        &fwd.host_rewrite,
        weighted.and_then(|w| w.host_rewrite_literal.clone()),
    ) {
        (_, Some(h)) => Some(h),
        (Some(HostRewrite::Literal(h)), _) => Some(h.clone()),
        (Some(HostRewrite::Header(name)), _) => headers.get(name).cloned(),
        _ => None,
    };
    // `auto_host_rewrite` takes each attempt's host name (not for static clusters).
    let auto_host = matches!(fwd.host_rewrite, Some(HostRewrite::Auto))
        && literal_host.is_none()
        && cluster.discovery != crate::upstream::cluster::DiscoveryType::Static;
    let host_authority = |host: &Host| -> Option<HeaderValue> {
        if auto_host {
            HeaderValue::from_str(&host.hostname).ok()
        } else {
            literal_host.clone()
        }
    };
    if let (Some(_), Some(orig)) = (host_authority(&host), &original_host) {
        headers.insert(
            HeaderName::from_static("x-envoy-original-host"),
            orig.clone(),
        );
    }
    let routes = f.routes;
    let mut levels = [
        weighted.map(|w| &w.request_headers),
        Some(&f.route.request_headers),
        Some(&f.vh.request_headers),
        Some(&routes.request_headers),
    ];
    if routes.most_specific_header_mutations_wins {
        levels.reverse();
    }
    let levels = levels.into_iter().flatten().filter(|m| !m.is_empty());
    // Formatters read the request as it was before any level changed it; copy it only when
    // one of them reads it.
    if levels.clone().next().is_some() {
        let before = levels
            .clone()
            .any(|m| m.reads_request_headers())
            .then(|| headers.clone());
        let fctx = FormatContext {
            downstream_remote: f.remote,
            downstream_local: f.info.local,
            protocol: if f.h2 { "HTTP/2" } else { "HTTP/1.1" },
            request_headers: before.as_ref(),
            // Envoy evaluates request header mutations before it picks the host, so upstream
            // values are empty here (and such headers are not added).
            upstream: None,
            start_time: f.start_time,
        };
        for m in levels {
            m.apply(&mut headers, &fctx);
        }
    }

    if let Some(facts) = f.facts {
        // The access log sees the request as the router shaped it (Envoy's router edits the
        // downstream headers in place).
        let mut h = headers.clone();
        let authority = host_authority(&host).or_else(|| original_host.clone());
        let mut facts = facts.borrow_mut();
        if let Some(a) = authority.as_ref().and_then(|a| a.to_str().ok()) {
            facts.authority = a.to_string();
        }
        facts.path.clone_from(&path);
        h.remove(http::header::HOST);
        facts.request_headers = Some(h);
    }
    let upstream_h2 = match cluster.protocol {
        crate::upstream::cluster::UpstreamProtocol::Http2 => true,
        UpstreamProtocol::Downstream => f.h2,
        UpstreamProtocol::Http1 => false,
    };
    // `istio.alpn`: the protocols to offer for this upstream protocol.
    let alpn = f.upstream_alpn.as_ref().and_then(|a| {
        if upstream_h2 {
            a.http2.clone()
        } else {
            a.http11.clone()
        }
    });
    let empty_body_needs_length = req.body().is_end_stream()
        && !matches!(
            method,
            http::Method::GET
                | http::Method::HEAD
                | http::Method::DELETE
                | http::Method::TRACE
                | http::Method::CONNECT
        );
    if upstream_h2 {
        headers.remove(http::header::HOST);
    }
    // Envoy's codec states an empty body as `content-length: 0` except for GET, HEAD, DELETE, TRACE
    // and CONNECT (checked against Envoy in the differential suite).
    if empty_body_needs_length
        && !headers.contains_key(http::header::CONTENT_LENGTH)
        && !headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    let activity = StreamActivity::new(req.body().is_end_stream());
    let internal_request = headers
        .get("x-envoy-internal")
        .is_some_and(|v| v.as_bytes() == b"true");
    let downstream = DownstreamBody::new(req.into_body(), activity.clone());
    // A request that may be retried keeps a copy of its body to replay.
    // Envoy 1.40 streams a mirror's body without bounding it; only retries are bounded (and a
    // request with both stops mirroring too once past the limit).
    let limit = if attempts.retry.is_some() {
        f.route
            .buffer_limit
            .or(f.vh.buffer_limit)
            .map(|l| l as usize)
            .unwrap_or(RETRY_BUFFER_LIMIT)
    } else {
        usize::MAX
    };
    // Mirrors chosen now (each by its fraction); they replay the body once it is complete. The
    // route's policies replace the virtual host's.
    let policies = if fwd.mirrors.is_empty() {
        &f.vh.mirrors
    } else {
        &fwd.mirrors
    };
    let mirrors: Vec<&MirrorPolicy> = if downstream_upgrade.is_none() {
        policies
            .iter()
            .filter(|m| rand::random_range(0..1_000_000u64) < m.per_million)
            .collect()
    } else {
        Vec::new()
    };
    let (mut direct, recording) =
        if (attempts.retry.is_some() || !mirrors.is_empty()) && downstream_upgrade.is_none() {
            (None, Some(Recording::new(downstream, limit)))
        } else {
            (Some(downstream), None)
        };
    let build = |mut h: http::HeaderMap,
                 host: &Host,
                 count: u32,
                 body: UpstreamBody|
     -> Option<Request<UpstreamBody>> {
        let authority = host_authority(host).or_else(|| original_host.clone());
        if let Some(a) = &authority {
            if !upstream_h2 {
                h.insert(http::header::HOST, a.clone());
            }
        }
        timeouts.set_headers(&mut h, f.start.elapsed());
        // The header overrides any value the client sent.
        if f.vh.attempt_count_in_request {
            h.insert(ATTEMPT_COUNT, HeaderValue::from(count));
        }
        let uri = if upstream_h2 {
            let auth = authority
                .as_ref()
                .and_then(|a| a.to_str().ok())
                .unwrap_or("localhost");
            format!("http://{auth}{path}")
        } else {
            path.clone()
        };
        let mut r = Request::builder()
            .method(method.clone())
            .uri(uri)
            .version(if upstream_h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            })
            .body(body)
            .ok()?;
        *r.headers_mut() = h;
        Some(r)
    };

    if let Some(rec) = &recording {
        for m in &mirrors {
            let name = match &m.cluster {
                MirrorCluster::Named(n) => n.to_string(),
                MirrorCluster::Header(h) => match headers.get(h).and_then(|v| v.to_str().ok()) {
                    Some(n) => n.to_string(),
                    None => continue,
                },
            };
            let mut h = headers.clone();
            timeouts.set_headers(&mut h, f.start.elapsed());
            let authority = m
                .host_rewrite
                .clone()
                .or_else(|| host_authority(&host))
                .or_else(|| original_host.clone())
                .map(|a| if m.host_suffix { shadow_host(&a) } else { a });
            tokio::task::spawn_local(shadow(Shadow {
                ctx: f.ctx.clone(),
                snapshot: f.snapshot.clone(),
                cluster: name,
                headers: h,
                method: method.clone(),
                path: path.clone(),
                authority,
                body: rec.clone(),
                deadline: timeouts.global,
            }));
        }
    }
    // Mirrors waiting for the body give up once this request is over.
    let _settle = recording.clone().map(SettleOnDrop);

    if let Some(down) = downstream_upgrade {
        let body = Either::Left(direct.take().expect("an upgrade streams its body directly"));
        let Some(up_req) = build(std::mem::take(&mut headers), &host, 1, body) else {
            return reply(&f, LocalReply::invalid_request(), reply_headers.as_ref());
        };
        let stats = &cluster.stats;
        stats.upstream_rq_active.inc();
        host.active_requests.fetch_add(1, Ordering::Relaxed);
        return tunnel(&f, cluster, &host, up_req, down).await;
    }

    let stats = &cluster.stats;
    // A route's idle_timeout replaces the connection manager's for the rest of the stream.
    let idle_timeout = fwd.idle_timeout.unwrap_or(f.hcm.stream_idle_timeout);
    let per_try_idle_timeout = policy.per_try_idle_timeout;
    let from_start = |t: Option<Duration>| t.map(|t| tokio::time::Instant::from_std(f.start) + t);
    let deadline = from_start(timeouts.global);
    let until_deadline = || sleep_until(deadline);
    // The route's max_stream_duration runs from the stream's start.
    let stream_end = from_start(timeouts.stream);
    let until_stream_end = || sleep_until(stream_end);
    let resp = loop {
        let body = match (&recording, direct.take()) {
            (Some(rec), _) => Either::Right(rec.attempt()),
            (None, Some(d)) => Either::Left(d),
            (None, None) => unreachable!("only a recorded body allows a second attempt"),
        };
        let h = if recording.is_some() {
            headers.clone()
        } else {
            std::mem::take(&mut headers)
        };
        let Some(up_req) = build(h, &host, attempts.count, body) else {
            return reply(&f, LocalReply::invalid_request(), reply_headers.as_ref());
        };
        stats.upstream_rq_active.inc();
        host.active_requests.fetch_add(1, Ordering::Relaxed);
        // Envoy starts the per-try timers once the attempt has a connection and the whole
        // request has been received.
        let attached = tokio::sync::Notify::new();
        let send = f.ctx.upstreams.send(
            cluster,
            &host,
            upstream_h2,
            up_req,
            Some(&attached),
            crate::upstream::pool::PoolApart {
                alpn: alpn.clone(),
                filter_state: f.info.filter_state.upstream_key(),
            },
        );
        let sent = async {
            attached.notified().await;
            activity.request_completed().await;
            tokio::time::Instant::now()
        };
        let outcome = {
            let hcm = f.hcm;
            // Before response headers nothing comes back from the upstream, so the idle timer
            // runs like the per-try one (it keeps running on the response body below).
            let per_try_timers = async {
                if timeouts.per_try.is_none() && per_try_idle_timeout.is_none() {
                    return std::future::pending().await;
                }
                let start = sent.await;
                let per_try = sleep_until(timeouts.per_try.map(|t| start + t));
                let per_try_idle = sleep_until(per_try_idle_timeout.map(|t| start + t));
                tokio::select! {
                    _ = per_try => Outcome::PerTryTimeout,
                    _ = per_try_idle => Outcome::PerTryIdleTimeout,
                }
            };
            let idle = async {
                match idle_timeout {
                    Some(t) => activity.idle_expired(t).await,
                    None => std::future::pending().await,
                }
            };
            let request_timeout = async {
                match hcm.request_timeout {
                    Some(t) => {
                        activity
                            .request_incomplete_at(tokio::time::Instant::from_std(f.start) + t)
                            .await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = send => Outcome::Response(r),
                _ = until_deadline() => Outcome::RouteTimeout,
                _ = until_stream_end() => Outcome::StreamDuration,
                o = per_try_timers => o,
                _ = idle => Outcome::StreamIdle,
                _ = request_timeout => Outcome::RequestTimeout,
            }
        };
        host.active_requests.fetch_sub(1, Ordering::Relaxed);
        stats.upstream_rq_active.dec();
        let attempt = match outcome {
            Outcome::RouteTimeout => {
                cluster.report_outlier(&host, Report::Timeout);
                stats.upstream_rq_timeout.inc();
                cluster.charge_response(504);
                host.stats.rq_timeout.fetch_add(1, Ordering::Relaxed);
                host.record_response(504);
                return router_reply(
                    &f,
                    LocalReply::upstream_timeout(),
                    reply_headers.as_ref(),
                    attempts.count,
                );
            }
            Outcome::StreamIdle => {
                f.hcm.stats.downstream_rq_idle_timeout.inc();
                return reply(
                    &f,
                    LocalReply::stream_idle_timeout(activity.request_complete()),
                    reply_headers.as_ref(),
                );
            }
            Outcome::RequestTimeout => {
                f.hcm.stats.downstream_rq_timeout.inc();
                return reply(&f, LocalReply::request_timeout(), reply_headers.as_ref());
            }
            Outcome::StreamDuration => {
                f.hcm.stats.downstream_rq_max_duration_reached.inc();
                return reply(
                    &f,
                    LocalReply::max_duration_timeout(),
                    reply_headers.as_ref(),
                );
            }
            Outcome::PerTryTimeout | Outcome::PerTryIdleTimeout => {
                let idle = matches!(outcome, Outcome::PerTryIdleTimeout);
                cluster.report_outlier(&host, Report::Timeout);
                if idle {
                    stats.upstream_rq_per_try_idle_timeout.inc();
                } else {
                    stats.upstream_rq_per_try_timeout.inc();
                }
                host.stats.rq_timeout.fetch_add(1, Ordering::Relaxed);
                Attempt::PerTryTimeout { idle }
            }
            // A downstream body error is the client's fault, not the upstream's.
            Outcome::Response(Err(ResetReason::DownstreamBody)) => {
                return reply(
                    &f,
                    LocalReply::upstream_reset(ResetReason::DownstreamBody),
                    reply_headers.as_ref(),
                );
            }
            Outcome::Response(Err(reason)) => {
                report_reset(cluster, &host, &reason);
                Attempt::Reset(reason)
            }
            Outcome::Response(Ok(r)) => {
                note_upstream_local(&f, &r);
                cluster.report_outlier(
                    &host,
                    outlier_response(f.form.grpc, r.headers(), r.status()),
                );
                Attempt::Answered(Box::new(r))
            }
        };
        // A body past the buffer limit cannot be retried (only retries are bounded by it).
        let replayable = recording.as_ref().is_some_and(|r| !r.overflowed());
        if recording.as_ref().is_some_and(|r| r.overflowed()) && attempts.retry.take().is_some() {
            stats.retry_or_shadow_abandoned.inc();
        }
        let backoff = match attempts.decide(attempt, replayable) {
            Ok(b) => b,
            Err(Attempt::Answered(r)) => break *r,
            Err(Attempt::Reset(reason)) => {
                cluster.charge_response(503);
                host.record_response(503);
                note_reset(&f, &reason);
                return router_reply(
                    &f,
                    LocalReply::upstream_reset_after(reason, attempts.count > 1),
                    reply_headers.as_ref(),
                    attempts.count,
                );
            }
            Err(Attempt::PerTryTimeout { idle }) => {
                cluster.charge_response(504);
                host.record_response(504);
                return router_reply(
                    &f,
                    LocalReply::per_try_timeout(idle),
                    reply_headers.as_ref(),
                    attempts.count,
                );
            }
        };
        // The backoff runs under the route timeout; no attempt is in flight, so a timeout here
        // charges nothing upstream.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = until_deadline() => {
                return router_reply(
                    &f,
                    LocalReply::upstream_timeout(),
                    reply_headers.as_ref(),
                    attempts.count,
                );
            }
            _ = until_stream_end() => {
                f.hcm.stats.downstream_rq_max_duration_reached.inc();
                return reply(&f, LocalReply::max_duration_timeout(), reply_headers.as_ref());
            }
        }
        let Some(next) = attempts.choose(&f, &headers) else {
            return no_healthy_upstream(&f, cluster, reply_headers.as_ref(), attempts.count);
        };
        host = next;
    };
    cluster.charge_response(resp.status().as_u16());
    host.record_response(resp.status().as_u16());
    let (mut parts, body) = resp.into_parts();
    crate::http::header_scan::remove_names(&mut parts.headers, HOP_BY_HOP);
    router_response_headers(&f, attempts.count, &mut parts.headers);
    if let Some(c) = request_hash.set_cookie {
        parts.headers.append(http::header::SET_COOKIE, c);
    }
    if let Some(w) = weighted {
        let fctx = FormatContext {
            downstream_remote: f.remote,
            downstream_local: f.info.local,
            protocol: if f.h2 { "HTTP/2" } else { "HTTP/1.1" },
            request_headers: None,
            upstream: Some(petrel_filters::header_formatter::UpstreamInfo {
                address: &host.address,
                metadata: host.metadata.as_ref(),
            }),
            start_time: f.start_time,
        };
        w.response_headers.apply(&mut parts.headers, &fctx);
    }
    parts.version = http::Version::HTTP_11;
    parts.extensions.insert(ChosenHost(host.clone()));
    // Envoy's `upstream_rq_time`: from the whole request received to the response's end.
    let mut body = IdleTimedBody::new(body, idle_timeout)
        .with_per_try_idle(
            per_try_idle_timeout,
            cluster.stats.upstream_rq_per_try_idle_timeout.clone(),
        )
        .timed(
            activity.request_done_at(),
            cluster.rq_time.for_request(internal_request),
        );
    // A stream past its max_stream_duration once the response has started is reset.
    if let Some(end) = stream_end {
        body.end_by(end, f.hcm.stats.downstream_rq_max_duration_reached.clone());
    }
    Response::from_parts(parts, Either::Right(body))
}

/// Marks the recorded body abandoned when the request ends (mirrors stop waiting for it).
struct SettleOnDrop(std::rc::Rc<Recording>);

impl Drop for SettleOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// Envoy's shadow host: `-shadow` appended to the host name, before any port.
fn shadow_host(a: &HeaderValue) -> HeaderValue {
    let s = String::from_utf8_lossy(a.as_bytes());
    let shadowed = match s.split_once(':') {
        Some((h, p)) if !p.contains(':') => format!("{h}-shadow:{p}"),
        _ => format!("{s}-shadow"),
    };
    HeaderValue::from_str(&shadowed).unwrap_or_else(|_| a.clone())
}

/// A mirrored request: fire and forget.
struct Shadow {
    ctx: std::rc::Rc<crate::worker::WorkerCtx>,
    snapshot: Arc<Snapshot>,
    cluster: String,
    headers: http::HeaderMap,
    method: http::Method,
    path: String,
    authority: Option<HeaderValue>,
    body: std::rc::Rc<Recording>,
    deadline: Option<Duration>,
}

/// Sends a mirror once the request body is complete; the answer is read and dropped. It never
/// touches the request it copies (Envoy's shadow writer).
async fn shadow(s: Shadow) {
    let run = async {
        if !s.body.settled().await {
            return;
        }
        // A mirror to a cluster that is gone (RDS without validation) is skipped, as in Envoy.
        let Some(cluster) = s.snapshot.clusters.get(&s.cluster) else {
            return;
        };
        let grpc = crate::http::local_reply::is_grpc(&s.headers);
        let out = Outgoing {
            method: s.method,
            path: s.path,
            authority: s.authority,
            headers: s.headers,
            body: Either::Right(s.body.attempt()),
        };
        if let Ok(resp) = async_client::send(&s.ctx, cluster, out, grpc).await {
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        }
    };
    match s.deadline {
        Some(d) => {
            let _ = tokio::time::timeout(d, run).await;
        }
        None => run.await,
    }
}

/// Envoy's 503 `UH`, charged to the cluster.
fn no_healthy_upstream(
    f: &Forward<'_>,
    cluster: &Cluster,
    reply_headers: Option<&http::HeaderMap>,
    attempts: u32,
) -> Response<ResponseBody> {
    cluster.stats.upstream_cx_none_healthy.inc();
    // Envoy charges the cluster with the 503 it answers for it.
    cluster.charge_response(503);
    router_reply(
        f,
        LocalReply::no_healthy_upstream(),
        reply_headers,
        attempts,
    )
}

/// Forwards an upgrade request; on `101` splices the two upgraded connections together.
async fn tunnel(
    f: &Forward<'_>,
    cluster: &crate::upstream::cluster::Cluster,
    host: &Arc<crate::upstream::cluster::Host>,
    up_req: Request<crate::upstream::pool::UpstreamBody>,
    down: tokio::sync::oneshot::Receiver<crate::http::h1::Upgraded>,
) -> Response<ResponseBody> {
    let stats = &cluster.stats;
    let sent = match f.fwd.timeout {
        Some(t) => tokio::time::timeout(t, f.ctx.upstreams.send_upgrade(cluster, host, up_req))
            .await
            .ok(),
        None => Some(f.ctx.upstreams.send_upgrade(cluster, host, up_req).await),
    };
    let mut resp = match sent {
        None => {
            stats.upstream_rq_timeout.inc();
            return reply(f, LocalReply::upstream_timeout(), None);
        }
        Some(Err(reason)) => {
            note_reset(f, &reason);
            return reply(f, LocalReply::upstream_reset(reason), None);
        }
        Some(Ok(r)) => r,
    };
    note_upstream_local(f, &resp);
    cluster.charge_response(resp.status().as_u16());
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let up = hyper::upgrade::on(&mut resp);
        tokio::task::spawn_local(async move {
            if let (Ok(mut d), Ok(u)) = (down.await, up.await) {
                use tokio::io::AsyncWriteExt;
                let mut u = hyper_util::rt::TokioIo::new(u);
                // Bytes the client sent right behind its upgrade request go first.
                if !d.leftover.is_empty() && u.write_all(&d.leftover).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut d.stream, &mut u).await;
            }
        });
    }
    let (mut parts, body) = resp.into_parts();
    router_response_headers(f, 1, &mut parts.headers);
    Response::from_parts(
        parts,
        Either::Right(IdleTimedBody::new(PooledBody::unpooled(body), None)),
    )
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
