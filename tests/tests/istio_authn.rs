//! Istio's `istio_authn` network filter, in the shape the sidecar dump
//! (`configdump/sidecar-productpage-rbac.yaml`) has it: ahead of the inbound chains, it makes
//! the client's SPIFFE ID filter state `io.istio.peer_principal` (and the sidecar's own
//! `io.istio.local_principal`), which Istio's RBAC principals match. PyPI's Envoy lacks this
//! istio/proxy extension, so the expectations here come from its documented behaviour
//! (`istio/proxy` `istio_authn/config.proto`): the first `spiffe://` URI SAN, only when the peer
//! presented a certificate; with `shared` (Istio's tunnel listeners) the principals go with
//! upstream connections, and being hashable they pool them per client identity.

use std::path::Path;

use petrel_tests::tls::{https_get, Ca, Pem};
use petrel_tests::*;

const AUTHN: &str = r#"{name: istio_authn, typed_config: {"@type": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: type.googleapis.com/io.istio.network.authn.Config}}"#;

/// As Istio's `connect_terminate` listener has it.
const AUTHN_SHARED: &str = r#"{name: istio_authn, typed_config: {"@type": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: type.googleapis.com/io.istio.network.authn.Config, value: {shared: true}}}"#;

/// The principals of the dump's policy: `sleep` in `default`, or anyone in namespace `test`.
const PRINCIPALS: &str = r#"[{or_ids: {ids: [{filter_state: {key: io.istio.peer_principal, string_match: {exact: "spiffe://cluster.local/ns/default/sa/sleep"}}}, {filter_state: {key: io.istio.peer_principal, string_match: {safe_regex: {regex: ".*/ns/test/.*"}}}}]}}]"#;

fn tls(server: &Pem, ca: &Ca, required: bool) -> String {
    format!(
        r#"{{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: {required}, common_tls_context: {{tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}], validation_context: {{trusted_ca: {{filename: {}}}}}}}}}}}"#,
        server.cert.display(),
        server.key.display(),
        ca.pem.display()
    )
}

fn bootstrap(dir: &Path, ca: &Ca, server: &Pem) -> String {
    let log = dir.join("access.log");
    let format = "%REQ(:PATH)% %RESPONSE_CODE% peer=%FILTER_STATE(io.istio.peer_principal:PLAIN)% local=%FILTER_STATE(io.istio.local_principal:PLAIN)% typed=%FILTER_STATE(io.istio.peer_principal)%\\n";
    let access_log = format!(
        r#"[{{name: envoy.access_loggers.file, typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {}, log_format: {{text_format_source: {{inline_string: "{format}"}}}}}}}}]"#,
        log.display()
    );
    let rbac = format!(
        r#"{{name: envoy.filters.http.rbac, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC, rules: {{action: ALLOW, policies: {{"ns[default]-policy[productpage-viewer]-rule[0]": {{permissions: [{{and_rules: {{rules: [{{any: true}}]}}}}], principals: {PRINCIPALS}}}}}}}}}}}"#
    );
    let hcm_to = |cluster: &str| {
        format!(
            r#"{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: inbound_0.0.0.0_9080, access_log: {access_log}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]}}, http_filters: [{rbac}, {{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}"#
        )
    };
    let hcm = hcm_to("echo");
    let tunnel_hcm = hcm_to("echo_tunnel");
    let network_rbac = format!(
        r#"{{name: envoy.filters.network.rbac, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC, stat_prefix: tcp., rules: {{policies: {{"ns[default]-policy[productpage-viewer]-rule[0]": {{permissions: [{{any: true}}], principals: {PRINCIPALS}}}}}}}}}}}"#
    );
    let tcp = r#"{name: envoy.filters.network.tcp_proxy, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: inbound|9080||, cluster: echo}}"#;
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: MAIN}}}}
    filter_chains: [{{transport_socket: {}, filters: [{AUTHN}, {hcm}]}}]
  - name: optional
    address: {{socket_address: {{address: 127.0.0.1, port_value: OPTIONAL}}}}
    filter_chains: [{{transport_socket: {}, filters: [{AUTHN}, {hcm}]}}]
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: TCP}}}}
    filter_chains: [{{transport_socket: {}, filters: [{AUTHN}, {network_rbac}, {tcp}]}}]
  - name: tunnel
    address: {{socket_address: {{address: 127.0.0.1, port_value: TUNNEL}}}}
    filter_chains: [{{transport_socket: {}, filters: [{AUTHN_SHARED}, {tunnel_hcm}]}}]
  clusters:
  - name: echo
    connect_timeout: 1s
    load_assignment: {{cluster_name: echo, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ECHO}}}}}}}}]}}]}}
  - name: echo_tunnel
    connect_timeout: 1s
    load_assignment: {{cluster_name: echo_tunnel, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ECHO}}}}}}}}]}}]}}
