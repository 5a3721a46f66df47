//! Clusters, load balancing and per-worker connection pools.
pub mod circuit_breakers;
pub mod cluster;
pub mod pool;
