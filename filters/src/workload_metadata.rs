//! Istio's workload metadata object: who a peer is (workload, namespace, canonical service and
//! revision, app and version, cluster), as Istio's peer-metadata and stats filters model it, and
//! its wire forms: the node-metadata `Struct` (`NAME`, `NAMESPACE`, `WORKLOAD_NAME`,
//! `CLUSTER_ID`, `LABELS`, `OWNER`) that `x-envoy-peer-metadata` carries base64-encoded, and the
//! endpoint encoding `workload;namespace;service;revision;cluster` of `istio.workload` metadata.

use std::collections::BTreeMap;

use base64::Engine;
use prost::Message;
use xds_client::pb::google::protobuf::{value::Kind, Struct, Value};

const INSTANCE_FIELD: &str = "NAME";
const NAMESPACE_FIELD: &str = "NAMESPACE";
const CLUSTER_FIELD: &str = "CLUSTER_ID";
const OWNER_FIELD: &str = "OWNER";
const WORKLOAD_FIELD: &str = "WORKLOAD_NAME";
const LABELS_FIELD: &str = "LABELS";
const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";
const APP_LABEL: &str = "app";
const VERSION_LABEL: &str = "version";
const OWNER_PREFIX: &str = "kubernetes://apis/apps/v1/namespaces/";

/// The Kubernetes kind that owns a workload, read from `OWNER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkloadType {
    #[default]
    Unknown,
    Pod,
    Deployment,
    Job,
    CronJob,
}

impl WorkloadType {
    fn suffix(self) -> Option<&'static str> {
        match self {
            WorkloadType::Unknown => None,
            WorkloadType::Pod => Some("pod"),
            WorkloadType::Deployment => Some("deployment"),
            WorkloadType::Job => Some("job"),
            WorkloadType::CronJob => Some("cronjob"),
        }
    }
    fn from_suffix(s: &str) -> WorkloadType {
        match s {
            "pod" => WorkloadType::Pod,
            "deployment" => WorkloadType::Deployment,
            "job" => WorkloadType::Job,
            "cronjob" => WorkloadType::CronJob,
            _ => WorkloadType::Unknown,
        }
    }
    /// `…/namespaces/<ns>/<kind>s/<workload>`: the kind before the workload's name.
    fn from_owner(owner: &str, workload: &str) -> WorkloadType {
        if owner.len() <= workload.len() + 2 {
            return WorkloadType::Unknown;
        }
        let head = &owner[..owner.len() - workload.len() - 2];
        head.rfind('/')
            .map_or(WorkloadType::Unknown, |i| Self::from_suffix(&head[i + 1..]))
    }
}

/// One workload's identity for telemetry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadMetadata {
    pub instance_name: String,
    pub cluster_name: String,
    pub namespace_name: String,
    pub workload_name: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub app_name: String,
    pub app_version: String,
    pub workload_type: WorkloadType,
    /// The SPIFFE identity (only the endpoint form of some sources carries it).
    pub identity: String,
    /// The `additional_labels` the config asked to keep.
    pub labels: Vec<(String, String)>,
}

fn string_of(v: &Value) -> &str {
    match &v.kind {
        Some(Kind::StringValue(s)) => s,
        _ => "",
    }
}

