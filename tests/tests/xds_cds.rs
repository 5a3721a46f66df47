//! Petrel under a management server: clusters arrive over ADS (CDS), are served at once, a bad
//! one is NACKed with the field named while the last good set keeps serving, and removal works.

use petrel_tests::ads_server::serve_tcp;
use petrel_tests::xds::*;
use petrel_tests::*;
use xds_client::pb::envoy::service::discovery::v3::DiscoveryResponse;
use xds_client::pb::google::protobuf::Any;

type Cluster = xds_client::pb::envoy::config::cluster::v3::Cluster;

fn cluster_any(json: serde_json::Value) -> Any {
    any::<Cluster>(&json)
}

/// Starts Petrel on a bootstrap whose only route goes to the dynamic cluster `dyn`; returns the
/// listener and admin ports and the running proxy.
async fn start_under_ads(addr: &str, api_type: &str) -> (u16, u16, Proxy) {
    let ads_port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let (main, admin) = (free_port(), free_port());
    let bootstrap = format!(
        r#"
node: {{id: test-node, cluster: test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: {main}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            validate_clusters: false
            virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: dyn}}}}]}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: xds
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: xds, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {ads_port}}}}}}}}}]}}]}}
"#
    );
    let dir = std::env::temp_dir().join(format!("petrel-cds-{}-{api_type}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let path = dir.join("petrel.yaml");
    std::fs::write(&path, bootstrap).expect("write");
    let proxy = tokio::task::spawn_blocking(move || {
        start_until("petrel", &petrel_bin(), &path, admin, 0, Ready::Admin)
    })
    .await
    .expect("start");
    (main, admin, proxy)
}

/// `/ready`'s status and body.
async fn ready(admin: u16) -> (u16, String) {
    get(admin, "/ready").await
}

fn dyn_cluster(port: u16) -> serde_json::Value {
    serde_json::json!({"name": "dyn", "connect_timeout": "1s", "load_assignment": {"cluster_name": "dyn", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_from_cds() {
    let (addr, mut sessions) = serve_tcp().await;
    let echo = start_echo();
    let (main, admin, _petrel) = start_under_ads(&addr, "GRPC").await;
    let mut s = next(&mut sessions.sotw).await;
    let first = next(&mut s.requests).await;
    assert_eq!(first.type_url, CDS);
    assert_eq!(
        first.node.as_ref().map(|n| n.id.as_str()),
        Some("test-node")
    );
    // Petrel announces itself (and its version) where Envoy puts its own name.
    let node = first.node.as_ref().expect("node");
    assert_eq!(node.user_agent_name, "petrel");
    assert!(node.user_agent_version_type.is_some());
    // Initialization waits for the first CDS answer: not ready, listeners not accepting.
    assert_eq!(ready(admin).await, (503, "INITIALIZING\n".into()));

    let dyn_cluster = dyn_cluster(echo);
    let push = |version: &str, nonce: &str, resources: Vec<Any>| DiscoveryResponse {
        version_info: version.into(),
        nonce: nonce.into(),
        type_url: CDS.into(),
        resources,
        ..Default::default()
    };
    s.responses
        .send(Ok(push("1", "a", vec![cluster_any(dyn_cluster.clone())])))
        .await
        .expect("send");
    let ack = next(&mut s.requests).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("1", "a")
    );
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    assert_eq!(eventually(main, "/x", 200).await, 200);
    let dump = admin_json(admin, "/config_dump?resource=dynamic_active_clusters").await;
    assert_eq!(
        dump["configs"][0]["@type"],
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster"
    );
    assert_eq!(dump["configs"][0]["version_info"], "1");
    assert_eq!(dump["configs"][0]["cluster"]["name"], "dyn");

    // A cluster Envoy refuses too (a Maglev table size that is not prime): NACK naming it,
    // and the last good set keeps serving.
    let bad = serde_json::json!({"name": "other", "lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 65536}});
    s.responses
        .send(Ok(push(
            "2",
            "b",
            vec![cluster_any(dyn_cluster), cluster_any(bad)],
        )))
        .await
        .expect("send");
    let nack = next(&mut s.requests).await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("1", "b")
    );
    let reason = nack.error_detail.expect("NACK").message;
    assert!(
        reason.contains("other") && reason.contains("prime"),
        "{reason}"
    );
    assert_eq!(eventually(main, "/x", 200).await, 200);

    // State of the world without it: the cluster is gone.
    s.responses
        .send(Ok(push("3", "c", vec![])))
        .await
        .expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(main, "/x", 503).await, 503);

    let stats = get(admin, "/stats?filter=cluster_manager.cds").await.1;
    assert!(
        stats.contains("cluster_manager.cds.update_success: 2"),
        "{stats}"
    );
    assert!(
        stats.contains("cluster_manager.cds.update_rejected: 1"),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_from_delta_cds() {
    use xds_client::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    let (addr, mut sessions) = serve_tcp().await;
    let echo = start_echo();
    let (main, _admin, _petrel) = start_under_ads(&addr, "DELTA_GRPC").await;
    let mut s = next(&mut sessions.delta).await;
    let first = next(&mut s.requests).await;
    assert_eq!(
        (
            first.type_url.as_str(),
            first.resource_names_subscribe.as_slice()
        ),
        (CDS, &[][..])
    );
    let resource = |name: &str, v: &str, json: serde_json::Value| Resource {
        name: name.into(),
        version: v.into(),
        resource: Some(cluster_any(json)),
        ..Default::default()
    };
    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "1".into(),
            resources: vec![resource("dyn", "a", dyn_cluster(echo))],
            ..Default::default()
        }))
        .await
        .expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(main, "/x", 200).await, 200);
    // A bad addition is refused as a whole; what was there keeps serving.
    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "2".into(),
            resources: vec![resource(
                "other",
                "b",
                serde_json::json!({"name": "other", "type": "EDS"}),
            )],
            ..Default::default()
        }))
        .await
        .expect("send");
    let nack = next(&mut s.requests).await;
    assert!(nack.error_detail.is_some_and(|e| e.message.contains("EDS")));
    assert_eq!(eventually(main, "/x", 200).await, 200);
    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "3".into(),
            removed_resources: vec!["dyn".into()],
            ..Default::default()
        }))
        .await
        .expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(main, "/x", 503).await, 503);
}

