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

    pub fn upstream_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
            "UT",
            "upstream_response_timeout",
        )
    }

    pub fn upstream_reset(reason: crate::upstream::pool::ResetReason) -> Self {
        let body = format!(
            "upstream connect error or disconnect/reset before headers. reset reason: {}",
            reason.as_str()
        );
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            body,
            reason.flag(),
            "upstream_reset_before_response_started",
        )
    }

    /// The body and headers as they go on the wire: a non-empty body gets `text/plain` unless the
    /// reply already names a content type.
    pub fn render(&self) -> (StatusCode, HeaderMap, Bytes) {
        let mut h = self.headers.clone();
        if !self.body.is_empty() && !h.contains_key(CONTENT_TYPE) {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        h.insert(CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        (self.status, h, self.body.clone())
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
        let (s, h, b) = LocalReply::route_not_found().render();
        assert_eq!((s.as_u16(), b.len()), (404, 0));
        assert!(!h.contains_key(CONTENT_TYPE));
        let r = LocalReply::upstream_reset(crate::upstream::pool::ResetReason::ConnectionFailure);
        assert_eq!(&r.body[..], b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure");
        assert_eq!(r.flag, "UF");
    }
}
