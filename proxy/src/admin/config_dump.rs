//! `/config_dump`: Envoy's sections in Envoy's order, `?resource=`, `?mask=`, `?include_eds`.

use serde_json::{json, Map, Value};
use xds_client::pb::envoy::config::listener::v3::filter::ConfigType;
use xds_client::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use xds_client::TypeRegistry;

use crate::config::snapshot::Snapshot;

const ADMIN: &str = "type.googleapis.com/envoy.admin.v3.";
const SECRET: &str = "envoy.extensions.transport_sockets.tls.v3.Secret";

/// A section's resources: (resource name, items, item type).
type Resources = (&'static str, Vec<Value>, &'static str);

/// What the query asked for.
pub struct Query {
    pub resource: Option<String>,
    pub mask: Option<String>,
    pub include_eds: bool,
}

/// `Err` carries Envoy's 404 text for an unknown resource.
pub fn render(snap: &Snapshot, last_updated: &str, q: &Query) -> Result<Value, String> {
    let reg = TypeRegistry::global();
    let typed = |v: Value, name: &str| with_type(v, &format!("type.googleapis.com/{name}"));

    let mut clusters: Vec<_> = snap.clusters.values().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    // Envoy lists clusters by name and listeners in configuration order.
    let listeners: Vec<_> = snap.listeners.iter().collect();

    let static_clusters: Vec<Value> = clusters
        .iter()
        .filter(|c| !snap.dynamic_clusters.contains_key(&c.name))
        .map(|c| json!({"cluster": typed(reg.to_json(&c.source.decode()), "envoy.config.cluster.v3.Cluster"), "last_updated": last_updated}))
        .collect();
    let dynamic_cluster = |c: &crate::upstream::cluster::Cluster,
                           info: &crate::config::snapshot::DynamicInfo| {
        json!({
            "version_info": info.version,
            "cluster": typed(reg.to_json(&c.source.decode()), "envoy.config.cluster.v3.Cluster"),
            "last_updated": info.last_updated,
        })
    };
    let dynamic_clusters: Vec<Value> = clusters
        .iter()
        .filter_map(|c| {
            snap.dynamic_clusters
                .get(&c.name)
                .map(|info| dynamic_cluster(c, info))
        })
        .collect();
    let static_endpoints: Vec<Value> = clusters
        .iter()
        .map(|c| {
            let mut cla = c.source.decode().load_assignment.unwrap_or_default();
            if cla.cluster_name.is_empty() {
                cla.cluster_name = c.name.clone();
            }
            let mut v = typed(
                reg.to_json(&cla),
                "envoy.config.endpoint.v3.ClusterLoadAssignment",
            );
            // Envoy shows the effective overprovisioning factor (its default is 140).
            if let Value::Object(m) = &mut v {
                m.entry("policy")
                    .or_insert_with(|| json!({"overprovisioning_factor": 140}));
            }
            json!({"endpoint_config": v})
        })
        .collect();
    let is_dynamic_listener = |name: &str| snap.dynamic_listeners.contains_key(name);
    let listener_json = |l: &crate::listener::Listener| {
        typed(reg.to_json(&l.source), "envoy.config.listener.v3.Listener")
    };
    let static_listeners: Vec<Value> = listeners
        .iter()
        .filter(|l| !is_dynamic_listener(&l.name))
        .map(|l| json!({"listener": listener_json(l), "last_updated": last_updated}))
        .collect();
    // Envoy's DynamicListener: the active state and, while an update warms, the warming one.
    let mut dynamic_listeners: Vec<(String, Map<String, Value>)> = Vec::new();
    let state = |l: &crate::listener::Listener, info: &crate::config::snapshot::DynamicInfo| json!({"version_info": info.version, "listener": listener_json(l), "last_updated": info.last_updated});
    for l in listeners.iter() {
        if let Some(info) = snap.dynamic_listeners.get(&l.name) {
            let mut m = Map::new();
            m.insert("name".into(), json!(l.name));
            m.insert("active_state".into(), state(l, info));
            dynamic_listeners.push((l.name.clone(), m));
        }
    }
    for (l, info) in &snap.warming_listeners {
        let st = state(l, info);
        match dynamic_listeners.iter_mut().find(|(n, _)| *n == l.name) {
            Some((_, m)) => {
                m.insert("warming_state".into(), st);
            }
            None => {
                let mut m = Map::new();
                m.insert("name".into(), json!(l.name));
                m.insert("warming_state".into(), st);
                dynamic_listeners.push((l.name.clone(), m));
            }
        }
    }
    let dynamic_listeners: Vec<Value> = dynamic_listeners
        .into_iter()
        .map(|(_, m)| Value::Object(m))
        .collect();
    // Inline route configurations, of bootstrap and LDS listeners alike, are Envoy's "static"
    // ones.
    let static_routes: Vec<Value> = listeners
        .iter()
        .copied()
        .chain(snap.warming_listeners.iter().map(|(l, _)| l))
        .flat_map(|l| l.source.filter_chains.iter().chain(l.source.default_filter_chain.iter()).flat_map(|fc| fc.filters.iter()))
        .filter_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => reg.unpack::<HttpConnectionManager>(any).ok(),
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => Some(rc),
            _ => None,
        })
        .map(|rc| json!({"route_config": typed(reg.to_json(&rc), "envoy.config.route.v3.RouteConfiguration"), "last_updated": last_updated}))
        .collect();
    let mut rds: Vec<_> = snap.route_configs.iter().collect();
    rds.sort_by(|a, b| a.0.cmp(b.0));
    let dynamic_routes: Vec<Value> = rds
        .into_iter()
        .map(|(_, r)| {
            json!({
                "version_info": r.info.version,
                "route_config": typed(reg.to_json(r.source.as_ref()), "envoy.config.route.v3.RouteConfiguration"),
                "last_updated": r.info.last_updated,
            })
        })
        .collect();
    let warming_clusters: Vec<Value> = snap
        .warming_clusters
        .iter()
        .map(|(c, info)| dynamic_cluster(c, info))
        .collect();
    let mut eds: Vec<_> = snap.endpoint_configs.iter().collect();
    eds.sort_by(|a, b| a.0.cmp(b.0));
    let dynamic_endpoints: Vec<Value> = eds
        .into_iter()
        .map(|(_, a)| {
            let mut v = typed(
                reg.to_json(a.cla.as_ref()),
                "envoy.config.endpoint.v3.ClusterLoadAssignment",
            );
            if let Value::Object(m) = &mut v {
                m.entry("policy")
                    .or_insert_with(|| json!({"overprovisioning_factor": 140}));
            }
            json!({"version_info": a.info.version, "endpoint_config": v, "last_updated": a.info.last_updated})
        })
        .collect();

    let mut sections: Vec<(&str, Option<Resources>)> = vec![
        ("BootstrapConfigDump", None),
        (
            "ClustersConfigDump",
            Some((
                "static_clusters",
                static_clusters,
                "ClustersConfigDump.StaticCluster",
            )),
        ),
        (
            "ClustersConfigDump",
            Some((
                "dynamic_active_clusters",
                dynamic_clusters,
                "ClustersConfigDump.DynamicCluster",
            )),
        ),
        (
            "ClustersConfigDump",
            Some((
                "dynamic_warming_clusters",
                warming_clusters,
                "ClustersConfigDump.DynamicCluster",
            )),
        ),
    ];
    if q.include_eds {
        sections.push((
            "EndpointsConfigDump",
            Some((
                "static_endpoint_configs",
                static_endpoints,
                "EndpointsConfigDump.StaticEndpointConfig",
            )),
        ));
        sections.push((
            "EndpointsConfigDump",
            Some((
                "dynamic_endpoint_configs",
                dynamic_endpoints,
                "EndpointsConfigDump.DynamicEndpointConfig",
            )),
        ));
    }
    sections.push((
        "ListenersConfigDump",
        Some((
            "static_listeners",
            static_listeners,
            "ListenersConfigDump.StaticListener",
        )),
    ));
    sections.push((
        "ListenersConfigDump",
        Some((
            "dynamic_listeners",
            dynamic_listeners,
            "ListenersConfigDump.DynamicListener",
        )),
    ));
    sections.push(("ScopedRoutesConfigDump", None));
    sections.push((
        "RoutesConfigDump",
        Some((
            "static_route_configs",
            static_routes,
            "RoutesConfigDump.StaticRouteConfig",
        )),
    ));
    sections.push((
        "RoutesConfigDump",
        Some((
            "dynamic_route_configs",
            dynamic_routes,
            "RoutesConfigDump.DynamicRouteConfig",
        )),
    ));
    // Secrets: those arrived (their private keys redacted) and those still awaited.
    let (mut active, mut warming) = (Vec::new(), Vec::new());
    for d in crate::tls::secrets::registry().dump() {
        match d.record {
            Some(r) => {
                let mut v = json!({"name": d.name});
                if !r.version.is_empty() {
                    v["version_info"] = json!(r.version);
                }
                v["last_updated"] = json!(r.last_updated);
                v["secret"] = typed(reg.to_json(&r.shown), SECRET);
                active.push(v);
            }
            None => warming.push(json!({
                "name": d.name,
                "version_info": "uninitialized",
                "last_updated": d.waiting_since,
                "secret": typed(json!({"name": d.name}), SECRET),
            })),
        }
    }
    let statics = crate::tls::secrets::registry()
        .dump_static()
        .into_iter()
        .map(|(name, r)| {
            // Envoy's order for a static secret: its secret before the update time.
            let mut v = json!({"name": name});
            v["secret"] = typed(reg.to_json(&r.shown), SECRET);
            v["last_updated"] = json!(r.last_updated);
            v
        })
        .collect();
    sections.push((
        "SecretsConfigDump",
        Some(("static_secrets", statics, "SecretsConfigDump.StaticSecret")),
    ));
    sections.push((
        "SecretsConfigDump",
        Some((
            "dynamic_active_secrets",
            active,
            "SecretsConfigDump.DynamicSecret",
        )),
    ));
    sections.push((
        "SecretsConfigDump",
        Some((
            "dynamic_warming_secrets",
            warming,
            "SecretsConfigDump.DynamicSecret",
        )),
    ));

    let mask = q.mask.as_deref().map(|m| {
        m.split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
    });
    let masked = |v: Value| match &mask {
        Some(paths) => apply_mask(v, paths),
        None => v,
    };

    if let Some(r) = &q.resource {
        let found = sections
            .into_iter()
            .find_map(|(_, s)| s.filter(|(name, _, _)| name == r));
        let Some((_, items, item_type)) = found else {
            return Err(format!("{r} not found in config dump"));
        };
        let configs: Vec<Value> = items
            .into_iter()
            .map(|i| masked(with_type(i, &format!("{ADMIN}{item_type}"))))
            .collect();
        return Ok(json!({ "configs": configs }));
    }
    // Sections of one type (static and dynamic clusters) print as one object.
    let mut merged: Vec<(&str, Map<String, Value>)> = Vec::new();
    for (ty, sec) in sections {
        let body = match (ty, sec) {
            ("BootstrapConfigDump", _) => {
                let bootstrap = <xds_client::pb::envoy::config::bootstrap::v3::Bootstrap as prost::Message>::decode(snap.bootstrap.as_ref()).unwrap_or_default();
                json!({"bootstrap": reg.to_json(&bootstrap), "last_updated": last_updated})
            }
            (_, Some((name, items, _))) if !items.is_empty() => json!({ name: items }),
            _ => json!({}),
        };
        let Value::Object(fields) = body else {
            continue;
        };
        match merged.last_mut() {
            Some((last, m)) if *last == ty => m.extend(fields),
            _ => merged.push((ty, fields)),
        }
    }
    let configs: Vec<Value> = merged
        .into_iter()
        .map(|(ty, fields)| masked(with_type(Value::Object(fields), &format!("{ADMIN}{ty}"))))
        .collect();
    Ok(json!({ "configs": configs }))
}

