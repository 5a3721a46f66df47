//! `envoy.config.route.v3.RetryPolicy` compiled, and the per-request retry state Envoy's router
//! keeps (`RetryStateImpl`): which responses and resets are retried, how many times, with what
//! backoff, and the `x-envoy-retry-*` request headers that widen the policy.

use std::time::Duration;

use http::HeaderMap;
use petrel_filters::matcher::HeaderMatch;
use xds_client::pb::envoy::config::route::v3 as pb;
use xds_client::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
use xds_client::TypeRegistry;

use crate::config::{duration, invalid, reject_unhandled, ConfigError};
use crate::upstream::pool::ResetReason;

/// `retry_on` conditions as bits, one per word Envoy knows.
pub mod on {
    pub const FIVE_XX: u32 = 1 << 0;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const CONNECT_FAILURE: u32 = 1 << 2;
    pub const RETRIABLE_4XX: u32 = 1 << 3;
    pub const REFUSED_STREAM: u32 = 1 << 4;
    pub const GRPC_CANCELLED: u32 = 1 << 5;
    pub const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 6;
    pub const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 7;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 8;
    pub const GRPC_UNAVAILABLE: u32 = 1 << 9;
    pub const GRPC_INTERNAL: u32 = 1 << 10;
    pub const RESET: u32 = 1 << 11;
    pub const RETRIABLE_HEADERS: u32 = 1 << 12;
    pub const ENVOY_RATE_LIMITED: u32 = 1 << 13;
    pub const RESET_BEFORE_REQUEST: u32 = 1 << 14;
    pub const HTTP3_POST_CONNECT_FAILURE: u32 = 1 << 15;
}

const HTTP_WORDS: &[(&str, u32)] = &[
    ("5xx", on::FIVE_XX),
    ("gateway-error", on::GATEWAY_ERROR),
    ("connect-failure", on::CONNECT_FAILURE),
    ("envoy-ratelimited", on::ENVOY_RATE_LIMITED),
    ("retriable-4xx", on::RETRIABLE_4XX),
    ("refused-stream", on::REFUSED_STREAM),
    ("retriable-status-codes", on::RETRIABLE_STATUS_CODES),
    ("retriable-headers", on::RETRIABLE_HEADERS),
    ("reset", on::RESET),
    ("reset-before-request", on::RESET_BEFORE_REQUEST),
    ("http3-post-connect-failure", on::HTTP3_POST_CONNECT_FAILURE),
];

const GRPC_WORDS: &[(&str, u32)] = &[
    ("cancelled", on::GRPC_CANCELLED),
    ("deadline-exceeded", on::GRPC_DEADLINE_EXCEEDED),
    ("resource-exhausted", on::GRPC_RESOURCE_EXHAUSTED),
    ("unavailable", on::GRPC_UNAVAILABLE),
    ("internal", on::GRPC_INTERNAL),
];

const GRPC_ANY: u32 = on::GRPC_CANCELLED
    | on::GRPC_DEADLINE_EXCEEDED
    | on::GRPC_RESOURCE_EXHAUSTED
    | on::GRPC_UNAVAILABLE
    | on::GRPC_INTERNAL;

/// Parses a comma-separated `retry_on` list against one vocabulary. Envoy ignores words it does
/// not know (in config and in headers alike), trimming whitespace around each.
fn parse_words(s: &str, words: &[(&str, u32)]) -> u32 {
    s.split(',')
        .map(str::trim)
        .filter_map(|w| words.iter().find(|(n, _)| *n == w).map(|(_, b)| *b))
        .fold(0, |a, b| a | b)
}

/// `retry_on` in config: HTTP and gRPC words together.
pub fn parse_retry_on(s: &str) -> u32 {
    parse_words(s, HTTP_WORDS) | parse_words(s, GRPC_WORDS)
}

