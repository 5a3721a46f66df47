//! Istio's peer metadata filter (`io.istio.http.peer_metadata.Config`, named
//! `istio.metadata_exchange` in Istio's listeners): learns who the peer on each side of a stream
//! is, for the stats filter, and tells the peers who this proxy is.
//!
//! Discovery (`downstream_discovery` on request headers, `upstream_discovery` on response
//! headers) tries its methods in order and keeps the first peer found; `istio_headers` reads
//! `x-envoy-peer-metadata` (and strips both exchange headers whatever was found);
//! `workload_discovery` asks Istio's workload metadata xDS, which needs Istio's metadata
//! discovery bootstrap extension: Petrel refuses that extension, so, as istio-proxy without it,
//! this method finds no one. Propagation (`upstream_propagation` on the request,
//! `downstream_propagation` on the response) sets `x-envoy-peer-metadata-id` (the node id) and
//! `x-envoy-peer-metadata` (this workload's metadata); towards downstream only the headers the
//! request itself carried are answered, and none go to clusters marked `disable_mx` (nor, with
//! `skip_external_clusters`, to `PassthroughCluster` or clusters marked `external`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use xds_client::pb::envoy::config::core::v3::Node;
use xds_client::pb::google::protobuf::Any;

use crate::http_filter::{FilterStatus, HttpFilter, HttpFilterFactory, RequestHead, ResponseHead};
use crate::workload_metadata::{IstioClusterMetadata, WorkloadMetadata};
use crate::{invalid, FilterConfigError};

pub const TYPE_URL: &str = "type.googleapis.com/io.istio.http.peer_metadata.Config";

const PEER_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");
const PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");

/// Decoded peers by header value: a worker sees the same few peers over and over.
const CACHE_LIMIT: usize = 1024;

