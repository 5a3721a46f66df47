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
}

#[derive(Debug, PartialEq)]
pub enum FilterStatus {
    Continue,
    /// Stop iteration and answer with this local reply.
    LocalReply(Box<LocalReply>),
}

/// Facts about the stream every filter may read.
#[derive(Debug, Clone, Copy)]
pub struct StreamInfo {
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub protocol: &'static str,
    pub start_time: SystemTime,
}

/// Request-side view a decoder filter gets.
pub struct RequestHead<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub headers: &'a mut HeaderMap,
    pub info: &'a StreamInfo,
}

/// Response-side view an encoder filter gets.
pub struct ResponseHead<'a> {
    pub status: &'a mut StatusCode,
    pub headers: &'a mut HeaderMap,
    pub info: &'a StreamInfo,
}

/// One stream's instance of a filter (created per request by its factory, on one worker).
pub trait HttpFilter {
    fn decode_headers(&mut self, _req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        FilterStatus::Continue
    }
    fn encode_headers(&mut self, _resp: &mut ResponseHead<'_>) -> FilterStatus {
        FilterStatus::Continue
    }
}

/// A compiled filter configuration that makes per-stream filter instances.
pub trait HttpFilterFactory: Send + Sync + std::fmt::Debug {
    /// Envoy's filter name from the config (`envoy.filters.http.fault`, …).
    fn name(&self) -> &str;
    fn create(&self) -> Box<dyn HttpFilter>;
}
