//! Listeners (LDS) and route configurations (RDS) over ADS: initialization waits for clusters,
//! then listeners, which warm until their routes arrive; updates apply without failing requests
//! and drain the old listener's connections; a bad listener is NACKed while the last good one
//! serves; removal closes the port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use petrel_tests::ads_server::{serve_tcp, serve_unix};
use petrel_tests::xds::*;
use petrel_tests::*;
use serde_json::json;
use xds_client::pb::envoy::config::cluster::v3::Cluster;
use xds_client::pb::envoy::config::listener::v3::Listener;
use xds_client::pb::envoy::config::route::v3::RouteConfiguration;
use xds_client::pb::envoy::service::discovery::v3::DiscoveryResponse;

fn cluster(name: &str, port: u16) -> serde_json::Value {
    json!({"name": name, "connect_timeout": "1s", "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
}

fn router() -> serde_json::Value {
    json!([{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}])
}

/// A listener whose connection manager takes its routes from RDS (`route`), as Istio's are.
fn rds_listener(name: &str, port: u16, route: &str, server_name: &str) -> serde_json::Value {
    json!({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name, "server_name": server_name,
            "rds": {"config_source": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}, "route_config_name": route},
            "http_filters": router()}}]}]})
}

/// A listener with an inline route to `cluster` (validated against the known clusters).
fn inline_listener(name: &str, port: u16, cluster: &str) -> serde_json::Value {
    json!({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
            "http_filters": router()}}]}]})
}

fn route(name: &str, cluster: &str, teapot: bool) -> serde_json::Value {
    let mut routes = vec![json!({"match": {"prefix": "/"}, "route": {"cluster": cluster}})];
    if teapot {
        routes.insert(
            0,
            json!({"match": {"path": "/teapot"}, "direct_response": {"status": 418}}),
        );
    }
    json!({"name": name, "virtual_hosts": [{"name": "v", "domains": ["*"], "routes": routes}]})
}

/// Reads requests until one of each wanted type has come; returns them in `types` order.
async fn requests_of<R>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<R>,
    types: &[&str],
    type_of: impl Fn(&R) -> &str,
) -> Vec<R> {
    let mut got: Vec<Option<R>> = types.iter().map(|_| None).collect();
    while got.iter().any(|g| g.is_none()) {
        let r = next(rx).await;
        let i = types
            .iter()
            .position(|t| *t == type_of(&r))
            .unwrap_or_else(|| panic!("unexpected request for {}", type_of(&r)));
        assert!(got[i].is_none(), "two requests for {}", types[i]);
        got[i] = Some(r);
    }
    got.into_iter().flatten().collect()
}

