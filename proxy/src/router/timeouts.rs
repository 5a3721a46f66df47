//! The router's timeouts for one request (Envoy's `FilterUtility::finalTimeout`): the route
//! `timeout` or, for gRPC with `max_grpc_timeout`, the `grpc-timeout` header; the retry
//! policy's `per_try_timeout`; both overridable by `x-envoy-upstream-rq-timeout-ms` and
//! `x-envoy-upstream-rq-per-try-timeout-ms`. Also the `x-envoy-expected-rq-timeout-ms` and
//! `grpc-timeout` values each attempt tells the upstream.
//!
//! A route with `max_stream_duration` uses Envoy's "new timeouts": the route `timeout` and
//! `max_grpc_timeout` are ignored, and the stream's duration is limited instead (by
//! `max_stream_duration`, or a `grpc-timeout` header capped by `grpc_timeout_header_max`), as
//! the connection manager's `refreshDurationTimeout` computes it.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::retry_policy::RetryPolicy;
use super::route_config::ForwardAction;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timeouts {
    /// The whole request, all attempts included; None is no limit.
    pub global: Option<Duration>,
    pub per_try: Option<Duration>,
    /// gRPC with `max_grpc_timeout`: the upstream is told the deadline in `grpc-timeout`.
    pub rewrite_grpc_timeout: bool,
    /// The stream's maximum duration from its start (route `max_stream_duration`); reaching
    /// it answers 504 `downstream duration timeout`.
    pub stream: Option<Duration>,
}

/// A route's `max_stream_duration`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamDuration {
    /// Zero disables the limit.
    pub max: Option<Duration>,
    pub grpc_timeout_header_max: Option<Duration>,
    pub grpc_timeout_header_offset: Option<Duration>,
}

impl StreamDuration {
    /// The stream's limit for this request; rewrites a gRPC request's `grpc-timeout` to it.
    fn resolve(&self, headers: &mut HeaderMap, grpc: bool) -> Option<Duration> {
        // Envoy reads `grpc-timeout` whatever the request's content type.
        let header = headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|d| Duration::from_millis(d.as_millis() as u64));
        let limit = match (header, self.grpc_timeout_header_max) {
            (Some(mut t), Some(max)) => {
                if !max.is_zero() && t > max {
                    t = max;
                }
                if let (false, Some(off)) = (t.is_zero(), self.grpc_timeout_header_offset) {
                    t = t.saturating_sub(off);
                }
                t
            }
            _ => self.max.filter(|m| !m.is_zero())?,
        };
        if grpc {
            if let Ok(v) = HeaderValue::from_str(&format_grpc_timeout(limit.as_millis() as u64)) {
                headers.insert("grpc-timeout", v);
            }
        }
        Some(limit)
    }
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes milliseconds as a `grpc-timeout` value, in the smallest unit that fits 8 digits.
pub fn format_grpc_timeout(ms: u64) -> String {
    const MAX: u64 = 99_999_999;
    if ms <= MAX {
        return format!("{ms}m");
    }
    let s = ms.div_ceil(1000);
    if s <= MAX {
        return format!("{s}S");
    }
    let m = s.div_ceil(60);
    if m <= MAX {
        return format!("{m}M");
    }
    format!("{}H", m.div_ceil(60).min(MAX))
}

