//! HTTP tracing as Envoy's connection manager does it: the trace decision packed into
//! `x-request-id` (client, forced, random and overall sampling, with route overrides), a span per
//! stream from the configured tracer (`envoy.tracers.zipkin`), route decorators naming it, B3
//! propagation upstream, and Envoy's tags when the stream ends.

pub mod b3;
pub mod custom_tag;
pub mod reporter;
pub mod request_id;
pub mod zipkin;

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use petrel_filters::fraction::Fraction;
use xds_client::pb::envoy::config::route::v3 as route_pb;
use xds_client::pb::envoy::config::trace::v3::{tracing::http::ConfigType, tracing::Http};
use xds_client::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as HcmTracingPb;
use xds_client::TypeRegistry;

use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::Store;
use crate::stat_struct;
use custom_tag::CustomTag;
use request_id::Reason;
pub use zipkin::{Span, ZipkinDriver};

pub const ZIPKIN: &str = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig";
pub const DECORATOR_OPERATION: &str = "x-envoy-decorator-operation";

stat_struct!(TracingStats {
    counter random_sampling,
    counter service_forced,
    counter client_enabled,
    counter not_traceable,
    counter health_check,
});

/// Client, random and overall sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub client: Fraction,
    pub random: Fraction,
    pub overall: Fraction,
}

/// A connection manager's `tracing`.
#[derive(Debug)]
pub struct TracingConfig {
    pub driver: Arc<ZipkinDriver>,
    /// The listener's `traffic_direction: OUTBOUND`: CLIENT spans, decorators sent upstream.
    pub egress: bool,
    pub sampling: Sampling,
    pub custom_tags: Vec<CustomTag>,
    pub max_path_tag_length: usize,
    pub stats: TracingStats,
    /// The `node_id` tag.
    pub node_id: String,
}

/// A route's `tracing`: its sampling replaces the connection manager's; its tags add to them.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteTracing {
    pub sampling: Sampling,
    pub custom_tags: Vec<CustomTag>,
}

/// A route's `decorator`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decorator {
    pub operation: String,
    pub propagate: bool,
}

/// What compiling a tracing provider needs from the bootstrap and node.
pub struct TracingEnv<'a> {
    /// The bootstrap's `tracing.http`, compiled.
    pub default_driver: Option<&'a Arc<ZipkinDriver>>,
    pub node: zipkin::LocalNode<'a>,
    pub node_id: &'a str,
    pub known_clusters: &'a dyn Fn(&str) -> bool,
    pub store: &'a Store,
}

/// Compiles a `tracing.http` provider (the bootstrap's, or a connection manager's `provider`).
pub fn compile_provider(
    http: &Http,
    env: &TracingEnv<'_>,
    path: &str,
) -> Result<Arc<ZipkinDriver>, ConfigError> {
    let Some(ConfigType::TypedConfig(any)) = &http.config_type else {
        return Err(invalid(
            format!("{path}.typed_config"),
            "typed_config is required",
        ));
    };
    if any.type_url != ZIPKIN {
        return Err(ConfigError::UnsupportedExtension {
            path: format!("{path} ('{}')", http.name),
            why: petrel_filters::extensions::refusal(&any.type_url),
            type_url: any.type_url.clone(),
        });
    }
    let cfg = TypeRegistry::global().unpack(any)?;
    Ok(Arc::new(ZipkinDriver::compile(
        &cfg,
        &env.node,
        env.store,
        &format!("{path}.typed_config"),
    )?))
}

fn percent(p: &Option<xds_client::pb::envoy::r#type::v3::Percent>) -> Fraction {
    p.as_ref()
        .map_or(Fraction::ALL, |p| Fraction::from_percent(p.value))
}

/// Compiles a connection manager's `tracing`; `egress` is its listener's direction.
pub fn compile(
    t: &HcmTracingPb,
    egress: bool,
    env: &TracingEnv<'_>,
    stat_prefix: &str,
    path: &str,
) -> Result<TracingConfig, ConfigError> {
    let mut rest = t.clone();
    let driver = match rest.provider.take() {
        Some(p) => compile_provider(&p, env, &format!("{path}.provider"))?,
        None => env.default_driver.cloned().ok_or_else(|| {
            invalid(
                path,
                "tracing needs a provider: neither the connection manager nor the bootstrap has one",
            )
        })?,
    };
    if !(env.known_clusters)(&driver.collector_cluster) {
        return Err(invalid(
            path,
            format!(
                "envoy.tracers.zipkin: unknown cluster '{}'",
                driver.collector_cluster
            ),
        ));
    }
    let sampling = Sampling {
        client: percent(&rest.client_sampling.take()),
        random: percent(&rest.random_sampling.take()),
        overall: percent(&rest.overall_sampling.take()),
    };
    let custom_tags = custom_tag::compile(
        &std::mem::take(&mut rest.custom_tags),
        &format!("{path}.custom_tags"),
    )?;
    let max_path_tag_length = rest
        .max_path_tag_length
        .take()
        .map_or(256, |v| v.value as usize);
    if std::mem::take(&mut rest.verbose) {
        return Err(ConfigError::Unsupported {
            path: format!("{path}.verbose"),
            fields: "'verbose' (stream event annotations)".into(),
        });
    }
    if rest.spawn_upstream_span.take().is_some_and(|b| b.value) {
        return Err(ConfigError::Unsupported {
            path: format!("{path}.spawn_upstream_span"),
            fields: "'spawn_upstream_span' (upstream spans)".into(),
        });
    }
    reject_unhandled(&rest, path)?;
    Ok(TracingConfig {
        driver,
        egress,
        sampling,
        custom_tags,
        max_path_tag_length,
        stats: TracingStats::new(env.store, &format!("http.{stat_prefix}.tracing.")),
        node_id: env.node_id.to_string(),
    })
}

