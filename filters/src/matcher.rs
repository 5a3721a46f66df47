//! Envoy's `StringMatcher`, `RegexMatcher` and route `HeaderMatcher`, compiled once.
//!
//! Regexes follow Envoy's RE2 semantics: the whole input must match (we anchor the pattern). The
//! `regex` crate shares RE2's syntax and linear-time guarantee; the differences are documented in
//! the README (Unicode classes are Unicode-aware by default, as with RE2's UTF-8 mode).

use regex::Regex;
use xds_client::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, HeaderMatcher,
};
use xds_client::pb::envoy::r#type::matcher::v3::{
    string_matcher::MatchPattern, RegexMatcher, StringMatcher as PbStringMatcher,
};

use crate::{invalid, FilterConfigError};

/// A full-match regex (RE2 `FullMatch` semantics).
#[derive(Debug, Clone)]
pub struct FullRegex {
    re: Regex,
    source: String,
}

impl FullRegex {
    pub fn new(pattern: &str, path: &str) -> Result<Self, FilterConfigError> {
        let re = Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| invalid(path, format!("invalid regex '{pattern}': {e}")))?;
        Ok(FullRegex {
            re,
            source: pattern.to_string(),
        })
    }
    pub fn from_proto(m: &RegexMatcher, path: &str) -> Result<Self, FilterConfigError> {
        FullRegex::new(&m.regex, &format!("{path}.regex"))
    }
    pub fn is_match(&self, s: &str) -> bool {
        self.re.is_match(s)
    }
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The unanchored pattern, for substitution (`regex_rewrite` replaces every match).
    pub fn unanchored(&self) -> Result<Regex, regex::Error> {
        Regex::new(&self.source)
    }
}

#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(FullRegex),
}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub struct StringMatcher {
    pattern: Pattern,
    ignore_case: bool,
}

impl StringMatcher {
    pub fn from_proto(m: &PbStringMatcher, path: &str) -> Result<Self, FilterConfigError> {
        let ic = m.ignore_case;
        let fold = |s: &str| {
            if ic {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        let pattern = match &m.match_pattern {
            Some(MatchPattern::Exact(s)) => Pattern::Exact(fold(s)),
            Some(MatchPattern::Prefix(s)) if !s.is_empty() => Pattern::Prefix(fold(s)),
            Some(MatchPattern::Suffix(s)) if !s.is_empty() => Pattern::Suffix(fold(s)),
            Some(MatchPattern::Contains(s)) if !s.is_empty() => Pattern::Contains(fold(s)),
            Some(MatchPattern::Prefix(_))
            | Some(MatchPattern::Suffix(_))
            | Some(MatchPattern::Contains(_)) => {
                return Err(invalid(path, "value length must be at least 1 characters"))
            }
            Some(MatchPattern::SafeRegex(r)) => {
                if ic {
                    return Err(invalid(path, "ignore_case has no effect for safe_regex."));
                }
                Pattern::Regex(FullRegex::from_proto(r, &format!("{path}.safe_regex"))?)
            }
            Some(MatchPattern::Custom(_)) => {
                return Err(invalid(
                    path,
                    "custom string matchers are not supported by Petrel",
                ))
            }
            None => return Err(invalid(path, "match_pattern is required")),
        };
        Ok(StringMatcher {
            pattern,
            ignore_case: ic,
        })
    }

    pub fn exact(s: &str) -> Self {
        StringMatcher {
            pattern: Pattern::Exact(s.to_string()),
            ignore_case: false,
        }
    }

    /// The value of an exact, case-sensitive matcher.
    pub fn exact_value(&self) -> Option<&str> {
        match &self.pattern {
            Pattern::Exact(p) if !self.ignore_case => Some(p),
            _ => None,
        }
    }

    pub fn matches(&self, input: &str) -> bool {
        if let Pattern::Regex(r) = &self.pattern {
            return r.is_match(input);
        }
        let folded;
        let s = if self.ignore_case {
            folded = input.to_ascii_lowercase();
            folded.as_str()
        } else {
            input
        };
        match &self.pattern {
            Pattern::Exact(p) => s == p,
            Pattern::Prefix(p) => s.starts_with(p.as_str()),
            Pattern::Suffix(p) => s.ends_with(p.as_str()),
            Pattern::Contains(p) => s.contains(p.as_str()),
            Pattern::Regex(_) => false,
        }
    }
}

#[derive(Debug, Clone)]
enum HeaderTest {
    String(StringMatcher),
    Range(i64, i64),
    Present(bool),
}

/// A header's values joined with `,` (Envoy's rule for matching a repeated header), or None.
pub fn joined_header(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let mut vals = headers.get_all(name).iter();
    let mut s = String::from_utf8_lossy(vals.next()?.as_bytes()).into_owned();
    for v in vals {
        s.push(',');
        s.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(s)
}

/// `envoy.config.route.v3.HeaderMatcher`.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lower-cased header name (pseudo-headers like `:method` included).
    pub name: String,
    test: HeaderTest,
    invert: bool,
    treat_missing_as_empty: bool,
}

impl HeaderMatch {
    pub fn from_proto(h: &HeaderMatcher, path: &str) -> Result<Self, FilterConfigError> {
        if h.name.is_empty() {
            return Err(invalid(
                format!("{path}.name"),
                "value length must be at least 1 characters",
            ));
        }
        let sm = |pattern: MatchPattern, ic: bool| {
            StringMatcher::from_proto(
                &PbStringMatcher {
                    ignore_case: ic,
                    match_pattern: Some(pattern),
                },
                path,
            )
        };
        let test = match &h.header_match_specifier {
            Some(HeaderMatchSpecifier::ExactMatch(s)) => {
                HeaderTest::String(sm(MatchPattern::Exact(s.clone()), false)?)
            }
            Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
                HeaderTest::String(sm(MatchPattern::SafeRegex(r.clone()), false)?)
            }
            Some(HeaderMatchSpecifier::RangeMatch(r)) => HeaderTest::Range(r.start, r.end),
            Some(HeaderMatchSpecifier::PresentMatch(p)) => HeaderTest::Present(*p),
            Some(HeaderMatchSpecifier::PrefixMatch(s)) => {
                HeaderTest::String(sm(MatchPattern::Prefix(s.clone()), false)?)
            }
            Some(HeaderMatchSpecifier::SuffixMatch(s)) => {
                HeaderTest::String(sm(MatchPattern::Suffix(s.clone()), false)?)
            }
            Some(HeaderMatchSpecifier::ContainsMatch(s)) => {
                HeaderTest::String(sm(MatchPattern::Contains(s.clone()), false)?)
            }
            Some(HeaderMatchSpecifier::StringMatch(m)) => HeaderTest::String(
                StringMatcher::from_proto(m, &format!("{path}.string_match"))?,
            ),
            // No specifier: Envoy treats it as a presence match.
            None => HeaderTest::Present(true),
        };
        Ok(HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            test,
            invert: h.invert_match,
            treat_missing_as_empty: h.treat_missing_header_as_empty,
        })
    }

