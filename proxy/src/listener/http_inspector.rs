//! `envoy.filters.listener.http_inspector`: tells plaintext HTTP/1.x and HTTP/2 prior knowledge
//! apart from other protocols by the first bytes, for `application_protocols` matching
//! (`http/1.0`, `http/1.1`, `h2c`).

/// What the bytes seen so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspection {
    NeedMore,
    NotHttp,
    Http(&'static str),
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Envoy stops looking after this many bytes without a request line.
pub const MAX_INSPECT: usize = 64 * 1024;

pub fn inspect(buf: &[u8]) -> Inspection {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Inspection::Http("h2c")
        } else {
            Inspection::NeedMore
        };
    }
    let line_end = buf.iter().position(|b| *b == b'\n');
    let line = match line_end {
        Some(i) => buf[..i].strip_suffix(b"\r").unwrap_or(&buf[..i]),
        None if buf.len() >= MAX_INSPECT => return Inspection::NotHttp,
        None => buf,
    };
    let mut parts = line.splitn(3, |b| *b == b' ');
    let method = parts.next().unwrap_or_default();
    // The method is a token: anything else is not HTTP, however many bytes follow.
    if !method.iter().all(|b| is_tchar(*b)) {
        return Inspection::NotHttp;
    }
    if line_end.is_none() {
        // The first line may still turn out to be HTTP: wait for its end.
        return match (parts.next(), parts.next()) {
            (_, Some(version))
                if !b"HTTP/1.1".starts_with(version) && !b"HTTP/1.0".starts_with(version) =>
            {
                Inspection::NotHttp
            }
            _ => Inspection::NeedMore,
        };
    }
    let (Some(target), Some(version)) = (parts.next(), parts.next()) else {
        return Inspection::NotHttp;
    };
    if method.is_empty() || target.is_empty() || target.contains(&b' ') {
        return Inspection::NotHttp;
    }
    match version {
        b"HTTP/1.1" => Inspection::Http("http/1.1"),
        b"HTTP/1.0" => Inspection::Http("http/1.0"),
        _ => Inspection::NotHttp,
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols() {
        assert_eq!(
            inspect(b"GET /x HTTP/1.1\r\nhost: a\r\n"),
            Inspection::Http("http/1.1")
        );
        assert_eq!(
            inspect(b"POST / HTTP/1.0\r\n"),
            Inspection::Http("http/1.0")
        );
        assert_eq!(inspect(H2_PREFACE), Inspection::Http("h2c"));
        assert_eq!(inspect(b"PRI * HT"), Inspection::NeedMore);
        assert_eq!(inspect(b"GET /x HTT"), Inspection::NeedMore);
        assert_eq!(inspect(b"\x16\x03\x01\x00"), Inspection::NotHttp);
        assert_eq!(inspect(b"GET /x SMTP/1.0\r\n"), Inspection::NotHttp);
        assert_eq!(inspect(b"GET /x FOO"), Inspection::NotHttp);
        assert_eq!(inspect(b"SSH-2.0-OpenSSH\r\n"), Inspection::NotHttp);
    }

    proptest::proptest! {
        /// Any bytes decide or ask for more; a complete request line decides.
        #[test]
        fn never_panics(buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = inspect(&buf);
        }

        #[test]
        fn request_lines_are_http(m in "[A-Z]{1,10}", p in "/[a-z0-9/]{0,30}") {
            let line = format!("{m} {p} HTTP/1.1\r\n");
            proptest::prop_assert_eq!(inspect(line.as_bytes()), Inspection::Http("http/1.1"));
        }
    }
}
