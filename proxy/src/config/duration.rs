//! `google.protobuf.Duration` → `std::time::Duration`, refusing negatives as Envoy's PGV does.
use std::time::Duration;

use super::{invalid, ConfigError};
use xds_client::pb::google::protobuf::Duration as PbDuration;

pub fn to_std(d: &PbDuration, path: &str) -> Result<Duration, ConfigError> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(invalid(path, "invalid duration: must be non-negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// An optional duration with a default when unset.
pub fn or(d: &Option<PbDuration>, default: Duration, path: &str) -> Result<Duration, ConfigError> {
    match d {
        Some(d) => to_std(d, path),
        None => Ok(default),
    }
}

/// An optional duration, kept as set (zero included).
pub fn optional(d: &Option<PbDuration>, path: &str) -> Result<Option<Duration>, ConfigError> {
    d.as_ref().map(|d| to_std(d, path)).transpose()
}

/// An optional duration where unset or zero means "disabled" (Envoy's timeout convention).
pub fn optional_timeout(
    d: &Option<PbDuration>,
    path: &str,
) -> Result<Option<Duration>, ConfigError> {
    match d {
        Some(d) => {
            let d = to_std(d, path)?;
            Ok((!d.is_zero()).then_some(d))
        }
        None => Ok(None),
    }
}
