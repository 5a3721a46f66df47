//! Istio's telemetry filters (`istio.metadata_exchange` peer metadata and `istio.stats`) as
//! istio/proxy's own end-to-end stats tests run them: a client sidecar and a server sidecar
//! (bootstraps, listeners, cluster and filters rendered from `../shared/istio/proxy-testdata`)
//! exchange peer metadata over HTTP, and each one's `/stats/prometheus` must hold exactly the
//! series of `../shared/istio/telemetry/metric` (labels in order, values).
//!
//! The fixtures' listeners and clusters come over ADS in Istio's driver; here they are put in
//! the bootstrap's static resources, which compiles them the same way.

use std::path::PathBuf;

use petrel_tests::gotmpl::{fixture, render, Params};
use petrel_tests::{free_port, http_raw, petrel_bin, start_with, Proxy, Ready};

/// The fixtures' YAML as JSON (Istio's `LoadTestJSON`).
fn yaml_json(yaml: &str) -> serde_json::Value {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    serde_json::to_value(v).expect("json")
}

struct Case {
    client_config: &'static str,
    server_config: &'static str,
    server_cluster_name: &'static str,
    elide_server_metadata: bool,
    /// `ServerNetworkFilters`, a proxy-testdata file.
    server_network_filters: Option<&'static str>,
    client_expect: Vec<(&'static str, &'static str)>,
    server_expect: Vec<(&'static str, &'static str)>,
}

/// The ports istio/proxy's fixtures name, each a free one.
fn fixture_ports() -> Params {
    let mut p = Params::default();
    for name in [
        "ClientPort",
        "ServerPort",
        "BackendPort",
        "ClientAdmin",
        "ServerAdmin",
        "XDSPort",
    ] {
        p = p.port(name, free_port());
    }
    p
}

fn params(case: &Case) -> Params {
    let p = fixture_ports();
    let stats_json =
        |path: &str| yaml_json(&fixture(&format!("proxy-testdata/{path}"))).to_string();
    p.var("RequestCount", "10")
        .var(
            "StatsConfig",
            fixture("proxy-testdata/bootstrap/stats.yaml.tmpl"),
        )
        .var("StatsFilterClientConfig", stats_json(case.client_config))
        .var("StatsFilterServerConfig", stats_json(case.server_config))
        .var("ServerClusterName", case.server_cluster_name)
        .var(
            "ElideServerMetadata",
            case.elide_server_metadata.to_string(),
        )
        .var(
            "ServerNetworkFilters",
            case.server_network_filters
                .map(|f| fixture(&format!("proxy-testdata/{f}")))
                .unwrap_or_default(),
        )
        .var(
            "ClientMetadata",
            fixture("proxy-testdata/client_node_metadata.json.tmpl"),
        )
        .var(
            "ServerMetadata",
            fixture("proxy-testdata/server_node_metadata.json.tmpl"),
        )
        .var(
            "ServerHTTPFilters",
            fixture("proxy-testdata/filters/mx_native_inbound.yaml.tmpl")
                + "\n"
                + &fixture("proxy-testdata/filters/stats_inbound.yaml.tmpl"),
        )
        .var(
            "ClientHTTPFilters",
            fixture("proxy-testdata/filters/mx_native_outbound.yaml.tmpl")
                + "\n"
                + &fixture("proxy-testdata/filters/stats_outbound.yaml.tmpl"),
        )
}

/// A fixture rendered, its `testdata/…` files found where the fixtures are.
fn rendered(path: &str, p: &Params) -> serde_json::Value {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio/proxy-testdata/");
    let text = render(&fixture(path), p).replace("\"testdata/", &format!("\"{}", root.display()));
    yaml_json(&text)
}

/// A bootstrap fixture with the listener and clusters Istio's driver would send over ADS.
fn bootstrap(p: &Params, file: &str, listener: &str, clusters: &[&str]) -> serde_json::Value {
    let mut b = rendered(&format!("proxy-testdata/bootstrap/{file}"), p);
    let obj = b.as_object_mut().expect("bootstrap object");
    obj.remove("dynamic_resources");
    let statics = obj
        .entry("static_resources")
        .or_insert_with(|| serde_json::json!({}));
    let listeners = statics
        .as_object_mut()
        .expect("static_resources")
        .entry("listeners")
        .or_insert_with(|| serde_json::json!([]));
    listeners
        .as_array_mut()
        .expect("listeners")
        .push(rendered(&format!("proxy-testdata/listener/{listener}"), p));
    let list = statics["clusters"].as_array_mut().expect("clusters");
    for c in clusters {
        let cluster = rendered(&format!("proxy-testdata/cluster/{c}"), p);
        // CDS cannot replace a static cluster: the bootstrap's twin stays.
        if !list.iter().any(|s| s["name"] == cluster["name"]) {
            list.push(cluster);
        }
    }
    b
}

