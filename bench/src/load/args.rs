//! fortio's `load` command line: `-c CONNS -qps RATE -n COUNT | -t DURATION -H 'name: value'
//! -payload-size N [-http2|-grpc] -json FILE URL`.

use std::time::Duration;

use http::{HeaderName, HeaderValue};

/// What one run is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadArgs {
    /// Connections, each with one request in flight at a time (fortio's `-c`).
    pub connections: usize,
    /// Total requests per second over all connections; 0 runs closed loop (fortio's `-qps`).
    pub qps: f64,
    /// Stop after this many requests (`-n`), else after `duration`.
    pub count: Option<u64>,
    /// How long to run when no count is given (`-t`).
    pub duration: Duration,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Request body bytes: a POST when non-zero (`-payload-size`).
    pub payload_size: usize,
    pub protocol: Protocol,
    /// Where the fortio-shaped JSON result goes (`-json`; `-` is stdout).
    pub json: Option<String>,
    pub url: Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), as fortio's `-h2` on an `http://` URL.
    Http2,
    /// Unary gRPC calls over h2c to the URL's path.
    Grpc,
}

/// An `http://host:port/path` URL, resolved once.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub authority: String,
    pub addr: std::net::SocketAddr,
    pub path_and_query: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArgError {
    #[error("flag {0} needs a value")]
    MissingValue(String),
    #[error("flag {flag}: {value:?} is not {expected}")]
    BadValue {
        flag: String,
        value: String,
        expected: &'static str,
    },
    #[error("unknown flag {0}")]
    UnknownFlag(String),
    #[error("no URL given (usage: load [flags] http://host:port/path)")]
    NoUrl,
    #[error("more than one URL: {0:?} and {1:?}")]
    TwoUrls(String, String),
    #[error("bad URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("-c must be at least 1")]
    NoConnections,
}

