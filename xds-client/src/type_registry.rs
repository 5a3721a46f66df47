//! The type-URL registry: every Envoy v3 message known to Petrel, addressable by its type URL.
//!
//! Bootstrap files and xDS resources both go through here so that they become the same prost
//! types: proto3-JSON → `DynamicMessage` (with `Any` resolved by type URL) → wire bytes → prost.

use std::sync::{Arc, Mutex};

static REGISTRY: Mutex<Option<Arc<TypeRegistry>>> = Mutex::new(None);

use envoy_types::pb::google::protobuf::{value::Kind, Any, Struct, Value};
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

static DESCRIPTORS: &[u8] = include_bytes!(env!("PETREL_ENVOY_DESCRIPTORS"));
/// Envoy's whole API and Istio's own extension messages (not linked into the proxy unless used).
static ALL_DESCRIPTORS: &[u8] = include_bytes!(env!("PETREL_ALL_DESCRIPTORS"));

/// `xds.type.v3.TypedStruct` and its historical `udpa.type.v1` twin: an extension config carried
/// as a JSON-like `Struct` plus the real type URL.
pub const TYPED_STRUCT_URLS: [&str; 2] = [
    "type.googleapis.com/xds.type.v3.TypedStruct",
    "type.googleapis.com/udpa.type.v1.TypedStruct",
];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// A field (named by its JSON path) could not be decoded.
    #[error("{path}: {message}")]
    Field { path: String, message: String },
    /// An `Any` at `path` holds a type outside the registry (Petrel has no decoder for it).
    #[error("{path}: type '{type_name}' is not supported")]
    TypeNotSupported { path: String, type_name: String },
    /// The type URL names a message Petrel does not know at all.
    #[error("unknown type URL '{0}'")]
    UnknownType(String),
    /// An `Any` holds a different message than the one expected at this place.
    #[error("expected '{expected}' but got '{got}'")]
    WrongType { expected: String, got: String },
    #[error("invalid protobuf for '{type_url}': {message}")]
    Wire { type_url: String, message: String },
}

/// The registry of Envoy message descriptors.
pub struct TypeRegistry {
    pool: DescriptorPool,
}

fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

