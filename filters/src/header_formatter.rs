//! Envoy's header value substitutions (`%DOWNSTREAM_REMOTE_ADDRESS%`, `%REQ(x)%`, …), compiled
//! once into parts, plus header mutation lists (`request_headers_to_add`/`_remove`).

use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use xds_client::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValueOption,
};

use crate::{invalid, FilterConfigError as ConfigError};

/// The chosen upstream host, once there is one.
#[derive(Clone, Copy)]
pub struct UpstreamInfo<'a> {
    /// The host's address as Envoy prints it (`ip:port`, or a Unix socket path).
    pub address: &'a dyn std::fmt::Display,
    /// The endpoint's `metadata.filter_metadata` as JSON (namespace → value).
    pub metadata: Option<&'a serde_json::Value>,
}

/// What a formatter may read from the stream.
pub struct FormatContext<'a> {
    pub downstream_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub protocol: &'static str,
    pub request_headers: Option<&'a HeaderMap>,
    pub upstream: Option<UpstreamInfo<'a>>,
    pub start_time: std::time::SystemTime,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamRemotePort,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    Protocol,
    Req(HeaderName),
    UpstreamRemoteAddress,
    UpstreamMetadata(Vec<String>),
    StartTime,
    Hostname(String),
    Environment(String),
}

/// A compiled header value.
#[derive(Debug, Clone, PartialEq)]
pub struct Formatter {
    parts: Vec<Part>,
}

impl Formatter {
    pub fn compile(src: &str, path: &str) -> Result<Formatter, ConfigError> {
        use crate::substitution::{tokenize, Token, TokenError};
        let unterminated = |what: &str| {
            invalid(
                path,
                format!("Invalid header configuration. Un-terminated variable expression '{what}'"),
            )
        };
        let tokens = tokenize(src).map_err(|e| match e {
            TokenError::Unterminated(_) => unterminated(src),
            TokenError::UnclosedArgument(raw) => unterminated(&raw),
        })?;
        let mut parts = Vec::with_capacity(tokens.len());
        for t in tokens {
            parts.push(match t {
                Token::Literal(l) => Part::Literal(l),
                // `%REQ(x):N%` truncation is refused rather than ignored.
                Token::Command {
                    max: Some(_), raw, ..
                } => return Err(unterminated(raw)),
                Token::Command { name, arg, raw, .. } => Self::command(name, arg, raw, path)?,
            });
        }
        Ok(Formatter { parts })
    }

    fn command(
        name: &str,
        arg: Option<&str>,
        token: &str,
        path: &str,
    ) -> Result<Part, ConfigError> {
        Ok(match (name, arg) {
            ("DOWNSTREAM_REMOTE_ADDRESS", None) => Part::DownstreamRemoteAddress,
            ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", None) => Part::DownstreamRemoteAddressWithoutPort,
            ("DOWNSTREAM_REMOTE_PORT", None) => Part::DownstreamRemotePort,
            ("DOWNSTREAM_LOCAL_ADDRESS", None) => Part::DownstreamLocalAddress,
            ("DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", None) => Part::DownstreamLocalAddressWithoutPort,
            ("DOWNSTREAM_LOCAL_PORT", None) => Part::DownstreamLocalPort,
            ("PROTOCOL", None) => Part::Protocol,
            ("UPSTREAM_REMOTE_ADDRESS", None) => Part::UpstreamRemoteAddress,
            ("UPSTREAM_METADATA", Some(arg)) => {
                // `["namespace", "key", ...]`: a JSON array of at least two strings.
                let keys: Vec<String> = serde_json::from_str(arg).map_err(|_| {
                    invalid(path, format!("Invalid header configuration. Expected format UPSTREAM_METADATA([\"namespace\", \"k\", ...]), actual format UPSTREAM_METADATA({arg})"))
                })?;
                if keys.len() < 2 {
                    return Err(invalid(path, format!("Invalid header configuration. Expected format UPSTREAM_METADATA([\"namespace\", \"k\", ...]), actual format UPSTREAM_METADATA({arg})")));
                }
                Part::UpstreamMetadata(keys)
            }
            ("START_TIME", None) => Part::StartTime,
            ("HOSTNAME", None) => Part::Hostname(hostname()),
            ("ENVIRONMENT", Some(var)) => Part::Environment(std::env::var(var).unwrap_or_default()),
            ("REQ", Some(h)) => {
                // `?alt` fallbacks are refused (the name is then invalid) rather than ignored.
                let name = HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map_err(|_| invalid(path, format!("Invalid header name in '%{token}%'")))?;
                Part::Req(name)
            }
            _ => {
                return Err(invalid(
                    path,
                    format!("Invalid header configuration. Format string contains unknown variable or a variable Petrel does not support: '%{token}%'"),
                ))
            }
        })
    }

