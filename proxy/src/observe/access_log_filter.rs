//! `envoy.config.accesslog.v3.AccessLogFilter`: decides whether an access log entry is written,
//! and which `local_reply_config` mapper applies.

use http::HeaderMap;
use petrel_filters::matcher::HeaderMatch;
use xds_client::pb::envoy::config::accesslog::v3::{
    access_log_filter::FilterSpecifier, comparison_filter::Op, AccessLogFilter,
};

use crate::config::{invalid, reject_unhandled, ConfigError};

/// What a filter looks at.
pub struct FilterInput<'a> {
    pub response_code: u16,
    pub response_flags: &'a str,
    pub request_headers: Option<&'a HeaderMap>,
    /// The stream's duration, once it is over.
    pub duration: Option<std::time::Duration>,
}

#[derive(Debug, Clone)]
pub enum LogFilter {
    StatusCode(Op, u32),
    /// `duration_filter`: milliseconds.
    Duration(Op, u64),
    /// Empty list: any flag set.
    ResponseFlags(Vec<String>),
    Header(HeaderMatch),
    /// Petrel runs no health checker, so no request is a health check.
    NotHealthCheck,
    And(Vec<LogFilter>),
    Or(Vec<LogFilter>),
}

/// Envoy's response flag short names, for validating `response_flag_filter`.
const FLAGS: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

/// A `ComparisonFilter`'s operator and value. Petrel's runtime has no key for it, so the default
/// value is the value (as in Envoy when the runtime key is unset).
fn comparison(
    c: &Option<xds_client::pb::envoy::config::accesslog::v3::ComparisonFilter>,
    path: &str,
) -> Result<(Op, u32), ConfigError> {
    let c = c
        .as_ref()
        .ok_or_else(|| invalid(format!("{path}.comparison"), "value is required"))?;
    let op = Op::try_from(c.op)
        .map_err(|_| invalid(format!("{path}.comparison.op"), "unknown enum value"))?;
    let v = c
        .value
        .as_ref()
        .ok_or_else(|| invalid(format!("{path}.comparison.value"), "value is required"))?;
    Ok((op, v.default_value))
}

fn compare(op: Op, actual: u64, v: u64) -> bool {
    match op {
        Op::Eq => actual == v,
        Op::Ge => actual >= v,
        Op::Le => actual <= v,
        Op::Ne => actual != v,
    }
}

