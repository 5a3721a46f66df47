//! The one path every locally generated response takes (route-not-found, no healthy upstream,
//! upstream failures and timeouts, direct responses, redirects, filter replies), so that status,
//! body, `content-type` and the response flag are set in one place — and, with the observability
//! issue, `local_reply_config` mappers apply to all of them alike.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};

/// A locally generated response before it is rendered.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: StatusCode,
    pub body: Bytes,
    /// Envoy response flag (`NR`, `UH`, `UF`, `UT`, …), empty for none.
    pub flag: &'static str,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub details: &'static str,
    pub headers: HeaderMap,
    /// The gRPC status for gRPC requests, when not derived from `status`.
    pub grpc_status: Option<u32>,
}

impl LocalReply {
    pub fn new(
        status: StatusCode,
        body: impl Into<Bytes>,
        flag: &'static str,
        details: &'static str,
    ) -> Self {
        LocalReply {
            status,
            body: body.into(),
            flag,
            details,
            headers: HeaderMap::new(),
            grpc_status: None,
        }
    }

    /// Envoy's 404 for a request no route matched: no body.
    pub fn route_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, Bytes::new(), "NR", "route_not_found")
    }

    pub fn no_healthy_upstream() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            "UH",
            "no_healthy_upstream",
        )
    }

    pub fn cluster_not_found(status: StatusCode) -> Self {
        Self::new(status, Bytes::new(), "NC", "cluster_not_found")
    }

    /// Envoy answers 504 when the request was complete and it was waiting on the upstream, and
    /// 408 while the downstream was still sending.
    pub fn stream_idle_timeout(request_complete: bool) -> Self {
        let status = if request_complete {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::REQUEST_TIMEOUT
        };
        Self::new(status, "stream timeout", "SI", "stream_idle_timeout")
    }

    pub fn request_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request timeout",
            "",
            "request_overall_timeout",
        )
    }

    /// The route's `max_stream_duration` passed before the response started.
    pub fn max_duration_timeout() -> Self {
        LocalReply {
            // gRPC callers see DEADLINE_EXCEEDED, as Envoy sends it.
            grpc_status: Some(4),
            ..Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "downstream duration timeout",
                "DT",
                "max_duration_timeout",
            )
        }
    }

    pub fn upstream_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
            "UT",
            "upstream_response_timeout",
        )
    }

    /// A retry policy's `per_try_timeout` ran out on the last attempt.
    /// A per-try (or, `idle`, per-try idle) timeout with no retry left.
    pub fn per_try_timeout(idle: bool) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
            "UT",
            if idle {
                "upstream_per_try_idle_timeout"
            } else {
                "upstream_per_try_timeout"
            },
        )
    }

    /// A request the router could not turn into an upstream request.
    pub fn invalid_request() -> Self {
        Self::new(StatusCode::BAD_REQUEST, "", "DPE", "invalid_request")
    }

    /// Envoy's answer to a request its codec cannot decode.
    pub fn downstream_protocol_error() -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", "DPE", "codec_error")
    }

    pub fn upstream_reset(reason: crate::upstream::pool::ResetReason) -> Self {
        Self::upstream_reset_after(reason, false)
    }

    /// The reset reply; after retries Envoy says the reason is the latest one.
    pub fn upstream_reset_after(reason: crate::upstream::pool::ResetReason, retried: bool) -> Self {
        if reason == crate::upstream::pool::ResetReason::DownstreamBody {
            return Self::downstream_protocol_error();
        }
        let body = format!(
            "upstream connect error or disconnect/reset before headers. {}reset reason: {}",
            if retried {
                "retried and the latest "
            } else {
                ""
            },
            reason.as_str()
        );
        let mut r = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            body,
            reason.flag(),
            "upstream_reset_before_response_started",
        );
        // A circuit breaker's refusal tells the client so.
        if reason == crate::upstream::pool::ResetReason::Overflow {
            r.headers.insert(
                http::header::HeaderName::from_static("x-envoy-overloaded"),
                HeaderValue::from_static("true"),
            );
        }
        r
    }

    /// The body and headers as the encoder filters see them: a non-empty body gets its length
    /// and `text/plain` unless the reply already names a content type; an empty one gets no
    /// length (the HTTP/1.1 codec writes `content-length: 0` except on 204 and 304, HTTP/2
    /// none), as Envoy's local replies.
    pub fn render(&self) -> (StatusCode, HeaderMap, Bytes) {
        let mut h = self.headers.clone();
        if !self.body.is_empty() {
            if !h.contains_key(CONTENT_TYPE) {
                h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            h.insert(CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        }
        (self.status, h, self.body.clone())
    }
}

/// Whether a request is gRPC (its local replies then take gRPC form; `grpc_stats` and Istio's
/// stats count it): `application/grpc`, or with a `+codec` or `;parameters` — not gRPC-Web, and
/// not `application/grpcx` (Envoy answers those a plain 404).
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`.
pub fn http_to_grpc_status(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Envoy's `Grpc::Utility::grpcToHttpStatus`.
pub fn grpc_to_http_status(status: u64) -> u16 {
    match status {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

impl LocalReply {
    /// A local reply to a gRPC request: HTTP 200 with the status in `grpc-status` and the body in
    /// `grpc-message`, as Envoy's `sendLocalReply` does for gRPC.
    pub fn render_grpc(&self) -> (StatusCode, HeaderMap, Bytes) {
        let mut h = self.headers.clone();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let grpc = self
            .grpc_status
            .unwrap_or_else(|| http_to_grpc_status(self.status.as_u16()));
        h.insert("grpc-status", HeaderValue::from(grpc));
        let msg = if self.body.is_empty() {
            self.status.canonical_reason().unwrap_or("").to_string()
        } else {
            String::from_utf8_lossy(&self.body).into_owned()
        };
        let encoded =
            percent_encoding::utf8_percent_encode(&msg, percent_encoding::CONTROLS).to_string();
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert("grpc-message", v);
        }
        (StatusCode::OK, h, Bytes::new())
    }
}

impl From<petrel_filters::http_filter::LocalReply> for LocalReply {
    fn from(r: petrel_filters::http_filter::LocalReply) -> Self {
        LocalReply {
            status: r.status,
            body: r.body,
            flag: r.response_flag,
            details: r.details,
            headers: r.headers,
            grpc_status: r.grpc_status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_bodies() {
        let (s, h, b) = LocalReply::no_healthy_upstream().render();
        assert_eq!(s, 503);
        assert_eq!(&b[..], b"no healthy upstream");
        assert_eq!(h[CONTENT_TYPE], "text/plain");
        assert_eq!(h[CONTENT_LENGTH], "19");
        let (s, h, b) = LocalReply::route_not_found().render();
        assert_eq!((s.as_u16(), b.len()), (404, 0));
        // The codec, not the reply, says an empty body's length.
        assert!(!h.contains_key(CONTENT_TYPE) && !h.contains_key(CONTENT_LENGTH));
        let r =
            LocalReply::upstream_reset(crate::upstream::pool::ResetReason::ConnectionFailure(111));
        assert_eq!(&r.body[..], b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure");
        assert_eq!(r.flag, "UF");
    }
}
