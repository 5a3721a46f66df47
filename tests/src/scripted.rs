//! A scripted HTTP upstream for retry, timeout and circuit-breaker tests: each request names a
//! script (`x-script: 503,reset,200`) and an id (`x-id`); the n-th request with that id plays
//! the n-th step (the last one repeats). It counts the attempts per id and answers with JSON of
//! what that attempt received.
//!
//! Steps: a status code (`503`), `reset` (close the connection without answering), `hang`
//! (answer after 5 s), `grpc14` (a gRPC trailers-only `UNAVAILABLE`), `hdr` (200 with
//! `x-retry-me: yes`), `delay<ms>` (200 after that many milliseconds), `<status>+<name>=<value>`
//! (that status with that response header), `drip<ms>` (200 with the headers at once and the
//! body that many milliseconds later).

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What each attempt carried, per id: `host`, the `x-envoy-*` headers listed below and the body.
pub type Seen = Arc<Mutex<HashMap<String, Vec<String>>>>;

#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted reset")
    }
}

impl std::error::Error for Reset {}

/// Starts the upstream; `name` is put in every answer (`x-upstream-name`).
pub fn start_scripted(name: &'static str) -> (u16, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind scripted");
    let port = l.local_addr().expect("addr").port();
    let seen: Seen = Arc::default();
    let state = seen.clone();
    crate::spawn_server(l, move |s| {
        let state = state.clone();
        async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move { answer(name, &state, req).await }
                });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
        }
    });
    (port, seen)
}

/// An answer's body: all at once, or after a wait (`drip`).
pub struct Answer {
    body: Option<bytes::Bytes>,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for Answer {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::future::Future;
        if let Some(w) = self.wait.as_mut() {
            if w.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            self.wait = None;
        }
        std::task::Poll::Ready(self.body.take().map(|b| Ok(http_body::Frame::data(b))))
    }
}

async fn answer(
    name: &'static str,
    state: &Seen,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Answer>, Reset> {
    use http_body_util::BodyExt;
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    // `x-script-<name>` scripts one upstream of several.
    let own = h(&format!("x-script-{name}"));
    let (id, script) = (h("x-id"), if own.is_empty() { h("x-script") } else { own });
    let seen_headers: Vec<String> = [
        "x-envoy-attempt-count",
        "x-envoy-expected-rq-timeout-ms",
        "grpc-timeout",
        "x-envoy-retry-on",
        "x-envoy-max-retries",
        "x-envoy-upstream-rq-timeout-ms",
    ]
    .iter()
    .filter(|n| req.headers().contains_key(**n))
    .map(|n| format!("{n}={}", h(n)))
    .collect();
    let host = h("host");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let n = {
        let mut s = state.lock().expect("state");
        let c = s.entry(id.clone()).or_default();
        c.push(format!(
            "host={host} {} body={:?}",
            seen_headers.join(" "),
            String::from_utf8_lossy(&body)
        ));
        c.len() as u32
    };
    let steps: Vec<&str> = script.split(',').map(str::trim).collect();
    let step = steps
        .get(n as usize - 1)
        .or(steps.last())
        .copied()
        .unwrap_or("200")
        .to_string();
    let json = serde_json::json!({
        "upstream": name,
        "attempt": n,
        "headers": seen_headers,
        "body": String::from_utf8_lossy(&body),
    })
    .to_string();
    let mut status = 200u16;
    let mut resp = http::Response::new(Answer {
        body: Some(bytes::Bytes::from(json)),
        wait: None,
    });
    match step.as_str() {
        "reset" => return Err(Reset),
        "hang" => tokio::time::sleep(Duration::from_secs(5)).await,
        "grpc14" => {
            resp.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
            resp.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("14"));
        }
        "hdr" => {
            resp.headers_mut()
                .insert("x-retry-me", http::HeaderValue::from_static("yes"));
        }
        s if s.starts_with("drip") => {
            let ms = s[4..].parse().unwrap_or(0);
            resp.body_mut().wait = Some(Box::pin(tokio::time::sleep(Duration::from_millis(ms))));
        }
        s if s.starts_with("delay") => {
            let ms = s[5..].parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        s => {
            let (code, header) = s.split_once('+').unwrap_or((s, ""));
            status = code.parse().unwrap_or(200);
            if let Some((k, v)) = header.split_once('=') {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) {
                    resp.headers_mut().insert(k, v);
                }
            }
        }
    }
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    resp.headers_mut()
        .insert("x-upstream-name", http::HeaderValue::from_static(name));
    Ok(resp)
}