/// An EDS cluster from CDS warms (not routable) until its assignment arrives over EDS, which the
/// proxy subscribes to by name; then it serves, and a new assignment moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_clusters_warm_until_their_assignment() {
    use xds_client::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    let (addr, mut sessions) = serve_tcp().await;
    let (echo, other) = (start_echo(), start_echo());
    let (main, admin, _petrel) = start_under_ads(&addr, "DELTA_GRPC").await;
    let mut s = next(&mut sessions.delta).await;
    assert_eq!(next(&mut s.requests).await.type_url, CDS);
    let eds_cluster = serde_json::json!({"name": "dyn", "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}}});
    let cds = Resource {
        name: "dyn".into(),
        version: "1".into(),
        resource: Some(cluster_any(eds_cluster)),
        ..Default::default()
    };
    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "c1".into(),
            resources: vec![cds],
            ..Default::default()
        }))
        .await
        .expect("send");
    // The ACK and the EDS subscription, in either order.
    let mut saw_ack = false;
    let mut eds_names = Vec::new();
    while !saw_ack || eds_names.is_empty() {
        let r = next(&mut s.requests).await;
        if r.type_url == CDS {
            assert!(r.error_detail.is_none(), "{:?}", r.error_detail);
            saw_ack = true;
        } else {
            assert_eq!(r.type_url, EDS);
            eds_names = r.resource_names_subscribe;
        }
    }
    assert_eq!(eds_names, ["dyn"]);
    // Warming: initialization waits for the cluster's assignment.
    assert_eq!(ready(admin).await.0, 503);
    let dump = admin_json(admin, "/config_dump?resource=dynamic_warming_clusters").await;
    assert_eq!(dump["configs"][0]["cluster"]["name"], "dyn", "{dump}");
    let cla = |port: u16| {
        let v = serde_json::json!({"cluster_name": "dyn", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]});
        any::<xds_client::pb::envoy::config::endpoint::v3::ClusterLoadAssignment>(&v)
    };
    let eds = |nonce: &str, port: u16| DeltaDiscoveryResponse {
        type_url: EDS.into(),
        nonce: nonce.into(),
        resources: vec![Resource {
            name: "dyn".into(),
            version: nonce.into(),
            resource: Some(cla(port)),
            ..Default::default()
        }],
        ..Default::default()
    };
    s.responses.send(Ok(eds("e1", echo))).await.expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(main, "/x", 200).await, 200);
    assert_eq!(ready(admin).await, (200, "LIVE\n".into()));
    // A new assignment: the cluster now points at a port where nothing listens... then back.
    let closed = free_port();
    s.responses.send(Ok(eds("e2", closed))).await.expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(main, "/x", 503).await, 503);
    s.responses.send(Ok(eds("e3", other))).await.expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(main, "/x", 200).await, 200);
}
