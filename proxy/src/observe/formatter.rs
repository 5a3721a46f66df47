//! Envoy's substitution formatter (`SubstitutionFormatString`): text and JSON formats with
//! command operators, compiled once. Used by `local_reply_config` now and by access logs next.
//!
//! Missing values render as `-` in text and `null` in JSON (typed), as Envoy renders them.

use std::net::SocketAddr;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName};
use xds_client::pb::envoy::config::core::v3::{
    substitution_format_string::Format, SubstitutionFormatString,
};

use crate::config::{invalid, reject_unhandled, ConfigError};

/// What a format may read about one stream.
pub struct StreamValues<'a> {
    pub request_headers: Option<&'a HeaderMap>,
    pub response_headers: Option<&'a HeaderMap>,
    pub response_code: u16,
    pub response_flags: &'a str,
    pub response_code_details: &'a str,
    pub local_reply_body: &'a str,
    pub protocol: &'a str,
    pub start_time: SystemTime,
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Literal(String),
    Req {
        name: HeaderName,
        alt: Option<HeaderName>,
        max: Option<usize>,
    },
    Resp {
        name: HeaderName,
        alt: Option<HeaderName>,
        max: Option<usize>,
    },
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    LocalReplyBody,
    Protocol,
    StartTime,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
}

/// A compiled text format.
#[derive(Debug, Clone, PartialEq)]
pub struct TextFormat {
    ops: Vec<Op>,
}

fn header(s: &str, path: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
        .map_err(|_| invalid(path, format!("Invalid header name '{s}'")))
}

fn header_op(arg: &str, max: Option<usize>, path: &str, resp: bool) -> Result<Op, ConfigError> {
    let (main, alt) = match arg.split_once('?') {
        Some((m, a)) => (m, Some(header(a, path)?)),
        None => (arg, None),
    };
    let name = header(main, path)?;
    Ok(if resp {
        Op::Resp { name, alt, max }
    } else {
        Op::Req { name, alt, max }
    })
}

impl TextFormat {
    pub fn compile(src: &str, path: &str) -> Result<TextFormat, ConfigError> {
        use petrel_filters::substitution::{tokenize, Token, TokenError};
        let tokens = tokenize(src).map_err(|e| match e {
            TokenError::Unterminated(at) => invalid(
                path,
                format!(
                    "Incorrect configuration: {src}. Couldn't find valid command at position {at}"
                ),
            ),
            TokenError::UnclosedArgument(raw) => {
                invalid(path, format!("Incorrect configuration: %{raw}%"))
            }
        })?;
        let mut ops = Vec::with_capacity(tokens.len());
        for t in tokens {
            ops.push(match t {
                Token::Literal(l) => Op::Literal(l),
                Token::Command { name, arg, max, .. } => Self::command(name, arg, max, path)?,
            });
        }
        Ok(TextFormat { ops })
    }

