//! `envoy.filters.network.http_connection_manager` compiled: codec, header policies, route table
//! and HTTP filter factories.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use petrel_filters::http_filter::HttpFilterFactory;
use xds_client::pb::envoy::extensions::filters::http::router::v3::Router;
use xds_client::pb::envoy::extensions::filters::network::http_connection_manager::v3 as pb;
use xds_client::TypeRegistry;

use crate::config::{duration, invalid, reject_unhandled, ConfigError};
use crate::observe::stats::Store;
use crate::router::route_config::{self, CompileOptions, RouteTable};
use crate::stat_struct;

stat_struct!(HcmStats {
    counter downstream_cx_total,
    gauge downstream_cx_active,
    counter downstream_cx_http1_total,
    counter downstream_cx_http2_total,
    counter downstream_cx_ssl_total,
    gauge downstream_cx_ssl_active,
    gauge downstream_cx_http1_active,
    gauge downstream_cx_http2_active,
    counter downstream_cx_protocol_error,
    counter downstream_rq_total,
    gauge downstream_rq_active,
    counter downstream_rq_http1_total,
    counter downstream_rq_http2_total,
    counter downstream_rq_completed,
    counter downstream_rq_1xx,
    counter downstream_rq_2xx,
    counter downstream_rq_3xx,
    counter downstream_rq_4xx,
    counter downstream_rq_5xx,
    counter downstream_rq_ws_on_non_ws_route,
    counter downstream_rq_too_large,
    counter downstream_rq_idle_timeout,
    counter downstream_rq_timeout,
    counter downstream_rq_max_duration_reached,
    counter downstream_cx_idle_timeout,
    counter no_route,
    counter no_cluster,
    counter rq_direct_response,
    counter rq_redirect,
    histogram downstream_rq_time,
    histogram downstream_cx_length_ms,
});

// The connection manager's per-listener stats (`listener.<address>.http.<prefix>.`): Envoy's
// `ALL_HTTP_CONN_MAN_LISTENER_STATS`, only these.
stat_struct!(HcmListenerStats {
    counter downstream_rq_completed,
    counter downstream_rq_1xx,
    counter downstream_rq_2xx,
    counter downstream_rq_3xx,
    counter downstream_rq_4xx,
    counter downstream_rq_5xx,
});