thread_local! {
    static PEER_CACHE: RefCell<HashMap<HeaderValue, Arc<WorkloadMetadata>>> =
        RefCell::new(HashMap::new());
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Discovery {
    IstioHeaders,
    WorkloadDiscovery,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Propagation {
    skip_external_clusters: bool,
}

#[derive(Debug)]
struct Config {
    downstream_discovery: Vec<Discovery>,
    upstream_discovery: Vec<Discovery>,
    downstream_propagation: Vec<Propagation>,
    upstream_propagation: Vec<Propagation>,
    additional_labels: Vec<String>,
    id: HeaderValue,
    value: HeaderValue,
}

#[derive(Debug)]
pub struct Factory {
    name: String,
    config: Arc<Config>,
}

mod pb {
    /// `io.istio.http.peer_metadata.Config` as `xds-client/proto/istio/peer_metadata.proto`
    /// declares it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Config {
        #[prost(message, repeated, tag = "1")]
        pub downstream_discovery: Vec<DiscoveryMethod>,
        #[prost(message, repeated, tag = "2")]
        pub upstream_discovery: Vec<DiscoveryMethod>,
        #[prost(message, repeated, tag = "3")]
        pub downstream_propagation: Vec<PropagationMethod>,
        #[prost(message, repeated, tag = "4")]
        pub upstream_propagation: Vec<PropagationMethod>,
        #[prost(bool, tag = "5")]
        pub shared_with_upstream: bool,
        #[prost(string, repeated, tag = "6")]
        pub additional_labels: Vec<String>,
    }
    impl prost::Name for Config {
        const NAME: &'static str = "Config";
        const PACKAGE: &'static str = "io.istio.http.peer_metadata";
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioHeaders {
        #[prost(bool, tag = "1")]
        pub skip_external_clusters: bool,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpstreamFilterState {
        #[prost(string, tag = "1")]
        pub peer_metadata_key: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DiscoveryMethod {
        #[prost(oneof = "Discovery", tags = "1, 2, 3, 4")]
        pub method_specifier: Option<Discovery>,
    }
    /// The proto's oneof, names as Istio gives them.
    #[allow(clippy::enum_variant_names)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Discovery {
        #[prost(message, tag = "1")]
        Baggage(Empty),
        #[prost(message, tag = "2")]
        WorkloadDiscovery(Empty),
        #[prost(message, tag = "3")]
        IstioHeaders(IstioHeaders),
        #[prost(message, tag = "4")]
        UpstreamFilterState(UpstreamFilterState),
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PropagationMethod {
        #[prost(oneof = "Propagation", tags = "1, 2")]
        pub method_specifier: Option<Propagation>,
    }
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Propagation {
        #[prost(message, tag = "1")]
        IstioHeaders(IstioHeaders),
        #[prost(message, tag = "2")]
        Baggage(Empty),
    }
}

/// The ambient forms (baggage, filter-state peers) belong to waypoints and ztunnel, which Petrel
/// does not stand in for: refused by name.
fn waypoint_only(path: &str, what: &str) -> FilterConfigError {
    invalid(
        path,
        format!("'{what}' (ambient waypoint peer metadata) is not supported"),
    )
}

fn discovery(
    list: &[pb::DiscoveryMethod],
    path: &str,
) -> Result<Vec<Discovery>, FilterConfigError> {
    list.iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let p = format!("{path}[{i}]");
            match &m.method_specifier {
                Some(pb::Discovery::IstioHeaders(h)) if h.skip_external_clusters => Some(Err(
                    invalid(p, "skip_external_clusters applies to propagation only"),
                )),
                Some(pb::Discovery::IstioHeaders(_)) => Some(Ok(Discovery::IstioHeaders)),
                Some(pb::Discovery::WorkloadDiscovery(_)) => Some(Ok(Discovery::WorkloadDiscovery)),
                Some(pb::Discovery::Baggage(_)) => Some(Err(waypoint_only(&p, "baggage"))),
                Some(pb::Discovery::UpstreamFilterState(_)) => {
                    Some(Err(waypoint_only(&p, "upstream_filter_state")))
                }
                // An empty method does nothing in Istio either.
                None => None,
            }
        })
        .collect()
}

fn propagation(
    list: &[pb::PropagationMethod],
    path: &str,
) -> Result<Vec<Propagation>, FilterConfigError> {
    list.iter()
        .enumerate()
        .filter_map(|(i, m)| match &m.method_specifier {
            Some(pb::Propagation::IstioHeaders(h)) => Some(Ok(Propagation {
                skip_external_clusters: h.skip_external_clusters,
            })),
            Some(pb::Propagation::Baggage(_)) => {
                Some(Err(waypoint_only(&format!("{path}[{i}]"), "baggage")))
            }
            None => None,
        })
        .collect()
}

impl Factory {
    pub fn compile(
        name: &str,
        any: &Any,
        node: &Node,
        path: &str,
    ) -> Result<Factory, FilterConfigError> {
        let cfg: pb::Config = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, format!("cannot decode peer metadata config: {e}")))?;
        if cfg.shared_with_upstream {
            // Only internal listeners read a peer shared with the upstream connection.
            return Err(invalid(
                format!("{path}.shared_with_upstream"),
                "sharing peers with upstream (internal listeners) is not supported",
            ));
        }
        let local = WorkloadMetadata::from_struct(
            &node.metadata.clone().unwrap_or_default(),
            &cfg.additional_labels,
        );
        let header = |v: &str, field: &str| {
            HeaderValue::from_str(v)
                .map_err(|_| invalid(format!("{path}.{field}"), "not a valid header value"))
        };
        Ok(Factory {
            name: name.to_string(),
            config: Arc::new(Config {
                downstream_discovery: discovery(
                    &cfg.downstream_discovery,
                    &format!("{path}.downstream_discovery"),
                )?,
                upstream_discovery: discovery(
                    &cfg.upstream_discovery,
                    &format!("{path}.upstream_discovery"),
                )?,
                downstream_propagation: propagation(
                    &cfg.downstream_propagation,
                    &format!("{path}.downstream_propagation"),
                )?,
                upstream_propagation: propagation(
                    &cfg.upstream_propagation,
                    &format!("{path}.upstream_propagation"),
                )?,
                id: header(&node.id, "node.id")?,
                value: header(&local.to_header_value(), "node.metadata")?,
                additional_labels: cfg.additional_labels,
            }),
        })
    }
}

impl HttpFilterFactory for Factory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self) -> Box<dyn HttpFilter> {
        Box::new(Filter {
            config: self.config.clone(),
            request_peer_id: false,
            request_peer: false,
        })
    }
}

struct Filter {
    config: Arc<Config>,
    /// The request carried the exchange headers: the response answers with ours.
    request_peer_id: bool,
    request_peer: bool,
}

impl Config {
    /// The first peer a method finds; the exchange headers are stripped either way.
    fn discover(
        &self,
        methods: &[Discovery],
        headers: &mut HeaderMap,
    ) -> Option<Arc<WorkloadMetadata>> {
        let mut found = None;
        for m in methods {
            if found.is_some() {
                break;
            }
            found = match m {
                Discovery::IstioHeaders => headers
                    .get(&PEER_METADATA)
                    .filter(|v| !v.is_empty())
                    .and_then(|v| self.decode(v)),
                Discovery::WorkloadDiscovery => None,
            };
        }
        if methods.contains(&Discovery::IstioHeaders) {
            headers.remove(&PEER_ID);
            headers.remove(&PEER_METADATA);
        }
        found
    }

