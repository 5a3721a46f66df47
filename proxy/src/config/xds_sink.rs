//! Applies xDS updates: each resource is compiled exactly as a static one would be, the new
//! snapshot is published atomically, and any compile error becomes the NACK's reason (it already
//! names the resource and the field).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prost::Message;
use xds_client::ads::{Sink, Update};
use xds_client::pb::envoy::config::cluster::v3::Cluster as PbCluster;

use super::snapshot::{DynamicInfo, Snapshot};
use crate::observe::stats::Store;
use crate::stat_struct;
use crate::upstream::cluster::{self, Cluster};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

stat_struct!(CdsStats {
    counter update_attempt,
    counter update_success,
    counter update_rejected,
    gauge version_text_hash,
});

pub struct XdsSink {
    current: Arc<ArcSwap<Snapshot>>,
    store: Store,
    cds: CdsStats,
    /// Dynamic clusters as last accepted, by name (for delta updates).
    accepted: HashMap<String, (PbCluster, String)>,
}

impl XdsSink {
    pub fn new(current: Arc<ArcSwap<Snapshot>>, store: Store) -> Self {
        let cds = CdsStats::new(&store, "cluster_manager.cds.");
        XdsSink {
            current,
            store,
            cds,
            accepted: HashMap::new(),
        }
    }

    /// Compiles the full set of dynamic clusters and publishes it.
    fn apply_clusters(&mut self, next: HashMap<String, (PbCluster, String)>) -> Result<(), String> {
        let snap = self.current.load_full();
        let mut compiled: Vec<(Arc<Cluster>, String)> = Vec::new();
        for (name, (pb, version)) in &next {
            let statically =
                snap.clusters.contains_key(name) && !snap.dynamic_clusters.contains_key(name);
            if statically {
                return Err(format!(
                    "cluster '{name}': a static cluster of this name exists"
                ));
            }
            // Unchanged clusters keep their compiled form (pools, balancer state, stats).
            let unchanged = self.accepted.get(name).is_some_and(|(old, _)| old == pb);
            let c = match (unchanged, snap.clusters.get(name)) {
                (true, Some(c)) => c.clone(),
                _ => Arc::new(cluster::compile(pb, &self.store).map_err(|e| e.to_string())?),
            };
            compiled.push((c, version.clone()));
        }
        let mut clusters: HashMap<String, Arc<Cluster>> = snap
            .clusters
            .iter()
            .filter(|(n, _)| !snap.dynamic_clusters.contains_key(*n))
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        let mut order: Vec<String> = snap
            .cluster_order
            .iter()
            .filter(|n| !snap.dynamic_clusters.contains_key(*n))
            .cloned()
            .collect();
        let now = crate::http::date::rfc3339_millis(std::time::SystemTime::now());
        let mut dynamic = std::collections::BTreeMap::new();
        for (c, version) in compiled {
            // An unchanged cluster keeps the time it last changed.
            let unchanged =
                self.accepted.get(&c.name).map(|(old, _)| old) == next.get(&c.name).map(|(p, _)| p);
            let last_updated = match (unchanged, snap.dynamic_clusters.get(&c.name)) {
                (true, Some(info)) => info.last_updated.clone(),
                _ => now.clone(),
            };
            dynamic.insert(
                c.name.clone(),
                DynamicInfo {
                    version,
                    last_updated,
                },
            );
            order.push(c.name.clone());
            clusters.insert(c.name.clone(), c);
        }
        self.store
            .gauge("cluster_manager.active_clusters")
            .set(clusters.len() as i64);
        let mut new = snap.with_clusters(clusters, order);
        new.dynamic_clusters = dynamic;
        self.current.store(Arc::new(new));
        self.accepted = next;
        Ok(())
    }

    fn cds(&mut self, update: Update) -> Result<(), String> {
        let mut next = match &update {
            Update::Sotw { .. } => HashMap::new(),
            Update::Delta { .. } => self.accepted.clone(),
        };
        match update {
            Update::Sotw { version, resources } => {
                for any in resources {
                    let c = decode(&any.type_url, &any.value)?;
                    next.insert(c.name.clone(), (c, version.clone()));
                }
            }
            Update::Delta { added, removed, .. } => {
                for r in removed {
                    next.remove(&r);
                }
                for r in added {
                    let c = decode(&r.body.type_url, &r.body.value)?;
                    if c.name != r.name {
                        return Err(format!("resource '{}' holds cluster '{}'", r.name, c.name));
                    }
                    next.insert(r.name, (c, r.version));
                }
            }
        }
        self.apply_clusters(next)
    }
}

fn decode(type_url: &str, bytes: &[u8]) -> Result<PbCluster, String> {
    if type_url != CLUSTER_TYPE {
        return Err(format!("expected {CLUSTER_TYPE}, got {type_url}"));
    }
    PbCluster::decode(bytes).map_err(|e| format!("cannot decode a cluster: {e}"))
}

impl Sink for XdsSink {
    fn apply(&mut self, type_url: &str, update: Update) -> Result<(), String> {
        match type_url {
            CLUSTER_TYPE => {
                self.cds.update_attempt.inc();
                let r = self.cds(update);
                match &r {
                    Ok(()) => self.cds.update_success.inc(),
                    Err(_) => self.cds.update_rejected.inc(),
                }
                crate::memory::release_config_memory();
                r
            }
            other => Err(format!("type {other} is not subscribed to")),
        }
    }
}
