//! Stats, the substitution formatter and access-log filters (access logs and tracing come with
//! the observability issue).
pub mod access_log_filter;
pub mod formatter;
pub mod stats;
