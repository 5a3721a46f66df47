//! `envoy.filters.http.grpc_stats`: for gRPC requests (`content-type: application/grpc[+…]`),
//! counts the messages each way and, when the stream ends, charges the route's cluster:
//! `cluster.<name>.grpc.[<service>.<method>.]{total, success, failure, <grpc-status>,
//! request_message_count, response_message_count}` (the service and method with
//! `stats_for_all_methods`). With `emit_filter_state` the counts are the stream's
//! `envoy.filters.http.grpc_stats` object, which Istio's stats filter reads for
//! `istio_request_messages_total`/`istio_response_messages_total`.
//!
//! Stats are named per request (cluster, status, method): a worker resolves each name once and
//! keeps it, so the request path only locks the store for a name it has not seen.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use xds_client::pb::envoy::extensions::filters::http::grpc_stats::v3::{
    filter_config::PerMethodStatSpecifier, FilterConfig,
};
use xds_client::pb::google::protobuf::Any;

use crate::config::{reject_unhandled, ConfigError};
use crate::observe::stats::{Counter, Store};

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig";

#[derive(Debug)]
pub struct GrpcStatsConfig {
    /// Keep the counts as the stream's filter state.
    pub emit_filter_state: bool,
    stats_for_all_methods: bool,
    store: Store,
}

impl GrpcStatsConfig {
    pub fn compile(any: &Any, store: &Store, path: &str) -> Result<GrpcStatsConfig, ConfigError> {
        let mut cfg: FilterConfig = xds_client::TypeRegistry::global().unpack(any)?;
        let emit_filter_state = std::mem::take(&mut cfg.emit_filter_state);
        let stats_for_all_methods = match cfg.per_method_stat_specifier.take() {
            Some(PerMethodStatSpecifier::StatsForAllMethods(b)) => b.value,
            Some(PerMethodStatSpecifier::IndividualMethodStatsAllowlist(l)) => {
                // Put back, refused by name below.
                cfg.per_method_stat_specifier =
                    Some(PerMethodStatSpecifier::IndividualMethodStatsAllowlist(l));
                false
            }
            None => false,
        };
        reject_unhandled(&cfg, path)?;
        Ok(GrpcStatsConfig {
            emit_filter_state,
            stats_for_all_methods,
            store: store.clone(),
        })
    }

    /// The counters of one stream, when the request is gRPC (`None` otherwise).
    pub fn start(&self, headers: &http::HeaderMap, path: &str) -> Option<GrpcStream> {
        if !super::local_reply::is_grpc(headers) {
            return None;
        }
        let method = if self.stats_for_all_methods {
            service_method(path)
        } else {
            None
        };
        Some(GrpcStream {
            request: Default::default(),
            response: Default::default(),
            method,
        })
    }

    /// Charges the cluster's stats for a finished gRPC stream.
    pub fn charge(&self, cluster: &str, s: &GrpcStream, grpc_status: Option<u32>) {
        let prefix = match &s.method {
            Some(m) => format!("cluster.{cluster}.grpc.{m}."),
            None => format!("cluster.{cluster}.grpc."),
        };
        let status = grpc_status.unwrap_or(2);
        let outcome = if status == 0 { "success" } else { "failure" };
        let requests = s.request.count.load(Ordering::Relaxed);
        let responses = s.response.count.load(Ordering::Relaxed);
        COUNTERS.with(|c| {
            let mut c = c.borrow_mut();
            let mut add = |name: &str, n: u64| {
                let key = format!("{prefix}{name}");
                let counter = c
                    .entry(key)
                    .or_insert_with_key(|k| self.store.counter(k))
                    .clone();
                counter.add(n);
            };
            add(&status.to_string(), 1);
            add(outcome, 1);
            add("total", 1);
            // Envoy charges message counts only once there are some.
            if requests > 0 {
                add("request_message_count", requests);
            }
            if responses > 0 {
                add("response_message_count", responses);
            }
        });
    }
}

thread_local! {
    static COUNTERS: RefCell<HashMap<String, Arc<Counter>>> = RefCell::new(HashMap::new());
}

/// `/pkg.Service/Method` as `pkg.Service.Method` (None for any other path shape).
fn service_method(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some(format!("{service}.{method}"))
}

/// One stream's message counts, each way.
#[derive(Debug)]
pub struct GrpcStream {
    pub request: Arc<FrameCount>,
    pub response: Arc<FrameCount>,
    method: Option<String>,
}

/// Messages seen in one direction (shared between the body that counts and the stream's end).
#[derive(Debug, Default)]
pub struct FrameCount {
    count: AtomicU64,
}

impl FrameCount {
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Envoy's gRPC frame inspector: each 5-byte frame header (flag, big-endian length) starts a
/// message; the message's bytes are skipped.
#[derive(Debug)]
pub struct FrameInspector {
    count: Arc<FrameCount>,
    header: [u8; 5],
    header_pos: usize,
    payload_left: u64,
}

impl FrameInspector {
    pub fn new(count: Arc<FrameCount>) -> FrameInspector {
        FrameInspector {
            count,
            header: [0; 5],
            header_pos: 0,
            payload_left: 0,
        }
    }

    pub fn inspect(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left as usize).min(data.len());
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.header_pos == 0 {
                self.count.count.fetch_add(1, Ordering::Relaxed);
            }
            let n = (5 - self.header_pos).min(data.len());
            self.header[self.header_pos..self.header_pos + n].copy_from_slice(&data[..n]);
            self.header_pos += n;
            data = &data[n..];
            if self.header_pos == 5 {
                self.payload_left = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as u64;
                self.header_pos = 0;
            }
        }
    }
}

/// The response side: counts frames as the body goes out, unchanged.
impl petrel_filters::http_filter::BodyEncoder for FrameInspector {
    fn encode(&mut self, data: Bytes, _end_stream: bool) -> Bytes {
        self.inspect(&data);
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(chunks: &[&[u8]]) -> u64 {
        let c = Arc::new(FrameCount::default());
        let mut i = FrameInspector::new(c.clone());
        for ch in chunks {
            i.inspect(ch);
        }
        c.get()
    }

    #[test]
    fn frames_are_counted_across_chunks() {
        let msgs = b"\x00\x00\x00\x00\x01a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02hi";
        assert_eq!(counted(&[msgs]), 3);
        // Byte by byte.
        let bytes: Vec<&[u8]> = msgs.chunks(1).collect();
        assert_eq!(counted(&bytes), 3);
        // A header split across chunks, a large payload spread over chunks.
        assert_eq!(counted(&[b"\x00\x00", b"\x00\x00\x03ab", b"c\x01"]), 2);
        assert_eq!(counted(&[]), 0);
    }

    #[test]
    fn grpc_requests_and_methods() {
        let mut h = http::HeaderMap::new();
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc;x=y", true),
            ("application/grpc-web", false),
            ("application/grpcx", false),
            ("text/plain", false),
        ] {
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(super::super::local_reply::is_grpc(&h), grpc, "{ct}");
        }
        assert_eq!(
            service_method("/pkg.Svc/Get").as_deref(),
            Some("pkg.Svc.Get")
        );
        assert_eq!(service_method("/a/b/c"), None);
        assert_eq!(service_method("/nomethod"), None);
    }
}
