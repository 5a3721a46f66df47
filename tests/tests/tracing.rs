//! Zipkin tracing against Envoy 1.40: the same requests through outbound, inbound, shared-context
//! and edge connection managers, with B3 contexts in both header forms (and broken ones), route
//! decorators, route sampling overrides, forced and client traces, and custom tags. Compared:
//! what each proxy sends upstream (B3 headers, decorator, the trace decision in
//! `x-request-id`), what it answers, every span posted to a test collector (ids related the same
//! way, names, kinds, tags; timings excepted), the collector request itself, and the stats.
//! Then Istio's hosted-APM bootstrap override (Zipkin over TLS to a path with a data key).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use petrel_tests::collector::{start_collector, Collector};
use petrel_tests::*;
use serde_json::Value;

const IN_TRACE: &str = "80f198ee56343ba864fe8b2a57d3eff7";
const IN_SPAN: &str = "e457b5a2e4d86bd1";
const IN_PARENT: &str = "05e3ac9a4f6e3b90";

fn router() -> &'static str {
    r#"{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
}

fn hcm(prefix: &str, tracing: &str, extra: &str, filters: &str, routes: &str) -> String {
    format!(
        r#"{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {prefix}, tracing: {tracing}{extra}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: {routes}}}]}}, http_filters: [{filters}{}]}}}}"#,
        router()
    )
}

fn listener(name: &str, port: &str, direction: &str, hcm: &str) -> String {
    format!(
        "  - name: {name}\n    traffic_direction: {direction}\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n    filter_chains: [{{filters: [{hcm}]}}]\n"
    )
}

fn bootstrap() -> String {
    let rbac = r#"{name: envoy.filters.http.rbac, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, shadow_rules: {action: ALLOW, policies: {all: {permissions: [{any: true}], principals: [{any: true}]}}}}}, "#;
    let out_routes = r#"[
      {match: {prefix: "/deco"}, decorator: {operation: "my-op"}, route: {cluster: echo}},
      {match: {prefix: "/untraced"}, tracing: {random_sampling: {numerator: 0}}, route: {cluster: echo}},
      {match: {prefix: "/tagged"}, tracing: {custom_tags: [{tag: route-tag, literal: {value: r}}, {tag: lit, literal: {value: from-route}}]}, route: {cluster: echo}},
      {match: {prefix: "/local"}, direct_response: {status: 503, body: {inline_string: "down"}}},
      {match: {prefix: "/rewrite"}, route: {cluster: echo, prefix_rewrite: "/x"}},
      {match: {prefix: "/"}, route: {cluster: echo}}]"#;
    let out_tracing = r#"{random_sampling: {value: 100}, max_path_tag_length: 20, custom_tags: [{tag: lit, literal: {value: v1}}, {tag: hdr, request_header: {name: x-foo, default_value: none}}, {tag: envt, environment: {name: PETREL_TEST_UNSET_VAR, default_value: dflt}}, {tag: md, metadata: {kind: {request: {}}, metadata_key: {key: envoy.filters.http.rbac, path: [{key: shadow_engine_result}]}}}]}"#;
    let in_routes = r#"[
      {match: {prefix: "/deco"}, decorator: {operation: "in-op"}, route: {cluster: echo}},
      {match: {prefix: "/quiet"}, decorator: {operation: "quiet-op", propagate: false}, route: {cluster: echo}},
      {match: {prefix: "/"}, route: {cluster: echo}}]"#;
    let plain = r#"[{match: {prefix: "/"}, route: {cluster: echo}}]"#;
    let shared_provider = r#"{provider: {name: envoy.tracers.zipkin, typed_config: {"@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: zipkin, collector_endpoint: /other/spans, collector_endpoint_version: HTTP_JSON, collector_hostname: collector.example}}}"#;
    let edge_extra = r#", use_remote_address: true, internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.0, prefix_len: 8}]}"#;
    let mut out = String::from(
        r#"admin: {address: {socket_address: {address: 127.0.0.1, port_value: ADMIN}}}
node: {id: node-1, cluster: svc-cluster}
tracing:
  http:
    name: envoy.tracers.zipkin
    typed_config:
      "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
      collector_cluster: zipkin
      collector_endpoint: /api/v2/spans
      collector_endpoint_version: HTTP_JSON
      trace_id_128bit: true
      shared_span_context: false
static_resources:
  listeners:
"#,
    );
    out += &listener(
        "out",
        "PORT_OUT",
        "OUTBOUND",
        &hcm("out", out_tracing, "", rbac, out_routes),
    );
    out += &listener(
        "in",
        "PORT_IN",
        "INBOUND",
        &hcm("in", "{}", "", "", in_routes),
    );
    out += &listener(
        "shared",
        "PORT_SHARED",
        "INBOUND",
        &hcm("shared", shared_provider, "", "", plain),
    );
    out += &listener(
        "edge",
        "PORT_EDGE",
        "OUTBOUND",
        &hcm(
            "edge",
            "{random_sampling: {value: 0}}",
            edge_extra,
            "",
            plain,
        ),
    );
    let cluster = |name: &str, port: &str| {
        format!("  - name: {name}\n    connect_timeout: 1s\n    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]}}\n")
    };
    out += "  clusters:\n";
    out += &cluster("echo", "ECHO");
    out += &cluster("zipkin", "COLLECTOR");
    out
}

