//! HTTP/1.1 request bodies: the content-length and chunked decoders, and the body handed to the
//! router, which reads straight from the connection (no copy through a channel).

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use crate::listener::stream::DownstreamRead;
use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::head::Framing;

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Where a request body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoder {
    Length(u64),
    Chunked(ChunkState),
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkState(Chunk);

#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    NeedMore,
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunked encoding")]
    BadChunk,
    #[error("connection closed before the request body was complete")]
    Incomplete,
    #[error("request body read failed")]
    Io,
}

fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) => {
            let line = buf.split_to(i).freeze();
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(BodyError::BadChunk),
        None => Ok(None),
    }
}

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        match framing {
            Framing::None => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(ChunkState(Chunk::Size)),
        }
    }

    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// Takes the next piece of body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(remaining) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = (*remaining).min(buf.len() as u64) as usize;
                    let data = buf.split_to(n).freeze();
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(data));
                }
                Decoder::Chunked(ChunkState(state)) => match *state {
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        let digits = line.split(|b| *b == b';').next().unwrap_or(&[]);
                        let digits = std::str::from_utf8(digits)
                            .map_err(|_| BodyError::BadChunk)?
                            .trim_end_matches([' ', '\t']);
                        if digits.is_empty()
                            || digits.len() > 16
                            || !digits.bytes().all(|b| b.is_ascii_hexdigit())
                        {
                            return Err(BodyError::BadChunk);
                        }
                        let size =
                            u64::from_str_radix(digits, 16).map_err(|_| BodyError::BadChunk)?;
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(remaining) => {
                        if buf.is_empty() {
                            return Ok(Decoded::NeedMore);
                        }
                        let n = remaining.min(buf.len() as u64) as usize;
                        let data = buf.split_to(n).freeze();
                        let left = remaining - n as u64;
                        *state = if left == 0 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left)
                        };
                        return Ok(Decoded::Data(data));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Decoded::NeedMore);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(BodyError::BadChunk);
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        // Trailers end at an empty line; they are read and not forwarded.
                        let Some(line) = take_line(buf)? else {
                            return Ok(Decoded::NeedMore);
                        };
                        if line.is_empty() {
                            *self = Decoder::Done;
                        }
                    }
                },
            }
        }
    }
}

/// The read side of a downstream HTTP/1.1 connection, shared by the connection loop and the
/// current request's body. Each user borrows it only within one poll, never across an await.
pub struct ReadSide {
    pub io: DownstreamRead,
    pub buf: BytesMut,
    pub decoder: Decoder,
    pub eof: bool,
}

impl ReadSide {
    /// Reads more bytes into the buffer; `Ok(0)` is end of stream.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        let r = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf);
        if let Poll::Ready(Ok(0)) = r {
            self.eof = true;
        }
        r
    }

    /// Advances the body decoder by one step, reading from the socket when it needs bytes.
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>> {
        loop {
            match self.decoder.decode(&mut self.buf)? {
                Decoded::Data(d) => return Poll::Ready(Ok(Some(d))),
                Decoded::End => return Poll::Ready(Ok(None)),
                Decoded::NeedMore => {
                    if self.eof {
                        return Poll::Ready(Err(BodyError::Incomplete));
                    }
                    match self.poll_fill(cx) {
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(_)) => return Poll::Ready(Err(BodyError::Io)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }
}

/// Wakes the connection loop when the body is first read, so that it can send
/// `100 Continue` if the client asked for one.
#[derive(Default)]
pub struct ContinueSignal {
    pub wanted: std::cell::Cell<bool>,
    pub notify: tokio::sync::Notify,
}

/// A downstream HTTP/1.1 request body.
pub struct H1Body {
    side: Option<Rc<RefCell<ReadSide>>>,
    size: SizeHint,
    signal: Option<Rc<ContinueSignal>>,
}

impl H1Body {
    pub fn new(
        side: Rc<RefCell<ReadSide>>,
        framing: Framing,
        signal: Option<Rc<ContinueSignal>>,
    ) -> Self {
        let size = match framing {
            Framing::None => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Chunked => SizeHint::default(),
        };
        // A body with no bytes holds no reference, so an upgrade can take the socket back.
        let side = (framing != Framing::None).then_some(side);
        H1Body { side, size, signal }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(sig) = self.signal.take() {
            sig.wanted.set(true);
            sig.notify.notify_one();
        }
        let Some(side) = self.side.clone() else {
            return Poll::Ready(None);
        };
        let r = side.borrow_mut().poll_body(cx);
        match r {
            Poll::Ready(Ok(Some(d))) => Poll::Ready(Some(Ok(Frame::data(d)))),
            Poll::Ready(Ok(None)) => {
                self.side = None;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.side = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.side {
            None => true,
            Some(s) => s.try_borrow().map(|s| s.decoder.is_done()).unwrap_or(false),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(framing: Framing, input: &[u8]) -> Result<Vec<u8>, BodyError> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::End => return Ok(out),
                Decoded::NeedMore => return Err(BodyError::Incomplete),
            }
        }
    }

    #[test]
    fn chunked() {
        assert_eq!(
            decode_all(
                Framing::Chunked,
                b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\n"
            )
            .unwrap(),
            b"hello world"
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"zz\r\nhello\r\n0\r\n\r\n"),
            Err(BodyError::BadChunk)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"5\r\nhelloXX0\r\n\r\n"),
            Err(BodyError::BadChunk)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"5\r\nhel"),
            Err(BodyError::Incomplete)
        );
        assert_eq!(
            decode_all(Framing::Chunked, b"fffffffffffffffff\r\n"),
            Err(BodyError::BadChunk)
        );
    }

    #[test]
    fn length() {
        assert_eq!(decode_all(Framing::Length(3), b"abcdef").unwrap(), b"abc");
        assert_eq!(
            decode_all(Framing::Length(3), b"ab"),
            Err(BodyError::Incomplete)
        );
        assert_eq!(decode_all(Framing::None, b"ignored").unwrap(), b"");
    }

    proptest! {
        /// Whatever the split of chunk sizes, chunked encoding round-trips.
        #[test]
        fn chunked_round_trip(parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..8)) {
            let mut wire = Vec::new();
            for p in &parts {
                wire.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
                wire.extend_from_slice(p);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let expected: Vec<u8> = parts.concat();
            prop_assert_eq!(decode_all(Framing::Chunked, &wire).unwrap(), expected);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_all(Framing::Chunked, &bytes);
        }
    }
}