    /// `value` is the header's values joined with `,` (Envoy's multi-value rule), or None.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = match value {
            None if self.treat_missing_as_empty => Some(""),
            v => v,
        };
        let result = match (&self.test, value) {
            (HeaderTest::Present(p), v) => {
                // invert_match on a present match flips presence, as in Envoy.
                return (v.is_some() == *p) != self.invert;
            }
            (_, None) => return false,
            (HeaderTest::String(m), Some(v)) => m.matches(v),
            (HeaderTest::Range(start, end), Some(v)) => v
                .parse::<i64>()
                .map(|n| n >= *start && n < *end)
                .unwrap_or(false),
        };
        result != self.invert
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sm(p: MatchPattern, ic: bool) -> StringMatcher {
        StringMatcher::from_proto(
            &PbStringMatcher {
                ignore_case: ic,
                match_pattern: Some(p),
            },
            "m",
        )
        .unwrap()
    }

    #[test]
    fn string_forms() {
        assert!(sm(MatchPattern::Exact("Ab".into()), false).matches("Ab"));
        assert!(!sm(MatchPattern::Exact("Ab".into()), false).matches("ab"));
        assert!(sm(MatchPattern::Exact("Ab".into()), true).matches("aB"));
        assert!(sm(MatchPattern::Prefix("/a".into()), false).matches("/abc"));
        assert!(sm(MatchPattern::Suffix("c".into()), false).matches("/abc"));
        assert!(sm(MatchPattern::Contains("b".into()), false).matches("/abc"));
        let re = sm(
            MatchPattern::SafeRegex(RegexMatcher {
                regex: "a+b".into(),
                ..Default::default()
            }),
            false,
        );
        assert!(re.matches("aab"));
        // Full match: a substring match is not enough.
        assert!(!re.matches("xaab"));
    }

    #[test]
    fn bad_regex_names_path() {
        let e = StringMatcher::from_proto(
            &PbStringMatcher {
                ignore_case: false,
                match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                    regex: "(".into(),
                    ..Default::default()
                })),
            },
            "routes[0].match.headers[0]",
        )
        .unwrap_err();
        assert!(e
            .to_string()
            .starts_with("routes[0].match.headers[0].safe_regex.regex: invalid regex"));
    }

    fn hm(spec: Option<HeaderMatchSpecifier>, invert: bool) -> HeaderMatch {
        HeaderMatch::from_proto(
            &HeaderMatcher {
                name: "X-Foo".into(),
                invert_match: invert,
                header_match_specifier: spec,
                ..Default::default()
            },
            "h",
        )
        .unwrap()
    }

    #[test]
    fn header_forms() {
        let present = hm(Some(HeaderMatchSpecifier::PresentMatch(true)), false);
        assert!(present.matches(Some("")));
        assert!(!present.matches(None));
        let absent = hm(Some(HeaderMatchSpecifier::PresentMatch(true)), true);
        assert!(absent.matches(None));
        let range = hm(
            Some(HeaderMatchSpecifier::RangeMatch(
                xds_client::pb::envoy::r#type::v3::Int64Range { start: 10, end: 20 },
            )),
            false,
        );
        assert!(range.matches(Some("10")) && range.matches(Some("19")));
        assert!(!range.matches(Some("20")) && !range.matches(Some("x")));
        let inv = hm(Some(HeaderMatchSpecifier::ExactMatch("a".into())), true);
        assert!(inv.matches(Some("b")));
        assert!(!inv.matches(Some("a")));
        // A missing header never matches a value test, inverted or not.
        assert!(!inv.matches(None));
        assert_eq!(present.name, "x-foo");
    }

    proptest! {
        #[test]
        fn prefix_agrees_with_starts_with(p in "[a-z/]{1,5}", s in "[a-z/]{0,10}") {
            prop_assert_eq!(sm(MatchPattern::Prefix(p.clone()), false).matches(&s), s.starts_with(&p));
        }

        #[test]
        fn ignore_case_exact_is_case_blind(s in "[a-zA-Z]{1,10}") {
            let m = sm(MatchPattern::Exact(s.to_ascii_uppercase()), true);
            prop_assert!(m.matches(&s.to_ascii_lowercase()));
        }

        #[test]
        fn literal_regex_is_exact(s in "[a-z]{1,10}", t in "[a-z]{0,10}") {
            let m = FullRegex::new(&regex::escape(&s), "r").unwrap();
            prop_assert_eq!(m.is_match(&t), s == t);
        }
    }
}

