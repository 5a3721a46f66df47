//! `CommonTlsContext`: certificates, validation, ALPN and `tls_params`, mapped onto rustls. What
//! rustls cannot do (TLS 1.0/1.1, CBC and RSA-key-exchange ciphers, other curves) is refused by
//! name.

use std::sync::Arc;

/// Envoy's errors for a static secret no `static_resources.secrets` entry has.
const UNKNOWN_CERTIFICATE: &str = "Unknown static secret";
const UNKNOWN_VALIDATION: &str = "Unknown static certificate validation context";

use rustls::crypto::ring::{cipher_suite as cs, kx_group};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::SupportedProtocolVersion;
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, tls_parameters::TlsProtocol, CommonTlsContext,
    TlsParameters,
};

use super::secrets::{sds_slot, SecretSlot};
use super::validation::Validation;
use crate::config::{invalid, reject_unhandled, ConfigError};
use arc_swap::ArcSwapOption;

/// A certificate given inline, or named for SDS.
#[derive(Debug, Clone)]
pub enum CertSource {
    Static(Arc<CertifiedKey>),
    Sds(Arc<SecretSlot>),
}

/// A validation context given inline, or named for SDS (`validation_context_sds_secret_config`),
/// or both (`combined_validation_context`: the secret's CA with the default's SAN matchers).
#[derive(Debug)]
pub enum ValidationSource {
    Static(Arc<Validation>),
    Sds {
        slot: Arc<SecretSlot>,
        default: Option<Validation>,
        /// The merged context for the secret value it was made from (by address).
        merged: ArcSwapOption<(usize, Arc<Validation>)>,
    },
}

impl ValidationSource {
    /// The validation context as it stands (None while its secret has not arrived).
    pub fn current(&self) -> Option<Arc<Validation>> {
        match self {
            ValidationSource::Static(v) => Some(v.clone()),
            ValidationSource::Sds {
                slot,
                default,
                merged,
            } => {
                let secret = slot.validation()?;
                let Some(default) = default else {
                    return Some(secret);
                };
                let key = Arc::as_ptr(&secret) as usize;
                if let Some(m) = merged.load().as_ref() {
                    if m.0 == key {
                        return Some(m.1.clone());
                    }
                }
                let mut v = (*secret).clone();
                v.sans.extend(default.sans.iter().cloned());
                if !v.verifies_chain() {
                    v.roots.clone_from(&default.roots);
                    v.spiffe.clone_from(&default.spiffe);
                }
                let v = Arc::new(v);
                merged.store(Some(Arc::new((key, v.clone()))));
                Some(v)
            }
        }
    }

    fn ready(&self) -> bool {
        self.slot().is_none_or(|s| s.is_ready())
    }

    fn slot(&self) -> Option<&Arc<SecretSlot>> {
        match self {
            ValidationSource::Static(_) => None,
            ValidationSource::Sds { slot, .. } => Some(slot),
        }
    }
}

/// A compiled `CommonTlsContext`.
#[derive(Debug)]
pub struct CommonTls {
    pub certificates: Vec<CertSource>,
    pub validation: Option<ValidationSource>,
    pub alpn: Vec<Vec<u8>>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
    pub provider: Arc<CryptoProvider>,
}

impl CommonTls {
    /// The certificates as they stand (an SDS one only once it has arrived).
    pub fn current_certificates(&self) -> Vec<Arc<CertifiedKey>> {
        self.certificates
            .iter()
            .filter_map(|c| match c {
                CertSource::Static(k) => Some(k.clone()),
                CertSource::Sds(slot) => slot.certificate(),
            })
            .collect()
    }

    /// Counts every SDS update of the secrets this context names in `counter`
    /// (`ssl_context_update_by_sds`).
    pub fn watch_updates(&self, counter: &Arc<crate::observe::stats::Counter>) {
        let slots = self
            .certificates
            .iter()
            .filter_map(|c| match c {
                CertSource::Sds(slot) => Some(slot),
                CertSource::Static(_) => None,
            })
            .chain(self.validation.as_ref().and_then(ValidationSource::slot));
        for slot in slots {
            slot.watch(counter);
        }
    }

    /// Whether every secret the context names has a value (else a connection gets Envoy's
    /// `NotReadySslSocket`: closed at once).
    pub fn secrets_present(&self) -> bool {
        self.certificates.iter().all(|c| match c {
            CertSource::Static(_) => true,
            CertSource::Sds(slot) => slot.has_value(),
        }) && self
            .validation
            .as_ref()
            .and_then(ValidationSource::slot)
            .is_none_or(|s| s.has_value())
    }

    /// Whether the context's listener or cluster may leave warming: every secret arrived or
    /// its `initial_fetch_timeout` ran out.
    pub fn ready(&self) -> bool {
        self.certificates.iter().all(|c| match c {
            CertSource::Static(_) => true,
            CertSource::Sds(slot) => slot.is_ready(),
        }) && self.validation.as_ref().is_none_or(ValidationSource::ready)
    }
}
/// Which end of the handshake a context is for: Envoy's defaults differ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Side {
    /// Downstream: TLS 1.2 to 1.3.
    Server,
    /// Upstream: TLS 1.2 only unless `tls_maximum_protocol_version` says otherwise.
    Client,
}