const PREVIOUS_HOSTS: &str = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub retry_on: u32,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// `per_try_idle_timeout`: an attempt with nothing from the upstream for this long ends.
    pub per_try_idle_timeout: Option<Duration>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    /// `retry_host_predicate` with `previous_hosts`: a retry avoids hosts already tried.
    pub previous_hosts: bool,
    pub host_selection_max_attempts: u32,
    /// `retry_priority` `previous_priorities`: its `update_frequency`.
    pub previous_priorities: Option<u32>,
    /// `rate_limited_retry_back_off`: the backoff a response's reset header asks for.
    pub rate_limited: Option<RateLimitedBackOff>,
    pub retriable_status_codes: Vec<u16>,
    pub retriable_headers: Vec<HeaderMatch>,
    pub retriable_request_headers: Vec<HeaderMatch>,
}

/// Envoy's default backoff base (`upstream.base_retry_backoff_ms`).
const BASE_INTERVAL: Duration = Duration::from_millis(25);

impl Default for RetryPolicy {
    /// The policy of a route without one: nothing is retried unless request headers ask.
    fn default() -> Self {
        RetryPolicy {
            retry_on: 0,
            num_retries: 1,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            base_interval: BASE_INTERVAL,
            max_interval: BASE_INTERVAL * 10,
            previous_hosts: false,
            host_selection_max_attempts: 1,
            previous_priorities: None,
            rate_limited: None,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
        }
    }
}

fn header_matchers(
    list: &[pb::HeaderMatcher],
    path: &str,
) -> Result<Vec<HeaderMatch>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, h)| HeaderMatch::from_proto(h, &format!("{path}[{i}]")).map_err(Into::into))
        .collect()
}

impl RetryPolicy {
    /// A route's or virtual host's `retry_policy`, if it has one (at `<path>.retry_policy`).
    pub fn compile_optional(
        p: Option<pb::RetryPolicy>,
        path: &str,
    ) -> Result<Option<std::sync::Arc<RetryPolicy>>, ConfigError> {
        p.map(|p| Self::compile(&p, &format!("{path}.retry_policy")).map(std::sync::Arc::new))
            .transpose()
    }

    pub fn compile(p: &pb::RetryPolicy, path: &str) -> Result<RetryPolicy, ConfigError> {
        let mut rest = p.clone();
        let retry_on = parse_retry_on(&std::mem::take(&mut rest.retry_on));
        let num_retries = rest.num_retries.take().map(|v| v.value).unwrap_or(1);
        let per_try_timeout = duration::optional_timeout(
            &rest.per_try_timeout.take(),
            &format!("{path}.per_try_timeout"),
        )?;
        let (base_interval, max_interval) = match rest.retry_back_off.take() {
            None => (BASE_INTERVAL, BASE_INTERVAL * 10),
            Some(b) => {
                let bp = format!("{path}.retry_back_off");
                let base = b
                    .base_interval
                    .as_ref()
                    .ok_or_else(|| invalid(format!("{bp}.base_interval"), "value is required"))?;
                let base = duration::to_std(base, &format!("{bp}.base_interval"))?;
                // PGV: `gt: {}` on both intervals; Envoy works in whole milliseconds.
                if base.as_millis() == 0 {
                    return Err(invalid(
                        format!("{bp}.base_interval"),
                        "value must be greater than 0s",
                    ));
                }
                let max = match &b.max_interval {
                    Some(m) => {
                        let m = duration::to_std(m, &format!("{bp}.max_interval"))?;
                        if m.as_millis() == 0 {
                            return Err(invalid(
                                format!("{bp}.max_interval"),
                                "value must be greater than 0s",
                            ));
                        }
                        if m < base {
                            return Err(invalid(
                                format!("{bp}.max_interval"),
                                "max_interval must be greater than or equal to the base_interval",
                            ));
                        }
                        m
                    }
                    None => base * 10,
                };
                (base, max)
            }
        };
        let mut previous_hosts = false;
        for (i, pred) in std::mem::take(&mut rest.retry_host_predicate)
            .iter()
            .enumerate()
        {
            let pp = format!("{path}.retry_host_predicate[{i}]");
            let url = match &pred.config_type {
                Some(pb::retry_policy::retry_host_predicate::ConfigType::TypedConfig(a)) => {
                    TypeRegistry::effective_type_url(a)
                }
                None => String::new(),
            };
            if url.rsplit('/').next() == Some(PREVIOUS_HOSTS)
                || (url.is_empty() && pred.name == "envoy.retry_host_predicates.previous_hosts")
            {
                previous_hosts = true;
            } else {
                return Err(ConfigError::UnsupportedExtension {
                    path: pp,
                    why: petrel_filters::extensions::refusal(&url),
                    type_url: if url.is_empty() {
                        pred.name.clone()
                    } else {
                        url
                    },
                });
            }
        }
        let rate_limited = match rest.rate_limited_retry_back_off.take() {
            Some(r) => Some(RateLimitedBackOff::compile(
                &r,
                &format!("{path}.rate_limited_retry_back_off"),
            )?),
            None => None,
        };
        let previous_priorities = match rest.retry_priority.take() {
            Some(rp) => Some(previous_priorities(&rp, &format!("{path}.retry_priority"))?),
            None => None,
        };
        // Re-picks after the first pick; unset counts as one (Envoy's default).
        let host_selection_max_attempts =
            match std::mem::take(&mut rest.host_selection_retry_max_attempts) {
                0 => 1,
                n => n.clamp(1, u32::MAX as i64) as u32,
            };
        // Envoy keeps any 32-bit value; only ones that fit a status code can ever match.
        let retriable_status_codes = std::mem::take(&mut rest.retriable_status_codes)
            .into_iter()
            .filter_map(|c| u16::try_from(c).ok())
            .collect();
        let retriable_headers = header_matchers(
            &std::mem::take(&mut rest.retriable_headers),
            &format!("{path}.retriable_headers"),
        )?;
        let retriable_request_headers = header_matchers(
            &std::mem::take(&mut rest.retriable_request_headers),
            &format!("{path}.retriable_request_headers"),
        )?;
        let per_try_idle_timeout = duration::optional_timeout(
            &rest.per_try_idle_timeout.take(),
            &format!("{path}.per_try_idle_timeout"),
        )?;
        reject_unhandled(&rest, path)?;
        Ok(RetryPolicy {
            retry_on,
            num_retries,
            per_try_timeout,
            per_try_idle_timeout,
            base_interval,
            max_interval,
            previous_hosts,
            host_selection_max_attempts,
            previous_priorities,
            rate_limited,
            retriable_status_codes,
            retriable_headers,
            retriable_request_headers,
        })
    }
}

