//! The trace decision Envoy's UUID request-id extension packs into `x-request-id`: the version
//! nibble (position 14) becomes `a` (forced by `x-envoy-force-trace`), `9` (random sampling),
//! `b` (client, `x-client-trace-id`) or `4` (not traced), so the decision travels with the id.

/// Why a request is traced, as Envoy's `Tracing::Reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotTraceable,
    Sampling,
    ServiceForced,
    ClientForced,
}

impl Reason {
    pub fn traced(self) -> bool {
        self != Reason::NotTraceable
    }
}

const UUID_LENGTH: usize = 36;
const TRACE_BYTE_POSITION: usize = 14;

/// The reason a request id carries (anything but a 36-character id is not traceable).
pub fn reason(id: &[u8]) -> Reason {
    if id.len() != UUID_LENGTH {
        return Reason::NotTraceable;
    }
    match id[TRACE_BYTE_POSITION] {
        b'a' => Reason::ServiceForced,
        b'9' => Reason::Sampling,
        b'b' => Reason::ClientForced,
        _ => Reason::NotTraceable,
    }
}

/// The id with `reason` packed in; `None` when the id is not a UUID-length value.
pub fn with_reason(id: &[u8], reason: Reason) -> Option<Vec<u8>> {
    if id.len() != UUID_LENGTH {
        return None;
    }
    let mut out = id.to_vec();
    out[TRACE_BYTE_POSITION] = match reason {
        Reason::ServiceForced => b'a',
        Reason::Sampling => b'9',
        Reason::ClientForced => b'b',
        Reason::NotTraceable => b'4',
    };
    Some(out)
}

/// The id's first 8 hex digits as a number: what sampling draws on, so every proxy a request
/// passes makes the same decision. `None` for a shorter or non-hex id (no tracing changes).
pub fn to_integer(id: &[u8]) -> Option<u64> {
    let head = std::str::from_utf8(id.get(..8)?).ok()?;
    u64::from_str_radix(head, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &[u8] = b"11111111-2222-4333-8444-555555555555";

    #[test]
    fn reasons_round_trip_through_the_version_nibble() {
        assert_eq!(reason(ID), Reason::NotTraceable);
        for r in [
            Reason::Sampling,
            Reason::ServiceForced,
            Reason::ClientForced,
            Reason::NotTraceable,
        ] {
            let id = with_reason(ID, r).unwrap();
            assert_eq!(reason(&id), r);
        }
        assert_eq!(
            with_reason(ID, Reason::Sampling).unwrap(),
            b"11111111-2222-9333-8444-555555555555"
        );
    }

    #[test]
    fn odd_ids_are_left_alone() {
        assert_eq!(reason(b"abc"), Reason::NotTraceable);
        assert!(with_reason(b"abc", Reason::Sampling).is_none());
        assert_eq!(to_integer(b"0000000a-x"), Some(10));
        assert_eq!(to_integer(b"zzzzzzzz-x"), None);
        assert_eq!(to_integer(b"1234"), None);
    }
}
