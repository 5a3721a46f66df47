//! The compiled, immutable configuration a worker serves from.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use xds_client::pb::envoy::config::bootstrap::v3::Bootstrap;
use xds_client::pb::envoy::config::core::v3::Node;

use super::{invalid, reject_unhandled, ConfigError};
use crate::cli::Options;
use crate::listener::{self, ListenerSet};
use crate::observe::stats::Store;
use crate::router::route_config::RouteTable;
use crate::upstream::cluster::{self, Cluster};
use xds_client::pb::envoy::config::route::v3::RouteConfiguration;

#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Active listeners (static, then those from LDS).
    pub listeners: ListenerSet,
    /// Listeners from LDS: active ones by name, and those still warming (waiting for RDS).
    pub dynamic_listeners: std::collections::BTreeMap<String, DynamicInfo>,
    pub warming_listeners: Vec<(Arc<listener::Listener>, DynamicInfo)>,
    /// Route configurations from RDS, by name.
    pub route_configs: HashMap<String, RdsRoute>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// Cluster names in configuration order (for `/clusters` and `/config_dump`).
    pub cluster_order: Vec<String>,
    pub admin: Option<SocketAddr>,
    /// `admin.access_log`: one line per admin request.
    pub admin_access_logs: crate::observe::access_log::AccessLogs,
    pub node: Node,
    /// The bootstrap as given, kept encoded (decoded only for `/config_dump`: decoded, a
    /// bootstrap with many clusters and routes takes kilobytes each).
    pub bootstrap: Arc<[u8]>,
    /// `dynamic_resources`, when the bootstrap has them.
    pub dynamic: Option<super::dynamic::Dynamic>,
    /// Clusters that came from CDS: version and when they were last updated.
    pub dynamic_clusters: std::collections::BTreeMap<String, DynamicInfo>,
    /// CDS clusters waiting for their EDS assignment.
    pub warming_clusters: Vec<(Arc<Cluster>, DynamicInfo)>,
    /// Assignments from EDS.
    pub endpoint_configs: Arc<Assignments>,
    /// `overload_manager`'s global downstream connection limit.
    pub max_downstream_connections: Option<u64>,
    /// `application_log_config.log_format.text_format`.
    pub log_format: Option<String>,
    pub cluster_manager: super::cluster_manager::ClusterManagerConfig,
    /// `layered_runtime`.
    pub runtime: super::runtime::Runtime,
    /// `stats_config` and `deferred_stat_options`: how stats are named, tagged and shown.
    pub stats_config: Arc<crate::observe::stats_config::StatsConfig>,
    /// `tracing.http`: the tracer connection managers use unless they name their own.
    pub tracing: Option<Arc<crate::observe::tracing::ZipkinDriver>>,
    /// `stats_flush_interval` (5 s): how often histograms merge what was recorded.
    pub stats_flush_interval: std::time::Duration,
    /// `stats_sinks`: where each stats flush goes.
    pub stats_sinks: Vec<Arc<crate::observe::stats_sink::Statsd>>,
}

/// A route configuration from RDS: compiled, its source, and what `/config_dump` shows.
#[derive(Debug, Clone)]
pub struct RdsRoute {
    pub table: Arc<RouteTable>,
    pub source: Arc<RouteConfiguration>,
    pub info: DynamicInfo,
}

/// A `ClusterLoadAssignment` from EDS, with what `/config_dump` shows of it.
#[derive(Debug, Clone)]
pub struct Assigned {
    pub cla: Arc<xds_client::pb::envoy::config::endpoint::v3::ClusterLoadAssignment>,
    pub info: DynamicInfo,
}

/// Accepted assignments by EDS service name.
pub type Assignments = HashMap<String, Assigned>;

/// What `/config_dump` shows for a resource from xDS.
#[derive(Debug, Clone)]
pub struct DynamicInfo {
    pub version: String,
    pub last_updated: String,
}

impl Snapshot {
    /// The same snapshot with another cluster set (CDS).
    pub fn with_clusters(
        &self,
        clusters: HashMap<String, Arc<Cluster>>,
        cluster_order: Vec<String>,
    ) -> Snapshot {
        Snapshot {
            clusters,
            cluster_order,
            ..self.clone()
        }
    }