/// `rate_limited_retry_back_off`: reset headers (seconds, or a Unix time) and the longest
/// backoff they may ask for.
#[derive(Debug, Clone)]
pub struct RateLimitedBackOff {
    headers: Vec<(http::HeaderName, bool)>,
    max: Duration,
}

impl RateLimitedBackOff {
    fn compile(
        r: &pb::retry_policy::RateLimitedRetryBackOff,
        path: &str,
    ) -> Result<Self, ConfigError> {
        if r.reset_headers.is_empty() {
            return Err(invalid(
                format!("{path}.reset_headers"),
                "value must contain at least 1 item(s)",
            ));
        }
        let headers = r
            .reset_headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let hp = format!("{path}.reset_headers[{i}]");
                let name = http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| invalid(format!("{hp}.name"), "invalid header name"))?;
                let unix = match pb::retry_policy::ResetHeaderFormat::try_from(h.format) {
                    Ok(pb::retry_policy::ResetHeaderFormat::Seconds) => false,
                    Ok(pb::retry_policy::ResetHeaderFormat::UnixTimestamp) => true,
                    Err(_) => return Err(invalid(format!("{hp}.format"), "unknown enum value")),
                };
                Ok((name, unix))
            })
            .collect::<Result<_, ConfigError>>()?;
        let max = duration::or(
            &r.max_interval,
            Duration::from_secs(300),
            &format!("{path}.max_interval"),
        )?;
        if max.is_zero() {
            return Err(invalid(
                format!("{path}.max_interval"),
                "value must be greater than 0s",
            ));
        }
        Ok(RateLimitedBackOff { headers, max })
    }

    /// The interval the first reset header present asks for, if within `max_interval` and
    /// longer than a millisecond (Envoy's `parseRateLimitedResetInterval`).
    pub fn interval(&self, headers: &HeaderMap) -> Option<Duration> {
        let found = self.headers.iter().find_map(|(name, unix)| {
            let secs: u64 = headers.get(name)?.to_str().ok()?.parse().ok()?;
            let secs = if *unix {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs();
                secs.checked_sub(now)?
            } else {
                secs
            };
            let d = Duration::from_secs(secs);
            (d <= self.max).then_some(d)
        })?;
        (found.as_millis() > 1).then_some(found)
    }
}