impl Timeouts {
    /// Resolves the timeouts and removes the headers that set them.
    pub fn resolve(
        fwd: &ForwardAction,
        policy: Option<&RetryPolicy>,
        headers: &mut HeaderMap,
        grpc: bool,
    ) -> Timeouts {
        let mut t = Timeouts {
            global: fwd.timeout,
            per_try: policy.and_then(|p| p.per_try_timeout),
            rewrite_grpc_timeout: false,
            stream: None,
        };
        if let Some(sd) = &fwd.stream_duration {
            t.global = None;
            t.stream = sd.resolve(headers, grpc);
        } else if let (true, Some(max)) = (grpc, fwd.max_grpc_timeout) {
            let mut g = headers
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout)
                .map(|d| Duration::from_millis(d.as_millis() as u64))
                .unwrap_or_default();
            // The offset applies only if it leaves some time (zero would mean no limit).
            if let Some(off) = fwd.grpc_timeout_offset {
                if off < g {
                    g -= off;
                }
            }
            if !max.is_zero() && (g.is_zero() || g > max) {
                g = max;
            }
            t.global = (!g.is_zero()).then_some(g);
            t.rewrite_grpc_timeout = true;
        }
        if crate::http::header_scan::any_with_prefix(headers, "x-envoy-upstream-rq-") {
            if let Some(ms) = header_ms(headers, "x-envoy-upstream-rq-timeout-ms") {
                t.global = (ms > 0).then(|| Duration::from_millis(ms));
            }
            if let Some(ms) = header_ms(headers, "x-envoy-upstream-rq-per-try-timeout-ms") {
                t.per_try = (ms > 0).then(|| Duration::from_millis(ms));
            }
            crate::http::header_scan::remove_names(
                headers,
                &[
                    "x-envoy-upstream-rq-timeout-ms",
                    "x-envoy-upstream-rq-per-try-timeout-ms",
                ],
            );
        }
        // A per-try timeout at or past the global one means nothing.
        if let (Some(p), Some(g)) = (t.per_try, t.global) {
            if p >= g {
                t.per_try = None;
            }
        }
        t
    }

    /// What an attempt starting `elapsed` into the request tells the upstream: the per-try
    /// timeout, else the global one, never past what is left of the global one.
    pub fn expected_ms(&self, elapsed: Duration) -> Option<u64> {
        let global = self.global.map(|g| g.as_millis() as u64);
        let mut expected = self
            .per_try
            .map(|p| p.as_millis() as u64)
            .or(global)
            .filter(|&e| e > 0)?;
        if let Some(g) = global {
            let elapsed = elapsed.as_millis() as u64;
            expected = if elapsed >= g {
                1
            } else {
                expected.min(g - elapsed)
            };
        }
        Some(expected)
    }

    /// Sets `x-envoy-expected-rq-timeout-ms` and, for gRPC with `max_grpc_timeout`,
    /// `grpc-timeout`.
    pub fn set_headers(&self, headers: &mut HeaderMap, elapsed: Duration) {
        let Some(ms) = self.expected_ms(elapsed) else {
            return;
        };
        headers.insert("x-envoy-expected-rq-timeout-ms", HeaderValue::from(ms));
        if self.rewrite_grpc_timeout {
            if let Ok(v) = HeaderValue::from_str(&format_grpc_timeout(ms)) {
                headers.insert("grpc-timeout", v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::route_config::ClusterChoice;

    fn fwd(timeout: Option<u64>, max_grpc: Option<u64>, offset: Option<u64>) -> ForwardAction {
        ForwardAction {
            cluster: ClusterChoice::Named("c".into()),
            cluster_not_found_response_code: http::StatusCode::SERVICE_UNAVAILABLE,
            prefix_rewrite: None,
            regex_rewrite: None,
            host_rewrite: None,
            timeout: timeout.map(Duration::from_millis),
            retry_policy: None,
            max_grpc_timeout: max_grpc.map(Duration::from_millis),
            grpc_timeout_offset: offset.map(Duration::from_millis),
            mirrors: Vec::new(),
            hash_policy: None,
            stream_duration: None,
            idle_timeout: None,
        }
    }

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789m"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(format_grpc_timeout(1500), "1500m");
        assert_eq!(format_grpc_timeout(100_000_000), "100000S");
    }

    #[test]
    fn headers_override_and_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("x-envoy-upstream-rq-timeout-ms", "300".parse().unwrap());
        h.insert(
            "x-envoy-upstream-rq-per-try-timeout-ms",
            "100".parse().unwrap(),
        );
        let t = Timeouts::resolve(&fwd(Some(15_000), None, None), None, &mut h, false);
        assert_eq!(t.global, Some(Duration::from_millis(300)));
        assert_eq!(t.per_try, Some(Duration::from_millis(100)));
        assert!(h.is_empty());
        assert_eq!(t.expected_ms(Duration::from_millis(250)), Some(50));
        assert_eq!(t.expected_ms(Duration::from_millis(400)), Some(1));
        // A per-try timeout not shorter than the global one is dropped.
        let mut h = HeaderMap::new();
        h.insert(
            "x-envoy-upstream-rq-per-try-timeout-ms",
            "500".parse().unwrap(),
        );
        let t = Timeouts::resolve(&fwd(Some(200), None, None), None, &mut h, false);
        assert_eq!(t.per_try, None);
        // No timeout at all: nothing to tell the upstream.
        let t = Timeouts::resolve(&fwd(None, None, None), None, &mut HeaderMap::new(), false);
        assert_eq!(t.expected_ms(Duration::ZERO), None);
    }

    #[test]
    fn max_stream_duration_replaces_the_route_timeout() {
        let mut f = fwd(Some(500), Some(0), None);
        f.stream_duration = Some(StreamDuration {
            max: Some(Duration::from_millis(500)),
            grpc_timeout_header_max: Some(Duration::from_millis(500)),
            grpc_timeout_header_offset: None,
        });
        let t = Timeouts::resolve(&f, None, &mut HeaderMap::new(), false);
        assert_eq!(
            (t.global, t.stream),
            (None, Some(Duration::from_millis(500)))
        );
        assert_eq!(t.expected_ms(Duration::ZERO), None);
        // A gRPC deadline is capped, and the upstream told.
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "3S".parse().unwrap());
        let t = Timeouts::resolve(&f, None, &mut h, true);
        assert_eq!(t.stream, Some(Duration::from_millis(500)));
        assert_eq!(h["grpc-timeout"], "500m");
        // Istio's default: zero everywhere, so no limit but the gRPC deadline.
        f.stream_duration = Some(StreamDuration {
            max: Some(Duration::ZERO),
            grpc_timeout_header_max: Some(Duration::ZERO),
            grpc_timeout_header_offset: None,
        });
        assert_eq!(
            Timeouts::resolve(&f, None, &mut HeaderMap::new(), false).stream,
            None
        );
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "3S".parse().unwrap());
        let t = Timeouts::resolve(&f, None, &mut h, true);
        assert_eq!(t.stream, Some(Duration::from_secs(3)));
    }

    #[test]
    fn grpc_requests_take_their_deadline() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "2S".parse().unwrap());
        let t = Timeouts::resolve(&fwd(None, Some(0), Some(500)), None, &mut h, true);
        assert_eq!(t.global, Some(Duration::from_millis(1500)));
        let mut out = HeaderMap::new();
        t.set_headers(&mut out, Duration::ZERO);
        assert_eq!(out["grpc-timeout"], "1500m");
        // Capped by max_grpc_timeout; without a header the cap is the timeout.
        let t = Timeouts::resolve(&fwd(None, Some(1000), None), None, &mut h, true);
        assert_eq!(t.global, Some(Duration::from_millis(1000)));
        let t = Timeouts::resolve(&fwd(None, Some(0), None), None, &mut HeaderMap::new(), true);
        assert_eq!(t.global, None);
        // Not gRPC: the route timeout.
        let t = Timeouts::resolve(&fwd(Some(700), Some(0), None), None, &mut h, false);
        assert_eq!(t.global, Some(Duration::from_millis(700)));
    }
}
