//! A load runner with fortio's interface: fixed-rate (open loop, corrected for coordinated
//! omission) or closed-loop HTTP/1.1, h2c and gRPC load, fortio's text summary and JSON.

pub mod args;
pub mod client;
pub mod latency;
pub mod pacing;
pub mod report;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use args::{ArgError, LoadArgs, Protocol};
use client::{ConnectError, Sender};
pub use latency::Latencies;

/// What a run measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Outcome (HTTP status, `grpc-status N`, `-1` for socket errors) → count.
    pub codes: BTreeMap<String, u64>,
    pub latencies: Latencies,
    pub elapsed: Duration,
    /// Sockets opened, reconnects included.
    pub sockets: u64,
}

impl RunResult {
    pub fn calls(&self) -> u64 {
        self.codes.values().sum()
    }

    pub fn qps(&self) -> f64 {
        self.calls() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the load `args` describe. Every connection is opened before the clock starts; a
/// target that cannot be reached fails the run. Later socket errors are counted as `-1` and
/// the connection is opened again for the next request.
pub async fn run(args: &LoadArgs) -> Result<RunResult, ConnectError> {
    let args = Arc::new(args.clone());
    let mut senders = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        senders.push(Sender::connect(&args).await?);
    }
    let start = Instant::now();
    let deadline = args.count.is_none().then(|| start + args.duration);
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(conn, sender)| {
            let args = args.clone();
            tokio::spawn(async move { connection(&args, conn, sender, start, deadline).await })
        })
        .collect();
    let mut result = RunResult {
        codes: BTreeMap::new(),
        latencies: Latencies::default(),
        elapsed: Duration::ZERO,
        sockets: 0,
    };
    let mut samples = Vec::new();
    for task in tasks {
        // A connection task only ends by returning; a panic would be a bug of this runner.
        let Ok(done) = task.await else { continue };
        for (code, n) in done.codes {
            *result.codes.entry(code).or_default() += n;
        }
        samples.extend(done.samples);
        result.sockets += done.sockets;
    }
    result.elapsed = start.elapsed();
    result.latencies = Latencies::new(samples);
    Ok(result)
}

struct ConnectionResult {
    codes: BTreeMap<String, u64>,
    samples: Vec<Duration>,
    sockets: u64,
}

async fn connection(
    args: &LoadArgs,
    conn: usize,
    sender: Sender,
    start: Instant,
    deadline: Option<Instant>,
) -> ConnectionResult {
    let quota = args.count.map(|n| pacing::share(n, args.connections, conn));
    let body = client::payload(args);
    let mut out = ConnectionResult {
        codes: BTreeMap::new(),
        samples: Vec::new(),
        sockets: 1,
    };
    let mut sender = Some(sender);
    let mut free_at = start;
    for i in 0.. {
        if quota.is_some_and(|q| i >= q) {
            break;
        }
        let due = pacing::due(start, args.qps, args.connections, conn, i);
        let next = due.unwrap_or_else(Instant::now);
        if deadline.is_some_and(|d| next >= d) {
            break;
        }
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
        let sent = Instant::now();
        let basis = pacing::latency_start(due, sent, free_at);
        // A socket the server closed (or that failed) is replaced before the request.
        let live = match sender.take().filter(|s| !s.is_closed()) {
            Some(s) => Some(s),
            None => {
                out.sockets += 1;
                Sender::connect(args).await.ok()
            }
        };
        let code = match live {
            Some(mut s) => {
                let code = s.call(args, &body).await;
                if code != "-1" {
                    sender = Some(s);
                }
                code
            }
            None => "-1".to_string(),
        };
        free_at = Instant::now();
        out.samples.push(free_at - basis);
        *out.codes.entry(code).or_default() += 1;
    }
    out
}
