//! The downstream HTTP/1.1 connection loop: read a head, hand the request to the connection
//! manager, write its response, and keep the connection alive (or not) as Envoy does.
//!
//! Requests on one connection are served in order (pipelined bytes wait in the buffer).

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use super::body::{ContinueSignal, Decoder, H1Body, ReadSide};
use super::head::{self, HeadError, Limits};
use super::{H1Upgrade, Upgraded};
use crate::http::body::RequestBody;
use crate::http::conn_manager::{self, ConnInfo};
use crate::http::conn_manager_config::HcmConfig;
use crate::http::stream_log::StreamBody;
use crate::listener::drain::ConnDrain;
use crate::listener::stream::{Downstream, DownstreamWrite};
use crate::worker::WorkerCtx;

/// Serves an HTTP/1.1 connection whose first bytes (already read) are in `initial`.
pub async fn serve(
    stream: Downstream,
    initial: BytesMut,
    info: Rc<ConnInfo>,
    hcm: Arc<HcmConfig>,
    ctx: Rc<WorkerCtx>,
    drain: &ConnDrain,
) {
    let (rd, mut wr) = stream.into_split();
    let side = Rc::new(RefCell::new(ReadSide {
        io: rd,
        buf: initial,
        decoder: Decoder::Done,
        eof: false,
    }));
    let limits = Limits {
        max_head_bytes: hcm.max_request_headers_kb as usize * 1024,
        max_headers: hcm.max_headers_count as usize,
    };
    loop {
        let head = match read_head(&side, limits, &hcm).await {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                hcm.stats.downstream_cx_protocol_error.inc();
                let resp = conn_manager::codec_error_response(&hcm, &info, &e);
                let _ = write_response(&mut wr, resp, false, false).await;
                let _ = wr.shutdown().await;
                return;
            }
        };
        let keep_alive = head.keep_alive;
        let is_head = head.method == http::Method::HEAD;
        side.borrow_mut().decoder = Decoder::new(head.framing);
        let signal = head
            .expect_continue
            .then(|| Rc::new(ContinueSignal::default()));
        let body = H1Body::new(side.clone(), head.framing, signal.clone());
        let mut req = Request::new(RequestBody::H1(body));
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        if head.fragment {
            req.extensions_mut().insert(super::FragmentInPath);
        }
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;
        let (upgrade_tx, upgrade_rx) = tokio::sync::oneshot::channel();
        req.extensions_mut()
            .insert(H1Upgrade(std::sync::Arc::new(std::sync::Mutex::new(Some(
                upgrade_rx,
            )))));

        let resp = {
            let mut fut = pin!(conn_manager::handle(req, &hcm, &ctx, &info));
            let mut continue_sent = false;
            loop {
                let wait_continue = async {
                    match &signal {
                        Some(s) if !continue_sent => s.notify.notified().await,
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = &mut fut => break r,
                    _ = wait_continue => {
                        continue_sent = true;
                        if signal.as_ref().is_some_and(|s| s.wanted.get()) && wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let upgrading = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        // A draining listener's connections close after their response (`drainClose()`).
        let keep = keep_alive && !wants_close(resp.headers()) && !drain.should_close();
        match write_response(&mut wr, resp, is_head, keep).await {
            Err(_) => return,
            Ok(()) if upgrading => {
                hand_off(side, wr, upgrade_tx);
                return;
            }
            Ok(()) => {}
        }
        // An unread request body (the answer came first) cannot be skipped safely: close, as
        // Envoy does for HTTP/1.1.
        let body_done = side
            .try_borrow()
            .map(|s| s.decoder.is_done())
            .unwrap_or(false);
        if !(keep && body_done) {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

/// Gives the raw connection (and any bytes read past the upgrade request) to the tunnel.
fn hand_off(
    side: Rc<RefCell<ReadSide>>,
    wr: DownstreamWrite,
    tx: tokio::sync::oneshot::Sender<Upgraded>,
) {
    let Ok(side) = Rc::try_unwrap(side) else {
        return;
    };
    let side = side.into_inner();
    if let Some(stream) = Downstream::reunite(side.io, wr) {
        let _ = tx.send(Upgraded {
            stream,
            leftover: side.buf.freeze(),
        });
    }
}

fn wants_close(h: &http::HeaderMap) -> bool {
    h.get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// Reads until a whole head is buffered. `Ok(None)`: the peer closed (or idled out) between
/// requests.
async fn read_head(
    side: &Rc<RefCell<ReadSide>>,
    limits: Limits,
    hcm: &HcmConfig,
) -> Result<Option<head::Head>, HeadError> {
    loop {
        let parsed = head::parse(&side.borrow().buf, limits)?;
        if let Some(h) = parsed {
            side.borrow_mut().buf.advance(h.len);
            return Ok(Some(h));
        }
        let (empty, eof) = {
            let s = side.borrow();
            (s.buf.is_empty(), s.eof)
        };
        if eof {
            return if empty {
                Ok(None)
            } else {
                Err(HeadError::Malformed)
            };
        }
        // Between requests the connection idle timeout applies; inside a head, the headers one.
        let limit = if empty {
            hcm.idle_timeout
        } else {
            hcm.request_headers_timeout
        };
        let fill = std::future::poll_fn(|cx| side.borrow_mut().poll_fill(cx));
        let read = match limit {
            Some(t) => match tokio::time::timeout(t, fill).await {
                Ok(r) => r,
                Err(_) => {
                    if empty {
                        hcm.stats.downstream_cx_idle_timeout.inc();
                    }
                    return Ok(None);
                }
            },
            None => fill.await,
        };
        if read.is_err() {
            return Ok(None);
        }
    }
}

/// The `date` header value, rendered at most once a second per thread.
fn date_value() -> http::HeaderValue {
    thread_local! {
        static CACHE: RefCell<(u64, http::HeaderValue)> = const { RefCell::new((0, http::HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let v = http::HeaderValue::from_str(&httpdate::fmt_http_date(now))
                .unwrap_or_else(|_| http::HeaderValue::from_static(""));
            *c = (secs, v);
        }
        c.1.clone()
    })
}

/// Polls a future once without waiting (to coalesce a ready first body frame with the head).
fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Writes a response: head, then the body with content-length or chunked framing.
async fn write_response(
    wr: &mut DownstreamWrite,
    resp: Response<StreamBody>,
    head_only: bool,
    keep_alive: bool,
) -> std::io::Result<()> {
    let (mut parts, mut body) = resp.into_parts();
    let status = parts.status;
    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut chunked = false;
    if status != StatusCode::SWITCHING_PROTOCOLS
        && !parts.headers.contains_key(http::header::CONTENT_LENGTH)
        && !parts.headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        match body.size_hint().exact() {
            Some(n)
                if !(status.is_informational()
                    || status == StatusCode::NO_CONTENT
                    || status == StatusCode::NOT_MODIFIED) =>
            {
                parts
                    .headers
                    .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
            }
            Some(_) => {}
            None if !bodiless => {
                parts.headers.insert(
                    http::header::TRANSFER_ENCODING,
                    http::HeaderValue::from_static("chunked"),
                );
                chunked = true;
            }
            None => {}
        }
    }
    if !parts.headers.contains_key(http::header::DATE) {
        parts.headers.insert(http::header::DATE, date_value());
    }
    if !keep_alive && status != StatusCode::SWITCHING_PROTOCOLS && !wants_close(&parts.headers) {
        parts.headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    let mut out = BytesMut::with_capacity(512);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.put_slice(b"\r\n");
    for (k, v) in &parts.headers {
        out.put_slice(k.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(v.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    if bodiless || status == StatusCode::SWITCHING_PROTOCOLS {
        return wr.write_all(&out).await;
    }
    // Send the head together with the first frame when that frame is already there.
    let mut pending: Option<Bytes> = None;
    if let Some(first) = now_or_never(body.frame()) {
        match first {
            None => {
                if chunked {
                    out.put_slice(b"0\r\n\r\n");
                }
                return wr.write_all(&out).await;
            }
            Some(Ok(f)) => pending = f.into_data().ok(),
            Some(Err(_)) => return Err(std::io::Error::other("response body failed")),
        }
    }
    loop {
        if let Some(data) = pending.take() {
            if !data.is_empty() {
                if chunked {
                    out.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.put_slice(&data);
                    out.put_slice(b"\r\n");
                } else {
                    out.put_slice(&data);
                }
            }
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            out.clear();
        }
        match body.frame().await {
            None => break,
            Some(Ok(f)) => pending = f.into_data().ok(),
            Some(Err(_)) => return Err(std::io::Error::other("response body failed")),
        }
    }
    if chunked {
        wr.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}