    fn decode(&self, v: &HeaderValue) -> Option<Arc<WorkloadMetadata>> {
        PEER_CACHE.with(|c| {
            let mut cache = c.borrow_mut();
            if let Some(m) = cache.get(v) {
                return Some(m.clone());
            }
            let m = Arc::new(WorkloadMetadata::from_header_value(
                v.as_bytes(),
                &self.additional_labels,
            )?);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(v.clone(), m.clone());
            Some(m)
        })
    }

    /// Istio's `skipMXHeaders`: never to a `disable_mx` cluster; with `skip_external_clusters`,
    /// not to `PassthroughCluster` or an `external` one.
    fn skips(p: &Propagation, cluster: Option<&str>, istio: Option<&IstioClusterMetadata>) -> bool {
        if cluster.is_none() {
            return false;
        }
        if p.skip_external_clusters
            && (cluster == Some("PassthroughCluster") || istio.is_some_and(|m| m.external))
        {
            return true;
        }
        istio.is_some_and(|m| m.disable_mx)
    }
}

impl HttpFilter for Filter {
    fn decode_headers(&mut self, req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        let c = &self.config;
        if c.downstream_discovery.contains(&Discovery::IstioHeaders) {
            self.request_peer_id = req.headers.contains_key(&PEER_ID);
            self.request_peer = req.headers.contains_key(&PEER_METADATA);
        }
        if let Some(peer) = c.discover(&c.downstream_discovery, req.headers) {
            req.peers.downstream.get_or_insert(peer);
        }
        let (cluster, istio) = req
            .route
            .map_or((None, None), |r| (r.cluster, r.cluster_istio));
        for p in &c.upstream_propagation {
            if !Config::skips(p, cluster, istio) {
                req.headers.insert(PEER_ID, c.id.clone());
                req.headers.insert(PEER_METADATA, c.value.clone());
            }
        }
        FilterStatus::Continue
    }

    fn encode_headers(&mut self, resp: &mut ResponseHead<'_>) -> FilterStatus {
        let c = &self.config;
        if let Some(peer) = c.discover(&c.upstream_discovery, resp.headers) {
            resp.peers.upstream.get_or_insert(peer);
        }
        for p in &c.downstream_propagation {
            if Config::skips(p, resp.cluster, resp.cluster_istio) {
                continue;
            }
            if self.request_peer_id {
                resp.headers.insert(PEER_ID, c.id.clone());
            }
            if self.request_peer {
                resp.headers.insert(PEER_METADATA, c.value.clone());
            }
        }
        FilterStatus::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_filter::{RouteInfo, StreamInfo, StreamPeers};

    fn node(workload: &str) -> Node {
        let json = serde_json::json!({
            "id": format!("{workload}-node"),
            "metadata": {
                "WORKLOAD_NAME": workload, "NAMESPACE": "default", "CLUSTER_ID": "c1",
                "LABELS": {"app": workload, "version": "v1", "role": "r"},
            }
        });
        xds_client::TypeRegistry::global()
            .from_json(&json, false)
            .unwrap()
    }

    fn factory(cfg: serde_json::Value, workload: &str) -> Result<Factory, FilterConfigError> {
        let any: Any = xds_client::TypeRegistry::global()
            .from_json(
                &serde_json::json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": TYPE_URL, "value": cfg}),
                false,
            )
            .unwrap();
        Factory::compile("mx", &any, &node(workload), "f")
    }

    fn stream_info(state: &crate::filter_state::FilterState) -> StreamInfo<'_> {
        StreamInfo {
            downstream_remote: "127.0.0.1:1".parse().unwrap(),
            downstream_local: "127.0.0.1:2".parse().unwrap(),
            protocol: "HTTP/1.1",
            start_time: std::time::SystemTime::now(),
            downstream_direct_remote: "127.0.0.1:1".parse().unwrap(),
            requested_server_name: "",
            peer: None,
            scheme: "http",
            authority: "a",
            filter_state: state,
        }
    }

    struct Stream {
        info_state: crate::filter_state::FilterState,
        peers: StreamPeers,
    }

    impl Stream {
        fn new() -> Stream {
            Stream {
                info_state: Default::default(),
                peers: StreamPeers::default(),
            }
        }
        fn request(
            &mut self,
            f: &mut dyn HttpFilter,
            h: &mut HeaderMap,
            cluster: Option<(&str, Option<&IstioClusterMetadata>)>,
        ) {
            let info = stream_info(&self.info_state);
            let configs = Default::default();
            let route = cluster.map(|(c, m)| RouteInfo {
                cluster: Some(c),
                cluster_istio: m,
                configs: [&configs, &configs],
            });
            let m = http::Method::GET;
            let mut alpn = None;
            f.decode_headers(
                &mut RequestHead {
                    method: &m,
                    path: "/",
                    headers: h,
                    info: &info,
                    route,
                    upstream_alpn: &mut alpn,
                    dynamic_metadata: &mut Default::default(),
                    peers: &mut self.peers,
                },
                true,
            );
        }
        fn response(&mut self, f: &mut dyn HttpFilter, h: &mut HeaderMap) {
            let info = stream_info(&self.info_state);
            let mut status = http::StatusCode::OK;
            f.encode_headers(&mut ResponseHead {
                status: &mut status,
                headers: h,
                info: &info,
                end_stream: true,
                peers: &mut self.peers,
                cluster: Some("c"),
                cluster_istio: None,
            });
        }
    }

