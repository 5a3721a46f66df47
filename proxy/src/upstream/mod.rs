//! Clusters, load balancing and per-worker connection pools.
pub mod async_client;
pub mod circuit_breakers;
pub mod cluster;
pub mod consistent_hash;
pub mod dns_ttl;
pub mod host_set;
pub mod outlier_detection;
pub mod pool;
pub mod transport_socket;
