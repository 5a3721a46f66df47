//! The bootstrap's `layered_runtime`: static layers (later layers override earlier ones; nested
//! structs flatten into dotted keys) and an admin layer. Petrel honours the runtime keys it knows
//! — the ones Istio's bootstrap sets — and refuses any other key by name, so that no key that
//! changes Envoy's behaviour is silently inert here.

use std::collections::BTreeMap;

use xds_client::pb::envoy::config::bootstrap::v3::{runtime_layer::LayerSpecifier, LayeredRuntime};
use xds_client::pb::google::protobuf::{value::Kind, Struct};

use super::{invalid, reject_unhandled, ConfigError};

/// What the runtime decides.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// `envoy.reloadable_features.http_reject_path_with_fragment` (default true): a request
    /// target with a `#fragment` is refused with 400; false drops the fragment.
    pub reject_path_with_fragment: bool,
    /// `overload.global_downstream_max_connections`: the legacy form of the overload
    /// manager's connection limit.
    pub max_downstream_connections: Option<u64>,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            reject_path_with_fragment: true,
            max_downstream_connections: None,
        }
    }
}

/// Keys whose effect Petrel has without reading them: Envoy-internal switches with no
/// observable behaviour, or permissions for what Petrel accepts anyway.
fn inert(key: &str) -> bool {
    // Deprecated fields are honoured by Petrel whether or not the runtime allows them.
    key.starts_with("envoy.deprecated_features:")
        || matches!(
            key,
            // RE2 program-size limits: Petrel's regex engine has no such limit to raise.
            "re2.max_program_size.error_level"
                | "re2.max_program_size.warn_level"
                // Batching of load-balancer rebuilds and the fixed-heap monitor's accounting
                // are Envoy internals.
                | "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update"
                | "envoy.reloadable_features.fixed_heap_use_allocated"
                // Petrel never looks extensions up by name: a filter needs its typed_config.
                | "envoy.reloadable_features.no_extension_lookup_by_name"
                // Guard removed in Envoy 1.36: 1.40 trusts only `internal_address_config`
                // ranges whatever the key says, as Petrel does (Istio sets it to true).
                | "envoy.reloadable_features.explicit_internal_address_config"
                // Affects Envoy's Google gRPC client only; Petrel refuses `google_grpc`
                // services, so there is nothing for it to change.
                | "envoy.reloadable_features.google_grpc_disable_tls_13"
        )
}

fn flatten(prefix: &str, s: &Struct, out: &mut BTreeMap<String, Kind>) {
    for (k, v) in &s.fields {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match &v.kind {
            Some(Kind::StructValue(inner)) => flatten(&key, inner, out),
            Some(other) => {
                out.insert(key, other.clone());
            }
            None => {}
        }
    }
}

fn as_bool(v: &Kind) -> Option<bool> {
    match v {
        Kind::BoolValue(b) => Some(*b),
        Kind::StringValue(s) => match s.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        Kind::NumberValue(n) => Some(*n != 0.0),
        _ => None,
    }
}

fn as_u64(v: &Kind) -> Option<u64> {
    match v {
        Kind::NumberValue(n) if *n >= 0.0 => Some(*n as u64),
        Kind::StringValue(s) => s.parse().ok(),
        _ => None,
    }
}

pub fn compile(lr: &LayeredRuntime) -> Result<Runtime, ConfigError> {
    let path = "layered_runtime";
    let mut keys = BTreeMap::new();
    for (i, layer) in lr.layers.iter().enumerate() {
        let lp = format!("{path}.layers[{i}]");
        let mut rest = layer.clone();
        rest.name.clear();
        match rest.layer_specifier.take() {
            Some(LayerSpecifier::StaticLayer(s)) => flatten("", &s, &mut keys),
            // Petrel has no `/runtime_modify`, so the admin layer stays empty.
            Some(LayerSpecifier::AdminLayer(a)) => {
                reject_unhandled(&a, &format!("{lp}.admin_layer"))?
            }
            Some(_) => {
                return Err(ConfigError::Unsupported {
                    path: lp,
                    fields: "'disk_layer' or 'rtds_layer'".into(),
                })
            }
            None => return Err(invalid(lp, "layer_specifier is required")),
        }
        reject_unhandled(&rest, &lp)?;
    }
    let mut rt = Runtime::default();
    for (key, value) in &keys {
        let kp = format!("{path}: runtime key '{key}'");
        match key.as_str() {
            "envoy.reloadable_features.http_reject_path_with_fragment" => {
                rt.reject_path_with_fragment =
                    as_bool(value).ok_or_else(|| invalid(&kp, "expected a boolean"))?;
            }
            // Only its default (true: a fragment is dropped) is Petrel's behaviour.
            "envoy.reloadable_features.http_strip_fragment_from_path_unsafe_if_disabled" => {
                if as_bool(value) != Some(true) {
                    return Err(invalid(&kp, "keeping #fragment in paths is not supported"));
                }
            }
            "overload.global_downstream_max_connections" => {
                rt.max_downstream_connections =
                    Some(as_u64(value).ok_or_else(|| invalid(&kp, "expected a number"))?);
            }
            k if inert(k) => {}
            _ => {
                return Err(ConfigError::Unsupported {
                    path: path.into(),
                    fields: format!("runtime key '{key}'"),
                })
            }
        }
    }
    Ok(rt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(json: serde_json::Value) -> Result<Runtime, ConfigError> {
        let lr: LayeredRuntime = xds_client::TypeRegistry::global()
            .from_json(&json, false)
            .expect("layered runtime");
        compile(&lr)
    }

    #[test]
    fn istio_layers() {
        let rt = runtime(serde_json::json!({"layers": [
            {"name": "global config", "static_layer": {
                "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": true,
                "envoy.reloadable_features.http_reject_path_with_fragment": false,
                "overload.global_downstream_max_connections": "2147483647",
                "re2.max_program_size.error_level": "32768"}},
            {"name": "admin", "admin_layer": {}}]}))
        .expect("accepted");
        assert!(!rt.reject_path_with_fragment);
        assert_eq!(rt.max_downstream_connections, Some(2147483647));
    }

    #[test]
    fn later_layers_win_and_unknown_keys_are_refused() {
        let rt = runtime(serde_json::json!({"layers": [
            {"name": "a", "static_layer": {"envoy": {"reloadable_features": {"http_reject_path_with_fragment": false}}}},
            {"name": "b", "static_layer": {"envoy.reloadable_features.http_reject_path_with_fragment": "true"}}]}))
        .expect("accepted");
        assert!(rt.reject_path_with_fragment);
        let e = runtime(serde_json::json!({"layers": [{"name": "a", "static_layer": {"health_check.min_interval": 5}}]}))
            .expect_err("unknown key");
        assert!(e.to_string().contains("health_check.min_interval"), "{e}");
    }
}
