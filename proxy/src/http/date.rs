//! Date rendering for `%START_TIME%` and admin timestamps.
pub use petrel_filters::time::rfc3339_millis;
