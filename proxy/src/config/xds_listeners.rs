//! Listeners from LDS and route configurations from RDS, and initialization.
//!
//! A listener warms until every route configuration its connection managers name has arrived
//! (or its `initial_fetch_timeout` passed); while an update warms, the listener it replaces
//! keeps serving. A replaced or removed listener drains its connections (`--drain-time-s`,
//! `--drain-strategy`). Initialization follows Envoy: clusters first (CDS and the EDS of the
//! clusters it brings), then LDS is requested, and workers start accepting once the listeners
//! have warmed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use xds_client::ads::{Interest, Update};
use xds_client::pb::envoy::config::listener::v3::Listener as PbListener;
use xds_client::pb::envoy::config::route::v3::RouteConfiguration;

use super::dynamic::Wait;
use super::snapshot::{DynamicInfo, RdsRoute, Snapshot};
use super::xds_sink::{collect, now, XdsState, LISTENER_TYPE, ROUTE_TYPE};
use crate::listener::{self, Listener, ListenerSet};
use crate::plog;
use crate::router::route_config::{self, CompileOptions};

#[derive(Default)]
pub struct LdsState {
    /// Accepted listeners by name, with their version.
    accepted: HashMap<String, (Arc<PbListener>, String)>,
    compiled: HashMap<String, Arc<Listener>>,
    /// When each accepted listener last changed.
    updated: HashMap<String, String>,
    /// Listener names in the order they first arrived.
    order: Vec<String>,
    /// Accepted route configurations by name, with their version.
    routes_accepted: HashMap<String, (Arc<RouteConfiguration>, String)>,
    routes: HashMap<String, RdsRoute>,
    rds_names: BTreeSet<String>,
    /// Route names whose `initial_fetch_timeout` passed: listeners stop waiting for them.
    rds_timed_out: HashSet<String>,
}

#[derive(Default)]
pub struct InitState {
    pub cds_answered: bool,
    pub lds_answered: bool,
    pub cds_timed_out: bool,
    pub lds_timed_out: bool,
    clusters_done: bool,
    done: bool,
}

impl XdsState {
    /// Applies the wanted set of listeners resource by resource, as Envoy does: a listener that
    /// does not compile, clashes with another's address or cannot bind is refused (its previous
    /// version, if any, stays) while the others apply; the NACK names every refused one.
    pub(super) fn lds_update(&mut self, update: Update) -> Result<(), String> {
        let wanted = collect(
            update,
            &self.lds.accepted,
            |l: &PbListener| l.name.clone(),
            LISTENER_TYPE,
        )?;
        let snap = self.current.load_full();
        let known: HashSet<String> = snap.clusters.keys().cloned().collect();
        let local_address = crate::local_info::local_address(self.options.local_address_ip_version);
        let mut accepted = HashMap::new();
        let mut compiled: HashMap<String, Arc<Listener>> = HashMap::new();
        let mut errors = Vec::new();
        // Two bound listeners on one address would silently share it (SO_REUSEPORT).
        let mut addresses: HashMap<std::net::SocketAddr, String> = snap
            .listeners
            .iter()
            .filter(|l| l.bind_to_port && !snap.dynamic_listeners.contains_key(&l.name))
            .map(|l| (l.address, l.name.clone()))
            .collect();
        let mut names: Vec<&String> = wanted.keys().collect();
        names.sort();
        for name in names {
            let (pb, version) = &wanted[name];
            match self.listener_for(name, pb, &snap, &known, local_address, &mut addresses) {
                Ok(l) => {
                    compiled.insert(name.clone(), l);
                    accepted.insert(name.clone(), (pb.clone(), version.clone()));
                }
                Err(e) => {
                    errors.push(format!("{name}: {e}\n"));
                    let old = (self.lds.accepted.get(name), self.lds.compiled.get(name));
                    if let (Some(old), Some(l)) = old {
                        compiled.insert(name.clone(), l.clone());
                        accepted.insert(name.clone(), old.clone());
                    }
                }
            }
        }
        let now = now();
        let mut updated = HashMap::new();
        for (name, l) in &compiled {
            let same = self
                .lds
                .compiled
                .get(name)
                .is_some_and(|old| Arc::ptr_eq(old, l));
            let at = match (same, self.lds.updated.get(name)) {
                (true, Some(at)) => at.clone(),
                _ => now.clone(),
            };
            updated.insert(name.clone(), at);
        }
        let mut order: Vec<String> = self
            .lds
            .order
            .iter()
            .filter(|n| compiled.contains_key(*n))
            .cloned()
            .collect();
        let mut fresh: Vec<&String> = compiled.keys().filter(|n| !order.contains(n)).collect();
        fresh.sort();
        order.extend(fresh.into_iter().cloned());
        let old = (
            std::mem::replace(&mut self.lds.accepted, accepted),
            std::mem::replace(&mut self.lds.compiled, compiled),
            std::mem::replace(&mut self.lds.updated, updated),
            std::mem::replace(&mut self.lds.order, order),
        );
        let assignments = self.assignments.clone();
        if let Err(e) = self.publish(&assignments) {
            (
                self.lds.accepted,
                self.lds.compiled,
                self.lds.updated,
                self.lds.order,
            ) = old;
            return Err(format!("Error adding/updating listener(s) {e}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "Error adding/updating listener(s) {}",
                errors.concat()
            ))
        }
    }

