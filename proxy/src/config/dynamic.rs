//! The bootstrap's `dynamic_resources`: where ADS is and which types come from it (CDS and LDS,
//! with EDS and RDS following the clusters and listeners that name them).

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
    /// Clusters come from ADS; initialization waits for the first answer (or the
    /// `initial_fetch_timeout`, when set).
    pub cds: Option<Wait>,
    /// Listeners come from ADS.
    pub lds: Option<Wait>,
}

/// How long initialization (or warming) waits for a source's first answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Wait {
    Forever,
    Until(std::time::Duration),
}

impl Wait {
    pub fn timeout(self) -> Option<std::time::Duration> {
        match self {
            Wait::Forever => None,
            Wait::Until(d) => Some(d),
        }
    }
}

/// A `ConfigSource` must say "from ADS, v3". Returns its `initial_fetch_timeout` (0 = forever).
pub fn ads_source(c: &ConfigSource, path: &str) -> Result<Wait, ConfigError> {
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
    let wait = match rest.initial_fetch_timeout.take() {
        Some(d) if d.seconds != 0 || d.nanos != 0 => Wait::Until(super::duration::to_std(
            &d,
            &format!("{path}.initial_fetch_timeout"),
        )?),
        // Envoy's default is 15 s; 0 waits forever.
        Some(_) => Wait::Forever,
        None => Wait::Until(std::time::Duration::from_secs(15)),
    };
    reject_unhandled(&rest, path)?;
    Ok(wait)
}

/// A gRPC `ApiConfigSource` naming one `envoy_grpc` cluster: its protocol and the cluster.
/// `aggregated` admits the `AGGREGATED_*` api types (ADS).
pub fn grpc_api_source(
    a: &xds_client::pb::envoy::config::core::v3::ApiConfigSource,
    aggregated: bool,
    ap: &str,
) -> Result<(ApiType, String), ConfigError> {
    use api_config_source::ApiType as Pb;
    let mut arest = a.clone();
    let api = match Pb::try_from(std::mem::take(&mut arest.api_type)) {
        Ok(Pb::Grpc) => ApiType::Sotw,
        Ok(Pb::DeltaGrpc) => ApiType::Delta,
        Ok(Pb::AggregatedGrpc) if aggregated => ApiType::Sotw,
        Ok(Pb::AggregatedDeltaGrpc) if aggregated => ApiType::Delta,
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
    reject_unhandled(&arest, ap)?;
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
    Ok((api, cluster_name))
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
    let lds = rest.lds_config.take();
    reject_unhandled(&rest, path)?;
    let Some(ads) = ads else {
        for (name, src) in [("cds_config", &cds), ("lds_config", &lds)] {
            if src.is_some() {
                return Err(invalid(
                    format!("{path}.{name}"),
                    "only ADS ('ads: {}') sources are supported and ads_config is missing",
                ));
            }
        }
        return Ok(None);
    };
    let ap = format!("{path}.ads_config");
    let (api, cluster_name) = grpc_api_source(&ads, true, &ap)?;
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
    let cds = match &cds {
        Some(c) => Some(ads_source(c, &format!("{path}.cds_config"))?),
        None => None,
    };
    let lds = match &lds {
        Some(c) => Some(ads_source(c, &format!("{path}.lds_config"))?),
        None => None,
    };
    Ok(Some(Dynamic {
        target,
        api,
        cds,
        lds,
    }))
}
