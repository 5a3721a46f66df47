//! HTTP filters, one module per Envoy extension, and the factory registry keyed by type URL.

pub mod compressor;
pub mod cors;
pub mod fault;
pub mod header_mutation;
pub mod peer_metadata;

use std::sync::Arc;

use xds_client::pb::google::protobuf::Any;

use crate::http_filter::{HttpFilterFactory, RouteFilterConfig};
use crate::stats::Store;
use crate::FilterConfigError;

/// Builds the factory for an HTTP filter config, or `None` when Petrel has no such filter (the
/// caller refuses it with the extension table's reason). Filter stats go under `stat_prefix`
/// (the connection manager's `http.<stat_prefix>.`).
pub fn factory(
    name: &str,
    config: &Any,
    path: &str,
    store: &Store,
    stat_prefix: &str,
) -> Option<Result<Arc<dyn HttpFilterFactory>, FilterConfigError>> {
    let url = xds_client::TypeRegistry::effective_type_url(config);
    match url.as_str() {
        cors::TYPE_URL => Some(
            cors::Factory::compile(name, config, path, store, stat_prefix)
                .map(|f| Arc::new(f) as Arc<dyn HttpFilterFactory>),
        ),
        fault::TYPE_URL => Some(
            fault::Factory::compile(name, config, path, store, stat_prefix)
                .map(|f| Arc::new(f) as Arc<dyn HttpFilterFactory>),
        ),
        header_mutation::TYPE_URL => Some(
            header_mutation::Factory::compile(name, config, path)
                .map(|f| Arc::new(f) as Arc<dyn HttpFilterFactory>),
        ),
        _ => None,
    }
}

/// Compiles a route's `typed_per_filter_config` entry, or `None` when no Petrel filter takes
/// that type per route.
pub fn per_route(config: &Any, path: &str) -> Option<Result<RouteFilterConfig, FilterConfigError>> {
    match xds_client::TypeRegistry::effective_type_url(config).as_str() {
        fault::TYPE_URL => Some(fault::per_route(config, path)),
        cors::POLICY_TYPE_URL => Some(cors::per_route(config, path)),
        _ => None,
    }
}
