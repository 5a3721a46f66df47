//! A downstream request body from either codec.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1::body::H1Body;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum RequestBody {
    /// HTTP/2 (hyper's codec).
    H2(Incoming),
    /// HTTP/1.1 (Petrel's codec).
    H1(H1Body),
    /// Either, with the bytes read counted for the access log.
    Counted(Box<RequestBody>, Arc<AtomicU64>),
    /// A whole body Petrel made itself (a tracer's report); taken when sent.
    Full(Option<Bytes>),
    /// Either, with its gRPC messages counted (`grpc_stats`).
    GrpcCounted(Box<RequestBody>, super::grpc_stats::FrameInspector),
}

impl RequestBody {
    /// Counts the body's bytes into `received` as they are read.
    pub fn counted(self, received: Arc<AtomicU64>) -> RequestBody {
        RequestBody::Counted(Box::new(self), received)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            RequestBody::H1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            RequestBody::Counted(b, n) => {
                let r = Pin::new(b.as_mut()).poll_frame(cx);
                if let Poll::Ready(Some(Ok(f))) = &r {
                    if let Some(d) = f.data_ref() {
                        n.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                r
            }
            RequestBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            RequestBody::GrpcCounted(b, i) => {
                let r = Pin::new(b.as_mut()).poll_frame(cx);
                if let Poll::Ready(Some(Ok(f))) = &r {
                    if let Some(d) = f.data_ref() {
                        i.inspect(d);
                    }
                }
                r
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::H2(b) => b.is_end_stream(),
            RequestBody::H1(b) => b.is_end_stream(),
            RequestBody::Counted(b, _) | RequestBody::GrpcCounted(b, _) => b.is_end_stream(),
            RequestBody::Full(b) => b.is_none(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::H2(b) => b.size_hint(),
            RequestBody::H1(b) => b.size_hint(),
            RequestBody::Counted(b, _) | RequestBody::GrpcCounted(b, _) => b.size_hint(),
            RequestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
