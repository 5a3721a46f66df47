//! Stats (and, with the observability issue, access logs and tracing).
pub mod stats;
