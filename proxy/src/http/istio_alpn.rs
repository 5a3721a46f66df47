//! Istio's `istio.alpn` HTTP filter: the ALPN protocols a request's upstream TLS connection
//! offers, by the upstream's protocol, instead of the cluster's (`istio-http/1.1`, `istio-h2`,
//! … so that the peer sidecar's filter chains can tell an Istio client). Connections offering
//! an override are pooled apart from the others.

use std::sync::Arc;

use petrel_filters::http_filter::{
    FilterStatus, HttpFilter, HttpFilterFactory, RequestHead, UpstreamAlpn,
};
use prost::Message;
use xds_client::pb::google::protobuf::Any;

use crate::config::{invalid, ConfigError};

pub const TYPE_URL: &str =
    "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig";

/// `istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig`.
#[derive(Clone, PartialEq, Message)]
struct FilterConfig {
    #[prost(message, repeated, tag = "1")]
    alpn_override: Vec<AlpnOverride>,
}

impl prost::Name for FilterConfig {
    const NAME: &'static str = "FilterConfig";
    const PACKAGE: &'static str = "istio.envoy.config.filter.http.alpn.v2alpha1";
}

#[derive(Clone, PartialEq, Message)]
struct AlpnOverride {
    /// HTTP10 = 0, HTTP11 = 1, HTTP2 = 2.
    #[prost(int32, tag = "1")]
    upstream_protocol: i32,
    #[prost(string, repeated, tag = "2")]
    alpn_override: Vec<String>,
}

#[derive(Debug)]
pub struct Factory {
    name: String,
    alpn: Arc<UpstreamAlpn>,
}

impl Factory {
    pub fn compile(name: &str, any: &Any, path: &str) -> Result<Factory, ConfigError> {
        // Through the registry, so a `TypedStruct` form decodes too.
        let cfg: FilterConfig = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, format!("cannot decode istio.alpn config: {e}")))?;
        let mut alpn = UpstreamAlpn::default();
        for (i, o) in cfg.alpn_override.iter().enumerate() {
            let list: Arc<[Vec<u8>]> = o
                .alpn_override
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect();
            let slot = match o.upstream_protocol {
                0 => &mut alpn.http10,
                1 => &mut alpn.http11,
                2 => &mut alpn.http2,
                _ => {
                    return Err(invalid(
                        format!("{path}.alpn_override[{i}].upstream_protocol"),
                        "unknown protocol",
                    ))
                }
            };
            *slot = Some(list);
        }
        Ok(Factory {
            name: name.to_string(),
            alpn: Arc::new(alpn),
        })
    }
}

impl HttpFilterFactory for Factory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self) -> Box<dyn HttpFilter> {
        Box::new(Filter(self.alpn.clone()))
    }
}

struct Filter(Arc<UpstreamAlpn>);

impl HttpFilter for Filter {
    fn decode_headers(&mut self, req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        *req.upstream_alpn = Some(self.0.clone());
        FilterStatus::Continue
    }
}