fn start(name: &'static str, config: &serde_json::Value, admin: u16) -> Proxy {
    let dir = std::env::temp_dir().join(format!("petrel-istio-stats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let path: PathBuf = dir.join(format!("{name}-{admin}.json"));
    std::fs::write(&path, config.to_string()).expect("write bootstrap");
    start_with(name, &petrel_bin(), &path, admin, 0, Ready::Live, &[])
}

/// One Prometheus series: labels in the order written, and the value.
type Series = (Vec<(String, String)>, String);

/// The series of `family` in a Prometheus text exposition.
fn family(text: &str, family: &str) -> Vec<Series> {
    let label = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).unwrap();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = label
                .captures_iter(labels)
                .map(|c| (c[1].to_string(), c[2].to_string()))
                .collect();
            Some((labels, value.to_string()))
        })
        .collect()
}

/// An expected metric family (istio/proxy's `ExactStat`): every series, labels in order.
fn expected(p: &Params, metric: &str) -> (String, String, Vec<Series>) {
    let m = yaml_json(&render(&fixture(&format!("telemetry/metric/{metric}")), p));
    let series = m["metric"]
        .as_array()
        .expect("metric")
        .iter()
        .map(|s| {
            let labels = s["label"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .map(|l| {
                    let v = &l["value"];
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    (l["name"].as_str().expect("name").to_string(), v)
                })
                .collect();
            let value = s
                .get("counter")
                .or_else(|| s.get("gauge"))
                .map(|c| c["value"].to_string())
                .expect("a counter or gauge");
            (labels, value)
        })
        .collect();
    (
        m["name"].as_str().expect("name").to_string(),
        m["type"].as_str().expect("type").to_lowercase(),
        series,
    )
}

fn prometheus(admin: u16) -> String {
    let r = http_raw(
        admin,
        b"GET /stats/prometheus HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .expect("admin");
    assert_eq!(r.status, 200);
    r.body_str()
}

/// Streams are reported as they end, a moment after the client has its answer: like Istio's
/// driver, look again for a while before failing.
fn check(p: &Params, admin: u16, expect: &[(&str, &str)]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for (name, metric) in expect {
        let (fam, kind, want) = expected(p, metric);
        assert_eq!(&fam, name);
        loop {
            let text = prometheus(admin);
            let got = family(&text, &fam);
            if got == want || std::time::Instant::now() > deadline {
                assert!(
                    text.contains(&format!("# TYPE {fam} {kind}\n")),
                    "{fam} is not a {kind}:\n{text}"
                );
                assert_eq!(got, want, "{metric}:\n{text}");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

fn run(case: Case) -> (Params, Proxy, Proxy) {
    let p = params(&case);
    let port = |n: &str| p.ports[n];
    let server = bootstrap(&p, "server.yaml.tmpl", "server.yaml.tmpl", &[]);
    let client = bootstrap(
        &p,
        "client.yaml.tmpl",
        "client.yaml.tmpl",
        &["server.yaml.tmpl"],
    );
    let server_proxy = start("petrel", &server, port("ServerAdmin"));
    let client_proxy = start("petrel", &client, port("ClientAdmin"));
    let client_port = port("ClientPort");
    for _ in 0..10 {
        let req = format!(
            "POST / HTTP/1.1\r\nhost: 127.0.0.1:{client_port}\r\ncontent-length: 13\r\nconnection: close\r\n\r\nhello, world!"
        );
        let r = http_raw(client_port, req.as_bytes()).expect("request");
        assert_eq!(r.status, 200, "{}", r.body_str());
        assert_eq!(r.body_str(), "hello, world!");
        // The exchange headers never reach the application.
        assert!(r.header("x-envoy-peer-metadata").is_none());
        assert!(r.header("x-envoy-peer-metadata-id").is_none());
    }
    check(&p, port("ClientAdmin"), &case.client_expect);
    check(&p, port("ServerAdmin"), &case.server_expect);
    (p, server_proxy, client_proxy)
}

#[test]
fn default_stats_match_istio_e2e() {
    run(Case {
        client_config: "stats/client_config.yaml",
        server_config: "stats/server_config.yaml",
        server_cluster_name: "",
        elide_server_metadata: false,
        server_network_filters: None,
        client_expect: vec![("istio_requests_total", "client_request_total.yaml.tmpl")],
        server_expect: vec![
            ("istio_requests_total", "server_request_total.yaml.tmpl"),
            ("istio_build", "istio_build.yaml"),
        ],
    });
}

/// Istio's inbound HTTP chains have the TCP metadata exchange ahead of the connection manager:
/// plaintext has no ALPN to exchange under, so each connection counts as not found and the
/// headers' exchange makes the metrics.
#[test]
fn tcp_exchange_ahead_of_http_stays_out_of_the_way() {
    let (p, _server, _client) = run(Case {
        client_config: "stats/client_config.yaml",
        server_config: "stats/server_config.yaml",
        server_cluster_name: "",
        elide_server_metadata: false,
        server_network_filters: Some("filters/server_mx_network_filter.yaml.tmpl"),
        client_expect: vec![("istio_requests_total", "client_request_total.yaml.tmpl")],
        server_expect: vec![("istio_requests_total", "server_request_total.yaml.tmpl")],
    });
    // The client sidecar's one pooled HTTP/2 connection.
    let text = prometheus(p.ports["ServerAdmin"]);
    assert_eq!(
        family(&text, "envoy_metadata_exchange_alpn_protocol_not_found"),
        vec![(vec![], "1".to_string())]
    );
    assert_eq!(
        family(&text, "envoy_metadata_exchange_metadata_added"),
        vec![(vec![], "0".to_string())]
    );
}

#[test]
fn host_header_is_the_service_without_cluster_metadata() {
    run(Case {
        client_config: "stats/client_config.yaml",
        server_config: "stats/server_config.yaml",
        server_cluster_name: "host_header",
        elide_server_metadata: false,
        server_network_filters: None,
        client_expect: vec![("istio_requests_total", "host_header_fallback.yaml.tmpl")],
        server_expect: vec![],
    });
}

#[test]
fn host_header_fallback_can_be_disabled() {
    run(Case {
        client_config: "stats/client_config_disable_header_fallback.yaml",
        server_config: "stats/server_config_disable_header_fallback.yaml",
        server_cluster_name: "host_header",
        elide_server_metadata: true,
        server_network_filters: None,
        client_expect: vec![(
            "istio_requests_total",
            "client_disable_host_header_fallback.yaml.tmpl",
        )],
        server_expect: vec![(
            "istio_requests_total",
            "server_disable_host_header_fallback.yaml.tmpl",
        )],
    });
}

/// istio/proxy's `TCPServer{Prefix: "hello"}`: answers each line with `hello <line>`.
fn tcp_hello_server(addr: &str) {
    let l = std::net::TcpListener::bind(addr).expect("bind backend");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut w = s.try_clone().expect("clone");
                let mut r = std::io::BufReader::new(s);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let _ = w.write_all(format!("hello {line}").as_bytes());
                    line.clear();
                }
            });
        }
    });
}