const PREVIOUS_PRIORITIES: &str =
    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";

/// The `update_frequency` of a `previous_priorities` retry priority (the only one Envoy has).
fn previous_priorities(
    rp: &pb::retry_policy::RetryPriority,
    path: &str,
) -> Result<u32, ConfigError> {
    let any = match &rp.config_type {
        Some(pb::retry_policy::retry_priority::ConfigType::TypedConfig(a)) => a,
        None => return Err(invalid(format!("{path}.typed_config"), "value is required")),
    };
    let url = TypeRegistry::effective_type_url(any);
    if url.rsplit('/').next() != Some(PREVIOUS_PRIORITIES) {
        return Err(ConfigError::UnsupportedExtension {
            path: path.into(),
            why: petrel_filters::extensions::refusal(&url),
            type_url: url,
        });
    }
    let c: PreviousPrioritiesConfig = TypeRegistry::global().unpack(any)?;
    if c.update_frequency <= 0 {
        return Err(invalid(
            format!("{path}.typed_config.update_frequency"),
            "value must be greater than 0",
        ));
    }
    Ok(c.update_frequency as u32)
}

/// A header's values joined with `,`, with `:status` for response matchers.
fn joined(headers: &HeaderMap, name: &str, status: Option<u16>) -> Option<String> {
    if name == ":status" {
        return status.map(|s| s.to_string());
    }
    petrel_filters::matcher::joined_header(headers, name)
}

/// What an attempt's failure allows, in Envoy's `RetryStatus` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryStatus {
    /// Not a retriable outcome.
    No,
    /// Retry after the returned backoff.
    Yes(Duration),
    /// Retriable but the retries are used up (`URX`).
    LimitExceeded,
    /// Retriable but the cluster's `max_retries` circuit breaker is full (`UO`).
    Overflow,
}

/// The request headers the retry state consumes; Envoy never forwards them.
pub const RETRY_HEADERS: &[&str] = &[
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-upstream-rq-per-try-timeout-ms",
];

/// One request's retry state.
#[derive(Debug)]
pub struct RetryState {
    retry_on: u32,
    remaining: u32,
    base_ms: u64,
    max_ms: u64,
    backoffs: u32,
    status_codes: Vec<u16>,
    extra_headers: Vec<HeaderMatch>,
}

impl RetryState {
    /// Envoy's `RetryStateImpl::create`: a state only when the route or the request asks for
    /// retries; the retry headers are removed either way.
    pub fn create(policy: &RetryPolicy, request: &mut HeaderMap) -> Option<RetryState> {
        // Without any `x-envoy-*` header there is nothing to read (the common case).
        let envoy_headers = crate::http::header_scan::any_with_prefix(request, "x-envoy-");
        let header = |h: &HeaderMap, n: &str| {
            if !envoy_headers {
                return None;
            }
            h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        let retry_on_h = header(request, "x-envoy-retry-on");
        let grpc_on_h = header(request, "x-envoy-retry-grpc-on");
        let state = if retry_on_h.is_some() || grpc_on_h.is_some() || policy.retry_on != 0 {
            let mut retry_on = policy.retry_on;
            if let Some(v) = &retry_on_h {
                retry_on |= parse_words(v, HTTP_WORDS);
            }
            if let Some(v) = &grpc_on_h {
                retry_on |= parse_words(v, GRPC_WORDS);
            }
            if !policy.retriable_request_headers.is_empty()
                && !policy
                    .retriable_request_headers
                    .iter()
                    .any(|m| m.matches(joined(request, &m.name, None).as_deref()))
            {
                retry_on = 0;
            }
            let mut remaining = policy.num_retries;
            if retry_on != 0 {
                if let Some(n) =
                    header(request, "x-envoy-max-retries").and_then(|v| v.parse::<u32>().ok())
                {
                    remaining = n;
                }
            }
            let mut status_codes = policy.retriable_status_codes.clone();
            if let Some(v) = header(request, "x-envoy-retriable-status-codes") {
                status_codes.extend(v.split(',').filter_map(|c| c.trim().parse::<u16>().ok()));
            }
            let mut extra_headers = Vec::new();
            if let Some(v) = header(request, "x-envoy-retriable-header-names") {
                for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let m = pb::HeaderMatcher {
                        name: name.to_string(),
                        ..Default::default()
                    };
                    if let Ok(m) = HeaderMatch::from_proto(&m, "x-envoy-retriable-header-names") {
                        extra_headers.push(m);
                    }
                }
            }
            Some(RetryState {
                retry_on,
                remaining,
                base_ms: policy.base_interval.as_millis() as u64,
                max_ms: policy.max_interval.as_millis() as u64,
                backoffs: 0,
                status_codes,
                extra_headers,
            })
        } else {
            None
        };
        crate::http::header_scan::remove_names(request, RETRY_HEADERS);
        state
    }