    /// Whether the value reads request headers (`%REQ(…)%`).
    pub fn reads_request_headers(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Req(_)))
    }

    pub fn is_literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Literal(s)] => Some(s),
            _ => None,
        }
    }

    pub fn format(&self, ctx: &FormatContext<'_>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::DownstreamRemoteAddress => out.push_str(&ctx.downstream_remote.to_string()),
                Part::DownstreamRemoteAddressWithoutPort => {
                    out.push_str(&ctx.downstream_remote.ip().to_string())
                }
                Part::DownstreamRemotePort => {
                    out.push_str(&ctx.downstream_remote.port().to_string())
                }
                Part::DownstreamLocalAddress => out.push_str(&ctx.downstream_local.to_string()),
                Part::DownstreamLocalAddressWithoutPort => {
                    out.push_str(&ctx.downstream_local.ip().to_string())
                }
                Part::DownstreamLocalPort => out.push_str(&ctx.downstream_local.port().to_string()),
                Part::Protocol => out.push_str(ctx.protocol),
                Part::Req(h) => {
                    if let Some(v) = ctx.request_headers.and_then(|m| m.get(h)) {
                        out.push_str(v.to_str().unwrap_or(""));
                    }
                }
                Part::UpstreamRemoteAddress => {
                    if let Some(u) = ctx.upstream {
                        out.push_str(&u.address.to_string());
                    }
                }
                Part::UpstreamMetadata(keys) => {
                    let mut v = ctx.upstream.and_then(|u| u.metadata);
                    for k in keys {
                        v = v.and_then(|x| x.get(k));
                    }
                    match v {
                        Some(serde_json::Value::String(s)) => out.push_str(s),
                        Some(serde_json::Value::Null) | None => {}
                        Some(other) => out.push_str(&other.to_string()),
                    }
                }
                Part::StartTime => out.push_str(&crate::time::rfc3339_millis(ctx.start_time)),
                Part::Hostname(h) | Part::Environment(h) => out.push_str(h),
            }
        }
        out
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

#[derive(Debug, Clone)]
struct HeaderAdd {
    name: HeaderName,
    value: Formatter,
    action: AppendAction,
    keep_empty_value: bool,
}

/// One level's `*_headers_to_add` and `*_headers_to_remove`.
#[derive(Debug, Clone, Default)]
pub struct HeaderMutations {
    remove: Vec<HeaderName>,
    add: Vec<HeaderAdd>,
}

