//! `custom_tags` of a connection manager's or a route's `tracing`: literal, environment (read
//! once, when the configuration is compiled, as Envoy does), request header, and request
//! (dynamic) metadata.

use http::HeaderMap;
use petrel_filters::http_filter::DynamicMetadata;
use xds_client::pb::envoy::r#type::metadata::v3::{
    metadata_key::path_segment::Segment, metadata_kind,
};
use xds_client::pb::envoy::r#type::tracing::v3::{custom_tag, CustomTag as PbTag};

use crate::config::{invalid, ConfigError};

#[derive(Debug, Clone, PartialEq)]
pub struct CustomTag {
    /// Leaked once per compiled configuration so spans hold tag names without copies.
    pub tag: &'static str,
    pub value: TagValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TagValue {
    /// A literal, or an environment variable's value (or its default) read at compile time.
    Fixed(String),
    RequestHeader {
        name: http::HeaderName,
        default: String,
    },
    /// `metadata` of kind `request`: a filter's dynamic metadata at a key path.
    Metadata {
        filter: String,
        path: Vec<String>,
        default: String,
    },
}

/// Tag names live for the process: configurations are few and small, spans many.
fn intern(s: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{LazyLock, Mutex};
    static NAMES: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Default::default);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(s) {
        return n;
    }
    let leaked: &'static str = Box::leak(s.to_string().into_boxed_str());
    names.insert(leaked);
    leaked
}

pub fn compile(tags: &[PbTag], path: &str) -> Result<Vec<CustomTag>, ConfigError> {
    tags.iter()
        .enumerate()
        .map(|(i, t)| compile_one(t, &format!("{path}[{i}]")))
        .collect()
}

fn compile_one(t: &PbTag, path: &str) -> Result<CustomTag, ConfigError> {
    if t.tag.is_empty() {
        return Err(invalid(
            format!("{path}.tag"),
            "value length must be at least 1 characters",
        ));
    }
    let value = match &t.r#type {
        Some(custom_tag::Type::Literal(l)) => TagValue::Fixed(l.value.clone()),
        Some(custom_tag::Type::Environment(e)) => TagValue::Fixed(
            std::env::var(&e.name)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| e.default_value.clone()),
        ),
        Some(custom_tag::Type::RequestHeader(h)) => TagValue::RequestHeader {
            name: http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                invalid(format!("{path}.request_header.name"), "invalid header name")
            })?,
            default: h.default_value.clone(),
        },
        Some(custom_tag::Type::Metadata(m)) => {
            let mp = format!("{path}.metadata");
            match m.kind.as_ref().and_then(|k| k.kind.as_ref()) {
                Some(metadata_kind::Kind::Request(_)) => {}
                _ => {
                    return Err(ConfigError::Unsupported {
                        path: format!("{mp}.kind"),
                        fields: "route, cluster and host metadata (Petrel tags request metadata)"
                            .into(),
                    })
                }
            }
            let key = m.metadata_key.clone().unwrap_or_default();
            let path = key
                .path
                .iter()
                .map(|s| match &s.segment {
                    Some(Segment::Key(k)) => Ok(k.clone()),
                    Some(Segment::Index(_)) => Err(ConfigError::Unsupported {
                        path: format!("{mp}.metadata_key.path"),
                        fields: "list index segments".into(),
                    }),
                    None => Err(invalid(format!("{mp}.metadata_key.path"), "empty segment")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            TagValue::Metadata {
                filter: key.key,
                path,
                default: m.default_value.clone(),
            }
        }
        Some(custom_tag::Type::Value(_)) => {
            return Err(ConfigError::Unsupported {
                path: format!("{path}.value"),
                fields: "substitution-format tag values".into(),
            })
        }
        None => return Err(invalid(path, "a tag needs one of its value kinds")),
    };
    Ok(CustomTag {
        tag: intern(&t.tag),
        value,
    })
}

/// A metadata value as Envoy's custom tag writes it.
fn metadata_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), |f| f.to_string()),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl CustomTag {
    /// The tag's value for a stream (empty: not set).
    pub fn value(&self, request: Option<&HeaderMap>, metadata: &DynamicMetadata) -> String {
        match &self.value {
            TagValue::Fixed(v) => v.clone(),
            TagValue::RequestHeader { name, default } => request
                .and_then(|h| h.get(name))
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| default.clone(), str::to_string),
            TagValue::Metadata {
                filter,
                path,
                default,
            } => {
                let mut cur = metadata.get(filter).map(|m| m as &serde_json::Map<_, _>);
                let mut value = None;
                for (i, k) in path.iter().enumerate() {
                    let Some(map) = cur else { break };
                    let v = map.get(k);
                    if i + 1 == path.len() {
                        value = v;
                    } else {
                        cur = v.and_then(|v| v.as_object());
                    }
                }
                value.map_or_else(|| default.clone(), metadata_text)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::pb::envoy::r#type::metadata::v3::{metadata_key, MetadataKey, MetadataKind};

    fn tag(name: &str, t: custom_tag::Type) -> PbTag {
        PbTag {
            tag: name.into(),
            r#type: Some(t),
        }
    }

    #[test]
    fn every_kind_reads_its_source() {
        let tags = compile(
            &[
                tag(
                    "lit",
                    custom_tag::Type::Literal(custom_tag::Literal { value: "v".into() }),
                ),
                tag(
                    "env",
                    custom_tag::Type::Environment(custom_tag::Environment {
                        name: "PETREL_SURELY_UNSET_VARIABLE".into(),
                        default_value: "dflt".into(),
                    }),
                ),
                tag(
                    "hdr",
                    custom_tag::Type::RequestHeader(custom_tag::Header {
                        name: "x-foo".into(),
                        default_value: "none".into(),
                    }),
                ),
                tag(
                    "md",
                    custom_tag::Type::Metadata(custom_tag::Metadata {
                        kind: Some(MetadataKind {
                            kind: Some(metadata_kind::Kind::Request(Default::default())),
                        }),
                        metadata_key: Some(MetadataKey {
                            key: "envoy.filters.http.rbac".into(),
                            path: vec![metadata_key::PathSegment {
                                segment: Some(Segment::Key("shadow_engine_result".into())),
                            }],
                        }),
                        default_value: String::new(),
                    }),
                ),
            ],
            "t",
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-foo", "bar".parse().unwrap());
        let mut md = DynamicMetadata::new();
        md.entry("envoy.filters.http.rbac".into())
            .or_default()
            .insert("shadow_engine_result".into(), "denied".into());
        let values: Vec<String> = tags.iter().map(|t| t.value(Some(&h), &md)).collect();
        assert_eq!(values, ["v", "dflt", "bar", "denied"]);
        let values: Vec<String> = tags
            .iter()
            .map(|t| t.value(None, &DynamicMetadata::new()))
            .collect();
        assert_eq!(values, ["v", "dflt", "none", ""]);
    }

    #[test]
    fn route_metadata_is_refused() {
        let t = tag(
            "md",
            custom_tag::Type::Metadata(custom_tag::Metadata {
                kind: Some(MetadataKind {
                    kind: Some(metadata_kind::Kind::Route(Default::default())),
                }),
                ..Default::default()
            }),
        );
        assert!(compile(&[t], "t").is_err());
    }
}
