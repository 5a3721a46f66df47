//! Bookinfo in a box (issue #10): every Bookinfo pod and the ingress gateway in its own network
//! namespace with Istio's iptables rules, the proxy started as pilot-agent starts it on
//! pilot-agent's bootstrap, and the control-plane stand-in pushing what istiod would over delta
//! ADS and SDS (mTLS between sidecars with SPIFFE certificates). Istio's tasks run through the
//! gateway, once with Petrel as every proxy and once with Envoy 1.40; each asserts its outcome,
//! and the two result tables must be identical. Needs root; everything is removed afterwards.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use petrel_tests::mesh::istiod::Flavor;
use petrel_tests::mesh::{istio_file, Answers, Bookinfo, CLIENT, EXTERNAL_IP, GATEWAY};
use petrel_tests::netns::missing_prerequisite;
use petrel_tests::sds::workload_secret;
use petrel_tests::{envoy_bin, petrel_bin};
use serde_json::Value;

/// Who served the reviews of a productpage answer: `reviews-v2-0 black`, or the error text.
fn reviews_of(v: &Value) -> String {
    match &v["reviews"] {
        Value::String(s) => s.clone(),
        r => {
            let pod = r["served_by"].as_str().unwrap_or("?");
            match r["stars"].as_str() {
                Some(stars) => format!("{pod} {stars}"),
                None => pod.to_string(),
            }
        }
    }
}

/// Sends batches of `n` until `ok` holds for one (the proxies take a moment to apply a change),
/// up to 20 s; returns the last batch.
fn settle(
    mesh: &Bookinfo,
    n: usize,
    headers: &[&str],
    ok: impl Fn(&BTreeMap<String, usize>) -> bool,
) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = mesh
            .through_gateway("/productpage", n, headers)
            .by(reviews_of);
        if ok(&seen) || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn only(seen: &BTreeMap<String, usize>, key: &str) -> bool {
    seen.len() == 1 && seen.contains_key(key)
}

fn networking(file: &str) -> String {
    istio_file(&format!("samples/bookinfo/networking/{file}"))
}

/// The tasks, in the order the Istio docs walk through them; each row is the task and its
/// observed outcome.
fn tasks(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    // Debugging aid: keep the mesh up for a while to look at it by hand
    // (`ip netns exec pp<pod> …`).
    if let Some(secs) = std::env::var("PETREL_MESH_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("holding the mesh for {secs} s: {}", mesh.dir.display());
        std::thread::sleep(Duration::from_secs(secs));
    }
    let mut row = |task: &str, outcome: String| {
        eprintln!("[{:?}] {task}: {outcome}", mesh.flavor);
        rows.push((task.to_string(), outcome));
    };

    // Bookinfo through the gateway with no routing rules: reviews round-robins over v1..v3,
    // each version with its stars, details answers, all over mTLS between sidecars.
    let a: Answers = mesh.through_gateway("/productpage", 30, &[]);
    assert_eq!(a.codes.get("200"), Some(&30), "{a:?}\n{}", mesh.diagnose());
    let reviews = a.by(reviews_of);
    for want in ["reviews-v1-0", "reviews-v2-0 black", "reviews-v3-0 red"] {
        assert!(reviews.contains_key(want), "{reviews:?}");
    }
    let details = a.by(|v| v["details"].as_str().unwrap_or("?").to_string());
    assert_eq!(details.keys().collect::<Vec<_>>(), ["details-v1-0"]);
    row(
        "productpage through the gateway",
        format!("{:?}", reviews.keys().collect::<Vec<_>>()),
    );

    // Request routing: everything to v1, then jason to v2.
    mesh.apply(&networking("virtual-service-all-v1.yaml"));
    let seen = settle(mesh, 20, &[], |s| only(s, "reviews-v1-0"));
    assert!(only(&seen, "reviews-v1-0"), "all v1: {seen:?}");
    row("virtual-service-all-v1", format!("{seen:?}"));

    mesh.apply(&networking("virtual-service-reviews-test-v2.yaml"));
    let jason = settle(mesh, 10, &["end-user: jason"], |s| {
        only(s, "reviews-v2-0 black")
    });
    assert!(only(&jason, "reviews-v2-0 black"), "jason: {jason:?}");
    let others = mesh
        .through_gateway("/productpage", 10, &["end-user: other"])
        .by(reviews_of);
    assert!(only(&others, "reviews-v1-0"), "others: {others:?}");
    row("reviews-test-v2 (jason)", format!("{jason:?}"));
    row("reviews-test-v2 (others)", format!("{others:?}"));

    // Fault injection: a 7 s ratings delay for jason exceeds productpage's 2 × 3 s reviews
    // calls; an abort makes reviews report ratings unavailable.
    mesh.apply(&networking("virtual-service-ratings-test-delay.yaml"));
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let delayed = mesh
        .through_gateway("/productpage", 1, &["end-user: jason"])
        .by(reviews_of);
    let took = started.elapsed();
    assert!(
        only(
            &delayed,
            "Sorry, product reviews are currently unavailable for this book."
        ),
        "delay: {delayed:?}"
    );
    assert!(took >= Duration::from_secs(6), "{took:?}");
    row("ratings-test-delay (jason)", format!("{delayed:?}"));

    mesh.apply(&networking("virtual-service-ratings-test-abort.yaml"));
    let aborted = settle(mesh, 5, &["end-user: jason"], |s| {
        only(s, "reviews-v2-0 Ratings service is currently unavailable")
    });
    assert!(
        only(
            &aborted,
            "reviews-v2-0 Ratings service is currently unavailable"
        ),
        "abort: {aborted:?}"
    );
    row("ratings-test-abort (jason)", format!("{aborted:?}"));

    // Traffic shifting: 50/50 between v1 and v3.
    mesh.apply(&networking("virtual-service-reviews-50-v3.yaml"));
    let shifted = settle(mesh, 100, &[], |s| {
        s.keys()
            .all(|k| k == "reviews-v1-0" || k == "reviews-v3-0 red")
    });
    let v1 = shifted.get("reviews-v1-0").copied().unwrap_or(0);
    let v3 = shifted.get("reviews-v3-0 red").copied().unwrap_or(0);
    assert!(
        v1 + v3 == 100 && (30..=70).contains(&v1),
        "50/50: {shifted:?}"
    );
    row("reviews-50-v3", "v1 and v3 within 30..70 of 100".into());

    rows.extend(telemetry(mesh));
    rows.extend(rewrite_and_timeout(mesh));
    rows.extend(kubernetes_ingress(mesh));
    rows.extend(circuit_breaking_and_mirroring(mesh));
    rows.extend(mtls(mesh));
    rows.extend(egress(mesh));
    rows.extend(authorization(mesh));
    rows.extend(gateway_tls(mesh));
    rows.extend(rotation(mesh));
    rows.extend(bad_input_at_the_edge(mesh));
    rows.extend(lifecycle(mesh));
    assert!(mesh.cp.nacks().is_empty(), "NACKs: {:?}", mesh.cp.nacks());
    rows
}

