//! Applies xDS updates: each resource is compiled exactly as a static one would be, the new
//! snapshot is published atomically, and any compile error becomes the NACK's reason (it already
//! names the resource and the field).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prost::Message;
use std::collections::BTreeSet;

use xds_client::ads::{AdsClient, Interest, Sink, Update};
use xds_client::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use xds_client::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

use super::snapshot::{DynamicInfo, Snapshot};
use crate::observe::stats::Store;
use crate::stat_struct;
use crate::upstream::cluster::{self, Cluster};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

stat_struct!(CdsStats {
    counter update_attempt,
    counter update_success,
    counter update_rejected,
});

stat_struct!(EdsStats {
    counter update_attempt,
    counter update_success,
    counter update_rejected,
});

pub struct XdsSink {
    current: Arc<ArcSwap<Snapshot>>,
    store: Store,
    cds: CdsStats,
    eds: EdsStats,
    /// Dynamic clusters as last accepted, by name (for delta updates).
    accepted: HashMap<String, (PbCluster, String)>,
    /// The accepted clusters compiled (EDS ones without hosts).
    base: HashMap<String, Arc<Cluster>>,
    /// Accepted `ClusterLoadAssignment`s by EDS name.
    assignments: HashMap<String, ClusterLoadAssignment>,
    /// The client, to follow EDS names as clusters come and go (set once it is running).
    client: Arc<std::sync::OnceLock<AdsClient>>,
    eds_names: BTreeSet<String>,
}

impl XdsSink {
    pub fn new(
        current: Arc<ArcSwap<Snapshot>>,
        store: Store,
        client: Arc<std::sync::OnceLock<AdsClient>>,
    ) -> Self {
        let cds = CdsStats::new(&store, "cluster_manager.cds.");
        let eds = EdsStats::new(&store, "cluster_manager.eds.");
        XdsSink {
            current,
            store,
            cds,
            eds,
            accepted: HashMap::new(),
            base: HashMap::new(),
            assignments: HashMap::new(),
            client,
            eds_names: BTreeSet::new(),
        }
    }

    /// Publishes static clusters plus every accepted dynamic one; an EDS cluster whose
    /// assignment has not arrived stays out (warming), as in Envoy.
    fn publish(
        &mut self,
        assignments: &HashMap<String, ClusterLoadAssignment>,
    ) -> Result<(), String> {
        let snap = self.current.load_full();
        let mut active: Vec<(Arc<Cluster>, String)> = Vec::new();
        for (name, base) in &self.base {
            let version = self
                .accepted
                .get(name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            match &base.eds_service {
                None => active.push((base.clone(), version)),
                Some(service) => {
                    if let Some(cla) = assignments.get(service) {
                        let previous = snap.clusters.get(name).map(|c| c.as_ref());
                        let c = cluster::with_assignment(base, cla, previous)
                            .map_err(|e| e.to_string())?;
                        active.push((Arc::new(c), version));
                    }
                }
            }
        }
        let is_dynamic = |n: &String| snap.dynamic_clusters.contains_key(n);
        let mut clusters: HashMap<String, Arc<Cluster>> = snap
            .clusters
            .iter()
            .filter(|(n, _)| !is_dynamic(n))
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        let mut order: Vec<String> = snap
            .cluster_order
            .iter()
            .filter(|n| !is_dynamic(n))
            .cloned()
            .collect();
        let statics = clusters.len();
        let now = crate::http::date::rfc3339_millis(std::time::SystemTime::now());
        let mut dynamic = std::collections::BTreeMap::new();
        for (c, version) in active {
            let unchanged = snap
                .clusters
                .get(&c.name)
                .is_some_and(|old| Arc::ptr_eq(old, &c));
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
        self.store
            .gauge("cluster_manager.warming_clusters")
            .set((statics + self.base.len()).saturating_sub(clusters.len()) as i64);
        let mut new = snap.with_clusters(clusters, order);
        new.dynamic_clusters = dynamic;
        self.current.store(Arc::new(new));
        // Follow the EDS names the clusters need.
        let names: BTreeSet<String> = self
            .base
            .values()
            .filter_map(|c| c.eds_service.clone())
            .collect();
        if names != self.eds_names {
            if let Some(client) = self.client.get() {
                client.subscribe(ENDPOINT_TYPE, Interest::Names(names.clone()));
            }
            self.eds_names = names;
        }
        Ok(())
    }

    fn eds(&mut self, update: Update) -> Result<(), String> {
        let mut next = match &update {
            Update::Sotw { .. } => HashMap::new(),
            Update::Delta { .. } => self.assignments.clone(),
        };
        let mut put = |any: &xds_client::pb::google::protobuf::Any| -> Result<(), String> {
            if any.type_url != ENDPOINT_TYPE {
                return Err(format!("expected {ENDPOINT_TYPE}, got {}", any.type_url));
            }
            let cla = ClusterLoadAssignment::decode(any.value.as_slice())
                .map_err(|e| format!("cannot decode an assignment: {e}"))?;
            next.insert(cla.cluster_name.clone(), cla);
            Ok(())
        };
        match &update {
            Update::Sotw { resources, .. } => {
                for a in resources {
                    put(a)?;
                }
            }
            Update::Delta { added, removed, .. } => {
                for r in added {
                    put(&r.body)?;
                }
                for r in removed {
                    next.remove(r);
                }
            }
        }
        self.publish(&next)?;
        self.assignments = next;
        Ok(())
    }

    /// Compiles the full set of dynamic clusters and publishes it.
    fn apply_clusters(&mut self, next: HashMap<String, (PbCluster, String)>) -> Result<(), String> {
        let snap = self.current.load_full();
        let mut base = HashMap::new();
        for (name, (pb, _)) in &next {
            if snap.clusters.contains_key(name)
                && !snap.dynamic_clusters.contains_key(name)
                && !self.base.contains_key(name)
            {
                return Err(format!(
                    "cluster '{name}': a static cluster of this name exists"
                ));
            }
            // Unchanged clusters keep their compiled form (pools, balancer state, stats).
            let c = match (self.accepted.get(name), self.base.get(name)) {
                (Some((old, _)), Some(c)) if old == pb => c.clone(),
                _ => Arc::new(cluster::compile(pb, &self.store).map_err(|e| e.to_string())?),
            };
            base.insert(name.clone(), c);
        }
        let (old_base, old_accepted) = (
            std::mem::replace(&mut self.base, base),
            std::mem::replace(&mut self.accepted, next),
        );
        let assignments = self.assignments.clone();
        if let Err(e) = self.publish(&assignments) {
            self.base = old_base;
            self.accepted = old_accepted;
            return Err(e);
        }
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
            ENDPOINT_TYPE => {
                self.eds.update_attempt.inc();
                let r = self.eds(update);
                match &r {
                    Ok(()) => self.eds.update_success.inc(),
                    Err(_) => self.eds.update_rejected.inc(),
                }
                r
            }
            other => Err(format!("type {other} is not subscribed to")),
        }
    }
}
