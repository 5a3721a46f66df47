//! Envoy's substitution formatter (`SubstitutionFormatString`): text and JSON formats with
//! command operators, compiled once. Used by `local_reply_config` and by access logs.
//!
//! Missing values render as `-` in text and `null` in JSON (typed), as Envoy renders them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};
use xds_client::pb::envoy::config::core::v3::{
    substitution_format_string::Format, SubstitutionFormatString,
};

use crate::config::{invalid, reject_unhandled, ConfigError};

/// The request line, which Envoy keeps as pseudo-headers in the same map.
#[derive(Clone, Copy, Default)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
}

/// What the stream learnt about its upstream.
#[derive(Clone, Copy, Default)]
pub struct UpstreamValues<'a> {
    pub cluster: Option<&'a str>,
    /// The cluster's `alt_stat_name` when it has one (`%UPSTREAM_CLUSTER%`).
    pub cluster_stat_name: Option<&'a str>,
    pub host: Option<&'a crate::upstream::cluster::HostAddress>,
    pub local: Option<SocketAddr>,
    pub transport_failure_reason: Option<&'a str>,
    pub attempts: u32,
    pub tls: Option<&'a crate::tls::info::TlsInfo>,
}

/// What a format may read about one stream (or, for TCP, one connection).
pub struct StreamValues<'a> {
    pub request_headers: Option<&'a HeaderMap>,
    pub request_line: Option<RequestLine<'a>>,
    pub response_headers: Option<&'a HeaderMap>,
    pub response_trailers: Option<&'a HeaderMap>,
    /// 0 when no response was sent.
    pub response_code: u16,
    pub response_flags: &'a str,
    pub response_code_details: &'a str,
    pub connection_termination_details: &'a str,
    pub local_reply_body: &'a str,
    /// Empty for a TCP connection.
    pub protocol: &'a str,
    pub start_time: SystemTime,
    /// After `x-forwarded-for` processing.
    pub downstream_remote: SocketAddr,
    /// The peer of the connection.
    pub downstream_direct_remote: SocketAddr,
    pub downstream_local: SocketAddr,
    pub requested_server_name: &'a str,
    pub route_name: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Option<Duration>,
    pub upstream: UpstreamValues<'a>,
    pub connection_id: u64,
    /// The downstream connection's TLS, when Petrel terminated it.
    pub downstream_tls: Option<&'a crate::tls::info::TlsInfo>,
    pub dynamic_metadata: Option<&'a petrel_filters::http_filter::DynamicMetadata>,
    /// The connection's filter state.
    pub filter_state: Option<&'a petrel_filters::filter_state::FilterState>,
}

impl<'a> StreamValues<'a> {
    /// A stream with nothing known but when and where it started.
    pub fn new(start_time: SystemTime, remote: SocketAddr, local: SocketAddr) -> Self {
        StreamValues {
            request_headers: None,
            request_line: None,
            response_headers: None,
            response_trailers: None,
            response_code: 0,
            response_flags: "",
            response_code_details: "",
            connection_termination_details: "",
            local_reply_body: "",
            protocol: "",
            start_time,
            downstream_remote: remote,
            downstream_direct_remote: remote,
            downstream_local: local,
            requested_server_name: "",
            route_name: "",
            bytes_received: 0,
            bytes_sent: 0,
            duration: None,
            upstream: UpstreamValues::default(),
            connection_id: 0,
            downstream_tls: None,
            dynamic_metadata: None,
            filter_state: None,
        }
    }
}

/// A header operand: a pseudo-header of the request line, or a header name.
#[derive(Debug, Clone, PartialEq)]
enum HeaderKey {
    Method,
    Path,
    Authority,
    Scheme,
    Status,
    Name(HeaderName),
}

/// Which part of an address an operator prints.
#[derive(Debug, Clone, Copy, PartialEq)]
enum AddrPart {
    Full,
    Ip,
    Port,
}

/// Which address an operator reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Addr {
    DownstreamRemote,
    DownstreamDirectRemote,
    DownstreamLocal,
    UpstreamHost,
    /// The peer of the upstream connection: none when no connection was made.
    UpstreamRemote,
    UpstreamLocal,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Headers {
    Request,
    Response,
    Trailers,
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Literal(String),
    Header {
        from: Headers,
        key: HeaderKey,
        alt: Option<HeaderKey>,
        max: Option<usize>,
    },
    ResponseCode,
    ResponseFlags,
    ResponseFlagsLong,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    LocalReplyBody,
    Protocol,
    StartTime(Option<TimeFormat>),
    Address(Addr, AddrPart),
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamCluster,
    UpstreamClusterRaw,
    UpstreamTransportFailureReason,
    UpstreamRequestAttemptCount,
    RequestedServerName,
    RouteName,
    Hostname,
    ConnectionId,
    /// A TLS connection's fact (`-` on plaintext connections, as Envoy prints it).
    Tls {
        upstream: bool,
        field: TlsField,
    },
    /// `DYNAMIC_METADATA(namespace:key:…)`: a namespace, or a value inside it.
    DynamicMetadata {
        namespace: String,
        path: Vec<String>,
    },
    /// `FILTER_STATE(key[:PLAIN|:TYPED])`: an object's string form (PLAIN) or its proto form
    /// as JSON (TYPED, the default).
    FilterState {
        key: String,
        plain: bool,
        max: Option<usize>,
    },
}

