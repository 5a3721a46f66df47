//! The statsd stats sink against Envoy 1.40: the same requests through the same bootstrap, and
//! what arrives at a UDP receiver, added up per metric (counters' deltas summed, gauges' last
//! value, histograms' sample count): each metric Envoy sends, Petrel sends the same way.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::Path;
use std::time::{Duration, Instant};

use petrel_tests::*;

/// `name:value|type` lines until `quiet` passes without one.
fn receive(rx: &UdpSocket, until: Instant) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < until {
        if let Ok(n) = rx.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

/// Per metric: `c` summed deltas, `g` last value, `ms` number of samples.
fn aggregate(lines: &[String]) -> BTreeMap<String, (String, u64)> {
    let mut m: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for l in lines {
        let Some((name, rest)) = l.split_once(':') else {
            continue;
        };
        let Some((value, kind)) = rest.split_once('|') else {
            continue;
        };
        let v: u64 = value.parse().unwrap_or(0);
        let e = m
            .entry(name.to_string())
            .or_insert_with(|| (kind.to_string(), 0));
        match kind {
            "c" => e.1 += v,
            "g" => e.1 = v,
            _ => e.1 += 1,
        }
    }
    m
}

const WATCHED: &[&str] = &[
    "envoy.http.ingress.downstream_rq_total",
    "envoy.http.ingress.downstream_rq_2xx",
    "envoy.http.ingress.downstream_rq_4xx",
    "envoy.http.ingress.downstream_rq_completed",
    "envoy.http.ingress.downstream_rq_time",
    "envoy.http.ingress.downstream_cx_total",
    "envoy.http.ingress.downstream_rq_active",
    "envoy.http.ingress.rq_direct_response",
    "envoy.http.ingress.no_route",
    "envoy.cluster.echo.upstream_rq_total",
    "envoy.cluster.echo.upstream_rq_200",
    "envoy.cluster.echo.upstream_rq_time",
    "envoy.cluster.echo.upstream_cx_total",
    "envoy.cluster.echo.upstream_cx_active",
    "envoy.cluster.echo.membership_total",
    "envoy.listener_manager.total_listeners_active",
    "envoy.server.live",
];

fn transcript(name: &'static str, bin: &Path, echo: u16) -> Vec<String> {
    let rx = UdpSocket::bind("127.0.0.1:0").expect("udp");
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let top = format!(
        "stats_flush_interval: 0.2s\nstats_sinks:\n- name: envoy.stat_sinks.statsd\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.config.metrics.v3.StatsdSink\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}",
        rx.local_addr().expect("addr").port()
    );
    let vhosts = r#"- name: v
  domains: ["*"]
  routes:
  - {match: {prefix: "/direct"}, direct_response: {status: 200}}
  - {match: {prefix: "/echo"}, route: {cluster: echo}}"#;
    let clusters = r#"- name: echo
  load_assignment:
    cluster_name: echo
    endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ECHO}}}}]}]"#;
    let (admin, main) = (free_port(), free_port());
    let _proxy = start_templated(
        name,
        bin,
        &http_bootstrap(&top, vhosts, "", clusters),
        &[("ADMIN", admin), ("MAIN", main), ("ECHO", echo)],
        &[],
    );
    for path in ["/direct", "/echo/a", "/echo/b", "/nowhere", "/direct"] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
        http_raw(main, req.as_bytes()).expect("request");
    }
    let lines = receive(&rx, Instant::now() + Duration::from_millis(1500));
    let m = aggregate(&lines);
    WATCHED
        .iter()
        .map(|w| match m.get(*w) {
            Some((kind, v)) => format!("{w} |{kind} {v}"),
            None => format!("{w} (not sent)"),
        })
        .collect()
}

#[test]
fn statsd_sink_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        eprintln!("envoy not installed; skipping");
        return;
    };
    let echo = start_echo();
    let e = transcript("envoy", &envoy, echo);
    let p = transcript("petrel", &petrel_bin(), echo);
    assert!(
        e.iter()
            .any(|l| l == "envoy.http.ingress.downstream_rq_total |c 5"),
        "{e:#?}"
    );
    assert_same_transcript(&e, &p);
}