/// `downstream_rq_<class>xx` for a response status, in both stat groups that keep them.
macro_rules! response_class {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn response_class(&self, status: u16) {
                match status / 100 {
                    1 => self.downstream_rq_1xx.inc(),
                    2 => self.downstream_rq_2xx.inc(),
                    3 => self.downstream_rq_3xx.inc(),
                    4 => self.downstream_rq_4xx.inc(),
                    _ => self.downstream_rq_5xx.inc(),
                }
            }
        }
    )*};
}
response_class!(HcmStats, HcmListenerStats);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerHeader {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnderscoreAction {
    Allow,
    RejectRequest,
    DropHeader,
}

/// Where a connection manager's route table comes from.
#[derive(Debug)]
pub enum Routes {
    /// `route_config`, compiled with the listener.
    Static(Arc<RouteTable>),
    /// `rds.route_config_name`: the snapshot's current table of that name, read per request;
    /// the listener warms until it arrives or `initial_fetch_timeout` passes.
    Rds(String, crate::config::dynamic::Wait),
}

#[derive(Debug)]
pub struct HcmConfig {
    /// `internal_address_config.cidr_ranges`: peers treated as internal.
    pub internal_cidrs: Vec<petrel_filters::matcher::Cidr>,
    pub local_reply: super::local_reply_config::LocalReplyConfig,
    /// `stream_idle_timeout` (Envoy default 5 min; 0 disables).
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout` (default disabled).
    pub request_timeout: Option<Duration>,
    /// `common_http_protocol_options.idle_timeout` for downstream connections (default 1 h).
    pub idle_timeout: Option<Duration>,
    /// `upgrade_configs` enables WebSocket upgrades.
    pub websocket: bool,
    /// The proxy's own address (`--local-address-ip-version`), appended to XFF for loopback peers.
    pub local_address: std::net::IpAddr,
    pub stat_prefix: String,
    pub codec: Codec,
    pub routes: Routes,
    pub filters: Vec<Arc<dyn HttpFilterFactory>>,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    pub skip_xff_append: bool,
    pub server_name: http::HeaderValue,
    pub server_header: ServerHeader,
    pub generate_request_id: bool,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    pub max_request_headers_kb: u32,
    pub max_headers_count: u32,
    pub underscores: UnderscoreAction,
    pub request_headers_timeout: Option<Duration>,
    pub path_policy: super::path_normalization::PathPolicy,
    pub stats: HcmStats,
    /// `forward_client_cert_details` and `set_current_client_cert_details`.
    pub client_cert: super::forward_client_cert::ClientCertPolicy,
    /// `access_log`: written when each stream ends.
    pub access_logs: crate::observe::access_log::AccessLogs,
    /// Listener-scoped copies of the same stats (`listener.<addr>.http.<prefix>.*`).
    pub listener_stats: HcmListenerStats,
    /// `tracing`: spans for streams, with the tracer they report to.
    pub tracing: Option<Arc<crate::observe::tracing::TracingConfig>>,
    /// Istio's stats filters: they report each stream when it ends.
    pub istio_stats: Arc<[Arc<crate::observe::istio_stats::IstioStats>]>,
    /// A filter reads the route's cluster's Istio metadata (the peer metadata filter).
    pub reads_cluster_istio: bool,
    /// `envoy.filters.http.grpc_stats`.
    pub grpc_stats: Option<Arc<super::grpc_stats::GrpcStatsConfig>>,
}

impl HcmConfig {
    /// Something reads how each stream went (access logs, tracing, Istio's stats): the stream's
    /// facts are gathered for it.
    pub fn observes_streams(&self) -> bool {
        !self.access_logs.is_empty()
            || self.tracing.is_some()
            || !self.istio_stats.is_empty()
            || self.grpc_stats.is_some()
    }

    /// The route table a request starts with.
    pub fn route_table(&self, snap: &crate::config::snapshot::Snapshot) -> Arc<RouteTable> {
        match &self.routes {
            Routes::Static(t) => t.clone(),
            // A table removed after the listener warmed routes nothing (404 NR), as in Envoy.
            Routes::Rds(name, _) => snap
                .route_configs
                .get(name)
                .map(|r| r.table.clone())
                .unwrap_or_else(|| {
                    EMPTY_ROUTES
                        .get_or_init(|| {
                            let none = Default::default();
                            let opts = CompileOptions {
                                known_clusters: None,
                                from_rds: true,
                            };
                            // An empty RouteConfiguration always compiles.
                            Arc::new(route_config::compile(&none, &opts).unwrap_or_else(|_| {
                                unreachable!("the empty route configuration compiles")
                            }))
                        })
                        .clone()
                }),
        }
    }
}

static EMPTY_ROUTES: std::sync::OnceLock<Arc<RouteTable>> = std::sync::OnceLock::new();

pub fn compile(
    env: &crate::listener::ListenerEnv<'_>,
    direction: crate::listener::TrafficDirection,
    hcm: &pb::HttpConnectionManager,
    listener_stat_prefix: &str,
    known_clusters: &HashSet<String>,
    store: &Store,
    path: &str,
) -> Result<HcmConfig, ConfigError> {
    let mut rest = hcm.clone();
    let stat_prefix = std::mem::take(&mut rest.stat_prefix);
    if stat_prefix.is_empty() {
        return Err(invalid(
            format!("{path}.stat_prefix"),
            "value length must be at least 1 characters",
        ));
    }
    let codec = match pb::http_connection_manager::CodecType::try_from(std::mem::take(
        &mut rest.codec_type,
    )) {
        Ok(pb::http_connection_manager::CodecType::Auto) => Codec::Auto,
        Ok(pb::http_connection_manager::CodecType::Http1) => Codec::Http1,
        Ok(pb::http_connection_manager::CodecType::Http2) => Codec::Http2,
        _ => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "'codecType: HTTP3'".into(),
            })
        }
    };
    let routes = match rest.route_specifier.take() {
        Some(pb::http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            Routes::Static(Arc::new(route_config::compile(
                &rc,
                &CompileOptions {
                    known_clusters: Some(known_clusters),
                    from_rds: false,
                },
            )?))
        }
        Some(pb::http_connection_manager::RouteSpecifier::Rds(rds)) => {
            let rp = format!("{path}.rds");
            let mut rds_rest = rds.clone();
            let name = std::mem::take(&mut rds_rest.route_config_name);
            let wait = match rds_rest.config_source.take() {
                Some(cs) => {
                    crate::config::dynamic::ads_source(&cs, &format!("{rp}.config_source"))?
                }
                None => return Err(invalid(format!("{rp}.config_source"), "value is required")),
            };
            reject_unhandled(&rds_rest, &rp)?;
            Routes::Rds(name, wait)
        }
        Some(_) => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "'scoped_routes'".into(),
            })
        }
        None => return Err(invalid(path, "route_specifier is required")),
    };
    let mut filters: Vec<Arc<dyn HttpFilterFactory>> = Vec::new();
    let filters_pb = std::mem::take(&mut rest.http_filters);
    let mut saw_router = false;
    let mut reads_cluster_istio = false;
    let mut istio_stats = Vec::new();
    let mut grpc_stats = None;
    // The chain's compressors choose an encoding together: each needs all of them.
    let mut compressors = Vec::new();
    for (i, f) in filters_pb.iter().enumerate() {
        if let Some(xds_client::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(a)) = &f.config_type {
            if TypeRegistry::effective_type_url(a) == petrel_filters::http::compressor::TYPE_URL {
                compressors.push(Arc::new(petrel_filters::http::compressor::Config::compile(
                    a,
                    &format!("{path}.http_filters[{i}].typed_config"),
                    store,
                    &format!("http.{stat_prefix}."),
                )?));
            }
        }
    }
    let compressor_chain: Arc<[_]> = compressors.clone().into();
    let mut compressors = compressors.into_iter();
    for (i, f) in filters_pb.iter().enumerate() {
        let fp = format!("{path}.http_filters[{i}]");
        if saw_router {
            return Err(invalid(&fp, "Error: terminal filter named envoy.filters.http.router of type envoy.filters.http.router must be the last filter in a http filter chain."));
        }
        let any = match &f.config_type {
            Some(xds_client::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(a)) => a.clone(),
            _ => return Err(invalid(&fp, format!("filter '{}' needs a typed_config", f.name))),
        };
        let url = TypeRegistry::effective_type_url(&any);
        if url == "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" {
            let r: Router = TypeRegistry::global().unpack(&any)?;
            reject_unhandled(&r, &format!("{fp}.typed_config"))?;
            saw_router = true;
            continue;
        }
        if url == petrel_filters::http::compressor::TYPE_URL {
            if let Some(config) = compressors.next() {
                filters.push(Arc::new(petrel_filters::http::compressor::Factory::new(
                    &f.name,
                    config,
                    compressor_chain.clone(),
                )));
            }
            continue;
        }
        if url == super::istio_alpn::TYPE_URL {
            filters.push(Arc::new(super::istio_alpn::Factory::compile(
                &f.name,
                &any,
                &format!("{fp}.typed_config"),
            )?));
            continue;
        }
        if url == petrel_filters::http::peer_metadata::TYPE_URL {
            filters.push(Arc::new(
                petrel_filters::http::peer_metadata::Factory::compile(
                    &f.name,
                    &any,
                    env.node,
                    &format!("{fp}.typed_config"),
                )?,
            ));
            reads_cluster_istio = true;
            continue;
        }
        if url == super::grpc_stats::TYPE_URL {
            if grpc_stats.is_some() {
                return Err(invalid(
                    &fp,
                    "a second grpc_stats filter in one chain is not supported",
                ));
            }
            // It counts the stream's messages and charges the cluster when the stream ends.
            grpc_stats = Some(Arc::new(super::grpc_stats::GrpcStatsConfig::compile(
                &any,
                store,
                &format!("{fp}.typed_config"),
            )?));
            continue;
        }
        if url == crate::observe::istio_stats::TYPE_URL {
            // It reports when the stream ends, as the access log it is in Envoy.
            istio_stats.push(Arc::new(crate::observe::istio_stats::IstioStats::compile(
                &any,
                env.node,
                direction,
                store,
                &format!("{fp}.typed_config"),
            )?));
            continue;
        }
        if url == crate::rbac::http::TYPE_URL {
            filters.push(Arc::new(crate::rbac::http::Factory::compile(
                &f.name,
                &any,
                store,
                &format!("http.{stat_prefix}."),
                &format!("{fp}.typed_config"),
            )?));
            continue;
        }
        match petrel_filters::http::factory(
            &f.name,
            &any,
            &format!("{fp}.typed_config"),
            store,
            &format!("http.{stat_prefix}."),
        ) {
            Some(factory) => {
                filters.push(factory?);
                continue;
            }
            // Envoy skips optional filters it does not know; so do we.
            None if f.is_optional => continue,
            None => {}
        }
        return Err(ConfigError::UnsupportedExtension {
            path: fp,
            type_url: url.clone(),
            why: petrel_filters::extensions::refusal(&url),
        });
    }
    if !saw_router {
        return Err(invalid(
            format!("{path}.http_filters"),
            "the router filter (envoy.filters.http.router) must be the last filter",
        ));
    }
    let use_remote_address = rest
        .use_remote_address
        .take()
        .map(|b| b.value)
        .unwrap_or(false);
    let xff_num_trusted_hops = std::mem::take(&mut rest.xff_num_trusted_hops);
    let skip_xff_append = std::mem::take(&mut rest.skip_xff_append);
    let server_name_s = std::mem::take(&mut rest.server_name);
    let server_name = http::HeaderValue::from_str(if server_name_s.is_empty() {
        "envoy"
    } else {
        &server_name_s
    })
    .map_err(|_| invalid(format!("{path}.server_name"), "invalid header value"))?;
    let server_header = match std::mem::take(&mut rest.server_header_transformation) {
        0 => ServerHeader::Overwrite,
        1 => ServerHeader::AppendIfAbsent,
        2 => ServerHeader::PassThrough,
        _ => {
            return Err(invalid(
                format!("{path}.server_header_transformation"),
                "unknown enum value",
            ))
        }
    };
    let generate_request_id = rest
        .generate_request_id
        .take()
        .map(|b| b.value)
        .unwrap_or(true);
    let preserve_external_request_id = std::mem::take(&mut rest.preserve_external_request_id);
    let always_set_request_id_in_response =
        std::mem::take(&mut rest.always_set_request_id_in_response);
    if let Some(ext) = rest.request_id_extension.take() {
        let any = ext.typed_config.ok_or_else(|| {
            invalid(
                format!("{path}.request_id_extension"),
                "typed_config is required",
            )
        })?;
        let cfg: xds_client::pb::envoy::extensions::request_id::uuid::v3::UuidRequestIdConfig =
            TypeRegistry::global().unpack(&any)?;
        // Only the defaults are honoured: packing the trace decision into the id comes with
        // tracing (issue #7).
        let pack = cfg.pack_trace_reason.map(|b| b.value).unwrap_or(true);
        let alt = cfg
            .use_request_id_for_trace_sampling
            .map(|b| b.value)
            .unwrap_or(true);
        if !pack || !alt {
            return Err(ConfigError::Unsupported {
                path: format!("{path}.request_id_extension"),
                fields: "non-default UuidRequestIdConfig".into(),
            });
        }
    }
    let max_request_headers_kb = rest
        .max_request_headers_kb
        .take()
        .map(|v| v.value)
        .unwrap_or(60);
    if !(1..=8192).contains(&max_request_headers_kb) {
        return Err(invalid(
            format!("{path}.max_request_headers_kb"),
            "value must be inside range [1, 8192]",
        ));
    }
    let stream_idle_timeout = match rest.stream_idle_timeout.take() {
        Some(d) => duration::optional_timeout(&Some(d), &format!("{path}.stream_idle_timeout"))?,
        None => Some(Duration::from_secs(300)),
    };
    let request_timeout = duration::optional_timeout(
        &rest.request_timeout.take(),
        &format!("{path}.request_timeout"),
    )?;
    let mut idle_timeout = Some(Duration::from_secs(3600));
    let mut max_headers_count = 100;
    let mut underscores = UnderscoreAction::Allow;
    if let Some(mut c) = rest.common_http_protocol_options.take() {
        let cp = format!("{path}.common_http_protocol_options");
        if let Some(d) = c.idle_timeout.take() {
            idle_timeout = duration::optional_timeout(&Some(d), &format!("{cp}.idle_timeout"))?;
        }
        if let Some(m) = c.max_headers_count.take() {
            max_headers_count = m.value;
        }
        underscores = match std::mem::take(&mut c.headers_with_underscores_action) {
            0 => UnderscoreAction::Allow,
            1 => UnderscoreAction::RejectRequest,
            2 => UnderscoreAction::DropHeader,
            _ => {
                return Err(invalid(
                    format!("{cp}.headers_with_underscores_action"),
                    "unknown enum value",
                ))
            }
        };
        reject_unhandled(&c, &cp)?;
    }
    let request_headers_timeout = duration::optional_timeout(
        &rest.request_headers_timeout.take(),
        &format!("{path}.request_headers_timeout"),
    )?;
    use super::path_normalization::{EscapedSlashes, PathPolicy};
    let escaped_slashes = match std::mem::take(&mut rest.path_with_escaped_slashes_action) {
        // IMPLEMENTATION_SPECIFIC_DEFAULT is KEEP_UNCHANGED in Envoy 1.40.
        0 | 1 => EscapedSlashes::KeepUnchanged,
        2 => EscapedSlashes::RejectRequest,
        3 => EscapedSlashes::UnescapeAndRedirect,
        4 => EscapedSlashes::UnescapeAndForward,
        _ => {
            return Err(invalid(
                format!("{path}.path_with_escaped_slashes_action"),
                "unknown enum value",
            ))
        }
    };
    let path_policy = PathPolicy {
        escaped_slashes,
        normalize_path: rest.normalize_path.take().map(|b| b.value).unwrap_or(false),
        merge_slashes: std::mem::take(&mut rest.merge_slashes),
    };
    let mut internal_cidrs = Vec::new();
    if let Some(iac) = rest.internal_address_config.take() {
        let ip = format!("{path}.internal_address_config");
        for (i, c) in iac.cidr_ranges.iter().enumerate() {
            internal_cidrs.push(
                petrel_filters::matcher::Cidr::from_proto(c, &format!("{ip}.cidr_ranges[{i}]"))
                    .map_err(|e| invalid(&ip, e.to_string()))?,
            );
        }
        // Petrel listens on no Unix sockets yet, so `unix_sockets` has no peer to apply to.
        if iac.unix_sockets {
            return Err(ConfigError::Unsupported {
                path: ip,
                fields: "'unix_sockets' (Unix-socket listeners come with issue #4)".into(),
            });
        }
    }
    let local_reply = match rest.local_reply_config.take() {
        Some(c) => super::local_reply_config::LocalReplyConfig::compile(
            &c,
            &format!("{path}.local_reply_config"),
        )?,
        None => Default::default(),
    };
    let mut websocket = false;
    for (i, u) in std::mem::take(&mut rest.upgrade_configs).iter().enumerate() {
        let up = format!("{path}.upgrade_configs[{i}]");
        if !u.upgrade_type.eq_ignore_ascii_case("websocket") {
            return Err(ConfigError::Unsupported {
                path: up,
                fields: format!(
                    "'upgradeType: {}' (only websocket is supported)",
                    u.upgrade_type
                ),
            });
        }
        if !u.filters.is_empty() {
            return Err(ConfigError::Unsupported {
                path: up,
                fields: "'filters'".into(),
            });
        }
        websocket = u.enabled.as_ref().map(|b| b.value).unwrap_or(true);
    }
    let client_cert = super::forward_client_cert::ClientCertPolicy::compile(
        std::mem::take(&mut rest.forward_client_cert_details),
        rest.set_current_client_cert_details.take().as_ref(),
        path,
    )?;
    let access_logs = crate::observe::access_log::compile_all(
        &std::mem::take(&mut rest.access_log),
        store,
        &format!("{path}.access_log"),
    )?;
    let tracing = match rest.tracing.take() {
        Some(t) => Some(Arc::new(compile_tracing(
            &t,
            direction.egress(),
            env,
            known_clusters,
            store,
            &stat_prefix,
            path,
        )?)),
        None => None,
    };
    reject_unhandled(&rest, path)?;
    let stats = HcmStats::new(store, &format!("http.{stat_prefix}."));
    let listener_stats =
        HcmListenerStats::new(store, &format!("{listener_stat_prefix}http.{stat_prefix}."));
    Ok(HcmConfig {
        internal_cidrs,
        local_reply,
        stream_idle_timeout,
        request_timeout,
        idle_timeout,
        websocket,
        local_address: env.local_address,
        stat_prefix,
        codec,
        routes,
        filters,
        use_remote_address,
        xff_num_trusted_hops,
        skip_xff_append,
        server_name,
        server_header,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        max_request_headers_kb,
        max_headers_count,
        underscores,
        request_headers_timeout,
        path_policy,
        stats,
        client_cert,
        access_logs,
        listener_stats,
        tracing,
        istio_stats: istio_stats.into(),
        reads_cluster_istio,
        grpc_stats,
    })
}

/// `tracing`, with the bootstrap's tracer unless it names its own, and its collector cluster
/// checked as Envoy checks it.
fn compile_tracing(
    t: &pb::http_connection_manager::Tracing,
    egress: bool,
    env: &crate::listener::ListenerEnv<'_>,
    known_clusters: &HashSet<String>,
    store: &Store,
    stat_prefix: &str,
    path: &str,
) -> Result<crate::observe::tracing::TracingConfig, ConfigError> {
    use crate::observe::tracing;
    let path = format!("{path}.tracing");
    let tenv = tracing::TracingEnv {
        default_driver: env.tracing,
        node: tracing::zipkin::LocalNode {
            cluster: &env.node.cluster,
            address: env.local_address,
        },
        node_id: &env.node.id,
        known_clusters: &|c| known_clusters.contains(c),
        store,
    };
    tracing::compile(t, egress, &tenv, stat_prefix, &path)
}
