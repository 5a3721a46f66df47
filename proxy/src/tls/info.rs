//! What a finished handshake tells the rest of the proxy (access logs, XFCC, RBAC): the
//! version, the cipher and both ends' certificate names, read once per connection.

use rustls_pki_types::CertificateDer;

/// One certificate's names.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CertNames {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub subject: String,
    pub issuer: String,
    /// Lower-case hex.
    pub serial: String,
    /// SHA-256 of the DER, lower-case hex.
    pub fingerprint_256: String,
}

impl CertNames {
    pub fn of(cert: &CertificateDer<'_>) -> CertNames {
        let (uri_sans, dns_sans) = super::validation::uri_and_dns_sans(cert);
        let mut names = CertNames {
            uri_sans,
            dns_sans,
            fingerprint_256: hex(
                ring::digest::digest(&ring::digest::SHA256, cert.as_ref()).as_ref()
            ),
            ..Default::default()
        };
        if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
            names.subject = rfc2253(parsed.subject());
            names.issuer = rfc2253(parsed.issuer());
            names.serial = hex(parsed.raw_serial());
        }
        names
    }
}

/// A distinguished name as OpenSSL's RFC 2253 printing gives it (most specific first).
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let mut parts: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|a| {
                    let key = x509_parser::objects::oid2abbrev(
                        a.attr_type(),
                        x509_parser::objects::oid_registry(),
                    )
                    .map(str::to_string)
                    .unwrap_or_else(|_| a.attr_type().to_id_string());
                    format!("{key}={}", a.as_str().unwrap_or(""))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    parts.reverse();
    parts.join(",")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A TLS connection's facts.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TlsInfo {
    /// `TLSv1.2` / `TLSv1.3`.
    pub version: &'static str,
    /// The cipher's OpenSSL name.
    pub cipher: &'static str,
    pub peer: Option<CertNames>,
    pub local: Option<CertNames>,
    /// The peer's certificates (DER), its own first (XFCC `Cert` and `Chain`).
    pub peer_chain: Vec<Vec<u8>>,
    /// The negotiated ALPN protocol (empty when none).
    pub alpn: String,
}

impl TlsInfo {
    pub fn of(conn: &rustls::CommonState, local: Option<&CertificateDer<'_>>) -> TlsInfo {
        TlsInfo {
            version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "",
            },
            cipher: conn
                .negotiated_cipher_suite()
                .map_or("", super::cipher_name),
            peer: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(CertNames::of),
            local: local.map(CertNames::of),
            peer_chain: conn
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
                .unwrap_or_default(),
            alpn: conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
        }
    }
}