/// istio/proxy's TCP scenario: the fixtures' TCP listeners and clusters with mTLS, the network
/// filters the variables name (`(var, proxy-testdata file)`), ten connections that each send
/// `world\n` and read `hello world\n`.
fn tcp_scenario(vars: &[(&str, &str)], files: &[(&str, &str)]) -> (Params, Proxy, Proxy) {
    let mut p = fixture_ports().var("DisableDirectResponse", "true");
    for (k, v) in vars {
        p = p.var(k, *v);
    }
    // Istio's test loads these with `params.LoadTestData`: rendered once with the variables.
    let common = [
        ("StatsConfig", "bootstrap/stats.yaml.tmpl"),
        ("ClientMetadata", "client_node_metadata.json.tmpl"),
        ("ServerMetadata", "server_node_metadata.json.tmpl"),
        (
            "ClientClusterTLSContext",
            "transport_socket/client.yaml.tmpl",
        ),
        (
            "ServerListenerTLSContext",
            "transport_socket/server.yaml.tmpl",
        ),
    ];
    for (var, paths) in common.iter().map(|(v, f)| (*v, vec![*f])).chain(
        files
            .iter()
            .map(|(v, f)| (*v, f.split('+').collect::<Vec<_>>())),
    ) {
        let v = paths
            .iter()
            .map(|f| render(&fixture(&format!("proxy-testdata/{f}")), &p))
            .collect::<Vec<_>>()
            .join("\n");
        p = p.var(var, v);
    }
    tcp_hello_server(&format!("127.0.0.3:{}", p.ports["BackendPort"]));
    let server = bootstrap(
        &p,
        "server.yaml.tmpl",
        "tcp_server.yaml.tmpl",
        &["tcp_server.yaml.tmpl"],
    );
    let client = bootstrap(
        &p,
        "client.yaml.tmpl",
        "tcp_client.yaml.tmpl",
        &["tcp_client.yaml.tmpl"],
    );
    let server = start("petrel", &server, p.ports["ServerAdmin"]);
    let client = start("petrel", &client, p.ports["ClientAdmin"]);
    for _ in 0..10 {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", p.ports["ClientPort"])).expect("connect");
        s.write_all(b"world\n").expect("write");
        let mut back = [0u8; 12];
        s.read_exact(&mut back).expect("read");
        assert_eq!(&back, b"hello world\n");
    }
    (p, server, client)
}

