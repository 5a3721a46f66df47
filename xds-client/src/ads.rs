//! The ADS client: one bidirectional gRPC stream (state of the world or delta) to the management
//! server over TCP or a Unix socket, per-type subscriptions, version/nonce bookkeeping,
//! ACK/NACK, and reconnection with jittered exponential backoff.
//!
//! It knows nothing of listeners or HTTP: each response is handed to a [`Sink`], whose verdict
//! becomes the ACK or the NACK (with the sink's reason as `error_detail`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// `api_type` of the bootstrap's `ads_config`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ApiType {
    /// `GRPC`: state of the world.
    Sotw,
    /// `DELTA_GRPC` (Istio's default).
    Delta,
}

/// Where the management server is.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `http://host:port`.
    Tcp(String),
    /// A Unix socket path (`pipe` address; Istio's is `./etc/istio/proxy/XDS`).
    Unix(PathBuf),
}

/// Which gRPC service the stream is on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Service {
    /// `AggregatedDiscoveryService` (ADS: every type on one stream).
    Aggregated,
    /// `SecretDiscoveryService` (SDS on its own stream, as Istio's pilot-agent serves it).
    Secrets,
}

#[derive(Debug, Clone)]
pub struct AdsConfig {
    pub target: Target,
    pub service: Service,
    pub api: ApiType,
    pub node: Node,
    /// Envoy's defaults: 500 ms base, 30 s cap.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl AdsConfig {
    pub fn new(target: Target, api: ApiType, node: Node) -> Self {
        AdsConfig {
            target,
            service: Service::Aggregated,
            api,
            node,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// A resource as the delta protocol names it.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedResource {
    pub name: String,
    pub version: String,
    pub body: Any,
}

/// One response, as handed to the sink.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The whole set of the type's resources (state of the world).
    Sotw {
        version: String,
        resources: Vec<Any>,
    },
    /// Changes (delta).
    Delta {
        system_version: String,
        added: Vec<NamedResource>,
        removed: Vec<String>,
    },
}

/// What the rest of the proxy does with updates. `Err` is the NACK's `error_detail`.
pub trait Sink: Send + 'static {
    fn apply(&mut self, type_url: &str, update: Update) -> Result<(), String>;
}

/// What a subscription asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Interest {
    /// Every resource of the type (LDS, CDS).
    Wildcard,
    /// These names only (RDS, EDS, SDS).
    Names(BTreeSet<String>),
}

enum Command {
    Subscribe {
        type_url: String,
        interest: Interest,
    },
}

/// Handle to a running client.
#[derive(Clone)]
pub struct AdsClient {
    commands: mpsc::UnboundedSender<Command>,
}

impl AdsClient {
    /// Starts (or changes) the subscription for a type; takes effect on the live stream and on
    /// every reconnection.
    pub fn subscribe(&self, type_url: &str, interest: Interest) {
        let _ = self.commands.send(Command::Subscribe {
            type_url: type_url.to_string(),
            interest,
        });
    }
}

/// Per-type bookkeeping.
#[derive(Debug, Default, Clone)]
struct TypeState {
    interest: Option<Interest>,
    /// Last accepted version (SotW).
    version: String,
    /// Accepted resource versions (delta), for resubscription after a reconnect.
    resource_versions: HashMap<String, String>,
}

/// The `error_detail` code Envoy sends with a NACK.
const NACK_CODE: i32 = 13; // INTERNAL

/// Starts the client on the current Tokio runtime.
pub fn spawn<S: Sink>(config: AdsConfig, sink: S) -> AdsClient {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(config, sink, rx));
    AdsClient { commands: tx }
}

async fn connect(target: &Target) -> Result<Channel, tonic::transport::Error> {
    match target {
        Target::Tcp(uri) => Endpoint::from_shared(uri.clone())?.connect().await,
        Target::Unix(path) => {
            let path = path.clone();
            // The URI is required by tonic but unused: the connector dials the socket.
            Endpoint::from_static("http://[::1]:1")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                }))
                .await
        }
    }
}

/// Full jitter on an exponential backoff, as Envoy's `JitteredExponentialBackOffStrategy`.
fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(max);
    let ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(rand_below(ms))
}

fn rand_below(n: u64) -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n.max(1)
}