/// Puts `@type` first, as Envoy prints it.
pub fn with_type(v: Value, type_url: &str) -> Value {
    let mut out = Map::new();
    out.insert("@type".into(), Value::String(type_url.to_string()));
    if let Value::Object(m) = v {
        out.extend(m);
    }
    Value::Object(out)
}

/// A protobuf field mask over JSON: keeps the listed dotted paths (and `@type`).
fn apply_mask(v: Value, paths: &[String]) -> Value {
    fn keep(v: &Value, path: &[&str]) -> Option<Value> {
        let Some((head, rest)) = path.split_first() else {
            return Some(v.clone());
        };
        match v {
            Value::Object(m) => {
                let child = m.get(*head)?;
                // A present sub-message stays (with its `@type`) even when the masked field
                // under it is unset, as protobuf field-mask trimming leaves it.
                let kept = keep(child, rest).or_else(|| match child {
                    Value::Object(c) => Some(Value::Object(
                        c.get("@type")
                            .map(|t| ("@type".to_string(), t.clone()))
                            .into_iter()
                            .collect(),
                    )),
                    _ => None,
                })?;
                let mut out = Map::new();
                // Each `Any` along the path keeps its `@type`, as Envoy's masks do.
                if let Some(t) = m.get("@type") {
                    out.insert("@type".into(), t.clone());
                }
                out.insert(head.to_string(), kept);
                Some(Value::Object(out))
            }
            Value::Array(items) => Some(Value::Array(
                items.iter().filter_map(|i| keep(i, path)).collect(),
            )),
            _ => None,
        }
    }
    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    match a.get_mut(&k) {
                        Some(existing) => merge(existing, v),
                        None => {
                            a.insert(k, v);
                        }
                    }
                }
            }
            (slot, other) => *slot = other,
        }
    }
    let mut out = Value::Object(Map::new());
    if let Some(t) = v.get("@type") {
        merge(&mut out, json!({"@type": t}));
    }
    for p in paths {
        let parts: Vec<&str> = p.split('.').collect();
        if let Some(kept) = keep(&v, &parts) {
            merge(&mut out, kept);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_keeps_paths_and_type() {
        let v = json!({"@type": "t", "cluster": {"name": "a", "connect_timeout": "1s", "lb": {"x": 1, "y": 2}}, "last_updated": "z"});
        let m = apply_mask(v, &["cluster.name".into(), "cluster.lb.y".into()]);
        assert_eq!(
            m,
            json!({"@type": "t", "cluster": {"name": "a", "lb": {"y": 2}}})
        );
    }
}
