//! The network filters ahead of a filter chain's terminal one (`http_connection_manager` or
//! `tcp_proxy`), run in order around the transport handshake: `set_filter_state` and
//! `istio_authn` write the connection's filter state, then the RBAC filters decide on it.

pub mod istio_authn;
pub mod metadata_exchange;
pub mod set_filter_state;

use std::sync::Arc;

use petrel_filters::filter_state::FilterState;
use xds_client::pb::google::protobuf::Any;

use crate::config::ConfigError;
use crate::observe::stats::Store;

/// One non-terminal network filter.
#[derive(Debug)]
pub enum NetworkFilter {
    Rbac(Arc<crate::rbac::Rules>),
    /// `shared`: the principals go with upstream connections (and pool them apart).
    IstioAuthn {
        shared: bool,
    },
    SetFilterState(Arc<set_filter_state::SetFilterState>),
    /// Istio's stats filter: reports the connection when its peer is known and when it closes.
    IstioStats(Arc<crate::observe::istio_stats::IstioStats>),
    /// Istio's TCP metadata exchange with the downstream peer.
    MetadataExchange(Arc<metadata_exchange::MetadataExchange>),
}

/// Compiles a filter by its type URL; None when it is not one of these.
pub fn compile(
    url: &str,
    any: &Any,
    env: &crate::listener::ListenerEnv<'_>,
    direction: crate::listener::TrafficDirection,
    store: &Store,
    path: &str,
) -> Result<Option<NetworkFilter>, ConfigError> {
    Ok(Some(match url {
        crate::rbac::network::TYPE_URL => {
            NetworkFilter::Rbac(Arc::new(crate::rbac::network::compile(any, store, path)?))
        }
        istio_authn::TYPE_URL => NetworkFilter::IstioAuthn {
            shared: istio_authn::compile(any, path)?,
        },
        set_filter_state::TYPE_URL => {
            NetworkFilter::SetFilterState(Arc::new(set_filter_state::compile(any, path)?))
        }
        metadata_exchange::TYPE_URL => NetworkFilter::MetadataExchange(Arc::new(
            metadata_exchange::MetadataExchange::compile(any, env.node, store, path)?,
        )),
        crate::observe::istio_stats::TYPE_URL => {
            NetworkFilter::IstioStats(Arc::new(crate::observe::istio_stats::IstioStats::compile(
                any, env.node, direction, store, path,
            )?))
        }
        _ => return Ok(None),
    }))
}

/// What the filters may read of the connection when they run.
pub struct Connection<'a> {
    pub remote: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub requested_server_name: &'a str,
    pub start_time: std::time::SystemTime,
    /// After the handshake, the TLS Petrel terminated.
    pub tls: Option<&'a crate::tls::info::TlsInfo>,
}

/// Runs what the filters do when the connection is accepted (before any handshake).
pub fn on_new_connection(
    filters: &[NetworkFilter],
    conn: &Connection<'_>,
    state: &mut FilterState,
) {
    for f in filters {
        if let NetworkFilter::SetFilterState(s) = f {
            s.on_new_connection(conn, state);
        }
    }
}

/// Runs what the filters do once the transport is up (after the TLS handshake, or at once on
/// a plaintext connection).
pub fn on_connected(filters: &[NetworkFilter], conn: &Connection<'_>, state: &mut FilterState) {
    for f in filters {
        match f {
            NetworkFilter::IstioAuthn { shared } => istio_authn::populate(conn.tls, *shared, state),
            NetworkFilter::SetFilterState(s) => s.on_downstream_tls_handshake(conn, state),
            NetworkFilter::Rbac(_)
            | NetworkFilter::IstioStats(_)
            | NetworkFilter::MetadataExchange(_) => {}
        }
    }
}

/// The Istio stats filters, in order.
pub fn istio_stats(
    filters: &[NetworkFilter],
) -> impl Iterator<Item = &crate::observe::istio_stats::IstioStats> {
    filters.iter().filter_map(|f| match f {
        NetworkFilter::IstioStats(s) => Some(s.as_ref()),
        _ => None,
    })
}

/// The chain's TCP metadata exchange with the downstream peer (the first, when several).
pub fn metadata_exchange(
    filters: &[NetworkFilter],
) -> Option<&metadata_exchange::MetadataExchange> {
    filters.iter().find_map(|f| match f {
        NetworkFilter::MetadataExchange(m) => Some(m.as_ref()),
        _ => None,
    })
}

/// The RBAC filters, in order.
pub fn rbac(filters: &[NetworkFilter]) -> impl Iterator<Item = &crate::rbac::Rules> {
    filters.iter().filter_map(|f| match f {
        NetworkFilter::Rbac(r) => Some(r.as_ref()),
        _ => None,
    })
}
