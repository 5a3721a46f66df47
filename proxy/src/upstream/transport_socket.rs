//! A cluster's transport sockets: `transport_socket` for every host, or the first of
//! `transport_socket_matches` whose `match` the host's `envoy.transport_socket_match` metadata
//! carries (Istio marks mesh endpoints `tlsMode: istio` and gives them its mTLS context).

use std::sync::Arc;

use xds_client::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use xds_client::pb::envoy::config::core::v3::TransportSocket;
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;

use super::cluster::Host;
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::Store;
use crate::tls::client::ClientTls;

/// `None` is plaintext.
type Socket = Option<Arc<ClientTls>>;

#[derive(Debug, Default)]
pub struct TransportSockets {
    default: Socket,
    /// `(match, socket)` in configuration order.
    matches: Vec<(serde_json::Map<String, serde_json::Value>, Socket)>,
}

/// The metadata key endpoints carry their match criteria under.
const MATCH_KEY: &str = "envoy.transport_socket_match";

fn compile_socket(
    ts: Option<&TransportSocket>,
    store: &Store,
    scope: &str,
    path: &str,
) -> Result<Socket, ConfigError> {
    let Some(ctx) = crate::config::transport_socket::<UpstreamTlsContext>(ts, path)? else {
        return Ok(None);
    };
    Ok(Some(Arc::new(ClientTls::compile(
        &ctx,
        store,
        scope,
        &format!("{path}.typed_config"),
    )?)))
}

impl TransportSockets {
    /// `scope` is the cluster's stat prefix.
    pub fn compile(
        default: Option<&TransportSocket>,
        matches: &[TransportSocketMatch],
        store: &Store,
        scope: &str,
        path: &str,
    ) -> Result<TransportSockets, ConfigError> {
        let default = compile_socket(default, store, scope, &format!("{path}.transport_socket"))?;
        let mut out = Vec::with_capacity(matches.len());
        for (i, m) in matches.iter().enumerate() {
            let mp = format!("{path}.transport_socket_matches[{i}]");
            let mut rest = m.clone();
            if rest.name.is_empty() {
                return Err(invalid(
                    format!("{mp}.name"),
                    "value length must be at least 1 characters",
                ));
            }
            rest.name.clear();
            let criteria = rest
                .r#match
                .take()
                .map(xds_client::type_registry::struct_to_json)
                .and_then(|v| match v {
                    serde_json::Value::Object(m) => Some(m),
                    _ => None,
                })
                .unwrap_or_default();
            let socket = compile_socket(
                rest.transport_socket.take().as_ref(),
                store,
                scope,
                &format!("{mp}.transport_socket"),
            )?;
            reject_unhandled(&rest, &mp)?;
            out.push((criteria, socket));
        }
        Ok(TransportSockets {
            default,
            matches: out,
        })
    }

    /// The socket a connection to `host` uses.
    pub fn for_host(&self, host: &Host) -> Option<&Arc<ClientTls>> {
        if self.matches.is_empty() {
            return self.default.as_ref();
        }
        let labels = host
            .metadata
            .as_ref()
            .and_then(|m| m.get(MATCH_KEY))
            .and_then(|m| m.as_object());
        let chosen = self.matches.iter().find(|(criteria, _)| {
            criteria
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        });
        match chosen {
            Some((_, socket)) => socket.as_ref(),
            None => self.default.as_ref(),
        }
    }

    /// Whether every SDS secret the sockets name has arrived.
    pub fn ready(&self) -> bool {
        self.default
            .iter()
            .chain(self.matches.iter().filter_map(|(_, s)| s.as_ref()))
            .all(|t| t.ready())
    }
}