/// `%START_TIME(...)%`'s strftime subset, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeFormat(Vec<TimePart>);

#[derive(Debug, Clone, PartialEq)]
enum TimePart {
    Lit(String),
    Year,
    Year2,
    Month,
    Day,
    DaySpace,
    Hour,
    Minute,
    Second,
    DayOfYear,
    MonthName,
    WeekdayName,
    EpochSeconds,
    /// `%f` / `%Nf`: fractional seconds to N digits.
    Fraction(usize),
    /// `%ENS`: seconds with N fractional digits.
    SecondsFraction(usize),
    Zone,
    ZoneName,
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];

impl TimeFormat {
    fn compile(src: &str, path: &str) -> Result<TimeFormat, ConfigError> {
        use TimePart::*;
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = src.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                lit.push(c);
                continue;
            }
            let Some(spec) = chars.next() else {
                lit.push('%');
                break;
            };
            let part = match spec {
                '%' => {
                    lit.push('%');
                    continue;
                }
                'Y' => Year,
                'y' => Year2,
                'm' => Month,
                'd' => Day,
                'e' => DaySpace,
                'H' => Hour,
                'M' => Minute,
                'S' => Second,
                'j' => DayOfYear,
                'b' | 'h' => MonthName,
                'a' => WeekdayName,
                's' => EpochSeconds,
                'z' => Zone,
                'Z' => ZoneName,
                'f' => Fraction(9),
                'T' | 'F' | 'D' | 'R' => {
                    let expanded = match spec {
                        'T' => "%H:%M:%S",
                        'F' => "%Y-%m-%d",
                        'D' => "%m/%d/%y",
                        _ => "%H:%M",
                    };
                    if !lit.is_empty() {
                        parts.push(Lit(std::mem::take(&mut lit)));
                    }
                    parts.extend(TimeFormat::compile(expanded, path)?.0);
                    continue;
                }
                d @ '1'..='9' if chars.peek() == Some(&'f') => {
                    chars.next();
                    Fraction(d as usize - '0' as usize)
                }
                'E' => {
                    let d = chars.next();
                    match (d, chars.next()) {
                        (Some(d @ '1'..='9'), Some('S')) => SecondsFraction(d as usize - '0' as usize),
                        (Some('*'), Some('S')) => SecondsFraction(9),
                        _ => return Err(invalid(path, format!("unsupported time format in '{src}'"))),
                    }
                }
                other => {
                    return Err(invalid(
                        path,
                        format!("unsupported time format specifier '%{other}' in '{src}' (Petrel renders UTC with %Y %y %m %d %e %H %M %S %j %b %a %s %z %Z %f %Nf %ENS %T %F %D %R)"),
                    ))
                }
            };
            if !lit.is_empty() {
                parts.push(Lit(std::mem::take(&mut lit)));
            }
            parts.push(part);
        }
        if !lit.is_empty() {
            parts.push(Lit(lit));
        }
        Ok(TimeFormat(parts))
    }

    fn render(&self, t: SystemTime, out: &mut String) {
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs() as i64;
        let (y, mo, da, h, mi, s) = petrel_filters::time::civil_from_unix(secs);
        let nanos = d.subsec_nanos();
        let frac = |n: usize| format!("{nanos:09}")[..n].to_string();
        for p in &self.0 {
            let _ = match p {
                TimePart::Lit(l) => write!(out, "{l}"),
                TimePart::Year => write!(out, "{y:04}"),
                TimePart::Year2 => write!(out, "{:02}", y.rem_euclid(100)),
                TimePart::Month => write!(out, "{mo:02}"),
                TimePart::Day => write!(out, "{da:02}"),
                TimePart::DaySpace => write!(out, "{da:2}"),
                TimePart::Hour => write!(out, "{h:02}"),
                TimePart::Minute => write!(out, "{mi:02}"),
                TimePart::Second => write!(out, "{s:02}"),
                TimePart::DayOfYear => {
                    let (y0, ..) = petrel_filters::time::civil_from_unix(secs);
                    let jan1 = days_from_civil(y0);
                    write!(out, "{:03}", secs.div_euclid(86_400) - jan1 + 1)
                }
                TimePart::MonthName => write!(out, "{}", MONTHS[(mo - 1) as usize]),
                TimePart::WeekdayName => {
                    write!(
                        out,
                        "{}",
                        WEEKDAYS[secs.div_euclid(86_400).rem_euclid(7) as usize]
                    )
                }
                TimePart::EpochSeconds => write!(out, "{secs}"),
                TimePart::Fraction(n) => write!(out, "{}", frac(*n)),
                TimePart::SecondsFraction(n) => write!(out, "{s:02}.{}", frac(*n)),
                TimePart::Zone => write!(out, "+0000"),
                TimePart::ZoneName => write!(out, "UTC"),
            };
        }
    }
}

