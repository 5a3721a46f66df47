//! fortio's text summary and JSON result.

use std::fmt::Write;

use serde_json::json;

use super::args::{LoadArgs, Protocol};
use super::latency::PERCENTILES;
use super::RunResult;

/// The summary fortio prints at the end of a run.
pub fn text(args: &LoadArgs, r: &RunResult) -> String {
    let l = &r.latencies;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Ended after {:.6}s : {} calls. qps={:.5}",
        r.elapsed.as_secs_f64(),
        r.calls(),
        r.qps()
    );
    let _ = writeln!(
        s,
        "Aggregated Function Time : count {} avg {:.9} +/- {:.4} min {:.9} max {:.9} sum {:.9}",
        l.count(),
        l.mean().as_secs_f64(),
        l.stddev(),
        l.min().as_secs_f64(),
        l.max().as_secs_f64(),
        l.sum().as_secs_f64()
    );
    for p in PERCENTILES {
        let _ = writeln!(s, "# target {p}% {:.6}", l.percentile(p).as_secs_f64());
    }
    let _ = writeln!(
        s,
        "Sockets used: {} (for perfect keepalive, would be {})",
        r.sockets, args.connections
    );
    let total = r.calls().max(1) as f64;
    for (code, n) in &r.codes {
        let _ = writeln!(s, "Code {code} : {n} ({:.1} %)", *n as f64 * 100.0 / total);
    }
    let _ = writeln!(
        s,
        "All done {} calls (plus 0 warmup) {:.3} ms avg, {:.1} qps",
        r.calls(),
        l.mean().as_secs_f64() * 1e3,
        r.qps()
    );
    s
}

/// The first line fortio prints, before the run.
pub fn banner(args: &LoadArgs) -> String {
    let rate = if args.qps > 0.0 {
        format!("{} queries per second", args.qps)
    } else {
        "max qps".to_string()
    };
    let until = match args.count {
        Some(n) => format!("{n} calls"),
        None => format!("{:?}", args.duration),
    };
    format!(
        "Fortio-style load: {rate}, {} connection(s), {until}: http://{}{}",
        args.connections, args.url.authority, args.url.path_and_query
    )
}

/// fortio's JSON result, the fields tools read from it.
pub fn json(args: &LoadArgs, r: &RunResult) -> serde_json::Value {
    let l = &r.latencies;
    let percentiles: Vec<_> = PERCENTILES
        .iter()
        .map(|&p| json!({"Percentile": p, "Value": l.percentile(p).as_secs_f64()}))
        .collect();
    json!({
        "RunType": match args.protocol { Protocol::Grpc => "GRPC Ping", _ => "HTTP" },
        "URL": format!("http://{}{}", args.url.authority, args.url.path_and_query),
        "RequestedQPS": if args.qps > 0.0 { args.qps.to_string() } else { "max".to_string() },
        "RequestedDuration": match args.count {
            Some(n) => format!("exactly {n} calls"),
            None => format!("{:?}", args.duration),
        },
        "ActualQPS": r.qps(),
        "ActualDuration": r.elapsed.as_nanos() as u64,
        "NumThreads": args.connections,
        "SocketCount": r.sockets,
        "RetCodes": r.codes,
        "DurationHistogram": {
            "Count": l.count(),
            "Min": l.min().as_secs_f64(),
            "Max": l.max().as_secs_f64(),
            "Sum": l.sum().as_secs_f64(),
            "Avg": l.mean().as_secs_f64(),
            "StdDev": l.stddev(),
            "Percentiles": percentiles,
        },
    })
}
