//! Stats, the substitution formatter, access logs and their filters.
pub mod access_log;
pub mod access_log_filter;
pub mod formatter;
pub mod istio_stats;
pub mod stats;
pub mod stats_config;
pub mod stats_sink;
pub mod tag_producer;
pub mod tracing;
