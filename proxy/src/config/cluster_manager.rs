//! The bootstrap's `cluster_manager`.
//!
//! `enable_deferred_cluster_creation` asks that workers set a cluster up on first use: Petrel's
//! per-worker cluster state (balancer position, connection pools) is always created on first
//! use, so the setting holds either way. `outlier_detection.event_log_path` is opened at start
//! (a path that cannot be opened fails the start, as in Envoy); ejection events are written to
//! it once outlier detection exists (issue #5: clusters with `outlier_detection` are refused
//! until then, so none can occur).

use std::sync::Arc;

use xds_client::pb::envoy::config::bootstrap::v3::ClusterManager;

use super::{invalid, reject_unhandled, ConfigError};

/// What the rest of the proxy needs from `cluster_manager`.
#[derive(Debug, Clone, Default)]
pub struct ClusterManagerConfig {
    /// The outlier-detection event log, open for appending.
    pub outlier_event_log: Option<Arc<std::fs::File>>,
}

pub fn compile(c: &ClusterManager) -> Result<ClusterManagerConfig, ConfigError> {
    let path = "cluster_manager";
    let mut rest = c.clone();
    rest.enable_deferred_cluster_creation = false;
    let mut out = ClusterManagerConfig::default();
    if let Some(o) = rest.outlier_detection.take() {
        let op = format!("{path}.outlier_detection");
        let mut orest = o.clone();
        let log = std::mem::take(&mut orest.event_log_path);
        reject_unhandled(&orest, &op)?;
        if !log.is_empty() {
            let f = crate::append_file::open_append(&log).map_err(|e| {
                invalid(
                    format!("{op}.event_log_path"),
                    format!("cannot open '{log}': {e}"),
                )
            })?;
            out.outlier_event_log = Some(Arc::new(f));
        }
    }
    reject_unhandled(&rest, path)?;
    Ok(out)
}