    /// Whether a per-try timeout is retried: it counts as a reset, which the 5xx, gateway-error
    /// and reset conditions cover.
    pub fn retries_per_try_timeout(&self) -> bool {
        self.retry_on & (on::FIVE_XX | on::GATEWAY_ERROR | on::RESET) != 0
    }

    /// `wouldRetryFromHeaders`.
    pub fn would_retry_response(
        &self,
        policy: &RetryPolicy,
        status: u16,
        headers: &HeaderMap,
    ) -> bool {
        let r = self.retry_on;
        if headers.contains_key("x-envoy-ratelimited") {
            return r & on::ENVOY_RATE_LIMITED != 0;
        }
        if r & on::FIVE_XX != 0 && (500..600).contains(&status) {
            return true;
        }
        if r & on::GATEWAY_ERROR != 0 && (502..=504).contains(&status) {
            return true;
        }
        if r & on::RETRIABLE_4XX != 0 && status == 409 {
            return true;
        }
        if r & on::RETRIABLE_STATUS_CODES != 0 && self.status_codes.contains(&status) {
            return true;
        }
        if r & on::RETRIABLE_HEADERS != 0
            && policy
                .retriable_headers
                .iter()
                .chain(&self.extra_headers)
                .any(|m| m.matches(joined(headers, &m.name, Some(status)).as_deref()))
        {
            return true;
        }
        if r & GRPC_ANY != 0 {
            let grpc = headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            let hit = match grpc {
                Some(1) => r & on::GRPC_CANCELLED,
                Some(4) => r & on::GRPC_DEADLINE_EXCEEDED,
                Some(8) => r & on::GRPC_RESOURCE_EXHAUSTED,
                Some(13) => r & on::GRPC_INTERNAL,
                Some(14) => r & on::GRPC_UNAVAILABLE,
                _ => 0,
            };
            if hit != 0 {
                return true;
            }
        }
        false
    }

    /// `wouldRetryFromReset`. `started` says whether any of the request reached the upstream.
    pub fn would_retry_reset(&self, reason: &ResetReason, started: bool) -> bool {
        let r = self.retry_on;
        match reason {
            ResetReason::Overflow | ResetReason::DownstreamBody => return false,
            ResetReason::ConnectionFailure(_)
            | ResetReason::ConnectionTimeout
            | ResetReason::Tls(_)
                if r & on::CONNECT_FAILURE != 0 =>
            {
                return true
            }
            _ => {}
        }
        if r & on::RESET_BEFORE_REQUEST != 0 && !started {
            return true;
        }
        if r & (on::RESET | on::FIVE_XX | on::GATEWAY_ERROR) != 0 {
            return true;
        }
        r & on::REFUSED_STREAM != 0 && *reason == ResetReason::RefusedStream
    }

