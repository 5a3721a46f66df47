//! B3 propagation as Envoy's Zipkin tracer reads and writes it: the single `b3` header
//! (`{traceid}-{spanid}[-{sampled}[-{parentid}]]`, or only a sampling flag) wins over the
//! `x-b3-*` headers; a malformed context means no span at all (the request is not touched).

use http::{HeaderMap, HeaderName, HeaderValue};

pub const B3: &str = "b3";
pub const X_B3_TRACE_ID: &str = "x-b3-traceid";
pub const X_B3_SPAN_ID: &str = "x-b3-spanid";
pub const X_B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const X_B3_SAMPLED: &str = "x-b3-sampled";

/// A span's identity as it crosses a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpanContext {
    pub trace_id_high: Option<u64>,
    pub trace_id: u64,
    pub id: u64,
    pub parent_id: Option<u64>,
}

/// Which header form a request carried: the upstream gets the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Multi,
    Single,
}

/// What the request says: its sampling flag, if any, and its context, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extracted {
    pub sampled: Option<bool>,
    pub context: Option<SpanContext>,
    pub format: Format,
}

/// A context that cannot be read (Envoy's `ExtractorException`): the stream gets no span.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

fn first<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    h.get(name).map(HeaderValue::as_bytes)
}

/// Envoy's `atoull(…, 16)`: the whole string, hex, within 64 bits.
fn hex64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

fn sampling_flag(c: u8) -> Option<bool> {
    match c {
        b'1' | b'd' => Some(true),
        b'0' => Some(false),
        _ => None,
    }
}

/// Reads the B3 headers of a request.
pub fn extract(h: &HeaderMap) -> Result<Extracted, Malformed> {
    if let Some(b3) = first(h, B3) {
        let sampled = single_sampled(b3);
        let context = single_context(b3)?;
        return Ok(Extracted {
            sampled,
            context,
            format: Format::Single,
        });
    }
    let sampled = first(h, X_B3_SAMPLED).map(|v| v == b"1" || v == b"true");
    let (Some(tid), Some(sid)) = (first(h, X_B3_TRACE_ID), first(h, X_B3_SPAN_ID)) else {
        return Ok(Extracted {
            sampled,
            ..Default::default()
        });
    };
    let (trace_id_high, trace_id) = if tid.len() == 32 {
        (
            Some(hex64(&tid[..16]).ok_or(Malformed)?),
            hex64(&tid[16..]).ok_or(Malformed)?,
        )
    } else {
        (None, hex64(tid).ok_or(Malformed)?)
    };
    let id = hex64(sid).ok_or(Malformed)?;
    let parent_id = match first(h, X_B3_PARENT_SPAN_ID) {
        Some(p) if !p.is_empty() => Some(hex64(p).ok_or(Malformed)?),
        _ => None,
    };
    Ok(Extracted {
        sampled,
        context: Some(SpanContext {
            trace_id_high,
            trace_id,
            id,
            parent_id,
        }),
        format: Format::Multi,
    })
}

/// The sampling flag of a single header, found by the header's length as Envoy finds it.
fn single_sampled(b3: &[u8]) -> Option<bool> {
    let pos = match b3.len() {
        1 => 0,
        35 | 52 => 34,
        51 | 68 => 50,
        _ => return None,
    };
    sampling_flag(b3[pos])
}

fn single_context(b3: &[u8]) -> Result<Option<SpanContext>, Malformed> {
    const MAX: usize = 32 + 1 + 16 + 3 + 16;
    match b3.len() {
        0 => return Err(Malformed),
        1 => return sampling_flag(b3[0]).map(|_| None).ok_or(Malformed),
        n if !(16 + 1 + 16..=MAX).contains(&n) => return Err(Malformed),
        _ => {}
    }
    let mut pos = 0;
    let (trace_id_high, trace_id) = if b3.get(32) == Some(&b'-') {
        pos += 32;
        (
            Some(hex64(&b3[..16]).ok_or(Malformed)?),
            hex64(&b3[16..32]).ok_or(Malformed)?,
        )
    } else {
        pos += 16;
        (None, hex64(&b3[..16]).ok_or(Malformed)?)
    };
    if b3.get(pos) != Some(&b'-') {
        return Err(Malformed);
    }
    pos += 1;
    let id = hex64(b3.get(pos..pos + 16).ok_or(Malformed)?).ok_or(Malformed)?;
    pos += 16;
    let mut parent_id = None;
    if b3.len() > pos {
        if b3.len() == pos + 1 || b3[pos] != b'-' {
            return Err(Malformed);
        }
        pos += 1;
        let flag_alone = b3.len() == pos + 1;
        if !(flag_alone || b3.get(pos + 1) == Some(&b'-')) || sampling_flag(b3[pos]).is_none() {
            return Err(Malformed);
        }
        pos += 1;
        if b3.len() > pos {
            if b3.len() != pos + 17 {
                return Err(Malformed);
            }
            parent_id = Some(hex64(&b3[pos + 1..]).ok_or(Malformed)?);
        }
    }
    Ok(Some(SpanContext {
        trace_id_high,
        trace_id,
        id,
        parent_id,
    }))
}

