//! The ADS client against a scripted management server: first requests carry the node, ACKs
//! carry the accepted version and the response nonce, NACKs keep the last good version and carry
//! the sink's reason, and a reconnect resubscribes with what was accepted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use petrel_tests::ads_server::{serve_tcp, serve_unix};
use prost::Message;
use xds_client::ads::{self, AdsConfig, ApiType, Interest, Sink, Target, Update};
use xds_client::pb::envoy::config::cluster::v3::Cluster;
use xds_client::pb::envoy::config::core::v3::Node;
use xds_client::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource,
};
use xds_client::pb::google::protobuf::Any;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Records updates; refuses any cluster named "bad" (as a compile error would).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(String, Update)>>>);

impl Sink for Recorder {
    fn apply(&mut self, type_url: &str, update: Update) -> Result<(), String> {
        let names: Vec<String> = match &update {
            Update::Sotw { resources, .. } => resources
                .iter()
                .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                .map(|c| c.name)
                .collect(),
            Update::Delta { added, .. } => added.iter().map(|r| r.name.clone()).collect(),
        };
        self.0
            .lock()
            .expect("lock")
            .push((type_url.to_string(), update));
        if names.iter().any(|n| n == "bad") {
            return Err("cluster 'bad': field(s) 'bogus' not supported by Petrel".into());
        }
        Ok(())
    }
}

fn cluster(name: &str) -> Any {
    Any {
        type_url: CDS.into(),
        value: Cluster {
            name: name.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

fn node() -> Node {
    Node {
        id: "sidecar~10.0.0.1~pod.ns~ns.svc.cluster.local".into(),
        cluster: "pod.ns".into(),
        ..Default::default()
    }
}

async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("timed out")
        .expect("channel closed")
}

fn fast(mut c: AdsConfig) -> AdsConfig {
    c.backoff_base = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(100);
    c
}

#[tokio::test]
async fn sotw_ack_nack_and_reconnect_over_tcp() {
    let (addr, mut sessions) = serve_tcp().await;
    let rec = Recorder::default();
    let client = ads::spawn(
        fast(AdsConfig::new(Target::Tcp(addr), ApiType::Sotw, node())),
        rec.clone(),
    );
    client.subscribe(CDS, Interest::Wildcard);

    let mut s = next(&mut sessions.sotw).await;
    let first = next(&mut s.requests).await;
    assert_eq!(first.type_url, CDS);
    assert_eq!(
        first.node.as_ref().map(|n| n.id.as_str()),
        Some(node().id.as_str())
    );
    assert_eq!(
        (first.version_info.as_str(), first.response_nonce.as_str()),
        ("", "")
    );
    assert!(
        first.resource_names.is_empty(),
        "CDS is a wildcard subscription"
    );

    let resp = |version: &str, nonce: &str, names: &[&str]| DiscoveryResponse {
        version_info: version.into(),
        nonce: nonce.into(),
        type_url: CDS.into(),
        resources: names.iter().map(|n| cluster(n)).collect(),
        ..Default::default()
    };
    s.responses
        .send(Ok(resp("v1", "n1", &["a", "b"])))
        .await
        .expect("send");
    let ack = next(&mut s.requests).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v1", "n1")
    );
    assert!(ack.error_detail.is_none());
    assert!(
        ack.node.is_none(),
        "the node goes in the first request only"
    );

    s.responses
        .send(Ok(resp("v2", "n2", &["a", "bad"])))
        .await
        .expect("send");
    let nack = next(&mut s.requests).await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("v1", "n2"),
        "a NACK keeps the last good version"
    );
    let detail = nack.error_detail.expect("NACK carries error_detail");
    assert!(detail.message.contains("'bogus'"), "{}", detail.message);

    // The server drops the stream: the client reconnects and resubscribes from v1.
    drop(s);
    let mut s2 = next(&mut sessions.sotw).await;
    let again = next(&mut s2.requests).await;
    assert_eq!(again.version_info, "v1");
    assert!(
        again.node.is_some(),
        "a new stream starts with the node again"
    );
    assert_eq!(rec.0.lock().expect("lock").len(), 2);
}

#[tokio::test]
async fn sotw_named_subscriptions_grow_and_shrink() {
    let (addr, mut sessions) = serve_tcp().await;
    let client = ads::spawn(
        fast(AdsConfig::new(Target::Tcp(addr), ApiType::Sotw, node())),
        Recorder::default(),
    );
    client.subscribe(EDS, Interest::Names(["c1".to_string()].into()));
    let mut s = next(&mut sessions.sotw).await;
    assert_eq!(next(&mut s.requests).await.resource_names, ["c1"]);
    client.subscribe(
        EDS,
        Interest::Names(["c1".to_string(), "c2".to_string()].into()),
    );
    assert_eq!(next(&mut s.requests).await.resource_names, ["c1", "c2"]);
    client.subscribe(EDS, Interest::Names(["c2".to_string()].into()));
    assert_eq!(next(&mut s.requests).await.resource_names, ["c2"]);
}

#[tokio::test]
async fn delta_over_unix_socket() {
    let dir = std::env::temp_dir().join(format!("petrel-ads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("XDS");
    let mut sessions = serve_unix(&path).await;
    let rec = Recorder::default();
    let client = ads::spawn(
        fast(AdsConfig::new(
            Target::Unix(path.clone()),
            ApiType::Delta,
            node(),
        )),
        rec.clone(),
    );
    client.subscribe(CDS, Interest::Wildcard);

    let mut s = next(&mut sessions.delta).await;
    let first = next(&mut s.requests).await;
    assert_eq!(first.type_url, CDS);
    assert!(first.node.is_some());
    assert_eq!(first.resource_names_subscribe, [] as [String; 0]);

    let res = |name: &str, version: &str| Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(cluster(name)),
        ..Default::default()
    };
    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "d1".into(),
            resources: vec![res("a", "1"), res("b", "1")],
            ..Default::default()
        }))
        .await
        .expect("send");
    let ack = next(&mut s.requests).await;
    assert_eq!(ack.response_nonce, "d1");
    assert!(ack.error_detail.is_none());

    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "d2".into(),
            removed_resources: vec!["b".into()],
            ..Default::default()
        }))
        .await
        .expect("send");
    assert!(next(&mut s.requests).await.error_detail.is_none());

    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CDS.into(),
            nonce: "d3".into(),
            resources: vec![res("bad", "7")],
            ..Default::default()
        }))
        .await
        .expect("send");
    let nack = next(&mut s.requests).await;
    assert_eq!(nack.response_nonce, "d3");
    assert!(nack.error_detail.is_some());

    // Reconnect: only what was accepted (a@1; b removed; bad refused) is announced.
    drop(s);
    let mut s2 = next(&mut sessions.delta).await;
    let again = next(&mut s2.requests).await;
    assert_eq!(
        again.initial_resource_versions,
        [("a".to_string(), "1".to_string())].into()
    );
    assert_eq!(again.resource_names_subscribe, [] as [String; 0]);
    let updates = rec.0.lock().expect("lock").clone();
    assert!(
        matches!(&updates[1].1, Update::Delta { removed, .. } if removed == &["b".to_string()])
    );
}
