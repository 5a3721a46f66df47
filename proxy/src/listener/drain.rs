//! Draining a listener's connections after the listener is updated or removed (or by
//! `/drain_listeners`): new connections go to the new listener at once; the old one's
//! connections close as Envoy 1.40 closes them — an HTTP/1.1 response gets `connection: close`
//! and an HTTP/2 connection GOAWAY once the drain says so at the end of a stream (idle
//! connections are left alone) — and whatever remains after `--drain-time-s` is closed.

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

    /// This drain as one connection sees it.
    pub fn for_connection(&self) -> ConnDrain {
        ConnDrain {
            drain: self.clone(),
            pick: rand::random::<f64>(),
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

/// One connection's part in a drain: with the immediate strategy it closes as soon as the drain
/// starts; with the gradual one at its own moment, spread evenly over the drain time (so the
/// share of closed connections grows linearly, as Envoy's gradual drain does).
#[derive(Debug, Clone)]
pub struct ConnDrain {
    drain: Drain,
    pick: f64,
}

impl ConnDrain {
    fn deadline(&self) -> Option<Instant> {
        let (at, time, strategy) = self.drain.0.started.get()?;
        Some(match strategy {
            DrainStrategy::Immediate => *at,
            DrainStrategy::Gradual => *at + time.mul_f64(self.pick),
        })
    }

    /// Whether the connection should close after its current response (`drainClose()`).
    pub fn should_close(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Resolves when the drain time is over.
    pub async fn finished(&self) {
        self.drain.finished().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn immediate_closes_at_once_and_finishes_after_drain_time() {
        let d = Drain::default();
        assert!(!d.is_draining() && !d.for_connection().should_close());
        d.start(Duration::from_millis(20), DrainStrategy::Immediate);
        assert!(d.for_connection().should_close());
        d.started().await;
        tokio::time::timeout(Duration::from_secs(2), d.finished())
            .await
            .expect("drain finishes");
    }

    #[test]
    fn gradual_spreads_connections_over_the_drain_time() {
        let d = Drain::default();
        let conns: Vec<ConnDrain> = (0..1000).map(|_| d.for_connection()).collect();
        assert!(!conns[0].should_close());
        d.start(Duration::from_secs(3600), DrainStrategy::Gradual);
        let closes = conns.iter().filter(|c| c.should_close()).count();
        assert!(closes < 10, "{closes}");
        let half = conns
            .iter()
            .filter(|c| {
                c.deadline()
                    .is_some_and(|x| x < Instant::now() + Duration::from_secs(1800))
            })
            .count();
        assert!((400..600).contains(&half), "{half}");
    }
}