/// Days since the epoch of 1 January of `year`.
fn days_from_civil(year: i64) -> i64 {
    let y = year - 1;
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    // 1 January is day 306 of the March-based year before it.
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + 306;
    era * 146_097 + doe - 719_468
}

/// A compiled text format.
#[derive(Debug, Clone, PartialEq)]
pub struct TextFormat {
    ops: Vec<Op>,
}

fn header_key(s: &str, path: &str) -> Result<HeaderKey, ConfigError> {
    let lower = s.to_ascii_lowercase();
    Ok(match lower.as_str() {
        ":method" => HeaderKey::Method,
        ":path" => HeaderKey::Path,
        ":authority" => HeaderKey::Authority,
        ":scheme" => HeaderKey::Scheme,
        ":status" => HeaderKey::Status,
        _ => HeaderKey::Name(
            HeaderName::from_bytes(lower.as_bytes())
                .map_err(|_| invalid(path, format!("Invalid header name '{s}'")))?,
        ),
    })
}

fn header_operands(arg: &str, path: &str) -> Result<(HeaderKey, Option<HeaderKey>), ConfigError> {
    let (main, alt) = match arg.split_once('?') {
        Some((m, a)) => (m, Some(header_key(a, path)?)),
        None => (arg, None),
    };
    Ok((header_key(main, path)?, alt))
}

/// A TLS fact an operator prints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TlsField {
    PeerUriSan,
    LocalUriSan,
    PeerDnsSan,
    LocalDnsSan,
    PeerSubject,
    LocalSubject,
    PeerIssuer,
    PeerSerial,
    PeerFingerprint256,
    Version,
    Cipher,
}

/// `DOWNSTREAM_…`/`UPSTREAM_…` TLS operators.
fn tls_op(name: &str) -> Option<Op> {
    let (upstream, rest) = if let Some(r) = name.strip_prefix("DOWNSTREAM_") {
        (false, r)
    } else {
        (true, name.strip_prefix("UPSTREAM_")?)
    };
    let field = match rest {
        "PEER_URI_SAN" => TlsField::PeerUriSan,
        "LOCAL_URI_SAN" => TlsField::LocalUriSan,
        "PEER_DNS_SAN" => TlsField::PeerDnsSan,
        "LOCAL_DNS_SAN" => TlsField::LocalDnsSan,
        "PEER_SUBJECT" => TlsField::PeerSubject,
        "LOCAL_SUBJECT" => TlsField::LocalSubject,
        "PEER_ISSUER" => TlsField::PeerIssuer,
        "PEER_SERIAL" => TlsField::PeerSerial,
        "PEER_FINGERPRINT_256" => TlsField::PeerFingerprint256,
        "TLS_VERSION" => TlsField::Version,
        "TLS_CIPHER" => TlsField::Cipher,
        _ => return None,
    };
    Some(Op::Tls { upstream, field })
}

fn tls_value(t: &crate::tls::info::TlsInfo, field: TlsField) -> Option<String> {
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let list = |l: &Vec<String>| (!l.is_empty()).then(|| l.join(","));
    match field {
        TlsField::PeerUriSan => t.peer.as_ref().and_then(|c| list(&c.uri_sans)),
        TlsField::LocalUriSan => t.local.as_ref().and_then(|c| list(&c.uri_sans)),
        TlsField::PeerDnsSan => t.peer.as_ref().and_then(|c| list(&c.dns_sans)),
        TlsField::LocalDnsSan => t.local.as_ref().and_then(|c| list(&c.dns_sans)),
        TlsField::PeerSubject => t.peer.as_ref().and_then(|c| nonempty(&c.subject)),
        TlsField::LocalSubject => t.local.as_ref().and_then(|c| nonempty(&c.subject)),
        TlsField::PeerIssuer => t.peer.as_ref().and_then(|c| nonempty(&c.issuer)),
        TlsField::PeerSerial => t.peer.as_ref().and_then(|c| nonempty(&c.serial)),
        TlsField::PeerFingerprint256 => t.peer.as_ref().and_then(|c| nonempty(&c.fingerprint_256)),
        TlsField::Version => nonempty(t.version),
        TlsField::Cipher => nonempty(t.cipher),
    }
}

fn address_op(name: &str) -> Option<Op> {
    let (base, part) = if let Some(b) = name.strip_suffix("_ADDRESS_WITHOUT_PORT") {
        (b, AddrPart::Ip)
    } else if let Some(b) = name.strip_suffix("_ADDRESS") {
        (b, AddrPart::Full)
    } else if let Some(b) = name.strip_suffix("_PORT") {
        (b, AddrPart::Port)
    } else if name == "UPSTREAM_HOST" {
        ("UPSTREAM_HOST", AddrPart::Full)
    } else {
        return None;
    };
    let addr = match base {
        "DOWNSTREAM_REMOTE" => Addr::DownstreamRemote,
        "DOWNSTREAM_DIRECT_REMOTE" => Addr::DownstreamDirectRemote,
        "DOWNSTREAM_LOCAL" => Addr::DownstreamLocal,
        "UPSTREAM_HOST" => Addr::UpstreamHost,
        "UPSTREAM_REMOTE" => Addr::UpstreamRemote,
        "UPSTREAM_LOCAL" => Addr::UpstreamLocal,
        _ => return None,
    };
    Some(Op::Address(addr, part))
}