    fn command(
        name: &str,
        arg: Option<&str>,
        max: Option<&str>,
        path: &str,
    ) -> Result<Op, ConfigError> {
        let max = match max {
            Some(m) => Some(
                m.parse::<usize>()
                    .map_err(|_| invalid(path, format!("Length must be an integer, given: {m}")))?,
            ),
            None => None,
        };
        Ok(match (name, arg) {
            ("REQ", Some(a)) => header_op(a, max, path, false)?,
            ("RESP", Some(a)) => header_op(a, max, path, true)?,
            ("RESPONSE_CODE", None) => Op::ResponseCode,
            ("RESPONSE_FLAGS", None) => Op::ResponseFlags,
            ("RESPONSE_CODE_DETAILS", None) => Op::ResponseCodeDetails,
            ("LOCAL_REPLY_BODY", None) => Op::LocalReplyBody,
            ("PROTOCOL", None) => Op::Protocol,
            ("START_TIME", None) => Op::StartTime,
            ("DOWNSTREAM_REMOTE_ADDRESS", None) => Op::DownstreamRemoteAddress,
            ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None) => Op::DownstreamRemoteAddressWithoutPort,
            ("DOWNSTREAM_LOCAL_ADDRESS", None) => Op::DownstreamLocalAddress,
            ("DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", None) => Op::DownstreamLocalAddressWithoutPort,
            _ => return Err(invalid(path, format!("Not supported field in StreamInfo: {name} (command operator not supported by Petrel yet)"))),
        })
    }

    fn op_value(op: &Op, v: &StreamValues<'_>) -> Option<String> {
        let hdr = |map: Option<&HeaderMap>,
                   name: &HeaderName,
                   alt: &Option<HeaderName>,
                   max: &Option<usize>| {
            let map = map?;
            let val = map
                .get(name)
                .or_else(|| alt.as_ref().and_then(|a| map.get(a)))?;
            let s = String::from_utf8_lossy(val.as_bytes()).into_owned();
            Some(match max {
                Some(m) => s.chars().take(*m).collect(),
                None => s,
            })
        };
        match op {
            Op::Literal(s) => Some(s.clone()),
            Op::Req { name, alt, max } => hdr(v.request_headers, name, alt, max),
            Op::Resp { name, alt, max } => hdr(v.response_headers, name, alt, max),
            Op::ResponseCode => Some(v.response_code.to_string()),
            Op::ResponseFlags => Some(if v.response_flags.is_empty() {
                "-".into()
            } else {
                v.response_flags.to_string()
            }),
            Op::ResponseCodeDetails => {
                (!v.response_code_details.is_empty()).then(|| v.response_code_details.to_string())
            }
            Op::LocalReplyBody => Some(v.local_reply_body.to_string()),
            Op::Protocol => Some(v.protocol.to_string()),
            Op::StartTime => Some(crate::http::date::rfc3339_millis(v.start_time)),
            Op::DownstreamRemoteAddress => Some(v.downstream_remote.to_string()),
            Op::DownstreamRemoteAddressWithoutPort => Some(v.downstream_remote.ip().to_string()),
            Op::DownstreamLocalAddress => Some(v.downstream_local.to_string()),
            Op::DownstreamLocalAddressWithoutPort => Some(v.downstream_local.ip().to_string()),
        }
    }

    pub fn format(&self, v: &StreamValues<'_>) -> String {
        let mut out = String::new();
        for op in &self.ops {
            out.push_str(Self::op_value(op, v).as_deref().unwrap_or("-"));
        }
        out
    }

    /// A JSON value: a lone operator keeps its type (numbers stay numbers), text otherwise.
    fn json_value(&self, v: &StreamValues<'_>) -> serde_json::Value {
        match self.ops.as_slice() {
            [Op::ResponseCode] => serde_json::Value::from(v.response_code),
            [op] if !matches!(op, Op::Literal(_)) => match Self::op_value(op, v) {
                Some(s) => serde_json::Value::String(s),
                None => serde_json::Value::Null,
            },
            _ => serde_json::Value::String(self.format(v)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum JsonNode {
    Format(TextFormat),
    Object(Vec<(String, JsonNode)>),
    Other(serde_json::Value),
}

/// A compiled `SubstitutionFormatString`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubstitutionFormat {
    kind: Kind,
    pub content_type: Option<String>,
    omit_empty_values: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Text(TextFormat),
    Json(Vec<(String, JsonNode)>),
}

fn compile_json(v: &serde_json::Value, path: &str) -> Result<JsonNode, ConfigError> {
    Ok(match v {
        serde_json::Value::String(s) => JsonNode::Format(TextFormat::compile(s, path)?),
        serde_json::Value::Object(m) => JsonNode::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), compile_json(v, &format!("{path}.{k}"))?)))
                .collect::<Result<_, ConfigError>>()?,
        ),
        other => JsonNode::Other(other.clone()),
    })
}

fn render_json(
    node: &JsonNode,
    v: &StreamValues<'_>,
    omit_empty: bool,
) -> Option<serde_json::Value> {
    match node {
        JsonNode::Format(f) => {
            let val = f.json_value(v);
            (!(omit_empty && (val.is_null() || val == ""))).then_some(val)
        }
        JsonNode::Object(fields) => {
            let mut m = serde_json::Map::new();
            for (k, n) in fields {
                if let Some(val) = render_json(n, v, omit_empty) {
                    m.insert(k.clone(), val);
                }
            }
            Some(serde_json::Value::Object(m))
        }
        JsonNode::Other(o) => Some(o.clone()),
    }
}

