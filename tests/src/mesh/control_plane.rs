//! Serves each proxy of the mesh what [`Mesh::resources`] renders for it, as istiod does: delta
//! ADS on the pod's `./etc/istio/proxy/XDS` socket (wildcard CDS/LDS, named EDS/RDS, changes
//! pushed CDS → EDS → LDS → RDS when the mesh changes, removals as `removed_resources`), and
//! pilot-agent's SDS (`default`, `ROOTCA`) on `./var/run/secrets/workload-spiffe-uds/socket`.
//! Every NACK is recorded; the tests expect none.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use xds_client::pb::envoy::config::cluster::v3::Cluster;
use xds_client::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_client::pb::envoy::config::listener::v3::Listener;
use xds_client::pb::envoy::config::route::v3::RouteConfiguration;
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use xds_client::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use xds_client::pb::google::protobuf::Any;

use super::istiod::{Flavor, Mesh, Workload, CLUSTER, ENDPOINTS, LISTENER, ROUTES, SECRETS};
use crate::ads_server::{serve_sds_unix, serve_unix, DeltaSession};
use crate::sds::{sds_responder, Secrets};
use crate::xds::any;

/// The order istiod pushes types in, so that what a resource refers to arrives first.
const PUSH_ORDER: [&str; 5] = [CLUSTER, ENDPOINTS, SECRETS, LISTENER, ROUTES];

/// The control plane: the mesh as the tests change it, and what proxies refused.
pub struct ControlPlane {
    mesh: watch::Sender<Arc<Mesh>>,
    nacks: Arc<Mutex<Vec<String>>>,
}

/// The proxy a control-plane connection serves.
#[derive(Clone)]
pub struct ProxyIdentity {
    pub workload: Workload,
    pub gateway: bool,
    pub flavor: Flavor,
}

impl ControlPlane {
    pub fn new(mesh: Mesh) -> ControlPlane {
        ControlPlane {
            mesh: watch::channel(Arc::new(mesh)).0,
            nacks: Arc::default(),
        }
    }

    /// The mesh as it is now.
    pub fn mesh(&self) -> Arc<Mesh> {
        self.mesh.borrow().clone()
    }

    /// Changes the mesh (apply or delete Istio resources); every proxy gets the difference.
    pub fn update(&self, f: impl FnOnce(&mut Mesh)) {
        let mut m = (*self.mesh()).clone();
        f(&mut m);
        self.mesh.send_replace(Arc::new(m));
    }

    /// NACKs so far, as `<pod> <type>: <message>`.
    pub fn nacks(&self) -> Vec<String> {
        self.nacks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serves `proxy` on the sockets under its pod directory `dir` (pilot-agent's paths,
    /// opened to the proxy's uid).
    pub async fn serve(&self, dir: &Path, proxy: ProxyIdentity, secrets: watch::Receiver<Secrets>) {
        let xds = dir.join("etc/istio/proxy/XDS");
        let sds = dir.join("var/run/secrets/workload-spiffe-uds/socket");
        for p in [&xds, &sds] {
            std::fs::create_dir_all(p.parent().expect("socket dir")).expect("socket dir");
        }
        let mut ads = serve_unix(&xds).await;
        let sds_sessions = serve_sds_unix(&sds).await;
        for p in [&xds, &sds] {
            open_to_all(p);
        }
        let (nack_tx, mut nack_rx) = mpsc::unbounded_channel();
        sds_responder(sds_sessions, secrets, nack_tx);
        let (nacks, pod) = (self.nacks.clone(), proxy.workload.pod());
        tokio::spawn(async move {
            while let Some(m) = nack_rx.recv().await {
                nacks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{pod} SDS: {m}"));
            }
        });
        let (mesh, nacks) = (self.mesh.subscribe(), self.nacks.clone());
        tokio::spawn(async move {
            while let Some(session) = ads.delta.recv().await {
                tokio::spawn(delta_stream(
                    session,
                    mesh.clone(),
                    proxy.clone(),
                    nacks.clone(),
                ));
            }
        });
    }
}

fn open_to_all(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod socket");
}

/// What one type's subscription wants and what was sent for it (name → version).
#[derive(Default)]
struct TypeState {
    started: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    sent: BTreeMap<String, String>,
}

fn version_of(v: &Value) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    format!("{:016x}", h.finish())
}

fn pack(type_url: &str, v: &Value) -> Any {
    match type_url {
        CLUSTER => any::<Cluster>(v),
        ENDPOINTS => any::<ClusterLoadAssignment>(v),
        LISTENER => any::<Listener>(v),
        ROUTES => any::<RouteConfiguration>(v),
        SECRETS => any::<Secret>(v),
        other => panic!("no resources of type {other}"),
    }
}

async fn delta_stream(
    mut s: DeltaSession,
    mut mesh: watch::Receiver<Arc<Mesh>>,
    proxy: ProxyIdentity,
    nacks: Arc<Mutex<Vec<String>>>,
) {
    let mut types: HashMap<String, TypeState> = HashMap::new();
    let mut nonce = 0u64;
    loop {
        let mut must_answer = None;
        tokio::select! {
            r = s.requests.recv() => {
                let Some(r) = r else { return };
                if let Some(e) = &r.error_detail {
                    nacks.lock().unwrap_or_else(|e| e.into_inner())
                        .push(format!("{} {}: {}", proxy.workload.pod(), r.type_url, e.message));
                }
                let t = types.entry(r.type_url.clone()).or_default();
                if !t.started {
                    t.started = true;
                    // Envoy subscribes to CDS and LDS as wildcards (an empty first list).
                    t.wildcard = r.resource_names_subscribe.is_empty() || r.resource_names_subscribe.iter().any(|n| n == "*");
                    must_answer = Some(r.type_url.clone());
                }
                for n in r.resource_names_subscribe.iter().filter(|n| *n != "*") {
                    t.names.insert(n.clone());
                }
                for n in &r.resource_names_unsubscribe {
                    t.names.remove(n);
                    t.sent.remove(n);
                }
                if must_answer.is_none() && !r.resource_names_subscribe.is_empty() {
                    must_answer = Some(r.type_url.clone());
                }
            }
            c = mesh.changed() => { if c.is_err() { return } }
        }
        let snapshot = mesh
            .borrow()
            .resources(&proxy.workload, proxy.gateway, proxy.flavor);
        for type_url in PUSH_ORDER {
            let Some(t) = types.get_mut(type_url) else {
                continue;
            };
            let empty = BTreeMap::new();
            let current = snapshot.get(type_url).unwrap_or(&empty);
            let mut added = Vec::new();
            for (name, v) in current {
                if !t.wildcard && !t.names.contains(name) {
                    continue;
                }
                let version = version_of(v);
                if t.sent.get(name) != Some(&version) {
                    added.push(Resource {
                        name: name.clone(),
                        version: version.clone(),
                        resource: Some(pack(type_url, v)),
                        ..Default::default()
                    });
                    t.sent.insert(name.clone(), version);
                }
            }
            let removed: Vec<String> = t
                .sent
                .keys()
                .filter(|n| !current.contains_key(*n))
                .cloned()
                .collect();
            for n in &removed {
                t.sent.remove(n);
            }
            if added.is_empty() && removed.is_empty() && must_answer.as_deref() != Some(type_url) {
                continue;
            }
            nonce += 1;
            let resp = DeltaDiscoveryResponse {
                type_url: type_url.into(),
                nonce: nonce.to_string(),
                system_version_info: nonce.to_string(),
                resources: added,
                removed_resources: removed,
                ..Default::default()
            };
            if s.responses.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
}
