//! `TlsCertificate`: a PEM certificate chain and its private key, loaded into what rustls signs
//! with. A key that does not belong to the certificate is refused here, as Envoy refuses it.

use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use xds_client::pb::envoy::config::core::v3::DataSource;
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::TlsCertificate;

use crate::config::{invalid, reject_unhandled, ConfigError};

/// Where a data source's bytes came from, for error messages (Envoy's wording).
fn origin(ds: &DataSource) -> String {
    use xds_client::pb::envoy::config::core::v3::data_source::Specifier;
    match &ds.specifier {
        Some(Specifier::Filename(f)) => f.clone(),
        _ => "<inline>".into(),
    }
}

/// PEM certificates (one or more) from a data source.
pub fn certificates(
    ds: &DataSource,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = crate::config::bootstrap::data_source(ds, path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| {
            invalid(
                path,
                format!("Failed to load certificate chain from {}", origin(ds)),
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            path,
            format!("Failed to load certificate chain from {}", origin(ds)),
        ));
    }
    Ok(certs)
}

/// A certificate chain and its key, ready to sign handshakes.
pub fn certified_key(c: &TlsCertificate, path: &str) -> Result<Arc<CertifiedKey>, ConfigError> {
    let mut rest = c.clone();
    let chain_ds = rest
        .certificate_chain
        .take()
        .ok_or_else(|| invalid(format!("{path}.certificate_chain"), "value is required"))?;
    let key_ds = rest
        .private_key
        .take()
        .ok_or_else(|| invalid(format!("{path}.private_key"), "value is required"))?;
    reject_unhandled(&rest, path)?;
    let chain = certificates(&chain_ds, &format!("{path}.certificate_chain"))?;
    let kp = format!("{path}.private_key");
    let key_bytes = crate::config::bootstrap::data_source(&key_ds, &kp)?;
    let bad_key = || {
        invalid(
            &kp,
            format!("Failed to load private key from {}", origin(&key_ds)),
        )
    };
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| bad_key())?;
    let signing = super::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|_| bad_key())?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|_| {
        invalid(
            &kp,
            format!(
                "Failed to load private key from {}: it does not match the certificate",
                origin(&key_ds)
            ),
        )
    })?;
    Ok(Arc::new(ck))
}