impl SubstitutionFormat {
    pub fn compile(
        f: &SubstitutionFormatString,
        path: &str,
    ) -> Result<SubstitutionFormat, ConfigError> {
        let mut rest = f.clone();
        let omit_empty_values = std::mem::take(&mut rest.omit_empty_values);
        let content_type = Some(std::mem::take(&mut rest.content_type)).filter(|c| !c.is_empty());
        let kind = match rest.format.take() {
            Some(Format::TextFormat(t)) => {
                Kind::Text(TextFormat::compile(&t, &format!("{path}.text_format"))?)
            }
            Some(Format::TextFormatSource(ds)) => {
                let b = crate::config::bootstrap::data_source(
                    &ds,
                    &format!("{path}.text_format_source"),
                )?;
                Kind::Text(TextFormat::compile(
                    &String::from_utf8_lossy(&b),
                    &format!("{path}.text_format_source"),
                )?)
            }
            Some(Format::JsonFormat(s)) => {
                let json = xds_client::type_registry::struct_to_json(s);
                match compile_json(&json, &format!("{path}.json_format"))? {
                    JsonNode::Object(fields) => Kind::Json(fields),
                    _ => return Err(invalid(path, "json_format must be an object")),
                }
            }
            None => return Err(invalid(path, "format is required")),
        };
        reject_unhandled(&rest, path)?;
        Ok(SubstitutionFormat {
            kind,
            content_type,
            omit_empty_values,
        })
    }

    /// The formatted body and its content type (Envoy: `text/plain` or `application/json`).
    pub fn render(&self, v: &StreamValues<'_>) -> (String, String) {
        match &self.kind {
            Kind::Text(t) => (
                t.format(v),
                self.content_type
                    .clone()
                    .unwrap_or_else(|| "text/plain".into()),
            ),
            Kind::Json(fields) => {
                let body =
                    render_json(&JsonNode::Object(fields.clone()), v, self.omit_empty_values)
                        .unwrap_or_default();
                (
                    format!("{body}\n"),
                    self.content_type
                        .clone()
                        .unwrap_or_else(|| "application/json".into()),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(req: &'a HeaderMap) -> StreamValues<'a> {
        StreamValues {
            request_headers: Some(req),
            response_headers: None,
            response_code: 503,
            response_flags: "UH",
            response_code_details: "no_healthy_upstream",
            local_reply_body: "no healthy upstream",
            protocol: "HTTP/1.1",
            start_time: SystemTime::UNIX_EPOCH,
            downstream_remote: "1.2.3.4:5".parse().unwrap(),
            downstream_local: "127.0.0.1:80".parse().unwrap(),
        }
    }

    #[test]
    fn text_operators() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "abcdef".parse().unwrap());
        let f = TextFormat::compile("%RESPONSE_CODE% %RESPONSE_FLAGS% [%LOCAL_REPLY_BODY%] %REQ(X-A):3% %REQ(X-MISSING)% %REQ(X-NONE?X-A)% 100%%", "f").unwrap();
        assert_eq!(
            f.format(&values(&h)),
            "503 UH [no healthy upstream] abc - abcdef 100%"
        );
    }

    #[test]
    fn unknown_operator_refused() {
        let e = TextFormat::compile("%NOT_A_THING%", "body_format").unwrap_err();
        assert!(e.to_string().contains("NOT_A_THING"), "{e}");
        assert!(TextFormat::compile("%REQ(x", "b").is_err());
    }

    #[test]
    fn json_keeps_types() {
        let sf: SubstitutionFormatString = xds_client::TypeRegistry::global()
            .from_json(&serde_json::json!({"json_format": {"code": "%RESPONSE_CODE%", "msg": "%LOCAL_REPLY_BODY%", "nested": {"f": "%RESPONSE_FLAGS%"}, "missing": "%REQ(x-nope)%"}}), false)
            .unwrap();
        let f = SubstitutionFormat::compile(&sf, "body_format").unwrap();
        let h = HeaderMap::new();
        let (body, ct) = f.render(&values(&h));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], 503);
        assert_eq!(v["msg"], "no healthy upstream");
        assert_eq!(v["nested"]["f"], "UH");
        assert!(v["missing"].is_null());
        assert_eq!(ct, "application/json");
    }
}
