//! Helpers for tests that drive a proxy over xDS: resources from JSON, delta responses, waiting
//! for requests and for the proxy to apply what it was sent.

use std::time::Duration;

use prost::{Message, Name};
use xds_client::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use xds_client::pb::google::protobuf::Any;
use xds_client::TypeRegistry;

use crate::http_raw;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// A resource of type `M` from proto3 JSON, packed as an `Any`.
pub fn any<M: Message + Default + Name>(json: &serde_json::Value) -> Any {
    let m: M = TypeRegistry::global()
        .from_json(json, false)
        .unwrap_or_else(|e| panic!("{}: {e}", M::full_name()));
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// A delta response adding `(name, version, body)` and removing `removed`.
pub fn delta(
    type_url: &str,
    nonce: &str,
    added: Vec<(&str, &str, Any)>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources: added
            .into_iter()
            .map(|(name, version, body)| Resource {
                name: name.into(),
                version: version.into(),
                resource: Some(body),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }
}

/// The next item of a channel, or a panic after 15 s.
pub async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("timed out")
        .expect("closed")
}

/// A GET on `port`: status (0 when the connection failed) and body.
pub async fn get(port: u16, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        http_raw(port, req.as_bytes())
            .map(|r| (r.status, r.body_str()))
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// Polls until the proxy answers `want` on `path` (updates apply asynchronously); returns the
/// last status seen.
pub async fn eventually(port: u16, path: &str, want: u16) -> u16 {
    let mut last = 0;
    for _ in 0..100 {
        last = get(port, path).await.0;
        if last == want {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// An admin page as JSON.
pub async fn admin_json(admin: u16, path: &str) -> serde_json::Value {
    let body = get(admin, path).await.1;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Petrel or Envoy (`name`) on a bootstrap with CDS and LDS from ADS at `ads` (`host:port` or
/// a Unix socket path), waiting for both without a timeout (Istio's `0s`).
pub async fn start_with_lds(
    name: &'static str,
    ads: Ads<'_>,
    api_type: &str,
) -> (u16, crate::Proxy) {
    start_with_waits(name, ads, api_type, "0s", "0s").await
}

/// `start_with_lds` with these `initial_fetch_timeout`s for CDS and LDS.
pub async fn start_with_waits(
    name: &'static str,
    ads: Ads<'_>,
    api_type: &str,
    cds_wait: &str,
    lds_wait: &str,
) -> (u16, crate::Proxy) {
    let admin = crate::free_port();
    let endpoint = match ads {
        Ads::Tcp(addr) => {
            let port = addr.rsplit(':').next().expect("port");
            format!("{{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}")
        }
        Ads::Unix(path) => format!("{{pipe: {{path: {}}}}}", path.display()),
    };
    let bootstrap = format!(
        r#"
node: {{id: sidecar~10.0.0.1~app.default~default.svc.cluster.local, cluster: app.default}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  cds_config: {{ads: {{}}, initial_fetch_timeout: {cds_wait}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, initial_fetch_timeout: {lds_wait}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: xds-grpc, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {endpoint}}}}}]}}]}}
"#
    );
    let dir = std::env::temp_dir().join(format!("{name}-lds-{}-{admin}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let path = dir.join("petrel.yaml");
    std::fs::write(&path, bootstrap).expect("write");
    let bin = match name {
        "envoy" => crate::envoy_bin().expect("envoy binary"),
        _ => crate::petrel_bin(),
    };
    // A long drain: a replaced listener's connections close at random moments over the drain
    // time (gradual), and tests keep connections across updates.
    let proxy = tokio::task::spawn_blocking(move || {
        crate::start_with(
            name,
            &bin,
            &path,
            admin,
            admin as u32,
            crate::Ready::Admin,
            &["--drain-time-s", "86400"],
        )
    })
    .await
    .expect("start");
    (admin, proxy)
}

/// Where the management server is.
pub enum Ads<'a> {
    Tcp(&'a str),
    Unix(&'a std::path::Path),
}
