//! Worker threads: each runs a single-threaded Tokio runtime with its own accept sockets
//! (SO_REUSEPORT) and its own upstream pools, so a request never hops threads.

use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::snapshot::Snapshot;
use crate::listener::manager::WorkerCmd;
use crate::plog;
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

/// A worker thread's life: a single-threaded runtime that accepts on the sockets the listener
/// manager hands it, until the process exits.
pub fn run(
    mut commands: tokio::sync::mpsc::UnboundedReceiver<WorkerCmd>,
    current: Arc<ArcSwap<Snapshot>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            plog!(critical, "main", "worker runtime: {e}");
            std::process::exit(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let ctx = WorkerCtx::new(current);
        let mut accepting: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
        while let Some(cmd) = commands.recv().await {
            match cmd {
                WorkerCmd::Accept {
                    name,
                    generation,
                    socket,
                } => {
                    let Ok(socket) = tokio::net::TcpListener::from_std(socket) else {
                        continue;
                    };
                    let task = tokio::task::spawn_local(accept_loop(name, socket, ctx.clone()));
                    accepting.insert(generation, task);
                }
                // Dropping the accept task closes the socket; accepted connections live on.
                WorkerCmd::Stop { generation } => {
                    if let Some(t) = accepting.remove(&generation) {
                        t.abort();
                    }
                }
            }
        }
    });
}

/// Accepts connections for the listener called `name`, as the current snapshot has it.
async fn accept_loop(name: String, socket: tokio::net::TcpListener, ctx: Rc<WorkerCtx>) {
    loop {
        let (stream, remote) = match socket.accept().await {
            Ok(x) => x,
            Err(_) => continue,
        };
        let snap = ctx.snapshot();
        let Some(l) = snap.listeners.get(&name).cloned() else {
            crate::plog!(debug, "conn_handler", "{name}: no such listener in this worker's configuration; closing the connection from {remote}");
            continue;
        };
        crate::listener::connection::accept(stream, remote, l, &snap, &ctx);
    }
}