/// A value as the JSON format types it.
enum Value<'v> {
    Str(std::borrow::Cow<'v, str>),
    Num(u64),
    /// A typed filter state object: JSON text in a text format, itself in a JSON one.
    Json(&'v serde_json::Value),
}

fn unsupported_operator(name: &str, path: &str) -> ConfigError {
    invalid(
        path,
        format!("Not supported field in StreamInfo: {name} (command operator not supported by Petrel yet)"),
    )
}

impl TextFormat {
    pub fn compile(src: &str, path: &str) -> Result<TextFormat, ConfigError> {
        use petrel_filters::substitution::{tokenize, Token, TokenError};
        let tokens = tokenize(src).map_err(|e| match e {
            TokenError::Unterminated(at) => invalid(
                path,
                format!(
                    "Incorrect configuration: {src}. Couldn't find valid command at position {at}"
                ),
            ),
            TokenError::UnclosedArgument(raw) => {
                invalid(path, format!("Incorrect configuration: %{raw}%"))
            }
        })?;
        let mut ops = Vec::with_capacity(tokens.len());
        for t in tokens {
            ops.push(match t {
                Token::Literal(l) => Op::Literal(l),
                Token::Command { name, arg, max, .. } => Self::command(name, arg, max, path)?,
            });
        }
        Ok(TextFormat { ops })
    }

    fn command(
        name: &str,
        arg: Option<&str>,
        max: Option<&str>,
        path: &str,
    ) -> Result<Op, ConfigError> {
        let max = match max {
            Some(m) => Some(
                m.parse::<usize>()
                    .map_err(|_| invalid(path, format!("Length must be an integer, given: {m}")))?,
            ),
            None => None,
        };
        let headers = |from: Headers, a: &str| -> Result<Op, ConfigError> {
            let (key, alt) = header_operands(a, path)?;
            Ok(Op::Header {
                from,
                key,
                alt,
                max,
            })
        };
        Ok(match (name, arg) {
            ("REQ", Some(a)) => headers(Headers::Request, a)?,
            ("RESP", Some(a)) => headers(Headers::Response, a)?,
            ("TRAILER", Some(a)) => headers(Headers::Trailers, a)?,
            ("RESPONSE_CODE", None) => Op::ResponseCode,
            ("RESPONSE_FLAGS", None) => Op::ResponseFlags,
            ("RESPONSE_FLAGS_LONG", None) => Op::ResponseFlagsLong,
            ("RESPONSE_CODE_DETAILS", None) => Op::ResponseCodeDetails,
            ("CONNECTION_TERMINATION_DETAILS", None) => Op::ConnectionTerminationDetails,
            ("LOCAL_REPLY_BODY", None) => Op::LocalReplyBody,
            ("PROTOCOL", None) => Op::Protocol,
            ("START_TIME", None) => Op::StartTime(None),
            ("START_TIME", Some(f)) => Op::StartTime(Some(TimeFormat::compile(f, path)?)),
            ("BYTES_RECEIVED", None) => Op::BytesReceived,
            ("BYTES_SENT", None) => Op::BytesSent,
            ("DURATION", None) => Op::Duration,
            ("UPSTREAM_CLUSTER", None) => Op::UpstreamCluster,
            ("UPSTREAM_CLUSTER_RAW", None) => Op::UpstreamClusterRaw,
            ("UPSTREAM_TRANSPORT_FAILURE_REASON", None) => Op::UpstreamTransportFailureReason,
            ("UPSTREAM_REQUEST_ATTEMPT_COUNT", None) => Op::UpstreamRequestAttemptCount,
            ("REQUESTED_SERVER_NAME", None) => Op::RequestedServerName,
            ("ROUTE_NAME", None) => Op::RouteName,
            ("HOSTNAME", None) => Op::Hostname,
            ("CONNECTION_ID", None) => Op::ConnectionId,
            ("DYNAMIC_METADATA", Some(a)) => {
                let mut parts = a.split(':').map(str::to_string);
                Op::DynamicMetadata {
                    namespace: parts.next().unwrap_or_default(),
                    path: parts.collect(),
                }
            }
            ("FILTER_STATE", Some(a)) => {
                let (key, kind) = a.split_once(':').unwrap_or((a, ""));
                let plain =
                    match kind {
                        "PLAIN" => true,
                        "" | "TYPED" => false,
                        k if k.starts_with("FIELD") || k.contains(':') => {
                            return Err(ConfigError::Unsupported {
                                path: path.into(),
                                fields: format!("'%FILTER_STATE({a})%' (the FIELD form)"),
                            })
                        }
                        _ => return Err(invalid(
                            path,
                            "Invalid filter state serialize type, only support PLAIN/TYPED/FIELD.",
                        )),
                    };
                Op::FilterState {
                    key: key.to_string(),
                    plain,
                    max,
                }
            }
            (n, None) => match tls_op(n).or_else(|| address_op(n)) {
                Some(op) => op,
                None => return Err(unsupported_operator(name, path)),
            },
            _ => return Err(unsupported_operator(name, path)),
        })
    }

    fn header<'v>(
        v: &StreamValues<'v>,
        from: Headers,
        key: &HeaderKey,
    ) -> Option<std::borrow::Cow<'v, str>> {
        let line = v.request_line.unwrap_or_default();
        let pseudo = |s: &'v str| (!s.is_empty()).then_some(std::borrow::Cow::Borrowed(s));
        match (from, key) {
            (Headers::Request, HeaderKey::Method) => pseudo(line.method),
            (Headers::Request, HeaderKey::Path) => pseudo(line.path),
            (Headers::Request, HeaderKey::Authority) => pseudo(line.authority),
            (Headers::Request, HeaderKey::Scheme) => pseudo(line.scheme),
            (Headers::Response, HeaderKey::Status) if v.response_headers.is_some() => {
                Some(v.response_code.to_string().into())
            }
            (_, HeaderKey::Name(n)) => {
                let map = match from {
                    Headers::Request => v.request_headers,
                    Headers::Response => v.response_headers,
                    Headers::Trailers => v.response_trailers,
                }?;
                map.get(n)
                    .map(|val| String::from_utf8_lossy(val.as_bytes()))
            }
            _ => None,
        }
    }

    fn truncate<'v>(
        s: std::borrow::Cow<'v, str>,
        max: &Option<usize>,
    ) -> std::borrow::Cow<'v, str> {
        match max {
            Some(m) if s.len() > *m => {
                let mut end = *m;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s[..end].to_string().into()
            }
            _ => s,
        }
    }

    fn op_value<'v>(op: &'v Op, v: &StreamValues<'v>) -> Option<Value<'v>> {
        use std::borrow::Cow;
        let text = |s: &'v str| (!s.is_empty()).then_some(Value::Str(Cow::Borrowed(s)));
        let addr = |a: Option<SocketAddr>, part: AddrPart| {
            a.map(|a| {
                Value::Str(Cow::Owned(match part {
                    AddrPart::Full => a.to_string(),
                    AddrPart::Ip => a.ip().to_string(),
                    AddrPart::Port => a.port().to_string(),
                }))
            })
        };
        match op {
            Op::Literal(s) => Some(Value::Str(Cow::Borrowed(s))),
            Op::Header {
                from,
                key,
                alt,
                max,
            } => Self::header(v, *from, key)
                .or_else(|| alt.as_ref().and_then(|a| Self::header(v, *from, a)))
                .map(|s| Value::Str(Self::truncate(s, max))),
            Op::ResponseCode => Some(Value::Num(v.response_code.into())),
            Op::ResponseFlags => Some(Value::Str(Cow::Borrowed(if v.response_flags.is_empty() {
                "-"
            } else {
                v.response_flags
            }))),
            Op::ResponseFlagsLong => Some(Value::Str(Cow::Owned(long_flags(v.response_flags)))),
            Op::ResponseCodeDetails => text(v.response_code_details),
            Op::ConnectionTerminationDetails => text(v.connection_termination_details),
            Op::LocalReplyBody => Some(Value::Str(Cow::Borrowed(v.local_reply_body))),
            Op::Protocol => text(v.protocol),
            Op::StartTime(None) => Some(Value::Str(Cow::Owned(crate::http::date::rfc3339_millis(
                v.start_time,
            )))),
            Op::StartTime(Some(f)) => {
                let mut s = String::new();
                f.render(v.start_time, &mut s);
                Some(Value::Str(Cow::Owned(s)))
            }
            Op::Address(which, part) => {
                use crate::upstream::cluster::HostAddress;
                let a = match which {
                    Addr::DownstreamRemote => Some(v.downstream_remote),
                    Addr::DownstreamDirectRemote => Some(v.downstream_direct_remote),
                    Addr::DownstreamLocal => Some(v.downstream_local),
                    Addr::UpstreamRemote if v.upstream.local.is_none() => None,
                    Addr::UpstreamHost | Addr::UpstreamRemote => match v.upstream.host {
                        Some(HostAddress::Ip(a)) => Some(*a),
                        // A pipe is its path, whole or "without port", and has no port.
                        Some(HostAddress::Pipe(p)) if *part != AddrPart::Port => {
                            return Some(Value::Str(Cow::Borrowed(p)))
                        }
                        _ => None,
                    },
                    Addr::UpstreamLocal => v.upstream.local,
                };
                addr(a, *part)
            }
            Op::BytesReceived => Some(Value::Num(v.bytes_received)),
            Op::BytesSent => Some(Value::Num(v.bytes_sent)),
            Op::Duration => v.duration.map(|d| Value::Num(d.as_millis() as u64)),
            Op::UpstreamCluster => v
                .upstream
                .cluster_stat_name
                .or(v.upstream.cluster)
                .and_then(text),
            Op::UpstreamClusterRaw => v.upstream.cluster.and_then(text),
            Op::UpstreamTransportFailureReason => {
                v.upstream.transport_failure_reason.and_then(text)
            }
            Op::UpstreamRequestAttemptCount => Some(Value::Num(v.upstream.attempts.into())),
            Op::RequestedServerName => text(v.requested_server_name),
            Op::RouteName => text(v.route_name),
            Op::Hostname => text(crate::local_info::hostname()),
            Op::ConnectionId => Some(Value::Num(v.connection_id)),
            Op::Tls { upstream, field } => {
                let t = if *upstream {
                    v.upstream.tls
                } else {
                    v.downstream_tls
                };
                t.and_then(|t| tls_value(t, *field))
                    .map(|s| Value::Str(Cow::Owned(s)))
            }
            Op::DynamicMetadata { namespace, path } => {
                let ns = v.dynamic_metadata?.get(namespace)?;
                let mut value: &serde_json::Value = match path.split_first() {
                    // A whole namespace prints as JSON with its keys sorted (a protobuf
                    // Struct's map order, as Envoy prints it).
                    None => {
                        let sorted: std::collections::BTreeMap<_, _> = ns.iter().collect();
                        let text = serde_json::to_string(&sorted).unwrap_or_default();
                        return Some(Value::Str(Cow::Owned(text)));
                    }
                    Some((first, _)) => ns.get(first)?,
                };
                for key in path.iter().skip(1) {
                    value = value.get(key)?;
                }
                Some(Value::Str(match value {
                    serde_json::Value::String(s) => Cow::Owned(s.clone()),
                    other => Cow::Owned(other.to_string()),
                }))
            }
            Op::FilterState { key, plain, max } => {
                let o = v.filter_state?.get(key)?;
                if *plain {
                    Some(Value::Str(Self::truncate(Cow::Borrowed(&o.plain), max)))
                } else {
                    o.proto.as_ref().map(Value::Json)
                }
            }
        }
    }

    /// Whether every operator has a value in a local reply's body format (where Petrel knows the
    /// request headers, the reply and the downstream, but not the request line or the
    /// upstream).
    fn fits_local_reply(&self) -> bool {
        self.ops.iter().all(|op| match op {
            Op::Header { from, key, alt, .. } => {
                let plain = |k: &HeaderKey| matches!(k, HeaderKey::Name(_));
                *from != Headers::Trailers && plain(key) && alt.as_ref().is_none_or(plain)
            }
            Op::Address(a, _) => matches!(
                a,
                Addr::DownstreamRemote | Addr::DownstreamDirectRemote | Addr::DownstreamLocal
            ),
            Op::Literal(_)
            | Op::ResponseCode
            | Op::ResponseFlags
            | Op::ResponseFlagsLong
            | Op::ResponseCodeDetails
            | Op::LocalReplyBody
            | Op::Protocol
            | Op::StartTime(_)
            | Op::Hostname => true,
            _ => false,
        })
    }

    /// Appends the formatted text to `out`.
    pub fn write(&self, v: &StreamValues<'_>, out: &mut String) {
        self.write_missing_as(v, out, "-");
    }

    /// Appends the formatted text, an absent value written as `missing` (`-`, or nothing under
    /// `omit_empty_values`).
    fn write_missing_as(&self, v: &StreamValues<'_>, out: &mut String, missing: &str) {
        for op in &self.ops {
            match Self::op_value(op, v) {
                Some(Value::Str(s)) => out.push_str(&s),
                Some(Value::Num(n)) => {
                    let _ = write!(out, "{n}");
                }
                Some(Value::Json(j)) => {
                    let _ = write!(out, "{j}");
                }
                None => out.push_str(missing),
            }
        }
    }

    pub fn format(&self, v: &StreamValues<'_>) -> String {
        let mut out = String::new();
        self.write(v, &mut out);
        out
    }

    /// A JSON value: a lone operator keeps its type (numbers stay numbers), text otherwise.
    fn json_value(&self, v: &StreamValues<'_>) -> serde_json::Value {
        match self.ops.as_slice() {
            [op] if !matches!(op, Op::Literal(_)) => match Self::op_value(op, v) {
                Some(Value::Str(s)) => serde_json::Value::String(s.into_owned()),
                Some(Value::Num(n)) => serde_json::Value::from(n),
                Some(Value::Json(j)) => j.clone(),
                None => serde_json::Value::Null,
            },
            _ => serde_json::Value::String(self.format(v)),
        }
    }
}