"#,
        tls(server, ca, true),
        tls(server, ca, false),
        tls(server, ca, true),
        tls(server, ca, true),
    )
}

#[test]
fn istio_authn_principals_drive_rbac_and_pooling() {
    let dir = std::env::temp_dir().join(format!("petrel-istio-authn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "ca");
    let id = |ns: &str, sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    let server = ca.svid(&dir, "server", &[&id("default", "productpage")]);
    let sleep = ca.svid(&dir, "sleep", &[&id("default", "sleep")]);
    let tester = ca.svid(&dir, "tester", &[&id("test", "any")]);
    let other = ca.svid(&dir, "other", &[&id("default", "other")]);
    // The principal is the first SPIFFE URI SAN, not the first URI SAN.
    let second = ca.svid(
        &dir,
        "second",
        &["https://x.test/y", &id("default", "sleep")],
    );
    let ports: Vec<(&str, u16)> = ["ADMIN", "MAIN", "OPTIONAL", "TCP", "TUNNEL"]
        .into_iter()
        .map(|k| (k, free_port()))
        .chain([("ECHO", start_echo())])
        .collect();
    let port = |k: &str| ports.iter().find(|(n, _)| *n == k).map_or(0, |(_, p)| *p);
    let _p = start_templated(
        "petrel",
        &petrel_bin(),
        &bootstrap(&dir, &ca, &server),
        &ports,
        &["--file-flush-interval-msec", "50"],
    );
    let get = |k: &str, client: Option<&Pem>, path: &str| {
        https_get(port(k), "server.test", &["http/1.1"], client, path)
    };
    let ok = "alpn -, HTTP/1.1 200 OK";
    let forbidden = "alpn -, HTTP/1.1 403 Forbidden";
    assert_eq!(get("MAIN", Some(&sleep), "/sleep-1"), ok);
    assert_eq!(get("MAIN", Some(&sleep), "/sleep-2"), ok);
    assert_eq!(get("MAIN", Some(&tester), "/tester"), ok);
    assert_eq!(get("MAIN", Some(&other), "/other"), forbidden);
    assert_eq!(get("MAIN", Some(&second), "/second"), ok);
    // TLS without a client certificate: no principals, so the policy denies.
    assert_eq!(get("OPTIONAL", None, "/anonymous"), forbidden);
    // The network RBAC filter reads them too: an allowed client reaches the echo, a denied
    // one is closed.
    assert_eq!(get("TCP", Some(&sleep), "/tcp"), ok);
    assert_ne!(get("TCP", Some(&other), "/tcp"), ok);
    // Shared principals: sleep twice, the tester once, `second` as sleep.
    for (client, path) in [
        (&sleep, "/t-sleep-1"),
        (&sleep, "/t-sleep-2"),
        (&tester, "/t-tester"),
        (&second, "/t-second"),
    ] {
        assert_eq!(get("TUNNEL", Some(client), path), ok);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stats = stat_lines(
        port("ADMIN"),
        &[
            "cluster.echo.upstream_cx_total",
            "cluster.echo_tunnel.upstream_cx_total",
            "tcp.rbac.allowed",
            "tcp.rbac.denied",
        ],
    );
    // Unshared principals leave one pool for every HTTP client (plus the TCP proxy's
    // connection); shared ones make one per identity (sleep's and the tester's).
    assert_eq!(
        stats,
        [
            "cluster.echo.upstream_cx_total: 2",
            "cluster.echo_tunnel.upstream_cx_total: 2",
            "tcp.rbac.allowed: 1",
            "tcp.rbac.denied: 1",
        ]
    );
    let log = std::fs::read_to_string(dir.join("access.log")).expect("access log");
    let lines: Vec<&str> = log.lines().collect();
    let local = id("default", "productpage");
    let expect = [
        format!(
            "/sleep-1 200 peer={} local={local} typed=-",
            id("default", "sleep")
        ),
        format!(
            "/sleep-2 200 peer={} local={local} typed=-",
            id("default", "sleep")
        ),
        format!(
            "/tester 200 peer={} local={local} typed=-",
            id("test", "any")
        ),
        format!(
            "/other 403 peer={} local={local} typed=-",
            id("default", "other")
        ),
        format!(
            "/second 200 peer={} local={local} typed=-",
            id("default", "sleep")
        ),
        "/anonymous 403 peer=- local=- typed=-".to_string(),
        format!(
            "/t-sleep-1 200 peer={} local={local} typed=-",
            id("default", "sleep")
        ),
        format!(
            "/t-sleep-2 200 peer={} local={local} typed=-",
            id("default", "sleep")
        ),
        format!(
            "/t-tester 200 peer={} local={local} typed=-",
            id("test", "any")
        ),
        format!(
            "/t-second 200 peer={} local={local} typed=-",
            id("default", "sleep")
        ),
    ];
    assert_eq!(lines, expect);
    let _ = std::fs::remove_dir_all(&dir);
}
