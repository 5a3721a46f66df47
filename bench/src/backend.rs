//! The benchmarks' backend: HTTP/1.1 and h2c on one port, answering by path.
//!
//! `/size/N` answers N bytes, `/delay/MS` answers after MS milliseconds, `/status/CODE` answers
//! that status; gRPC calls (`content-type: application/grpc`) get one message as long as the
//! request's and `grpc-status: 0` in trailers. Anything else answers `ok`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Serves on `listener` until the runtime ends.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(answer))
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>) -> Result<Response<Answer>, Infallible> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = req.uri().path().to_string();
    // Read the request to its end, as a real server does, before answering.
    let received = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes().len())
        .unwrap_or(0);
    if grpc {
        let message = received.saturating_sub(5);
        let mut framed = vec![0u8; 5 + message];
        framed[1..5].copy_from_slice(&(message as u32).to_be_bytes());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let mut response = Response::new(Answer::new(Bytes::from(framed), Some(trailers)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        return Ok(response);
    }
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let (verb, arg) = (segments.next().unwrap_or(""), segments.next());
    let number = arg.and_then(|a| a.parse::<u64>().ok());
    let mut status = StatusCode::OK;
    let body = match (verb, number) {
        ("size", Some(n)) => Bytes::from(vec![b'x'; n as usize]),
        ("delay", Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Bytes::from_static(b"ok")
        }
        ("status", Some(code)) => {
            status = u16::try_from(code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            Bytes::new()
        }
        _ => Bytes::from_static(b"ok"),
    };
    let mut response = Response::new(Answer::new(body, None));
    *response.status_mut() = status;
    Ok(response)
}

/// A body of one data frame and optional trailers.
pub struct Answer {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Answer {
    fn new(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Answer {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let n = self.data.as_ref().map_or(0, |d| d.len() as u64);
        match self.trailers {
            // With trailers to come the length is not the whole story (HTTP/1.1 chunks).
            Some(_) => http_body::SizeHint::default(),
            None => http_body::SizeHint::with_exact(n),
        }
    }
}