/// Envoy's long response flag names, for `%RESPONSE_FLAGS_LONG%`.
const LONG_FLAGS: &[(&str, &str)] = &[
    ("LH", "FailedLocalHealthCheck"),
    ("UH", "NoHealthyUpstream"),
    ("UT", "UpstreamRequestTimeout"),
    ("LR", "LocalReset"),
    ("UR", "UpstreamRemoteReset"),
    ("UF", "UpstreamConnectionFailure"),
    ("UC", "UpstreamConnectionTermination"),
    ("UO", "UpstreamOverflow"),
    ("NR", "NoRouteFound"),
    ("DI", "DelayInjected"),
    ("FI", "FaultInjected"),
    ("RL", "RateLimited"),
    ("UAEX", "UnauthorizedExternalService"),
    ("RLSE", "RateLimitServiceError"),
    ("DC", "DownstreamConnectionTermination"),
    ("URX", "UpstreamRetryLimitExceeded"),
    ("SI", "StreamIdleTimeout"),
    ("IH", "InvalidEnvoyRequestHeaders"),
    ("DPE", "DownstreamProtocolError"),
    ("UMSDR", "UpstreamMaxStreamDurationReached"),
    ("RFCF", "ResponseFromCacheFilter"),
    ("NFCF", "NoFilterConfigFound"),
    ("DT", "DurationTimeout"),
    ("UPE", "UpstreamProtocolError"),
    ("NC", "NoClusterFound"),
    ("OM", "OverloadManagerTerminated"),
    ("DF", "DnsResolutionFailed"),
    ("DO", "DropOverload"),
    ("DR", "DownstreamRemoteReset"),
];

