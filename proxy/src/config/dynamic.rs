//! The bootstrap's `dynamic_resources`: where ADS is and which types come from it. CDS over ADS
//! is applied today; LDS comes next (issue #4).

use xds_client::ads::{ApiType, Target};
use xds_client::pb::envoy::config::bootstrap::v3::bootstrap::DynamicResources;
use xds_client::pb::envoy::config::cluster::v3::Cluster;
use xds_client::pb::envoy::config::core::v3::{
    address, api_config_source, config_source::ConfigSourceSpecifier,
    grpc_service::TargetSpecifier, socket_address::PortSpecifier, ConfigSource,
};

use super::{invalid, reject_unhandled, ConfigError};

#[derive(Debug, Clone, PartialEq)]
pub struct Dynamic {
    pub target: Target,
    pub api: ApiType,
    /// Clusters come from ADS.
    pub cds: bool,
}

/// A `ConfigSource` must say "from ADS, v3".
pub fn ads_source(c: &ConfigSource, path: &str) -> Result<(), ConfigError> {
    let mut rest = c.clone();
    if !matches!(
        rest.config_source_specifier.take(),
        Some(ConfigSourceSpecifier::Ads(_))
    ) {
        return Err(ConfigError::Unsupported {
            path: path.into(),
            fields: "a config source other than 'ads'".into(),
        });
    }
    if !matches!(std::mem::take(&mut rest.resource_api_version), 0 | 2) {
        return Err(invalid(
            format!("{path}.resource_api_version"),
            "only V3 is supported",
        ));
    }
    // initial_fetch_timeout stays in `rest` and is refused: Petrel does not yet hold
    // initialization until the first xDS answer (issue #4), so honouring it is not possible.
    reject_unhandled(&rest, path)
}

/// Compiles `dynamic_resources` against the static clusters (the ADS cluster is one of them).
pub fn compile(
    d: &DynamicResources,
    static_clusters: &[Cluster],
) -> Result<Option<Dynamic>, ConfigError> {
    let path = "dynamic_resources";
    let mut rest = d.clone();
    let ads = rest.ads_config.take();
    let cds = rest.cds_config.take();
    if rest.lds_config.take().is_some() {
        return Err(ConfigError::Unsupported {
            path: path.into(),
            fields: "'lds_config' (LDS is the next step of issue #4)".into(),
        });
    }
    reject_unhandled(&rest, path)?;
    let Some(ads) = ads else {
        if cds.is_some() {
            return Err(invalid(
                format!("{path}.cds_config"),
                "only ADS ('ads: {}') sources are supported and ads_config is missing",
            ));
        }
        return Ok(None);
    };
    let ap = format!("{path}.ads_config");
    let mut arest = ads.clone();
    let api = match api_config_source::ApiType::try_from(std::mem::take(&mut arest.api_type)) {
        Ok(api_config_source::ApiType::Grpc) | Ok(api_config_source::ApiType::AggregatedGrpc) => {
            ApiType::Sotw
        }
        Ok(api_config_source::ApiType::DeltaGrpc)
        | Ok(api_config_source::ApiType::AggregatedDeltaGrpc) => ApiType::Delta,
        _ => {
            return Err(invalid(
                format!("{ap}.api_type"),
                "only GRPC and DELTA_GRPC are supported",
            ))
        }
    };
    if !matches!(std::mem::take(&mut arest.transport_api_version), 0 | 2) {
        return Err(invalid(
            format!("{ap}.transport_api_version"),
            "only V3 is supported",
        ));
    }
    // Petrel always sends the node on the first message of a stream only.
    arest.set_node_on_first_message_only = false;
    let services = std::mem::take(&mut arest.grpc_services);
    reject_unhandled(&arest, &ap)?;
    let [svc] = services.as_slice() else {
        return Err(invalid(
            format!("{ap}.grpc_services"),
            "exactly one gRPC service is supported",
        ));
    };
    let mut srest = svc.clone();
    let cluster_name = match srest.target_specifier.take() {
        Some(TargetSpecifier::EnvoyGrpc(e)) => e.cluster_name,
        _ => {
            return Err(ConfigError::Unsupported {
                path: format!("{ap}.grpc_services[0]"),
                fields: "'google_grpc'".into(),
            })
        }
    };
    // The stream is long-lived: a per-call timeout does not apply to it.
    srest.timeout = None;
    reject_unhandled(&srest, &format!("{ap}.grpc_services[0]"))?;
    let cluster = static_clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .ok_or_else(|| {
            invalid(
                format!("{ap}.grpc_services[0].envoy_grpc.cluster_name"),
                format!("Unknown gRPC client cluster '{cluster_name}'"),
            )
        })?;
    let endpoint = cluster
        .load_assignment
        .as_ref()
        .and_then(|cla| cla.endpoints.first())
        .and_then(|le| le.lb_endpoints.first())
        .and_then(|e| match &e.host_identifier {
            Some(
                xds_client::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(
                    ep,
                ),
            ) => ep.address.clone(),
            _ => None,
        })
        .ok_or_else(|| {
            invalid(
                format!("cluster '{cluster_name}'"),
                "the ADS cluster needs one endpoint",
            )
        })?;
    let target = match endpoint.address {
        Some(address::Address::SocketAddress(sa)) => match sa.port_specifier {
            Some(PortSpecifier::PortValue(p)) => Target::Tcp(format!("http://{}:{p}", sa.address)),
            _ => {
                return Err(invalid(
                    format!("cluster '{cluster_name}'"),
                    "the ADS endpoint needs a port",
                ))
            }
        },
        Some(address::Address::Pipe(p)) => Target::Unix(p.path.into()),
        _ => {
            return Err(ConfigError::Unsupported {
                path: format!("cluster '{cluster_name}'"),
                fields: "an internal address for ADS".into(),
            })
        }
    };
    if let Some(c) = &cds {
        ads_source(c, &format!("{path}.cds_config"))?;
    }
    Ok(Some(Dynamic {
        target,
        api,
        cds: cds.is_some(),
    }))
}
