//! A route's `hash_policy`: the request hash that RING_HASH and MAGLEV clusters balance on, as
//! Envoy's `HashPolicyImpl` computes it (xxHash64 of a header, cookie, source IP or query
//! parameter; several policies combined by rotate-and-xor; `terminal` stops at the first that
//! produced a hash). A cookie policy with a `ttl` sets the cookie when the request lacks it.

use std::net::SocketAddr;

use http::HeaderMap;
use xds_client::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
use xds_client::pb::envoy::config::route::v3::route_action::HashPolicy as PbHashPolicy;

use crate::config::{duration, invalid, reject_unhandled, ConfigError};

#[derive(Debug, Clone)]
enum Method {
    Header {
        name: String,
        rewrite: Option<(regex::Regex, String)>,
    },
    Cookie {
        name: String,
        /// With a TTL, a missing cookie is generated and set on the response.
        ttl: Option<std::time::Duration>,
        path: String,
        attributes: Vec<(String, String)>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, Default)]
pub struct HashPolicy {
    methods: Vec<(Method, bool)>,
}

/// What the request hashes to, and a cookie to set on the response (Envoy's generated one).
#[derive(Debug, Default)]
pub struct RequestHash {
    pub hash: Option<u64>,
    pub set_cookie: Option<http::HeaderValue>,
}

/// The connection addresses a hash may read.
pub struct Addresses {
    /// The downstream address after XFF processing.
    pub remote: SocketAddr,
    /// The connection's own addresses (a generated cookie is derived from them).
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

pub fn xxhash64(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(bytes, 0)
}

impl HashPolicy {
    pub fn compile(
        policies: &[PbHashPolicy],
        path: &str,
    ) -> Result<Option<HashPolicy>, ConfigError> {
        let mut methods = Vec::new();
        for (i, p) in policies.iter().enumerate() {
            let pp = format!("{path}.hash_policy[{i}]");
            let mut rest = p.clone();
            let terminal = std::mem::take(&mut rest.terminal);
            let method = match rest.policy_specifier.take() {
                Some(PolicySpecifier::Header(h)) => {
                    let hp = format!("{pp}.header");
                    if h.header_name.is_empty() {
                        return Err(invalid(
                            format!("{hp}.header_name"),
                            "value length must be at least 1 characters",
                        ));
                    }
                    let rewrite = match &h.regex_rewrite {
                        Some(r) => Some(super::route_config::compile_regex_rewrite(
                            r,
                            &format!("{hp}.regex_rewrite"),
                        )?),
                        None => None,
                    };
                    Method::Header {
                        name: h.header_name.to_ascii_lowercase(),
                        rewrite,
                    }
                }
                Some(PolicySpecifier::Cookie(c)) => {
                    let cp = format!("{pp}.cookie");
                    if c.name.is_empty() {
                        return Err(invalid(
                            format!("{cp}.name"),
                            "value length must be at least 1 characters",
                        ));
                    }
                    let ttl = duration::optional(&c.ttl, &format!("{cp}.ttl"))?;
                    Method::Cookie {
                        name: c.name.clone(),
                        ttl,
                        path: c.path.clone(),
                        attributes: c
                            .attributes
                            .iter()
                            .map(|a| (a.name.clone(), a.value.clone()))
                            .collect(),
                    }
                }
                Some(PolicySpecifier::ConnectionProperties(c)) => {
                    if !c.source_ip {
                        // Envoy hashes nothing for it: the policy is inert, so refuse it.
                        return Err(ConfigError::Unsupported {
                            path: format!("{pp}.connection_properties"),
                            fields: "'source_ip: false'".into(),
                        });
                    }
                    Method::SourceIp
                }
                Some(PolicySpecifier::QueryParameter(q)) => {
                    if q.name.is_empty() {
                        return Err(invalid(
                            format!("{pp}.query_parameter.name"),
                            "value length must be at least 1 characters",
                        ));
                    }
                    Method::QueryParameter(q.name.clone())
                }
                Some(PolicySpecifier::FilterState(_)) => {
                    return Err(ConfigError::Unsupported {
                        path: pp,
                        fields: "'filter_state'".into(),
                    })
                }
                None => return Err(invalid(pp, "value is required")),
            };
            reject_unhandled(&rest, &pp)?;
            methods.push((method, terminal));
        }
        Ok((!methods.is_empty()).then_some(HashPolicy { methods }))
    }

