//! `envoy.filters.http.cors`: cross-origin requests as Envoy's CORS filter answers them, by the
//! `CorsPolicy` of the route and virtual host (`typed_per_filter_config`, most specific field
//! wins). A preflight (`OPTIONS` with `origin` and `access-control-request-method`) from an
//! allowed origin is answered here; other requests from an allowed origin get
//! `access-control-allow-origin` (and credentials, exposed headers) on the response. Stats
//! `cors.origin_valid` and `cors.origin_invalid` under `http.<prefix>.`.
//!
//! Istio puts the filter in every HTTP chain; without a policy it does nothing.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, StatusCode};
use xds_client::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use xds_client::pb::envoy::extensions::filters::http::cors::v3 as pb;
use xds_client::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use xds_client::pb::google::protobuf::Any;

use crate::http_filter::{
    FilterStatus, HttpFilter, HttpFilterFactory, LocalReply, RequestHead, ResponseHead,
    RouteFilterConfig, RouteInfo,
};
use crate::matcher::StringMatcher;
use crate::stats::{Counter, Store};
use crate::{invalid, FilterConfigError};

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";
pub const POLICY_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// One `CorsPolicy`; unset fields defer to the less specific policy.
#[derive(Debug)]
pub struct Policy {
    allow_origins: Vec<StringMatcher>,
    allow_methods: String,
    allow_headers: String,
    expose_headers: String,
    max_age: String,
    allow_credentials: Option<bool>,
    allow_private_network_access: Option<bool>,
    forward_not_matching_preflights: Option<bool>,
    /// `filter_enabled` (default all) and `shadow_enabled` (default none), per million.
    enabled: u64,
    shadow: u64,
}

fn per_million(
    f: &Option<RuntimeFractionalPercent>,
    default: u64,
    path: &str,
) -> Result<u64, FilterConfigError> {
    // The runtime key can only name a value Petrel's runtime would refuse to hold, so, as in
    // Envoy without that key, the default value decides.
    let Some(v) = f.as_ref().and_then(|f| f.default_value.as_ref()) else {
        return Ok(if f.is_some() { 0 } else { default });
    };
    let scale = match DenominatorType::try_from(v.denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        Err(_) => {
            return Err(invalid(
                format!("{path}.default_value.denominator"),
                "unknown enum value",
            ))
        }
    };
    Ok((v.numerator as u64 * scale).min(1_000_000))
}

impl Policy {
    pub fn compile(any: &Any, path: &str) -> Result<Policy, FilterConfigError> {
        let p: pb::CorsPolicy = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, e.to_string()))?;
        let allow_origins = p
            .allow_origin_string_match
            .iter()
            .enumerate()
            .map(|(i, m)| {
                StringMatcher::from_proto(m, &format!("{path}.allow_origin_string_match[{i}]"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            allow_origins,
            allow_methods: p.allow_methods,
            allow_headers: p.allow_headers,
            expose_headers: p.expose_headers,
            max_age: p.max_age,
            allow_credentials: p.allow_credentials.map(|b| b.value),
            allow_private_network_access: p.allow_private_network_access.map(|b| b.value),
            forward_not_matching_preflights: p.forward_not_matching_preflights.map(|b| b.value),
            enabled: per_million(
                &p.filter_enabled,
                1_000_000,
                &format!("{path}.filter_enabled"),
            )?,
            shadow: per_million(&p.shadow_enabled, 0, &format!("{path}.shadow_enabled"))?,
        })
    }
}

pub fn per_route(any: &Any, path: &str) -> Result<RouteFilterConfig, FilterConfigError> {
    Ok(Arc::new(Policy::compile(any, path)?))
}

#[derive(Debug)]
struct Stats {
    origin_valid: Arc<Counter>,
    origin_invalid: Arc<Counter>,
}

#[derive(Debug)]
pub struct Factory {
    name: Arc<str>,
    stats: Arc<Stats>,
}

impl Factory {
    pub fn compile(
        name: &str,
        any: &Any,
        path: &str,
        store: &Store,
        stat_prefix: &str,
    ) -> Result<Factory, FilterConfigError> {
        // `Cors` has no fields: everything is per route.
        let _: pb::Cors = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, e.to_string()))?;
        let prefix = format!("{stat_prefix}cors.");
        Ok(Factory {
            name: name.into(),
            stats: Arc::new(Stats {
                origin_valid: store.counter(&format!("{prefix}origin_valid")),
                origin_invalid: store.counter(&format!("{prefix}origin_invalid")),
            }),
        })
    }
}

impl HttpFilterFactory for Factory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self) -> Box<dyn HttpFilter> {
        Box::new(Filter {
            name: self.name.clone(),
            stats: self.stats.clone(),
            response: None,
        })
    }
}

/// What a CORS request's response gets.
struct ResponseHeaders {
    origin: HeaderValue,
    credentials: bool,
    expose: String,
}

struct Filter {
    name: Arc<str>,
    stats: Arc<Stats>,
    response: Option<ResponseHeaders>,
}

/// The route's and virtual host's policies, most specific first (no allocation: the filter
/// is in every Istio HTTP chain).
struct Policies<'a>([Option<&'a Policy>; 2]);

impl<'a> Policies<'a> {
    fn of(route: &RouteInfo<'a>, name: &str) -> Self {
        let policy = |i: usize| route.configs[i].get(name)?.downcast_ref::<Policy>();
        Policies([policy(0), policy(1)])
    }

