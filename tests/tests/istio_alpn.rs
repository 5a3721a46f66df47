//! Istio's `istio.alpn` filter: requests through a connection manager that has it reach the
//! peer with Istio's ALPN (`istio-http/1.1`, `istio`), so that the peer's filter chains matching
//! `application_protocols` tell them apart from other clients; connections with and without the
//! override are pooled apart. (Envoy 1.40 from PyPI has no `istio.alpn` — Istio's proxy build
//! does — so this suite checks Petrel against the filter's documented effect.)

use petrel_tests::tls::Ca;
use petrel_tests::*;

fn hcm(prefix: &str, filters: &str, route: &str) -> String {
    format!(
        r#"[{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {prefix}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, {route}}}]}}]}}, http_filters: [{filters}{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]"#
    )
}

#[test]
fn istio_alpn_reaches_the_peer() {
    let dir = std::env::temp_dir().join(format!("petrel-alpn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "mesh-ca");
    let w = ca.leaf(
        &dir,
        "workload",
        &["spiffe://cluster.local/ns/default/sa/w"],
        false,
    );
    let tls = |kind: &str| {
        format!(
            r#"{{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}, common_tls_context: {{tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]}}}}}}"#,
            w.cert.display(),
            w.key.display()
        )
    };
    let alpn_filter = r#"{name: istio.alpn, typed_config: {"@type": type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig, alpn_override: [{upstream_protocol: HTTP10, alpn_override: [istio-http/1.0, istio]}, {upstream_protocol: HTTP11, alpn_override: [istio-http/1.1, istio]}, {upstream_protocol: HTTP2, alpn_override: [istio-h2, istio]}]}}, "#;
    let (admin, inbound, with_alpn, without) = (free_port(), free_port(), free_port(), free_port());
    let direct = |body: &str| {
        format!(r#"direct_response: {{status: 200, body: {{inline_string: "{body}"}}}}"#)
    };
    let cfg = format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {inbound}}}}}
    listener_filters: [{{name: envoy.filters.listener.tls_inspector, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}}}]
    filter_chains:
    - filter_chain_match: {{application_protocols: [istio-http/1.0, istio-http/1.1, istio-h2]}}
      transport_socket: {server}
      filters: {istio}
    - filter_chain_match: {{}}
      transport_socket: {server}
      filters: {other}
  - name: with_alpn
    address: {{socket_address: {{address: 127.0.0.1, port_value: {with_alpn}}}}}
    filter_chains: [{{filters: {front_alpn}}}]
  - name: without
    address: {{socket_address: {{address: 127.0.0.1, port_value: {without}}}}}
    filter_chains: [{{filters: {front_plain}}}]
  clusters:
  - name: mesh
    connect_timeout: 2s
    transport_socket: {client}
    load_assignment: {{cluster_name: mesh, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {inbound}}}}}}}}}]}}]}}
"#,
        server = tls("DownstreamTlsContext"),
        client = tls("UpstreamTlsContext"),
        istio = hcm("istio", "", &direct("istio client")),
        other = hcm("other", "", &direct("other client")),
        front_alpn = hcm("front_alpn", alpn_filter, "route: {cluster: mesh}"),
        front_plain = hcm("front_plain", "", "route: {cluster: mesh}"),
    );
    let path = dir.join("b.yaml");
    std::fs::write(&path, cfg).expect("write");
    let _p = start_with("petrel", &petrel_bin(), &path, admin, 1, Ready::Live, &[]);
    let get = |port: u16| {
        http_raw(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .map(|r| r.body_str())
            .unwrap_or_else(|e| e.to_string())
    };
    // Alternate, so that pooled connections of one kind would show up in the other.
    for _ in 0..3 {
        assert_eq!(get(with_alpn), "istio client");
        assert_eq!(get(without), "other client");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
