//! `envoy.filters.http.header_mutation`: request and response header mutations (remove/append
//! with Envoy's substitution formatters).

use std::sync::Arc;

use http::HeaderMap;
use xds_client::pb::envoy::config::common::mutation_rules::v3::header_mutation::Action;
use xds_client::pb::envoy::config::common::mutation_rules::v3::HeaderMutation as PbMutation;
use xds_client::pb::envoy::extensions::filters::http::header_mutation::v3::HeaderMutation;
use xds_client::pb::google::protobuf::Any;

use crate::header_formatter::{FormatContext, HeaderMutations};
use crate::http_filter::{FilterStatus, HttpFilter, HttpFilterFactory, RequestHead, ResponseHead};
use crate::{invalid, FilterConfigError};

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";

/// One ordered list of mutations (each a remove or an append, applied in order).
#[derive(Debug)]
struct MutationList(Vec<HeaderMutations>);

impl MutationList {
    fn compile(list: &[PbMutation], path: &str) -> Result<MutationList, FilterConfigError> {
        let mut out = Vec::new();
        for (i, m) in list.iter().enumerate() {
            let p = format!("{path}[{i}]");
            out.push(match &m.action {
                Some(Action::Remove(h)) => {
                    HeaderMutations::compile(&[], std::slice::from_ref(h), &p)?
                }
                Some(Action::Append(o)) => {
                    HeaderMutations::compile(std::slice::from_ref(o), &[], &p)?
                }
                Some(_) => {
                    return Err(invalid(
                        p,
                        "only 'remove' and 'append' header mutations are supported by Petrel",
                    ))
                }
                None => return Err(invalid(p, "action is required")),
            });
        }
        Ok(MutationList(out))
    }

    fn apply(&self, headers: &mut HeaderMap, ctx: &FormatContext<'_>) {
        for m in &self.0 {
            m.apply(headers, ctx);
        }
    }
}

#[derive(Debug)]
struct Lists {
    request: MutationList,
    response: MutationList,
}

/// The compiled filter config; each stream gets a [`Filter`] sharing its lists.
#[derive(Debug)]
pub struct Factory {
    name: String,
    lists: Arc<Lists>,
}

impl Factory {
    pub fn compile(name: &str, any: &Any, path: &str) -> Result<Factory, FilterConfigError> {
        let cfg: HeaderMutation = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, e.to_string()))?;
        if cfg.most_specific_header_mutations_wins {
            return Err(invalid(path, "most_specific_header_mutations_wins is not supported by Petrel (it only matters with per-route configs, which are refused)"));
        }
        let m = cfg.mutations.unwrap_or_default();
        if !m.query_parameter_mutations.is_empty()
            || !m.response_trailers_mutations.is_empty()
            || !m.request_trailers_mutations.is_empty()
        {
            return Err(invalid(
                path,
                "query parameter and trailer mutations are not supported by Petrel",
            ));
        }
        Ok(Factory {
            name: name.to_string(),
            lists: Arc::new(Lists {
                request: MutationList::compile(
                    &m.request_mutations,
                    &format!("{path}.mutations.request_mutations"),
                )?,
                response: MutationList::compile(
                    &m.response_mutations,
                    &format!("{path}.mutations.response_mutations"),
                )?,
            }),
        })
    }
}

struct Filter {
    lists: Arc<Lists>,
    /// Request headers as the filter saw them, for `%REQ(…)%` in response mutations.
    request_headers: Option<HeaderMap>,
}

impl HttpFilterFactory for Factory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self) -> Box<dyn HttpFilter> {
        Box::new(Filter {
            lists: self.lists.clone(),
            request_headers: None,
        })
    }
}

impl HttpFilter for Filter {
    fn decode_headers(&mut self, req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        let snapshot = req.headers.clone();
        let ctx = FormatContext {
            downstream_remote: req.info.downstream_remote,
            downstream_local: req.info.downstream_local,
            protocol: req.info.protocol,
            request_headers: Some(&snapshot),
            upstream: None,
            start_time: req.info.start_time,
        };
        self.lists.request.apply(req.headers, &ctx);
        self.request_headers = Some(snapshot);
        FilterStatus::Continue
    }

    fn encode_headers(&mut self, resp: &mut ResponseHead<'_>) -> FilterStatus {
        let ctx = FormatContext {
            downstream_remote: resp.info.downstream_remote,
            downstream_local: resp.info.downstream_local,
            protocol: resp.info.protocol,
            request_headers: self.request_headers.as_ref(),
            upstream: None,
            start_time: resp.info.start_time,
        };
        self.lists.response.apply(resp.headers, &ctx);
        FilterStatus::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_filter::StreamInfo;
    use prost::Message;

    fn factory(v: serde_json::Value) -> Result<Factory, FilterConfigError> {
        let cfg: HeaderMutation = xds_client::TypeRegistry::global()
            .from_json(&v, false)
            .map_err(|e| invalid("x", e.to_string()))?;
        let any = Any {
            type_url: TYPE_URL.into(),
            value: cfg.encode_to_vec(),
        };
        Factory::compile("hm", &any, "filter")
    }

    #[test]
    fn request_and_response_mutations() {
        let f = factory(serde_json::json!({"mutations": {
            "request_mutations": [{"remove": "x-drop"}, {"append": {"header": {"key": "x-copy", "value": "%REQ(x-src)%"}}}],
            "response_mutations": [{"append": {"header": {"key": "x-seen", "value": "%REQ(x-src)%"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]
        }}))
        .unwrap();
        let info = StreamInfo {
            downstream_remote: "1.1.1.1:1".parse().unwrap(),
            downstream_local: "2.2.2.2:2".parse().unwrap(),
            protocol: "HTTP/1.1",
            start_time: std::time::UNIX_EPOCH,
            downstream_direct_remote: "1.1.1.1:1".parse().unwrap(),
            requested_server_name: "",
            peer: None,
            scheme: "http",
            authority: "a",
            filter_state: &Default::default(),
        };
        let mut filter = f.create();
        let mut h = HeaderMap::new();
        h.insert("x-drop", "1".parse().unwrap());
        h.insert("x-src", "v".parse().unwrap());
        let m = http::Method::GET;
        let mut alpn = None;
        let mut head = RequestHead {
            method: &m,
            path: "/",
            headers: &mut h,
            info: &info,
            route: None,
            upstream_alpn: &mut alpn,
            dynamic_metadata: &mut Default::default(),
            peers: &mut Default::default(),
        };
        assert_eq!(
            filter.decode_headers(&mut head, true),
            FilterStatus::Continue
        );
        assert!(h.get("x-drop").is_none());
        assert_eq!(h["x-copy"], "v");
        let mut status = http::StatusCode::OK;
        let mut rh = HeaderMap::new();
        filter.encode_headers(&mut ResponseHead {
            status: &mut status,
            headers: &mut rh,
            info: &info,
            end_stream: false,
            peers: &mut Default::default(),
            cluster: None,
            cluster_istio: None,
        });
        assert_eq!(rh["x-seen"], "v");
    }

    #[test]
    fn unsupported_parts_refused() {
        assert!(factory(
            serde_json::json!({"mutations": {"query_parameter_mutations": [{"remove": "a"}]}})
        )
        .is_err());
    }
}