    /// The same snapshot with one cluster replaced (DNS refresh): listeners, routes and every
    /// other cluster are shared, so connections keep what they started with.
    pub fn with_cluster(&self, cluster: Arc<Cluster>) -> Snapshot {
        let mut next = self.clone();
        next.clusters.insert(cluster.name.clone(), cluster);
        next
    }
}

pub fn compile(b: &Bootstrap, opts: &Options, store: &Store) -> Result<Snapshot, ConfigError> {
    let mut rest = b.clone();
    let mut node = rest.node.take().unwrap_or_default();
    if let Some(c) = &opts.service_cluster {
        node.cluster = c.clone();
    }
    if let Some(n) = &opts.service_node {
        node.id = n.clone();
    }
    if let Some(z) = &opts.service_zone {
        node.locality.get_or_insert_with(Default::default).zone = z.clone();
    }
    let mut admin_access_logs: crate::observe::access_log::AccessLogs = Arc::new([]);
    let admin = match rest.admin.take() {
        Some(a) => {
            let mut arest = a.clone();
            let mut logs = std::mem::take(&mut arest.access_log);
            // The deprecated `access_log_path` is a file log in the default format, after the
            // others (as Envoy adds it).
            let legacy = std::mem::take(&mut arest.access_log_path);
            if !legacy.is_empty() {
                logs.push(legacy_admin_log(&legacy));
            }
            admin_access_logs =
                crate::observe::access_log::compile_all(&logs, store, "admin.access_log")?;
            let addr = listener::socket_addr(&arest.address.take(), "admin.address")?;
            // Where `/cpuprofiler` would write: Petrel has no profiler endpoints (they answer
            // 404), so nothing is ever written there.
            arest.profile_path.clear();
            reject_unhandled(&arest, "admin")?;
            Some(addr)
        }
        None => None,
    };
    let statics = rest.static_resources.take().unwrap_or_default();
    let mut srest = statics.clone();
    let clusters_pb = std::mem::take(&mut srest.clusters);
    let listeners_pb = std::mem::take(&mut srest.listeners);
    // Static secrets first: the contexts of static listeners and clusters name them.
    crate::tls::secrets::registry().set_static(&std::mem::take(&mut srest.secrets))?;
    reject_unhandled(&srest, "static_resources")?;
    let log_format = application_log_format(rest.application_log_config.take(), opts)?;
    let runtime = match rest.layered_runtime.take() {
        Some(lr) => super::runtime::compile(&lr)?,
        None => Default::default(),
    };
    let cluster_manager = match rest.cluster_manager.take() {
        Some(c) => super::cluster_manager::compile(&c)?,
        None => Default::default(),
    };
    // The overload manager's monitor, else the runtime key (its legacy form).
    let max_downstream_connections = match rest.overload_manager.take() {
        Some(o) => super::overload::compile(&o)?,
        None => None,
    };
    let dynamic = match rest.dynamic_resources.take() {
        Some(d) => super::dynamic::compile(&d, &clusters_pb)?,
        None => None,
    };
    let stats_flush_interval = stats_flush_interval(&mut rest)?;
    let stats_sinks =
        crate::observe::stats_sink::compile(&std::mem::take(&mut rest.stats_sinks), "stats_sinks")?;
    let stats_config = Arc::new(crate::observe::stats_config::StatsConfig::compile(
        rest.stats_config.take().as_ref(),
        rest.deferred_stat_options.take().as_ref(),
    )?);
    bootstrap_extensions(&std::mem::take(&mut rest.bootstrap_extensions))?;
    let tracing_pb = rest.tracing.take();
    reject_unhandled(&rest, "(bootstrap)")?;

    let mut clusters = HashMap::new();
    let mut cluster_order = Vec::new();
    for c in &clusters_pb {
        let compiled = cluster::compile(
            c,
            store,
            cluster::ClusterEnv {
                event_log: cluster_manager.outlier_event_log.as_ref(),
                node: &node,
            },
        )?;
        if compiled.eds_service.is_some() {
            return Err(ConfigError::Unsupported {
                path: format!("cluster '{}'", compiled.name),
                fields: "'type: EDS' in static_resources (EDS is applied to CDS clusters for now, issue #4)".into(),
            });
        }
        if clusters.contains_key(&compiled.name) {
            return Err(super::invalid(
                "static_resources.clusters",
                format!("cluster manager: duplicate cluster '{}'", compiled.name),
            ));
        }
        cluster_order.push(compiled.name.clone());
        clusters.insert(compiled.name.clone(), Arc::new(compiled));
    }
    let known: HashSet<String> = clusters.keys().cloned().collect();
    let local_address = crate::local_info::local_address(opts.local_address_ip_version);
    let tracing = bootstrap_tracing(tracing_pb, &node, local_address, store)?;
    let env = listener::ListenerEnv {
        local_address,
        tracing: tracing.as_ref(),
        node: &node,
    };
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    for l in &listeners_pb {
        let compiled = listener::compile(&env, l, &known, store)?;
        if !names.insert(compiled.name.clone()) {
            return Err(super::invalid(
                "static_resources.listeners",
                format!(
                    "error adding listener named '{}': listener with the same name already exists",
                    compiled.name
                ),
            ));
        }
        if dynamic.is_none() && !compiled.rds.is_empty() {
            return Err(invalid(
                format!("listener '{}'", compiled.name),
                "'rds' needs an ADS source: dynamic_resources.ads_config is missing",
            ));
        }
        listeners.push(Arc::new(compiled));
    }
    // Secrets are fetched by the xDS machinery: a bootstrap without it could never get them.
    let wants_secrets =
        listeners.iter().any(|l| !l.tls_ready()) || clusters.values().any(|c| !c.transport.ready());
    if dynamic.is_none() && wants_secrets {
        return Err(ConfigError::Unsupported {
            path: "static_resources".into(),
            fields: "SDS secrets without dynamic_resources (Petrel fetches secrets alongside ADS)"
                .into(),
        });
    }
    store
        .gauge("cluster_manager.active_clusters")
        .set(clusters.len() as i64);
    store
        .gauge("listener_manager.total_listeners_active")
        .set(listeners.len() as i64);
    Ok(Snapshot {
        listeners: ListenerSet::new(listeners),
        dynamic_listeners: Default::default(),
        warming_listeners: Vec::new(),
        route_configs: HashMap::new(),
        clusters,
        cluster_order,
        admin,
        admin_access_logs,
        node,
        bootstrap: prost::Message::encode_to_vec(b).into(),
        dynamic,
        dynamic_clusters: Default::default(),
        warming_clusters: Vec::new(),
        endpoint_configs: Default::default(),
        max_downstream_connections: max_downstream_connections
            .or(runtime.max_downstream_connections),
        log_format,
        cluster_manager,
        runtime,
        stats_config,
        tracing,
        stats_flush_interval,
        stats_sinks,
    })
}

