//! `DownstreamTlsContext`: the TLS a filter chain terminates.

use std::sync::Arc;

use bytes::Bytes;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpStream;
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;

use super::context::{CommonTls, ValidationSource};
use super::validation::Validation;
use super::SslStats;
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::listener::stream::{Prefixed, TlsStream};
use crate::observe::stats::Store;
use arc_swap::ArcSwapOption;

/// A compiled downstream context.
#[derive(Debug)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    /// The same with no ALPN, for clients offering none of `config`'s protocols.
    config_without_alpn: Arc<rustls::ServerConfig>,
    common: Arc<CommonTls>,
    pub stats: SslStats,
    factory: super::SocketFactoryStats,
}

/// The context's certificates as they stand (SDS ones read at each handshake).
#[derive(Debug)]
struct Certificates(Arc<CommonTls>);

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        super::pick_certificate(&self.0.current_certificates(), hello.signature_schemes())
    }
}

/// Web PKI chain checks against the validation context's CA as it stands, then its SAN
/// matchers.
#[derive(Debug)]
struct PeerVerifier {
    common: Arc<CommonTls>,
    require: bool,
    /// The chain verifier for the CA it was built from (by address).
    chain: ArcSwapOption<(usize, Arc<dyn ClientCertVerifier>)>,
    stats: SslStats,
}

impl PeerVerifier {
    fn validation(&self) -> Result<Arc<Validation>, rustls::Error> {
        self.common
            .validation
            .as_ref()
            .and_then(|v| v.current())
            .ok_or_else(|| rustls::Error::General("validation context not available".into()))
    }

    /// The chain verifier for these CAs (the last one built is kept).
    fn chain(
        &self,
        roots: Arc<rustls::RootCertStore>,
    ) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let key = Arc::as_ptr(&roots) as usize;
        if let Some(c) = self.chain.load().as_ref() {
            if c.0 == key {
                return Ok(c.1.clone());
            }
        }
        let mut b =
            WebPkiClientVerifier::builder_with_provider(roots, self.common.provider.clone());
        if !self.require {
            b = b.allow_unauthenticated();
        }
        let chain = b
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.chain.store(Some(Arc::new((key, chain.clone()))));
        Ok(chain)
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        self.require
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Envoy (BoringSSL) sends no CA names unless asked to.
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.validation()?.verify_peer(end_entity, |roots| {
            self.chain(roots.clone())?
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ())
        })?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        super::verify_signature(
            &self.common.provider,
            &self.stats,
            message,
            cert,
            dss,
            false,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        super::verify_signature(&self.common.provider, &self.stats, message, cert, dss, true)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.common
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerTls {
    /// `scope` is the listener's stat prefix (`listener.<address>.`).
    pub fn compile(
        ctx: &DownstreamTlsContext,
        store: &Store,
        scope: &str,
        path: &str,
    ) -> Result<ServerTls, ConfigError> {
        let mut rest = ctx.clone();
        let common = Arc::new(CommonTls::compile_for(
            &rest.common_tls_context.take().unwrap_or_default(),
            super::context::Side::Server,
            &format!("{path}.common_tls_context"),
        )?);
        let require = rest
            .require_client_certificate
            .take()
            .is_some_and(|b| b.value);
        reject_unhandled(&rest, path)?;
        if common.certificates.is_empty() {
            return Err(invalid(
                format!("{path}.common_tls_context"),
                "Server TlsCertificates must have a certificate specified",
            ));
        }
        let builder = rustls::ServerConfig::builder_with_provider(common.provider.clone())
            .with_protocol_versions(&common.versions)
            .map_err(|e| invalid(path, e.to_string()))?;
        let stats = SslStats::new(store, scope);
        let builder = match &common.validation {
            Some(ValidationSource::Static(v)) if !v.verifies_chain() => {
                return Err(invalid(
                    format!("{path}.common_tls_context.validation_context"),
                    "a validation context without trusted_ca cannot verify client certificates (Petrel needs trusted_ca)",
                ));
            }
            Some(_) => builder.with_client_cert_verifier(Arc::new(PeerVerifier {
                common: common.clone(),
                require,
                chain: ArcSwapOption::empty(),
                stats: stats.clone(),
            })),
            None if require => {
                return Err(invalid(
                    path,
                    "require_client_certificate needs a validation context with trusted_ca",
                ))
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Certificates(common.clone())));
        config.alpn_protocols = common.alpn.clone();
        let factory =
            super::SocketFactoryStats::new(store, &format!("{scope}server_ssl_socket_factory."));
        common.watch_updates(&factory.ssl_context_update_by_sds);
        let mut without_alpn = config.clone();
        without_alpn.alpn_protocols.clear();
        Ok(ServerTls {
            config: Arc::new(config),
            config_without_alpn: Arc::new(without_alpn),
            common,
            stats,
            factory,
        })
    }

    /// The configuration for a ClientHello offering `offered`: Envoy (BoringSSL) goes on
    /// without ALPN when the client offers no protocol this side has, where rustls would
    /// refuse the handshake (Istio's clients offer `istio-http/1.1` to contexts with `h2,
    /// http/1.1`).
    fn config_for<'a>(
        &self,
        offered: Option<impl Iterator<Item = &'a [u8]>>,
    ) -> Arc<rustls::ServerConfig> {
        let mut offered = match offered {
            Some(o) if !self.config.alpn_protocols.is_empty() => o,
            _ => return self.config.clone(),
        };
        if offered.any(|p| self.config.alpn_protocols.iter().any(|ours| ours == p)) {
            self.config.clone()
        } else {
            self.config_without_alpn.clone()
        }
    }

    /// Whether every secret the context names has arrived (else its listener warms).
    pub fn ready(&self) -> bool {
        self.common.ready()
    }

    /// Runs the handshake on a connection whose first bytes (the ClientHello the listener
    /// filters read) are in `prefix`.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        prefix: Bytes,
    ) -> std::io::Result<(TlsStream, Arc<super::info::TlsInfo>)> {
        // Secrets that never came (their wait ran out): the connection is closed at once.
        if !self.common.secrets_present() {
            self.factory.downstream_context_secrets_not_ready.inc();
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "Secret is not supplied by SDS",
            ));
        }
        // Bytes that are not a TLS handshake record (a plaintext request) are refused without an
        // alert, as BoringSSL does: the peer sees the connection close.
        let mut first = [0u8; 1];
        let starts = match prefix.first() {
            Some(b) => Some(*b),
            None => tcp
                .peek(&mut first)
                .await
                .ok()
                .filter(|n| *n > 0)
                .map(|_| first[0]),
        };
        if starts != Some(0x16) {
            if starts.is_some() {
                self.stats.counters.connection_error.inc();
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a TLS handshake",
            ));
        }
        let start = tokio_rustls::LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            Prefixed::new(tcp, prefix),
        )
        .await;
        let handshake = match start {
            Ok(start) => {
                let config = self.config_for(start.client_hello().alpn());
                start.into_stream(config).await
            }
            Err(e) => Err(e),
        };
        match handshake {
            Ok(s) => {
                let conn = s.get_ref().1;
                self.stats.handshake(conn);
                if conn.peer_certificates().is_none() {
                    self.stats.counters.no_certificate.inc();
                }
                // The certificate this side presented (the first, when there are several).
                let local = self
                    .common
                    .current_certificates()
                    .first()
                    .and_then(|c| c.cert.first().cloned());
                let info = Arc::new(super::info::TlsInfo::of(conn, local.as_ref()));
                Ok((s, info))
            }
            Err(e) => {
                self.stats.failure(&e);
                Err(e)
            }
        }
    }
}