/// Records a task's outcome (and shows it as the test goes).
fn record(mesh: &Bookinfo, rows: &mut Vec<(String, String)>, task: &str, outcome: String) {
    eprintln!("[{:?}] {task}: {outcome}", mesh.flavor);
    rows.push((task.to_string(), outcome));
}

/// Istio's access log on every sidecar a request crosses (compared line by line, with times,
/// ids and ephemeral ports masked), and Istio's `istio_requests_total` on 15090 with the
/// workloads at both ends (Istio's stats filter is Istio's proxy's own: Envoy from PyPI has
/// none, so that part is checked for Petrel only).
fn telemetry(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    // Reviews v3 (which calls ratings): every Bookinfo hop in one request.
    mesh.apply(&networking("virtual-service-reviews-v3.yaml"));
    let settled = settle(mesh, 5, &[], |s| only(s, "reviews-v3-0 red"));
    assert!(only(&settled, "reviews-v3-0 red"), "{settled:?}");
    let a = mesh.through_gateway("/productpage?trace=access-log", 1, &[]);
    assert_eq!(a.codes.get("200"), Some(&1), "{a:?}");
    // --file-flush-interval-msec 1000.
    std::thread::sleep(Duration::from_millis(1500));
    let gateway_line = mesh
        .log(GATEWAY, "proxy.log")
        .lines()
        .find(|l| l.contains("/productpage?trace=access-log"))
        .map(String::from)
        .unwrap_or_else(|| panic!("no gateway access log line\n{}", mesh.diagnose()));
    let id = gateway_line
        .split('"')
        .nth(9)
        .unwrap_or_default()
        .to_string();
    let mask = |line: &str| -> String {
        let line = line.replace(&id, "<request-id>");
        let line = regex::Regex::new(r"^\[[^\]]+\]")
            .expect("regex")
            .replace(&line, "[<start>]")
            .into_owned();
        // Duration and upstream service time follow the two byte counts.
        let line = regex::Regex::new(r"(\d+ \d+) \d+ (\d+|-) ")
            .expect("regex")
            .replace(&line, "$1 <ms> <ms> ")
            .into_owned();
        regex::Regex::new(r":\d{5}\b")
            .expect("regex")
            .replace_all(&line, ":<port>")
            .into_owned()
    };
    let mut lines = BTreeMap::new();
    for pod in [
        GATEWAY,
        "productpage-v1",
        "details-v1",
        "reviews-v3",
        "ratings-v1",
    ] {
        let mine: Vec<String> = mesh
            .log(pod, "proxy.log")
            .lines()
            .filter(|l| l.contains(&id))
            .map(mask)
            .collect();
        assert!(
            !mine.is_empty(),
            "{pod} logged nothing for {id}\n{}",
            mesh.diagnose()
        );
        lines.insert(pod, mine);
    }
    for (pod, l) in &lines {
        record(
            mesh,
            &mut rows,
            &format!("access log of {pod}"),
            l.join("\n"),
        );
    }

    rows.extend(zipkin_trace(mesh));

    if mesh.flavor == Flavor::IstioProxy {
        let metrics = mesh.get_in(
            &mesh.pods["reviews-v1"],
            "http://127.0.0.1:15090/stats/prometheus",
            1,
            &[],
        );
        let text = metrics.bodies.keys().next().cloned().unwrap_or_default();
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("istio_requests_total{") && l.contains(r#"reporter="destination""#)
            })
            .unwrap_or_else(|| panic!("no istio_requests_total on reviews-v1's 15090:\n{text}"));
        for want in [
            r#"source_workload="productpage-v1""#,
            r#"destination_workload="reviews-v1""#,
            r#"response_code="200""#,
            r#"source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage""#,
            r#"connection_security_policy="mutual_tls""#,
        ] {
            assert!(line.contains(want), "{want} not in {line}");
        }
    }
    rows
}

