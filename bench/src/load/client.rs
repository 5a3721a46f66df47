//! One connection of a run: connect, send on schedule, read each answer to its end.

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::args::{LoadArgs, Protocol};

/// A request sender on one socket, HTTP/1.1 or HTTP/2.
pub enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Tcp {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: std::net::SocketAddr,
        source: hyper::Error,
    },
}

impl Sender {
    pub async fn connect(args: &LoadArgs) -> Result<Sender, ConnectError> {
        let addr = args.url.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ConnectError::Tcp { addr, source })?;
        // As fortio and oha: small requests go out at once.
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(tcp);
        let handshake = |source| ConnectError::Handshake { addr, source };
        Ok(match args.protocol {
            Protocol::Http1 => {
                let (sender, conn) = http1::handshake(io).await.map_err(handshake)?;
                tokio::spawn(conn);
                Sender::Http1(sender)
            }
            Protocol::Http2 | Protocol::Grpc => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(handshake)?;
                tokio::spawn(conn);
                Sender::Http2(sender)
            }
        })
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::Http1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::Http2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    /// Sends one request and reads the whole answer; the outcome is the HTTP status, the
    /// gRPC status for `-grpc`, or `-1` (fortio's code for a socket error).
    pub async fn call(&mut self, args: &LoadArgs, body: &Bytes) -> String {
        match self.send(request(args, body)).await {
            Ok(response) => outcome(args.protocol, response).await,
            Err(_) => "-1".to_string(),
        }
    }
}

/// The request of a run: GET, or POST with the payload (framed for gRPC).
fn request(args: &LoadArgs, body: &Bytes) -> Request<Full<Bytes>> {
    let host = args
        .headers
        .iter()
        .find(|(n, _)| n == header::HOST)
        .and_then(|(_, v)| v.to_str().ok())
        .unwrap_or(&args.url.authority);
    let mut builder =
        Request::builder().method(if body.is_empty() && args.protocol != Protocol::Grpc {
            http::Method::GET
        } else {
            http::Method::POST
        });
    builder = match args.protocol {
        // HTTP/1.1 takes the origin form and a Host header; HTTP/2 needs :authority.
        Protocol::Http1 => builder
            .uri(args.url.path_and_query.as_str())
            .header(header::HOST, host),
        Protocol::Http2 | Protocol::Grpc => {
            builder.uri(format!("http://{host}{}", args.url.path_and_query))
        }
    };
    if args.protocol == Protocol::Grpc {
        builder = builder
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers");
    }
    for (name, value) in &args.headers {
        if name != header::HOST {
            builder = builder.header(name, value);
        }
    }
    builder
        .body(Full::new(body.clone()))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

/// The body a run sends: `payload_size` zero bytes, in a gRPC frame for `-grpc`.
pub fn payload(args: &LoadArgs) -> Bytes {
    let data = vec![0u8; args.payload_size];
    if args.protocol != Protocol::Grpc {
        return Bytes::from(data);
    }
    let mut framed = Vec::with_capacity(5 + data.len());
    framed.push(0);
    framed.extend_from_slice(&(data.len() as u32).to_be_bytes());
    framed.extend_from_slice(&data);
    Bytes::from(framed)
}

async fn outcome(protocol: Protocol, response: Response<Incoming>) -> String {
    let (parts, body) = response.into_parts();
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(_) => return "-1".to_string(),
    };
    if protocol != Protocol::Grpc {
        return parts.status.as_u16().to_string();
    }
    // Trailers-only answers carry the status in the headers.
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none");
    format!("grpc-status {status}")
}