    #[test]
    fn client_and_server_exchange_identities() {
        let client = factory(
            serde_json::json!({
                "upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
                "upstream_propagation": [{"istio_headers": {}}],
            }),
            "productpage-v1",
        )
        .unwrap();
        let server = factory(
            serde_json::json!({
                "downstream_discovery": [{"istio_headers": {}}],
                "downstream_propagation": [{"istio_headers": {}}],
            }),
            "ratings-v1",
        )
        .unwrap();
        let (mut cf, mut sf) = (client.create(), server.create());
        let (mut cs, mut ss) = (Stream::new(), Stream::new());
        let mut req = HeaderMap::new();
        cs.request(cf.as_mut(), &mut req, Some(("outbound", None)));
        assert_eq!(req[&PEER_ID], "productpage-v1-node");
        ss.request(sf.as_mut(), &mut req, None);
        // The server learnt the client and stripped the headers before its upstream.
        assert!(!req.contains_key(&PEER_ID) && !req.contains_key(&PEER_METADATA));
        let down = ss.peers.downstream.clone().unwrap();
        assert_eq!(down.workload_name, "productpage-v1");
        assert_eq!(down.app_version, "v1");
        assert!(down.labels.is_empty());
        let mut resp = HeaderMap::new();
        ss.response(sf.as_mut(), &mut resp);
        assert_eq!(resp[&PEER_ID], "ratings-v1-node");
        cs.response(cf.as_mut(), &mut resp);
        assert!(!resp.contains_key(&PEER_METADATA));
        assert_eq!(
            cs.peers.upstream.as_ref().unwrap().workload_name,
            "ratings-v1"
        );
    }

    #[test]
    fn server_answers_only_what_was_asked() {
        let server = factory(
            serde_json::json!({
                "downstream_discovery": [{"istio_headers": {}}],
                "downstream_propagation": [{"istio_headers": {}}],
            }),
            "ratings-v1",
        )
        .unwrap();
        let mut f = server.create();
        let mut s = Stream::new();
        s.request(f.as_mut(), &mut HeaderMap::new(), None);
        let mut resp = HeaderMap::new();
        s.response(f.as_mut(), &mut resp);
        assert!(resp.is_empty());
        assert!(s.peers.downstream.is_none());
    }

    #[test]
    fn mx_headers_skip_marked_clusters() {
        let client = factory(
            serde_json::json!({"upstream_propagation": [{"istio_headers": {"skip_external_clusters": true}}]}),
            "a",
        )
        .unwrap();
        let external = IstioClusterMetadata {
            external: true,
            ..Default::default()
        };
        let disabled = IstioClusterMetadata {
            disable_mx: true,
            ..Default::default()
        };
        for (cluster, meta, sent) in [
            ("PassthroughCluster", None, false),
            ("ext", Some(&external), false),
            ("off", Some(&disabled), false),
            ("mesh", None, true),
        ] {
            let mut h = HeaderMap::new();
            Stream::new().request(client.create().as_mut(), &mut h, Some((cluster, meta)));
            assert_eq!(h.contains_key(&PEER_METADATA), sent, "{cluster}");
        }
    }

    #[test]
    fn ambient_forms_are_refused_by_name() {
        let e = factory(
            serde_json::json!({"downstream_discovery": [{"baggage": {}}]}),
            "a",
        )
        .unwrap_err();
        assert!(e.to_string().contains("downstream_discovery[0]"), "{e}");
        assert!(factory(serde_json::json!({"shared_with_upstream": true}), "a").is_err());
        assert!(factory(
            serde_json::json!({"upstream_discovery": [{"upstream_filter_state": {"peer_metadata_key": "x"}}]}),
            "a"
        )
        .is_err());
    }

    #[test]
    fn garbage_peer_header_is_no_peer() {
        let server = factory(
            serde_json::json!({"downstream_discovery": [{"istio_headers": {}}]}),
            "a",
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert(PEER_METADATA, HeaderValue::from_static("not base64!"));
        let mut s = Stream::new();
        s.request(server.create().as_mut(), &mut h, None);
        assert!(s.peers.downstream.is_none());
        assert!(h.is_empty());
    }
}
