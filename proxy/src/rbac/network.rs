//! `envoy.filters.network.rbac`: the RBAC engine on each connection before its terminal filter
//! runs; a denied connection is closed.

use xds_client::pb::envoy::extensions::filters::network::rbac::v3::{rbac::EnforcementType, Rbac};
use xds_client::pb::google::protobuf::Any;

use super::{Input, RbacStats, Rules};
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::Store;

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

/// Compiles the filter; its stats go under `<stat_prefix>rbac.` at the root, as Envoy's do.
pub fn compile(any: &Any, store: &Store, path: &str) -> Result<Rules, ConfigError> {
    let cfg: Rbac = xds_client::TypeRegistry::global()
        .unpack(any)
        .map_err(|e| invalid(path, e.to_string()))?;
    let mut rest = cfg.clone();
    let stat_prefix = std::mem::take(&mut rest.stat_prefix);
    if stat_prefix.is_empty() {
        return Err(invalid(
            format!("{path}.stat_prefix"),
            "value length must be at least 1 characters",
        ));
    }
    if EnforcementType::try_from(std::mem::take(&mut rest.enforcement_type))
        != Ok(EnforcementType::OneTimeOnFirstByte)
    {
        return Err(ConfigError::Unsupported {
            path: path.into(),
            fields: "'enforcement_type: CONTINUOUS'".into(),
        });
    }
    // Envoy joins the prefix and `rbac.` with a dot (a prefix ending in one gets no second).
    let stat_prefix = if stat_prefix.ends_with('.') {
        stat_prefix
    } else {
        format!("{stat_prefix}.")
    };
    let (enforced, shadow) = super::engines(
        rest.rules.take().as_ref(),
        rest.shadow_rules.take().as_ref(),
        path,
    )?;
    let shadow_prefix = std::mem::take(&mut rest.shadow_rules_stat_prefix);
    reject_unhandled(&rest, path)?;
    Ok(Rules {
        enforced,
        shadow,
        stats: RbacStats::new(store, &stat_prefix, "", &shadow_prefix),
        shadow_keys: super::shadow_keys(&shadow_prefix),
        enforced_keys: None,
        namespace: "envoy.filters.network.rbac",
    })
}

/// Whether the connection may go on; the decisions go to the connection's dynamic metadata.
pub fn allows(
    rules: &Rules,
    input: &Input<'_>,
    metadata: &mut petrel_filters::http_filter::DynamicMetadata,
) -> bool {
    rules.check(input, Some(metadata)).0
}
