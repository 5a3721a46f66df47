//! The bootstrap's `overload_manager`: Petrel implements the proactive
//! `envoy.resource_monitors.global_downstream_max_connections` monitor (Istio's bootstrap sets
//! it), a cap on downstream connections across the listeners that do not set
//! `ignore_global_conn_limit`. Overload actions, load-shed points and other monitors are refused.

use xds_client::pb::envoy::config::overload::v3::{resource_monitor::ConfigType, OverloadManager};
use xds_client::pb::envoy::extensions::resource_monitors::downstream_connections::v3::DownstreamConnectionsConfig;
use xds_client::TypeRegistry;

use super::{invalid, reject_unhandled, ConfigError};

const DOWNSTREAM_CONNECTIONS: &str =
    "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig";

/// The cap on active downstream connections, if the bootstrap sets one.
pub fn compile(o: &OverloadManager) -> Result<Option<u64>, ConfigError> {
    let path = "overload_manager";
    let mut rest = o.clone();
    let monitors = std::mem::take(&mut rest.resource_monitors);
    reject_unhandled(&rest, path)?;
    let mut max = None;
    for (i, m) in monitors.iter().enumerate() {
        let mp = format!("{path}.resource_monitors[{i}]");
        let Some(ConfigType::TypedConfig(any)) = &m.config_type else {
            return Err(invalid(mp, "typed_config is required"));
        };
        let url = TypeRegistry::effective_type_url(any);
        if url != DOWNSTREAM_CONNECTIONS {
            return Err(ConfigError::UnsupportedExtension {
                path: format!("{mp}.typed_config"),
                why: petrel_filters::extensions::refusal(&url),
                type_url: url,
            });
        }
        let mut c: DownstreamConnectionsConfig = TypeRegistry::global().unpack(any)?;
        let n = std::mem::take(&mut c.max_active_downstream_connections);
        reject_unhandled(&c, &format!("{mp}.typed_config"))?;
        if n <= 0 {
            return Err(invalid(
                format!("{mp}.typed_config.max_active_downstream_connections"),
                "value must be greater than 0",
            ));
        }
        max = Some(n as u64);
    }
    Ok(max)
}
