//! Draining a listener's connections after the listener is updated or removed: new connections
//! go to the new listener at once; the old one's connections are asked to close (HTTP/1.1 gets
//! `connection: close`, idle ones close, HTTP/2 gets GOAWAY) and whatever remains after
//! `--drain-time-s` is closed.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::cli::DrainStrategy;

#[derive(Debug)]
struct Inner {
    started: OnceLock<(Instant, Duration, DrainStrategy)>,
    tx: tokio::sync::watch::Sender<bool>,
}

/// One listener generation's drain state, shared by its connections on every worker.
#[derive(Debug, Clone)]
pub struct Drain(Arc<Inner>);

impl Default for Drain {
    fn default() -> Self {
        let (tx, _) = tokio::sync::watch::channel(false);
        Drain(Arc::new(Inner {
            started: OnceLock::new(),
            tx,
        }))
    }
}

impl Drain {
    /// Starts the drain sequence (once; later calls keep the first).
    pub fn start(&self, drain_time: Duration, strategy: DrainStrategy) {
        if self
            .0
            .started
            .set((Instant::now(), drain_time, strategy))
            .is_ok()
        {
            self.0.tx.send_replace(true);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.0.started.get().is_some()
    }

    /// Whether a connection should close now (Envoy's `drainClose()`): always once draining
    /// with the immediate strategy; with the gradual one, with a probability that grows
    /// linearly over the drain time.
    pub fn should_close(&self) -> bool {
        let Some((at, time, strategy)) = self.0.started.get() else {
            return false;
        };
        match strategy {
            DrainStrategy::Immediate => true,
            DrainStrategy::Gradual => {
                let elapsed = at.elapsed();
                if elapsed >= *time || time.is_zero() {
                    return true;
                }
                rand::random::<f64>() < elapsed.as_secs_f64() / time.as_secs_f64()
            }
        }
    }

    /// Resolves when draining starts.
    pub async fn started(&self) {
        let mut rx = self.0.tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Resolves when the drain time is over: connections still open are closed then.
    pub async fn finished(&self) {
        self.started().await;
        if let Some((at, time, _)) = self.0.started.get() {
            tokio::time::sleep_until((*at + *time).into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn immediate_closes_at_once_and_finishes_after_drain_time() {
        let d = Drain::default();
        assert!(!d.is_draining() && !d.should_close());
        d.start(Duration::from_millis(20), DrainStrategy::Immediate);
        assert!(d.should_close());
        d.started().await;
        tokio::time::timeout(Duration::from_secs(2), d.finished())
            .await
            .expect("drain finishes");
    }

    #[test]
    fn gradual_starts_mostly_open() {
        let d = Drain::default();
        d.start(Duration::from_secs(3600), DrainStrategy::Gradual);
        let closes = (0..1000).filter(|_| d.should_close()).count();
        assert!(closes < 10, "{closes}");
    }
}