    /// One wanted listener: its compiled form (unchanged listeners keep theirs, so their
    /// connections do not drain), its address checked against the others and bound.
    fn listener_for(
        &self,
        name: &str,
        pb: &Arc<PbListener>,
        snap: &Snapshot,
        known: &HashSet<String>,
        local_address: std::net::IpAddr,
        addresses: &mut HashMap<std::net::SocketAddr, String>,
    ) -> Result<Arc<Listener>, String> {
        if snap.listeners.get(name).is_some() && !snap.dynamic_listeners.contains_key(name) {
            return Err("a static listener of this name exists".into());
        }
        let l = match (self.lds.accepted.get(name), self.lds.compiled.get(name)) {
            (Some((old, _)), Some(l)) if old == pb => l.clone(),
            _ => Arc::new(
                listener::compile(
                    &listener::ListenerEnv {
                        local_address,
                        tracing: snap.tracing.as_ref(),
                        node: &snap.node,
                    },
                    pb,
                    known,
                    &self.store,
                )
                .map_err(|e| e.to_string())?,
            ),
        };
        if l.bind_to_port {
            if let Some(other) = addresses.get(&l.address) {
                return Err(format!(
                    "error adding listener: '{name}' has duplicate address '{}' as existing listener '{other}'",
                    l.address
                ));
            }
            self.manager
                .lock()
                .map_err(|_| "listener manager is unavailable".to_string())?
                .bind(&l)
                .map_err(|e| e.to_string())?;
            addresses.insert(l.address, name.to_string());
        }
        Ok(l)
    }

    pub(super) fn rds_update(&mut self, update: Update) -> Result<(), String> {
        // Route configurations absent from a state-of-the-world answer are kept (only LDS and
        // CDS remove by absence).
        let next = match update {
            Update::Sotw { version, resources } => {
                let mut next = self.lds.routes_accepted.clone();
                let added = collect(
                    Update::Sotw { version, resources },
                    &HashMap::new(),
                    |r: &RouteConfiguration| r.name.clone(),
                    ROUTE_TYPE,
                )?;
                next.extend(added);
                next
            }
            delta => collect(
                delta,
                &self.lds.routes_accepted,
                |r: &RouteConfiguration| r.name.clone(),
                ROUTE_TYPE,
            )?,
        };
        let snap = self.current.load_full();
        let known: HashSet<String> = snap.clusters.keys().cloned().collect();
        let mut routes = HashMap::new();
        let now = now();
        for (name, (pb, version)) in &next {
            let kept = self
                .lds
                .routes_accepted
                .get(name)
                .filter(|(old, _)| old == pb)
                .and(self.lds.routes.get(name));
            let r = match kept {
                Some(r) => r.clone(),
                None => {
                    let opts = CompileOptions {
                        known_clusters: Some(&known),
                        from_rds: true,
                    };
                    let table = route_config::compile(pb, &opts)
                        .map_err(|e| format!("route config '{name}': {e}"))?;
                    RdsRoute {
                        table: Arc::new(table),
                        source: pb.clone(),
                        info: DynamicInfo {
                            version: version.clone(),
                            last_updated: now.clone(),
                        },
                    }
                }
            };
            routes.insert(name.clone(), r);
        }
        let old = (
            std::mem::replace(&mut self.lds.routes_accepted, next),
            std::mem::replace(&mut self.lds.routes, routes),
        );
        let assignments = self.assignments.clone();
        if let Err(e) = self.publish(&assignments) {
            (self.lds.routes_accepted, self.lds.routes) = old;
            return Err(e);
        }
        Ok(())
    }

