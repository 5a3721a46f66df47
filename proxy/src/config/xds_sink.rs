//! Applies xDS updates: each resource is compiled exactly as a static one would be, the new
//! snapshot is published atomically, and any compile error becomes the NACK's reason (it already
//! names the resource and the field).
//!
//! Clusters (CDS) and their endpoints (EDS) are here; listeners (LDS), their route
//! configurations (RDS) and initialization are in `xds_listeners.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use prost::Message;

use xds_client::ads::{AdsClient, Interest, Sink, Update};
use xds_client::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use xds_client::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_client::pb::google::protobuf::Any;

use super::dynamic::Dynamic;
use super::snapshot::{Assigned, Assignments, DynamicInfo, Snapshot};
use crate::cli::Options;
use crate::listener::manager::ListenerManager;
use crate::observe::stats::Store;
use crate::stat_struct;
use crate::upstream::cluster::{self, Cluster, ClusterSource};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

stat_struct!(SubscriptionStats {
    counter update_attempt,
    counter update_success,
    counter update_rejected,
});

/// The ADS sink shared with the timers that end waits (`initial_fetch_timeout`).
#[derive(Clone)]
pub struct SharedSink(pub Arc<Mutex<XdsState>>);

impl Sink for SharedSink {
    fn apply(&mut self, type_url: &str, update: Update) -> Result<(), String> {
        match self.0.lock() {
            Ok(mut s) => s.apply(type_url, update),
            Err(_) => Err("configuration state is unavailable".into()),
        }
    }
}

pub struct XdsState {
    pub(super) current: Arc<ArcSwap<Snapshot>>,
    pub(super) store: Store,
    pub(super) options: Options,
    pub(super) dynamic: Dynamic,
    pub(super) manager: Arc<Mutex<ListenerManager>>,
    /// Set once initialization is over (admin `/ready`).
    pub(super) initialized: Arc<std::sync::atomic::AtomicBool>,
    /// This state, for timers.
    pub(super) me: Weak<Mutex<XdsState>>,
    /// The client, to follow EDS/RDS names and to start LDS (set once it is running).
    pub(super) client: Arc<std::sync::OnceLock<AdsClient>>,
    stats: HashMap<&'static str, SubscriptionStats>,
    /// Dynamic clusters as last accepted (encoded, as a `Cluster` proto is large), by name (for
    /// delta updates); shared with the compiled clusters' `source`.
    accepted: HashMap<String, (ClusterSource, String)>,
    /// The accepted clusters compiled (EDS ones without hosts).
    base: HashMap<String, Arc<Cluster>>,
    /// Accepted `ClusterLoadAssignment`s by EDS name.
    pub(super) assignments: Arc<Assignments>,
    eds_names: BTreeSet<String>,
    /// EDS names whose `initial_fetch_timeout` passed: their clusters go active without hosts.
    eds_timed_out: HashSet<String>,
    pub(super) lds: super::xds_listeners::LdsState,
    pub(super) init: super::xds_listeners::InitState,
}

impl XdsState {
    pub fn new(
        current: Arc<ArcSwap<Snapshot>>,
        store: Store,
        options: Options,
        dynamic: Dynamic,
        manager: Arc<Mutex<ListenerManager>>,
        client: Arc<std::sync::OnceLock<AdsClient>>,
        initialized: Arc<std::sync::atomic::AtomicBool>,
    ) -> Arc<Mutex<XdsState>> {
        let stats = [
            (CLUSTER_TYPE, "cluster_manager.cds."),
            (ENDPOINT_TYPE, "cluster_manager.eds."),
            (LISTENER_TYPE, "listener_manager.lds."),
            (ROUTE_TYPE, "http.rds."),
        ]
        .into_iter()
        .map(|(t, p)| (t, SubscriptionStats::new(&store, p)))
        .collect();
        Arc::new_cyclic(|me| {
            Mutex::new(XdsState {
                current,
                store,
                options,
                dynamic,
                manager,
                initialized,
                me: me.clone(),
                client,
                stats,
                accepted: HashMap::new(),
                base: HashMap::new(),
                assignments: Default::default(),
                eds_names: BTreeSet::new(),
                eds_timed_out: HashSet::new(),
                lds: Default::default(),
                init: Default::default(),
            })
        })
    }

