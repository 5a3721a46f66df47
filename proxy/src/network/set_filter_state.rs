//! `envoy.filters.network.set_filter_state`: values formatted from the connection become filter
//! state objects, when the connection is accepted (`on_new_connection`) or once its TLS
//! handshake is done (`on_downstream_tls_handshake`). Petrel has the generic string object
//! (`envoy.string`); the well-known keys that steer other extensions are refused by name.

use petrel_filters::filter_state::{FilterState, Object, SharedWithUpstream};
use xds_client::pb::envoy::extensions::filters::common::set_filter_state::v3::{
    filter_state_value, FilterStateValue,
};
use xds_client::pb::envoy::extensions::filters::network::set_filter_state::v3::Config;
use xds_client::pb::google::protobuf::Any;

use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::formatter::{StreamValues, SubstitutionFormat};

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config";

/// The generic string object factory.
const STRING_FACTORY: &str = "envoy.string";

/// Envoy's object factories other than `envoy.string`: each steers another extension
/// (upstream SNI, ALPN, tcp_proxy's cluster, original destination, …).
const OTHER_FACTORIES: &[&str] = &[
    "envoy.network.upstream_server_name",
    "envoy.network.application_protocols",
    "envoy.network.upstream_subject_alt_names",
    "envoy.tcp_proxy.cluster",
    "envoy.udp_proxy.cluster",
    "envoy.network.transport_socket.original_dst_address",
    "envoy.filters.listener.original_dst.local_ip",
    "envoy.filters.listener.original_dst.remote_ip",
    "envoy.upstream.dynamic_host",
    "envoy.upstream.dynamic_port",
    "envoy.tcp_proxy.disable_tunneling",
    "envoy.network.upstream_bind_override.network_namespace",
    "envoy.network.network_namespace",
    "envoy.network.ip",
    "envoy.hash_key",
    "envoy.tcp_proxy.per_connection_idle_timeout_ms",
];

#[derive(Debug)]
pub struct Value {
    key: String,
    format: SubstitutionFormat,
    read_only: bool,
    shared: SharedWithUpstream,
    skip_if_empty: bool,
}

#[derive(Debug)]
pub struct SetFilterState {
    on_new_connection: Vec<Value>,
    on_downstream_tls_handshake: Vec<Value>,
}

fn compile_value(v: &FilterStateValue, path: &str) -> Result<Value, ConfigError> {
    #[allow(deprecated)]
    let mut rest = v.clone();
    let key = match rest.key.take() {
        Some(filter_state_value::Key::ObjectKey(k)) if !k.is_empty() => k,
        _ => {
            return Err(invalid(
                format!("{path}.object_key"),
                "value length must be at least 1 characters",
            ))
        }
    };
    let factory_key = std::mem::take(&mut rest.factory_key);
    let factory = if factory_key.is_empty() {
        key.as_str()
    } else {
        factory_key.as_str()
    };
    if factory != STRING_FACTORY {
        if OTHER_FACTORIES.contains(&factory) {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: format!("object factory '{factory}' (Petrel has only '{STRING_FACTORY}')"),
            });
        }
        return Err(invalid(
            path,
            format!("'{factory}' does not have an object factory"),
        ));
    }
    let format = match rest.value.take() {
        Some(filter_state_value::Value::FormatString(f)) => {
            if matches!(
                f.format,
                Some(xds_client::pb::envoy::config::core::v3::substitution_format_string::Format::JsonFormat(_))
            ) {
                return Err(ConfigError::Unsupported {
                    path: format!("{path}.format_string"),
                    fields: "'json_format'".into(),
                });
            }
            SubstitutionFormat::compile(&f, &format!("{path}.format_string"))?
        }
        None => return Err(invalid(path, "value is required")),
    };
    #[allow(deprecated)]
    let read_only = std::mem::take(&mut rest.read_only);
    let shared = match std::mem::take(&mut rest.shared_with_upstream) {
        0 => SharedWithUpstream::None,
        1 => SharedWithUpstream::Once,
        2 => SharedWithUpstream::Transitive,
        _ => {
            return Err(invalid(
                format!("{path}.shared_with_upstream"),
                "unknown value",
            ))
        }
    };
    let skip_if_empty = std::mem::take(&mut rest.skip_if_empty);
    reject_unhandled(&rest, path)?;
    Ok(Value {
        key,
        format,
        read_only,
        shared,
        skip_if_empty,
    })
}

pub fn compile(any: &Any, path: &str) -> Result<SetFilterState, ConfigError> {
    let cfg: Config = xds_client::TypeRegistry::global()
        .unpack(any)
        .map_err(|e| invalid(path, e.to_string()))?;
    let mut rest = cfg.clone();
    let list = |values: Vec<FilterStateValue>, field: &str| {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| compile_value(v, &format!("{path}.{field}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
    };
    let on_new_connection = list(
        std::mem::take(&mut rest.on_new_connection),
        "on_new_connection",
    )?;
    let on_downstream_tls_handshake = list(
        std::mem::take(&mut rest.on_downstream_tls_handshake),
        "on_downstream_tls_handshake",
    )?;
    if !rest.on_downstream_data.is_empty() {
        return Err(ConfigError::Unsupported {
            path: path.into(),
            fields: "'on_downstream_data'".into(),
        });
    }
    reject_unhandled(&rest, path)?;
    Ok(SetFilterState {
        on_new_connection,
        on_downstream_tls_handshake,
    })
}

impl SetFilterState {
    pub fn on_new_connection(&self, conn: &super::Connection<'_>, state: &mut FilterState) {
        apply(&self.on_new_connection, conn, state);
    }

    pub fn on_downstream_tls_handshake(
        &self,
        conn: &super::Connection<'_>,
        state: &mut FilterState,
    ) {
        apply(&self.on_downstream_tls_handshake, conn, state);
    }
}

fn apply(values: &[Value], conn: &super::Connection<'_>, state: &mut FilterState) {
    for v in values {
        let text = {
            let mut sv = StreamValues::new(conn.start_time, conn.remote, conn.local);
            sv.requested_server_name = conn.requested_server_name;
            sv.downstream_tls = conn.tls;
            sv.filter_state = Some(state);
            v.format.render(&sv).0
        };
        if v.skip_if_empty && text.is_empty() {
            continue;
        }
        state.set(Object {
            key: v.key.clone(),
            proto: Some(serde_json::Value::String(text.clone())),
            plain: text,
            read_only: v.read_only,
            shared: v.shared,
            hashable: false,
        });
    }
}
