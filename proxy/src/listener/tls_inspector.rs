//! `envoy.filters.listener.tls_inspector`: reads (without consuming) a TLS ClientHello to learn
//! the transport protocol, SNI and ALPN that filter-chain matching uses.

/// What the bytes seen so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// More bytes are needed to decide.
    NeedMore,
    /// Not TLS: the transport protocol stays `raw_buffer`.
    NotTls,
    /// A ClientHello: SNI (lower-cased, as Envoy matches it) and ALPN protocols.
    Tls {
        server_name: Option<String>,
        alpn: Vec<String>,
    },
}

/// The largest ClientHello Envoy inspects (`max_client_hello_size` default); a larger one is
/// treated as not TLS here, as the connection is closed by Envoy.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Inspects the first bytes of a connection.
pub fn inspect(buf: &[u8]) -> Inspection {
    // The handshake message may span several records: gather their payloads.
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return if handshake_prefix_ok(buf, at) {
                Inspection::NeedMore
            } else {
                Inspection::NotTls
            };
        };
        if header[0] != HANDSHAKE || header[1] != 3 {
            return Inspection::NotTls;
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > 16384 + 2048 {
            return Inspection::NotTls;
        }
        let Some(payload) = buf.get(at + 5..at + 5 + len) else {
            return Inspection::NeedMore;
        };
        handshake.extend_from_slice(payload);
        at += 5 + len;
        if handshake.first() != Some(&CLIENT_HELLO) {
            return Inspection::NotTls;
        }
        if handshake.len() < 4 {
            continue;
        }
        let body_len = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
        if body_len > MAX_CLIENT_HELLO {
            return Inspection::NotTls;
        }
        if handshake.len() < 4 + body_len {
            continue;
        }
        return match client_hello(&handshake[4..4 + body_len]) {
            Some((server_name, alpn)) => Inspection::Tls { server_name, alpn },
            None => Inspection::NotTls,
        };
    }
}

/// Whether a partial record header at `at` can still be a handshake record.
fn handshake_prefix_ok(buf: &[u8], at: usize) -> bool {
    let rest = &buf[at.min(buf.len())..];
    match rest {
        [] => true,
        [t] => *t == HANDSHAKE,
        [t, major, ..] => *t == HANDSHAKE && *major == 3,
    }
}

/// A cursor over a ClientHello body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

type Hello = (Option<String>, Vec<String>);

fn client_hello(body: &[u8]) -> Option<Hello> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut server_name = None;
    let mut alpn = Vec::new();
    if r.0.is_empty() {
        return Some((server_name, alpn));
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            EXT_SERVER_NAME => server_name = sni(data),
            EXT_ALPN => alpn = alpn_list(data)?,
            _ => {}
        }
    }
    Some((server_name, alpn))
}

fn sni(data: &[u8]) -> Option<String> {
    let mut list = Reader(Reader(data).vec16()?);
    while !list.0.is_empty() {
        let ty = list.u8()?;
        let name = list.vec16()?;
        if ty == 0 {
            return std::str::from_utf8(name)
                .ok()
                .map(|n| n.to_ascii_lowercase());
        }
    }
    None
}

fn alpn_list(data: &[u8]) -> Option<Vec<String>> {
    let mut list = Reader(Reader(data).vec16()?);
    let mut out = Vec::new();
    while !list.0.is_empty() {
        let p = list.vec8()?;
        out.push(String::from_utf8_lossy(p).into_owned());
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello record with these extensions.
    pub fn client_hello_record(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend((name.len() as u16).to_be_bytes());
            entry.extend(name.as_bytes());
            let mut data = (entry.len() as u16).to_be_bytes().to_vec();
            data.extend(entry);
            exts.extend(EXT_SERVER_NAME.to_be_bytes());
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend(p.as_bytes());
            }
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            exts.extend(EXT_ALPN.to_be_bytes());
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0);
        body.extend([0, 2, 0x13, 0x01]);
        body.extend([1, 0]);
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn finds_sni_and_alpn() {
        let rec = client_hello_record(Some("Outbound.Example"), &["istio-peer-exchange", "h2"]);
        assert_eq!(
            inspect(&rec),
            Inspection::Tls {
                server_name: Some("outbound.example".into()),
                alpn: vec!["istio-peer-exchange".into(), "h2".into()]
            }
        );
        // Every proper prefix asks for more.
        for n in 0..rec.len() {
            assert_eq!(inspect(&rec[..n]), Inspection::NeedMore, "{n}");
        }
    }

    #[test]
    fn plaintext_is_not_tls() {
        assert_eq!(inspect(b"GET / HTTP/1.1\r\n"), Inspection::NotTls);
        assert_eq!(inspect(b"PRI * HTTP/2.0"), Inspection::NotTls);
        assert_eq!(inspect(&[22, 2]), Inspection::NotTls);
    }

    proptest::proptest! {
        /// Any bytes decide or ask for more, and a ClientHello split anywhere is found whole.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = inspect(&buf);
            let mut tls = vec![HANDSHAKE, 3];
            tls.extend(&buf);
            let _ = inspect(&tls);
        }

        #[test]
        fn names_round_trip(sni in "[a-z0-9.-]{1,60}", alpn in proptest::collection::vec("[a-z0-9/.-]{1,20}", 0..4)) {
            let alpn_refs: Vec<&str> = alpn.iter().map(|s| s.as_str()).collect();
            let rec = client_hello_record(Some(&sni), &alpn_refs);
            proptest::prop_assert_eq!(inspect(&rec), Inspection::Tls { server_name: Some(sni.clone()), alpn: alpn.clone() });
        }
    }
}
