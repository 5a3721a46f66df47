//! Sidecar interception end to end: two pods (network namespaces) with Istio's iptables rules and
//! Petrel as each pod's sidecar (uid 1337) on Istio's listener shapes — `virtualOutbound` (15001,
//! `use_original_dst`) handing HTTP to a `bind_to_port: false` listener for the original
//! destination and other TCP to `PassthroughCluster`, `virtualInbound` (15006, `original_dst`,
//! `tls_inspector`, `http_inspector`) sending inbound traffic to the app through ORIGINAL_DST
//! clusters bound to 127.0.0.6. Requests keep their original destination and both sidecars'
//! listeners and stats show the path. Needs root; the namespaces are removed afterwards.

use std::time::{Duration, Instant};

use petrel_tests::netns::{missing_prerequisite, Pod};
use petrel_tests::petrel_bin;

/// The sidecar bootstrap: Istio's listener and cluster shapes for an app on port 8080 (HTTP)
/// reached at `server_ip`, with the pod's name in the headers each hop adds.
fn sidecar(pod: &str, server_ip: &str) -> String {
    let router = r#"[{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]"#;
    let inspectors = r#"
    - name: envoy.filters.listener.tls_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}
    - name: envoy.filters.listener.http_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}"#;
    format!(
        r#"
node: {{id: "sidecar~{server_ip}~{pod}.default~default.svc.cluster.local", cluster: {pod}.default}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}
    use_original_dst: true
    traffic_direction: OUTBOUND
    filter_chains:
    - name: virtualOutbound-blackhole
      filter_chain_match: {{destination_port: 15001}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: BlackHoleCluster, cluster: BlackHoleCluster}}
    - name: virtualOutbound-catchall-tcp
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: PassthroughCluster, cluster: PassthroughCluster}}
  - name: 0.0.0.0_8080
    address: {{socket_address: {{address: 0.0.0.0, port_value: 8080}}}}
    bind_to_port: false
    traffic_direction: OUTBOUND
    listener_filters_timeout: 0s
    continue_on_listener_filters_timeout: true
    listener_filters:{inspectors}
    filter_chains:
    - filter_chain_match: {{transport_protocol: raw_buffer, application_protocols: [http/1.1, h2c]}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_0.0.0.0_8080
          route_config:
            name: "8080"
            virtual_hosts:
            - name: server.default.svc.cluster.local:8080
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: "outbound|8080||server.default.svc.cluster.local", timeout: 0s}}
                request_headers_to_add: [{{header: {{key: x-outbound, value: {pod}}}}}]
                response_headers_to_add: [{{header: {{key: x-outbound-proxy, value: {pod}}}}}]
          http_filters: {router}
    default_filter_chain:
      name: PassthroughFilterChain
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: PassthroughCluster, cluster: PassthroughCluster}}
  - name: virtualInbound
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}
    traffic_direction: INBOUND
    listener_filters_timeout: 0s
    continue_on_listener_filters_timeout: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
      filter_disabled: {{destination_port_range: {{start: 15006, end: 15007}}}}
    - name: envoy.filters.listener.http_inspector
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}}
      filter_disabled: {{or_match: {{rules: [{{destination_port_range: {{start: 80, end: 81}}}}, {{destination_port_range: {{start: 15006, end: 15007}}}}]}}}}
    filter_chains:
    - name: virtualInbound-blackhole
      filter_chain_match: {{destination_port: 15006}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: BlackHoleCluster, cluster: BlackHoleCluster}}
    - name: virtualInbound
      filter_chain_match: {{prefix_ranges: [{{address_prefix: 0.0.0.0, prefix_len: 0}}], transport_protocol: raw_buffer}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: InboundPassthroughClusterIpv4, cluster: InboundPassthroughClusterIpv4}}
    - name: 0.0.0.0_8080
      filter_chain_match: {{destination_port: 8080, transport_protocol: raw_buffer}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound_0.0.0.0_8080
          route_config:
            name: "inbound|8080||"
            virtual_hosts:
            - name: inbound|http|8080
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: "inbound|8080||", timeout: 0s}}
                request_headers_to_add: [{{header: {{key: x-inbound, value: {pod}}}}}]
                response_headers_to_add: [{{header: {{key: x-inbound-proxy, value: {pod}}}}}]
          http_filters: {router}
  clusters:
  - name: BlackHoleCluster
    type: STATIC
    connect_timeout: 10s
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
  - name: InboundPassthroughClusterIpv4
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
    upstream_bind_config: {{source_address: {{address: 127.0.0.6, port_value: 0}}}}
  - name: "inbound|8080||"
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 10s
    upstream_bind_config: {{source_address: {{address: 127.0.0.6, port_value: 0}}}}
  - name: "outbound|8080||server.default.svc.cluster.local"
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: "outbound|8080||server.default.svc.cluster.local"
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {server_ip}, port_value: 8080}}}}}}}}]}}]
"#
    )
}

/// The app: HTTP on 8080 answering with the peer address and request headers as JSON, and a
/// line echo on 9000.
const APP: &str = r#"
import json, socketserver, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"peer": self.client_address[0], "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class E(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"echo " + line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
threading.Thread(target=socketserver.ThreadingTCPServer(("0.0.0.0", 9000), E).serve_forever, daemon=True).start()
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"#;

