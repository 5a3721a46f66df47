//! A scriptable ADS server for tests: each stream the proxy opens becomes a [`Session`] the test
//! reads requests from and writes responses to (SotW and delta, TCP and Unix socket).

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use xds_client::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use xds_client::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

/// One stream opened by the client.
pub struct Session<Req, Resp> {
    pub requests: mpsc::UnboundedReceiver<Req>,
    pub responses: mpsc::Sender<Result<Resp, Status>>,
}

pub type SotwSession = Session<DiscoveryRequest, DiscoveryResponse>;
pub type DeltaSession = Session<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

/// Sessions as they open.
pub struct Sessions {
    pub sotw: mpsc::UnboundedReceiver<SotwSession>,
    pub delta: mpsc::UnboundedReceiver<DeltaSession>,
}

struct Service {
    sotw: mpsc::UnboundedSender<SotwSession>,
    delta: mpsc::UnboundedSender<DeltaSession>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn open<Req: Send + 'static, Resp: Send + 'static>(
    mut inbound: Streaming<Req>,
    sessions: &mpsc::UnboundedSender<Session<Req, Resp>>,
) -> BoxStream<Resp> {
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (resp_tx, resp_rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(Ok(r)) = inbound.next().await {
            if req_tx.send(r).is_err() {
                break;
            }
        }
    });
    let _ = sessions.send(Session {
        requests: req_rx,
        responses: resp_tx,
    });
    Box::pin(ReceiverStream::new(resp_rx))
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(open(request.into_inner(), &self.sotw)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(open(request.into_inner(), &self.delta)))
    }
}

fn service() -> (AggregatedDiscoveryServiceServer<Service>, Sessions) {
    let (sotw_tx, sotw_rx) = mpsc::unbounded_channel();
    let (delta_tx, delta_rx) = mpsc::unbounded_channel();
    (
        AggregatedDiscoveryServiceServer::new(Service {
            sotw: sotw_tx,
            delta: delta_tx,
        }),
        Sessions {
            sotw: sotw_rx,
            delta: delta_rx,
        },
    )
}

/// Serves on a loopback TCP port; returns the `http://` address.
pub async fn serve_tcp() -> (String, Sessions) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (svc, sessions) = service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), sessions)
}

/// Serves on a Unix socket at `path`.
pub async fn serve_unix(path: &std::path::Path) -> Sessions {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).expect("bind unix socket");
    let (svc, sessions) = service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    sessions
}

#[tonic::async_trait]
impl xds_client::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService
    for Service
{
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Ok(Response::new(open(request.into_inner(), &self.delta)))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Ok(Response::new(open(request.into_inner(), &self.sotw)))
    }

    async fn fetch_secrets(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("fetch_secrets"))
    }
}

/// A `SecretDiscoveryService` (as Istio's pilot-agent serves it) on a Unix socket at `path`.
pub async fn serve_sds_unix(path: &std::path::Path) -> Sessions {
    use xds_client::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).expect("bind unix socket");
    let (sotw_tx, sotw_rx) = mpsc::unbounded_channel();
    let (delta_tx, delta_rx) = mpsc::unbounded_channel();
    let svc = SecretDiscoveryServiceServer::new(Service {
        sotw: sotw_tx,
        delta: delta_tx,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    Sessions {
        sotw: sotw_rx,
        delta: delta_rx,
    }
}