async fn run<S: Sink>(
    config: AdsConfig,
    mut sink: S,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut types: BTreeMap<String, TypeState> = BTreeMap::new();
    let mut attempt = 0u32;
    loop {
        // Take subscription changes made while disconnected.
        while let Ok(Command::Subscribe { type_url, interest }) = commands.try_recv() {
            types.entry(type_url).or_default().interest = Some(interest);
        }
        let connected = match connect(&config.target).await {
            Ok(channel) => {
                let client = &channel;
                let r = match config.api {
                    ApiType::Sotw => {
                        run_stream::<StateOfTheWorld, S>(
                            &config,
                            client,
                            &mut sink,
                            &mut types,
                            &mut commands,
                        )
                        .await
                    }
                    ApiType::Delta => {
                        run_stream::<Delta, S>(
                            &config,
                            client,
                            &mut sink,
                            &mut types,
                            &mut commands,
                        )
                        .await
                    }
                };
                match r {
                    StreamEnd::ClientGone => return,
                    StreamEnd::Lost { had_response } => had_response,
                }
            }
            Err(_) => false,
        };
        // A stream that delivered something starts the backoff over.
        attempt = if connected {
            0
        } else {
            attempt.saturating_add(1)
        };
        tokio::time::sleep(backoff(config.backoff_base, config.backoff_max, attempt)).await;
    }
}

enum StreamEnd {
    /// Every [`AdsClient`] handle is gone: stop.
    ClientGone,
    Lost {
        had_response: bool,
    },
}

/// What differs between the state-of-the-world and the delta protocol; the stream skeleton in
/// [`run_stream`] is shared.
trait Protocol {
    type Req: Send + 'static;
    type Resp;
    /// Opens the stream with the requests `rx` yields.
    async fn open(
        channel: &Channel,
        service: Service,
        rx: mpsc::Receiver<Self::Req>,
    ) -> Result<tonic::Streaming<Self::Resp>, tonic::Status>;
    /// The first request for a type on a new stream (resubscribing with what was accepted).
    fn subscribe(node: Option<Node>, type_url: &str, state: &TypeState) -> Self::Req;
    /// Hands a response to the sink and builds the ACK or NACK.
    fn respond<S: Sink>(
        node: Option<Node>,
        resp: Self::Resp,
        sink: &mut S,
        types: &mut BTreeMap<String, TypeState>,
    ) -> Self::Req;
    /// A subscription changed on a live stream.
    fn resubscribe(
        node: Option<Node>,
        type_url: &str,
        old: &Option<Interest>,
        state: &TypeState,
    ) -> Self::Req;
}

fn nack(message: String) -> Status {
    Status {
        code: NACK_CODE,
        message,
        details: vec![],
    }
}

struct StateOfTheWorld;

impl Protocol for StateOfTheWorld {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;

    async fn open(
        channel: &Channel,
        service: Service,
        rx: mpsc::Receiver<DiscoveryRequest>,
    ) -> Result<tonic::Streaming<DiscoveryResponse>, tonic::Status> {
        let requests = ReceiverStream::new(rx);
        Ok(match service {
            Service::Aggregated => {
                AggregatedDiscoveryServiceClient::new(channel.clone())
                    .stream_aggregated_resources(requests)
                    .await?
            }
            Service::Secrets => {
                SecretDiscoveryServiceClient::new(channel.clone())
                    .stream_secrets(requests)
                    .await?
            }
        }
        .into_inner())
    }

    fn subscribe(node: Option<Node>, type_url: &str, state: &TypeState) -> DiscoveryRequest {
        let resource_names = names_of(&state.interest);
        DiscoveryRequest {
            version_info: state.version.clone(),
            node,
            resource_names,
            type_url: type_url.to_string(),
            ..Default::default()
        }
    }

    fn respond<S: Sink>(
        node: Option<Node>,
        resp: DiscoveryResponse,
        sink: &mut S,
        types: &mut BTreeMap<String, TypeState>,
    ) -> DiscoveryRequest {
        let state = types.entry(resp.type_url.clone()).or_default();
        let error = match sink.apply(
            &resp.type_url,
            Update::Sotw {
                version: resp.version_info.clone(),
                resources: resp.resources,
            },
        ) {
            Ok(()) => {
                state.version = resp.version_info.clone();
                None
            }
            // A NACK repeats the last accepted version.
            Err(e) => Some(nack(e)),
        };
        DiscoveryRequest {
            response_nonce: resp.nonce,
            error_detail: error,
            ..Self::subscribe(node, &resp.type_url, state)
        }
    }

    fn resubscribe(
        node: Option<Node>,
        type_url: &str,
        _old: &Option<Interest>,
        state: &TypeState,
    ) -> DiscoveryRequest {
        Self::subscribe(node, type_url, state)
    }
}

struct Delta;

fn names_of(interest: &Option<Interest>) -> Vec<String> {
    match interest {
        Some(Interest::Names(n)) => n.iter().cloned().collect(),
        // Wildcard as Envoy asks for it, in both protocols: no names (delta's legacy wildcard).
        // Wildcard types (CDS, LDS) never switch to names, so "*" is never needed.
        Some(Interest::Wildcard) => Vec::new(),
        None => Vec::new(),
    }
}

