//! HTTP- and network-filter traits, each Envoy extension Petrel implements (one module per Envoy
//! name), the matchers filters and routes share, and the table of supported extension type URLs.

// Envoy's deprecated fields are still Envoy's config: they are honoured, not warned about.
#![allow(deprecated)]

pub mod extensions;
pub mod filter_state;
pub mod fraction;
pub mod header_formatter;
pub mod histogram;
pub mod http;
pub mod http_filter;
pub mod matcher;
pub mod stats;
pub mod substitution;
pub mod time;
pub mod workload_metadata;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FilterConfigError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> FilterConfigError {
    FilterConfigError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}
