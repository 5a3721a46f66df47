//! `x-forwarded-client-cert` (XFCC): `forward_client_cert_details` decides what happens to the
//! header a client sent, `set_current_client_cert_details` what Petrel adds about the client
//! certificate of an mTLS connection — in Envoy's syntax (`By=…;Hash=…;Subject="…";URI=…`).

use http::{HeaderMap, HeaderName, HeaderValue};
use xds_client::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::{
    ForwardClientCertDetails, SetCurrentClientCertDetails,
};

use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::tls::info::TlsInfo;

const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Forward {
    /// Drop the header (the default).
    #[default]
    Sanitize,
    /// Keep it as the client sent it (mTLS connections only).
    ForwardOnly,
    /// Keep it and append this connection's details (mTLS only).
    AppendForward,
    /// Replace it with this connection's details (mTLS only).
    SanitizeSet,
    /// Keep it whatever the connection.
    AlwaysForwardOnly,
}

/// Which details are set (`By` and `Hash` always are).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Details {
    pub subject: bool,
    pub cert: bool,
    pub chain: bool,
    pub dns: bool,
    pub uri: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClientCertPolicy {
    pub forward: Forward,
    pub details: Details,
}

impl ClientCertPolicy {
    pub fn compile(
        forward: i32,
        set: Option<&SetCurrentClientCertDetails>,
        path: &str,
    ) -> Result<ClientCertPolicy, ConfigError> {
        let forward = match ForwardClientCertDetails::try_from(forward) {
            Ok(ForwardClientCertDetails::Sanitize) => Forward::Sanitize,
            Ok(ForwardClientCertDetails::ForwardOnly) => Forward::ForwardOnly,
            Ok(ForwardClientCertDetails::AppendForward) => Forward::AppendForward,
            Ok(ForwardClientCertDetails::SanitizeSet) => Forward::SanitizeSet,
            Ok(ForwardClientCertDetails::AlwaysForwardOnly) => Forward::AlwaysForwardOnly,
            Err(_) => {
                return Err(invalid(
                    format!("{path}.forward_client_cert_details"),
                    "unknown value",
                ))
            }
        };
        let details = match set {
            None => Details::default(),
            Some(s) => {
                let mut rest = *s;
                let d = Details {
                    subject: rest.subject.take().is_some_and(|b| b.value),
                    cert: std::mem::take(&mut rest.cert),
                    chain: std::mem::take(&mut rest.chain),
                    dns: std::mem::take(&mut rest.dns),
                    uri: std::mem::take(&mut rest.uri),
                };
                reject_unhandled(&rest, &format!("{path}.set_current_client_cert_details"))?;
                d
            }
        };
        Ok(ClientCertPolicy { forward, details })
    }

    /// Applies the policy to a request's headers; `tls` is the connection's, when Petrel
    /// terminated TLS with a client certificate.
    pub fn apply(&self, headers: &mut HeaderMap, tls: Option<&TlsInfo>) {
        let mtls = tls.filter(|t| t.peer.is_some());
        let Some(t) = mtls else {
            if self.forward != Forward::AlwaysForwardOnly {
                headers.remove(XFCC);
            }
            return;
        };
        match self.forward {
            Forward::Sanitize => {
                headers.remove(XFCC);
            }
            Forward::ForwardOnly | Forward::AlwaysForwardOnly => {}
            Forward::AppendForward | Forward::SanitizeSet => {
                let mine = self.element(t);
                let value = match headers.get(&XFCC).and_then(|v| v.to_str().ok()) {
                    Some(prev) if self.forward == Forward::AppendForward && !prev.is_empty() => {
                        format!("{prev},{mine}")
                    }
                    _ => mine,
                };
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(XFCC, v);
                }
            }
        }
    }

    /// This connection's element, fields in Envoy's order.
    fn element(&self, t: &TlsInfo) -> String {
        let mut fields: Vec<String> = Vec::new();
        if let Some(local) = &t.local {
            for u in &local.uri_sans {
                fields.push(format!("By={u}"));
            }
        }
        let Some(peer) = &t.peer else {
            return fields.join(";");
        };
        fields.push(format!("Hash={}", peer.fingerprint_256));
        if self.details.cert {
            fields.push(format!(
                "Cert=\"{}\"",
                url_encoded_pem(&t.peer_chain[..1.min(t.peer_chain.len())])
            ));
        }
        if self.details.chain {
            fields.push(format!("Chain=\"{}\"", url_encoded_pem(&t.peer_chain)));
        }
        if self.details.subject {
            fields.push(format!("Subject=\"{}\"", peer.subject));
        }
        if self.details.uri {
            // Envoy writes the first URI SAN (an empty `URI=` when there is none).
            fields.push(format!(
                "URI={}",
                peer.uri_sans.first().map(String::as_str).unwrap_or("")
            ));
        }
        if self.details.dns {
            for d in &peer.dns_sans {
                fields.push(format!("DNS={d}"));
            }
        }
        fields.join(";")
    }
}

/// Certificates as URL-encoded PEM (Envoy's `Cert=` and `Chain=` values).
fn url_encoded_pem(ders: &[Vec<u8>]) -> String {
    use std::fmt::Write;
    let mut pem = String::new();
    for d in ders {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64(d);
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or(""));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    let mut out = String::new();
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
