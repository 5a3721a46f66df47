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
    /// `envoy.tls.cert_validator.spiffe`: a CA bundle per trust domain; the peer's chain is
    /// verified against the bundle of its SPIFFE ID's trust domain.
    pub spiffe: Option<Vec<(String, Arc<RootCertStore>)>>,
}

/// Why the SPIFFE validator refused a certificate (`ssl.fail_verify_error`).
#[derive(Debug, thiserror::Error)]
#[error("verify cert failed: {0}")]
struct SpiffeFailure(String);

fn spiffe_failure(reason: impl Into<String>) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(SpiffeFailure(reason.into())),
    )))
}

/// The X509-SVID leaf checks (not a CA; a key usage without certificate or CRL signing), then
/// the bundle of the trust domain in its first URI SAN.
fn spiffe_trust_bundle<'a>(
    domains: &'a [(String, Arc<RootCertStore>)],
    leaf: &CertificateDer<'_>,
) -> Result<&'a Arc<RootCertStore>, &'static str> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Err("cert precheck");
    };
    let is_ca = matches!(parsed.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    // A leaf without the key usage extension fails too: BoringSSL reports all usages then.
    let signs = match parsed.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign() || ku.value.crl_sign(),
        _ => true,
    };
    if is_ca || signs {
        return Err("cert precheck");
    }
    let first_uri = subject_alt_names(leaf)
        .into_iter()
        .find(|(k, _)| *k == SanKind::Uri)
        .map(|(_, v)| v);
    let domain = first_uri
        .as_deref()
        .and_then(|u| u.strip_prefix("spiffe://"))
        .and_then(|rest| rest.split_once('/'))
        .map(|(d, _)| d)
        .filter(|d| !d.is_empty());
    domain
        .and_then(|d| domains.iter().find(|(name, _)| name == d))
        .map(|(_, roots)| roots)
        .ok_or("no trust bundle store")
}

/// A PEM CA bundle as a root store.
fn root_store(
    ds: &xds_client::pb::envoy::config::core::v3::DataSource,
    tp: &str,
) -> Result<Arc<RootCertStore>, ConfigError> {
    let certs = super::certificate::certificates(ds, tp)
        .map_err(|_| invalid(tp, "Failed to load trusted CA certificates"))?;
    let mut store = RootCertStore::empty();
    for c in certs {
        store
            .add(c)
            .map_err(|e| invalid(tp, format!("Failed to load trusted CA certificates: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// `SPIFFECertValidatorConfig`: trust domains and their bundles.
fn spiffe_validator(
    c: &xds_client::pb::envoy::config::core::v3::TypedExtensionConfig,
    path: &str,
) -> Result<Vec<(String, Arc<RootCertStore>)>, ConfigError> {
    use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::SpiffeCertValidatorConfig;
    let tp = format!("{path}.typed_config");
    let any = c
        .typed_config
        .as_ref()
        .ok_or_else(|| invalid(&tp, "typed_config is required"))?;
    let url = xds_client::TypeRegistry::effective_type_url(any);
    if c.name != "envoy.tls.cert_validator.spiffe"
        || url != "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    {
        return Err(ConfigError::Unsupported {
            path: path.into(),
            fields: format!("custom validator '{}' ({url})", c.name),
        });
    }
    let cfg: SpiffeCertValidatorConfig = xds_client::TypeRegistry::global()
        .unpack(any)
        .map_err(|e| invalid(&tp, e.to_string()))?;
    let mut rest = cfg.clone();
    let mut out = Vec::new();
    for (i, td) in std::mem::take(&mut rest.trust_domains).iter().enumerate() {
        let dp = format!("{tp}.trust_domains[{i}]");
        if td.name.is_empty() {
            return Err(invalid(
                format!("{dp}.name"),
                "value length must be at least 1 characters",
            ));
        }
        if out.iter().any(|(d, _)| *d == td.name) {
            return Err(invalid(
                &tp,
                format!(
                    "Multiple trust bundles are given for one trust domain for {}",
                    td.name
                ),
            ));
        }
        let bundle = td
            .trust_bundle
            .as_ref()
            .ok_or_else(|| invalid(format!("{dp}.trust_bundle"), "value is required"))?;
        out.push((
            td.name.clone(),
            root_store(bundle, &format!("{dp}.trust_bundle"))?,
        ));
    }
    reject_unhandled(&rest, &tp)?;
    Ok(out)
}

impl Validation {
    pub fn compile(
        v: &CertificateValidationContext,
        path: &str,
    ) -> Result<Validation, ConfigError> {
        let mut rest = v.clone();
        let spiffe = rest
            .custom_validator_config
            .take()
            .map(|c| spiffe_validator(&c, &format!("{path}.custom_validator_config")))
            .transpose()?;
        let roots = match rest.trusted_ca.take() {
            // An empty data source beside a custom validator (as SPIRE's ROOTCA has it).
            Some(ds) if ds.specifier.is_none() && spiffe.is_some() => None,
            Some(ds) => Some(root_store(&ds, &format!("{path}.trusted_ca"))?),
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
        Ok(Validation {
            roots,
            sans,
            spiffe,
        })
    }

    /// Whether the peer's chain is verified at all.
    pub fn verifies_chain(&self) -> bool {
        self.roots.is_some() || self.spiffe.is_some()
    }

    /// Verifies a peer certificate: its chain (by `chain`, given the CAs it must reach) when
    /// the context has CAs, then its SANs. Under the SPIFFE validator the CAs are the bundle
    /// of the leaf's trust domain, and every failure is reported as Envoy's validator reports
    /// it (alert `certificate_unknown`).
    pub fn verify_peer(
        &self,
        leaf: &CertificateDer<'_>,
        chain: impl FnOnce(&Arc<RootCertStore>) -> Result<(), rustls::Error>,
    ) -> Result<(), rustls::Error> {
        let Some(domains) = &self.spiffe else {
            if let Some(roots) = &self.roots {
                chain(roots)?;
            }
            return match self.san_matches(leaf, false) {
                true => Ok(()),
                false => Err(super::san_mismatch(leaf)),
            };
        };
        let roots = spiffe_trust_bundle(domains, leaf).map_err(spiffe_failure)?;
        chain(roots).map_err(|e| spiffe_failure(e.to_string()))?;
        match self.san_matches(leaf, true) {
            true => Ok(()),
            false => Err(super::san_mismatch(leaf)),
        }
    }

    /// Whether the certificate carries a SAN some matcher accepts (true without matchers).
    /// `uri_only`: the SPIFFE validator keeps only URI matchers (and those of the deprecated
    /// any-type list), as Envoy's does.
    fn san_matches(&self, cert: &CertificateDer<'_>, uri_only: bool) -> bool {
        let mut matchers = self
            .sans
            .iter()
            .filter(|m| !uri_only || matches!(m.kind, SanKind::Uri | SanKind::Any))
            .peekable();
        if matchers.peek().is_none() {
            return true;
        }
        let names = subject_alt_names(cert);
        matchers.any(|m| {
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
