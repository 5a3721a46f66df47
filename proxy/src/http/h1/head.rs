//! HTTP/1.1 request heads: parsing with `httparse` and the framing rules Envoy's codec enforces
//! (conflicting `content-length`/`transfer-encoding`, malformed lengths, header limits).

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Uri, Version};

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    /// The request target had a `#fragment` (which `Uri` drops).
    pub fragment: bool,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Bytes the head took in the buffer.
    pub len: usize,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// Why a head could not be accepted; each maps to Envoy's answer.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request")]
    Malformed,
    #[error("request headers too large")]
    TooLarge,
    #[error("too many headers")]
    TooManyHeaders,
    #[error("unsupported transfer encoding")]
    UnsupportedTransferEncoding,
}

impl HeadError {
    /// Envoy's status, body and `%RESPONSE_CODE_DETAILS%` for a codec error.
    pub fn reply(&self) -> (http::StatusCode, &'static str, &'static str) {
        use http::StatusCode as S;
        match self {
            HeadError::Malformed => (S::BAD_REQUEST, "Bad Request", "http1.codec_error"),
            HeadError::TooLarge => (
                S::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
                "http1.headers_too_large",
            ),
            HeadError::TooManyHeaders => (
                S::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
                "http1.too_many_headers",
            ),
            HeadError::UnsupportedTransferEncoding => (
                S::NOT_IMPLEMENTED,
                "Not Implemented",
                "http1.invalid_transfer_encoding",
            ),
        }
    }
}

/// Limits from the connection manager's config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
}

/// Parses a request head from the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8], limits: Limits) -> Result<Option<Head>, HeadError> {
    match parse_strict(buf, limits) {
        Err(HeadError::Malformed) => {
            // Envoy accepts obsolete line folding (a header continued on a line starting with
            // whitespace) and joins the parts with a space: unfold a complete head and retry.
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
                return Err(HeadError::Malformed);
            };
            let unfolded = unfold(&buf[..end]).ok_or(HeadError::Malformed)?;
            let mut head = parse_strict(&unfolded, limits)?.ok_or(HeadError::Malformed)?;
            head.len = end;
            Ok(Some(head))
        }
        other => other,
    }
}

/// Replaces each CRLF followed by spaces or tabs inside the header block with one space; None
/// when there is no folding (so the head is malformed for another reason).
fn unfold(head: &[u8]) -> Option<Vec<u8>> {
    let first_line_end = head.windows(2).position(|w| w == b"\r\n")? + 2;
    let mut out = head[..first_line_end].to_vec();
    let mut folded = false;
    let mut i = first_line_end;
    while i < head.len() {
        if head[i..].starts_with(b"\r\n")
            && i + 2 < head.len()
            && matches!(head[i + 2], b' ' | b'\t')
            && i + 4 <= head.len()
            && !head[i..].starts_with(b"\r\n\r\n")
        {
            folded = true;
            // Drop trailing whitespace before the fold and leading whitespace after it.
            while out.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
                out.pop();
            }
            out.push(b' ');
            i += 2;
            while i < head.len() && matches!(head[i], b' ' | b'\t') {
                i += 1;
            }
            continue;
        }
        out.push(head[i]);
        i += 1;
    }
    folded.then_some(out)
}

fn parse_strict(buf: &[u8], limits: Limits) -> Result<Option<Head>, HeadError> {
    // One more slot than allowed, so that "too many" is told apart from "too large".
    let mut slots = vec![httparse::EMPTY_HEADER; limits.max_headers + 1];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_head_bytes {
                return Err(HeadError::TooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed),
    };
    if len > limits.max_head_bytes {
        return Err(HeadError::TooLarge);
    }
    if req.headers.len() > limits.max_headers {
        return Err(HeadError::TooManyHeaders);
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| HeadError::Malformed)?;
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(HeadError::Malformed),
    };
    let target = req.path.unwrap_or("");
    let fragment = target.contains('#');
    let uri: Uri = target.parse().map_err(|_| HeadError::Malformed)?;
    if uri.path().is_empty() && method != Method::CONNECT {
        return Err(HeadError::Malformed);
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Malformed)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| HeadError::Malformed)?;
        headers.append(name, value);
    }
    let framing = framing(&headers)?;
    let connection_tokens = |t: &str| {
        headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|x| x.trim().eq_ignore_ascii_case(t))
    };
    let keep_alive = match version {
        Version::HTTP_11 => !connection_tokens("close"),
        _ => connection_tokens("keep-alive"),
    };
    let expect_continue = headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(Head {
        method,
        uri,
        fragment,
        version,
        headers,
        framing,
        len,
        keep_alive,
        expect_continue,
    }))
}

