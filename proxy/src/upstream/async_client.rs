//! Requests Petrel makes on its own (mirrors, tracer reports) to a cluster, as Envoy's async
//! client sends them: a host from the cluster's balancer, the worker's pools, the cluster's
//! circuit breakers, stats and outlier detection.

use std::sync::Arc;

use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response};

use super::cluster::{Cluster, Host, UpstreamProtocol};
use super::outlier_detection::Report;
use super::pool::{PooledBody, ResetReason, UpstreamBody};
use crate::worker::WorkerCtx;

/// Why no response came.
#[derive(Debug)]
pub enum SendError {
    /// The balancer had no host (counted as `upstream_cx_none_healthy`).
    NoHealthyHost,
    Reset(ResetReason),
    /// The request could not be built (a bad path or authority).
    Invalid,
}

/// A request to send: its line, headers and body.
pub struct Outgoing {
    pub method: Method,
    pub path: String,
    pub authority: Option<HeaderValue>,
    pub headers: HeaderMap,
    pub body: UpstreamBody,
}

/// Sends `o` to a host of `cluster`; `grpc` says how the response feeds outlier detection.
pub async fn send(
    ctx: &WorkerCtx,
    cluster: &Cluster,
    o: Outgoing,
    grpc: bool,
) -> Result<Response<PooledBody>, SendError> {
    let Some(host) = ctx
        .upstreams
        .choose_host(cluster, None, Some(&o.headers), Default::default())
    else {
        cluster.stats.upstream_cx_none_healthy.inc();
        return Err(SendError::NoHealthyHost);
    };
    let h2 = cluster.protocol == UpstreamProtocol::Http2;
    let mut headers = o.headers;
    // HTTP/2 carries the authority in the URI; HTTP/1.1 in `host`.
    let uri = if h2 {
        headers.remove(http::header::HOST);
        let auth = o
            .authority
            .as_ref()
            .and_then(|a| a.to_str().ok())
            .unwrap_or("localhost");
        format!("http://{auth}{}", o.path)
    } else {
        if let Some(a) = o.authority {
            headers.insert(http::header::HOST, a);
        }
        o.path
    };
    let mut req = Request::builder()
        .method(o.method)
        .uri(uri)
        .version(if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        })
        .body(o.body)
        .map_err(|_| SendError::Invalid)?;
    *req.headers_mut() = headers;
    cluster.stats.upstream_rq_active.inc();
    let sent = ctx
        .upstreams
        .send(cluster, &host, h2, req, None, Default::default())
        .await;
    cluster.stats.upstream_rq_active.dec();
    match sent {
        Ok(resp) => {
            cluster.report_outlier(&host, outlier_response(grpc, resp.headers(), resp.status()));
            cluster.charge_response(resp.status().as_u16());
            host.record_response(resp.status().as_u16());
            Ok(resp)
        }
        Err(reason) => {
            report_reset(cluster, &host, &reason);
            cluster.charge_response(503);
            host.record_response(503);
            Err(SendError::Reset(reason))
        }
    }
}

/// What a response tells outlier detection (gRPC statuses mapped to HTTP, as Envoy).
pub fn outlier_response(grpc: bool, headers: &HeaderMap, status: http::StatusCode) -> Report {
    let grpc_status = grpc
        .then(|| {
            headers
                .get("grpc-status")?
                .to_str()
                .ok()?
                .parse::<u64>()
                .ok()
        })
        .flatten();
    Report::Response(match grpc_status {
        Some(g) => crate::http::local_reply::grpc_to_http_status(g),
        None => status.as_u16(),
    })
}

/// A reset attempt counts as a local-origin connect failure, except an overflow, which never
/// reached a host (Envoy's pool fails it without one), and a downstream body error.
pub fn report_reset(cluster: &Cluster, host: &Arc<Host>, reason: &ResetReason) {
    if !matches!(reason, ResetReason::Overflow | ResetReason::DownstreamBody) {
        cluster.report_outlier(host, Report::ConnectFailed);
    }
}