/// `stats_flush_interval`, in Envoy's bounds [1 ms, 300 s); `stats_flush_on_admin` (histograms
/// merged only when the admin asks) is refused.
fn stats_flush_interval(rest: &mut Bootstrap) -> Result<std::time::Duration, ConfigError> {
    use std::time::Duration;
    if rest.stats_flush.take().is_some() {
        return Err(ConfigError::Unsupported {
            path: "(bootstrap)".into(),
            fields: "'stats_flush_on_admin' (Petrel flushes on its interval)".into(),
        });
    }
    let path = "stats_flush_interval";
    let d = super::duration::or(
        &rest.stats_flush_interval.take(),
        Duration::from_secs(5),
        path,
    )?;
    if d < Duration::from_millis(1) || d >= Duration::from_secs(300) {
        return Err(invalid(path, "value must be inside range [1ms, 300s)"));
    }
    Ok(d)
}

/// The bootstrap's `tracing`: its `http` provider, compiled once for every connection manager
/// that traces without a provider of its own.
fn bootstrap_tracing(
    t: Option<xds_client::pb::envoy::config::trace::v3::Tracing>,
    node: &Node,
    local_address: std::net::IpAddr,
    store: &Store,
) -> Result<Option<Arc<crate::observe::tracing::ZipkinDriver>>, ConfigError> {
    let Some(mut t) = t else { return Ok(None) };
    let http = t.http.take();
    reject_unhandled(&t, "tracing")?;
    let Some(http) = http else { return Ok(None) };
    let env = crate::observe::tracing::TracingEnv {
        default_driver: None,
        node: crate::observe::tracing::zipkin::LocalNode {
            cluster: &node.cluster,
            address: local_address,
        },
        node_id: &node.id,
        // The collector cluster is checked by each connection manager that uses the tracer
        // (it may come from CDS), as Envoy checks it when the tracer is first used.
        known_clusters: &|_| true,
        store,
    };
    crate::observe::tracing::compile_provider(&http, &env, "tracing.http").map(Some)
}