/// A route's `tracing`; absent fractions are 100 %, as Envoy's route tracing defaults them.
pub fn compile_route(t: &route_pb::Tracing, path: &str) -> Result<RouteTracing, ConfigError> {
    let fraction = |p: &Option<xds_client::pb::envoy::r#type::v3::FractionalPercent>| {
        p.as_ref()
            .map_or(Fraction::ALL, |p| Fraction::from_proto(Some(p)))
    };
    Ok(RouteTracing {
        sampling: Sampling {
            client: fraction(&t.client_sampling),
            random: fraction(&t.random_sampling),
            overall: fraction(&t.overall_sampling),
        },
        custom_tags: custom_tag::compile(&t.custom_tags, &format!("{path}.custom_tags"))?,
    })
}

pub fn compile_decorator(d: &route_pb::Decorator, path: &str) -> Result<Decorator, ConfigError> {
    if d.operation.is_empty() {
        return Err(invalid(
            format!("{path}.operation"),
            "value length must be at least 1 characters",
        ));
    }
    Ok(Decorator {
        operation: d.operation.clone(),
        propagate: d.propagate.as_ref().is_none_or(|b| b.value),
    })
}

const REQUEST_ID: &str = "x-request-id";

impl TracingConfig {
    /// Envoy's `mutateTracingRequestHeader`: decides whether the request is traced and packs the
    /// reason into its `x-request-id` (a request already carrying a decision keeps it, unless
    /// overall sampling says no). Returns the reason the id now carries, and counts it.
    pub fn decide(&self, headers: &mut HeaderMap, route: Option<&RouteTracing>) -> Reason {
        let s = route.map_or(&self.sampling, |r| &r.sampling);
        let reason = match headers.get(REQUEST_ID).map(HeaderValue::as_bytes) {
            None => Reason::NotTraceable,
            Some(id) => match request_id::to_integer(id) {
                // A corrupted id is left alone (and is not traceable unless it says so).
                None => request_id::reason(id),
                Some(n) => {
                    let draw = n % 10_000;
                    let mut reason = request_id::reason(id);
                    if reason == Reason::NotTraceable {
                        if headers.contains_key("x-client-trace-id") && s.client.hit() {
                            reason = Reason::ClientForced;
                        } else if headers.contains_key("x-envoy-force-trace") {
                            reason = Reason::ServiceForced;
                        } else if s.random.hit_with(draw) {
                            reason = Reason::Sampling;
                        }
                    }
                    if !s.overall.hit_with(draw) {
                        reason = Reason::NotTraceable;
                    }
                    match request_id::with_reason(id, reason)
                        .and_then(|v| HeaderValue::from_bytes(&v).ok())
                    {
                        Some(v) => {
                            headers.insert(HeaderName::from_static(REQUEST_ID), v);
                            reason
                        }
                        None => Reason::NotTraceable,
                    }
                }
            },
        };
        match reason {
            Reason::Sampling => self.stats.random_sampling.inc(),
            Reason::ServiceForced => self.stats.service_forced.inc(),
            Reason::ClientForced => self.stats.client_enabled.inc(),
            Reason::NotTraceable => self.stats.not_traceable.inc(),
        }
        reason
    }