impl WorkloadMetadata {
    /// From node metadata (the bootstrap's, or a peer's decoded header), keeping the labels named
    /// in `additional_labels` besides the four Istio reads.
    pub fn from_struct(s: &Struct, additional_labels: &[String]) -> WorkloadMetadata {
        let mut m = WorkloadMetadata::default();
        let mut owner = "";
        for (k, v) in &s.fields {
            match k.as_str() {
                INSTANCE_FIELD => m.instance_name = string_of(v).into(),
                NAMESPACE_FIELD => m.namespace_name = string_of(v).into(),
                OWNER_FIELD => owner = string_of(v),
                WORKLOAD_FIELD => m.workload_name = string_of(v).into(),
                CLUSTER_FIELD => m.cluster_name = string_of(v).into(),
                LABELS_FIELD => {
                    let Some(Kind::StructValue(labels)) = &v.kind else {
                        continue;
                    };
                    for (lk, lv) in &labels.fields {
                        let val = string_of(lv).to_string();
                        match lk.as_str() {
                            CANONICAL_NAME_LABEL => m.canonical_name = val,
                            CANONICAL_REVISION_LABEL => m.canonical_revision = val,
                            APP_LABEL => m.app_name = val,
                            VERSION_LABEL => m.app_version = val,
                            other if additional_labels.iter().any(|a| a == other) => {
                                m.labels.push((other.to_string(), val))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        m.labels.sort();
        m.workload_type = WorkloadType::from_owner(owner, &m.workload_name);
        m
    }

    /// The endpoint form Istio puts in `filter_metadata.istio.workload`:
    /// `workload;namespace;canonical service;canonical revision;cluster`.
    pub fn from_endpoint_encoding(s: &str) -> Option<WorkloadMetadata> {
        let parts: Vec<&str> = s.split(';').collect();
        if parts.len() < 5 {
            return None;
        }
        Some(WorkloadMetadata {
            workload_name: parts[0].into(),
            namespace_name: parts[1].into(),
            canonical_name: parts[2].into(),
            canonical_revision: parts[3].into(),
            cluster_name: parts[4].into(),
            ..Default::default()
        })
    }

    fn owner(&self) -> Option<String> {
        self.workload_type.suffix().map(|s| {
            format!(
                "{OWNER_PREFIX}{}/{s}s/{}",
                self.namespace_name, self.workload_name
            )
        })
    }

    /// The node-metadata `Struct` Istio sends in `x-envoy-peer-metadata` (`LABELS` always there).
    pub fn to_struct(&self) -> Struct {
        let mut fields = BTreeMap::new();
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_string())),
        };
        for (k, v) in [
            (INSTANCE_FIELD, &self.instance_name),
            (NAMESPACE_FIELD, &self.namespace_name),
            (WORKLOAD_FIELD, &self.workload_name),
            (CLUSTER_FIELD, &self.cluster_name),
        ] {
            if !v.is_empty() {
                fields.insert(k.to_string(), s(v));
            }
        }
        let mut labels = BTreeMap::new();
        for (k, v) in [
            (CANONICAL_NAME_LABEL, &self.canonical_name),
            (CANONICAL_REVISION_LABEL, &self.canonical_revision),
            (APP_LABEL, &self.app_name),
            (VERSION_LABEL, &self.app_version),
        ] {
            if !v.is_empty() {
                labels.insert(k.to_string(), s(v));
            }
        }
        for (k, v) in &self.labels {
            labels.insert(k.clone(), s(v));
        }
        fields.insert(
            LABELS_FIELD.to_string(),
            Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: labels.into_iter().collect(),
                })),
            },
        );
        if let Some(owner) = self.owner() {
            fields.insert(OWNER_FIELD.to_string(), s(&owner));
        }
        Struct {
            fields: fields.into_iter().collect(),
        }
    }

    /// `x-envoy-peer-metadata`: the `Struct` serialized deterministically (map entries by key, as
    /// protobuf's deterministic mode writes them), base64 with padding.
    pub fn to_header_value(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(deterministic(&self.to_struct()))
    }

    /// Reads `x-envoy-peer-metadata` (padding optional); `None` when it is not a `Struct`.
    pub fn from_header_value(v: &[u8], additional_labels: &[String]) -> Option<WorkloadMetadata> {
        let trimmed = v.strip_suffix(b"==").or(v.strip_suffix(b"=")).unwrap_or(v);
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(trimmed)
            .ok()?;
        let s = Struct::decode(bytes.as_slice()).ok()?;
        Some(Self::from_struct(&s, additional_labels))
    }
}

/// What Istio's telemetry reads from a cluster's `filter_metadata.istio`: the first of its
/// `services` and whether it leaves the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IstioClusterMetadata {
    /// The cluster lists `services`.
    pub has_service: bool,
    /// `services[0].host`.
    pub service_host: Option<String>,
    /// `services[0].name`.
    pub service_name: Option<String>,
    /// `external: true` (a ServiceEntry outside the mesh).
    pub external: bool,
    /// `disable_mx: true`: no metadata exchange headers towards it.
    pub disable_mx: bool,
}

impl IstioClusterMetadata {
    /// From the JSON of `filter_metadata.istio`; `None` when it says nothing telemetry reads.
    pub fn from_json(istio: &serde_json::Value) -> Option<IstioClusterMetadata> {
        let flag = |k: &str| istio.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let mut m = IstioClusterMetadata {
            external: flag("external"),
            disable_mx: flag("disable_mx"),
            ..Default::default()
        };
        if let Some(first) = istio
            .get("services")
            .and_then(|s| s.as_array())
            .and_then(|a| a.first())
        {
            let field = |k: &str| first.get(k).and_then(|v| v.as_str()).map(str::to_string);
            m.has_service = true;
            m.service_host = field("host");
            m.service_name = field("name");
        }
        (m != IstioClusterMetadata::default()).then_some(m)
    }
}

/// Protobuf's deterministic encoding of a `Struct`: map entries sorted by key, recursively.
pub fn deterministic(s: &Struct) -> Vec<u8> {
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let mut entry = Vec::new();
        prost::encoding::string::encode(1, k, &mut entry);
        let value = deterministic_value(&s.fields[k]);
        prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut entry);
        prost::encoding::encode_varint(value.len() as u64, &mut entry);
        entry.extend_from_slice(&value);
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(entry.len() as u64, &mut out);
        out.extend_from_slice(&entry);
    }
    out
}