/// `application_log_config.log_format`: the text pattern Petrel's own log lines take. As in
/// Envoy it cannot be combined with `--log-format`.
fn application_log_format(
    c: Option<xds_client::pb::envoy::config::bootstrap::v3::bootstrap::ApplicationLogConfig>,
    opts: &Options,
) -> Result<Option<String>, ConfigError> {
    use xds_client::pb::envoy::config::bootstrap::v3::bootstrap::application_log_config::log_format::LogFormat;
    let Some(mut c) = c else { return Ok(None) };
    let path = "application_log_config";
    let format = c.log_format.take();
    reject_unhandled(&c, path)?;
    let Some(mut f) = format else { return Ok(None) };
    let text = match f.log_format.take() {
        Some(LogFormat::TextFormat(t)) => t,
        Some(LogFormat::JsonFormat(_)) => {
            return Err(ConfigError::Unsupported {
                path: format!("{path}.log_format"),
                fields: "'json_format' (comes with observability, issue #7)".into(),
            })
        }
        None => return Ok(None),
    };
    reject_unhandled(&f, &format!("{path}.log_format"))?;
    if opts.log_format.is_some() {
        return Err(invalid(
            format!("{path}.log_format"),
            "Only one of ApplicationLogConfig.log_format or CLI option --log-format can be specified.",
        ));
    }
    Ok(Some(text))
}

/// `admin.access_log_path` as the file access log it stands for.
fn legacy_admin_log(path: &str) -> xds_client::pb::envoy::config::accesslog::v3::AccessLog {
    use prost::Message;
    use xds_client::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
    let file = FileAccessLog {
        path: path.to_string(),
        ..Default::default()
    };
    xds_client::pb::envoy::config::accesslog::v3::AccessLog {
        name: "envoy.access_loggers.file".into(),
        config_type: Some(
            xds_client::pb::envoy::config::accesslog::v3::access_log::ConfigType::TypedConfig(
                xds_client::pb::google::protobuf::Any {
                    type_url:
                        "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
                            .into(),
                    value: file.encode_to_vec(),
                },
            ),
        ),
        ..Default::default()
    }
}

/// `bootstrap_extensions`: the internal-listener registry Istio always installs is accepted
/// (it only enables internal listeners, which Petrel refuses one by one over LDS with #4); any
/// other extension is refused by name.
fn bootstrap_extensions(
    exts: &[xds_client::pb::envoy::config::core::v3::TypedExtensionConfig],
) -> Result<(), ConfigError> {
    const INTERNAL_LISTENER: &str =
        "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener";
    for (i, e) in exts.iter().enumerate() {
        let path = format!("bootstrap_extensions[{i}]");
        let url = e
            .typed_config
            .as_ref()
            .map(xds_client::TypeRegistry::effective_type_url)
            .unwrap_or_default();
        if url != INTERNAL_LISTENER {
            return Err(ConfigError::UnsupportedExtension {
                path: format!("{path} ('{}')", e.name),
                why: petrel_filters::extensions::refusal(&url),
                type_url: url,
            });
        }
    }
    Ok(())
}
