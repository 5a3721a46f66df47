//! Envoy's v3 API as Rust types plus a type-URL registry, and (with the xDS issue) the ADS client.
//!
//! Knows nothing of listeners or HTTP: it decodes, and hands typed values on.

pub mod ads;
pub mod type_registry;

pub use envoy_types::pb;
pub use type_registry::{DecodeError, TypeRegistry};
