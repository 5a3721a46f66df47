//! SDS: subscribes to the secrets the TLS contexts name, on ADS or on a `SecretDiscoveryService`
//! stream to a static cluster (Istio's pilot-agent serves `default` and `ROOTCA` on the
//! `sds-grpc` Unix socket), and re-publishes listeners and clusters when a secret arrives
//! (they leave warming) or rotates (new handshakes use it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use xds_client::ads::{AdsClient, AdsConfig, ApiType, Interest, Service, Sink, Target, Update};
use xds_client::pb::envoy::config::core::v3::Node;
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::Secret;

use super::snapshot::Snapshot;
use super::xds_sink::{decode, XdsState};
use crate::tls::secrets::{registry, SdsSource};
use crate::upstream::cluster::HostAddress;

pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Secrets from an update with their versions: every resource (state of the world) or the
/// added ones (delta; a removed secret keeps serving, as Envoy keeps it).
pub fn secrets_of(update: &Update) -> Result<Vec<(Secret, String)>, String> {
    let anys: Vec<(&xds_client::pb::google::protobuf::Any, &str)> = match update {
        Update::Sotw { resources, version } => {
            resources.iter().map(|r| (r, version.as_str())).collect()
        }
        Update::Delta { added, .. } => added
            .iter()
            .map(|r| (&r.body, r.version.as_str()))
            .collect(),
    };
    anys.into_iter()
        .map(|(a, v)| Ok((decode::<Secret>(SECRET_TYPE, a, "a secret")?, v.to_string())))
        .collect()
}

/// Applies secrets from `source`, then lets listeners and clusters waiting on them go.
pub fn apply(state: &mut XdsState, source: &SdsSource, update: &Update) -> Result<(), String> {
    let secrets = secrets_of(update)?;
    // What compiled applies (and may end warming) even when another secret is refused.
    let (changed, result) = registry().apply(source, &secrets);
    if changed {
        state.secrets_changed();
    }
    result
}

/// The sink of one SDS stream.
struct SecretSink {
    source: SdsSource,
    state: Arc<Mutex<XdsState>>,
}

impl Sink for SecretSink {
    fn apply(&mut self, type_url: &str, update: Update) -> Result<(), String> {
        if type_url != SECRET_TYPE {
            return Err(format!("type {type_url} is not subscribed to"));
        }
        let mut s = self
            .state
            .lock()
            .map_err(|_| "configuration state is unavailable".to_string())?;
        apply(&mut s, &self.source, &update)
    }
}

/// Where a static cluster's first host is, as a gRPC target.
fn target(snap: &Snapshot, cluster: &str) -> Option<Target> {
    let c = snap.clusters.get(cluster)?;
    match &c.host_set.hosts.first()?.address {
        HostAddress::Pipe(p) => Some(Target::Unix(p.as_ref().into())),
        HostAddress::Ip(a) => Some(Target::Tcp(format!("http://{a}"))),
    }
}

/// Keeps every source's subscription equal to the names the live TLS contexts hold.
pub async fn follow(
    state: Arc<Mutex<XdsState>>,
    current: Arc<ArcSwap<Snapshot>>,
    node: Node,
    ads: Option<AdsClient>,
) {
    let mut streams: BTreeMap<SdsSource, AdsClient> = BTreeMap::new();
    let mut asked: BTreeMap<SdsSource, BTreeSet<String>> = BTreeMap::new();
    loop {
        // Register interest in the wake-up before reading, so no change is missed.
        let changed = registry().wanted_changed.notified();
        for (source, names) in registry().wanted() {
            if asked.get(&source) == Some(&names) {
                continue;
            }
            let client = match &source {
                // Never wanted from xDS (`wanted` leaves them out).
                SdsSource::Static => None,
                SdsSource::Ads => ads.clone(),
                SdsSource::Grpc { cluster, delta } => match streams.get(&source) {
                    Some(c) => Some(c.clone()),
                    None => target(&current.load(), cluster).map(|t| {
                        let mut config = AdsConfig::new(
                            t,
                            if *delta {
                                ApiType::Delta
                            } else {
                                ApiType::Sotw
                            },
                            node.clone(),
                        );
                        config.service = Service::Secrets;
                        let c = xds_client::ads::spawn(
                            config,
                            SecretSink {
                                source: source.clone(),
                                state: state.clone(),
                            },
                        );
                        streams.insert(source.clone(), c.clone());
                        c
                    }),
                },
            };
            if let Some(c) = client {
                c.subscribe(SECRET_TYPE, Interest::Names(names.clone()));
                asked.insert(source, names);
            }
        }
        // Wait for new names, or for the first `initial_fetch_timeout` to run out.
        match registry().next_deadline() {
            Some(at) => {
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep_until(at.into()) => {
                        if registry().expire_due() {
                            if let Ok(mut s) = state.lock() {
                                s.secrets_changed();
                            }
                        }
                    }
                }
            }
            None => changed.await,
        }
    }
}