impl TypeRegistry {
    /// The process-wide registry (descriptors are embedded at build time), built on first use
    /// and kept until [`TypeRegistry::release`].
    pub fn global() -> Arc<TypeRegistry> {
        let mut slot = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| Arc::new(TypeRegistry::build()))
            .clone()
    }

    /// Drops the cached registry (its descriptors take ~18 MB): the proxy calls this once a
    /// configuration is compiled, since serving never needs descriptors; the next decode
    /// rebuilds it (~25 ms).
    pub fn release() {
        let mut slot = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        *slot = None;
    }

    fn build() -> TypeRegistry {
        Self::from_descriptors(DESCRIPTORS)
    }

    /// A registry of every type Istio's configuration carries — Envoy's whole API and Istio's
    /// own extension messages — for tools and tests that must encode resources Petrel refuses.
    /// Large (its descriptors take ~50 MB); the proxy never builds it.
    pub fn with_all_types() -> TypeRegistry {
        Self::from_descriptors(ALL_DESCRIPTORS)
    }

    fn from_descriptors(descriptors: &[u8]) -> TypeRegistry {
        // The embedded set is produced by the same build as envoy-types; failing to decode it
        // is a build defect, not an input error.
        let mut pool = DescriptorPool::decode(descriptors).expect("embedded Envoy descriptor set");
        for (package, file) in [
            ("udpa.type.v1", "udpa/type/v1/typed_struct.proto"),
            ("xds.type.v3", "xds/type/v3/typed_struct.proto"),
        ] {
            add_typed_struct(&mut pool, package, file);
        }
        TypeRegistry { pool }
    }

    /// Whether a message with this type URL (or bare full name) is known.
    pub fn knows(&self, type_url: &str) -> bool {
        self.pool.get_message_by_name(type_name(type_url)).is_some()
    }

    /// Decodes proto3-JSON into `M`, naming the JSON path of the first offending field.
    pub fn from_json<M: Message + Default + Name>(
        &self,
        value: &serde_json::Value,
        allow_unknown_fields: bool,
    ) -> Result<M, DecodeError> {
        let bytes = self.json_to_wire(&M::full_name(), value, allow_unknown_fields)?;
        M::decode(bytes.as_slice()).map_err(|e| DecodeError::Wire {
            type_url: M::type_url(),
            message: e.to_string(),
        })
    }

    /// Decodes proto3-JSON of the named message into its wire form.
    pub fn json_to_wire(
        &self,
        full_name: &str,
        value: &serde_json::Value,
        allow_unknown_fields: bool,
    ) -> Result<Vec<u8>, DecodeError> {
        let desc = self
            .pool
            .get_message_by_name(full_name)
            .ok_or_else(|| DecodeError::UnknownType(full_name.to_string()))?;
        let opts = DeserializeOptions::new().deny_unknown_fields(!allow_unknown_fields);
        let coerced;
        let value = match legacy_bools(&self.pool, &desc, value) {
            Some(v) => {
                coerced = v;
                &coerced
            }
            None => value,
        };
        let mut track = serde_path_to_error::Track::new();
        let de = serde_path_to_error::Deserializer::new(value, &mut track);
        match DynamicMessage::deserialize_with_options(desc, de, &opts) {
            Ok(msg) => Ok(msg.encode_to_vec()),
            Err(e) => {
                let path = render_path(&track.path());
                let message = e.to_string();
                // prost-reflect's wording for an `Any` whose type is not in the pool.
                if let Some(t) = message
                    .strip_prefix("message '")
                    .and_then(|m| m.strip_suffix("' not found"))
                {
                    return Err(DecodeError::TypeNotSupported {
                        path,
                        type_name: t.to_string(),
                    });
                }
                Err(DecodeError::Field { path, message })
            }
        }
    }

    /// Renders a prost message as Envoy's proto3-JSON (camelCase names, defaults omitted,
    /// `Any` expanded with `@type`), as `/config_dump` shows it.
    pub fn to_json<M: Message + Name>(&self, msg: &M) -> serde_json::Value {
        self.wire_to_json(&M::full_name(), &msg.encode_to_vec())
            .unwrap_or(serde_json::Value::Null)
    }

    /// The proto names of the fields set in `msg` (works where JSON rendering cannot, e.g. an
    /// `Any` of a type outside the registry).
    pub fn set_fields<M: Message + Name>(&self, msg: &M) -> Vec<String> {
        let Some(desc) = self.pool.get_message_by_name(&M::full_name()) else {
            return Vec::new();
        };
        match DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()) {
            Ok(m) => m.fields().map(|(f, _)| f.name().to_string()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Renders wire bytes of the named message as proto3-JSON.
    pub fn wire_to_json(&self, full_name: &str, bytes: &[u8]) -> Option<serde_json::Value> {
        let desc = self.pool.get_message_by_name(full_name)?;
        let msg = DynamicMessage::decode(desc, bytes).ok()?;
        let opts = SerializeOptions::new()
            .skip_default_fields(true)
            .use_proto_field_name(true);
        msg.serialize_with_options(serde_json::value::Serializer, &opts)
            .ok()
    }

    /// Renders an `Any` as proto3-JSON with its `@type`.
    pub fn any_to_json(&self, any: &Any) -> Option<serde_json::Value> {
        let mut v = self.wire_to_json(type_name(&any.type_url), &any.value)?;
        if let serde_json::Value::Object(map) = &mut v {
            map.insert("@type".into(), any.type_url.clone().into());
        }
        Some(v)
    }

    /// Unpacks an `Any` into `M`, following a `TypedStruct` wrapper to its inner type URL.
    pub fn unpack<M: Message + Default + Name>(&self, any: &Any) -> Result<M, DecodeError> {
        let (url, bytes) = self.resolve_typed_struct(any)?;
        if type_name(&url) != M::full_name() {
            return Err(DecodeError::WrongType {
                expected: M::full_name(),
                got: type_name(&url).to_string(),
            });
        }
        M::decode(bytes.as_slice()).map_err(|e| DecodeError::Wire {
            type_url: url,
            message: e.to_string(),
        })
    }

    /// The effective type URL of an extension config: a `TypedStruct`'s inner one, else its own.
    pub fn effective_type_url(any: &Any) -> String {
        if TYPED_STRUCT_URLS.contains(&any.type_url.as_str()) {
            if let Ok(ts) = TypedStructWire::decode(any.value.as_slice()) {
                // Envoy reads a TypedStruct's type by its last segment: a bare message name
                // (as istio/proxy's fixtures write them) is the same type.
                if !ts.type_url.contains('/') {
                    return format!("type.googleapis.com/{}", ts.type_url);
                }
                return ts.type_url;
            }
        }
        any.type_url.clone()
    }

    /// A `TypedStruct`'s fields as JSON (None when `any` is not one): for extensions whose
    /// messages are not in the descriptor set.
    pub fn typed_struct_value(any: &Any) -> Option<serde_json::Value> {
        if !TYPED_STRUCT_URLS.contains(&any.type_url.as_str()) {
            return None;
        }
        let ts = TypedStructWire::decode(any.value.as_slice()).ok()?;
        Some(ts.value.map(struct_to_json).unwrap_or_default())
    }

    fn resolve_typed_struct(&self, any: &Any) -> Result<(String, Vec<u8>), DecodeError> {
        if !TYPED_STRUCT_URLS.contains(&any.type_url.as_str()) {
            return Ok((any.type_url.clone(), any.value.clone()));
        }
        let ts = TypedStructWire::decode(any.value.as_slice()).map_err(|e| DecodeError::Wire {
            type_url: any.type_url.clone(),
            message: e.to_string(),
        })?;
        // No value is the empty message (Istio's `istio_authn` comes so).
        let json = ts
            .value
            .map(struct_to_json)
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        let bytes = self.json_to_wire(type_name(&ts.type_url), &json, false)?;
        Ok((ts.type_url, bytes))
    }
}

/// protobuf's JSON parser (Envoy's, in its legacy mode) takes a string for a bool field the way
/// `safe_strtob` reads it ("true"/"t"/"yes"/"y"/"1" and their opposites, any case); Istio's
/// configs rely on it. A copy of `value` with those strings made booleans, when it has any.
fn legacy_bools(
    pool: &DescriptorPool,
    desc: &prost_reflect::MessageDescriptor,
    value: &serde_json::Value,
) -> Option<serde_json::Value> {
    use prost_reflect::{Kind as FieldKind, MessageDescriptor};
    fn strtob(s: &str) -> Option<bool> {
        match s.to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" => Some(true),
            "false" | "f" | "no" | "n" | "0" => Some(false),
            _ => None,
        }
    }
    fn walk(pool: &DescriptorPool, desc: &MessageDescriptor, v: &mut serde_json::Value) -> bool {
        let Some(obj) = v.as_object_mut() else {
            return false;
        };
        if desc.full_name() == "google.protobuf.Any" {
            let inner = obj
                .get("@type")
                .and_then(|t| t.as_str())
                .and_then(|t| pool.get_message_by_name(type_name(t)));
            return inner.is_some_and(|d| walk(pool, &d, v));
        }
        let mut changed = false;
        for (k, fv) in obj.iter_mut() {
            let Some(field) = desc
                .get_field_by_json_name(k)
                .or_else(|| desc.get_field_by_name(k))
            else {
                continue;
            };
            let one = |x: &mut serde_json::Value| -> bool {
                let boolean = match field.kind() {
                    FieldKind::Bool => true,
                    FieldKind::Message(m) => m.full_name() == "google.protobuf.BoolValue",
                    _ => false,
                };
                match field.kind() {
                    _ if boolean => match x.as_str().and_then(strtob) {
                        Some(b) => {
                            *x = serde_json::Value::Bool(b);
                            true
                        }
                        None => false,
                    },
                    FieldKind::Message(m)
                        if !m.full_name().starts_with("google.protobuf.")
                            || m.full_name() == "google.protobuf.Any" =>
                    {
                        walk(pool, &m, x)
                    }
                    _ => false,
                }
            };
            if field.is_map() {
                let FieldKind::Message(entry) = field.kind() else {
                    continue;
                };
                let vf = entry.map_entry_value_field();
                if let (FieldKind::Message(m), Some(map)) = (vf.kind(), fv.as_object_mut()) {
                    for x in map.values_mut() {
                        changed |= walk(pool, &m, x);
                    }
                }
            } else if field.is_list() {
                if let Some(list) = fv.as_array_mut() {
                    for x in list {
                        changed |= one(x);
                    }
                }
            } else {
                changed |= one(fv);
            }
        }
        changed
    }
    let mut copy = value.clone();
    walk(pool, desc, &mut copy).then_some(copy)
}