/// One request: listener, path (ending in its number), extra headers.
struct Case {
    listener: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
}

fn cases() -> Vec<Case> {
    let b3_multi = |sampled: Option<&str>| {
        let mut h = vec![
            ("x-b3-traceid", "0000000000000001".to_string()),
            ("x-b3-spanid", "0000000000000002".to_string()),
        ];
        if let Some(s) = sampled {
            h.push(("x-b3-sampled", s.to_string()));
        }
        h
    };
    let single = format!("{IN_TRACE}-{IN_SPAN}-1-{IN_PARENT}");
    type Headers = Vec<(&'static str, String)>;
    let list: Vec<(&'static str, &str, Headers)> = vec![
        (
            "OUT",
            "/deco/a",
            vec![
                ("x-foo", "bar".into()),
                (
                    "x-request-id",
                    "11111111-2222-4333-8444-555555555555".into(),
                ),
            ],
        ),
        ("OUT", "/plain", vec![]),
        ("OUT", "/plain", vec![("b3", single.clone())]),
        ("OUT", "/plain", vec![("b3", "0".into())]),
        ("OUT", "/plain", b3_multi(Some("0"))),
        (
            "OUT",
            "/plain",
            vec![("x-b3-traceid", "zz".into()), ("x-b3-spanid", "2".into())],
        ),
        ("OUT", "/untraced", vec![]),
        ("OUT", "/local", vec![]),
        ("OUT", "/rewrite/a-rather-long-path-for-the-tag", vec![]),
        ("OUT", "/tagged", vec![("user-agent", "tester/1".into())]),
        (
            "OUT",
            "/plain",
            vec![("b3", format!("{}-{IN_SPAN}", &IN_TRACE[16..]))],
        ),
        (
            "IN",
            "/deco/y",
            [
                b3_multi(Some("1")),
                vec![("x-envoy-decorator-operation", "fromhdr".into())],
            ]
            .concat(),
        ),
        ("IN", "/deco/y", b3_multi(None)),
        ("IN", "/quiet", vec![]),
        ("IN", "/plain", vec![("b3", single.clone())]),
        (
            "IN",
            "/grpc",
            vec![
                ("content-type", "application/grpc".into()),
                ("grpc-timeout", "5S".into()),
            ],
        ),
        (
            "SHARED",
            "/s",
            [
                b3_multi(Some("1")),
                vec![("x-b3-parentspanid", IN_PARENT.into())],
            ]
            .concat(),
        ),
        ("SHARED", "/s", vec![]),
        ("EDGE", "/e", vec![]),
        ("EDGE", "/e", vec![("x-envoy-force-trace", "1".into())]),
        ("EDGE", "/e", vec![("x-client-trace-id", "client-1".into())]),
    ];
    list.into_iter()
        .enumerate()
        .map(|(i, (listener, path, headers))| Case {
            listener,
            path: format!("{path}?n={i}"),
            headers,
        })
        .collect()
}

/// Gives ids symbolic names: the request's own stay as they came, new ones are numbered in the
/// order they appear, so two proxies' ids compare by how they relate.
#[derive(Default)]
struct Ids(BTreeMap<String, String>);

impl Ids {
    fn name(&mut self, id: &str) -> String {
        for (known, n) in [
            (IN_TRACE, "IN_TRACE"),
            (&IN_TRACE[16..], "IN_TRACE_LOW"),
            (IN_SPAN, "IN_SPAN"),
            (IN_PARENT, "IN_PARENT"),
            ("0000000000000001", "IN_1"),
            ("0000000000000002", "IN_2"),
        ] {
            if id == known {
                return n.into();
            }
        }
        // A 128-bit trace id whose low half is a span id names that relation.
        if id.len() == 32 {
            let low = self.name(&id[16..]);
            let high = self.name(&id[..16]);
            return format!("{high}+{low}");
        }
        let next = format!("N{}", self.0.len());
        self.0.entry(id.to_string()).or_insert(next).clone()
    }

    /// A B3 single header or id-valued header, symbolized.
    fn header(&mut self, name: &str, v: &str) -> String {
        match name {
            "b3" => v
                .split('-')
                .map(|p| {
                    if p.len() >= 16 {
                        self.name(p)
                    } else {
                        p.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("-"),
            "x-b3-traceid" | "x-b3-spanid" | "x-b3-parentspanid" if v.len() >= 16 => self.name(v),
            // The trace decision lives in the version nibble of a UUID.
            "x-request-id" if v.len() == 36 => format!("uuid/{}", &v[14..15]),
            _ => v.to_string(),
        }
    }
}

/// The cases that make a sampled span.
const REPORTED: usize = 16;

const PROPAGATED: &[&str] = &[
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-envoy-decorator-operation",
    "x-request-id",
];

struct Seen {
    /// Per request: what went upstream and came back, symbolized.
    exchanges: Vec<String>,
    /// Per request number: its span, normalized.
    spans: BTreeMap<usize, Value>,
    reports: Vec<String>,
    stats: Vec<String>,
}

fn normalize_span(span: &Value, ids: &mut Ids) -> Value {
    let mut s = span.clone();
    let o = s.as_object_mut().expect("span object");
    assert!(
        o.remove("timestamp").is_some_and(|t| t.is_u64()),
        "timestamp: {span}"
    );
    assert!(
        o.remove("duration").is_some_and(|t| t.is_u64()),
        "duration: {span}"
    );
    for k in ["traceId", "id", "parentId"] {
        if let Some(Value::String(v)) = o.get(k).cloned() {
            o.insert(k.into(), Value::String(ids.name(&v)));
        }
    }
    if let Some(Value::Array(a)) = o.get_mut("annotations") {
        for ann in a {
            let ao = ann.as_object_mut().expect("annotation");
            assert!(ao.remove("timestamp").is_some_and(|t| t.is_u64()));
        }
    }
    if let Some(Value::Object(tags)) = o.get_mut("tags") {
        if let Some(Value::String(id)) = tags.get("guid:x-request-id").cloned() {
            tags.insert(
                "guid:x-request-id".into(),
                Value::String(ids.header("x-request-id", &id)),
            );
        }
    }
    s
}

fn scenario(name: &'static str, bin: &Path, echo: u16) -> Seen {
    let collector: Collector = start_collector(None);
    let ports: Vec<(&str, u16)> = ["ADMIN", "PORT_OUT", "PORT_IN", "PORT_SHARED", "PORT_EDGE"]
        .into_iter()
        .map(|k| (k, free_port()))
        .chain([("ECHO", echo), ("COLLECTOR", collector.port)])
        .collect();
    let port = |k: &str| ports.iter().find(|(n, _)| *n == k).map_or(0, |(_, p)| *p);
    let proxy = start_templated(name, bin, &bootstrap(), &ports, &[]);
    let mut exchanges = Vec::new();
    let mut ids_by_case = Vec::new();
    for c in cases() {
        let mut ids = Ids::default();
        let extra: String = c
            .headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let r = http_raw(
            port(&format!("PORT_{}", c.listener)),
            format!(
                "GET {} HTTP/1.1\r\nhost: svc.example:80\r\n{extra}connection: close\r\n\r\n",
                c.path
            )
            .as_bytes(),
        )
        .expect("request");
        let mut line = format!("{} {} -> {}", c.listener, c.path, r.status);
        for h in PROPAGATED {
            if let Some(v) = r.header(h) {
                line += &format!("\n  response {h}: {}", ids.header(h, v));
            }
        }
        if r.header("x-upstream") == Some("yes") {
            let echoed: Value = serde_json::from_slice(&r.body).expect("echo json");
            line += &format!("\n  upstream path {}", echoed["path"]);
            for pair in echoed["headers"].as_array().into_iter().flatten() {
                let (k, v) = (
                    pair[0].as_str().unwrap_or(""),
                    pair[1].as_str().unwrap_or(""),
                );
                if PROPAGATED.contains(&k) {
                    line += &format!("\n  upstream {k}: {}", ids.header(k, v));
                }
            }
        }
        exchanges.push(line);
        ids_by_case.push(ids);
    }
    // Spans leave in fives, the rest on the 5 s flush timer.
    collector.wait_spans(REPORTED, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(300));
    let spans = collector.spans();
    let mut by_case = BTreeMap::new();
    for s in &spans {
        let url = s["tags"]["http.url"].as_str().unwrap_or("");
        let n: usize = url
            .rsplit("n=")
            .next()
            .and_then(|n| n.parse().ok())
            // A path cut by max_path_tag_length: keyed apart.
            .unwrap_or(usize::MAX);
        let key = if n == usize::MAX {
            1000 + by_case.len()
        } else {
            n
        };
        let mut spare = Ids::default();
        let ids = if n < ids_by_case.len() {
            &mut ids_by_case[n]
        } else {
            &mut spare
        };
        by_case.insert(key, normalize_span(s, ids));
    }
    let reports = collector
        .reports()
        .iter()
        .map(|r| {
            let mut h: Vec<String> = [
                "host",
                "content-type",
                "x-envoy-internal",
                "x-forwarded-for",
                "x-envoy-expected-rq-timeout-ms",
            ]
            .iter()
            .map(|k| format!("{k}={}", r.header(k).unwrap_or("-")))
            .collect();
            h.sort();
            format!("{} {}", r.path, h.join(" "))
        })
        .collect();
    let stats = stat_lines(
        proxy.admin,
        &[
            "tracing.zipkin.spans_sent",
            "tracing.zipkin.reports_sent",
            "tracing.zipkin.reports_dropped",
            "tracing.zipkin.reports_failed",
            "tracing.zipkin.reports_skipped_no_cluster",
            "http.out.tracing.random_sampling",
            "http.out.tracing.not_traceable",
            "http.in.tracing.random_sampling",
            "http.edge.tracing.not_traceable",
            "http.edge.tracing.service_forced",
            "http.edge.tracing.client_enabled",
        ],
    );
    Seen {
        exchanges,
        spans: by_case,
        reports,
        stats,
    }
}

#[test]
fn zipkin_spans_and_b3_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        eprintln!("skipping: no envoy binary");
        return;
    };
    let echo = start_echo();
    let e = scenario("envoy", &envoy, echo);
    let p = scenario("petrel", &petrel_bin(), echo);
    assert_same_transcript(&e.exchanges, &p.exchanges);
    let keys = |s: &Seen| s.spans.keys().copied().collect::<Vec<_>>();
    assert_eq!(keys(&e), keys(&p), "which requests were reported");
    let mut diffs = Vec::new();
    for (n, es) in &e.spans {
        if p.spans.get(n) != Some(es) {
            diffs.push(format!(
                "request {n}:\nenvoy:  {es}\npetrel: {}",
                p.spans.get(n).map_or("(none)".into(), Value::to_string)
            ));
        }
    }
    assert!(diffs.is_empty(), "spans differ:\n{}", diffs.join("\n"));
    let mut er = e.reports.clone();
    let mut pr = p.reports.clone();
    er.sort();
    er.dedup();
    pr.sort();
    pr.dedup();
    assert_eq!(er, pr, "collector requests");
    assert_same_transcript(&e.stats, &p.stats);
}

/// A bootstrap with the `tracing` and collector cluster of one of `../shared/istio`'s files
/// (the collector pointed at `collector`), an inbound listener tracing to it and an echo
/// cluster. `pin` replaces the collector's host name with 127.0.0.1 (a name that only resolves
/// in the vendor's world); otherwise the name resolves as given (`localhost`).
fn collector_bootstrap(file: &str, collector: u16, pin: bool) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/istio")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("bootstrap file");
    let b: Value = serde_json::from_str(&text).expect("json");
    let wanted = b["tracing"]["http"]["typed_config"]["collector_cluster"]
        .as_str()
        .expect("collector_cluster")
        .to_string();
    let mut cluster = b["static_resources"]["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .find(|c| c["name"] == wanted.as_str())
        .expect("the collector cluster")
        .clone();
    let sa = &mut cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ["address"]["socket_address"];
    sa["port_value"] = collector.into();
    if pin {
        sa["address"] = "127.0.0.1".into();
        cluster["type"] = "STATIC".into();
    }
    let echo = r#"{"name":"echo","connect_timeout":"1s","load_assignment":{"cluster_name":"echo","endpoints":[{"lb_endpoints":[{"endpoint":{"address":{"socket_address":{"address":"127.0.0.1","port_value":ECHO}}}}]}]}}"#;
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}
node: {{id: sidecar~10.0.0.1~app.ns~ns.svc.cluster.local, cluster: app.ns}}
tracing: {}
static_resources:
  listeners:
{}  clusters: [{cluster}, {echo}]
"#,
        b["tracing"],
        listener(
            "in",
            "PORT_IN",
            "INBOUND",
            &hcm(
                "in",
                "{}",
                "",
                "",
                r#"[{match: {prefix: "/"}, route: {cluster: echo}}]"#
            )
        ),
    )
}

