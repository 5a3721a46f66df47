//! Istio's `istio_authn` network filter (`io.istio.network.authn.Config`): once the TLS
//! handshake is done, the first `spiffe://` URI SAN of the peer's certificate becomes filter
//! state `io.istio.peer_principal` and that of the local certificate
//! `io.istio.local_principal` (read-only; shared with upstream once, and so pooled apart, when
//! the config says `shared`, as Istio's tunnel listeners do), which the RBAC filters Istio
//! renders for AuthorizationPolicy principals match.

use petrel_filters::filter_state::{FilterState, Object, SharedWithUpstream};
use xds_client::pb::google::protobuf::Any;

use crate::config::{invalid, ConfigError};

pub const TYPE_URL: &str = "type.googleapis.com/io.istio.network.authn.Config";
pub const PEER_PRINCIPAL: &str = "io.istio.peer_principal";
pub const LOCAL_PRINCIPAL: &str = "io.istio.local_principal";

/// `io.istio.network.authn.Config`.
#[derive(Clone, PartialEq, prost::Message)]
struct Config {
    #[prost(bool, tag = "1")]
    shared: bool,
}

impl prost::Name for Config {
    const NAME: &'static str = "Config";
    const PACKAGE: &'static str = "io.istio.network.authn";
}

/// The config's `shared` (a `TypedStruct` is checked against the message, as Envoy does).
pub fn compile(any: &Any, path: &str) -> Result<bool, ConfigError> {
    let cfg: Config = xds_client::TypeRegistry::global()
        .unpack(any)
        .map_err(|e| invalid(path, e.to_string()))?;
    Ok(cfg.shared)
}

fn principal(key: &str, uri_sans: &[String], shared: bool) -> Option<Object> {
    let san = uri_sans.iter().find(|s| s.starts_with("spiffe://"))?;
    Some(Object {
        key: key.to_string(),
        plain: san.clone(),
        proto: None,
        read_only: true,
        shared: if shared {
            SharedWithUpstream::Once
        } else {
            SharedWithUpstream::None
        },
        hashable: true,
    })
}

/// Sets the principals when the peer presented a certificate.
pub fn populate(tls: Option<&crate::tls::info::TlsInfo>, shared: bool, state: &mut FilterState) {
    let Some(tls) = tls else { return };
    let Some(peer) = &tls.peer else { return };
    if let Some(o) = principal(PEER_PRINCIPAL, &peer.uri_sans, shared) {
        state.set(o);
    }
    if let Some(o) = tls
        .local
        .as_ref()
        .and_then(|l| principal(LOCAL_PRINCIPAL, &l.uri_sans, shared))
    {
        state.set(o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn first_spiffe_san_is_the_principal() {
        let sans = vec![
            "https://example.test/x".to_string(),
            "spiffe://cluster.local/ns/a/sa/b".to_string(),
            "spiffe://cluster.local/ns/a/sa/c".to_string(),
        ];
        let o = principal(PEER_PRINCIPAL, &sans, false).expect("principal");
        assert_eq!(o.plain, "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(o.shared, SharedWithUpstream::None);
        assert!(principal(PEER_PRINCIPAL, &sans[..1], true).is_none());
    }

    #[test]
    fn config_has_only_shared() {
        let any = |v: serde_json::Value| {
            xds_client::TypeRegistry::global()
                .from_json::<Any>(
                    &serde_json::json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                        "type_url": TYPE_URL, "value": v}),
                    false,
                )
                .unwrap()
        };
        assert_eq!(compile(&any(serde_json::json!({})), "f"), Ok(false));
        assert_eq!(
            compile(&any(serde_json::json!({"shared": true})), "f"),
            Ok(true)
        );
        assert!(compile(&any(serde_json::json!({"other": 1})), "f").is_err());
        assert!(compile(&any(serde_json::json!({"shared": "maybe"})), "f").is_err());
        let binary = Any {
            type_url: TYPE_URL.into(),
            value: Config { shared: true }.encode_to_vec(),
        };
        assert_eq!(compile(&binary, "f"), Ok(true));
    }
}