fn framing(headers: &HeaderMap) -> Result<Framing, HeadError> {
    let te: Vec<&HeaderValue> = headers.get_all(TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        // Both framings at once is the classic smuggling vector: refused.
        if !cl.is_empty() {
            return Err(HeadError::Malformed);
        }
        let codings: Vec<String> = te
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        return match codings.as_slice() {
            [only] if only == "chunked" => Ok(Framing::Chunked),
            _ => Err(HeadError::UnsupportedTransferEncoding),
        };
    }
    let mut length: Option<u64> = None;
    for v in cl {
        for part in v.to_str().map_err(|_| HeadError::Malformed)?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Malformed);
            }
            let n: u64 = part.parse().map_err(|_| HeadError::Malformed)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Malformed);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_head_bytes: 8192,
        max_headers: 10,
    };

    fn head(s: &str) -> Result<Option<Head>, HeadError> {
        parse(s.as_bytes(), LIMITS)
    }

    #[test]
    fn complete_and_partial() {
        let h = head("GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(h.uri, "/a?b");
        assert_eq!(h.headers["host"], "x");
        assert_eq!(
            h.len,
            "GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n".len()
        );
        assert!(h.keep_alive);
        assert_eq!(h.framing, Framing::None);
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn framing_rules() {
        let f = |extra: &str| {
            head(&format!("POST / HTTP/1.1\r\nhost: x\r\n{extra}\r\n"))
                .map(|h| h.map(|h| h.framing))
        };
        assert_eq!(f("content-length: 5\r\n"), Ok(Some(Framing::Length(5))));
        assert_eq!(
            f("content-length: 5\r\ncontent-length: 5\r\n"),
            Ok(Some(Framing::Length(5)))
        );
        assert_eq!(
            f("content-length: 5\r\ncontent-length: 6\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(f("content-length: -1\r\n"), Err(HeadError::Malformed));
        assert_eq!(
            f("transfer-encoding: chunked\r\n"),
            Ok(Some(Framing::Chunked))
        );
        assert_eq!(
            f("transfer-encoding: chunked\r\ncontent-length: 3\r\n"),
            Err(HeadError::Malformed)
        );
        assert_eq!(
            f("transfer-encoding: gzip\r\n"),
            Err(HeadError::UnsupportedTransferEncoding)
        );
    }

    #[test]
    fn obsolete_folding_is_joined() {
        let raw = "GET / HTTP/1.1\r\nx-a: one\r\n  two\r\nhost: h\r\n\r\nNEXT";
        let h = head(raw).unwrap().unwrap();
        assert_eq!(h.headers["x-a"], "one two");
        assert_eq!(h.len, raw.len() - 4);
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(
            head("NOT HTTP AT ALL\r\n\r\n").unwrap_err(),
            HeadError::Malformed
        );
        assert_eq!(
            head("GET / HTTP/1.1\r\nbad header: x\r\n\r\n").unwrap_err(),
            HeadError::Malformed
        );
        let many: String = (0..11).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(
            head(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err(),
            HeadError::TooManyHeaders
        );
        let big = "a".repeat(9000);
        assert_eq!(
            head(&format!("GET / HTTP/1.1\r\nx: {big}")).unwrap_err(),
            HeadError::TooLarge
        );
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
    }

    proptest! {
        /// Arbitrary bytes never panic the parser, and a parsed head never claims more bytes
        /// than it was given.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some(h)) = parse(&bytes, LIMITS) {
                prop_assert!(h.len <= bytes.len());
            }
        }
    }
}