    /// The request's hash; None when no policy produced one (the balancer then picks at
    /// random, as Envoy does).
    pub fn hash(&self, headers: &HeaderMap, path: &str, addrs: &Addresses) -> RequestHash {
        let mut out = RequestHash::default();
        for (method, terminal) in &self.methods {
            let new = match method {
                Method::Header { name, rewrite } => header_hash(headers, path, name, rewrite),
                Method::Cookie {
                    name,
                    ttl,
                    path: cookie_path,
                    attributes,
                } => match cookie(headers, name) {
                    Some(v) => Some(xxhash64(v.as_bytes())),
                    None => ttl.map(|ttl| {
                        let value = format!(
                            "{:016x}",
                            xxhash64(format!("{}{}", addrs.peer, addrs.local).as_bytes())
                        );
                        out.set_cookie =
                            set_cookie(name, &value, cookie_path, ttl, attributes).ok();
                        xxhash64(value.as_bytes())
                    }),
                },
                Method::SourceIp => Some(xxhash64(addrs.remote.ip().to_string().as_bytes())),
                Method::QueryParameter(name) => {
                    query_value(path, name).map(|v| xxhash64(v.as_bytes()))
                }
            };
            if let Some(n) = new {
                // Rotating the old value keeps equal policies from cancelling out.
                let old = out.hash.map_or(0, |h| h.rotate_left(1));
                out.hash = Some(old ^ n);
            }
            if *terminal && out.hash.is_some() {
                break;
            }
        }
        out
    }
}

/// Every value of the header (pseudo-headers as Envoy names them), rewritten, sorted, hashed
/// as one concatenation.
fn header_hash(
    headers: &HeaderMap,
    path: &str,
    name: &str,
    rewrite: &Option<(regex::Regex, String)>,
) -> Option<u64> {
    let mut values: Vec<String> = match name {
        ":authority" => headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(|v| vec![v.to_string()])
            .unwrap_or_default(),
        ":path" => vec![path.to_string()],
        _ => headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect(),
    };
    if values.is_empty() {
        return None;
    }
    if let Some((re, sub)) = rewrite {
        for v in &mut values {
            *v = re.replace_all(v, sub.as_str()).into_owned();
        }
    }
    values.sort();
    Some(xxhash64(values.concat().as_bytes()))
}

/// The first cookie of that name in the `cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// The first value of a query parameter, undecoded (as Envoy's `parseQueryString`).
fn query_value<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let query = path.split_once('?')?.1;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Envoy's `makeSetCookieValue`.
fn set_cookie(
    name: &str,
    value: &str,
    path: &str,
    ttl: std::time::Duration,
    attributes: &[(String, String)],
) -> Result<http::HeaderValue, http::header::InvalidHeaderValue> {
    let mut s = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        s.push_str(&format!("; Max-Age={}", ttl.as_secs()));
    }
    if !path.is_empty() {
        s.push_str(&format!("; Path={path}"));
    }
    for (k, v) in attributes {
        if v.is_empty() {
            s.push_str(&format!("; {k}"));
        } else {
            s.push_str(&format!("; {k}={v}"));
        }
    }
    s.push_str("; HttpOnly");
    http::HeaderValue::from_str(&s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(v: serde_json::Value) -> HashPolicy {
        let ps: Vec<PbHashPolicy> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                xds_client::TypeRegistry::global()
                    .from_json(p, false)
                    .expect("parses")
            })
            .collect();
        HashPolicy::compile(&ps, "r").unwrap().unwrap()
    }

    fn addrs() -> Addresses {
        Addresses {
            remote: "10.0.0.1:5000".parse().unwrap(),
            peer: "127.0.0.1:5000".parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
        }
    }

    #[test]
    fn xxhash_matches_the_reference() {
        // XXH64("", 0) from the xxHash test vectors.
        assert_eq!(xxhash64(b""), 0xef46db3751d8e999);
    }

    #[test]
    fn header_query_source_and_combination() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "jason".parse().unwrap());
        let p = policy(json!([{"header": {"header_name": "X-User"}}]));
        assert_eq!(p.hash(&h, "/", &addrs()).hash, Some(xxhash64(b"jason")));
        assert_eq!(p.hash(&HeaderMap::new(), "/", &addrs()).hash, None);
        let q = policy(json!([{"query_parameter": {"name": "u"}}]));
        assert_eq!(
            q.hash(&h, "/p?a=1&u=x%20y", &addrs()).hash,
            Some(xxhash64(b"x%20y"))
        );
        let s = policy(json!([{"connection_properties": {"source_ip": true}}]));
        assert_eq!(s.hash(&h, "/", &addrs()).hash, Some(xxhash64(b"10.0.0.1")));
        let both = policy(json!([
            {"header": {"header_name": "x-user"}},
            {"connection_properties": {"source_ip": true}}
        ]));
        let want = xxhash64(b"jason").rotate_left(1) ^ xxhash64(b"10.0.0.1");
        assert_eq!(both.hash(&h, "/", &addrs()).hash, Some(want));
        let terminal = policy(json!([
            {"header": {"header_name": "x-user"}, "terminal": true},
            {"connection_properties": {"source_ip": true}}
        ]));
        assert_eq!(
            terminal.hash(&h, "/", &addrs()).hash,
            Some(xxhash64(b"jason"))
        );
    }

    #[test]
    fn cookies_read_or_generated() {
        let p = policy(json!([{"cookie": {"name": "sticky", "ttl": "60s", "path": "/"}}]));
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; sticky=\"abc\"".parse().unwrap());
        let got = p.hash(&h, "/", &addrs());
        assert_eq!(got.hash, Some(xxhash64(b"abc")));
        assert!(got.set_cookie.is_none());
        let got = p.hash(&HeaderMap::new(), "/", &addrs());
        let c = got
            .set_cookie
            .expect("generated")
            .to_str()
            .unwrap()
            .to_string();
        let value = format!("{:016x}", xxhash64(b"127.0.0.1:5000127.0.0.1:80"));
        assert_eq!(
            c,
            format!("sticky=\"{value}\"; Max-Age=60; Path=/; HttpOnly")
        );
        assert_eq!(got.hash, Some(xxhash64(value.as_bytes())));
    }
}
