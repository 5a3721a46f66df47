//! The router: compiled route tables and the terminal filter that forwards to upstream clusters.
pub mod hash_policy;
pub mod retry_policy;
pub mod route_config;
pub mod timeouts;
pub mod upstream_request;
pub mod uri_template;