const TCP_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 9000), timeout=10)
s.sendall(b"ping\n")
print(s.makefile().readline().strip())
"#;

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn admin(pod: &Pod, path: &str) -> String {
    pod.try_run(&["curl", "-s", &format!("http://127.0.0.1:15000{path}")])
        .unwrap_or_default()
}

fn stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn sidecars_intercept_outbound_and_inbound() {
    if let Some(why) = missing_prerequisite() {
        panic!("{why}");
    }
    let tag = format!("pm{}", std::process::id() % 10000);
    let (mut client, mut server) = Pod::pair(&tag, 213);
    // Petrel runs as Istio's proxy user, from a copy uid 1337 can read.
    let dir = std::env::temp_dir().join(format!("petrel-mesh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bin = dir.join("petrel");
    std::fs::copy(petrel_bin(), &bin).expect("copy petrel");
    let app = dir.join("app.py");
    std::fs::write(&app, APP).expect("app");
    let tcp_client = dir.join("tcp_client.py");
    std::fs::write(&tcp_client, TCP_CLIENT).expect("client");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let server_ip = server.ip.clone();
    for pod in [&mut client, &mut server] {
        pod.istio_iptables();
        let cfg = dir.join(format!("{}.yaml", pod.name));
        std::fs::write(&cfg, sidecar(&pod.name, &server_ip)).expect("config");
        let cfg = cfg.to_string_lossy().into_owned();
        let bin = bin.to_string_lossy().into_owned();
        pod.spawn(
            Some(1337),
            &[&bin, "-c", &cfg, "--concurrency", "1", "-l", "error"],
        );
    }
    server.spawn(None, &["python3", &app.to_string_lossy()]);
    for pod in [&client, &server] {
        wait_until("the sidecar", || admin(pod, "/ready").starts_with("LIVE"));
    }
    wait_until("the app", || {
        server
            .try_run(&[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:8080/",
            ])
            .is_ok_and(|code| code == "200")
    });

    // HTTP from the client app to the server's address: outbound through 15001 and the 8080
    // listener, inbound through 15006 to the app from 127.0.0.6.
    let out = client.run(&[
        "curl",
        "-s",
        "-i",
        &format!("http://{server_ip}:8080/hello"),
    ]);
    let (head, body) = out.split_once("\r\n\r\n").expect("response");
    assert!(head.starts_with("HTTP/1.1 200"), "{out}");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains(&format!("x-outbound-proxy: {}", client.name)),
        "{out}"
    );
    assert!(
        head.contains(&format!("x-inbound-proxy: {}", server.name)),
        "{out}"
    );
    let seen: serde_json::Value = serde_json::from_str(body).expect("app json");
    assert_eq!(seen["path"], "/hello", "{seen}");
    assert_eq!(seen["peer"], "127.0.0.6", "{seen}");
    assert_eq!(
        seen["headers"]["x-outbound"],
        client.name.as_str(),
        "{seen}"
    );
    assert_eq!(seen["headers"]["x-inbound"], server.name.as_str(), "{seen}");
    assert_eq!(
        seen["headers"]["host"],
        format!("{server_ip}:8080"),
        "{seen}"
    );

    // Plain TCP to a port no listener knows: passthrough both ways, original destination kept.
    let echoed = client.run(&["python3", &tcp_client.to_string_lossy(), &server_ip]);
    assert_eq!(echoed.trim(), "echo ping");

    let c = admin(&client, "/stats");
    // The HTTP connection was handed off to the 8080 listener; the TCP one stayed on 15001.
    assert_eq!(
        stat(&c, "listener.0.0.0.0_15001.downstream_cx_total"),
        1,
        "{c}"
    );
    assert_eq!(
        stat(&c, "listener.0.0.0.0_8080.downstream_cx_total"),
        1,
        "{c}"
    );
    assert_eq!(
        stat(&c, "http.outbound_0.0.0.0_8080.downstream_rq_total"),
        1,
        "{c}"
    );
    assert_eq!(
        stat(&c, "tcp.PassthroughCluster.downstream_cx_total"),
        1,
        "{c}"
    );
    assert_eq!(
        stat(
            &c,
            "cluster.outbound|8080||server.default.svc.cluster.local.upstream_rq_200"
        ),
        1,
        "{c}"
    );
    let s = admin(&server, "/stats");
    assert_eq!(
        stat(&s, "listener.0.0.0.0_15006.downstream_cx_total"),
        2,
        "{s}"
    );
    assert_eq!(
        stat(&s, "http.inbound_0.0.0.0_8080.downstream_rq_total"),
        1,
        "{s}"
    );
    assert_eq!(
        stat(&s, "tcp.InboundPassthroughClusterIpv4.downstream_cx_total"),
        1,
        "{s}"
    );
    assert_eq!(stat(&s, "cluster.inbound|8080||.upstream_rq_200"), 1, "{s}");
    assert_eq!(stat(&s, "http_inspector.http11_found"), 1, "{s}");
    assert_eq!(stat(&s, "http_inspector.http_not_found"), 1, "{s}");
    assert_eq!(stat(&s, "tls_inspector.tls_not_found"), 2, "{s}");
    drop((client, server));
    let _ = std::fs::remove_dir_all(&dir);
}
