//! `envoy.tracers.zipkin`: the driver compiled from `ZipkinConfig`, spans as Envoy's Zipkin
//! tracer makes them, and their Zipkin v2 JSON (`HTTP_JSON`).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use xds_client::pb::envoy::config::trace::v3::{zipkin_config, ZipkinConfig};

use super::b3::{self, Format, SpanContext};
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::Store;
use crate::stat_struct;

stat_struct!(ZipkinStats {
    counter spans_sent,
    counter timer_flushed,
    counter reports_skipped_no_cluster,
    counter reports_sent,
    counter reports_dropped,
    counter reports_failed,
});

/// Where spans go and how they are shaped.
#[derive(Debug)]
pub struct ZipkinDriver {
    pub collector_cluster: String,
    pub collector_endpoint: String,
    /// The collector request's `host` (`collector_hostname`, else the cluster name).
    pub collector_hostname: String,
    pub trace_id_128bit: bool,
    pub shared_span_context: bool,
    /// The span's local endpoint: the node's cluster and the proxy's address.
    pub service_name: String,
    pub local_ip: std::net::IpAddr,
    pub stats: ZipkinStats,
}

/// What the driver needs from the node.
pub struct LocalNode<'a> {
    pub cluster: &'a str,
    pub address: std::net::IpAddr,
}

impl ZipkinDriver {
    pub fn compile(
        cfg: &ZipkinConfig,
        node: &LocalNode<'_>,
        store: &Store,
        path: &str,
    ) -> Result<ZipkinDriver, ConfigError> {
        let mut rest = cfg.clone();
        let collector_cluster = std::mem::take(&mut rest.collector_cluster);
        if collector_cluster.is_empty() {
            return Err(invalid(
                format!("{path}.collector_cluster"),
                "value length must be at least 1 characters",
            ));
        }
        let collector_endpoint = std::mem::take(&mut rest.collector_endpoint);
        if collector_endpoint.is_empty() {
            return Err(invalid(
                format!("{path}.collector_endpoint"),
                "value length must be at least 1 characters",
            ));
        }
        match zipkin_config::CollectorEndpointVersion::try_from(std::mem::take(
            &mut rest.collector_endpoint_version,
        )) {
            Ok(zipkin_config::CollectorEndpointVersion::HttpJson) => {}
            Ok(zipkin_config::CollectorEndpointVersion::DeprecatedAndUnavailableDoNotUse) => {
                return Err(invalid(
                    format!("{path}.collector_endpoint_version"),
                    "hidden_envoy_deprecated_HTTP_JSON_V1 has been deprecated. Please use a \
                     non-default envoy::config::trace::v3::ZipkinConfig::CollectorEndpointVersion \
                     value.",
                ))
            }
            _ => {
                return Err(ConfigError::Unsupported {
                    path: format!("{path}.collector_endpoint_version"),
                    fields: "HTTP_PROTO and GRPC (Petrel reports HTTP_JSON)".into(),
                })
            }
        }
        let hostname = std::mem::take(&mut rest.collector_hostname);
        let collector_hostname = if hostname.is_empty() {
            collector_cluster.clone()
        } else {
            hostname
        };
        let trace_id_128bit = std::mem::take(&mut rest.trace_id_128bit);
        let shared_span_context = rest
            .shared_span_context
            .take()
            .map(|b| b.value)
            .unwrap_or(true);
        if rest.trace_context_option != 0 {
            return Err(ConfigError::Unsupported {
                path: format!("{path}.trace_context_option"),
                fields: "USE_B3_WITH_W3C_PROPAGATION (Petrel propagates B3 only)".into(),
            });
        }
        reject_unhandled(&rest, path)?;
        Ok(ZipkinDriver {
            collector_cluster,
            collector_endpoint,
            collector_hostname,
            trace_id_128bit,
            shared_span_context,
            service_name: node.cluster.to_string(),
            local_ip: node.address,
            stats: ZipkinStats::new(store, "tracing.zipkin."),
        })
    }