/// `envoy.config.core.v3.CidrRange`, compiled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    len: u8,
}

impl Cidr {
    pub fn from_proto(
        c: &xds_client::pb::envoy::config::core::v3::CidrRange,
        path: &str,
    ) -> Result<Cidr, FilterConfigError> {
        let addr: std::net::IpAddr = c.address_prefix.parse().map_err(|_| {
            invalid(
                format!("{path}.address_prefix"),
                format!("malformed IP address: {}", c.address_prefix),
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = c.prefix_len.as_ref().map(|v| v.value).unwrap_or(max);
        if len > max {
            return Err(invalid(
                format!("{path}.prefix_len"),
                format!("prefix length {len} is longer than the address"),
            ));
        }
        Ok(Cidr {
            addr,
            len: len as u8,
        })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        // An IPv4-mapped IPv6 peer matches IPv4 ranges, as Envoy compares them.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.len as u32)
                };
                (u32::from(a) & mask) == (u32::from(b) & mask)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.len as u32)
                };
                (u128::from(a) & mask) == (u128::from(b) & mask)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod cidr_tests {
    use super::*;
    use xds_client::pb::envoy::config::core::v3::CidrRange;
    use xds_client::pb::google::protobuf::UInt32Value;

    fn cidr(a: &str, len: u32) -> Cidr {
        Cidr::from_proto(
            &CidrRange {
                address_prefix: a.into(),
                prefix_len: Some(UInt32Value { value: len }),
            },
            "c",
        )
        .unwrap()
    }

    #[test]
    fn contains() {
        assert!(cidr("10.0.0.0", 8).contains("10.1.2.3".parse().unwrap()));
        assert!(!cidr("10.0.0.0", 8).contains("11.0.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0", 0).contains("1.2.3.4".parse().unwrap()));
        assert!(cidr("127.0.0.1", 32).contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(cidr("fd00::", 8).contains("fd12::1".parse().unwrap()));
        assert!(Cidr::from_proto(
            &CidrRange {
                address_prefix: "1.2.3.4".into(),
                prefix_len: Some(UInt32Value { value: 33 })
            },
            "c"
        )
        .is_err());
    }
}
