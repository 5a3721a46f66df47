//! `envoy.filters.http.fault`: delays and aborts injected into a fraction of requests, fixed or
//! asked for by `x-envoy-fault-*` request headers, limited by `max_active_faults`, restricted
//! to an upstream cluster, downstream nodes and request headers; overridden per route by
//! `typed_per_filter_config`. Stats as Envoy names them under `http.<prefix>.fault.`.

use std::sync::Arc;
use std::time::Duration;

use crate::fraction::Fraction;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use xds_client::pb::envoy::extensions::filters::common::fault::v3 as common;
use xds_client::pb::envoy::extensions::filters::http::fault::v3 as pb;
use xds_client::pb::google::protobuf::Any;

use crate::http_filter::{
    FilterStatus, HttpFilter, HttpFilterFactory, LocalReply, RequestHead, RouteFilterConfig,
};
use crate::matcher::{joined_header, HeaderMatch};
use crate::stats::{Counter, Gauge, Store};
use crate::{invalid, FilterConfigError};

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
const DELAY_PERCENT_HEADER: &str = "x-envoy-fault-delay-request-percentage";
const ABORT_HEADER: &str = "x-envoy-fault-abort-request";
const ABORT_GRPC_HEADER: &str = "x-envoy-fault-abort-grpc-request";
const ABORT_PERCENT_HEADER: &str = "x-envoy-fault-abort-request-percentage";
const THROUGHPUT_HEADER: &str = "x-envoy-fault-throughput-response";
const THROUGHPUT_PERCENT_HEADER: &str = "x-envoy-fault-throughput-response-percentage";

/// A header may lower the configured percentage, never raise it.
trait CappedByHeader {
    fn capped_by_header(self, headers: &HeaderMap, name: &str) -> Fraction;
}

