//! Pilot-agent's SDS for tests: the workload certificate (`default`) and the mesh root
//! (`ROOTCA`) served over SotW `SecretDiscoveryService` streams, again whenever they change.

use std::path::Path;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use xds_client::pb::envoy::service::discovery::v3::DiscoveryResponse;

use crate::ads_server::Sessions;
use crate::tls::{Ca, Pem};
use crate::xds::any;

pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The `default` secret: a workload's certificate and key.
pub fn workload_secret(p: &Pem) -> serde_json::Value {
    let read = |f: &Path| std::fs::read_to_string(f).expect("pem");
    json!({"name": "default", "tls_certificate": {
        "certificate_chain": {"inline_string": read(&p.cert)}, "private_key": {"inline_string": read(&p.key)}}})
}

/// The `ROOTCA` secret: the mesh CA.
pub fn root_secret(ca: &Ca) -> serde_json::Value {
    json!({"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": std::fs::read_to_string(&ca.pem).expect("ca")}}})
}

/// What the SDS server hands out: a version and the secrets by name.
pub type Secrets = (u32, Vec<serde_json::Value>);

/// Answers every SDS stream with the secrets it names, again whenever they change; NACKs go
/// to `nacks`.
pub fn sds_responder(
    mut sessions: Sessions,
    secrets: watch::Receiver<Secrets>,
    nacks: mpsc::UnboundedSender<String>,
) {
    tokio::spawn(async move {
        while let Some(mut s) = sessions.sotw.recv().await {
            let mut secrets = secrets.clone();
            let nacks = nacks.clone();
            tokio::spawn(async move {
                let mut names: Vec<String> = Vec::new();
                let mut sent = 0u32;
                loop {
                    tokio::select! {
                        r = s.requests.recv() => {
                            let Some(r) = r else { return };
                            if let Some(e) = r.error_detail { let _ = nacks.send(e.message); }
                            if r.resource_names != names { names = r.resource_names.clone(); sent = 0; }
                        }
                        c = secrets.changed() => { if c.is_err() { return } }
                    }
                    let (version, all) = secrets.borrow().clone();
                    if names.is_empty() || sent == version {
                        continue;
                    }
                    let resources = all
                        .iter()
                        .filter(|v| names.iter().any(|n| v["name"] == n.as_str()))
                        .map(any::<Secret>)
                        .collect();
                    let resp = DiscoveryResponse {
                        version_info: version.to_string(),
                        resources,
                        type_url: SECRET.into(),
                        nonce: format!("n{version}"),
                        ..Default::default()
                    };
                    if s.responses.send(Ok(resp)).await.is_err() {
                        return;
                    }
                    sent = version;
                }
            });
        }
    });
}
