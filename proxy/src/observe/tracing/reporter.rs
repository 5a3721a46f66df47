//! Zipkin reporting as Envoy's reporter does it, per worker: finished spans wait in the worker's
//! buffer until there are `tracing.zipkin.min_flush_spans` (5) of them or the 5 s flush timer
//! fires, then go to the collector cluster in one POST (5 s timeout). A 202 counts as sent,
//! other answers as dropped, failures as failed; requests never wait for any of it.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::Either;

use super::zipkin::ZipkinDriver;
use crate::http::body::RequestBody;
use crate::http::stream_timeouts::{DownstreamBody, StreamActivity};
use crate::upstream::async_client::{self, Outgoing};
use crate::worker::WorkerCtx;

const MIN_FLUSH_SPANS: usize = 5;
const FLUSH_INTERVAL: Duration = Duration::from_millis(5000);
const REQUEST_TIMEOUT: Duration = Duration::from_millis(5000);

/// One driver's spans waiting on this worker.
struct Pending {
    driver: Weak<ZipkinDriver>,
    spans: Vec<String>,
}

thread_local! {
    /// Per worker thread, so reporting takes no lock.
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// Queues a finished span's JSON; flushes when the buffer is full. The worker's flush timer
/// for this driver starts with its first span.
pub fn report(ctx: &Rc<WorkerCtx>, driver: &Arc<ZipkinDriver>, span: String) {
    let full = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|b| b.driver.strong_count() > 0);
        let i = match p
            .iter()
            .position(|b| std::ptr::eq(b.driver.as_ptr(), Arc::as_ptr(driver)))
        {
            Some(i) => i,
            None => {
                p.push(Pending {
                    driver: Arc::downgrade(driver),
                    spans: Vec::with_capacity(MIN_FLUSH_SPANS),
                });
                tokio::task::spawn_local(flush_timer(Rc::downgrade(ctx), Arc::downgrade(driver)));
                p.len() - 1
            }
        };
        p[i].spans.push(span);
        (p[i].spans.len() >= MIN_FLUSH_SPANS).then(|| std::mem::take(&mut p[i].spans))
    });
    if let Some(spans) = full {
        send(ctx, driver, spans);
    }
}

/// Every 5 s while the driver and the worker live.
async fn flush_timer(ctx: std::rc::Weak<WorkerCtx>, driver: Weak<ZipkinDriver>) {
    loop {
        tokio::time::sleep(FLUSH_INTERVAL).await;
        let (Some(ctx), Some(driver)) = (ctx.upgrade(), driver.upgrade()) else {
            return;
        };
        driver.stats.timer_flushed.inc();
        let spans = PENDING.with(|p| {
            p.borrow_mut()
                .iter_mut()
                .find(|b| std::ptr::eq(b.driver.as_ptr(), Arc::as_ptr(&driver)))
                .map(|b| std::mem::take(&mut b.spans))
                .unwrap_or_default()
        });
        if !spans.is_empty() {
            send(&ctx, &driver, spans);
        }
    }
}

/// The spans as one JSON array.
fn body(spans: &[String]) -> Bytes {
    let mut out = String::with_capacity(spans.iter().map(|s| s.len() + 1).sum::<usize>() + 2);
    out.push('[');
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(s);
    }
    out.push(']');
    Bytes::from(out)
}

fn send(ctx: &Rc<WorkerCtx>, driver: &Arc<ZipkinDriver>, spans: Vec<String>) {
    driver.stats.spans_sent.add(spans.len() as u64);
    let snapshot = ctx.snapshot();
    if !snapshot.clusters.contains_key(&driver.collector_cluster) {
        driver.stats.reports_skipped_no_cluster.inc();
        return;
    }
    let ctx = ctx.clone();
    let driver = driver.clone();
    let body = body(&spans);
    tokio::task::spawn_local(async move {
        let Some(cluster) = snapshot.clusters.get(&driver.collector_cluster) else {
            return;
        };
        // What Envoy's async client and router put on the report.
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            HeaderName::from_static("x-envoy-internal"),
            HeaderValue::from_static("true"),
        );
        if let Ok(v) = HeaderValue::from_str(&driver.local_ip.to_string()) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        headers.insert(
            HeaderName::from_static("x-envoy-expected-rq-timeout-ms"),
            HeaderValue::from(REQUEST_TIMEOUT.as_millis() as u64),
        );
        let out = Outgoing {
            method: Method::POST,
            path: driver.collector_endpoint.clone(),
            authority: HeaderValue::from_str(&driver.collector_hostname).ok(),
            headers,
            body: Either::Left(DownstreamBody::new(
                RequestBody::Full(Some(body)),
                StreamActivity::new(true),
            )),
        };
        let exchange = async {
            let resp = async_client::send(&ctx, cluster, out, false).await.ok()?;
            let status = resp.status();
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .ok()?;
            Some(status)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Some(s)) if s == http::StatusCode::ACCEPTED => driver.stats.reports_sent.inc(),
            Ok(Some(_)) => driver.stats.reports_dropped.inc(),
            _ => driver.stats.reports_failed.inc(),
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn spans_join_into_one_array() {
        assert_eq!(super::body(&[]), "[]");
        assert_eq!(
            super::body(&["{}".into(), "{\"a\":1}".into()]),
            "[{},{\"a\":1}]"
        );
    }
}
