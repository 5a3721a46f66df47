//! Petrel: an Envoy-compatible data plane for Istio.

// Envoy's deprecated fields are still Envoy's config: they are honoured, not warned about.
#![allow(deprecated)]

pub mod admin;
pub mod append_file;
pub mod cli;
pub mod config;
pub mod http;
pub mod listener;
pub mod local_info;
pub mod logging;
pub mod memory;
pub mod network;
pub mod observe;
pub mod rbac;
pub mod router;
pub mod server;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod worker;

/// `--version` as Envoy prints it (pilot-agent parses `version: <sha>/<x.y.z>/...`).
pub fn version_string() -> String {
    format!("petrel/{}/Clean/RELEASE/rustls", env!("CARGO_PKG_VERSION"))
}
