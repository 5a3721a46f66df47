//! A connection's byte counts from the kernel (`TCP_INFO`), for listener access logs of HTTP
//! connections: the codecs keep no per-connection count, and reading the kernel's costs nothing
//! per read. Taken on a duplicate of the socket so that the count can be read after the
//! connection manager let go of it (the duplicate is closed right after).
//!
//! These are the TCP payload bytes: for plaintext, Envoy's count; for TLS, they include the
//! record overhead, where Envoy counts the decrypted bytes.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// A hold on a connection's socket for reading its counts at close.
pub struct WireBytes(OwnedFd);

impl WireBytes {
    pub fn of(s: &impl AsFd) -> Option<WireBytes> {
        s.as_fd().try_clone_to_owned().ok().map(WireBytes)
    }

    /// `(received, sent)`: bytes received, and bytes sent less retransmissions (bytes acked on
    /// kernels before 4.19).
    pub fn read(&self) -> (u64, u64) {
        let mut buf = [0u8; 256];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `buf` and updates `len`.
        let rc = unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return (0, 0);
        }
        let len = len as usize;
        let u64_at = |off: usize| {
            (len >= off + 8)
                .then(|| u64::from_ne_bytes(buf[off..off + 8].try_into().unwrap_or([0; 8])))
        };
        // Offsets in Linux's `struct tcp_info`. The peer's FIN takes a sequence number, which
        // the kernel counts as a byte received: not one of the connection's. States that come
        // after the peer's FIN: TIME_WAIT, CLOSE (a socket whose FIN_WAIT2 ended in time-wait
        // is left CLOSE; one reset is too, and is then counted one byte short), CLOSE_WAIT,
        // LAST_ACK, CLOSING.
        let fin_received = matches!(buf[0], 6..=9 | 11);
        let received = u64_at(128)
            .unwrap_or(0)
            .saturating_sub(u64::from(fin_received));
        let sent = match (u64_at(200), u64_at(208)) {
            (Some(sent), Some(retrans)) => sent.saturating_sub(retrans),
            _ => u64_at(120).unwrap_or(0),
        };
        (received, sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn counts_both_ways() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let w = WireBytes::of(&s).unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"0123456789").unwrap();
        let mut back = [0u8; 10];
        c.read_exact(&mut back).unwrap();
        assert_eq!(w.read(), (5, 10));
    }
}

#[cfg(test)]
mod fin_tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn peer_fin_is_not_a_byte() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let w = WireBytes::of(&s).unwrap();
        c.write_all(b"hello").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(b"bye").unwrap();
        drop(s);
        // The hold keeps the socket open until it is read and dropped, as at a connection's end.
        assert_eq!(w.read(), (5, 3));
        drop(w);
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"bye");
    }
}