impl CappedByHeader for Fraction {
    fn capped_by_header(self, headers: &HeaderMap, name: &str) -> Fraction {
        match header_u64(headers, name) {
            Some(n) => Fraction {
                numerator: n.min(self.numerator),
                ..self
            },
            None => self,
        }
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

#[derive(Debug, Clone, PartialEq)]
enum Delay {
    Fixed(Duration),
    /// `header_delay`: milliseconds from `x-envoy-fault-delay-request`.
    Header,
}

#[derive(Debug, Clone, PartialEq)]
enum Abort {
    Http(StatusCode),
    Grpc(u32),
    /// `header_abort`: status from `x-envoy-fault-abort-request` or
    /// `x-envoy-fault-abort-grpc-request`.
    Header,
}

/// `response_rate_limit`: a fixed KiB/s, or one from `x-envoy-fault-throughput-response`.
#[derive(Debug, Clone, PartialEq)]
enum RateLimit {
    FixedKbps(u64),
    Header,
}

/// One compiled `HTTPFault` (the filter's own, or a route's override).
#[derive(Debug)]
pub struct FaultSettings {
    delay: Option<(Delay, Fraction)>,
    abort: Option<(Abort, Fraction)>,
    rate_limit: Option<(RateLimit, Fraction)>,
    /// `abort.response_body`, else Envoy's `fault filter abort`.
    abort_body: Bytes,
    upstream_cluster: Option<String>,
    downstream_nodes: Vec<String>,
    headers: Vec<HeaderMatch>,
    max_active_faults: Option<u64>,
    disable_downstream_cluster_stats: bool,
}

fn duration(
    d: &xds_client::pb::google::protobuf::Duration,
    path: &str,
) -> Result<Duration, FilterConfigError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid(path, "invalid duration: must be non-negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

impl FaultSettings {
    pub fn compile(any: &Any, path: &str) -> Result<FaultSettings, FilterConfigError> {
        let cfg: pb::HttpFault = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, e.to_string()))?;
        let rate_limit = match &cfg.response_rate_limit {
            None => None,
            Some(r) => {
                let rp = format!("{path}.response_rate_limit");
                let kind = match &r.limit_type {
                    Some(common::fault_rate_limit::LimitType::FixedLimit(f)) => {
                        if f.limit_kbps == 0 {
                            return Err(invalid(
                                format!("{rp}.fixed_limit.limit_kbps"),
                                "value must be greater than or equal to 1",
                            ));
                        }
                        RateLimit::FixedKbps(f.limit_kbps)
                    }
                    Some(common::fault_rate_limit::LimitType::HeaderLimit(_)) => RateLimit::Header,
                    None => return Err(invalid(rp, "limit_type is required")),
                };
                Some((kind, Fraction::from_proto(r.percentage.as_ref())))
            }
        };
        // Runtime key overrides only matter with a runtime layer that sets them; Petrel's
        // runtime refuses unknown keys, so custom key names could never take effect.
        for (field, set) in [
            ("delay_percent_runtime", &cfg.delay_percent_runtime),
            ("abort_percent_runtime", &cfg.abort_percent_runtime),
            ("delay_duration_runtime", &cfg.delay_duration_runtime),
            ("abort_http_status_runtime", &cfg.abort_http_status_runtime),
            ("max_active_faults_runtime", &cfg.max_active_faults_runtime),
            (
                "response_rate_limit_percent_runtime",
                &cfg.response_rate_limit_percent_runtime,
            ),
            ("abort_grpc_status_runtime", &cfg.abort_grpc_status_runtime),
        ] {
            if !set.is_empty() {
                return Err(invalid(
                    format!("{path}.{field}"),
                    "runtime key overrides are not supported by Petrel",
                ));
            }
        }
        if cfg.filter_metadata.is_some() {
            return Err(invalid(
                format!("{path}.filter_metadata"),
                "not supported by Petrel",
            ));
        }
        let delay = match &cfg.delay {
            None => None,
            Some(d) => {
                let dp = format!("{path}.delay");
                let kind = match &d.fault_delay_secifier {
                    Some(common::fault_delay::FaultDelaySecifier::FixedDelay(fd)) => {
                        Delay::Fixed(duration(fd, &format!("{dp}.fixed_delay"))?)
                    }
                    Some(common::fault_delay::FaultDelaySecifier::HeaderDelay(_)) => Delay::Header,
                    None => return Err(invalid(dp, "fault_delay_secifier is required")),
                };
                Some((kind, Fraction::from_proto(d.percentage.as_ref())))
            }
        };
        let abort_body = match cfg.abort.as_ref().map(|a| a.response_body.as_str()) {
            Some(b) if !b.is_empty() => Bytes::from(b.to_string()),
            _ => Bytes::from_static(b"fault filter abort"),
        };
        let abort = match &cfg.abort {
            None => None,
            Some(a) => {
                let ap = format!("{path}.abort");
                let kind = match &a.error_type {
                    Some(pb::fault_abort::ErrorType::HttpStatus(s)) => {
                        if !(200..600).contains(s) {
                            return Err(invalid(
                                format!("{ap}.http_status"),
                                "value must be inside range [200, 600)",
                            ));
                        }
                        Abort::Http(
                            StatusCode::from_u16(*s as u16)
                                .map_err(|_| invalid(&ap, "bad status"))?,
                        )
                    }
                    Some(pb::fault_abort::ErrorType::GrpcStatus(s)) => Abort::Grpc(*s),
                    Some(pb::fault_abort::ErrorType::HeaderAbort(_)) => Abort::Header,
                    None => return Err(invalid(ap, "error_type is required")),
                };
                Some((kind, Fraction::from_proto(a.percentage.as_ref())))
            }
        };
        let headers = cfg
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| HeaderMatch::from_proto(h, &format!("{path}.headers[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FaultSettings {
            delay,
            abort,
            rate_limit,
            abort_body,
            upstream_cluster: Some(cfg.upstream_cluster).filter(|c| !c.is_empty()),
            downstream_nodes: cfg.downstream_nodes,
            headers,
            max_active_faults: cfg.max_active_faults.map(|v| v.value as u64),
            disable_downstream_cluster_stats: cfg.disable_downstream_cluster_stats,
        })
    }

    fn applies(&self, req: &RequestHead<'_>) -> bool {
        if let Some(c) = &self.upstream_cluster {
            if req.route.and_then(|r| r.cluster) != Some(c.as_str()) {
                return false;
            }
        }
        if !self.downstream_nodes.is_empty() {
            let node = req
                .headers
                .get("x-envoy-downstream-service-node")
                .and_then(|v| v.to_str().ok());
            if !node.is_some_and(|n| self.downstream_nodes.iter().any(|d| d == n)) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|m| m.matches(joined_header(req.headers, &m.name).as_deref()))
    }

    /// The response throughput for this request in KiB/s, if one is imposed.
    fn rate_limit_for(&self, headers: &HeaderMap) -> Option<u64> {
        let (kind, fraction) = self.rate_limit.as_ref()?;
        let (kbps, fraction) = match kind {
            RateLimit::FixedKbps(k) => (*k, *fraction),
            RateLimit::Header => (
                header_u64(headers, THROUGHPUT_HEADER).filter(|k| *k > 0)?,
                fraction.capped_by_header(headers, THROUGHPUT_PERCENT_HEADER),
            ),
        };
        fraction.hit().then_some(kbps)
    }

    /// The delay for this request, if one is injected.
    fn delay_for(&self, headers: &HeaderMap) -> Option<Duration> {
        let (kind, fraction) = self.delay.as_ref()?;
        let d = match kind {
            Delay::Fixed(d) => *d,
            Delay::Header => Duration::from_millis(header_u64(headers, DELAY_HEADER)?),
        };
        let fraction = match kind {
            Delay::Header => fraction.capped_by_header(headers, DELAY_PERCENT_HEADER),
            Delay::Fixed(_) => *fraction,
        };
        // A zero delay is no delay.
        (fraction.hit() && d.as_millis() > 0).then_some(d)
    }

    /// The abort for this request, if one is injected: HTTP status and gRPC status.
    fn abort_for(&self, headers: &HeaderMap) -> Option<(StatusCode, Option<u32>)> {
        let (kind, fraction) = self.abort.as_ref()?;
        let status = match kind {
            Abort::Http(s) => (*s, None),
            Abort::Grpc(g) => (StatusCode::OK, Some(*g)),
            Abort::Header => {
                let http = header_u64(headers, ABORT_HEADER)
                    .filter(|s| (200..600).contains(s))
                    .and_then(|s| StatusCode::from_u16(s as u16).ok());
                match http {
                    Some(s) => (s, None),
                    None => (
                        StatusCode::OK,
                        Some(header_u64(headers, ABORT_GRPC_HEADER)? as u32),
                    ),
                }
            }
        };
        let fraction = match kind {
            Abort::Header => fraction.capped_by_header(headers, ABORT_PERCENT_HEADER),
            _ => *fraction,
        };
        fraction.hit().then_some(status)
    }
}

#[derive(Debug)]
struct Stats {
    store: Store,
    prefix: String,
    aborts_injected: Arc<Counter>,
    delays_injected: Arc<Counter>,
    response_rl_injected: Arc<Counter>,
    faults_overflow: Arc<Counter>,
    active_faults: Arc<Gauge>,
}

impl Stats {
    /// `fault.<downstream cluster>.<name>`, for requests naming their cluster.
    fn downstream(&self, cluster: &str, name: &str) {
        self.store
            .counter(&format!("{}{cluster}.{name}", self.prefix))
            .inc();
    }
}

/// The filter as configured in the connection manager.
#[derive(Debug)]
pub struct Factory {
    name: Arc<str>,
    settings: Arc<FaultSettings>,
    stats: Arc<Stats>,
}

impl Factory {
    pub fn compile(
        name: &str,
        any: &Any,
        path: &str,
        store: &Store,
        stat_prefix: &str,
    ) -> Result<Factory, FilterConfigError> {
        let settings = Arc::new(FaultSettings::compile(any, path)?);
        let prefix = format!("{stat_prefix}fault.");
        let stats = Stats {
            aborts_injected: store.counter(&format!("{prefix}aborts_injected")),
            delays_injected: store.counter(&format!("{prefix}delays_injected")),
            response_rl_injected: store.counter(&format!("{prefix}response_rl_injected")),
            faults_overflow: store.counter(&format!("{prefix}faults_overflow")),
            active_faults: store.gauge(&format!("{prefix}active_faults")),
            store: store.clone(),
            prefix,
        };
        // Envoy creates these with the filter.
        store.counter(&format!("{}response_rl_injected", stats.prefix));
        Ok(Factory {
            name: name.into(),
            settings,
            stats: Arc::new(stats),
        })
    }
}

/// A route's `typed_per_filter_config` for the fault filter.
pub fn per_route(any: &Any, path: &str) -> Result<RouteFilterConfig, FilterConfigError> {
    Ok(Arc::new(FaultSettings::compile(any, path)?))
}

impl HttpFilterFactory for Factory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self) -> Box<dyn HttpFilter> {
        Box::new(Filter {
            name: self.name.clone(),
            settings: self.settings.clone(),
            stats: self.stats.clone(),
            active: false,
            pending_abort: None,
            downstream_cluster: None,
            response_kbps: None,
        })
    }
}

