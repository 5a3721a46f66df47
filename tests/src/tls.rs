//! Certificates made for tests (a mesh CA, SPIFFE workload certificates, an expired one, one from
//! another CA) and a TLS client that reports how a handshake and one request went.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// A certificate and its key, PEM, written to files.
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that signs leaf certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write pem");
    p
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("ca");
        let pem = write(dir, &format!("{name}.pem"), &cert.pem());
        Ca { cert, key, pem }
    }

    /// A leaf with these SANs (`spiffe://…` become URIs, others DNS names); `expired` puts its
    /// validity in the past.
    pub fn leaf(&self, dir: &Path, name: &str, sans: &[&str], expired: bool) -> Pem {
        self.sign(dir, name, sans, |params| {
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
        })
    }

    /// A leaf with the key usages and extended key usages Istio's CA gives a workload (the
    /// X509-SVID profile: the SPIFFE validator refuses a leaf without key usage).
    pub fn svid(&self, dir: &Path, name: &str, sans: &[&str]) -> Pem {
        self.sign(dir, name, sans, |params| {
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::DigitalSignature,
                rcgen::KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
        })
    }

    fn sign(
        &self,
        dir: &Path,
        name: &str,
        sans: &[&str],
        customize: impl FnOnce(&mut CertificateParams),
    ) -> Pem {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = sans
            .iter()
            .map(|s| {
                if s.contains("://") {
                    SanType::URI((*s).try_into().expect("uri"))
                } else {
                    SanType::DnsName((*s).try_into().expect("dns"))
                }
            })
            .collect();
        customize(&mut params);
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        Pem {
            cert: write(dir, &format!("{name}.crt"), &cert.pem()),
            key: write(dir, &format!("{name}.key"), &key.serialize_pem()),
        }
    }
}

/// Accepts any server certificate: the tests look at what the proxy does, not at its chain.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How one TLS exchange went: the negotiated ALPN and the response status line, or why not.
pub fn https_get(port: u16, sni: &str, alpn: &[&str], client: Option<&Pem>, path: &str) -> String {
    https_exchange(port, sni, alpn, client, path, "", false)
}

/// The response body of a GET over TLS with this SNI, or why there was none.
pub fn https_body_sni(port: u16, sni: &str, client: Option<&Pem>, path: &str) -> String {
    https_exchange(port, sni, &["http/1.1"], client, path, "", true)
}

/// An HTTP/1.1 request over TLS with more header lines (`extra`, each ending in CRLF); the
/// response body.
pub fn https_body(port: u16, client: Option<&Pem>, path: &str, extra: &str) -> String {
    https_exchange(
        port,
        "server.test",
        &["http/1.1"],
        client,
        path,
        extra,
        true,
    )
}

fn https_exchange(
    port: u16,
    sni: &str,
    alpn: &[&str],
    client: Option<&Pem>,
    path: &str,
    extra: &str,
    with_body: bool,
) -> String {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match client {
        Some(p) => {
            let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&p.cert)
                .expect("cert")
                .collect::<Result<_, _>>()
                .expect("cert");
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&p.key).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            return "connect refused".to_string();
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).expect("sni");
        let mut s = match tokio::time::timeout(
            std::time::Duration::from_secs(5),
            connector.connect(name, tcp),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return format!("handshake failed: {}", describe(&e)),
            Err(_) => return "handshake timed out".into(),
        };
        let negotiated = s
            .get_ref()
            .1
            .alpn_protocol()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .unwrap_or_else(|| "-".into());
        if negotiated == "h2" {
            return "alpn h2".into();
        }
        let req = format!("GET {path} HTTP/1.1\r\nhost: {sni}\r\n{extra}connection: close\r\n\r\n");
        if let Err(e) = s.write_all(req.as_bytes()).await {
            return format!("alpn {negotiated}, write failed: {}", describe(&e));
        }
        let mut out = Vec::new();
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        let status = if with_body {
            text.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
        } else {
            text.lines().next().unwrap_or("").to_string()
        };
        match read {
            _ if with_body => status,
            _ if !status.is_empty() => format!("alpn {negotiated}, {status}"),
            Ok(Err(e)) => format!("alpn {negotiated}, read failed: {}", describe(&e)),
            Ok(Ok(_)) => format!("alpn {negotiated}, closed without a response"),
            Err(_) => format!("alpn {negotiated}, no response"),
        }
    })
}

/// An I/O error as the TLS alert or failure it carries.
fn describe(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(a)) => format!("alert {a:?}"),
        Some(other) => format!("{other:?}"),
        None => format!("{:?}", e.kind()),
    }
}

/// The certificate a TLS port presents (DER), or None when the handshake fails.
pub fn server_certificate(port: u16, client: Option<&Pem>) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match client {
        Some(p) => {
            let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&p.cert)
                .ok()?
                .collect::<Result<_, _>>()
                .ok()?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&p.key).ok()?;
            builder.with_client_auth_cert(chain, key).ok()?
        }
        None => builder.with_no_client_auth(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let name = rustls_pki_types::ServerName::try_from("server.test").ok()?;
        let s = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .ok()?;
        s.get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec())
    })
}

/// The SPIFFE identities of the mTLS pair below.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

fn tls_certificate(p: &Pem) -> String {
    format!(
        "tls_certificates: [{{certificate_chain: {{filename: {}}}, private_key: {{filename: {}}}}}]",
        p.cert.display(),
        p.key.display()
    )
}

/// A sidecar's mTLS shape, as Istio renders it: an `inbound` listener that requires a client
/// certificate (SAN `CLIENT_ID`) and answers `body`, and an `outbound` plaintext listener whose
/// cluster originates mTLS (SAN `SERVER_ID`, Istio's ALPN) to `peer`.
/// `ports`: admin, inbound, outbound, peer.
pub fn mtls_pair_bootstrap(
    ca: &Ca,
    server: &Pem,
    client: &Pem,
    ports: [u16; 4],
    body: &str,
) -> String {
    let [admin, inbound, outbound, peer] = ports;
    let router = r#"http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]"#;
    let hcm = "\"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {inbound}}}}}
    filter_chains:
    - transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext, require_client_certificate: true, common_tls_context: {{{server}, alpn_protocols: [istio-http/1.1, istio, http/1.1], validation_context: {{trusted_ca: {{filename: {ca}}}, match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{CLIENT_ID}"}}}}]}}}}}}}}
      filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{{hcm}, stat_prefix: inbound, forward_client_cert_details: SANITIZE_SET, set_current_client_cert_details: {{uri: true}}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "{body}"}}}}}}]}}]}}, {router}}}}}]
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {outbound}}}}}
    filter_chains:
    - filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{{hcm}, stat_prefix: outbound, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: peer}}}}]}}]}}, {router}}}}}]
  clusters:
  - name: peer
    connect_timeout: 2s
    transport_socket: {{name: envoy.transport_sockets.tls, typed_config: {{"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, sni: outbound_.80_._.server.default.svc.cluster.local, common_tls_context: {{{client}, alpn_protocols: [istio-http/1.1, istio], validation_context: {{trusted_ca: {{filename: {ca}}}, match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{SERVER_ID}"}}}}]}}}}}}}}
    load_assignment: {{cluster_name: peer, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {peer}}}}}}}}}]}}]}}
"#,
        server = tls_certificate(server),
        client = tls_certificate(client),
        ca = ca.pem.display(),
    )
}
