//! Bookinfo in a box (issue #10): every Bookinfo pod and the ingress gateway in its own network
//! namespace with Istio's iptables rules, the proxy started as pilot-agent starts it on
//! pilot-agent's bootstrap, and the control-plane stand-in pushing what istiod would over delta
//! ADS and SDS (mTLS between sidecars with SPIFFE certificates). Istio's tasks run through the
//! gateway, once with Petrel as every proxy and once with Envoy 1.40; each asserts its outcome,
//! and the two result tables must be identical. Needs root; everything is removed afterwards.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use petrel_tests::mesh::istiod::Flavor;
use petrel_tests::mesh::{istio_file, Answers, Bookinfo};
use petrel_tests::netns::missing_prerequisite;
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

    assert!(mesh.cp.nacks().is_empty(), "NACKs: {:?}", mesh.cp.nacks());
    rows
}

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
    assert_eq!(petrel, envoy);
}