/// One stream's fault filter.
struct Filter {
    /// The filter's configured name: the key of its per-route config.
    name: Arc<str>,
    settings: Arc<FaultSettings>,
    stats: Arc<Stats>,
    /// Counted in `active_faults` until the stream ends.
    active: bool,
    /// The settings to check for an abort once a delay is over.
    pending_abort: Option<Arc<FaultSettings>>,
    downstream_cluster: Option<String>,
    /// The response rate limit this stream got, in KiB/s.
    response_kbps: Option<u64>,
}

impl Filter {
    /// `max_active_faults`: a fault starts only below the limit.
    fn try_activate(&mut self, settings: &FaultSettings) -> bool {
        if self.active {
            return true;
        }
        let limit = settings.max_active_faults.unwrap_or(u64::MAX);
        if self.stats.active_faults.value().max(0) as u64 >= limit {
            self.stats.faults_overflow.inc();
            return false;
        }
        self.stats.active_faults.inc();
        self.active = true;
        true
    }

    fn abort(&mut self, settings: &FaultSettings, headers: &HeaderMap) -> FilterStatus {
        let Some((status, grpc)) = settings.abort_for(headers) else {
            return FilterStatus::Continue;
        };
        if !self.try_activate(settings) {
            return FilterStatus::Continue;
        }
        self.stats.aborts_injected.inc();
        if let Some(c) = &self.downstream_cluster {
            self.stats.downstream(c, "aborts_injected");
        }
        FilterStatus::LocalReply(Box::new(LocalReply {
            status,
            body: settings.abort_body.clone(),
            response_flag: "FI",
            details: "fault_filter_abort",
            headers: HeaderMap::new(),
            grpc_status: grpc,
        }))
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        if self.active {
            self.stats.active_faults.dec();
        }
    }
}