/// Neither `TypedStruct` (udpa.type.v1, xds.type.v3) is in envoy-types' descriptor set, yet Istio
/// emits both; they share one shape, declared here.
fn add_typed_struct(pool: &mut DescriptorPool, package: &str, file_name: &str) {
    use prost_types::{
        field_descriptor_proto::{Label, Type},
        DescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    };
    if pool
        .get_message_by_name(&format!("{package}.TypedStruct"))
        .is_some()
    {
        return;
    }
    let field = |name: &str, json: &str, number: i32, ty: Type, type_name: Option<&str>| {
        FieldDescriptorProto {
            name: Some(name.into()),
            json_name: Some(json.into()),
            number: Some(number),
            label: Some(Label::Optional as i32),
            r#type: Some(ty as i32),
            type_name: type_name.map(Into::into),
            ..Default::default()
        }
    };
    let file = FileDescriptorProto {
        name: Some(file_name.into()),
        package: Some(package.into()),
        dependency: vec!["google/protobuf/struct.proto".into()],
        message_type: vec![DescriptorProto {
            name: Some("TypedStruct".into()),
            field: vec![
                field("type_url", "typeUrl", 1, Type::String, None),
                field(
                    "value",
                    "value",
                    2,
                    Type::Message,
                    Some(".google.protobuf.Struct"),
                ),
            ],
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
        ..Default::default()
    };
    pool.add_file_descriptor_proto(file)
        .expect("TypedStruct descriptor");
}

/// The wire shape shared by both TypedStruct messages (field 1 type_url, field 2 value).
#[derive(Clone, PartialEq, Message)]
struct TypedStructWire {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Struct>,
}

/// `google.protobuf.Struct` → JSON object.
/// `google.protobuf.Struct` → JSON object, keys sorted (a Struct is a map: protobuf's JSON
/// printer, and so Envoy, emits it in key order).
pub fn struct_to_json(s: Struct) -> serde_json::Value {
    let mut fields: Vec<_> = s.fields.into_iter().collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    serde_json::Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: Value) -> serde_json::Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        // Integral numbers print without a fraction, as protobuf's JSON printer does.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
            serde_json::Value::from(n as i64)
        }
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(value_to_json).collect())
        }
    }
}