    /// Starts the stream's span, named by the request's authority until a decorator renames
    /// it; applies the route's decorator as Envoy's `traceRequest` does. Returns the span (if
    /// the request's B3 context could be read) and the operation to send back downstream.
    pub fn start(
        &self,
        headers: &mut HeaderMap,
        authority: &str,
        reason: Reason,
        decorator: Option<&Decorator>,
        start_time: std::time::SystemTime,
    ) -> (Option<Span>, Option<String>) {
        let mut span = self.driver.start_span(
            headers,
            reason.traced(),
            self.egress,
            authority.to_string(),
            start_time,
        );
        let mut decorated = None;
        if let Some(d) = decorator {
            if let Some(s) = span.as_mut() {
                s.name.clone_from(&d.operation);
            }
            if d.propagate {
                decorated = Some(d.operation.clone());
            }
        }
        let op = HeaderName::from_static(DECORATOR_OPERATION);
        if self.egress {
            // Outbound: the receiving sidecar names its server span after ours.
            if let Some(v) = decorated
                .as_deref()
                .and_then(|o| HeaderValue::from_str(o).ok())
            {
                headers.insert(op, v);
            }
            (span, None)
        } else {
            // Inbound: a caller's operation names our span, and is not passed to the service.
            if let Some(v) = headers.remove(&op) {
                if !v.is_empty() {
                    if let (Some(s), Ok(o)) = (span.as_mut(), v.to_str()) {
                        s.name = o.to_string();
                    }
                    decorated = None;
                }
            }
            (span, decorated)
        }
    }

    /// Egress: an upstream's `x-envoy-decorator-operation` renames the client span and goes no
    /// further. Ingress: our decorated operation goes back to the caller.
    pub fn on_response(
        &self,
        headers: &mut HeaderMap,
        span: Option<&mut Span>,
        decorated: Option<&str>,
    ) {
        let op = HeaderName::from_static(DECORATOR_OPERATION);
        if self.egress {
            if let Some(v) = headers.remove(&op) {
                if let (Some(s), Ok(o)) = (span, v.to_str()) {
                    if !o.is_empty() {
                        s.name = o.to_string();
                    }
                }
            }
        } else if let Some(v) = decorated.and_then(|o| HeaderValue::from_str(o).ok()) {
            headers.insert(op, v);
        }
    }
}

/// What a finished stream tells its span.
pub struct StreamEnd<'a> {
    pub request_headers: Option<&'a HeaderMap>,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: &'a str,
    pub direct_remote: std::net::IpAddr,
    pub status: u16,
    pub flags: &'a str,
    pub cluster: Option<&'a str>,
    pub received: u64,
    pub sent: u64,
    pub metadata: &'a petrel_filters::http_filter::DynamicMetadata,
}

impl TracingConfig {
    /// Envoy's `finalizeDownstreamSpan`: the request's and response's tags, the custom tags
    /// (the route's after the connection manager's), then the span is done.
    pub fn finish(
        &self,
        mut span: Span,
        end: &StreamEnd<'_>,
        route_tags: &[CustomTag],
    ) -> Option<String> {
        let req = end.request_headers;
        let header = |name: &str| req.and_then(|h| h.get(name)).and_then(|v| v.to_str().ok());
        span.set_tag("node_id", self.node_id.clone());
        if let Some(id) = header(REQUEST_ID) {
            span.set_tag("guid:x-request-id", id);
        }
        let path = header("x-envoy-original-path").unwrap_or(end.path);
        let path = match path.char_indices().nth(self.max_path_tag_length) {
            Some((i, _)) => &path[..i],
            None => path,
        };
        let scheme = header("x-forwarded-proto").unwrap_or("http");
        let host = header("host").unwrap_or(end.authority);
        span.set_tag("http.url", format!("{scheme}://{host}{path}"));
        span.set_tag("http.method", end.method);
        span.set_tag(
            "downstream_cluster",
            header("x-envoy-downstream-service-cluster").unwrap_or("-"),
        );
        span.set_tag("user_agent", header("user-agent").unwrap_or("-"));
        span.set_tag("http.protocol", end.protocol);
        span.set_tag("peer.address", end.direct_remote.to_string());
        if let Some(id) = header("x-client-trace-id") {
            span.set_tag("guid:x-client-trace-id", id);
        }
        if header("content-type").is_some_and(|c| c.starts_with("application/grpc")) {
            span.set_tag("grpc.path", end.path);
            span.set_tag("grpc.authority", host);
            span.set_tag("grpc.content_type", header("content-type").unwrap_or(""));
            span.set_tag("grpc.timeout", header("grpc-timeout").unwrap_or(""));
        }
        let metadata = end.metadata;
        for t in self.custom_tags.iter().chain(route_tags) {
            span.set_tag(t.tag, t.value(req, metadata));
        }
        span.set_tag("component", "proxy");
        span.set_tag("http.status_code", end.status.to_string());
        span.set_tag(
            "response_flags",
            if end.flags.is_empty() { "-" } else { end.flags },
        );
        if let Some(c) = end.cluster {
            span.set_tag("upstream_cluster", c);
            span.set_tag("upstream_cluster.name", c);
        }
        if end.status >= 500 || end.status == 0 {
            span.set_tag("error", "true");
        }
        span.set_tag("request_size", end.received.to_string());
        span.set_tag("response_size", end.sent.to_string());
        span.finish()
    }
}

/// A stream's span with what finishing it needs.
pub struct ActiveTrace {
    pub span: Span,
    pub config: Arc<TracingConfig>,
    /// The route's custom tags.
    pub route_tags: Vec<CustomTag>,
}
