//! One accepted connection: listener filters, the `use_original_dst` hand-off, filter-chain
//! selection, then the chain's terminal network filter.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::filter_chain_match::ConnectionFacts;
use super::Listener;
use crate::config::snapshot::Snapshot;
use crate::http::conn_manager::{self, ConnInfo};
use crate::worker::WorkerCtx;

/// Runs a connection accepted by `listener` on this worker.
pub fn accept(
    stream: TcpStream,
    remote: SocketAddr,
    listener: Arc<Listener>,
    snap: &Arc<Snapshot>,
    ctx: &Rc<WorkerCtx>,
) {
    let (snap, ctx) = (snap.clone(), ctx.clone());
    tokio::task::spawn_local(async move {
        let mut l = listener;
        let mut local = stream.local_addr().unwrap_or(l.address);
        if l.use_original_dst {
            if let Some(dst) = original_destination(&stream) {
                local = dst;
                // Hand the connection to the listener of the original destination, if any.
                if let Some(target) = snap.listeners.for_original_destination(dst) {
                    l = target.clone();
                }
            }
        }
        serve(stream, remote, local, l, ctx).await;
    });
}

async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    l: Arc<Listener>,
    ctx: Rc<WorkerCtx>,
) {
    l.stats.downstream_cx_total.inc();
    let facts = ConnectionFacts {
        destination: local,
        source: remote,
        direct_source: remote,
        server_name: None,
        transport_protocol: "raw_buffer",
        application_protocols: &[],
    };
    let Some(hcm) = l.chain_for(&facts).cloned() else {
        // Envoy closes a connection no chain matches.
        l.stats.no_filter_chain_match.inc();
        l.stats.downstream_cx_destroy.inc();
        return;
    };
    l.stats.downstream_cx_active.inc();
    conn_manager::serve(
        stream,
        ConnInfo { remote, local },
        hcm,
        ctx,
        l.drain.clone(),
    )
    .await;
    l.stats.downstream_cx_active.dec();
    l.stats.downstream_cx_destroy.inc();
}

/// The destination a connection had before iptables redirected it (`SO_ORIGINAL_DST`), when it
/// was redirected.
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = stream.as_raw_fd();
    let local = stream.local_addr().ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed sockaddr_storage.
    let (storage, ok) = unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let level = if local.is_ipv4() {
            libc::SOL_IP
        } else {
            libc::SOL_IPV6
        };
        let r = libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            &mut storage as *mut _ as *mut libc::c_void,
            &mut len,
        );
        (storage, r == 0)
    };
    if !ok {
        return None;
    }
    let addr = match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read(&storage as *const _ as *const _) };
            SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                u16::from_be(sin.sin_port),
            )
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read(&storage as *const _ as *const _) };
            SocketAddr::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                u16::from_be(sin6.sin6_port),
            )
        }
        _ => return None,
    };
    Some(addr)
}
