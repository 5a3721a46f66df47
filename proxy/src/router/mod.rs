//! The router: compiled route tables and the terminal filter that forwards to upstream clusters.
pub mod route_config;
pub mod upstream_request;
pub mod uri_template;