fn long_flags(short: &str) -> String {
    if short.is_empty() {
        return "-".into();
    }
    short
        .split(',')
        .map(|f| {
            LONG_FLAGS
                .iter()
                .find(|(s, _)| *s == f)
                .map_or(f, |(_, l)| *l)
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, Clone, PartialEq)]
enum JsonNode {
    Format(TextFormat),
    Object(Vec<(String, JsonNode)>),
    Other(serde_json::Value),
}

/// A compiled `SubstitutionFormatString`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubstitutionFormat {
    kind: Kind,
    pub content_type: Option<String>,
    omit_empty_values: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Text(TextFormat),
    Json(Vec<(String, JsonNode)>),
}

fn compile_json(v: &serde_json::Value, path: &str) -> Result<JsonNode, ConfigError> {
    Ok(match v {
        serde_json::Value::String(s) => JsonNode::Format(TextFormat::compile(s, path)?),
        serde_json::Value::Object(m) => JsonNode::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), compile_json(v, &format!("{path}.{k}"))?)))
                .collect::<Result<_, ConfigError>>()?,
        ),
        other => JsonNode::Other(other.clone()),
    })
}

fn render_json(
    node: &JsonNode,
    v: &StreamValues<'_>,
    omit_empty: bool,
) -> Option<serde_json::Value> {
    match node {
        JsonNode::Format(f) => {
            let val = f.json_value(v);
            (!(omit_empty && (val.is_null() || val == ""))).then_some(val)
        }
        JsonNode::Object(fields) => {
            let mut m = serde_json::Map::new();
            for (k, n) in fields {
                if let Some(val) = render_json(n, v, omit_empty) {
                    m.insert(k.clone(), val);
                }
            }
            Some(serde_json::Value::Object(m))
        }
        JsonNode::Other(o) => Some(o.clone()),
    }
}

