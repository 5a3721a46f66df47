//! Clusters, load balancing and per-worker connection pools.
pub mod cluster;
pub mod pool;