fn deterministic_value(v: &Value) -> Vec<u8> {
    match &v.kind {
        Some(Kind::StructValue(s)) => {
            let inner = deterministic(s);
            let mut out = Vec::new();
            prost::encoding::encode_key(5, prost::encoding::WireType::LengthDelimited, &mut out);
            prost::encoding::encode_varint(inner.len() as u64, &mut out);
            out.extend_from_slice(&inner);
            out
        }
        _ => v.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Struct {
        let json = serde_json::json!({
            "NAME": "productpage-v1-84975bc778-pxz2w",
            "NAMESPACE": "default",
            "CLUSTER_ID": "client-cluster",
            "WORKLOAD_NAME": "productpage-v1",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1",
            "ISTIO_VERSION": "1.5-dev",
            "LABELS": {
                "app": "productpage", "version": "v1", "role": "client",
                "service.istio.io/canonical-name": "productpage-v1",
                "service.istio.io/canonical-revision": "version-1",
            },
        });
        let v: Value = crate::workload_metadata::tests::to_value(&json);
        match v.kind {
            Some(Kind::StructValue(s)) => s,
            _ => unreachable!(),
        }
    }

    pub(super) fn to_value(j: &serde_json::Value) -> Value {
        let kind = match j {
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Object(m) => Kind::StructValue(Struct {
                fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
            }),
            _ => Kind::NullValue(0),
        };
        Value { kind: Some(kind) }
    }

    #[test]
    fn node_metadata_reads_as_istio_does() {
        let m = WorkloadMetadata::from_struct(&node(), &[]);
        assert_eq!(m.workload_name, "productpage-v1");
        assert_eq!(m.namespace_name, "default");
        assert_eq!(m.cluster_name, "client-cluster");
        assert_eq!(m.canonical_name, "productpage-v1");
        assert_eq!(m.canonical_revision, "version-1");
        assert_eq!(m.app_name, "productpage");
        assert_eq!(m.app_version, "v1");
        assert_eq!(m.workload_type, WorkloadType::Deployment);
        assert!(m.labels.is_empty());
        let with_role = WorkloadMetadata::from_struct(&node(), &["role".into()]);
        assert_eq!(with_role.labels, vec![("role".into(), "client".into())]);
    }

    #[test]
    fn header_value_round_trips_and_drops_unknown_fields() {
        let m = WorkloadMetadata::from_struct(&node(), &["role".into()]);
        let h = m.to_header_value();
        let back = WorkloadMetadata::from_header_value(h.as_bytes(), &["role".into()]).unwrap();
        assert_eq!(back, m);
        // The unpadded form decodes too; garbage does not.
        let unpadded = h.trim_end_matches('=');
        assert_eq!(
            WorkloadMetadata::from_header_value(unpadded.as_bytes(), &["role".into()]),
            Some(m)
        );
        assert_eq!(WorkloadMetadata::from_header_value(b"%%%", &[]), None);
        // ISTIO_VERSION is not part of the exchanged identity.
        let s = Struct::decode(
            base64::engine::general_purpose::STANDARD
                .decode(&h)
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        assert!(!s.fields.contains_key("ISTIO_VERSION"));
        assert_eq!(
            string_of(&s.fields["OWNER"]),
            "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1"
        );
    }

    #[test]
    fn encoding_is_deterministic_and_protobuf() {
        let m = WorkloadMetadata::from_struct(&node(), &[]);
        let a = deterministic(&m.to_struct());
        for _ in 0..5 {
            assert_eq!(deterministic(&m.to_struct()), a);
        }
        assert_eq!(Struct::decode(a.as_slice()).unwrap(), m.to_struct());
    }

    #[test]
    fn endpoint_encoding() {
        let m = WorkloadMetadata::from_endpoint_encoding("ratings-v1;default;ratings;version-1;c")
            .unwrap();
        assert_eq!(
            (
                m.workload_name.as_str(),
                m.namespace_name.as_str(),
                m.canonical_name.as_str(),
                m.canonical_revision.as_str(),
                m.cluster_name.as_str()
            ),
            ("ratings-v1", "default", "ratings", "version-1", "c")
        );
        assert_eq!(WorkloadMetadata::from_endpoint_encoding("a;b;c;d"), None);
    }

    #[test]
    fn cluster_services() {
        let m = IstioClusterMetadata::from_json(&serde_json::json!({
            "services": [{"host": "server.default.svc.cluster.local", "namespace": "default"}]
        }))
        .unwrap();
        assert_eq!(
            m.service_host.as_deref(),
            Some("server.default.svc.cluster.local")
        );
        assert_eq!(m.service_name, None);
        let named = IstioClusterMetadata::from_json(&serde_json::json!({
            "services": [{"host": "a.b", "name": "svc"}], "external": true
        }))
        .unwrap();
        assert_eq!(
            (named.service_name.as_deref(), named.external),
            (Some("svc"), true)
        );
        assert_eq!(
            IstioClusterMetadata::from_json(&serde_json::json!({"other": 1})),
            None
        );
    }

    #[test]
    fn owner_kinds() {
        assert_eq!(
            WorkloadType::from_owner("kubernetes://apis/apps/v1/namespaces/ns/jobs/w", "w"),
            WorkloadType::Job
        );
        assert_eq!(WorkloadType::from_owner("x", "w"), WorkloadType::Unknown);
        assert_eq!(
            WorkloadType::from_owner("kubernetes://apis/apps/v1/namespaces/ns/things/w", "w"),
            WorkloadType::Unknown
        );
    }
}