/// Istio's TCP telemetry without metadata exchange, over mTLS with the fixtures' certificates:
/// the server knows the client by its certificate only (istio/proxy's "without MX" metric);
/// the client knows the server by its certificate and the cluster's service.
#[test]
fn tcp_stats_over_mtls_without_metadata_exchange() {
    let (p, _server, _client) = tcp_scenario(
        &[],
        &[
            (
                "ServerNetworkFilters",
                "filters/server_stats_network_filter.yaml.tmpl",
            ),
            (
                "ClientNetworkFilters",
                "filters/client_stats_network_filter.yaml.tmpl",
            ),
        ],
    );
    // Without a peer, a connection is reported when it closes.
    check(
        &p,
        p.ports["ServerAdmin"],
        &[(
            "istio_tcp_connections_opened_total",
            "tcp_server_connection_open_without_mx.yaml.tmpl",
        )],
    );
    let server_text = prometheus(p.ports["ServerAdmin"]);
    let opened = family(&server_text, "istio_tcp_connections_opened_total");
    for (fam, value) in [
        ("istio_tcp_connections_closed_total", "10"),
        ("istio_tcp_received_bytes_total", "60"),
        ("istio_tcp_sent_bytes_total", "120"),
    ] {
        assert_eq!(
            family(&server_text, fam),
            vec![(opened[0].0.clone(), value.to_string())],
            "{fam}"
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let client_text = loop {
        let text = prometheus(p.ports["ClientAdmin"]);
        let closed = family(&text, "istio_tcp_connections_closed_total");
        if closed.first().is_some_and(|s| s.1 == "10") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let opened = family(&client_text, "istio_tcp_connections_opened_total");
    assert_eq!(opened.len(), 1, "{client_text}");
    let labels: std::collections::HashMap<_, _> = opened[0].0.iter().cloned().collect();
    for (k, v) in [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
        ("destination_workload", "unknown"),
        ("destination_workload_namespace", "default"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/server",
        ),
        ("destination_service", "server.default.svc.cluster.local"),
        ("destination_service_name", "server"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "unknown"),
    ] {
        assert_eq!(labels[k], v, "{k}");
    }
    assert_eq!(opened[0].1, "10");
}

/// istio/proxy's `TestTCPMetadataExchange`: both sides exchange metadata under the ALPN the
/// TLS contexts negotiate, and each side's metrics carry the other's workload.
#[test]
fn tcp_metadata_exchange_matches_istio_e2e() {
    let (p, _server, _client) = tcp_scenario(
        &[("AlpnProtocol", "mx-protocol")],
        &[
            (
                "ServerNetworkFilters",
                "filters/server_mx_network_filter.yaml.tmpl+filters/server_stats_network_filter.yaml.tmpl",
            ),
            (
                "ClientUpstreamFilters",
                "filters/client_mx_network_filter.yaml.tmpl",
            ),
            (
                "ClientNetworkFilters",
                "filters/client_stats_network_filter.yaml.tmpl",
            ),
        ],
    );
    check(
        &p,
        p.ports["ClientAdmin"],
        &[
            (
                "istio_tcp_connections_closed_total",
                "tcp_client_connection_close.yaml.tmpl",
            ),
            (
                "istio_tcp_connections_opened_total",
                "tcp_client_connection_open.yaml.tmpl",
            ),
            (
                "istio_tcp_received_bytes_total",
                "tcp_client_received_bytes.yaml.tmpl",
            ),
            (
                "istio_tcp_sent_bytes_total",
                "tcp_client_sent_bytes.yaml.tmpl",
            ),
        ],
    );
    check(
        &p,
        p.ports["ServerAdmin"],
        &[
            (
                "istio_tcp_connections_closed_total",
                "tcp_server_connection_close.yaml.tmpl",
            ),
            (
                "istio_tcp_connections_opened_total",
                "tcp_server_connection_open.yaml.tmpl",
            ),
            (
                "istio_tcp_received_bytes_total",
                "tcp_server_received_bytes.yaml.tmpl",
            ),
            (
                "istio_tcp_sent_bytes_total",
                "tcp_server_sent_bytes.yaml.tmpl",
            ),
            (
                "envoy_metadata_exchange_metadata_added",
                "tcp_server_mx_stats_metadata_added.yaml.tmpl",
            ),
            (
                "envoy_metadata_exchange_alpn_protocol_found",
                "tcp_server_mx_stats_alpn_found.yaml.tmpl",
            ),
        ],
    );
}
