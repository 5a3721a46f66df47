//! `UpstreamTlsContext`: the TLS a cluster's connections originate. As in Envoy, the server's
//! chain is verified only against a configured `trusted_ca`, and its name only through the
//! validation context's SAN matchers (never against `sni`).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;

use super::context::CommonTls;
use super::SslStats;
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::Store;

/// What an upstream connection carries: the ALPN fallback Envoy's pools use when the context
/// names no protocols.
#[derive(Debug, Clone, PartialEq)]
pub enum Alpn {
    Http1,
    Http2,
    /// A TCP proxy connection: no fallback.
    None,
    /// These protocols instead of the context's (Istio's `istio.alpn`).
    Override(Arc<[Vec<u8>]>),
}

/// A compiled upstream context.
#[derive(Debug)]
pub struct ClientTls {
    h1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
    raw: Arc<rustls::ClientConfig>,
    sni: Option<ServerName<'static>>,
    common: Arc<CommonTls>,
    pub stats: SslStats,
    factory: super::SocketFactoryStats,
}

#[derive(Debug)]
struct ServerVerifier {
    common: Arc<CommonTls>,
    provider: Arc<CryptoProvider>,
    stats: SslStats,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(source) = &self.common.validation else {
            return Ok(ServerCertVerified::assertion());
        };
        let v = source
            .current()
            .ok_or_else(|| rustls::Error::General("validation context not available".into()))?;
        v.verify_peer(end_entity, |roots| {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )
        })?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        super::verify_signature(&self.provider, &self.stats, message, cert, dss, false)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        super::verify_signature(&self.provider, &self.stats, message, cert, dss, true)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct ClientCertificates(Arc<CommonTls>);

impl ResolvesClientCert for ClientCertificates {
    fn resolve(&self, _hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        super::pick_certificate(&self.0.current_certificates(), schemes)
    }
    fn has_certs(&self) -> bool {
        !self.0.certificates.is_empty()
    }
}

impl ClientTls {
    /// Whether every secret the context names has arrived (else its cluster warms).
    pub fn ready(&self) -> bool {
        self.common.ready()
    }

    /// `scope` is the cluster's stat prefix (`cluster.<name>.`).
    pub fn compile(
        ctx: &UpstreamTlsContext,
        store: &Store,
        scope: &str,
        path: &str,
    ) -> Result<ClientTls, ConfigError> {
        let mut rest = ctx.clone();
        let common = Arc::new(CommonTls::compile_for(
            &rest.common_tls_context.take().unwrap_or_default(),
            super::context::Side::Client,
            &format!("{path}.common_tls_context"),
        )?);
        let sni_text = std::mem::take(&mut rest.sni);
        if rest.allow_renegotiation {
            return Err(invalid(
                format!("{path}.allow_renegotiation"),
                "renegotiation is not supported by Petrel (rustls never renegotiates)",
            ));
        }
        let session_keys = rest.max_session_keys.take().map_or(1, |v| v.value as usize);
        reject_unhandled(&rest, path)?;
        if let Some(super::context::ValidationSource::Static(v)) = &common.validation {
            if !v.verifies_chain() && !v.sans.is_empty() {
                return Err(invalid(
                    format!("{path}.common_tls_context.validation_context"),
                    "SAN-based verification of peer certificates without trusted CA is insecure and not allowed",
                ));
            }
        }
        let sni = if sni_text.is_empty() {
            None
        } else {
            Some(
                ServerName::try_from(sni_text.clone())
                    .map_err(|_| invalid(format!("{path}.sni"), "invalid server name"))?,
            )
        };
        let stats = SslStats::new(store, scope);
        let verifier = Arc::new(ServerVerifier {
            common: common.clone(),
            provider: common.provider.clone(),
            stats: stats.clone(),
        });
        let resumption = if session_keys == 0 {
            rustls::client::Resumption::disabled()
        } else {
            rustls::client::Resumption::in_memory_sessions(session_keys)
        };
        let connector = |fallback: &[&[u8]]| -> Result<Arc<rustls::ClientConfig>, ConfigError> {
            let mut config = rustls::ClientConfig::builder_with_provider(common.provider.clone())
                .with_protocol_versions(&common.versions)
                .map_err(|e| invalid(path, e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_cert_resolver(Arc::new(ClientCertificates(common.clone())));
            config.alpn_protocols = if common.alpn.is_empty() {
                fallback.iter().map(|p| p.to_vec()).collect()
            } else {
                common.alpn.clone()
            };
            config.enable_sni = sni.is_some();
            config.resumption = resumption.clone();
            Ok(Arc::new(config))
        };
        let factory =
            super::SocketFactoryStats::new(store, &format!("{scope}client_ssl_socket_factory."));
        common.watch_updates(&factory.ssl_context_update_by_sds);
        Ok(ClientTls {
            h1: connector(&[b"http/1.1"])?,
            h2: connector(&[b"h2"])?,
            raw: connector(&[])?,
            sni,
            common,
            stats,
            factory,
        })
    }

    /// Runs the handshake over a connected stream.
    pub async fn connect<S>(
        &self,
        stream: S,
        alpn: Alpn,
        peer: std::net::IpAddr,
    ) -> std::io::Result<(
        tokio_rustls::client::TlsStream<S>,
        Arc<super::info::TlsInfo>,
    )>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        if !self.common.secrets_present() {
            self.factory.upstream_context_secrets_not_ready.inc();
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "Secret is not supplied by SDS",
            ));
        }
        let connector = tokio_rustls::TlsConnector::from(match alpn {
            Alpn::Http1 => self.h1.clone(),
            Alpn::Http2 => self.h2.clone(),
            Alpn::None => self.raw.clone(),
            Alpn::Override(list) => {
                let mut c = (*self.raw).clone();
                c.alpn_protocols = list.to_vec();
                Arc::new(c)
            }
        });
        // Without `sni` no name is sent (`enable_sni` is off); rustls still wants one.
        let name = self
            .sni
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(peer.into()));
        match connector.connect(name, stream).await {
            Ok(s) => {
                let conn = s.get_ref().1;
                self.stats.handshake(conn);
                // The client certificate offered (the first, when there are several).
                let local = self
                    .common
                    .current_certificates()
                    .first()
                    .and_then(|c| c.cert.first().cloned());
                let info = super::info::TlsInfo::of(conn, local.as_ref());
                Ok((s, Arc::new(info)))
            }
            Err(e) => {
                self.stats.failure(&e);
                Err(e)
            }
        }
    }
}