    /// Secrets arrived or rotated: listeners and clusters waiting on them may go now.
    pub fn secrets_changed(&mut self) {
        let a = self.assignments.clone();
        let _ = self.publish(&a);
        self.check_init();
    }

    /// Runs `f` on this state after `after` (an `initial_fetch_timeout`).
    pub(super) fn later(
        &self,
        after: std::time::Duration,
        f: impl FnOnce(&mut XdsState) + Send + 'static,
    ) {
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(s) = me.upgrade() {
                if let Ok(mut s) = s.lock() {
                    f(&mut s);
                }
            }
        });
    }

    fn apply(&mut self, type_url: &str, update: Update) -> Result<(), String> {
        let r = match type_url {
            CLUSTER_TYPE => self.cds(update),
            ENDPOINT_TYPE => self.eds(update),
            LISTENER_TYPE => self.lds_update(update),
            ROUTE_TYPE => self.rds_update(update),
            super::xds_secrets::SECRET_TYPE => {
                super::xds_secrets::apply(self, &crate::tls::secrets::SdsSource::Ads, &update)
            }
            other => Err(format!("type {other} is not subscribed to")),
        };
        if let Some(s) = self.stats.get(type_url) {
            s.update_attempt.inc();
            match &r {
                Ok(()) => s.update_success.inc(),
                Err(_) => s.update_rejected.inc(),
            }
        }
        // The first answer ends the initial fetch even when it is refused, as in Envoy.
        match type_url {
            CLUSTER_TYPE => self.init.cds_answered = true,
            LISTENER_TYPE => self.init.lds_answered = true,
            _ => {}
        }
        self.check_init();
        crate::memory::release_config_memory();
        r
    }

    /// Clusters as they should be published: static ones plus every accepted dynamic one; an
    /// EDS cluster whose assignment has not arrived stays out (warming), as in Envoy.
    fn cluster_set(
        &self,
        snap: &Snapshot,
        assignments: &Assignments,
    ) -> Result<ClusterSet, String> {
        let mut active: Vec<(Arc<Cluster>, String)> = Vec::new();
        let mut warming = Vec::new();
        for (name, base) in &self.base {
            let version = self
                .accepted
                .get(name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let warm = |version: String| {
                let since = snap
                    .warming_clusters
                    .iter()
                    .find(|(c, i)| Arc::ptr_eq(c, base) && i.version == version)
                    .map(|(_, i)| i.last_updated.clone())
                    .unwrap_or_else(now);
                (
                    base.clone(),
                    DynamicInfo {
                        version,
                        last_updated: since,
                    },
                )
            };
            // A cluster warms until the SDS secrets of its transport sockets arrive.
            if !base.transport.ready() {
                warming.push(warm(version));
                continue;
            }
            match &base.eds_service {
                None => active.push((base.clone(), version)),
                Some(service) => {
                    let empty = ClusterLoadAssignment::default();
                    let cla = match assignments.get(service) {
                        Some(a) => a.cla.as_ref(),
                        None if self.eds_timed_out.contains(service) => &empty,
                        None => {
                            warming.push(warm(version));
                            continue;
                        }
                    };
                    let previous = snap.clusters.get(name).map(|c| c.as_ref());
                    let c =
                        cluster::with_assignment(base, cla, previous).map_err(|e| e.to_string())?;
                    active.push((Arc::new(c), version));
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
        let now = now();
        let mut dynamic = BTreeMap::new();
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
        debug_assert_eq!(
            warming.len(),
            (statics + self.base.len()).saturating_sub(clusters.len())
        );
        Ok(ClusterSet {
            clusters,
            order,
            dynamic,
            warming,
        })
    }

    /// Publishes clusters (with these assignments) and listeners as accepted now.
    pub(super) fn publish(&mut self, assignments: &Arc<Assignments>) -> Result<(), String> {
        let snap = self.current.load_full();
        let set = self.cluster_set(&snap, assignments)?;
        self.store
            .gauge("cluster_manager.active_clusters")
            .set(set.clusters.len() as i64);
        self.store
            .gauge("cluster_manager.warming_clusters")
            .set(set.warming.len() as i64);
        let mut next = snap.with_clusters(set.clusters, set.order);
        next.dynamic_clusters = set.dynamic;
        next.warming_clusters = set.warming;
        next.endpoint_configs = assignments.clone();
        self.place_listeners(&snap, &mut next)?;
        self.current.store(Arc::new(next));
        // Follow the EDS names the clusters need; a cluster warming on one that may time out
        // gets a timer.
        let names: BTreeSet<String> = self
            .base
            .values()
            .filter_map(|c| c.eds_service.clone())
            .collect();
        if names != self.eds_names {
            for c in self.base.values() {
                let (Some(service), Some(after)) = (&c.eds_service, c.eds_wait.timeout()) else {
                    continue;
                };
                if !self.eds_names.contains(service) && !assignments.contains_key(service) {
                    let service = service.clone();
                    self.later(after, move |s| {
                        if s.eds_timed_out.insert(service) {
                            let a = s.assignments.clone();
                            let _ = s.publish(&a);
                            s.check_init();
                        }
                    });
                }
            }
            if let Some(client) = self.client.get() {
                client.subscribe(ENDPOINT_TYPE, Interest::Names(names.clone()));
            }
            self.eds_names = names;
        }
        self.follow_routes();
        Ok(())
    }

    fn eds(&mut self, update: Update) -> Result<(), String> {
        // Assignments absent from a state-of-the-world answer are kept: only LDS and CDS
        // remove by absence (xDS protocol).
        let mut next: Assignments = self.assignments.as_ref().clone();
        let now = now();
        let mut put = |any: &Any, version: &str| -> Result<(), String> {
            let cla: ClusterLoadAssignment = decode(ENDPOINT_TYPE, any, "an assignment")?;
            let unchanged = next
                .get(&cla.cluster_name)
                .is_some_and(|a| *a.cla == cla && a.info.version == version);
            if !unchanged {
                let info = DynamicInfo {
                    version: version.to_string(),
                    last_updated: now.clone(),
                };
                let name = cla.cluster_name.clone();
                next.insert(
                    name,
                    Assigned {
                        cla: Arc::new(cla),
                        info,
                    },
                );
            }
            Ok(())
        };
        match &update {
            Update::Sotw { resources, version } => {
                for a in resources {
                    put(a, version)?;
                }
            }
            Update::Delta { added, removed, .. } => {
                for r in added {
                    put(&r.body, &r.version)?;
                }
                for r in removed {
                    next.remove(r);
                }
            }
        }
        let next = Arc::new(next);
        self.publish(&next)?;
        self.assignments = next;
        Ok(())
    }

    /// Compiles the full set of dynamic clusters and publishes it.
    /// Applies the wanted set of dynamic clusters resource by resource, as Envoy does: a cluster
    /// that does not compile is refused (keeping its previous version, if any) while the others
    /// apply, and the NACK names every refused one.
    fn apply_clusters(
        &mut self,
        wanted: HashMap<String, (ClusterSource, String)>,
    ) -> Result<(), String> {
        let snap = self.current.load_full();
        let mut base = HashMap::new();
        let mut accepted = HashMap::new();
        let mut errors = Vec::new();
        let mut names: Vec<&String> = wanted.keys().collect();
        names.sort();
        for name in names {
            let (pb, version) = &wanted[name];
            let compiled = if snap.clusters.contains_key(name)
                && !snap.dynamic_clusters.contains_key(name)
                && !self.base.contains_key(name)
            {
                Err("a static cluster of this name exists".to_string())
            } else {
                // Unchanged clusters keep their compiled form (pools, balancer state, stats).
                match (self.accepted.get(name), self.base.get(name)) {
                    (Some((old, _)), Some(c)) if old == pb => Ok(c.clone()),
                    _ => cluster::compile_source(
                        pb,
                        &self.store,
                        cluster::ClusterEnv {
                            event_log: snap.cluster_manager.outlier_event_log.as_ref(),
                            node: &snap.node,
                        },
                    )
                    .map(Arc::new)
                    .map_err(|e| e.to_string()),
                }
            };
            match compiled {
                Ok(c) => {
                    base.insert(name.clone(), c);
                    accepted.insert(name.clone(), (pb.clone(), version.clone()));
                }
                Err(e) => {
                    errors.push(format!("{name}: {e}"));
                    if let (Some(old), Some(c)) = (self.accepted.get(name), self.base.get(name)) {
                        base.insert(name.clone(), c.clone());
                        accepted.insert(name.clone(), old.clone());
                    }
                }
            }
        }
        let (old_base, old_accepted) = (
            std::mem::replace(&mut self.base, base),
            std::mem::replace(&mut self.accepted, accepted),
        );
        let assignments = self.assignments.clone();
        if let Err(e) = self.publish(&assignments) {
            self.base = old_base;
            self.accepted = old_accepted;
            return Err(e);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "Error adding/updating cluster(s) {}",
                errors.join(", ")
            ))
        }
    }

    fn cds(&mut self, update: Update) -> Result<(), String> {
        let next = collect_as(update, &self.accepted, |any| {
            let c: PbCluster = decode(CLUSTER_TYPE, any, "a cluster")?;
            Ok((c.name.clone(), ClusterSource::encode(&c)))
        })?;
        self.apply_clusters(next)
    }
}

/// What `cluster_set` computes.
struct ClusterSet {
    clusters: HashMap<String, Arc<Cluster>>,
    order: Vec<String>,
    dynamic: BTreeMap<String, DynamicInfo>,
    warming: Vec<(Arc<Cluster>, DynamicInfo)>,
}

pub(super) fn now() -> String {
    crate::http::date::rfc3339_millis(std::time::SystemTime::now())
}

/// Decodes one resource of the expected type.
pub(crate) fn decode<T: Message + Default>(
    type_url: &str,
    any: &Any,
    what: &str,
) -> Result<T, String> {
    if any.type_url != type_url {
        return Err(format!("expected {type_url}, got {}", any.type_url));
    }
    T::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {what}: {e}"))
}

/// The full set of named resources after an update: a state-of-the-world update replaces the
/// set (absent ones are removed); a delta one adds and removes from what was accepted.
pub(super) fn collect<T: Message + Default>(
    update: Update,
    accepted: &HashMap<String, (Arc<T>, String)>,
    name_of: impl Fn(&T) -> String,
    type_url: &str,
) -> Result<HashMap<String, (Arc<T>, String)>, String> {
    collect_as(update, accepted, |any| {
        let r: T = decode(type_url, any, "a resource")?;
        Ok((name_of(&r), Arc::new(r)))
    })
}

/// `collect` keeping each resource as `decode` makes it (name and stored form).
pub(super) fn collect_as<V: Clone>(
    update: Update,
    accepted: &HashMap<String, (V, String)>,
    decode: impl Fn(&Any) -> Result<(String, V), String>,
) -> Result<HashMap<String, (V, String)>, String> {
    match update {
        Update::Sotw { version, resources } => {
            let mut next = HashMap::new();
            for any in resources {
                let (name, r) = decode(&any)?;
                next.insert(name, (r, version.clone()));
            }
            Ok(next)
        }
        Update::Delta { added, removed, .. } => {
            let mut next = accepted.clone();
            for r in removed {
                next.remove(&r);
            }
            for r in added {
                let (name, body) = decode(&r.body)?;
                if name != r.name {
                    return Err(format!("resource '{}' holds '{name}'", r.name));
                }
                next.insert(r.name, (body, r.version));
            }
            Ok(next)
        }
    }
}
