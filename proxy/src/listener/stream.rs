//! A downstream connection as the network filters see it: plain TCP, or TLS that Petrel
//! terminated (the transport socket of the filter chain). Enums rather than boxed traits keep
//! the plaintext path free of dynamic dispatch.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A stream that first yields bytes already read from it (what the listener filters sniffed).
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(inner: S, prefix: Bytes) -> Self {
        Prefixed { prefix, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use petrel_filters::filter_state::FilterState;

pub type TlsStream = tokio_rustls::server::TlsStream<Prefixed<TcpStream>>;

/// A connection a filter chain took, before its transport socket is up. The terminal filter
/// counts it first and then establishes it, as Envoy creates a chain's filters on accept and
/// the TLS handshake runs after.
pub struct Accepted {
    pub tcp: TcpStream,
    /// Bytes the listener filters already read.
    pub initial: bytes::BytesMut,
    /// The chain's TLS and its `transport_socket_connect_timeout`.
    pub tls: Option<(
        std::sync::Arc<crate::tls::server::ServerTls>,
        Option<std::time::Duration>,
    )>,
    /// The chain's network filters ahead of the terminal one.
    pub filters: std::sync::Arc<[crate::network::NetworkFilter]>,
    /// `(remote, local, SNI)` for them.
    pub facts: (
        std::net::SocketAddr,
        std::net::SocketAddr,
        Option<std::sync::Arc<str>>,
    ),
}

impl Accepted {
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The connection with its transport socket up and its network filters run: `Up`,
    /// `Denied` by an RBAC filter (what the filters wrote is still there for the access log),
    /// or None when the handshake failed (counted in the listener's `ssl.*`) or timed out.
    pub async fn establish(self) -> Option<Outcome> {
        let (filters, facts) = (self.filters, self.facts);
        let mut conn = crate::network::Connection {
            remote: facts.0,
            local: facts.1,
            requested_server_name: facts.2.as_deref().unwrap_or(""),
            start_time: std::time::SystemTime::now(),
            tls: None,
        };
        let mut filter_state = FilterState::default();
        crate::network::on_new_connection(&filters, &conn, &mut filter_state);
        let (stream, initial, tls) = match self.tls {
            None => (Downstream::Tcp(self.tcp), self.initial, None),
            Some((tls, timeout)) => {
                let handshake = tls.accept(self.tcp, self.initial.freeze());
                let (s, info) = match timeout {
                    Some(t) => tokio::time::timeout(t, handshake).await.ok()?.ok()?,
                    None => handshake.await.ok()?,
                };
                (
                    Downstream::Tls(Box::new(s)),
                    bytes::BytesMut::new(),
                    Some(info),
                )
            }
        };
        conn.tls = tls.as_deref();
        crate::network::on_connected(&filters, &conn, &mut filter_state);
        let mut dynamic_metadata = petrel_filters::http_filter::DynamicMetadata::new();
        let mut rbac = crate::network::rbac(&filters).peekable();
        let mut allowed = true;
        if rbac.peek().is_some() {
            let peer = tls.as_ref().and_then(|t| t.peer.as_ref());
            let input = crate::rbac::Input {
                headers: None,
                method: "",
                path: "",
                authority: "",
                scheme: "",
                direct_remote: conn.remote,
                remote: conn.remote,
                local: conn.local,
                requested_server_name: conn.requested_server_name,
                peer: peer.map(|p| crate::rbac::Peer {
                    uri_sans: &p.uri_sans,
                    dns_sans: &p.dns_sans,
                    subject: &p.subject,
                }),
                filter_state: &filter_state,
            };
            allowed = rbac.all(|r| crate::rbac::network::allows(r, &input, &mut dynamic_metadata));
        }
        let up = Established {
            stream,
            initial,
            tls,
            dynamic_metadata,
            filter_state: std::sync::Arc::new(filter_state),
        };
        Some(if allowed {
            Outcome::Up(up)
        } else {
            Outcome::Denied(up)
        })
    }
}

/// How establishing a connection ended.
pub enum Outcome {
    Up(Established),
    /// A network RBAC filter denied it: it is closed.
    Denied(Established),
}

/// A connection whose transport socket is up.
pub struct Established {
    pub stream: Downstream,
    /// Bytes already read (plaintext only: TLS consumed them).
    pub initial: bytes::BytesMut,
    pub tls: Option<std::sync::Arc<crate::tls::info::TlsInfo>>,
    /// What the network filters wrote (the network RBAC decisions).
    pub dynamic_metadata: petrel_filters::http_filter::DynamicMetadata,
    /// What the network filters set (`set_filter_state`, `istio_authn`).
    pub filter_state: std::sync::Arc<FilterState>,
}

/// A downstream connection.
pub enum Downstream {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

pub enum DownstreamRead {
    Tcp(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<Box<TlsStream>>),
}

pub enum DownstreamWrite {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<Box<TlsStream>>),
}

impl Downstream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Downstream::Tcp(s) => s,
            Downstream::Tls(s) => s.get_ref().0.get_ref(),
        }
    }

    pub fn into_split(self) -> (DownstreamRead, DownstreamWrite) {
        match self {
            Downstream::Tcp(s) => {
                let (r, w) = s.into_split();
                (DownstreamRead::Tcp(r), DownstreamWrite::Tcp(w))
            }
            Downstream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (DownstreamRead::Tls(r), DownstreamWrite::Tls(w))
            }
        }
    }

    /// Puts the halves of one connection back together.
    pub fn reunite(r: DownstreamRead, w: DownstreamWrite) -> Option<Downstream> {
        match (r, w) {
            (DownstreamRead::Tcp(r), DownstreamWrite::Tcp(w)) => {
                r.reunite(w).ok().map(Downstream::Tcp)
            }
            (DownstreamRead::Tls(r), DownstreamWrite::Tls(w)) => {
                r.is_pair_of(&w).then(|| Downstream::Tls(r.unsplit(w)))
            }
            _ => None,
        }
    }
}

macro_rules! delegate_read {
    ($ty:ty, $($variant:ident),+) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s, ..) => std::pin::Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}

macro_rules! delegate_write {
    ($ty:ty, $($variant:ident),+) => {
        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s, ..) => std::pin::Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s, ..) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $(Self::$variant(s, ..) => s.is_write_vectored(),)+
                }
            }
            fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s, ..) => std::pin::Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s, ..) => std::pin::Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

pub(crate) use delegate_read;
pub(crate) use delegate_write;

delegate_read!(Downstream, Tcp, Tls);
delegate_write!(Downstream, Tcp, Tls);
delegate_read!(DownstreamRead, Tcp, Tls);
delegate_write!(DownstreamWrite, Tcp, Tls);
