//! Date rendering for the `date` header and `%START_TIME%`.
use std::time::SystemTime;

/// RFC 3339 with milliseconds, UTC (Envoy's default `%START_TIME%` format).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let (y, mo, da, h, mi, s) = crate::logging::civil_from_unix(d.as_secs() as i64);
    format!(
        "{y:04}-{mo:02}-{da:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        d.subsec_millis()
    )
}