/// Istio's distributed-tracing task: one request through the gateway gives one Zipkin trace
/// with a span from every proxy it crossed (gateway, productpage, details, reviews, ratings),
/// each span's parent in the trace. Compared as (service, kind, name) with Envoy's.
fn zipkin_trace(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let a = mesh.through_gateway("/productpage?trace=zipkin", 1, &[]);
    assert_eq!(a.codes.get("200"), Some(&1), "{a:?}");
    let services = |spans: &[&Value]| -> std::collections::BTreeSet<String> {
        spans
            .iter()
            .filter_map(|s| s["localEndpoint"]["serviceName"].as_str().map(String::from))
            .collect()
    };
    let want: std::collections::BTreeSet<String> = [
        "istio-ingressgateway.istio-system",
        "productpage.default",
        "details.default",
        "reviews.default",
        "ratings.default",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    // Every span's parent is in the trace, and one span has none.
    let linked = |spans: &[&Value]| {
        let ids: std::collections::BTreeSet<&str> =
            spans.iter().filter_map(|s| s["id"].as_str()).collect();
        let roots = spans.iter().filter(|s| s.get("parentId").is_none()).count();
        roots == 1
            && spans
                .iter()
                .filter_map(|s| s["parentId"].as_str())
                .all(|p| ids.contains(p))
    };
    // Each proxy (each of its workers) reports every 5 s or sooner with enough spans.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (trace, all) = loop {
        let all = mesh.spans();
        let root = all.iter().find(|s| {
            s["tags"]["http.url"]
                .as_str()
                .is_some_and(|u| u.ends_with("/productpage?trace=zipkin"))
        });
        let trace = root
            .and_then(|r| r["traceId"].as_str())
            .unwrap_or("")
            .to_string();
        let in_trace: Vec<&Value> = all
            .iter()
            .filter(|s| s["traceId"] == trace.as_str())
            .collect();
        if (services(&in_trace) == want && linked(&in_trace)) || Instant::now() > deadline {
            break (trace, all.clone());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let spans: Vec<&Value> = all
        .iter()
        .filter(|s| s["traceId"] == trace.as_str())
        .collect();
    assert_eq!(services(&spans), want, "trace {trace}: {spans:#?}");
    assert!(
        linked(&spans),
        "a span's parent is missing, or not one root: {spans:#?}"
    );
    let mut shape: Vec<String> = spans
        .iter()
        .map(|s| {
            format!(
                "{} {} {}",
                s["localEndpoint"]["serviceName"].as_str().unwrap_or("?"),
                s["kind"].as_str().unwrap_or("?"),
                s["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    shape.sort();
    record(
        mesh,
        &mut rows,
        "zipkin trace through the mesh",
        shape.join("\n"),
    );
    rows
}

/// Bookinfo's plain Kubernetes Ingress (`platform/kube/bookinfo-ingress.yaml`) in place of its
/// Gateway: productpage's paths reach productpage, others get the gateway's 404.
fn kubernetes_ingress(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let gateway = networking("bookinfo-gateway.yaml");
    let ingress = istio_file("samples/bookinfo/platform/kube/bookinfo-ingress.yaml");
    mesh.cp.update(|m| {
        m.config.delete(&gateway);
        m.config.delete(REWRITE);
        m.config.apply(&ingress);
    });
    let served = |path: &str| {
        mesh.through_gateway(path, 1, &[])
            .by(|v| format!("{}", v["served_by"]))
            .into_keys()
            .collect::<Vec<_>>()
            .join(",")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while served("/productpage") != "\"productpage-v1-0\"" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    let outcome: Vec<String> = [
        "/productpage",
        "/static/style.css",
        "/login",
        "/api/v1/products/0",
        "/details/0",
    ]
    .iter()
    .map(|p| {
        let a = mesh.through_gateway(p, 1, &[]);
        format!("{p} {:?} {}", a.codes.keys().collect::<Vec<_>>(), served(p))
    })
    .collect();
    assert!(outcome[0].ends_with("\"productpage-v1-0\""), "{outcome:?}");
    assert!(outcome[1].ends_with("\"productpage-v1-0\""), "{outcome:?}");
    assert!(
        outcome[4].starts_with("/details/0 [\"404\"] null"),
        "{outcome:?}"
    );
    mesh.cp.update(|m| {
        m.config.delete(&ingress);
        m.config.apply(&gateway);
    });
    let back = settle(mesh, 3, &[], |s| {
        !s.is_empty() && s.keys().all(|k| k.starts_with("reviews"))
    });
    assert!(!back.is_empty(), "{back:?}");
    record(
        mesh,
        &mut rows,
        "Kubernetes Ingress in place of the Gateway",
        outcome.join("; "),
    );
    rows
}

/// A URI rewrite at the gateway (`/products` → `/productpage`), and the request-timeouts task:
/// reviews v2 with a 0.5 s timeout while ratings answers after 2 s.
fn rewrite_and_timeout(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    mesh.apply(REWRITE);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut a = mesh.through_gateway("/products", 1, &[]);
    while a.codes.get("200") != Some(&1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        a = mesh.through_gateway("/products", 1, &[]);
    }
    let served = a.by(|v| v["served_by"].as_str().unwrap_or("?").to_string());
    assert!(only(&served, "productpage-v1-0"), "{a:?}");
    record(
        mesh,
        &mut rows,
        "rewrite /products -> /productpage",
        format!("{served:?}"),
    );

    mesh.apply(TIMEOUT);
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let timed_out = mesh.through_gateway("/productpage", 1, &[]).by(reviews_of);
    let took = started.elapsed();
    assert!(
        only(
            &timed_out,
            "Sorry, product reviews are currently unavailable for this book."
        ),
        "timeout: {timed_out:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    record(
        mesh,
        &mut rows,
        "reviews timeout 0.5 s, ratings delay 2 s",
        format!("{timed_out:?}"),
    );
    mesh.apply(&networking("virtual-service-all-v1.yaml"));
    rows
}

/// The circuit-breaking task (fortio `-c 2 -n 20`, then `-c 3 -n 30`, against httpbin with one
/// connection and one pending request allowed) and the mirroring task (v1 answers, v2 sees
/// every request as `httpbin-shadow`).
fn circuit_breaking_and_mirroring(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let fortio = &mesh.pods["fortio-deploy"];
    // Each answer takes 200 ms, so that `-c` requests are in flight together: two fit (one
    // connection, one pending), a third overflows.
    let url = "http://httpbin:8000/delay/0.2";
    mesh.apply(CIRCUIT_BREAKER);
    std::thread::sleep(Duration::from_secs(1));
    let first = mesh.load(fortio, url, 1, 1, &[]);
    assert_eq!(
        first.codes.get("200"),
        Some(&1),
        "{first:?}\n{}",
        mesh.diagnose()
    );
    let two = mesh.load(fortio, url, 2, 20, &[]);
    assert!(
        two.codes.keys().all(|c| c == "200" || c == "503"),
        "{two:?}"
    );
    assert!(two.codes.get("200").copied().unwrap_or(0) >= 1, "{two:?}");
    let three = mesh.load(fortio, url, 3, 30, &[]);
    assert!(
        three.codes.keys().all(|c| c == "200" || c == "503"),
        "{three:?}"
    );
    assert!(
        three.codes.get("503").copied().unwrap_or(0) >= 1,
        "{three:?}"
    );
    let overflow = mesh.stats("fortio-deploy", "httpbin.*upstream_rq_pending_overflow");
    let counted: u64 = overflow
        .values()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    assert!(counted >= 1, "{overflow:?}");
    let refused: Vec<String> = three
        .bodies
        .keys()
        .filter(|b| !b.starts_with('{'))
        .cloned()
        .collect();
    record(
        mesh,
        &mut rows,
        "circuit breaking -c 2 -n 20 / -c 3 -n 30",
        format!("only 200 and 503; 503s at -c 3; upstream_rq_pending_overflow counted; 503 bodies {refused:?}"),
    );

    mesh.apply(MIRROR);
    let sleep = &mesh.pods["sleep"];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served;
    loop {
        served = mesh
            .get_in(sleep, "http://httpbin:8000/headers", 5, &[])
            .by(|v| v["served_by"].as_str().unwrap_or("?").to_string());
        if only(&served, "httpbin-v1-0") || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(only(&served, "httpbin-v1-0"), "{served:?}");
    // What v2 sees from now on: the mirrored copies only.
    std::thread::sleep(Duration::from_millis(500));
    let seen_before = mesh.log("httpbin-v2", "app.log").lines().count();
    let served = mesh
        .get_in(sleep, "http://httpbin:8000/headers", 5, &[])
        .by(|v| v["served_by"].as_str().unwrap_or("?").to_string());
    assert!(only(&served, "httpbin-v1-0"), "{served:?}");
    std::thread::sleep(Duration::from_millis(500));
    let mirrored: std::collections::BTreeSet<String> = mesh
        .log("httpbin-v2", "app.log")
        .lines()
        .skip(seen_before)
        .filter(|l| l.ends_with("/headers"))
        .map(String::from)
        .collect();
    assert_eq!(
        mirrored.iter().collect::<Vec<_>>(),
        ["GET httpbin-shadow:8000 /headers"],
        "{}",
        mesh.diagnose()
    );
    record(
        mesh,
        &mut rows,
        "mirroring v1 -> v2",
        format!("{served:?}, v2 saw {mirrored:?}"),
    );
    rows
}

/// Mutual TLS: the caller's SPIFFE identity in `x-forwarded-client-cert`; a client without a
/// sidecar is served under PERMISSIVE and refused under STRICT.
fn mtls(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let sleep = &mesh.pods["sleep"];
    let a = mesh.get_in(sleep, "http://httpbin:8000/headers", 1, &[]);
    let xfcc = a.by(|v| {
        let x = v["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap_or("none");
        // The hash is the certificate's, different in each run.
        regex::Regex::new("Hash=[0-9a-f]{64}")
            .map(|r| r.replace(x, "Hash=<sha256>").into_owned())
            .unwrap_or_default()
    });
    assert!(
        xfcc.keys()
            .all(|x| x.contains("URI=spiffe://cluster.local/ns/default/sa/sleep")),
        "{xfcc:?}"
    );
    record(
        mesh,
        &mut rows,
        "x-forwarded-client-cert at httpbin",
        format!("{xfcc:?}"),
    );

    let client = &mesh.pods[CLIENT];
    let direct = format!("http://{}:8080/get", mesh.pods["httpbin-v1"].ip);
    let permissive = mesh.get_in(client, &direct, 1, &[]);
    assert_eq!(permissive.codes.get("200"), Some(&1), "{permissive:?}");
    mesh.apply(STRICT);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut strict = mesh.get_in(client, &direct, 1, &[]);
    while strict.codes.contains_key("200") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        strict = mesh.get_in(client, &direct, 1, &[]);
    }
    assert!(!strict.codes.contains_key("200"), "{strict:?}");
    let inside = mesh.get_in(sleep, "http://httpbin:8000/get", 3, &[]);
    assert_eq!(inside.codes.get("200"), Some(&3), "{inside:?}");
    mesh.cp.update(|m| m.config.delete(STRICT));
    record(
        mesh,
        &mut rows,
        "PERMISSIVE then STRICT, client without sidecar",
        format!(
            "{:?} then {:?}; sidecar to sidecar {:?}",
            permissive.codes, strict.codes, inside.codes
        ),
    );
    rows
}

/// Egress: `ALLOW_ANY` passes a host outside the mesh through, `REGISTRY_ONLY` sends it to
/// the black hole, and a ServiceEntry opens that one host (others on its port get 502).
fn egress(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let sleep = &mesh.pods["sleep"];
    let url = format!("http://{EXTERNAL_IP}/get");
    let host = "host: external.test";
    let allow = mesh.get_in(sleep, &url, 1, &[host]);
    assert_eq!(allow.codes.get("200"), Some(&1), "{allow:?}");
    mesh.cp.update(|m| m.config.registry_only = true);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut blocked = mesh.get_in(sleep, &url, 1, &[host]);
    while blocked.codes.contains_key("200") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        blocked = mesh.get_in(sleep, &url, 1, &[host]);
    }
    assert!(!blocked.codes.contains_key("200"), "{blocked:?}");
    mesh.apply(SERVICE_ENTRY);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut opened = mesh.get_in(sleep, &url, 1, &[host]);
    while !opened.codes.contains_key("200") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        opened = mesh.get_in(sleep, &url, 1, &[host]);
    }
    assert_eq!(opened.codes.get("200"), Some(&1), "{opened:?}");
    let other = mesh.get_in(sleep, &url, 1, &["host: other.test"]);
    assert_eq!(other.codes.get("502"), Some(&1), "{other:?}");
    mesh.cp.update(|m| {
        m.config.registry_only = false;
        m.config.delete(SERVICE_ENTRY);
    });
    record(
        mesh,
        &mut rows,
        "egress ALLOW_ANY / REGISTRY_ONLY / ServiceEntry",
        format!(
            "{:?} / {:?} / {:?}, other host {:?}",
            allow.codes, blocked.codes, opened.codes, other.codes
        ),
    );
    rows
}

/// Istio's HTTP authorization task: allow nothing (403 `RBAC: access denied` at productpage),
/// then let the gateway view productpage, productpage view details and reviews, reviews view
/// ratings; then a DENY policy on reviews for productpage's identity.
fn authorization(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let page = |want: &dyn Fn(&Answers) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let a = mesh.through_gateway("/productpage", 3, &[]);
            if want(&a) || Instant::now() > deadline {
                return a;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let summary = |a: &Answers| {
        a.by(|v| match v {
            Value::String(s) => s.clone(),
            v => format!("details: {} / reviews: {}", v["details"], reviews_of(v)),
        })
    };
    mesh.apply(&networking("virtual-service-reviews-v3.yaml"));
    mesh.apply(ALLOW_NOTHING);
    let denied = page(&|a| a.codes.get("403") == Some(&3));
    assert_eq!(denied.codes.get("403"), Some(&3), "{denied:?}");
    assert!(
        denied.bodies.contains_key("RBAC: access denied"),
        "{denied:?}"
    );
    record(
        mesh,
        &mut rows,
        "allow-nothing",
        format!("{:?} {:?}", denied.codes, denied.bodies),
    );

    mesh.apply(PRODUCTPAGE_VIEWER);
    let partial = page(&|a| a.codes.get("200") == Some(&3));
    let seen = summary(&partial);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["details: \"Sorry, product details are currently unavailable for this book.\" / reviews: Sorry, product reviews are currently unavailable for this book."],
        "{partial:?}"
    );
    record(mesh, &mut rows, "productpage-viewer", format!("{seen:?}"));

    mesh.apply(DETAILS_REVIEWS_VIEWERS);
    let want_v3 = "details: \"details-v1-0\" / reviews: reviews-v3-0 Ratings service is currently unavailable";
    let partial = page(&|a| summary(a).contains_key(want_v3) && summary(a).len() == 1);
    let seen = summary(&partial);
    assert_eq!(seen.keys().collect::<Vec<_>>(), [want_v3], "{partial:?}");
    record(
        mesh,
        &mut rows,
        "details-viewer, reviews-viewer",
        format!("{seen:?}"),
    );

    mesh.apply(RATINGS_VIEWER);
    let full = "details: \"details-v1-0\" / reviews: reviews-v3-0 red";
    let all = page(&|a| summary(a).contains_key(full) && summary(a).len() == 1);
    assert_eq!(summary(&all).keys().collect::<Vec<_>>(), [full], "{all:?}");
    record(
        mesh,
        &mut rows,
        "ratings-viewer",
        format!("{:?}", summary(&all)),
    );

    mesh.apply(DENY_REVIEWS);
    let unavailable = "details: \"details-v1-0\" / reviews: Sorry, product reviews are currently unavailable for this book.";
    let denied = page(&|a| summary(a).contains_key(unavailable) && summary(a).len() == 1);
    assert_eq!(
        summary(&denied).keys().collect::<Vec<_>>(),
        [unavailable],
        "{denied:?}"
    );
    record(
        mesh,
        &mut rows,
        "DENY reviews to productpage",
        format!("{:?}", summary(&denied)),
    );
    mesh.cp.update(|m| m.config.authorization_policies.clear());
    rows
}

/// Istio's secure-gateway task: an HTTPS server on the gateway with a `credentialName` served
/// over SDS; the right SNI gets productpage, another name no certificate.
fn gateway_tls(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let cert = mesh.ca.leaf(
        &mesh.dir,
        "bookinfo-credential",
        &["bookinfo.example.com"],
        false,
    );
    let mut secret = workload_secret(&cert);
    secret.as_object_mut().map(|o| o.remove("name"));
    mesh.cp.update(|m| {
        m.config
            .credentials
            .insert("bookinfo-credential".into(), secret);
        m.config.apply(HTTPS_GATEWAY);
    });
    let gateway = mesh.pods[GATEWAY].ip.clone();
    let ca = mesh.ca.pem.display().to_string();
    let curl = |name: &str| {
        let resolve = format!("{name}:8443:{gateway}");
        let url = format!("https://{name}:8443/productpage");
        mesh.pods[CLIENT]
            .try_run(&[
                "curl",
                "-s",
                "-m",
                "5",
                "--cacert",
                &ca,
                "--resolve",
                &resolve,
                &url,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{ssl_verify_result}",
            ])
            .unwrap_or_else(|e| format!("failed {e}"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ok = curl("bookinfo.example.com");
    while ok != "200 0" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        ok = curl("bookinfo.example.com");
    }
    assert_eq!(ok, "200 0", "{}", mesh.diagnose());
    let other = curl("other.example.com");
    assert!(!other.starts_with("200"), "{other}");
    record(
        mesh,
        &mut rows,
        "gateway TLS SIMPLE, credential over SDS",
        format!(
            "bookinfo.example.com: {ok}; other.example.com: {}",
            other.split(' ').next().unwrap_or("")
        ),
    );
    rows
}

/// pilot-agent's part while one replica of reviews goes away under load: istiod drops its
/// endpoint, pilot-agent drains the inbound listeners gracefully (readiness goes down), then
/// sends SIGTERM; no request fails and every page has its reviews. Then `/quitquitquit`
/// stops another proxy, as pilot-agent does when its pod ends.
fn lifecycle(mesh: &Bookinfo) -> Vec<(String, String)> {
    // Enough requests to last through the drain, the health check's effect and SIGTERM.
    const LOAD: usize = 1500;
    let mut rows = Vec::new();
    mesh.cp.update(|m| {
        m.config
            .virtual_services
            .retain(|v| v["metadata"]["name"] != "reviews")
    });
    let all = settle(mesh, 30, &[], |s| s.len() == 3);
    assert_eq!(all.len(), 3, "{all:?}");
    let client = &mesh.pods[CLIENT];
    let url = format!("http://{}:8080/productpage", mesh.pods[GATEWAY].ip);
    let (answers, steps) = std::thread::scope(|scope| {
        let load = scope.spawn(|| mesh.load(client, &url, 2, LOAD, &[]));
        std::thread::sleep(Duration::from_millis(500));
        mesh.cp
            .update(|m| m.workloads.retain(|w| w.deployment != "reviews-v1"));
        let drained = mesh.admin(
            "reviews-v1",
            "POST",
            "/drain_listeners?inboundonly&graceful",
        );
        // A drain leaves the server LIVE; a failed health check makes it DRAINING.
        let ready = |m: &Bookinfo| {
            m.get_in(
                &m.pods["reviews-v1"],
                "http://127.0.0.1:15021/healthz/ready",
                1,
                &[],
            )
            .codes
        };
        let live = ready(mesh);
        let failed = mesh.admin("reviews-v1", "POST", "/healthcheck/fail");
        // pilot-agent reads `server.state`, which follows at the next stats flush (5 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut not_ready = ready(mesh);
        while not_ready.contains_key("200") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            not_ready = ready(mesh);
        }
        std::thread::sleep(Duration::from_millis(1500));
        // SAFETY: kill(2) with a pid this test started.
        unsafe { libc::kill(mesh.proxies["reviews-v1"] as i32, libc::SIGTERM) };
        let steps = format!("drain {drained}, readiness {live:?}; healthcheck/fail {failed}, readiness {not_ready:?}");
        (load.join().expect("load"), steps)
    });
    assert_eq!(
        steps,
        r#"drain OK 200, readiness {"200": 1}; healthcheck/fail OK 200, readiness {"503": 1}"#
    );
    assert_eq!(answers.codes.get("200"), Some(&LOAD), "{:?}", answers.codes);
    let pages = answers.by(reviews_of);
    assert!(pages.keys().all(|k| k.starts_with("reviews-")), "{pages:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while mesh.proxy_running("reviews-v1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !mesh.proxy_running("reviews-v1"),
        "the proxy outlived SIGTERM"
    );
    let quit = mesh.admin("sleep", "POST", "/quitquitquit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while mesh.proxy_running("sleep") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !mesh.proxy_running("sleep"),
        "the proxy outlived /quitquitquit"
    );
    record(
        mesh,
        &mut rows,
        "reviews-v1 drained and stopped under load; /quitquitquit",
        format!(
            "{steps}; {:?} of {LOAD} answered with reviews, proxy exited; quit {quit}, proxy exited",
            answers.codes
        ),
    );
    rows
}

/// pilot-agent rotates every workload certificate while requests cross the mesh: none fails,
/// and every sidecar holds the new `default` secret.
fn rotation(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let client = &mesh.pods[CLIENT];
    let url = format!("http://{}:8080/productpage", mesh.pods[GATEWAY].ip);
    let answers = std::thread::scope(|scope| {
        let load = scope.spawn(|| mesh.load(client, &url, 2, 200, &[]));
        std::thread::sleep(Duration::from_millis(300));
        mesh.rotate();
        load.join().expect("load")
    });
    assert_eq!(answers.codes.get("200"), Some(&200), "{:?}", answers.codes);
    let deadline = Instant::now() + Duration::from_secs(20);
    let versions = loop {
        let versions: std::collections::BTreeSet<String> =
            ["productpage-v1", "reviews-v2", "ratings-v1", "httpbin-v1"]
                .iter()
                .map(|pod| {
                    let dump =
                        mesh.admin(pod, "GET", "/config_dump?resource=dynamic_active_secrets");
                    let v: Value =
                        serde_json::from_str(dump.rsplit_once(' ').map_or("", |(b, _)| b))
                            .unwrap_or_default();
                    v["configs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|s| s["name"] == "default")
                        .filter_map(|s| s["version_info"].as_str().map(String::from))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect();
        if versions.len() == 1 && versions.contains("2") || Instant::now() > deadline {
            break versions;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        versions.iter().collect::<Vec<_>>(),
        ["2"],
        "default secret versions"
    );
    assert!(mesh.cp.nacks().is_empty(), "{:?}", mesh.cp.nacks());
    record(
        mesh,
        &mut rows,
        "workload certificates rotated under load",
        format!(
            "{:?} of 200; default secret version {versions:?} everywhere",
            answers.codes
        ),
    );
    rows
}

/// Bad input at the gateway gets Envoy's answers and the mesh keeps serving.
fn bad_input_at_the_edge(mesh: &Bookinfo) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let long = "x".repeat(70 * 1024);
    let cases: Vec<(&str, u16, Vec<u8>)> = vec![
        ("header without a colon", 8080, b"GET /productpage HTTP/1.1\r\nhost: a\r\nbad header\r\n\r\n".to_vec()),
        ("70 KiB header", 8080, format!("GET /productpage HTTP/1.1\r\nhost: a\r\nx-big: {long}\r\n\r\n").into_bytes()),
        ("chunked and content-length", 8080, b"POST /productpage HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n0\r\n\r\n".to_vec()),
        ("TLS ClientHello to the HTTP port", 8080, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage".to_vec()),
        ("plaintext to the HTTPS port", 8443, b"GET /productpage HTTP/1.1\r\nhost: bookinfo.example.com\r\n\r\n".to_vec()),
        ("garbage to the HTTPS port", 8443, b"\x16\x03\x01\x00\x05hello".to_vec()),
    ];
    for (label, port, bytes) in cases {
        let answer = mesh.raw_to_gateway(port, &bytes);
        record(mesh, &mut rows, &format!("edge: {label}"), answer);
    }
    let after = mesh.through_gateway("/productpage", 5, &[]);
    assert_eq!(after.codes.get("200"), Some(&5), "{after:?}");
    rows
}

const HTTPS_GATEWAY: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway-https}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8443, name: https, protocol: HTTPS}
    tls: {mode: SIMPLE, credentialName: bookinfo-credential}
    hosts: [bookinfo.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo-https}
spec:
  hosts: [bookinfo.example.com]
  gateways: [bookinfo-gateway-https]
  http:
  - match: [{uri: {exact: /productpage}}]
    route: [{destination: {host: productpage, port: {number: 9080}}}]
"#;

const ALLOW_NOTHING: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing}
spec: {}
"#;

const PRODUCTPAGE_VIEWER: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-viewer}
spec:
  selector: {matchLabels: {app: productpage}}
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

const DETAILS_REVIEWS_VIEWERS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-viewer}
spec:
  selector: {matchLabels: {app: details}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-productpage]}}]
    to: [{operation: {methods: [GET]}}]
"#;

const RATINGS_VIEWER: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-viewer}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-reviews]}}]
    to: [{operation: {methods: [GET]}}]