    /// Puts the accepted listeners into `next`: warmed ones active, the others warming (the one
    /// they replace keeps serving); binds sockets for new addresses and drains what was
    /// replaced or removed.
    pub(super) fn place_listeners(
        &mut self,
        old: &Snapshot,
        next: &mut Snapshot,
    ) -> Result<(), String> {
        let mut active: Vec<Arc<Listener>> = old
            .listeners
            .iter()
            .filter(|l| !old.dynamic_listeners.contains_key(&l.name))
            .cloned()
            .collect();
        let mut warming = Vec::new();
        let mut infos = BTreeMap::new();
        for name in &self.lds.order {
            let (Some(l), Some((_, version))) =
                (self.lds.compiled.get(name), self.lds.accepted.get(name))
            else {
                continue;
            };
            let info = DynamicInfo {
                version: version.clone(),
                last_updated: self.lds.updated.get(name).cloned().unwrap_or_default(),
            };
            let ready = l.tls_ready()
                && l.rds
                    .keys()
                    .all(|r| self.lds.routes.contains_key(r) || self.lds.rds_timed_out.contains(r));
            if ready {
                active.push(l.clone());
                infos.insert(name.clone(), info);
                continue;
            }
            warming.push((l.clone(), info));
            if let (Some(prev), Some(prev_info)) =
                (old.listeners.get(name), old.dynamic_listeners.get(name))
            {
                active.push(prev.clone());
                infos.insert(name.clone(), prev_info.clone());
            }
        }
        let set = ListenerSet::new(active);
        {
            let warming_refs: Vec<&Listener> = warming.iter().map(|(l, _)| l.as_ref()).collect();
            let mut m = self
                .manager
                .lock()
                .map_err(|_| "listener manager is unavailable".to_string())?;
            m.update(&set, &warming_refs).map_err(|e| e.to_string())?;
        }
        let drain_time = Duration::from_secs(self.options.drain_time_s as u64);
        for l in old.listeners.iter() {
            if set.iter().any(|n| Arc::ptr_eq(n, l)) || l.drain.is_draining() {
                continue;
            }
            l.drain.start(drain_time, self.options.drain_strategy);
            let gauge = self
                .store
                .gauge("listener_manager.total_listeners_draining");
            gauge.inc();
            let drain = l.drain.clone();
            tokio::spawn(async move {
                drain.finished().await;
                gauge.dec();
            });
        }
        self.store
            .gauge("listener_manager.total_listeners_active")
            .set(set.len() as i64);
        self.store
            .gauge("listener_manager.total_listeners_warming")
            .set(warming.len() as i64);
        next.listeners = set;
        next.dynamic_listeners = infos;
        next.warming_listeners = warming;
        next.route_configs = self.lds.routes.clone();
        Ok(())
    }

    /// Subscribes to the route configurations the listeners name (static ones included), and
    /// starts the `initial_fetch_timeout` of each new one that has one.
    pub(super) fn follow_routes(&mut self) {
        let snap = self.current.load_full();
        let mut wanted: BTreeMap<String, Wait> = BTreeMap::new();
        let all = snap
            .listeners
            .iter()
            .chain(snap.warming_listeners.iter().map(|(l, _)| l));
        for l in all {
            for (n, w) in &l.rds {
                wanted.insert(n.clone(), *w);
            }
        }
        let names: BTreeSet<String> = wanted.keys().cloned().collect();
        if names == self.lds.rds_names {
            return;
        }
        for (name, wait) in &wanted {
            let Some(after) = wait.timeout() else {
                continue;
            };
            if self.lds.rds_names.contains(name) || self.lds.routes.contains_key(name) {
                continue;
            }
            let name = name.clone();
            self.later(after, move |s| {
                if !s.lds.routes.contains_key(&name) && s.lds.rds_timed_out.insert(name) {
                    let a = s.assignments.clone();
                    let _ = s.publish(&a);
                    s.check_init();
                }
            });
        }
        if let Some(client) = self.client.get() {
            client.subscribe(ROUTE_TYPE, Interest::Names(names.clone()));
        }
        self.lds.rds_names = names;
    }

    /// Moves initialization on: once clusters are in (CDS answered or timed out, none
    /// warming) LDS is requested; once listeners are in and warm, workers start accepting.
    pub fn check_init(&mut self) {
        if self.init.done {
            return;
        }
        let (cds, lds) = (self.dynamic.cds, self.dynamic.lds);
        if !self.init.clusters_done {
            let answered = cds.is_none() || self.init.cds_answered || self.init.cds_timed_out;
            if !answered || !self.current.load().warming_clusters.is_empty() {
                return;
            }
            self.init.clusters_done = true;
            if let Some(wait) = lds {
                if let Some(client) = self.client.get() {
                    client.subscribe(LISTENER_TYPE, Interest::Wildcard);
                }
                if let Some(after) = wait.timeout() {
                    self.later(after, |s| {
                        s.init.lds_timed_out = true;
                        s.check_init();
                    });
                }
            }
        }
        let answered = lds.is_none() || self.init.lds_answered || self.init.lds_timed_out;
        let snap = self.current.load_full();
        let routes_in = snap.listeners.iter().all(|l| {
            l.rds
                .keys()
                .all(|r| self.lds.routes.contains_key(r) || self.lds.rds_timed_out.contains(r))
        });
        if !answered || !snap.warming_listeners.is_empty() || !routes_in {
            return;
        }
        self.init.done = true;
        if let Ok(mut m) = self.manager.lock() {
            m.start_workers(&snap.listeners);
        }
        self.store.gauge("listener_manager.workers_started").set(1);
        crate::server::record_initialized(&self.store);
        self.store.gauge("server.state").set(0);
        self.initialized
            .store(true, std::sync::atomic::Ordering::Relaxed);
        plog!(
            info,
            "main",
            "all dependencies initialized. starting workers"
        );
    }

    /// Starts the CDS `initial_fetch_timeout`, if any, and moves initialization on (a
    /// bootstrap with LDS and no CDS requests LDS at once).
    pub fn begin(&mut self) {
        if let Some(after) = self.dynamic.cds.and_then(|w| w.timeout()) {
            self.later(after, |s| {
                s.init.cds_timed_out = true;
                s.check_init();
            });
        }
        self.check_init();
    }
}