fn json_fits_local_reply(node: &JsonNode) -> bool {
    match node {
        JsonNode::Format(f) => f.fits_local_reply(),
        JsonNode::Object(fields) => fields.iter().all(|(_, n)| json_fits_local_reply(n)),
        JsonNode::Other(_) => true,
    }
}

impl SubstitutionFormat {
    /// Compiles a `local_reply_config` body format: operators only an access log can fill
    /// (the request line, the upstream, byte counts) are refused rather than printed as `-`.
    pub fn compile_for_local_reply(
        f: &SubstitutionFormatString,
        path: &str,
    ) -> Result<SubstitutionFormat, ConfigError> {
        let format = Self::compile(f, path)?;
        let fits = match &format.kind {
            Kind::Text(t) => t.fits_local_reply(),
            Kind::Json(fields) => fields.iter().all(|(_, n)| json_fits_local_reply(n)),
        };
        if !fits {
            return Err(invalid(
                path,
                "a local reply format may use REQ/RESP headers (not pseudo-headers), RESPONSE_CODE, RESPONSE_FLAGS, RESPONSE_CODE_DETAILS, LOCAL_REPLY_BODY, PROTOCOL, START_TIME, HOSTNAME and the downstream addresses in Petrel",
            ));
        }
        Ok(format)
    }

    pub fn compile(
        f: &SubstitutionFormatString,
        path: &str,
    ) -> Result<SubstitutionFormat, ConfigError> {
        let mut rest = f.clone();
        let omit_empty_values = std::mem::take(&mut rest.omit_empty_values);
        let content_type = Some(std::mem::take(&mut rest.content_type)).filter(|c| !c.is_empty());
        let kind = match rest.format.take() {
            Some(Format::TextFormat(t)) => {
                Kind::Text(TextFormat::compile(&t, &format!("{path}.text_format"))?)
            }
            Some(Format::TextFormatSource(ds)) => {
                let b = crate::config::bootstrap::data_source(
                    &ds,
                    &format!("{path}.text_format_source"),
                )?;
                Kind::Text(TextFormat::compile(
                    &String::from_utf8_lossy(&b),
                    &format!("{path}.text_format_source"),
                )?)
            }
            Some(Format::JsonFormat(s)) => {
                let json = xds_client::type_registry::struct_to_json(s);
                match compile_json(&json, &format!("{path}.json_format"))? {
                    JsonNode::Object(fields) => Kind::Json(fields),
                    _ => return Err(invalid(path, "json_format must be an object")),
                }
            }
            None => return Err(invalid(path, "format is required")),
        };
        reject_unhandled(&rest, path)?;
        Ok(SubstitutionFormat {
            kind,
            content_type,
            omit_empty_values,
        })
    }

