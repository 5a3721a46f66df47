//! Worker threads: each runs a single-threaded Tokio runtime with its own accept sockets
//! (SO_REUSEPORT) and its own upstream pools, so a request never hops threads.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::snapshot::Snapshot;
use crate::upstream::pool::WorkerUpstreams;

/// Spawns hyper's background tasks on the current worker's `LocalSet`.
#[derive(Clone, Copy, Debug)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// What every connection on one worker shares.
pub struct WorkerCtx {
    pub current: Arc<ArcSwap<Snapshot>>,
    pub upstreams: WorkerUpstreams,
}

impl WorkerCtx {
    pub fn new(current: Arc<ArcSwap<Snapshot>>) -> Rc<Self> {
        Rc::new(WorkerCtx {
            current,
            upstreams: WorkerUpstreams::default(),
        })
    }
    /// The snapshot a request starts with (a lock-free load).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }
}