impl HeaderMutations {
    pub fn compile(
        add: &[HeaderValueOption],
        remove: &[String],
        path: &str,
    ) -> Result<HeaderMutations, ConfigError> {
        let mut out = HeaderMutations::default();
        for (i, r) in remove.iter().enumerate() {
            let p = format!("{path}_to_remove[{i}]");
            let name = HeaderName::from_bytes(r.to_ascii_lowercase().as_bytes())
                .map_err(|_| invalid(&p, format!("invalid header name '{r}'")))?;
            if r.starts_with(':') || name == http::header::HOST {
                return Err(invalid(
                    &p,
                    format!(":-prefixed or host headers may not be removed: '{r}'"),
                ));
            }
            out.remove.push(name);
        }
        for (i, o) in add.iter().enumerate() {
            let p = format!("{path}_to_add[{i}]");
            let Some(h) = &o.header else {
                return Err(invalid(&p, "header is required"));
            };
            let name =
                HeaderName::from_bytes(h.key.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    invalid(
                        format!("{p}.header.key"),
                        format!("invalid header name '{}'", h.key),
                    )
                })?;
            if h.key.starts_with(':') || name == http::header::HOST {
                return Err(invalid(
                    format!("{p}.header.key"),
                    format!(
                        ":-prefixed or host headers may not be modified: '{}'",
                        h.key
                    ),
                ));
            }
            let raw = if !h.raw_value.is_empty() {
                String::from_utf8(h.raw_value.clone())
                    .map_err(|_| invalid(format!("{p}.header.raw_value"), "not UTF-8"))?
            } else {
                h.value.clone()
            };
            let action = match (&o.append, HeaderAppendAction::try_from(o.append_action)) {
                (Some(_), Ok(a)) if a != HeaderAppendAction::AppendIfExistsOrAdd => {
                    return Err(invalid(
                        &p,
                        "Both append and append_action are set and it's not allowed",
                    ))
                }
                (Some(b), _) => {
                    if b.value {
                        AppendAction::AppendIfExistsOrAdd
                    } else {
                        AppendAction::OverwriteIfExistsOrAdd
                    }
                }
                (None, Ok(HeaderAppendAction::AppendIfExistsOrAdd)) => {
                    AppendAction::AppendIfExistsOrAdd
                }
                (None, Ok(HeaderAppendAction::AddIfAbsent)) => AppendAction::AddIfAbsent,
                (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => {
                    AppendAction::OverwriteIfExistsOrAdd
                }
                (None, Ok(HeaderAppendAction::OverwriteIfExists)) => {
                    AppendAction::OverwriteIfExists
                }
                (None, Err(_)) => {
                    return Err(invalid(format!("{p}.append_action"), "unknown enum value"))
                }
            };
            out.add.push(HeaderAdd {
                name,
                value: Formatter::compile(&raw, &format!("{p}.header.value"))?,
                action,
                keep_empty_value: o.keep_empty_value,
            });
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Whether applying these needs a copy of the request headers as they were.
    pub fn reads_request_headers(&self) -> bool {
        self.add.iter().any(|a| a.value.reads_request_headers())
    }

    /// Applies removals, then additions, as Envoy's `HeaderParser::evaluateHeaders` does.
    pub fn apply(&self, headers: &mut HeaderMap, ctx: &FormatContext<'_>) {
        for r in &self.remove {
            headers.remove(r);
        }
        for a in &self.add {
            let v = a.value.format(ctx);
            if v.is_empty() && !a.keep_empty_value {
                continue;
            }
            let Ok(value) = HeaderValue::from_str(&v) else {
                continue;
            };
            match a.action {
                AppendAction::AppendIfExistsOrAdd => {
                    headers.append(a.name.clone(), value);
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&a.name) {
                        headers.insert(a.name.clone(), value);
                    }
                }
                AppendAction::OverwriteIfExistsOrAdd => {
                    headers.insert(a.name.clone(), value);
                }
                AppendAction::OverwriteIfExists => {
                    if headers.contains_key(&a.name) {
                        headers.insert(a.name.clone(), value);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::pb::envoy::config::core::v3::HeaderValue as PbHeaderValue;

    fn ctx(h: Option<&HeaderMap>) -> FormatContext<'_> {
        FormatContext {
            downstream_remote: "10.0.0.1:5555".parse().unwrap(),
            downstream_local: "127.0.0.1:80".parse().unwrap(),
            protocol: "HTTP/1.1",
            request_headers: h,
            upstream: None,
            start_time: std::time::UNIX_EPOCH,
        }
    }

    #[test]
    fn substitutions() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("v"));
        let f = Formatter::compile(
            "ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %%lit%% %REQ(X-A)% %PROTOCOL% %DOWNSTREAM_LOCAL_PORT%",
            "p",
        )
        .unwrap();
        assert_eq!(f.format(&ctx(Some(&h))), "ip=10.0.0.1 %lit% v HTTP/1.1 80");
        assert_eq!(
            Formatter::compile("plain", "p").unwrap().is_literal(),
            Some("plain")
        );
    }

    #[test]
    fn upstream_metadata() {
        let md = serde_json::json!({"envoy.lb": {"version": "v2", "n": 3, "nested": {"a": true}}});
        let ctx = FormatContext {
            upstream: Some(UpstreamInfo {
                address: &"10.0.0.9:80",
                metadata: Some(&md),
            }),
            ..ctx(None)
        };
        let f = Formatter::compile(r#"%UPSTREAM_METADATA(["envoy.lb", "version"])%/%UPSTREAM_METADATA(["envoy.lb", "n"])%/%UPSTREAM_METADATA(["envoy.lb", "nested"])%/%UPSTREAM_METADATA(["x", "y"])%"#, "p").unwrap();
        assert_eq!(f.format(&ctx), r#"v2/3/{"a":true}/"#);
        assert!(Formatter::compile(r#"%UPSTREAM_METADATA(["only"])%"#, "p").is_err());
    }

    #[test]
    fn unknown_and_unterminated_are_refused() {
        assert!(Formatter::compile("%NOPE%", "p").is_err());
        assert!(Formatter::compile("%DOWNSTREAM_REMOTE_ADDRESS", "p").is_err());
    }

    fn opt(k: &str, v: &str, action: HeaderAppendAction, keep: bool) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(PbHeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            append_action: action as i32,
            keep_empty_value: keep,
            ..Default::default()
        }
    }

    #[test]
    fn append_actions() {
        let m = HeaderMutations::compile(
            &[
                opt("a", "1", HeaderAppendAction::AppendIfExistsOrAdd, false),
                opt("b", "2", HeaderAppendAction::AddIfAbsent, false),
                opt("c", "3", HeaderAppendAction::OverwriteIfExistsOrAdd, false),
                opt("d", "4", HeaderAppendAction::OverwriteIfExists, false),
                opt("e", "", HeaderAppendAction::AppendIfExistsOrAdd, false),
                opt("f", "", HeaderAppendAction::AppendIfExistsOrAdd, true),
            ],
            &["gone".into()],
            "request_headers",
        )
        .unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in [("a", "0"), ("b", "0"), ("c", "0"), ("gone", "x")] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m.apply(&mut h, &ctx(None));
        let all = |k: &str| {
            h.get_all(k)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("a"), ["0", "1"]);
        assert_eq!(all("b"), ["0"]);
        assert_eq!(all("c"), ["3"]);
        assert!(all("d").is_empty());
        assert!(all("e").is_empty());
        assert_eq!(all("f"), [""]);
        assert!(all("gone").is_empty());
    }

    #[test]
    fn host_and_pseudo_headers_refused() {
        assert!(HeaderMutations::compile(
            &[opt(
                ":path",
                "x",
                HeaderAppendAction::AppendIfExistsOrAdd,
                false
            )],
            &[],
            "r"
        )
        .is_err());
        assert!(HeaderMutations::compile(&[], &["host".into()], "r").is_err());
    }
}