    /// Starts the stream's span, as Envoy's driver does: a child of the request's B3 context
    /// (sharing its id for a server span with `shared_span_context`), else a new trace. The
    /// request's sampling flag beats the local decision. A malformed context gives no span.
    pub fn start_span(
        self: &Arc<Self>,
        headers: &http::HeaderMap,
        traced: bool,
        client: bool,
        name: String,
        start_time: SystemTime,
    ) -> Option<Span> {
        let e = b3::extract(headers).ok()?;
        let sampled = e.sampled.unwrap_or(traced);
        let context = match e.context {
            None => {
                let id = rand::random::<u64>();
                let high = self.trace_id_128bit.then(rand::random::<u64>);
                SpanContext {
                    trace_id_high: high,
                    trace_id: id,
                    id,
                    parent_id: None,
                }
            }
            Some(prev) if client || !self.shared_span_context => SpanContext {
                id: rand::random::<u64>(),
                parent_id: Some(prev.id),
                ..prev
            },
            // A server span sharing the caller's context keeps its id and parent.
            Some(prev) => prev,
        };
        Some(Span {
            driver: self.clone(),
            context,
            sampled,
            format: e.format,
            client,
            name,
            start_time,
            start: Instant::now(),
            tags: Vec::new(),
        })
    }
}

/// A stream's span while the stream runs.
pub struct Span {
    pub driver: Arc<ZipkinDriver>,
    pub context: SpanContext,
    pub sampled: bool,
    pub format: Format,
    /// A CLIENT span (egress), else SERVER.
    pub client: bool,
    pub name: String,
    start_time: SystemTime,
    start: Instant,
    tags: Vec<(&'static str, String)>,
}

/// A tag name: Envoy's own are static, custom ones live as long as their config.
pub type TagName = &'static str;

impl Span {
    /// Writes this span's context into the upstream request.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        b3::inject(headers, &self.context, self.sampled, self.format);
    }

    /// Adds a tag; Zipkin drops empty names and values (as Envoy's span does).
    pub fn set_tag(&mut self, name: TagName, value: impl Into<String>) {
        let value = value.into();
        if !name.is_empty() && !value.is_empty() {
            self.tags.push((name, value));
        }
    }

    /// Ends the span: the JSON of a sampled span, for the reporter.
    pub fn finish(self) -> Option<String> {
        self.sampled.then(|| self.to_json(SystemTime::now()))
    }

    fn to_json(&self, end_time: SystemTime) -> String {
        use serde_json::{json, Map, Value};
        let micros = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64)
        };
        let d = &self.driver;
        let mut endpoint = Map::new();
        let ip_key = if d.local_ip.is_ipv4() { "ipv4" } else { "ipv6" };
        endpoint.insert(ip_key.into(), Value::from(d.local_ip.to_string()));
        endpoint.insert("port".into(), Value::from(0));
        if !d.service_name.is_empty() {
            endpoint.insert("serviceName".into(), Value::from(d.service_name.clone()));
        }
        // Later tags with the same name win, as in Envoy's JSON map.
        let mut tags = Map::new();
        for (k, v) in &self.tags {
            tags.insert((*k).to_string(), Value::from(v.clone()));
        }
        let mut span = Map::new();
        span.insert(
            "traceId".into(),
            Value::from(b3::trace_id_hex(&self.context)),
        );
        if let Some(p) = self.context.parent_id {
            span.insert("parentId".into(), Value::from(format!("{p:016x}")));
        }
        span.insert(
            "id".into(),
            Value::from(format!("{:016x}", self.context.id)),
        );
        if !self.name.is_empty() {
            span.insert("name".into(), Value::from(self.name.clone()));
        }
        span.insert(
            "kind".into(),
            Value::from(if self.client { "CLIENT" } else { "SERVER" }),
        );
        // Envoy marks every server span of a shared-context tracer (its SR and SS annotations).
        if !self.client && d.shared_span_context {
            span.insert("shared".into(), Value::from(true));
        }
        span.insert("timestamp".into(), Value::from(micros(self.start_time)));
        span.insert(
            "duration".into(),
            Value::from(self.start.elapsed().as_micros() as u64),
        );
        span.insert("localEndpoint".into(), Value::Object(endpoint));
        if !tags.is_empty() {
            span.insert("tags".into(), Value::Object(tags));
        }
        // The closing annotation (client receive / server send), as Envoy lists it.
        span.insert(
            "annotations".into(),
            json!([{ "timestamp": micros(end_time), "value": if self.client { "cr" } else { "ss" } }]),
        );
        Value::Object(span).to_string()
    }
}
