//! Real Istio configuration over ADS: the listeners, clusters and endpoints of the sidecar and
//! gateway dumps in `../shared/istio/configdump`, served to Petrel as istiod would serve them.
//! Each resource is accepted, or refused with the reason the supported-extension table gives.

use std::collections::BTreeMap;
use std::path::PathBuf;

use petrel_tests::ads_server::serve_tcp;
use petrel_tests::xds::*;
use prost::{Message, Name};
use xds_client::pb::envoy::config::cluster::v3::Cluster;
use xds_client::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_client::pb::envoy::config::listener::v3::Listener;
use xds_client::pb::envoy::config::route::v3::RouteConfiguration;
use xds_client::pb::google::protobuf::Any;
use xds_client::TypeRegistry;

fn shared(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/istio")
        .join(path)
}

fn load(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(shared(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    if path.ends_with(".json") {
        serde_json::from_str(&text).expect("json")
    } else {
        serde_yaml::from_str(&text).expect("yaml")
    }
}

/// Every resource of type `M` in a config dump (the dump's own wrapping fields removed).
fn resources_of<M: Message + Default + Name>(
    reg: &TypeRegistry,
    dump: &serde_json::Value,
    field: &str,
) -> Vec<(String, Any)> {
    let mut out = Vec::new();
    let mut visit = |v: &serde_json::Value| {
        let Some(obj) = v.as_object() else { return };
        let mut r = serde_json::Value::Object(obj.clone());
        if let Some(m) = r.as_object_mut() {
            m.remove("@type");
        }
        let m: M = reg
            .from_json(&r, false)
            .unwrap_or_else(|e| panic!("{} from the dump: {e}", M::full_name()));
        let name = r["name"]
            .as_str()
            .or(r["cluster_name"].as_str())
            .unwrap_or("")
            .to_string();
        // Bootstrap listeners in a dump may have no name; xDS resources always do.
        if name.is_empty() {
            return;
        }
        out.push((
            name,
            Any {
                type_url: M::type_url(),
                value: m.encode_to_vec(),
            },
        ));
    };
    for config in dump["configs"].as_array().cloned().unwrap_or_default() {
        for (key, list) in config.as_object().cloned().unwrap_or_default() {
            let Some(items) = list.as_array() else {
                continue;
            };
            for item in items {
                // Active and warming states, static entries and dynamic ones alike.
                for state in ["active_state", "warming_state"] {
                    if let Some(s) = item.get(state) {
                        visit(&s[field]);
                    }
                }
                if key.starts_with("dynamic") || key.starts_with("static") {
                    if let Some(v) = item.get(field) {
                        visit(v);
                    }
                }
            }
        }
    }
    out
}

/// Pushes `resources` of one type in one delta response; returns the NACK's refusals by
/// resource name (empty for an ACK).
async fn push(
    s: &mut petrel_tests::ads_server::DeltaSession,
    type_url: &str,
    nonce: &str,
    resources: &[(String, Any)],
) -> BTreeMap<String, String> {
    let added = resources
        .iter()
        .map(|(n, a)| (n.as_str(), "dump", a.clone()))
        .collect();
    s.responses
        .send(Ok(delta(type_url, nonce, added, &[])))
        .await
        .expect("send");
    let r = loop {
        let r = next(&mut s.requests).await;
        if r.type_url == type_url && r.response_nonce == nonce {
            break r;
        }
    };
    let Some(e) = r.error_detail else {
        return BTreeMap::new();
    };
    // A route configuration's NACK is its one reason.
    if type_url == RDS {
        return resources
            .iter()
            .map(|(n, _)| (n.clone(), e.message.clone()))
            .collect();
    }
    // "Error adding/updating listener(s) a: why\nb: why\n", or clusters joined by ", ".
    let body = e
        .message
        .split_once(") ")
        .map(|(_, b)| b.to_string())
        .unwrap_or(e.message.clone());
    let names: Vec<&String> = resources.iter().map(|(n, _)| n).collect();
    let mut out = BTreeMap::new();
    for n in names {
        if let Some(at) = body.find(&format!("{n}: ")) {
            let rest = &body[at + n.len() + 2..];
            let end = rest.find('\n').unwrap_or(rest.len());
            out.insert(n.clone(), rest[..end].to_string());
        }
    }
    assert!(!out.is_empty(), "a NACK that names nothing: {}", e.message);
    out
}

/// A refusal the extension table explains: an extension named with the issue that brings it.
fn from_table(why: &str) -> bool {
    let extension = why.contains("' not supported by Petrel (") && why.ends_with(')');
    // "field(s) 'a' (comes with …, issue #5), 'b' (…) not supported by Petrel"
    let fields = why
        .split_once("field(s) ")
        .and_then(|(_, rest)| rest.strip_suffix(" not supported by Petrel"))
        .is_some_and(|list| {
            list.split("), ")
                .all(|f| f.contains("' (comes with") || f.contains("' (not planned"))
        });
    extension || fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_dumps_are_accepted_or_refused_by_the_table() {
    let reg = TypeRegistry::with_all_types();
    let sidecar = load("configdump/sidecar-productpage-rbac.yaml");
    let proxyconfig = load("configdump/sidecar-proxyconfig.json");
    let endpoints = load("configdump/endpoints.json");
    let listeners = resources_of::<Listener>(&reg, &sidecar, "listener");
    let mut clusters = resources_of::<Cluster>(&reg, &proxyconfig, "cluster");
    // Clusters named in both static and dynamic sections come once.
    clusters.sort_by(|a, b| a.0.cmp(&b.0));
    clusters.dedup_by(|a, b| a.0 == b.0);
    let assignments = resources_of::<ClusterLoadAssignment>(&reg, &endpoints, "endpoint_config");
    let mut routes = Vec::new();
    for f in [
        "configdump/gateway-routes-istio-gateway-http-route-prefix.json",
        "configdump/gateway-routes-k8s-gateway-http-route-path-prefix.json",
    ] {
        routes.extend(resources_of::<RouteConfiguration>(
            &reg,
            &load(f),
            "route_config",
        ));
    }
    assert!(listeners.len() > 20 && !clusters.is_empty() && !assignments.is_empty());

    let (addr, mut sessions) = serve_tcp().await;
    let (admin, _petrel) = start_with_lds("petrel", Ads::Tcp(&addr), "DELTA_GRPC").await;
    let mut s = next(&mut sessions.delta).await;
    assert_eq!(next(&mut s.requests).await.type_url, CDS);

    let mut report = Vec::new();
    // Route configurations one per response: a NACK of RDS refuses the whole response.
    let routes: Vec<Vec<(String, Any)>> = routes.into_iter().map(|r| vec![r]).collect();
    let mut pushes = vec![
        (CDS, "cds".to_string(), clusters),
        (LDS, "lds".to_string(), listeners),
        (EDS, "eds".to_string(), assignments),
    ];
    for (i, r) in routes.into_iter().enumerate() {
        pushes.push((RDS, format!("rds-{i}"), r));
    }
    for (type_url, nonce, set) in &pushes {
        let refused = push(&mut s, type_url, nonce, set).await;
        for (name, _) in set.iter() {
            match refused.get(name) {
                None => report.push(format!("accepted {type_url} {name}")),
                Some(why) => {
                    assert!(
                        from_table(why),
                        "{name} refused for a reason outside the extension table: {why}"
                    );
                    report.push(format!("refused {type_url} {name}: {why}"));
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    // The resources Petrel accepted are what it shows.
    let dump = admin_json(admin, "/config_dump").await;
    let accepted_clusters = report
        .iter()
        .filter(|l| l.starts_with(&format!("accepted {CDS}")))
        .count();
    let shown = dump["configs"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["@type"] == "type.googleapis.com/envoy.admin.v3.ClustersConfigDump")
        })
        .map(|c| {
            c["dynamic_active_clusters"]
                .as_array()
                .map_or(0, |a| a.len())
                + c["dynamic_warming_clusters"]
                    .as_array()
                    .map_or(0, |a| a.len())
        })
        .unwrap_or(0);
    assert_eq!(shown, accepted_clusters, "{dump}");
}

/// The type URL of a filter's config (`TypedStruct`s name the real one).
fn config_type(filter: &serde_json::Value) -> String {
    let tc = &filter["typed_config"];
    let t = tc["@type"].as_str().unwrap_or("");
    if t.ends_with("TypedStruct") {
        return tc["type_url"].as_str().unwrap_or("").to_string();
    }
    t.to_string()
}

fn deferred(type_url: &str) -> bool {
    matches!(
        petrel_filters::extensions::support(type_url),
        Some(petrel_filters::extensions::Support::Refused(_))
    )
}

/// A dump listener without what the extension table and the deferred fields put off to later
/// issues: filters of refused types, TLS chains (#6), `tracing` (#7), `max_stream_duration`
/// (#5) and XFCC (#6). None when nothing of it is left to serve (internal listeners, TLS only).
fn without_deferred(listener: &serde_json::Value, port: u16) -> Option<serde_json::Value> {
    fn strip(v: &mut serde_json::Value, fields: &[&str]) {
        match v {
            serde_json::Value::Object(m) => {
                for f in fields {
                    m.remove(*f);
                }
                m.values_mut().for_each(|v| strip(v, fields));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| strip(v, fields)),
            _ => {}
        }
    }
    let mut l = listener.clone();
    if l.get("internal_listener").is_some() {
        return None;
    }
    let keep_chain = |fc: &mut serde_json::Value| -> bool {
        if fc.get("transport_socket").is_some() {
            return false;
        }
        if let Some(filters) = fc.get_mut("filters").and_then(|f| f.as_array_mut()) {
            filters.retain(|f| !deferred(&config_type(f)));
            for f in filters.iter_mut() {
                let hf = f
                    .get_mut("typed_config")
                    .and_then(|t| t.get_mut("http_filters"))
                    .and_then(|h| h.as_array_mut());
                if let Some(hf) = hf {
                    hf.retain(|h| !deferred(&config_type(h)));
                }
            }
        }
        true
    };
    if let Some(chains) = l.get_mut("filter_chains").and_then(|c| c.as_array_mut()) {
        chains.retain_mut(keep_chain);
    }
    if let Some(fc) = l.get_mut("default_filter_chain") {
        keep_chain(fc);
    }
    let has_chains = l
        .get("filter_chains")
        .and_then(|c| c.as_array())
        .is_some_and(|c| !c.is_empty())
        || l.get("default_filter_chain").is_some();
    if !has_chains {
        return None;
    }
    strip(&mut l, &["tracing", "max_stream_duration"]);
    // Listeners that bind move to a free loopback port (15001/15006 may be taken here).
    if l.get("bind_to_port") != Some(&serde_json::json!(false)) {
        l["address"] =
            serde_json::json!({"socket_address": {"address": "127.0.0.1", "port_value": port}});
    }
    Some(l)
}

/// With what later issues bring taken out, every listener shape of the sidecar dump — the
/// outbound TCP and HTTP listeners, `virtualOutbound`, `virtualInbound` — is accepted as is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_listener_shapes_are_accepted() {
    let reg = TypeRegistry::with_all_types();
    let sidecar = load("configdump/sidecar-productpage-rbac.yaml");
    let mut listeners = Vec::new();
    for config in sidecar["configs"].as_array().cloned().unwrap_or_default() {
        for item in config["dynamic_listeners"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let mut l = item["active_state"]["listener"].clone();
            if let Some(m) = l.as_object_mut() {
                m.remove("@type");
            }
            if let Some(stripped) = without_deferred(&l, petrel_tests::free_port()) {
                let name = stripped["name"].as_str().unwrap_or("").to_string();
                let pb: Listener = reg
                    .from_json(&stripped, false)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                listeners.push((
                    name,
                    Any {
                        type_url: Listener::type_url(),
                        value: pb.encode_to_vec(),
                    },
                ));
            }
        }
    }
    assert!(listeners.len() >= 20, "{}", listeners.len());
    let (addr, mut sessions) = serve_tcp().await;
    let (admin, _petrel) = start_with_lds("petrel", Ads::Tcp(&addr), "DELTA_GRPC").await;
    let mut s = next(&mut sessions.delta).await;
    assert_eq!(next(&mut s.requests).await.type_url, CDS);
    // No clusters: TCP and RDS references resolve at request time, as in Envoy.
    assert!(push(&mut s, CDS, "cds", &[]).await.is_empty());
    let refused = push(&mut s, LDS, "lds", &listeners).await;
    assert!(refused.is_empty(), "{refused:#?}");
    let dump = admin_json(admin, "/config_dump?resource=dynamic_listeners").await;
    let shown = dump["configs"].as_array().map_or(0, |a| a.len());
    assert_eq!(shown, listeners.len(), "{dump}");
}