/// OpenSSL cipher names Envoy accepts and the rustls suites they are.
fn cipher(name: &str) -> Option<rustls::SupportedCipherSuite> {
    Some(match name {
        "ECDHE-ECDSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-RSA-AES128-GCM-SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-ECDSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-RSA-AES256-GCM-SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-ECDSA-CHACHA20-POLY1305" => cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        "ECDHE-RSA-CHACHA20-POLY1305" => cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        _ => return None,
    })
}

/// TLS 1.2 suites BoringSSL (and so Envoy) accepts that rustls does not implement.
const BORINGSSL_ONLY: &[&str] = &[
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "DES-CBC3-SHA",
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "ECDHE-PSK-AES128-CBC-SHA",
    "ECDHE-PSK-AES256-CBC-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "PSK-AES128-CBC-SHA",
    "PSK-AES256-CBC-SHA",
];

/// The TLS 1.3 suites, which `cipher_suites` does not configure (as in Envoy), in BoringSSL's
/// order of preference.
const TLS13: [rustls::SupportedCipherSuite; 3] = [
    cs::TLS13_AES_128_GCM_SHA256,
    cs::TLS13_AES_256_GCM_SHA384,
    cs::TLS13_CHACHA20_POLY1305_SHA256,
];

fn params(
    p: &TlsParameters,
    side: Side,
    path: &str,
) -> Result<(Vec<&'static SupportedProtocolVersion>, CryptoProvider), ConfigError> {
    let mut rest = p.clone();
    let version = |v: i32, field: &str, default: u8| -> Result<u8, ConfigError> {
        match TlsProtocol::try_from(v) {
            Ok(TlsProtocol::TlsAuto) => Ok(default),
            Ok(TlsProtocol::TlSv12) => Ok(2),
            Ok(TlsProtocol::TlSv13) => Ok(3),
            Ok(other) => Err(invalid(
                format!("{path}.{field}"),
                format!(
                    "{} is not supported by Petrel (rustls implements TLS 1.2 and 1.3)",
                    other.as_str_name()
                ),
            )),
            Err(_) => Err(invalid(format!("{path}.{field}"), "unknown TLS version")),
        }
    };
    let min = version(
        std::mem::take(&mut rest.tls_minimum_protocol_version),
        "tls_minimum_protocol_version",
        2,
    )?;
    let default_max = if side == Side::Client { 2 } else { 3 };
    let max = version(
        std::mem::take(&mut rest.tls_maximum_protocol_version),
        "tls_maximum_protocol_version",
        default_max,
    )?;
    if min > max {
        return Err(invalid(
            path,
            "tls_minimum_protocol_version is above tls_maximum_protocol_version",
        ));
    }
    let mut versions = Vec::new();
    if max >= 3 {
        versions.push(&rustls::version::TLS13);
    }
    if min <= 2 {
        versions.push(&rustls::version::TLS12);
    }
    let mut provider = rustls::crypto::ring::default_provider();
    let mut suites: Vec<rustls::SupportedCipherSuite> = TLS13.to_vec();
    let names = std::mem::take(&mut rest.cipher_suites);
    if names.is_empty() {
        // Envoy's default list, less what rustls lacks (CBC and RSA key exchange).
        suites.extend([
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ]);
    }
    // Suites BoringSSL has and rustls does not (RSA key exchange, CBC, PSK): Istio lists the
    // first two as fallbacks after its ECDHE ones. A list keeps what rustls has, the others are
    // named in a warning; a list of nothing rustls has is refused, as no handshake could use it.
    let mut missing = Vec::new();
    let mut first_missing = None;
    for (i, n) in names.iter().enumerate() {
        // `[A|B]` is an equal-preference group in BoringSSL; rustls keeps the listed order.
        for name in n.trim_matches(|c| c == '[' || c == ']').split('|') {
            match cipher(name) {
                Some(s) => suites.push(s),
                None if BORINGSSL_ONLY.contains(&name) => {
                    first_missing.get_or_insert((i, name));
                    missing.push(name);
                }
                None => {
                    return Err(invalid(
                        format!("{path}.cipher_suites[{i}]"),
                        format!("unknown cipher suite '{name}'"),
                    ))
                }
            }
        }
    }
    if let Some((i, name)) = first_missing {
        if suites.len() == TLS13.len() {
            return Err(invalid(
                format!("{path}.cipher_suites[{i}]"),
                format!("cipher suite '{name}' is not supported by Petrel (rustls offers ECDHE with AES-GCM or CHACHA20-POLY1305)"),
            ));
        }
        crate::plog!(
            warn,
            "config",
            "{path}.cipher_suites: {} not available in rustls; TLS 1.2 handshakes use the others",
            missing.join(", ")
        );
    }
    provider.cipher_suites = suites;
    let curves = std::mem::take(&mut rest.ecdh_curves);
    if !curves.is_empty() {
        let mut groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup> = Vec::new();
        for (i, c) in curves.iter().enumerate() {
            groups.push(match c.as_str() {
                "X25519" => kx_group::X25519,
                "P-256" => kx_group::SECP256R1,
                "P-384" => kx_group::SECP384R1,
                other => {
                    return Err(invalid(
                        format!("{path}.ecdh_curves[{i}]"),
                        format!(
                            "curve '{other}' is not supported by Petrel (X25519, P-256, P-384)"
                        ),
                    ))
                }
            });
        }
        provider.kx_groups = groups;
    }
    reject_unhandled(&rest, path)?;
    Ok((versions, provider))
}