    /// The formatted body and its content type (Envoy: `text/plain` or `application/json`).
    pub fn render(&self, v: &StreamValues<'_>) -> (String, String) {
        match &self.kind {
            Kind::Text(t) => (
                {
                    let mut out = String::new();
                    t.write_missing_as(v, &mut out, if self.omit_empty_values { "" } else { "-" });
                    out
                },
                self.content_type
                    .clone()
                    .unwrap_or_else(|| "text/plain".into()),
            ),
            Kind::Json(fields) => {
                let body =
                    render_json(&JsonNode::Object(fields.clone()), v, self.omit_empty_values)
                        .unwrap_or_default();
                (
                    format!("{body}\n"),
                    self.content_type
                        .clone()
                        .unwrap_or_else(|| "application/json".into()),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(req: &'a HeaderMap) -> StreamValues<'a> {
        let mut v = StreamValues::new(
            SystemTime::UNIX_EPOCH,
            "1.2.3.4:5".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        );
        v.request_headers = Some(req);
        v.response_code = 503;
        v.response_flags = "UH";
        v.response_code_details = "no_healthy_upstream";
        v.local_reply_body = "no healthy upstream";
        v.protocol = "HTTP/1.1";
        v
    }

    #[test]
    fn access_log_operators() {
        let mut h = HeaderMap::new();
        h.insert("user-agent", "curl".parse().unwrap());
        let mut v = values(&h);
        v.request_line = Some(RequestLine {
            method: "GET",
            path: "/a?b=c",
            authority: "svc",
            scheme: "http",
        });
        let host = crate::upstream::cluster::HostAddress::Ip("10.0.0.1:80".parse().unwrap());
        v.bytes_received = 3;
        v.bytes_sent = 19;
        v.duration = Some(Duration::from_millis(12));
        v.upstream = UpstreamValues {
            cluster: Some("c1"),
            cluster_stat_name: None,
            host: Some(&host),
            local: None,
            transport_failure_reason: None,
            attempts: 2,
            tls: None,
        };
        let f = TextFormat::compile(
            "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(:AUTHORITY)% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %UPSTREAM_REQUEST_ATTEMPT_COUNT% %DOWNSTREAM_REMOTE_PORT% %RESPONSE_FLAGS_LONG% %DOWNSTREAM_PEER_URI_SAN% %FILTER_STATE(x:PLAIN)% %REQ(USER-AGENT):2%",
            "f",
        )
        .unwrap();
        assert_eq!(
            f.format(&v),
            "GET /a?b=c svc 3 19 12 10.0.0.1:80 c1 - 2 5 NoHealthyUpstream - - cu"
        );
    }

    #[test]
    fn start_time_formats() {
        // 2021-03-04T05:06:07.089123456Z, a Thursday.
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_614_834_367, 89_123_456);
        let mut out = String::new();
        TimeFormat::compile("%Y/%m/%d %T %3f %E6S %s %j %a %b %z %%", "t")
            .unwrap()
            .render(t, &mut out);
        assert_eq!(
            out,
            "2021/03/04 05:06:07 089 07.089123 1614834367 063 Thu Mar +0000 %"
        );
        assert!(TimeFormat::compile("%Q", "t").is_err());
    }

    #[test]
    fn text_operators() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "abcdef".parse().unwrap());
        let f = TextFormat::compile("%RESPONSE_CODE% %RESPONSE_FLAGS% [%LOCAL_REPLY_BODY%] %REQ(X-A):3% %REQ(X-MISSING)% %REQ(X-NONE?X-A)% 100%%", "f").unwrap();
        assert_eq!(
            f.format(&values(&h)),
            "503 UH [no healthy upstream] abc - abcdef 100%"
        );
    }

    #[test]
    fn unknown_operator_refused() {
        let e = TextFormat::compile("%NOT_A_THING%", "body_format").unwrap_err();
        assert!(e.to_string().contains("NOT_A_THING"), "{e}");
        assert!(TextFormat::compile("%REQ(x", "b").is_err());
    }

    #[test]
    fn json_keeps_types() {
        let sf: SubstitutionFormatString = xds_client::TypeRegistry::global()
            .from_json(&serde_json::json!({"json_format": {"code": "%RESPONSE_CODE%", "msg": "%LOCAL_REPLY_BODY%", "nested": {"f": "%RESPONSE_FLAGS%"}, "missing": "%REQ(x-nope)%"}}), false)
            .unwrap();
        let f = SubstitutionFormat::compile(&sf, "body_format").unwrap();
        let h = HeaderMap::new();
        let (body, ct) = f.render(&values(&h));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], 503);
        assert_eq!(v["msg"], "no healthy upstream");
        assert_eq!(v["nested"]["f"], "UH");
        assert!(v["missing"].is_null());
        assert_eq!(ct, "application/json");
    }
}