impl HttpFilter for Filter {
    fn decode_headers(&mut self, req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        let settings = req
            .route
            .and_then(|r| r.config(&self.name))
            .and_then(|c| c.clone().downcast::<FaultSettings>().ok())
            .unwrap_or_else(|| self.settings.clone());
        if !settings.applies(req) {
            return FilterStatus::Continue;
        }
        self.downstream_cluster = req
            .headers
            .get("x-envoy-downstream-service-cluster")
            .and_then(|v| v.to_str().ok())
            .filter(|c| !c.is_empty() && !settings.disable_downstream_cluster_stats)
            .map(str::to_string);
        if let Some(kbps) = settings.rate_limit_for(req.headers) {
            if self.try_activate(&settings) {
                self.stats.response_rl_injected.inc();
                self.response_kbps = Some(kbps);
            }
        }
        if let Some(d) = settings.delay_for(req.headers) {
            if self.try_activate(&settings) {
                self.stats.delays_injected.inc();
                if let Some(c) = &self.downstream_cluster {
                    self.stats.downstream(c, "delays_injected");
                }
                self.pending_abort = Some(settings);
                return FilterStatus::Pause(d);
            }
        }
        self.abort(&settings, req.headers)
    }

    fn response_bytes_per_second(&self) -> Option<u64> {
        self.response_kbps.map(|k| k * 1024)
    }