impl Protocol for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;

    async fn open(
        channel: &Channel,
        service: Service,
        rx: mpsc::Receiver<DeltaDiscoveryRequest>,
    ) -> Result<tonic::Streaming<DeltaDiscoveryResponse>, tonic::Status> {
        let requests = ReceiverStream::new(rx);
        Ok(match service {
            Service::Aggregated => {
                AggregatedDiscoveryServiceClient::new(channel.clone())
                    .delta_aggregated_resources(requests)
                    .await?
            }
            Service::Secrets => {
                SecretDiscoveryServiceClient::new(channel.clone())
                    .delta_secrets(requests)
                    .await?
            }
        }
        .into_inner())
    }

    fn subscribe(node: Option<Node>, type_url: &str, state: &TypeState) -> DeltaDiscoveryRequest {
        // Resubscribe with what was already accepted, so the server sends only changes.
        DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_string(),
            resource_names_subscribe: names_of(&state.interest),
            initial_resource_versions: state.resource_versions.clone(),
            ..Default::default()
        }
    }

    fn respond<S: Sink>(
        node: Option<Node>,
        resp: DeltaDiscoveryResponse,
        sink: &mut S,
        types: &mut BTreeMap<String, TypeState>,
    ) -> DeltaDiscoveryRequest {
        let added: Vec<NamedResource> = resp
            .resources
            .iter()
            .filter_map(|r| {
                r.resource.clone().map(|body| NamedResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    body,
                })
            })
            .collect();
        let update = Update::Delta {
            system_version: resp.system_version_info.clone(),
            added: added.clone(),
            removed: resp.removed_resources.clone(),
        };
        let state = types.entry(resp.type_url.clone()).or_default();
        let error = match sink.apply(&resp.type_url, update) {
            Ok(()) => {
                for r in &added {
                    state
                        .resource_versions
                        .insert(r.name.clone(), r.version.clone());
                }
                for r in &resp.removed_resources {
                    state.resource_versions.remove(r);
                }
                None
            }
            Err(e) => Some(nack(e)),
        };
        DeltaDiscoveryRequest {
            node,
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            error_detail: error,
            ..Default::default()
        }
    }

    fn resubscribe(
        node: Option<Node>,
        type_url: &str,
        old: &Option<Interest>,
        state: &TypeState,
    ) -> DeltaDiscoveryRequest {
        let old: BTreeSet<String> = names_of(old).into_iter().collect();
        let new: BTreeSet<String> = names_of(&state.interest).into_iter().collect();
        DeltaDiscoveryRequest {
            node,
            type_url: type_url.to_string(),
            resource_names_subscribe: new.difference(&old).cloned().collect(),
            resource_names_unsubscribe: old.difference(&new).cloned().collect(),
            ..Default::default()
        }
    }
}

/// One stream's life: subscribe, then answer every response and apply subscription changes,
/// until the stream breaks or every client handle is gone.
async fn run_stream<P: Protocol, S: Sink>(
    config: &AdsConfig,
    channel: &Channel,
    sink: &mut S,
    types: &mut BTreeMap<String, TypeState>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> StreamEnd {
    let (tx, rx) = mpsc::channel::<P::Req>(64);
    // The node goes in the first request of a stream only, as Envoy sends it.
    let mut first = true;
    let mut node = || std::mem::take(&mut first).then(|| config.node.clone());
    for (type_url, state) in types.iter() {
        if state.interest.is_some() {
            let _ = tx.try_send(P::subscribe(node(), type_url, state));
        }
    }
    let mut inbound = match P::open(channel, config.service, rx).await {
        Ok(s) => s,
        Err(_) => {
            return StreamEnd::Lost {
                had_response: false,
            }
        }
    };
    let mut had_response = false;
    loop {
        let req = tokio::select! {
            msg = inbound.message() => {
                let Ok(Some(resp)) = msg else { return StreamEnd::Lost { had_response } };
                had_response = true;
                P::respond(node(), resp, sink, types)
            }
            cmd = commands.recv() => {
                let Some(Command::Subscribe { type_url, interest }) = cmd else { return StreamEnd::ClientGone };
                let state = types.entry(type_url.clone()).or_default();
                let old = state.interest.replace(interest);
                P::resubscribe(node(), &type_url, &old, state)
            }
        };
        if tx.send(req).await.is_err() {
            return StreamEnd::Lost { had_response };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let (base, max) = (Duration::from_millis(500), Duration::from_secs(30));
        for attempt in 0..40 {
            let d = backoff(base, max, attempt);
            assert!(d <= max);
            assert!(d <= base.saturating_mul(1 << attempt.min(16)));
        }
    }
}