"#;

const DENY_REVIEWS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-reviews}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from: [{source: {namespaces: [default]}}]
    to: [{operation: {paths: [/reviews/*]}}]
"#;

const REWRITE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo-products}
spec:
  hosts: ["*"]
  gateways: [bookinfo-gateway]
  http:
  - match: [{uri: {prefix: /products}}]
    rewrite: {uri: /productpage}
    route: [{destination: {host: productpage, port: {number: 9080}}}]
"#;

/// The request-timeouts task: reviews to v2 with a 0.5 s timeout, ratings delayed 2 s.
const TIMEOUT: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v2}}]
    timeout: 0.5s
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - fault: {delay: {percentage: {value: 100}, fixedDelay: 2s}}
    route: [{destination: {host: ratings, subset: v1}}]
"#;

/// The task's DestinationRule. The task has one httpbin pod: its traffic goes to v1 here, as
/// connection pools (and the first connection each may always open) are per host.
const CIRCUIT_BREAKER: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin]
  http:
  - route: [{destination: {host: httpbin, subset: v1}}]
"#;

const MIRROR: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin]
  http:
  - route: [{destination: {host: httpbin, subset: v1}, weight: 100}]
    mirror: {host: httpbin, subset: v2}
    mirrorPercentage: {value: 100.0}
"#;

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

const SERVICE_ENTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-test}
spec:
  hosts: [external.test]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  location: MESH_EXTERNAL
  endpoints: [{address: 10.250.3.10}]
"#;

#[test]
fn bookinfo_tasks_petrel_and_envoy() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("skipped: {why}");
        return;
    }
    let petrel = {
        let mesh = Bookinfo::start("pp", Flavor::IstioProxy, &petrel_bin());
        tasks(&mesh)
    };
    let Some(envoy) = envoy_bin() else {
        eprintln!("Envoy 1.40 not installed: only Petrel's run was checked");
        return;
    };
    let envoy = {
        let mesh = Bookinfo::start("pe", Flavor::PlainEnvoy, &envoy);
        tasks(&mesh)
    };
    eprintln!("| task | Petrel | Envoy |\n|---|---|---|");
    for ((task, p), (_, e)) in petrel.iter().zip(&envoy) {
        eprintln!("| {task} | {p} | {e} |");
    }
    let differences: Vec<String> = petrel
        .iter()
        .zip(&envoy)
        .filter(|(p, e)| p != e)
        .map(|((task, p), (_, e))| format!("{task}:\n  Petrel: {p}\n  Envoy:  {e}"))
        .collect();
    assert!(
        differences.is_empty() && petrel.len() == envoy.len(),
        "{}",
        differences.join("\n")
    );
}
