//! The listener manager: owns the listening sockets and tells each worker which ones to accept
//! on. Sockets are bound on the main thread when a listener is first seen (so a bind failure
//! refuses the bootstrap, or that listener of an LDS update), one per worker with SO_REUSEPORT; workers accept
//! only once initialization is over and only for active (warmed) listeners. A listener updated at
//! the same address keeps its sockets: only the configuration connections get changes.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::sync::mpsc::UnboundedSender;

use super::{Listener, ListenerSet};

/// What the main thread asks of a worker.
#[derive(Debug)]
pub enum WorkerCmd {
    /// Accept on this socket for the listener of this name.
    Accept {
        name: String,
        generation: u64,
        socket: std::net::TcpListener,
    },
    /// Stop accepting on the socket of this generation (closing it).
    Stop { generation: u64 },
}

#[derive(Debug, thiserror::Error)]
#[error("cannot bind '{addr}': {err}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub err: std::io::Error,
}

#[derive(Debug)]
struct Bound {
    generation: u64,
    /// One socket per worker until they are handed over.
    pending: Option<Vec<std::net::TcpListener>>,
    /// `traffic_direction: INBOUND` (for `/drain_listeners?inboundonly`).
    inbound: bool,
}

/// Which listeners `/drain_listeners` stopped: they, and any added later, do not accept.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stopped {
    None,
    Inbound,
    All,
}

#[derive(Debug)]
pub struct ListenerManager {
    workers: Vec<UnboundedSender<WorkerCmd>>,
    bound: HashMap<(String, SocketAddr), Bound>,
    next_generation: u64,
    workers_started: bool,
    stopped: Stopped,
}

fn key(l: &Listener) -> (String, SocketAddr) {
    (l.name.clone(), l.address)
}

impl ListenerManager {
    pub fn new(workers: Vec<UnboundedSender<WorkerCmd>>) -> Self {
        ListenerManager {
            workers,
            bound: HashMap::new(),
            next_generation: 0,
            workers_started: false,
            stopped: Stopped::None,
        }
    }

    /// Makes the sockets match the listeners: binds those of new listeners (all or nothing),
    /// closes those no listener needs any more, and hands active ones to the workers once they
    /// have started.
    pub fn update(&mut self, active: &ListenerSet, warming: &[&Listener]) -> Result<(), BindError> {
        let needed: Vec<&Listener> = active
            .iter()
            .map(|l| l.as_ref())
            .chain(warming.iter().copied())
            .filter(|l| l.bind_to_port)
            .collect();
        for l in &needed {
            self.bind(l)?;
        }
        let keep: std::collections::HashSet<(String, SocketAddr)> =
            needed.iter().map(|l| key(l)).collect();
        self.close_where(|k, _| !keep.contains(k));
        if self.workers_started {
            self.hand_over(active);
        }
        Ok(())
    }

    /// Binds a listener's sockets now (kept until `update` finds no listener needs them), so
    /// that a listener that cannot bind is refused on its own.
    pub fn bind(&mut self, l: &Listener) -> Result<(), BindError> {
        let k = key(l);
        let stopped = match self.stopped {
            Stopped::None => false,
            Stopped::Inbound => l.inbound,
            Stopped::All => true,
        };
        if stopped || self.bound.contains_key(&k) {
            return Ok(());
        }
        let mut socks = Vec::with_capacity(self.workers.len());
        for _ in 0..self.workers.len().max(1) {
            socks.push(super::bind(l.address).map_err(|err| BindError {
                addr: l.address,
                err,
            })?);
        }
        self.next_generation += 1;
        self.bound.insert(
            k,
            Bound {
                generation: self.next_generation,
                pending: Some(socks),
                inbound: l.inbound,
            },
        );
        Ok(())
    }

    /// Initialization is over: workers start accepting on the active listeners.
    pub fn start_workers(&mut self, active: &ListenerSet) {
        self.workers_started = true;
        self.hand_over(active);
    }

    pub fn workers_started(&self) -> bool {
        self.workers_started
    }

    /// Stops accepting on every listener (or the inbound ones), now and for listeners added
    /// later; their sockets close, their connections carry on.
    pub fn stop_accepting(&mut self, inbound_only: bool) {
        self.stopped = match (self.stopped, inbound_only) {
            (Stopped::All, _) | (_, false) => Stopped::All,
            _ => Stopped::Inbound,
        };
        let stopped = self.stopped;
        self.close_where(|_, b| stopped == Stopped::All || b.inbound);
    }

    /// Closes the sockets `which` picks (workers stop accepting on those they had).
    fn close_where(&mut self, which: impl Fn(&(String, SocketAddr), &Bound) -> bool) {
        let gone: Vec<_> = self
            .bound
            .iter()
            .filter(|(k, b)| which(k, b))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(b) = self.bound.remove(&k) {
                if b.pending.is_none() {
                    self.send_all(|| WorkerCmd::Stop {
                        generation: b.generation,
                    });
                }
            }
        }
    }

    fn hand_over(&mut self, active: &ListenerSet) {
        let stopped = self.stopped;
        let accepts = |l: &Listener| match stopped {
            Stopped::None => true,
            Stopped::Inbound => !l.inbound,
            Stopped::All => false,
        };
        for l in active.iter().filter(|l| l.bind_to_port && accepts(l)) {
            let Some(b) = self.bound.get_mut(&key(l)) else {
                continue;
            };
            let Some(socks) = b.pending.take() else {
                continue;
            };
            for (w, socket) in self.workers.iter().zip(socks) {
                let _ = w.send(WorkerCmd::Accept {
                    name: l.name.clone(),
                    generation: b.generation,
                    socket,
                });
            }
        }
    }

    fn send_all(&self, cmd: impl Fn() -> WorkerCmd) {
        for w in &self.workers {
            let _ = w.send(cmd());
        }
    }
}