fn render_path(p: &serde_path_to_error::Path) -> String {
    let s = p.to_string();
    if s == "." {
        "(root)".to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use serde_json::json;

    #[test]
    #[allow(deprecated)]
    fn bool_fields_take_legacy_strings() {
        let v = json!({"static_resources": {"clusters": [
            {"name": "a", "respect_dns_ttl": "true"},
            {"name": "b", "respectDnsTtl": "NO"},
        ], "listeners": [{"name": "l", "filter_chains": [{"filters": [{"name": "h",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "s", "normalize_path": "y"}}]}]}]}});
        let b: Bootstrap = TypeRegistry::global().from_json(&v, false).unwrap();
        let s = b.static_resources.unwrap();
        assert!(s.clusters[0].respect_dns_ttl);
        assert!(!s.clusters[1].respect_dns_ttl);
        let hcm: HttpConnectionManager = TypeRegistry::global()
            .unpack(s.listeners[0].filter_chains[0].filters[0].config_type.as_ref().map(|c| match c {
                envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(a) => a,
                _ => unreachable!(),
            }).unwrap())
            .unwrap();
        assert_eq!(hcm.normalize_path.map(|b| b.value), Some(true));
        // Anything else is still an error.
        let bad =
            json!({"static_resources": {"clusters": [{"name": "a", "respect_dns_ttl": "maybe"}]}});
        assert!(TypeRegistry::global()
            .from_json::<Bootstrap>(&bad, false)
            .is_err());
    }

    #[test]
    fn decodes_typed_config_any() {
        let v = json!({
            "static_resources": {"listeners": [{
                "name": "l",
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress"
                    }
                }]}]
            }]}
        });
        let b: Bootstrap = TypeRegistry::global().from_json(&v, false).unwrap();
        let any = b.static_resources.unwrap().listeners[0].filter_chains[0].filters[0]
            .config_type
            .clone()
            .unwrap();
        let envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any) =
            any
        else {
            panic!("typed config");
        };
        let hcm: HttpConnectionManager = TypeRegistry::global().unpack(&any).unwrap();
        assert_eq!(hcm.stat_prefix, "ingress");
    }

    #[test]
    fn unknown_field_names_its_path() {
        let v = json!({"static_resources": {"listeners": [{"name": "l", "bogus": 1}]}});
        let err = TypeRegistry::global()
            .from_json::<Bootstrap>(&v, false)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("static_resources.listeners[0]"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
        // Allowed when asked to, as Envoy's --allow-unknown-static-fields does.
        assert!(TypeRegistry::global()
            .from_json::<Bootstrap>(&v, true)
            .is_ok());
    }

    #[test]
    fn typed_struct_resolves_inner_type() {
        let inner = json!({"stat_prefix": "x"});
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&inner) else {
            panic!()
        };
        let s = Struct {
            fields: fields
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        Value {
                            kind: Some(Kind::StringValue(v.as_str().unwrap().into())),
                        },
                    )
                })
                .collect(),
        };
        let ts = TypedStructWire {
            type_url: HttpConnectionManager::type_url(),
            value: Some(s),
        };
        let any = Any {
            type_url: TYPED_STRUCT_URLS[0].into(),
            value: ts.encode_to_vec(),
        };
        assert_eq!(
            TypeRegistry::effective_type_url(&any),
            HttpConnectionManager::type_url()
        );
        let hcm: HttpConnectionManager = TypeRegistry::global().unpack(&any).unwrap();
        assert_eq!(hcm.stat_prefix, "x");
    }
}

#[cfg(test)]
mod footprint {
    /// The embedded pool is the reduced one: decoding it must stay cheap (the whole Envoy API
    /// costs ~50 MB and ~90 ms). A generous bound, not a timing: it counts messages.
    #[test]
    fn pool_is_reduced_but_complete_for_roots() {
        let reg = super::TypeRegistry::global();
        let n = reg.pool.all_messages().count();
        assert!(
            n < 3000,
            "descriptor pool has {n} messages; the build-time reduction is not in effect"
        );
        for t in [
            "envoy.config.bootstrap.v3.Bootstrap",
            "udpa.type.v1.TypedStruct",
            "xds.type.v3.TypedStruct",
        ] {
            assert!(reg.knows(t), "{t}");
        }
    }
}