impl CommonTls {
    pub fn compile_for(
        c: &CommonTlsContext,
        side: Side,
        path: &str,
    ) -> Result<CommonTls, ConfigError> {
        let mut rest = c.clone();
        let (versions, provider) = match rest.tls_params.take() {
            Some(p) => params(&p, side, &format!("{path}.tls_params"))?,
            None => params(&TlsParameters::default(), side, path)?,
        };
        let mut certificates = Vec::new();
        for (i, t) in std::mem::take(&mut rest.tls_certificates)
            .iter()
            .enumerate()
        {
            certificates.push(CertSource::Static(super::certificate::certified_key(
                t,
                &format!("{path}.tls_certificates[{i}]"),
            )?));
        }
        for (i, c) in std::mem::take(&mut rest.tls_certificate_sds_secret_configs)
            .iter()
            .enumerate()
        {
            certificates.push(CertSource::Sds(sds_slot(
                c,
                &format!("{path}.tls_certificate_sds_secret_configs[{i}]"),
                UNKNOWN_CERTIFICATE,
            )?));
        }
        let validation = match rest.validation_context_type.take() {
            None => None,
            Some(ValidationContextType::ValidationContext(v)) => {
                Some(ValidationSource::Static(Arc::new(Validation::compile(
                    &v,
                    &format!("{path}.validation_context"),
                )?)))
            }
            Some(ValidationContextType::ValidationContextSdsSecretConfig(c)) => {
                Some(ValidationSource::Sds {
                    slot: sds_slot(
                        &c,
                        &format!("{path}.validation_context_sds_secret_config"),
                        UNKNOWN_VALIDATION,
                    )?,
                    default: None,
                    merged: ArcSwapOption::empty(),
                })
            }
            Some(ValidationContextType::CombinedValidationContext(mut c)) => {
                let cp = format!("{path}.combined_validation_context");
                let default = c
                    .default_validation_context
                    .take()
                    .map(|d| Validation::compile(&d, &format!("{cp}.default_validation_context")))
                    .transpose()?;
                let sds = c
                    .validation_context_sds_secret_config
                    .take()
                    .ok_or_else(|| {
                        invalid(
                            format!("{cp}.validation_context_sds_secret_config"),
                            "value is required",
                        )
                    })?;
                let slot = sds_slot(
                    &sds,
                    &format!("{cp}.validation_context_sds_secret_config"),
                    UNKNOWN_VALIDATION,
                )?;
                reject_unhandled(&c, &cp)?;
                Some(ValidationSource::Sds {
                    slot,
                    default,
                    merged: ArcSwapOption::empty(),
                })
            }
            Some(_) => {
                return Err(ConfigError::Unsupported {
                    path: path.into(),
                    fields: "'validation_context_certificate_provider_instance'".into(),
                })
            }
        };
        let alpn = std::mem::take(&mut rest.alpn_protocols)
            .into_iter()
            .map(String::into_bytes)
            .collect();
        reject_unhandled(&rest, path)?;
        Ok(CommonTls {
            certificates,
            validation,
            alpn,
            versions,
            provider: Arc::new(provider),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(ciphers: &[&str]) -> Result<Vec<rustls::SupportedCipherSuite>, ConfigError> {
        let p = TlsParameters {
            cipher_suites: ciphers.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        params(&p, Side::Server, "p").map(|(_, provider)| provider.cipher_suites)
    }

    #[test]
    fn istio_inbound_cipher_list_keeps_what_rustls_has() {
        // Istio's default inbound list.
        let suites = with(&[
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "AES256-GCM-SHA384",
            "AES128-GCM-SHA256",
        ])
        .unwrap();
        assert_eq!(suites.len(), TLS13.len() + 4);
        assert_eq!(
            suites[TLS13.len()].suite(),
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384.suite()
        );
    }

    #[test]
    fn lists_rustls_cannot_serve_are_refused() {
        let e = with(&["AES256-GCM-SHA384", "AES128-SHA"]).unwrap_err();
        assert!(e.to_string().contains("cipher_suites[0]"), "{e}");
        let e = with(&["ECDHE-RSA-AES128-GCM-SHA256", "NOT-A-CIPHER"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown cipher suite 'NOT-A-CIPHER'"),
            "{e}"
        );
    }
}
