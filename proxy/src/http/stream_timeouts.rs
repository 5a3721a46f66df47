//! The connection manager's stream timers: `stream_idle_timeout` (no bytes either way),
//! `request_timeout` (whole request not received), tracked through body wrappers that note
//! activity, plus the idle timer on response bodies once headers are sent.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::body::{BoxError, RequestBody};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::observe::stats::{Counter, Histogram};

/// When the stream last moved a byte, and whether the request has been fully received.
#[derive(Debug)]
pub struct StreamActivity {
    last: Cell<Instant>,
    request_done: Cell<bool>,
    /// When the whole request had been received (what `upstream_rq_time` counts from).
    done_at: Cell<Option<Instant>>,
    completed: tokio::sync::Notify,
}

impl StreamActivity {
    pub fn new(request_done: bool) -> Rc<Self> {
        let now = Instant::now();
        Rc::new(StreamActivity {
            last: Cell::new(now),
            request_done: Cell::new(request_done),
            done_at: Cell::new(request_done.then_some(now)),
            completed: tokio::sync::Notify::new(),
        })
    }
    /// When the request was complete (now, if it is not yet).
    pub fn request_done_at(&self) -> Instant {
        self.done_at.get().unwrap_or_else(Instant::now)
    }
    pub fn request_complete(&self) -> bool {
        self.request_done.get()
    }
    pub fn touch(&self) {
        self.last.set(Instant::now());
    }

