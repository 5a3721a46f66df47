//! `envoy.transport_sockets.tls` with rustls (ring): `DownstreamTlsContext` terminates TLS on a
//! filter chain, `UpstreamTlsContext` originates it to cluster hosts. Handshake outcomes are
//! counted under `<scope>ssl.*` with Envoy's names.

pub mod certificate;
pub mod client;
pub mod context;
pub mod info;
pub mod secrets;
pub mod server;
pub mod validation;

use std::sync::Arc;

use crate::observe::stats::Store;
use crate::stat_struct;

/// The crypto provider every context starts from.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static P: std::sync::LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    P.clone()
}

// `<scope>{server,client}_ssl_socket_factory.`: SDS updates of a context and connections its
// missing secrets turned away (Envoy's `NotReadySslSocket`).
stat_struct!(SocketFactoryStats {
    counter ssl_context_update_by_sds,
    counter upstream_context_secrets_not_ready,
    counter downstream_context_secrets_not_ready,
});

stat_struct!(SslCounters {
    counter connection_error,
    counter handshake,
    counter fail_verify_san,
    counter fail_verify_error,
    counter fail_verify_no_cert,
    counter no_certificate,
});

/// A scope's `ssl.*` stats: fixed counters, and the per-version/cipher/curve ones created when
/// first seen (as Envoy creates them).
#[derive(Debug, Clone)]
pub struct SslStats {
    pub counters: SslCounters,
    prefix: String,
    store: Store,
}

/// The peer certificate's SANs (listed) did not match (`ssl.fail_verify_san`).
#[derive(Debug)]
pub struct SanMismatch(pub Vec<String>);

impl std::fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SAN matcher, certificate SANs are [{}]",
            self.0.join(", ")
        )
    }
}

impl std::error::Error for SanMismatch {}

impl SslStats {
    pub fn new(store: &Store, scope: &str) -> Self {
        let prefix = format!("{scope}ssl.");
        SslStats {
            counters: SslCounters::new(store, &prefix),
            prefix,
            store: store.clone(),
        }
    }

    /// Counts a finished handshake: Envoy's version, cipher and curve names.
    pub fn handshake(&self, conn: &rustls::CommonState) {
        self.counters.handshake.inc();
        if let Some(v) = conn.protocol_version() {
            let name = match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
                _ => "unknown",
            };
            self.store
                .counter(&format!("{}versions.{name}", self.prefix))
                .inc();
        }
        if let Some(c) = conn.negotiated_cipher_suite() {
            self.store
                .counter(&format!("{}ciphers.{}", self.prefix, cipher_name(c)))
                .inc();
        }
        if let Some(g) = conn.negotiated_key_exchange_group() {
            let name = match g.name() {
                rustls::NamedGroup::X25519 => "X25519",
                rustls::NamedGroup::secp256r1 => "P-256",
                rustls::NamedGroup::secp384r1 => "P-384",
                _ => "unknown",
            };
            self.store
                .counter(&format!("{}curves.{name}", self.prefix))
                .inc();
        }
    }

    /// Counts a failed handshake by what failed: the peer's certificate (`fail_verify_*`), a TLS
    /// error (`connection_error`), or nothing when the peer just went away (as Envoy counts).
    pub fn failure(&self, e: &std::io::Error) {
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => self.counters.fail_verify_no_cert.inc(),
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))
                if o.0.downcast_ref::<SanMismatch>().is_some() =>
            {
                self.counters.fail_verify_san.inc()
            }
            rustls::Error::InvalidCertificate(_) => self.counters.fail_verify_error.inc(),
            _ => self.counters.connection_error.inc(),
        }
    }

    /// Counts the signature algorithm the peer signed the handshake with (`ssl.sigalgs.*`).
    pub fn sigalg(&self, scheme: rustls::SignatureScheme) {
        use rustls::SignatureScheme as S;
        let name = match scheme {
            S::ECDSA_NISTP256_SHA256 => "ecdsa_secp256r1_sha256",
            S::ECDSA_NISTP384_SHA384 => "ecdsa_secp384r1_sha384",
            S::ECDSA_NISTP521_SHA512 => "ecdsa_secp521r1_sha512",
            S::RSA_PSS_SHA256 => "rsa_pss_rsae_sha256",
            S::RSA_PSS_SHA384 => "rsa_pss_rsae_sha384",
            S::RSA_PSS_SHA512 => "rsa_pss_rsae_sha512",
            S::RSA_PKCS1_SHA256 => "rsa_pkcs1_sha256",
            S::RSA_PKCS1_SHA384 => "rsa_pkcs1_sha384",
            S::RSA_PKCS1_SHA512 => "rsa_pkcs1_sha512",
            S::ED25519 => "ed25519",
            _ => return,
        };
        self.store
            .counter(&format!("{}sigalgs.{name}", self.prefix))
            .inc();
    }
}

