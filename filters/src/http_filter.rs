//! The HTTP filter interface, shaped like Envoy's `StreamDecoderFilter`/`StreamEncoderFilter`.
//!
//! The connection manager runs decoder callbacks in configuration order and encoder callbacks in
//! reverse order; the router is the terminal filter and lives in the proxy. A filter answers each
//! callback with a [`FilterStatus`]: continue down the chain, or stop it with a local reply that
//! goes through the connection manager's single local-reply path.

use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// A response the filter chain asks the connection manager to generate locally.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReply {
    pub status: StatusCode,
    pub body: Bytes,
    /// Envoy's response flag for access logs (e.g. `FI` for a fault abort).
    pub response_flag: &'static str,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub details: &'static str,
    /// Extra response headers (e.g. `x-envoy-overloaded`).
    pub headers: HeaderMap,
    /// The gRPC status a gRPC request is answered with (else derived from `status`).
    pub grpc_status: Option<u32>,
}

#[derive(Debug, PartialEq)]
pub enum FilterStatus {
    Continue,
    /// Stop iteration and answer with this local reply.
    LocalReply(Box<LocalReply>),
    /// Hold the request this long, then call the filter's `resume` (a fault delay).
    Pause(std::time::Duration),
}

/// A route's compiled `typed_per_filter_config` entry, downcast by the filter that owns it.
pub type RouteFilterConfig = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// `typed_per_filter_config` of one route, virtual host or route configuration, by filter name.
#[derive(Clone, Default)]
pub struct PerFilterConfigs(Vec<(String, RouteFilterConfig)>);

impl PerFilterConfigs {
    pub fn new(configs: Vec<(String, RouteFilterConfig)>) -> Self {
        PerFilterConfigs(configs)
    }
    pub fn get(&self, filter: &str) -> Option<&RouteFilterConfig> {
        self.0.iter().find(|(n, _)| n == filter).map(|(_, c)| c)
    }
}

impl std::fmt::Debug for PerFilterConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

/// What a decoder filter knows of the route the request took.
#[derive(Clone, Copy)]
pub struct RouteInfo<'a> {
    /// The route's cluster when it names one.
    pub cluster: Option<&'a str>,
    /// That cluster's Istio metadata, when the chain has a filter that reads it.
    pub cluster_istio: Option<&'a crate::workload_metadata::IstioClusterMetadata>,
    /// Per-filter configs, most specific first (route, then virtual host).
    pub configs: [&'a PerFilterConfigs; 2],
}

impl<'a> RouteInfo<'a> {
    /// The most specific per-filter config for `filter`.
    pub fn config(&self, filter: &str) -> Option<&'a RouteFilterConfig> {
        self.configs.iter().find_map(|c| c.get(filter))
    }
}

/// The client certificate of an mTLS connection, as filters see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerCert<'a> {
    pub uri_sans: &'a [String],
    pub dns_sans: &'a [String],
    pub subject: &'a str,
}

/// Facts about the stream every filter may read.
#[derive(Debug, Clone, Copy)]
pub struct StreamInfo<'a> {
    /// After `x-forwarded-for` processing.
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub protocol: &'static str,
    pub start_time: SystemTime,
    /// The peer of the connection.
    pub downstream_direct_remote: SocketAddr,
    /// The SNI `tls_inspector` read (empty without one).
    pub requested_server_name: &'a str,
    pub peer: Option<PeerCert<'a>>,
    pub scheme: &'a str,
    pub authority: &'a str,
    /// The connection's filter state.
    pub filter_state: &'a crate::filter_state::FilterState,
}

/// ALPN lists to offer upstream instead of the cluster's, by the upstream connection's protocol
/// (Istio's `istio.alpn` filter sets them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamAlpn {
    pub http10: Option<std::sync::Arc<[Vec<u8>]>>,
    pub http11: Option<std::sync::Arc<[Vec<u8>]>>,
    pub http2: Option<std::sync::Arc<[Vec<u8>]>>,
}

/// A stream's dynamic metadata: filter namespace → fields (what `%DYNAMIC_METADATA%` reads).
pub type DynamicMetadata =
    std::collections::BTreeMap<String, serde_json::Map<String, serde_json::Value>>;

/// The peers Istio's peer-metadata filter discovered for one stream (Envoy keeps them as the
/// stream's `downstream_peer`/`upstream_peer` filter state), for the stats filter to read.
#[derive(Debug, Clone, Default)]
pub struct StreamPeers {
    pub downstream: Option<std::sync::Arc<crate::workload_metadata::WorkloadMetadata>>,
    pub upstream: Option<std::sync::Arc<crate::workload_metadata::WorkloadMetadata>>,
}

/// Request-side view a decoder filter gets.
pub struct RequestHead<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub headers: &'a mut HeaderMap,
    pub info: &'a StreamInfo<'a>,
    /// The route, when one matched.
    pub route: Option<RouteInfo<'a>>,
    /// An ALPN override for the upstream connection.
    pub upstream_alpn: &'a mut Option<std::sync::Arc<UpstreamAlpn>>,
    /// The stream's dynamic metadata, for filters to write.
    pub dynamic_metadata: &'a mut DynamicMetadata,
    pub peers: &'a mut StreamPeers,
}

/// Response-side view an encoder filter gets.
pub struct ResponseHead<'a> {
    pub status: &'a mut StatusCode,
    pub headers: &'a mut HeaderMap,
    pub info: &'a StreamInfo<'a>,
    /// The response has no body.
    pub end_stream: bool,
    pub peers: &'a mut StreamPeers,
    /// The cluster the request went to, with its Istio metadata when it has any.
    pub cluster: Option<&'a str>,
    pub cluster_istio: Option<&'a crate::workload_metadata::IstioClusterMetadata>,
}

/// Rewrites a response body chunk by chunk (a compressor): what `encodeData` does to it.
pub trait BodyEncoder: Send {
    /// The bytes to send for this chunk; `end_stream` on the last (possibly empty) one.
    fn encode(&mut self, data: Bytes, end_stream: bool) -> Bytes;
}

/// One stream's instance of a filter (created per request by its factory, on one worker).
pub trait HttpFilter {
    fn decode_headers(&mut self, _req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        FilterStatus::Continue
    }
    /// After a `Pause`: how the request goes on.
    fn resume(&mut self, _req: &mut RequestHead<'_>) -> FilterStatus {
        FilterStatus::Continue
    }
    fn encode_headers(&mut self, _resp: &mut ResponseHead<'_>) -> FilterStatus {
        FilterStatus::Continue
    }
    /// A limit on the response body's throughput (the fault filter's response rate limit).
    fn response_bytes_per_second(&self) -> Option<u64> {
        None
    }
    /// After `encode_headers`: what rewrites the response body, when this filter does.
    fn response_body_encoder(&mut self) -> Option<Box<dyn BodyEncoder>> {
        None
    }
}

/// A compiled filter configuration that makes per-stream filter instances.
pub trait HttpFilterFactory: Send + Sync + std::fmt::Debug {
    /// Envoy's filter name from the config (`envoy.filters.http.fault`, …).
    fn name(&self) -> &str;
    fn create(&self) -> Box<dyn HttpFilter>;
}