    /// `shouldRetry` once an outcome is retriable: spends a retry if one is left and the
    /// circuit breaker allows (`can_retry`), and returns the backoff.
    /// `rate_limited`: a reset header's interval, which replaces the exponential backoff with
    /// one jittered up to half again as long.
    pub fn should_retry(
        &mut self,
        can_retry: impl FnOnce() -> bool,
        rate_limited: Option<Duration>,
    ) -> RetryStatus {
        if self.remaining == 0 {
            return RetryStatus::LimitExceeded;
        }
        self.remaining -= 1;
        if !can_retry() {
            return RetryStatus::Overflow;
        }
        if let Some(min) = rate_limited {
            let base = min.as_millis() as u64;
            return RetryStatus::Yes(Duration::from_millis(
                base + rand::random::<u64>() % (base / 2).max(1),
            ));
        }
        RetryStatus::Yes(Duration::from_millis(self.next_backoff_ms(rand::random())))
    }

    /// Envoy's fully jittered exponential backoff: uniform in `[0, base·2ⁿ)`, capped at max.
    fn next_backoff_ms(&mut self, draw: u64) -> u64 {
        let base = self.base_ms.max(1);
        let multiplier = (1u64 << self.backoffs.min(63)) - 1;
        let ceiling = if multiplier > self.max_ms / base {
            self.max_ms
        } else {
            (multiplier + 1) * base
        };
        self.backoffs = self.backoffs.saturating_add(1);
        (draw % ceiling.max(1)).min(self.max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(retry_on: &str) -> RetryPolicy {
        RetryPolicy {
            retry_on: parse_retry_on(retry_on),
            ..Default::default()
        }
    }

    #[test]
    fn words_parse_as_envoy_does() {
        assert_eq!(
            parse_retry_on("5xx,gateway-error,connect-failure"),
            on::FIVE_XX | on::GATEWAY_ERROR | on::CONNECT_FAILURE
        );
        // Unknown words are skipped; whitespace around words is trimmed.
        assert_eq!(
            parse_retry_on(" xxx, gateway-error ,  connect-failure  "),
            on::GATEWAY_ERROR | on::CONNECT_FAILURE
        );
        assert_eq!(parse_retry_on("5 xx"), 0);
        // Istio's default policy.
        assert_eq!(
            parse_retry_on(
                "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
            ),
            on::CONNECT_FAILURE
                | on::REFUSED_STREAM
                | on::GRPC_UNAVAILABLE
                | on::GRPC_CANCELLED
                | on::RETRIABLE_STATUS_CODES
        );
    }

    #[test]
    fn headers_widen_and_are_consumed() {
        let mut h = HeaderMap::new();
        h.insert("x-envoy-retry-on", "5xx".parse().unwrap());
        h.insert("x-envoy-max-retries", "4".parse().unwrap());
        h.insert(
            "x-envoy-retriable-status-codes",
            "418, 419".parse().unwrap(),
        );
        h.insert("x-other", "1".parse().unwrap());
        let s = RetryState::create(&RetryPolicy::default(), &mut h).expect("state");
        assert_eq!(s.remaining, 4);
        assert_eq!(s.status_codes, vec![418, 419]);
        assert!(s.would_retry_response(&RetryPolicy::default(), 503, &HeaderMap::new()));
        assert_eq!(h.len(), 1);
        // Nothing asked: no state, headers still consumed.
        let mut h = HeaderMap::new();
        h.insert("x-envoy-max-retries", "4".parse().unwrap());
        assert!(RetryState::create(&RetryPolicy::default(), &mut h).is_none());
        assert!(h.is_empty());
    }

    #[test]
    fn responses_and_resets() {
        let p = policy("gateway-error,retriable-4xx,cancelled");
        let s = RetryState::create(&p, &mut HeaderMap::new()).unwrap();
        assert!(s.would_retry_response(&p, 502, &HeaderMap::new()));
        assert!(!s.would_retry_response(&p, 500, &HeaderMap::new()));
        assert!(s.would_retry_response(&p, 409, &HeaderMap::new()));
        let mut g = HeaderMap::new();
        g.insert("grpc-status", "1".parse().unwrap());
        assert!(s.would_retry_response(&p, 200, &g));
        g.insert("grpc-status", "14".parse().unwrap());
        assert!(!s.would_retry_response(&p, 200, &g));
        // A rate-limited answer from another Envoy only with envoy-ratelimited.
        let mut rl = HeaderMap::new();
        rl.insert("x-envoy-ratelimited", "true".parse().unwrap());
        assert!(!s.would_retry_response(&p, 502, &rl));
        // gateway-error covers every reset but overflow.
        assert!(s.would_retry_reset(&ResetReason::ConnectionTermination, true));
        assert!(!s.would_retry_reset(&ResetReason::Overflow, false));
        let c = policy("connect-failure,refused-stream");
        let s = RetryState::create(&c, &mut HeaderMap::new()).unwrap();
        assert!(s.would_retry_reset(&ResetReason::ConnectionFailure(111), false));
        assert!(!s.would_retry_reset(&ResetReason::ConnectionTermination, true));
        assert!(s.would_retry_reset(&ResetReason::RefusedStream, true));
        let b = policy("reset-before-request");
        let s = RetryState::create(&b, &mut HeaderMap::new()).unwrap();
        assert!(s.would_retry_reset(&ResetReason::ConnectionTermination, false));
        assert!(!s.would_retry_reset(&ResetReason::ConnectionTermination, true));
    }

    #[test]
    fn retries_run_out_and_backoff_grows_to_its_cap() {
        let p = RetryPolicy {
            retry_on: on::FIVE_XX,
            num_retries: 2,
            ..Default::default()
        };
        let mut s = RetryState::create(&p, &mut HeaderMap::new()).unwrap();
        assert!(matches!(s.should_retry(|| true, None), RetryStatus::Yes(_)));
        assert_eq!(s.should_retry(|| false, None), RetryStatus::Overflow);
        assert_eq!(s.should_retry(|| true, None), RetryStatus::LimitExceeded);
        // A reset header's interval: that long, up to half again, jittered.
        let mut s = RetryState::create(&policy("5xx"), &mut HeaderMap::new()).unwrap();
        let RetryStatus::Yes(b) = s.should_retry(|| true, Some(Duration::from_secs(2))) else {
            panic!()
        };
        assert!(
            b >= Duration::from_secs(2) && b < Duration::from_secs(3),
            "{b:?}"
        );
        let mut s = RetryState::create(&p, &mut HeaderMap::new()).unwrap();
        // Ceilings 25, 50, 100, 200, then the 250 ms cap.
        let highs: Vec<u64> = (0..6).map(|_| s.next_backoff_ms(u64::MAX - 1)).collect();
        assert!(highs[0] < 25 && highs[1] < 50 && highs[2] < 100 && highs[3] < 200);
        assert!(highs[4] <= 250 && highs[5] <= 250);
        assert_eq!(s.next_backoff_ms(7), 7);
    }

    #[test]
    fn config_checks() {
        let bad = pb::RetryPolicy {
            retry_back_off: Some(pb::retry_policy::RetryBackOff {
                base_interval: Some(xds_client::pb::google::protobuf::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                max_interval: Some(xds_client::pb::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
            }),
            ..Default::default()
        };
        let e = RetryPolicy::compile(&bad, "r").unwrap_err().to_string();
        assert!(e.contains("max_interval"), "{e}");
        let neg = pb::RetryPolicy {
            per_try_timeout: Some(xds_client::pb::google::protobuf::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        };
        assert!(RetryPolicy::compile(&neg, "r").is_err());
        let ok = pb::RetryPolicy {
            retry_on: "5xx,bogus".into(),
            num_retries: Some(xds_client::pb::google::protobuf::UInt32Value { value: 1_000_000 }),
            ..Default::default()
        };
        let p = RetryPolicy::compile(&ok, "r").unwrap();
        assert_eq!(p.retry_on, on::FIVE_XX);
        assert_eq!(p.num_retries, 1_000_000);
    }

    #[test]
    fn previous_priorities_needs_a_frequency() {
        // Envoy accepts zero and divides by it on the first retry (it crashes); Petrel refuses.
        let p: pb::RetryPolicy = TypeRegistry::global()
            .from_json(
                &serde_json::json!({"retry_on": "5xx", "retry_priority": {"name": "envoy.retry_priorities.previous_priorities", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig", "update_frequency": 0}}}),
                false,
            )
            .unwrap();
        let e = RetryPolicy::compile_optional(Some(p), "r").unwrap_err();
        assert!(e.to_string().contains("update_frequency"), "{e}");
    }
}
