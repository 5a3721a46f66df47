//! HCM `local_reply_config`: mappers that rewrite locally generated replies (status, body,
//! headers) and the body format, applied in Envoy's order: body, headers_to_add, status_code,
//! then the body format (mapper override, else the config's).

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use xds_client::pb::envoy::extensions::filters::network::http_connection_manager::v3::LocalReplyConfig as PbLocalReplyConfig;

use super::local_reply::LocalReply;
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::access_log_filter::{FilterInput, LogFilter};
use crate::observe::formatter::{StreamValues, SubstitutionFormat};
use petrel_filters::header_formatter::{FormatContext, HeaderMutations};

#[derive(Debug)]
struct Mapper {
    filter: LogFilter,
    status: Option<StatusCode>,
    body: Option<Bytes>,
    body_format: Option<SubstitutionFormat>,
    headers: HeaderMutations,
}

#[derive(Debug, Default)]
pub struct LocalReplyConfig {
    mappers: Vec<Mapper>,
    body_format: Option<SubstitutionFormat>,
}

/// The stream facts a mapper and a body format can read.
pub struct ReplyContext<'a> {
    pub request_headers: Option<&'a HeaderMap>,
    pub format: &'a FormatContext<'a>,
}

impl LocalReplyConfig {
    pub fn compile(c: &PbLocalReplyConfig, path: &str) -> Result<LocalReplyConfig, ConfigError> {
        let mut rest = c.clone();
        let mut mappers = Vec::new();
        for (i, m) in std::mem::take(&mut rest.mappers).iter().enumerate() {
            let mp = format!("{path}.mappers[{i}]");
            let mut mrest = m.clone();
            let f = mrest
                .filter
                .take()
                .ok_or_else(|| invalid(format!("{mp}.filter"), "value is required"))?;
            let filter = LogFilter::compile(&f, &format!("{mp}.filter"))?;
            let status = match mrest.status_code.take() {
                Some(v) => Some(
                    StatusCode::from_u16(v.value as u16)
                        .ok()
                        .filter(|s| (200..600).contains(&s.as_u16()))
                        .ok_or_else(|| {
                            invalid(
                                format!("{mp}.status_code"),
                                "value must be inside range [200, 600)",
                            )
                        })?,
                ),
                None => None,
            };
            let body = match mrest.body.take() {
                Some(ds) => Some(crate::config::bootstrap::data_source(
                    &ds,
                    &format!("{mp}.body"),
                )?),
                None => None,
            };
            let body_format = match mrest.body_format_override.take() {
                Some(f) => Some(SubstitutionFormat::compile_for_local_reply(
                    &f,
                    &format!("{mp}.body_format_override"),
                )?),
                None => None,
            };
            let headers = HeaderMutations::compile(
                &std::mem::take(&mut mrest.headers_to_add),
                &[],
                &format!("{mp}.headers"),
            )?;
            reject_unhandled(&mrest, &mp)?;
            mappers.push(Mapper {
                filter,
                status,
                body,
                body_format,
                headers,
            });
        }
        let body_format = match rest.body_format.take() {
            Some(f) => Some(SubstitutionFormat::compile_for_local_reply(
                &f,
                &format!("{path}.body_format"),
            )?),
            None => None,
        };
        reject_unhandled(&rest, path)?;
        Ok(LocalReplyConfig {
            mappers,
            body_format,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.mappers.is_empty() && self.body_format.is_none()
    }

    /// Rewrites a local reply in place.
    pub fn apply(&self, reply: &mut LocalReply, ctx: &ReplyContext<'_>) {
        let input = FilterInput {
            response_code: reply.status.as_u16(),
            response_flags: reply.flag,
            request_headers: ctx.request_headers,
            duration: None,
        };
        let mapper = self.mappers.iter().find(|m| m.filter.matches(&input));
        let mut format = self.body_format.as_ref();
        if let Some(m) = mapper {
            if let Some(b) = &m.body {
                reply.body = b.clone();
            }
            m.headers.apply(&mut reply.headers, ctx.format);
            if let Some(s) = m.status {
                reply.status = s;
            }
            if m.body_format.is_some() {
                format = m.body_format.as_ref();
            }
        }
        if let Some(f) = format {
            let body_text = String::from_utf8_lossy(&reply.body).into_owned();
            let mut values = StreamValues::new(
                ctx.format.start_time,
                ctx.format.downstream_remote,
                ctx.format.downstream_local,
            );
            values.request_headers = ctx.request_headers;
            values.response_headers = Some(&reply.headers);
            values.response_code = reply.status.as_u16();
            values.response_flags = reply.flag;
            values.response_code_details = reply.details;
            values.local_reply_body = &body_text;
            values.protocol = ctx.format.protocol;
            let (body, content_type) = f.render(&values);
            reply.body = Bytes::from(body);
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                reply.headers.insert(CONTENT_TYPE, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: serde_json::Value) -> LocalReplyConfig {
        let c: PbLocalReplyConfig = xds_client::TypeRegistry::global()
            .from_json(&v, false)
            .unwrap();
        LocalReplyConfig::compile(&c, "local_reply_config").unwrap()
    }

    fn fctx() -> FormatContext<'static> {
        FormatContext {
            downstream_remote: "1.2.3.4:5".parse().unwrap(),
            downstream_local: "127.0.0.1:80".parse().unwrap(),
            protocol: "HTTP/1.1",
            request_headers: None,
            upstream: None,
            start_time: std::time::UNIX_EPOCH,
        }
    }

    #[test]
    fn mapper_then_format() {
        let c = config(json!({
            "mappers": [{
                "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": 503, "runtime_key": "k"}}}},
                "status_code": 502,
                "body": {"inline_string": "replaced"},
                "headers_to_add": [{"header": {"key": "x-orig", "value": "%REQ(x-id)%"}}]
            }],
            "body_format": {"text_format": "%RESPONSE_CODE%: %LOCAL_REPLY_BODY% (%RESPONSE_FLAGS%)"}
        }));
        let mut r = LocalReply::no_healthy_upstream();
        let f = fctx();
        c.apply(
            &mut r,
            &ReplyContext {
                request_headers: None,
                format: &f,
            },
        );
        assert_eq!(r.status, 502);
        assert_eq!(&r.body[..], b"502: replaced (UH)");
        assert_eq!(r.headers[CONTENT_TYPE], "text/plain");
        // An unmatched reply still gets the config's body format.
        let mut nr = LocalReply::route_not_found();
        c.apply(
            &mut nr,
            &ReplyContext {
                request_headers: None,
                format: &f,
            },
        );
        assert_eq!(&nr.body[..], b"404:  (NR)");
    }

    #[test]
    fn stream_only_operators_refused() {
        for f in [
            "%REQ(:PATH)%",
            "%UPSTREAM_HOST%",
            "%BYTES_SENT%",
            "%REQ(x?:authority)%",
        ] {
            let c: PbLocalReplyConfig = xds_client::TypeRegistry::global()
                .from_json(&json!({"body_format": {"text_format": f}}), false)
                .unwrap();
            let e = LocalReplyConfig::compile(&c, "local_reply_config").unwrap_err();
            assert!(e.to_string().contains("body_format"), "{f}: {e}");
        }
    }
}