impl LogFilter {
    pub fn compile(f: &AccessLogFilter, path: &str) -> Result<LogFilter, ConfigError> {
        Ok(match &f.filter_specifier {
            Some(FilterSpecifier::StatusCodeFilter(s)) => {
                let (op, v) = comparison(&s.comparison, &format!("{path}.status_code_filter"))?;
                LogFilter::StatusCode(op, v)
            }
            Some(FilterSpecifier::DurationFilter(d)) => {
                let (op, v) = comparison(&d.comparison, &format!("{path}.duration_filter"))?;
                LogFilter::Duration(op, v.into())
            }
            Some(FilterSpecifier::ResponseFlagFilter(r)) => {
                for (i, flag) in r.flags.iter().enumerate() {
                    if !FLAGS.contains(&flag.as_str()) {
                        return Err(invalid(
                            format!("{path}.response_flag_filter.flags[{i}]"),
                            format!("unknown response flag '{flag}'"),
                        ));
                    }
                }
                LogFilter::ResponseFlags(r.flags.clone())
            }
            Some(FilterSpecifier::HeaderFilter(h)) => {
                let m = h.header.as_ref().ok_or_else(|| {
                    invalid(format!("{path}.header_filter.header"), "value is required")
                })?;
                LogFilter::Header(
                    HeaderMatch::from_proto(m, &format!("{path}.header_filter.header"))
                        .map_err(|e| invalid(path, e.to_string()))?,
                )
            }
            Some(FilterSpecifier::NotHealthCheckFilter(n)) => {
                reject_unhandled(n, &format!("{path}.not_health_check_filter"))?;
                LogFilter::NotHealthCheck
            }
            Some(FilterSpecifier::AndFilter(a)) => LogFilter::And(
                a.filters
                    .iter()
                    .enumerate()
                    .map(|(i, f)| LogFilter::compile(f, &format!("{path}.and_filter.filters[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Some(FilterSpecifier::OrFilter(o)) => LogFilter::Or(
                o.filters
                    .iter()
                    .enumerate()
                    .map(|(i, f)| LogFilter::compile(f, &format!("{path}.or_filter.filters[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                let name = format!("{other:?}");
                let name = name.split('(').next().unwrap_or("filter").to_string();
                return Err(ConfigError::Unsupported {
                    path: path.into(),
                    fields: format!("'{name}' access log filter"),
                });
            }
            None => return Err(invalid(path, "filter_specifier is required")),
        })
    }

    pub fn matches(&self, i: &FilterInput<'_>) -> bool {
        match self {
            LogFilter::StatusCode(op, v) => compare(*op, i.response_code.into(), (*v).into()),
            LogFilter::Duration(op, v) => i
                .duration
                .is_some_and(|d| compare(*op, d.as_millis() as u64, *v)),
            LogFilter::ResponseFlags(flags) => {
                if flags.is_empty() {
                    !i.response_flags.is_empty()
                } else {
                    i.response_flags
                        .split(',')
                        .any(|f| flags.iter().any(|w| w == f))
                }
            }
            LogFilter::Header(h) => {
                let v = i.request_headers.and_then(|m| {
                    let mut it = m.get_all(h.name.as_str()).iter();
                    let first = it.next()?;
                    let mut s = String::from_utf8_lossy(first.as_bytes()).into_owned();
                    for v in it {
                        s.push(',');
                        s.push_str(&String::from_utf8_lossy(v.as_bytes()));
                    }
                    Some(s)
                });
                h.matches(v.as_deref())
            }
            LogFilter::NotHealthCheck => true,
            LogFilter::And(fs) => fs.iter().all(|f| f.matches(i)),
            LogFilter::Or(fs) => fs.iter().any(|f| f.matches(i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(v: serde_json::Value) -> Result<LogFilter, ConfigError> {
        let f: AccessLogFilter = xds_client::TypeRegistry::global().from_json(&v, false)?;
        LogFilter::compile(&f, "filter")
    }

    fn input(code: u16, flags: &'static str) -> FilterInput<'static> {
        FilterInput {
            response_code: code,
            response_flags: flags,
            request_headers: None,
            duration: None,
        }
    }

    #[test]
    fn status_and_flags() {
        let f = filter(json!({"status_code_filter": {"comparison": {"op": "GE", "value": {"default_value": 500, "runtime_key": "k"}}}})).unwrap();
        assert!(f.matches(&input(503, "")) && !f.matches(&input(404, "")));
        let f = filter(json!({"response_flag_filter": {"flags": ["UH", "NR"]}})).unwrap();
        assert!(f.matches(&input(503, "UH")) && !f.matches(&input(503, "UF")));
        let any = filter(json!({"response_flag_filter": {}})).unwrap();
        assert!(any.matches(&input(503, "UF")) && !any.matches(&input(200, "")));
        let both = filter(json!({"and_filter": {"filters": [
            {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": 404, "runtime_key": "k"}}}},
            {"not_health_check_filter": {}}]}})).unwrap();
        assert!(both.matches(&input(404, "NR")));
    }

    #[test]
    fn bad_filters_refused() {
        assert!(filter(json!({"response_flag_filter": {"flags": ["XX"]}})).is_err());
        let e = filter(json!({"runtime_filter": {"runtime_key": "k"}})).unwrap_err();
        assert!(e.to_string().contains("RuntimeFilter"), "{e}");
        let d = filter(json!({"duration_filter": {"comparison": {"op": "GE", "value": {"default_value": 10, "runtime_key": "k"}}}})).unwrap();
        let at = |ms: Option<u64>| FilterInput {
            response_code: 200,
            response_flags: "",
            request_headers: None,
            duration: ms.map(std::time::Duration::from_millis),
        };
        assert!(d.matches(&at(Some(10))));
        assert!(!d.matches(&at(Some(9))));
        assert!(!d.matches(&at(None)));
    }
}