    /// Resolves once nothing has moved for `timeout`.
    pub async fn idle_expired(&self, timeout: Duration) {
        loop {
            let deadline = self.last.get() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Resolves once the whole request has been received.
    pub async fn request_completed(&self) {
        while !self.request_done.get() {
            self.completed.notified().await;
        }
    }

    /// Resolves if the request is still incomplete at `deadline`.
    pub async fn request_incomplete_at(&self, deadline: Instant) {
        tokio::time::sleep_until(deadline).await;
        if self.request_done.get() {
            std::future::pending::<()>().await;
        }
    }
}

/// The downstream request body on its way upstream, noting activity and completion.
pub struct DownstreamBody {
    inner: RequestBody,
    activity: Rc<StreamActivity>,
}

impl DownstreamBody {
    pub fn new(inner: RequestBody, activity: Rc<StreamActivity>) -> Self {
        DownstreamBody { inner, activity }
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(frame) = &r {
            this.activity.touch();
            if frame.is_none() || this.inner.is_end_stream() {
                if !this.activity.request_done.get() {
                    this.activity.done_at.set(Some(Instant::now()));
                }
                this.activity.request_done.set(true);
                this.activity.completed.notify_waiters();
            }
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Error raised into hyper when a response body goes idle: hyper then resets the stream, as
/// Envoy does once headers are already sent.
#[derive(Debug, thiserror::Error)]
#[error("stream idle timeout")]
pub struct StreamIdleTimeout;

/// A response body with Envoy's stream idle timer (and, when a fault asks, throttled).
pub struct IdleTimedBody<B> {
    inner: B,
    timeout: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The retry policy's `per_try_idle_timeout`, counted in its stat when it ends the body.
    per_try: Option<(Duration, Pin<Box<Sleep>>, Arc<Counter>)>,
    throttle: Option<Throttle>,
    /// The route's `max_stream_duration`: the body is cut (the stream reset) at this instant,
    /// counted in `downstream_rq_max_duration_reached`.
    end: Option<(Pin<Box<Sleep>>, Arc<Counter>)>,
    /// Histograms that get the milliseconds from this instant to the body's end.
    timed: Option<(Instant, Vec<Arc<Histogram>>)>,
}

/// The fault filter's response rate limit: at most `per_tick` bytes every 50 ms (Envoy's
/// `StreamRateLimiter` fills its bucket in twentieths of a second).
struct Throttle {
    per_tick: usize,
    tokens: usize,
    tick: Pin<Box<Sleep>>,
    held: Bytes,
}

const TICK: Duration = Duration::from_millis(50);

impl<B> IdleTimedBody<B> {
    pub fn new(inner: B, timeout: Option<Duration>) -> Self {
        let sleep = timeout.map(|t| Box::pin(tokio::time::sleep(t)));
        IdleTimedBody {
            inner,
            timeout,
            sleep,
            per_try: None,
            throttle: None,
            end: None,
            timed: None,
        }
    }

    /// Records the milliseconds from `since` to the body's last frame in each of `histograms`.
    pub fn timed(mut self, since: Instant, histograms: Vec<Arc<Histogram>>) -> Self {
        self.timed = Some((since, histograms));
        self
    }

    fn record_end(&mut self) {
        if let Some((since, hs)) = self.timed.take() {
            let ms = since.elapsed().as_millis() as u64;
            for h in hs {
                h.record(ms);
            }
        }
    }

    pub fn end_by(&mut self, at: Instant, stat: Arc<Counter>) {
        self.end = Some((Box::pin(tokio::time::sleep_until(at)), stat));
    }

    /// Limits the body to `bytes_per_second`.
    pub fn throttle(&mut self, bytes_per_second: u64) {
        let per_tick = (bytes_per_second / 20).max(1) as usize;
        self.throttle = Some(Throttle {
            per_tick,
            tokens: per_tick,
            tick: Box::pin(tokio::time::sleep(TICK)),
            held: Bytes::new(),
        });
    }

    pub fn with_per_try_idle(mut self, timeout: Option<Duration>, stat: Arc<Counter>) -> Self {
        self.per_try = timeout.map(|t| (t, Box::pin(tokio::time::sleep(t)), stat));
        self
    }
}

impl<B> Body for IdleTimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some((at, stat)) = this.end.as_mut() {
            if at.as_mut().poll(cx).is_ready() {
                stat.inc();
                this.end = None;
                return Poll::Ready(Some(Err(Box::new(StreamIdleTimeout))));
            }
        }
        if let Some(t) = this.throttle.as_mut() {
            if !t.held.is_empty() {
                if t.tokens == 0 {
                    if t.tick.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    t.tokens = t.per_tick;
                    t.tick.as_mut().reset(Instant::now() + TICK);
                }
                let n = t.tokens.min(t.held.len());
                t.tokens -= n;
                let chunk = t.held.split_to(n);
                // Data going out is activity for the idle timers.
                if let (Some(s), Some(t)) = (this.sleep.as_mut(), this.timeout) {
                    s.as_mut().reset(Instant::now() + t);
                }
                if let Some((t, s, _)) = this.per_try.as_mut() {
                    s.as_mut().reset(Instant::now() + *t);
                }
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                if let (Some(s), Some(t)) = (this.sleep.as_mut(), this.timeout) {
                    s.as_mut().reset(Instant::now() + t);
                }
                if let Some((t, s, _)) = this.per_try.as_mut() {
                    s.as_mut().reset(Instant::now() + *t);
                }
                if let (Some(t), Some(Ok(frame))) = (this.throttle.as_mut(), &r) {
                    if frame.is_data() {
                        // Held back and handed out by the tick (the next poll).
                        if let Some(Ok(f)) = r {
                            if let Ok(data) = f.into_data() {
                                t.held = data;
                            }
                        }
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                if r.is_none() || this.inner.is_end_stream() {
                    this.record_end();
                }
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if let Some(s) = this.sleep.as_mut() {
                    if s.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(Box::new(StreamIdleTimeout))));
                    }
                }
                if let Some((_, s, stat)) = this.per_try.as_mut() {
                    if s.as_mut().poll(cx).is_ready() {
                        stat.inc();
                        this.per_try = None;
                        return Poll::Ready(Some(Err(Box::new(StreamIdleTimeout))));
                    }
                }
                Poll::Pending
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.throttle.as_ref().is_none_or(|t| t.held.is_empty()) && self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn idle_timer_restarts_on_activity() {
        let a = StreamActivity::new(false);
        let t = Duration::from_millis(100);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(60)).await;
        a.touch();
        a.idle_expired(t).await;
        assert!(Instant::now() - start >= Duration::from_millis(160));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn request_timeout_only_fires_while_incomplete() {
        let a = StreamActivity::new(false);
        let fired = tokio::time::timeout(
            Duration::from_secs(1),
            a.request_incomplete_at(Instant::now() + Duration::from_millis(10)),
        )
        .await;
        assert!(fired.is_ok());
        let done = StreamActivity::new(true);
        let fired = tokio::time::timeout(
            Duration::from_secs(1),
            done.request_incomplete_at(Instant::now() + Duration::from_millis(10)),
        )
        .await;
        assert!(fired.is_err());
    }

    /// A body that never yields a frame.
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn per_try_idle_ends_a_stalled_body_and_counts() {
        use http_body_util::BodyExt;
        let stat = Arc::new(Counter::default());
        let body = IdleTimedBody::new(Stalled, Some(Duration::from_secs(300)))
            .with_per_try_idle(Some(Duration::from_millis(50)), stat.clone());
        assert!(body.collect().await.is_err());
        assert_eq!(stat.value(), 1);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn max_stream_duration_cuts_a_started_body() {
        use http_body_util::BodyExt;
        let stat = Arc::new(Counter::default());
        let mut body = IdleTimedBody::new(Stalled, None);
        body.end_by(Instant::now() + Duration::from_millis(80), stat.clone());
        let start = Instant::now();
        assert!(body.collect().await.is_err());
        assert!(Instant::now() - start >= Duration::from_millis(80));
        assert_eq!(stat.value(), 1);
    }
}