fn collector_scenario(
    name: &'static str,
    bin: &Path,
    echo: u16,
    pem: Option<&tls::Pem>,
    file: &str,
) -> Vec<String> {
    let collector = start_collector(pem);
    let ports: Vec<(&str, u16)> = ["ADMIN", "PORT_IN"]
        .into_iter()
        .map(|k| (k, free_port()))
        .chain([("ECHO", echo)])
        .collect();
    let _proxy = start_templated(
        name,
        bin,
        &collector_bootstrap(file, collector.port, pem.is_some()),
        &ports,
        &[],
    );
    for i in 0..5 {
        let r = http_raw(
            ports[1].1,
            format!("GET /apm?n={i} HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .expect("request");
        assert_eq!(r.status, 200);
    }
    let spans = collector.wait_spans(5, Duration::from_secs(10));
    let mut out: Vec<String> = collector
        .reports()
        .iter()
        .map(|r| format!("{} host={:?}", r.path, r.header("host")))
        .collect();
    out.extend(spans.iter().map(|s| {
        format!(
            "{} {} {} {}",
            s["kind"], s["name"], s["localEndpoint"]["serviceName"], s["tags"]["node_id"]
        )
    }));
    out
}

#[test]
fn apm_bootstrap_override_reports_over_tls_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        eprintln!("skipping: no envoy binary");
        return;
    };
    let dir = std::env::temp_dir().join(format!("petrel-apm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = tls::Ca::new(&dir, "apm-ca");
    let pem = ca.leaf(&dir, "apm", &["apm-collector.example.test"], false);
    let echo = start_echo();
    let file = "bootstrap-override/apm-zipkin.json";
    let e = collector_scenario("envoy", &envoy, echo, Some(&pem), file);
    let p = collector_scenario("petrel", &petrel_bin(), echo, Some(&pem), file);
    assert!(
        e.iter().any(|l| l.contains("dataKey=EXAMPLEDATAKEY0")),
        "envoy reported: {e:?}"
    );
    assert_same_transcript(&e, &p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// pilot-agent's Zipkin bootstrap (`tracing_zipkin.json`): its `zipkin` cluster is
/// `STRICT_DNS` on `localhost` with `respect_dns_ttl`.
#[test]
fn istio_zipkin_bootstrap_reports_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        eprintln!("skipping: no envoy binary");
        return;
    };
    let echo = start_echo();
    let file = "bootstrap/tracing_zipkin.json";
    let e = collector_scenario("envoy", &envoy, echo, None, file);
    let p = collector_scenario("petrel", &petrel_bin(), echo, None, file);
    assert!(
        e.iter()
            .any(|l| l.starts_with("/api/v2/spans host=Some(\"zipkin\")")),
        "envoy reported: {e:?}"
    );
    assert_same_transcript(&e, &p);
}