/// Why an upstream handshake failed, as Envoy reports it in
/// `%UPSTREAM_TRANSPORT_FAILURE_REASON%` (BoringSSL's error strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server's certificate did not verify: with the SANs it had when they matched no
    /// matcher.
    VerifyFailed(Option<Arc<str>>),
    /// Anything else (alerts, protocol errors, a peer speaking no TLS).
    Handshake,
}

impl TlsFailure {
    pub fn of(e: &std::io::Error) -> TlsFailure {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
                TlsFailure::VerifyFailed(
                    o.0.downcast_ref::<SanMismatch>()
                        .map(|m| Arc::from(m.0.join(", "))),
                )
            }
            Some(rustls::Error::InvalidCertificate(_)) => TlsFailure::VerifyFailed(None),
            _ => TlsFailure::Handshake,
        }
    }

    /// Envoy's words (BoringSSL's error queue, spaces made underscores).
    pub fn reason(&self) -> String {
        let text = match self {
            TlsFailure::VerifyFailed(Some(sans)) => format!("TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:verify cert failed: SAN matcher, certificate SANs are [{sans}]:TLS_error_end"),
            TlsFailure::VerifyFailed(None) => "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end".to_string(),
            TlsFailure::Handshake => "TLS_error:|268435612:SSL routines:OPENSSL_internal:HTTP_REQUEST:TLS_error_end".to_string(),
        };
        text.replace(' ', "_")
    }
}

/// The cipher's name as Envoy (BoringSSL) reports it.
pub fn cipher_name(c: rustls::SupportedCipherSuite) -> &'static str {
    use rustls::CipherSuite as C;
    match c.suite() {
        C::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        C::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        C::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        _ => "unknown",
    }
}

/// The error a SAN mismatch is reported with.
pub fn san_mismatch(cert: &rustls_pki_types::CertificateDer<'_>) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(SanMismatch(validation::san_values(cert))),
    )))
}

/// Checks the peer's handshake signature (TLS 1.2 or 1.3) and counts its algorithm
/// (`ssl.sigalgs.*`).
pub fn verify_signature(
    provider: &rustls::crypto::CryptoProvider,
    stats: &SslStats,
    message: &[u8],
    cert: &rustls_pki_types::CertificateDer<'_>,
    dss: &rustls::DigitallySignedStruct,
    tls13: bool,
) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
    let algs = &provider.signature_verification_algorithms;
    let ok = if tls13 {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)?
    } else {
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)?
    };
    stats.sigalg(dss.scheme);
    Ok(ok)
}

/// Picks the first certificate whose key can sign with one of the peer's schemes (how Envoy
/// chooses between, say, an RSA and an ECDSA certificate).
pub fn pick_certificate(
    certs: &[Arc<rustls::sign::CertifiedKey>],
    schemes: &[rustls::SignatureScheme],
) -> Option<Arc<rustls::sign::CertifiedKey>> {
    certs
        .iter()
        .find(|c| c.key.choose_scheme(schemes).is_some())
        .or_else(|| certs.first())
        .cloned()
}