/// The trace id as B3 writes it: 32 hex digits when it has a high half, else 16.
pub fn trace_id_hex(c: &SpanContext) -> String {
    match c.trace_id_high {
        Some(h) => format!("{h:016x}{:016x}", c.trace_id),
        None => format!("{:016x}", c.trace_id),
    }
}

fn set(h: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// Writes `c` into the upstream request, in the form the downstream used.
pub fn inject(h: &mut HeaderMap, c: &SpanContext, sampled: bool, format: Format) {
    let flag = if sampled { "1" } else { "0" };
    match format {
        Format::Single => {
            let mut v = format!("{}-{:016x}-{flag}", trace_id_hex(c), c.id);
            if let Some(p) = c.parent_id {
                v.push_str(&format!("-{p:016x}"));
            }
            set(h, B3, v);
        }
        Format::Multi => {
            set(h, X_B3_TRACE_ID, trace_id_hex(c));
            set(h, X_B3_SPAN_ID, format!("{:016x}", c.id));
            if let Some(p) = c.parent_id {
                set(h, X_B3_PARENT_SPAN_ID, format!("{p:016x}"));
            }
            set(h, X_B3_SAMPLED, flag.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn multi_headers_with_64_and_128_bit_ids() {
        let e = extract(&headers(&[
            (X_B3_TRACE_ID, "0000000000000001"),
            (X_B3_SPAN_ID, "0000000000000002"),
            (X_B3_SAMPLED, "1"),
        ]))
        .unwrap();
        assert_eq!(e.sampled, Some(true));
        assert_eq!(
            e.context,
            Some(SpanContext {
                trace_id_high: None,
                trace_id: 1,
                id: 2,
                parent_id: None
            })
        );
        let e = extract(&headers(&[
            (X_B3_TRACE_ID, "80f198ee56343ba864fe8b2a57d3eff7"),
            (X_B3_SPAN_ID, "e457b5a2e4d86bd1"),
            (X_B3_PARENT_SPAN_ID, "05e3ac9a4f6e3b90"),
        ]))
        .unwrap();
        let c = e.context.unwrap();
        assert_eq!(c.trace_id_high, Some(0x80f198ee56343ba8));
        assert_eq!(c.parent_id, Some(0x05e3ac9a4f6e3b90));
        assert_eq!(e.sampled, None);
    }

    #[test]
    fn single_header_forms() {
        let e = extract(&headers(&[(
            B3,
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]))
        .unwrap();
        assert_eq!(e.format, Format::Single);
        assert_eq!(e.sampled, Some(true));
        assert_eq!(e.context.unwrap().parent_id, Some(0x05e3ac9a4f6e3b90));
        let e = extract(&headers(&[(B3, "0")])).unwrap();
        assert_eq!((e.sampled, e.context), (Some(false), None));
        let e = extract(&headers(&[(B3, "64fe8b2a57d3eff7-e457b5a2e4d86bd1")])).unwrap();
        assert_eq!(e.sampled, None);
        assert_eq!(e.context.unwrap().trace_id, 0x64fe8b2a57d3eff7);
        for bad in [
            "x",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-2",
            "64fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3",
            "zzfe8b2a57d3eff7-e457b5a2e4d86bd1",
        ] {
            assert_eq!(extract(&headers(&[(B3, bad)])), Err(Malformed), "{bad}");
        }
    }

    #[test]
    fn bad_multi_ids_are_malformed() {
        assert_eq!(
            extract(&headers(&[(X_B3_TRACE_ID, "zz"), (X_B3_SPAN_ID, "2")])),
            Err(Malformed)
        );
        assert_eq!(
            extract(&headers(&[(X_B3_TRACE_ID, "1"), (X_B3_SPAN_ID, "2")]))
                .unwrap()
                .context
                .map(|c| c.trace_id),
            Some(1)
        );
    }

    #[test]
    fn injection_keeps_the_form() {
        let c = SpanContext {
            trace_id_high: Some(1),
            trace_id: 2,
            id: 3,
            parent_id: Some(4),
        };
        let mut h = HeaderMap::new();
        inject(&mut h, &c, true, Format::Single);
        assert_eq!(
            h[B3],
            "00000000000000010000000000000002-0000000000000003-1-0000000000000004"
        );
        let mut h = HeaderMap::new();
        inject(
            &mut h,
            &SpanContext {
                parent_id: None,
                ..c
            },
            false,
            Format::Multi,
        );
        assert_eq!(h[X_B3_TRACE_ID], "00000000000000010000000000000002");
        assert_eq!(h[X_B3_SPAN_ID], "0000000000000003");
        assert_eq!(h[X_B3_SAMPLED], "0");
        assert!(h.get(X_B3_PARENT_SPAN_ID).is_none());
    }
}
