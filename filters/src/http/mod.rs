//! HTTP filters, one module per Envoy extension, and the factory registry keyed by type URL.

pub mod header_mutation;

use std::sync::Arc;

use xds_client::pb::google::protobuf::Any;

use crate::http_filter::HttpFilterFactory;
use crate::FilterConfigError;

/// Builds the factory for an HTTP filter config, or `None` when Petrel has no such filter (the
/// caller refuses it with the extension table's reason).
pub fn factory(
    name: &str,
    config: &Any,
    path: &str,
) -> Option<Result<Arc<dyn HttpFilterFactory>, FilterConfigError>> {
    let url = xds_client::TypeRegistry::effective_type_url(config);
    match url.as_str() {
        header_mutation::TYPE_URL => Some(
            header_mutation::Factory::compile(name, config, path)
                .map(|f| Arc::new(f) as Arc<dyn HttpFilterFactory>),
        ),
        _ => None,
    }
}
