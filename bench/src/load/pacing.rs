//! Open-loop pacing: when each request is due, and what its latency is measured from.

use std::time::{Duration, Instant};

/// When request `i` of connection `conn` is due: the total rate is spread over the
/// connections, staggered so they do not fire together. `None` when `qps` is 0 (closed loop:
/// each connection sends as soon as its previous answer is in).
pub fn due(start: Instant, qps: f64, connections: usize, conn: usize, i: u64) -> Option<Instant> {
    (qps > 0.0).then(|| {
        let slot = i as f64 * connections as f64 + conn as f64;
        start + Duration::from_secs_f64(slot / qps)
    })
}

/// How many of `total` requests connection `conn` sends: an even share, the first
/// `total % connections` connections one more.
pub fn share(total: u64, connections: usize, conn: usize) -> u64 {
    let c = connections as u64;
    total / c + u64::from((conn as u64) < total % c)
}

/// Where a request's latency starts. A request that found its connection still busy with the
/// previous answer at its due time waited because the server was slow, and that wait is part of
/// what a user would see: it counts from the due time (the correction for coordinated
/// omission). A request whose connection was free counts from when it was sent, so the timer's
/// own lateness is not charged to the server.
pub fn latency_start(due: Option<Instant>, sent: Instant, connection_free_at: Instant) -> Instant {
    match due {
        Some(due) if connection_free_at > due => due,
        _ => sent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_spread_evenly_over_connections() {
        let t0 = Instant::now();
        // 100 qps over 4 connections: a request every 10 ms overall, every 40 ms per connection.
        let ms = |conn, i| {
            due(t0, 100.0, 4, conn, i)
                .unwrap()
                .duration_since(t0)
                .as_millis()
        };
        assert_eq!(
            [ms(0, 0), ms(1, 0), ms(2, 0), ms(3, 0), ms(0, 1)],
            [0, 10, 20, 30, 40]
        );
        assert_eq!(ms(3, 24), 990);
        assert_eq!(due(t0, 0.0, 4, 1, 7), None);
        let shares: Vec<u64> = (0..3).map(|c| share(20, 3, c)).collect();
        assert_eq!(shares, [7, 7, 6]);
        assert_eq!((0..3).map(|c| share(20, 3, c)).sum::<u64>(), 20);
    }

    #[test]
    fn waiting_for_a_slow_answer_counts() {
        let t0 = Instant::now();
        let due_at = t0 + Duration::from_millis(10);
        let late_send = t0 + Duration::from_millis(300);
        // The connection was busy until 300 ms: the request's latency starts at its due time.
        assert_eq!(latency_start(Some(due_at), late_send, late_send), due_at);
        // The connection was free at 5 ms; the timer woke at 11 ms: counted from the send.
        let sent = t0 + Duration::from_millis(11);
        assert_eq!(
            latency_start(Some(due_at), sent, t0 + Duration::from_millis(5)),
            sent
        );
        assert_eq!(latency_start(None, sent, late_send), sent);
    }
}
