//! A request body kept for retries: the downstream body streams to the current attempt as it
//! arrives while a copy is recorded, up to the retry buffer limit; a later attempt replays the
//! copy and then continues with the live body. Past the limit the copy is dropped and no further
//! attempt may start (Envoy's `retry_or_shadow_abandoned`).

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::body::BoxError;
use super::stream_timeouts::DownstreamBody;

enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

/// The live body and what has been recorded of it.
pub struct Recording<B = DownstreamBody> {
    source: RefCell<B>,
    frames: RefCell<Vec<Recorded>>,
    size: Cell<usize>,
    limit: usize,
    overflowed: Cell<bool>,
    done: Cell<bool>,
    /// Woken when the body is complete or its reader gave up (mirrors wait on it).
    settled: tokio::sync::Notify,
    abandoned: Cell<bool>,
}

impl<B: Body<Data = Bytes, Error = BoxError> + Unpin> Recording<B> {
    pub fn new(source: B, limit: usize) -> Rc<Self> {
        let done = source.is_end_stream();
        Rc::new(Recording {
            source: RefCell::new(source),
            frames: RefCell::new(Vec::new()),
            size: Cell::new(0),
            limit,
            overflowed: Cell::new(false),
            done: Cell::new(done),
            settled: tokio::sync::Notify::new(),
            abandoned: Cell::new(false),
        })
    }

    /// The request is over, whether or not its body was read to the end.
    pub fn abandon(&self) {
        self.abandoned.set(true);
        self.settled.notify_waiters();
    }

    /// Waits until the whole body is recorded (true) or it never will be (false). Only the
    /// request's own attempts read the live body; a mirror replays it once complete.
    pub async fn settled(&self) -> bool {
        loop {
            let notified = self.settled.notified();
            if self.done.get() {
                return !self.overflowed.get();
            }
            if self.abandoned.get() || self.overflowed.get() {
                return false;
            }
            notified.await;
        }
    }

    fn mark_done(&self) {
        self.done.set(true);
        self.settled.notify_waiters();
    }

    /// Whether the body outgrew the limit (so it can no longer be replayed).
    pub fn overflowed(&self) -> bool {
        self.overflowed.get()
    }

    /// Whether the whole downstream body has been received.
    pub fn complete(&self) -> bool {
        self.done.get()
    }

    /// A body for the next attempt, replaying from the start.
    pub fn attempt(self: &Rc<Self>) -> ReplayBody<B> {
        ReplayBody {
            rec: self.clone(),
            next: 0,
        }
    }
}

/// One attempt's view of the recorded body.
pub struct ReplayBody<B = DownstreamBody> {
    rec: Rc<Recording<B>>,
    next: usize,
}

impl<B: Body<Data = Bytes, Error = BoxError> + Unpin> Body for ReplayBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let rec = &this.rec;
        if !rec.overflowed.get() {
            if let Some(f) = rec.frames.borrow().get(this.next) {
                this.next += 1;
                return Poll::Ready(Some(Ok(match f {
                    Recorded::Data(b) => Frame::data(b.clone()),
                    Recorded::Trailers(t) => Frame::trailers(t.clone()),
                })));
            }
        }
        if rec.done.get() {
            return Poll::Ready(None);
        }
        let r = Pin::new(&mut *rec.source.borrow_mut()).poll_frame(cx);
        match &r {
            Poll::Ready(None) => rec.mark_done(),
            Poll::Ready(Some(Ok(frame))) => {
                let end = rec.source.borrow().is_end_stream();
                if !rec.overflowed.get() {
                    let copy = if let Some(d) = frame.data_ref() {
                        rec.size.set(rec.size.get() + d.len());
                        Some(Recorded::Data(d.clone()))
                    } else {
                        frame.trailers_ref().map(|t| Recorded::Trailers(t.clone()))
                    };
                    if rec.size.get() > rec.limit {
                        rec.overflowed.set(true);
                        rec.frames.borrow_mut().clear();
                    } else if let Some(c) = copy {
                        rec.frames.borrow_mut().push(c);
                        this.next += 1;
                    }
                }
                if end {
                    rec.mark_done();
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        let recorded = self.rec.frames.borrow().len();
        (self.rec.overflowed.get() || self.next >= recorded) && self.rec.done.get()
    }

    fn size_hint(&self) -> SizeHint {
        if self.next == 0 && !self.rec.overflowed.get() && self.rec.frames.borrow().is_empty() {
            return self.rec.source.borrow().size_hint();
        }
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body yielding fixed chunks.
    struct Chunks(std::collections::VecDeque<&'static str>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))),
            )
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn body(chunks: &[&'static str]) -> Chunks {
        Chunks(chunks.iter().copied().collect())
    }

    #[tokio::test]
    async fn a_second_attempt_replays_then_continues() {
        let rec = Recording::new(body(&["ab", "cd", "ef"]), 100);
        let mut first = rec.attempt();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        // The first attempt fails here; the second sees everything.
        drop(first);
        let all = rec.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcdef");
        assert!(rec.complete());
        let again = rec.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(again, "abcdef");
    }

    #[tokio::test]
    async fn past_the_limit_the_copy_is_dropped() {
        let rec = Recording::new(body(&["abc", "def"]), 4);
        let all = rec.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcdef");
        assert!(rec.overflowed());
    }
}
