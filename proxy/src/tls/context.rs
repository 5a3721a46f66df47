//! `CommonTlsContext`: certificates, validation, ALPN and `tls_params`, mapped onto rustls. What
//! rustls cannot do (TLS 1.0/1.1, CBC and RSA-key-exchange ciphers, other curves) is refused by
//! name.

use std::sync::Arc;

use rustls::crypto::ring::{cipher_suite as cs, kx_group};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::SupportedProtocolVersion;
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, tls_parameters::TlsProtocol, CommonTlsContext,
    TlsParameters,
};

use super::validation::Validation;
use crate::config::{invalid, reject_unhandled, ConfigError};

/// A compiled `CommonTlsContext`.
#[derive(Debug, Clone)]
pub struct CommonTls {
    pub certificates: Vec<Arc<CertifiedKey>>,
    pub validation: Option<Validation>,
    pub alpn: Vec<Vec<u8>>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
    pub provider: Arc<CryptoProvider>,
}

/// Which end of the handshake a context is for: Envoy's defaults differ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Side {
    /// Downstream: TLS 1.2 to 1.3.
    Server,
    /// Upstream: TLS 1.2 only unless `tls_maximum_protocol_version` says otherwise.
    Client,
}

const SDS: &str = "secret discovery (SDS) comes with mesh security, issue #6";

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
    for (i, n) in names.iter().enumerate() {
        // `[A|B]` is an equal-preference group in BoringSSL; rustls keeps the listed order.
        for name in n.trim_matches(|c| c == '[' || c == ']').split('|') {
            match cipher(name) {
                Some(s) => suites.push(s),
                None => {
                    return Err(invalid(
                        format!("{path}.cipher_suites[{i}]"),
                        format!("cipher suite '{name}' is not supported by Petrel (rustls offers ECDHE with AES-GCM or CHACHA20-POLY1305)"),
                    ))
                }
            }
        }
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
            certificates.push(super::certificate::certified_key(
                t,
                &format!("{path}.tls_certificates[{i}]"),
            )?);
        }
        if !rest.tls_certificate_sds_secret_configs.is_empty() {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: format!("'tls_certificate_sds_secret_configs' ({SDS})"),
            });
        }
        let validation = match rest.validation_context_type.take() {
            None => None,
            Some(ValidationContextType::ValidationContext(v)) => Some(Validation::compile(
                &v,
                &format!("{path}.validation_context"),
            )?),
            Some(ValidationContextType::CombinedValidationContext(_))
            | Some(ValidationContextType::ValidationContextSdsSecretConfig(_)) => {
                return Err(ConfigError::Unsupported {
                    path: path.into(),
                    fields: format!("'validation_context_sds_secret_config' ({SDS})"),
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