impl LoadArgs {
    /// Parses the words after the program name; `load` as the first word is skipped so
    /// `fortio load …` command lines paste unchanged.
    pub fn parse<I: IntoIterator<Item = String>>(words: I) -> Result<Self, ArgError> {
        let mut words = words.into_iter().peekable();
        if words.peek().map(String::as_str) == Some("load") {
            words.next();
        }
        let mut args = LoadArgs {
            connections: 8,
            qps: 8.0,
            count: None,
            duration: Duration::from_secs(5),
            headers: Vec::new(),
            payload_size: 0,
            protocol: Protocol::Http1,
            json: None,
            url: Target {
                authority: String::new(),
                addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                path_and_query: String::new(),
            },
        };
        let mut url = None;
        while let Some(word) = words.next() {
            if !word.starts_with('-') || word == "-" {
                if let Some(first) = url.replace(word.clone()) {
                    return Err(ArgError::TwoUrls(first, word));
                }
                continue;
            }
            // fortio takes `-flag` and `--flag`, and `-flag=value`.
            let bare = word.trim_start_matches('-');
            let (name, inline) = match bare.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (bare, None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| words.next())
                    .ok_or_else(|| ArgError::MissingValue(word.clone()))
            };
            match name {
                "c" => args.connections = number(&word, &value()?)?,
                "qps" => {
                    let v = value()?;
                    args.qps =
                        v.parse()
                            .ok()
                            .filter(|q: &f64| *q >= 0.0)
                            .ok_or(ArgError::BadValue {
                                flag: word.clone(),
                                value: v,
                                expected: "a rate of zero or more",
                            })?;
                }
                "n" => args.count = Some(number(&word, &value()?)?),
                "t" => args.duration = duration(&word, &value()?)?,
                "H" => args.headers.push(header(&word, &value()?)?),
                "payload-size" => args.payload_size = number(&word, &value()?)?,
                "http2" | "h2" => args.protocol = Protocol::Http2,
                "grpc" => args.protocol = Protocol::Grpc,
                "json" => args.json = Some(value()?),
                _ => return Err(ArgError::UnknownFlag(word)),
            }
        }
        if args.connections == 0 {
            return Err(ArgError::NoConnections);
        }
        args.url = target(&url.ok_or(ArgError::NoUrl)?)?;
        Ok(args)
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, ArgError> {
    v.parse().map_err(|_| ArgError::BadValue {
        flag: flag.to_string(),
        value: v.to_string(),
        expected: "a whole number",
    })
}

/// fortio's durations: `10s`, `500ms`, `2m`, `1h`, or bare seconds.
fn duration(flag: &str, v: &str) -> Result<Duration, ArgError> {
    let bad = || ArgError::BadValue {
        flag: flag.to_string(),
        value: v.to_string(),
        expected: "a duration like 10s, 500ms or 2m",
    };
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn header(flag: &str, v: &str) -> Result<(HeaderName, HeaderValue), ArgError> {
    let bad = |expected| ArgError::BadValue {
        flag: flag.to_string(),
        value: v.to_string(),
        expected,
    };
    let (name, value) = v.split_once(':').ok_or(bad("a header 'name: value'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad("a header name"))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad("a header value"))?;
    Ok((name, value))
}

fn target(url: &str) -> Result<Target, ArgError> {
    let bad = |why: &str| ArgError::BadUrl {
        url: url.to_string(),
        why: why.to_string(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(bad(&format!("scheme {other} (only http:// is supported)"))),
        None => return Err(bad("no scheme (write http://host:port/path)")),
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| bad(&format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| bad(&format!("{host} has no address")))?;
    Ok(Target {
        authority: authority.to_string(),
        addr,
        path_and_query: uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<LoadArgs, ArgError> {
        LoadArgs::parse(line.split_whitespace().map(String::from))
    }

    #[test]
    fn fortio_command_lines() {
        let a =
            parse("load -c 2 -qps 0 -n 20 -H end-user:jason http://127.0.0.1:8000/get").unwrap();
        assert_eq!(a.connections, 2);
        assert_eq!(a.qps, 0.0);
        assert_eq!(a.count, Some(20));
        assert_eq!(a.headers[0].0, "end-user");
        assert_eq!(a.headers[0].1, "jason");
        assert_eq!(a.url.addr.port(), 8000);
        assert_eq!(a.url.authority, "127.0.0.1:8000");
        assert_eq!(a.url.path_and_query, "/get");
        let a =
            parse("--c=3 -t 1m -payload-size 1024 -grpc -json - http://localhost:9/x?y").unwrap();
        assert_eq!(a.connections, 3);
        assert_eq!(a.duration, Duration::from_secs(60));
        assert_eq!(a.payload_size, 1024);
        assert_eq!(a.protocol, Protocol::Grpc);
        assert_eq!(a.json.as_deref(), Some("-"));
        assert_eq!(a.url.path_and_query, "/x?y");
        assert_eq!(
            parse("-t 500ms http://127.0.0.1/").unwrap().duration,
            Duration::from_millis(500)
        );
        assert_eq!(parse("http://127.0.0.1").unwrap().url.addr.port(), 80);
    }

    #[test]
    fn bad_input_is_named() {
        let e = |line| parse(line).unwrap_err().to_string();
        assert_eq!(
            e("-c two http://a/"),
            "flag -c: \"two\" is not a whole number"
        );
        assert_eq!(
            e("-qps -1 http://127.0.0.1/"),
            "flag -qps: \"-1\" is not a rate of zero or more"
        );
        assert_eq!(
            e("-t soon http://127.0.0.1/"),
            "flag -t: \"soon\" is not a duration like 10s, 500ms or 2m"
        );
        assert_eq!(
            e("-H nocolon http://127.0.0.1/"),
            "flag -H: \"nocolon\" is not a header 'name: value'"
        );
        assert_eq!(e("-n"), "flag -n needs a value");
        assert_eq!(e("-bogus 1 http://127.0.0.1/"), "unknown flag -bogus");
        assert_eq!(
            e("-c 1"),
            "no URL given (usage: load [flags] http://host:port/path)"
        );
        assert_eq!(e("-c 0 http://127.0.0.1/"), "-c must be at least 1");
        assert!(e("https://127.0.0.1/").contains("only http:// is supported"));
        assert!(e("127.0.0.1:80/").contains("bad URL"));
        assert!(e("http://a/ http://b/").contains("more than one URL"));
        assert!(e("http://no-such-host.invalid/").contains("cannot resolve"));
    }
}