    fn iter(&self) -> impl Iterator<Item = &'a Policy> + '_ {
        self.0.iter().flatten().copied()
    }

    fn first_str(&self, f: impl for<'b> Fn(&'b Policy) -> &'b str) -> &'a str {
        self.iter().map(f).find(|s| !s.is_empty()).unwrap_or("")
    }

    fn first_bool(&self, f: impl Fn(&Policy) -> Option<bool>, default: bool) -> bool {
        self.iter().find_map(f).unwrap_or(default)
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        let origins = self
            .iter()
            .map(|p| &p.allow_origins)
            .find(|o| !o.is_empty());
        origins.is_some_and(|os| os.iter().any(|m| m.matches("*") || m.matches(origin)))
    }
}

fn drawn(per_million: u64) -> bool {
    per_million >= 1_000_000 || (per_million > 0 && rand::random_range(0..1_000_000) < per_million)
}

impl HttpFilter for Filter {
    fn decode_headers(&mut self, req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        let Some(route) = req.route else {
            return FilterStatus::Continue;
        };
        let policies = Policies::of(&route, &self.name);
        let Some(first) = policies.iter().next() else {
            return FilterStatus::Continue;
        };
        let (enabled, shadow) = (drawn(first.enabled), drawn(first.shadow));
        if !enabled && !shadow {
            return FilterStatus::Continue;
        }
        let Some(origin) = req.headers.get("origin").filter(|o| !o.is_empty()).cloned() else {
            return FilterStatus::Continue;
        };
        let allowed = policies.origin_allowed(origin.to_str().unwrap_or(""));
        if allowed {
            self.stats.origin_valid.inc();
        } else {
            self.stats.origin_invalid.inc();
        }
        if shadow && !enabled {
            return FilterStatus::Continue;
        }
        let credentials = policies.first_bool(|p| p.allow_credentials, false);
        if allowed {
            self.response = Some(ResponseHeaders {
                origin: origin.clone(),
                credentials,
                expose: policies.first_str(|p| &p.expose_headers).to_string(),
            });
        }
        let request_method = req
            .headers
            .get("access-control-request-method")
            .filter(|v| !v.is_empty())
            .cloned();
        let (true, Some(request_method)) = (req.method == http::Method::OPTIONS, request_method)
        else {
            return FilterStatus::Continue;
        };
        if !allowed && policies.first_bool(|p| p.forward_not_matching_preflights, true) {
            return FilterStatus::Continue;
        }
        // A preflight: answered here.
        let mut h = HeaderMap::new();
        if allowed {
            h.insert("access-control-allow-origin", origin);
        }
        if credentials {
            h.insert(
                "access-control-allow-credentials",
                HeaderValue::from_static("true"),
            );
        }
        let mut set = |name: &'static str, configured: &str, echo: Option<&HeaderValue>| {
            let value = match configured {
                "" => return,
                "*" => echo
                    .cloned()
                    .unwrap_or_else(|| HeaderValue::from_static("")),
                v => match HeaderValue::from_str(v) {
                    Ok(v) => v,
                    Err(_) => return,
                },
            };
            h.insert(name, value);
        };
        set(
            "access-control-allow-methods",
            policies.first_str(|p| &p.allow_methods),
            Some(&request_method),
        );
        set(
            "access-control-allow-headers",
            policies.first_str(|p| &p.allow_headers),
            req.headers.get("access-control-request-headers"),
        );
        set(
            "access-control-max-age",
            policies.first_str(|p| &p.max_age),
            None,
        );
        if policies.first_bool(|p| p.allow_private_network_access, false)
            && req
                .headers
                .get("access-control-request-private-network")
                .is_some_and(|v| v == "true")
        {
            h.insert(
                "access-control-allow-private-network",
                HeaderValue::from_static("true"),
            );
        }
        FilterStatus::LocalReply(Box::new(LocalReply {
            status: StatusCode::OK,
            body: bytes::Bytes::new(),
            response_flag: "",
            details: "cors_response",
            headers: h,
            grpc_status: None,
        }))
    }

    fn encode_headers(&mut self, resp: &mut ResponseHead<'_>) -> FilterStatus {
        if let Some(r) = &self.response {
            resp.headers
                .insert("access-control-allow-origin", r.origin.clone());
            if r.credentials {
                resp.headers.insert(
                    "access-control-allow-credentials",
                    HeaderValue::from_static("true"),
                );
            }
            if let Ok(v) = HeaderValue::from_str(&r.expose) {
                if !r.expose.is_empty() {
                    resp.headers.insert("access-control-expose-headers", v);
                }
            }
        }
        FilterStatus::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::pb::envoy::r#type::v3::FractionalPercent;

    fn fraction(numerator: u32, denominator: i32) -> Option<RuntimeFractionalPercent> {
        Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator,
                denominator,
            }),
            runtime_key: String::new(),
        })
    }

    #[test]
    fn enabled_fractions_per_million() {
        assert_eq!(per_million(&None, 1_000_000, "p").unwrap(), 1_000_000);
        assert_eq!(per_million(&fraction(50, 0), 0, "p").unwrap(), 500_000);
        assert_eq!(per_million(&fraction(5, 1), 0, "p").unwrap(), 500);
        assert_eq!(per_million(&fraction(7, 2), 0, "p").unwrap(), 7);
        assert_eq!(per_million(&fraction(500, 0), 0, "p").unwrap(), 1_000_000);
        assert!(per_million(&fraction(1, 9), 0, "p").is_err());
    }
}