/// One whole response with a `content-length` body, read from a kept-alive connection.
fn read_response(c: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return text,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The `server` header of a GET on a new connection.
fn server_header(port: u16) -> String {
    http_raw(
        port,
        b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .ok()
    .and_then(|r| r.header("server").map(str::to_string))
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_and_routes_over_delta_ads() {
    let (addr, mut sessions) = serve_tcp().await;
    let echo = start_echo();
    let (admin, _petrel) = start_with_lds("petrel", Ads::Tcp(&addr), "DELTA_GRPC").await;
    let mut s = next(&mut sessions.delta).await;
    // Clusters first: LDS is requested only once they are in.
    let first = next(&mut s.requests).await;
    assert_eq!(first.type_url, CDS);
    assert_eq!(get(admin, "/ready").await, (503, "INITIALIZING\n".into()));
    s.responses
        .send(Ok(delta(
            CDS,
            "c1",
            vec![("dyn", "1", any::<Cluster>(&cluster("dyn", echo)))],
            &[],
        )))
        .await
        .expect("send");
    let rs = requests_of(&mut s.requests, &[CDS, LDS], |r| r.type_url.as_str()).await;
    assert!(rs[0].error_detail.is_none());
    assert!(rs[1].resource_names_subscribe.is_empty(), "wildcard");

    // The listener warms until its route configuration arrives.
    let port = free_port();
    s.responses
        .send(Ok(delta(
            LDS,
            "l1",
            vec![(
                "http",
                "1",
                any::<Listener>(&rds_listener("http", port, "r1", "v1")),
            )],
            &[],
        )))
        .await
        .expect("send");
    let rs = requests_of(&mut s.requests, &[LDS, RDS], |r| r.type_url.as_str()).await;
    assert!(rs[0].error_detail.is_none(), "{:?}", rs[0].error_detail);
    assert_eq!(rs[1].resource_names_subscribe, ["r1"]);
    assert_eq!(get(admin, "/ready").await.0, 503);
    // pilot-agent's readiness probe reads these: not ready while the listener warms.
    let probe = "/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)";
    assert_eq!(get(admin, probe).await.1, "");
    let dump = admin_json(admin, "/config_dump?resource=dynamic_listeners").await;
    let l = &dump["configs"][0];
    assert_eq!(l["name"], "http", "{dump}");
    assert_eq!(l["warming_state"]["version_info"], "1", "{dump}");
    assert!(l.get("active_state").is_none(), "{dump}");

    s.responses
        .send(Ok(delta(
            RDS,
            "r1",
            vec![(
                "r1",
                "1",
                any::<RouteConfiguration>(&route("r1", "dyn", false)),
            )],
            &[],
        )))
        .await
        .expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(port, "/x", 200).await, 200);
    assert_eq!(get(admin, "/ready").await, (200, "LIVE\n".into()));
    assert_eq!(
        get(admin, probe).await.1,
        "listener_manager.workers_started: 1\nserver.state: 0\n"
    );
    let updates = get(
        admin,
        "/stats?usedonly&filter=^(cluster_manager\\.cds|listener_manager\\.lds)\\.(update_success|update_rejected)$",
    )
    .await
    .1;
    assert_eq!(
        updates,
        "cluster_manager.cds.update_success: 1\nlistener_manager.lds.update_success: 1\n"
    );
    let dump = admin_json(admin, "/config_dump").await;
    let configs = dump["configs"].as_array().expect("configs");
    let of = |t: &str| {
        configs
            .iter()
            .find(|c| c["@type"] == format!("type.googleapis.com/envoy.admin.v3.{t}"))
            .cloned()
            .unwrap_or_default()
    };
    let l = &of("ListenersConfigDump")["dynamic_listeners"][0];
    assert_eq!(l["active_state"]["version_info"], "1", "{l}");
    assert_eq!(l["active_state"]["listener"]["name"], "http", "{l}");
    let r = &of("RoutesConfigDump")["dynamic_route_configs"][0];
    assert_eq!(
        (&r["version_info"], &r["route_config"]["name"]),
        (&json!("1"), &json!("r1")),
        "{r}"
    );

    // A route update applies to the next request.
    s.responses
        .send(Ok(delta(
            RDS,
            "r2",
            vec![(
                "r1",
                "2",
                any::<RouteConfiguration>(&route("r1", "dyn", true)),
            )],
            &[],
        )))
        .await
        .expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(port, "/teapot", 418).await, 418);

    // A listener update under load: no request fails; an in-flight request on the old listener
    // finishes, then its connection (idle, draining) is closed.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_raw(
                    port,
                    b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
                ) {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let in_flight = std::thread::spawn(move || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c.write_all(b"GET /delay/1500 HTTP/1.1\r\nhost: t\r\n\r\n")
            .expect("write");
        let head = read_response(&mut c);
        // The connection keeps its listener: its next request is served by the old one too.
        std::thread::sleep(Duration::from_millis(1500));
        c.write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
            .expect("write");
        (head, read_response(&mut c))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.responses
        .send(Ok(delta(
            LDS,
            "l2",
            vec![(
                "http",
                "2",
                any::<Listener>(&rds_listener("http", port, "r1", "v2")),
            )],
            &[],
        )))
        .await
        .expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    let mut server = String::new();
    for _ in 0..100 {
        server = tokio::task::spawn_blocking(move || server_header(port))
            .await
            .expect("get");
        if server == "v2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server, "v2");
    let (head, second) = tokio::task::spawn_blocking(move || in_flight.join())
        .await
        .expect("join")
        .expect("in flight");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("server: v1"), "{head}");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(second.contains("server: v1"), "{second}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 0);

    // An unknown cluster in an inline route: NACK naming it; the last good listener serves.
    s.responses
        .send(Ok(delta(
            LDS,
            "l3",
            vec![(
                "http",
                "3",
                any::<Listener>(&inline_listener("http", port, "nope")),
            )],
            &[],
        )))
        .await
        .expect("send");
    let nack = next(&mut s.requests).await;
    let reason = nack.error_detail.expect("NACK").message;
    assert!(
        reason.contains("http") && reason.contains("nope"),
        "{reason}"
    );
    assert_eq!(
        tokio::task::spawn_blocking(move || server_header(port))
            .await
            .expect("get"),
        "v2"
    );

    // Removal: the port closes.
    s.responses
        .send(Ok(delta(LDS, "l4", vec![], &["http"])))
        .await
        .expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());
    assert_eq!(eventually(port, "/x", 0).await, 0);
    let stats = get(admin, "/stats?filter=listener_manager").await.1;
    for want in [
        "listener_manager.lds.update_success: 3",
        "listener_manager.lds.update_rejected: 1",
        "listener_manager.total_listeners_active: 0",
        "listener_manager.total_listeners_warming: 0",
        "listener_manager.workers_started: 1",
    ] {
        assert!(stats.contains(want), "{want}: {stats}");
    }
}

/// State of the world over a Unix socket (Istio's `./etc/istio/proxy/XDS` shape): listeners
/// absent from an answer are removed, route configurations absent from one are kept, and a
/// listener on a port that cannot be bound is NACKed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_over_sotw_unix_socket() {
    let dir = std::env::temp_dir().join(format!("petrel-lds-sotw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let sock = dir.join("XDS");
    let mut sessions = serve_unix(&sock).await;
    let echo = start_echo();
    let (admin, _petrel) = start_with_lds("petrel", Ads::Unix(&sock), "GRPC").await;
    let mut s = next(&mut sessions.sotw).await;
    let push = |type_url: &str, version: &str, resources| DiscoveryResponse {
        version_info: version.into(),
        nonce: format!("{type_url}-{version}"),
        type_url: type_url.into(),
        resources,
        ..Default::default()
    };
    assert_eq!(next(&mut s.requests).await.type_url, CDS);
    s.responses
        .send(Ok(push(
            CDS,
            "1",
            vec![any::<Cluster>(&cluster("dyn", echo))],
        )))
        .await
        .expect("send");
    let rs = requests_of(&mut s.requests, &[CDS, LDS], |r| r.type_url.as_str()).await;
    assert_eq!(rs[0].version_info, "1");
    let (a, b) = (free_port(), free_port());
    let both = vec![
        any::<Listener>(&rds_listener("a", a, "r", "a")),
        any::<Listener>(&inline_listener("b", b, "dyn")),
    ];
    s.responses
        .send(Ok(push(LDS, "1", both)))
        .await
        .expect("send");
    let rs = requests_of(&mut s.requests, &[LDS, RDS], |r| r.type_url.as_str()).await;
    assert_eq!(rs[0].version_info, "1");
    assert_eq!(rs[1].resource_names, ["r"]);
    s.responses
        .send(Ok(push(
            RDS,
            "1",
            vec![any::<RouteConfiguration>(&route("r", "dyn", false))],
        )))
        .await
        .expect("send");
    assert_eq!(next(&mut s.requests).await.version_info, "1");
    assert_eq!(eventually(a, "/x", 200).await, 200);
    assert_eq!(eventually(b, "/x", 200).await, 200);
    assert_eq!(get(admin, "/ready").await.0, 200);

    // An RDS answer without `r` does not remove it.
    s.responses
        .send(Ok(push(RDS, "2", vec![])))
        .await
        .expect("send");
    assert_eq!(next(&mut s.requests).await.version_info, "2");
    assert_eq!(get(a, "/x").await.0, 200);

    // A port someone else holds: NACK, nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let three = vec![
        any::<Listener>(&rds_listener("a", a, "r", "a")),
        any::<Listener>(&inline_listener("b", b, "dyn")),
        any::<Listener>(&inline_listener("c", taken_port, "dyn")),
    ];
    s.responses
        .send(Ok(push(LDS, "2", three)))
        .await
        .expect("send");
    let nack = next(&mut s.requests).await;
    assert_eq!(nack.version_info, "1");
    let reason = nack.error_detail.expect("NACK").message;
    assert!(reason.contains("cannot bind"), "{reason}");
    drop(taken);

    // Listener b absent from the next answer: removed.
    s.responses
        .send(Ok(push(
            LDS,
            "3",
            vec![any::<Listener>(&rds_listener("a", a, "r", "a"))],
        )))
        .await
        .expect("send");
    assert_eq!(next(&mut s.requests).await.version_info, "3");
    assert_eq!(eventually(b, "/x", 0).await, 0);
    assert_eq!(get(a, "/x").await.0, 200);
}