    fn resume(&mut self, req: &mut RequestHead<'_>) -> FilterStatus {
        match self.pending_abort.take() {
            Some(settings) => self.abort(&settings, req.headers),
            None => FilterStatus::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::pb::envoy::r#type::v3::FractionalPercent;

    fn settings(yaml_like: pb::HttpFault) -> FaultSettings {
        let any = Any {
            type_url: TYPE_URL.into(),
            value: prost::Message::encode_to_vec(&yaml_like),
        };
        FaultSettings::compile(&any, "f").unwrap()
    }

    fn all() -> Option<FractionalPercent> {
        Some(FractionalPercent {
            numerator: 100,
            denominator: 0,
        })
    }

    #[test]
    fn fixed_and_header_faults() {
        let s = settings(pb::HttpFault {
            abort: Some(pb::FaultAbort {
                error_type: Some(pb::fault_abort::ErrorType::HeaderAbort(Default::default())),
                percentage: all(),
                ..Default::default()
            }),
            delay: Some(common::FaultDelay {
                fault_delay_secifier: Some(common::fault_delay::FaultDelaySecifier::HeaderDelay(
                    Default::default(),
                )),
                percentage: all(),
            }),
            ..Default::default()
        });
        let mut h = HeaderMap::new();
        assert_eq!(s.abort_for(&h), None);
        assert_eq!(s.delay_for(&h), None);
        h.insert(ABORT_HEADER, "429".parse().unwrap());
        h.insert(DELAY_HEADER, "250".parse().unwrap());
        assert_eq!(s.abort_for(&h), Some((StatusCode::TOO_MANY_REQUESTS, None)));
        assert_eq!(s.delay_for(&h), Some(Duration::from_millis(250)));
        // A header percentage can only lower the configured one.
        h.insert(ABORT_PERCENT_HEADER, "0".parse().unwrap());
        assert_eq!(s.abort_for(&h), None);
        let mut g = HeaderMap::new();
        g.insert(ABORT_GRPC_HEADER, "14".parse().unwrap());
        assert_eq!(s.abort_for(&g), Some((StatusCode::OK, Some(14))));
    }

    #[test]
    fn bad_status_is_refused() {
        let any = Any {
            type_url: TYPE_URL.into(),
            value: prost::Message::encode_to_vec(&pb::HttpFault {
                abort: Some(pb::FaultAbort {
                    error_type: Some(pb::fault_abort::ErrorType::HttpStatus(600)),
                    percentage: all(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let e = FaultSettings::compile(&any, "f").unwrap_err().to_string();
        assert!(e.contains("f.abort.http_status"), "{e}");
    }

    #[test]
    fn no_percentage_means_never() {
        let s = settings(pb::HttpFault {
            abort: Some(pb::FaultAbort {
                error_type: Some(pb::fault_abort::ErrorType::HttpStatus(503)),
                percentage: None,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(s.abort_for(&HeaderMap::new()), None);
    }
}
