//! `CertificateValidationContext`: the CAs a peer's chain must reach, and the subject alternative
//! names its certificate must carry (`match_typed_subject_alt_names`, SPIFFE URIs included).

use std::sync::Arc;

use petrel_filters::matcher::StringMatcher;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::{
    subject_alt_name_matcher::SanType, CertificateValidationContext,
};

use crate::config::{invalid, reject_unhandled, ConfigError};

/// Which SAN entries a matcher looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SanKind {
    Dns,
    Uri,
    Email,
    Ip,
    /// `match_subject_alt_names` (untyped): any of the above.
    Any,
}

#[derive(Debug, Clone)]
pub struct SanMatcher {
    kind: SanKind,
    matcher: StringMatcher,
}

/// A compiled validation context.
#[derive(Debug, Clone, Default)]
pub struct Validation {
    /// `trusted_ca`; without it the peer's chain is not verified (Envoy's behaviour).
    pub roots: Option<Arc<RootCertStore>>,
    pub sans: Vec<SanMatcher>,
}

impl Validation {
    pub fn compile(
        v: &CertificateValidationContext,
        path: &str,
    ) -> Result<Validation, ConfigError> {
        let mut rest = v.clone();
        let roots = match rest.trusted_ca.take() {
            Some(ds) => {
                let tp = format!("{path}.trusted_ca");
                let certs = super::certificate::certificates(&ds, &tp)
                    .map_err(|_| invalid(&tp, "Failed to load trusted CA certificates"))?;
                let mut store = RootCertStore::empty();
                for c in certs {
                    store.add(c).map_err(|e| {
                        invalid(&tp, format!("Failed to load trusted CA certificates: {e}"))
                    })?;
                }
                Some(Arc::new(store))
            }
            None => None,
        };
        let mut sans = Vec::new();
        for (i, m) in std::mem::take(&mut rest.match_typed_subject_alt_names)
            .iter()
            .enumerate()
        {
            let mp = format!("{path}.match_typed_subject_alt_names[{i}]");
            let kind = match SanType::try_from(m.san_type) {
                Ok(SanType::Dns) => SanKind::Dns,
                Ok(SanType::Uri) => SanKind::Uri,
                Ok(SanType::Email) => SanKind::Email,
                Ok(SanType::IpAddress) => SanKind::Ip,
                _ => {
                    return Err(invalid(
                        format!("{mp}.san_type"),
                        "san_type must be DNS, URI, EMAIL or IP_ADDRESS in Petrel",
                    ))
                }
            };
            let sm = m
                .matcher
                .as_ref()
                .ok_or_else(|| invalid(format!("{mp}.matcher"), "value is required"))?;
            let matcher = StringMatcher::from_proto(sm, &format!("{mp}.matcher"))
                .map_err(|e| invalid(&mp, e.to_string()))?;
            sans.push(SanMatcher { kind, matcher });
        }
        #[allow(deprecated)]
        for (i, sm) in std::mem::take(&mut rest.match_subject_alt_names)
            .iter()
            .enumerate()
        {
            let mp = format!("{path}.match_subject_alt_names[{i}]");
            let matcher =
                StringMatcher::from_proto(sm, &mp).map_err(|e| invalid(&mp, e.to_string()))?;
            sans.push(SanMatcher {
                kind: SanKind::Any,
                matcher,
            });
        }
        reject_unhandled(&rest, path)?;
        Ok(Validation { roots, sans })
    }

    /// Whether the certificate carries a SAN some matcher accepts (true without matchers).
    pub fn san_matches(&self, cert: &CertificateDer<'_>) -> bool {
        if self.sans.is_empty() {
            return true;
        }
        let names = subject_alt_names(cert);
        self.sans.iter().any(|m| {
            names.iter().any(|(kind, value)| {
                (m.kind == SanKind::Any || m.kind == *kind) && m.matches(*kind, value)
            })
        })
    }
}

impl SanMatcher {
    fn matches(&self, kind: SanKind, value: &str) -> bool {
        if self.matcher.matches(value) {
            return true;
        }
        // A wildcard DNS SAN covers one label of an exact name, as Envoy's dnsNameMatch does.
        if kind == SanKind::Dns {
            if let (Some(suffix), Some(want)) =
                (value.strip_prefix('*'), self.matcher.exact_value())
            {
                if suffix.starts_with('.') {
                    if let Some((label, rest)) = want.split_once('.') {
                        return !label.is_empty() && format!(".{rest}") == suffix;
                    }
                }
            }
        }
        false
    }
}

/// The SAN entries of a certificate: `(kind, value)`.
fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<(SanKind, String)> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::DNSName(s) => Some((SanKind::Dns, s.to_string())),
            GeneralName::URI(s) => Some((SanKind::Uri, s.to_string())),
            GeneralName::RFC822Name(s) => Some((SanKind::Email, s.to_string())),
            GeneralName::IPAddress(b) => {
                let ip = match b.len() {
                    4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                    16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                    _ => None,
                };
                ip.map(|ip| (SanKind::Ip, ip.to_string()))
            }
            _ => None,
        })
        .collect()
}

/// A certificate's URI and DNS SANs.
pub fn uri_and_dns_sans(cert: &CertificateDer<'_>) -> (Vec<String>, Vec<String>) {
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    for (kind, v) in subject_alt_names(cert) {
        match kind {
            SanKind::Uri => uris.push(v),
            SanKind::Dns => dns.push(v),
            _ => {}
        }
    }
    (uris, dns)
}

/// Every SAN value of a certificate, in its order.
pub fn san_values(cert: &CertificateDer<'_>) -> Vec<String> {
    subject_alt_names(cert)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}
