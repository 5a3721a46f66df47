//! One accepted connection: listener filters, the `use_original_dst` hand-off, filter-chain
//! selection, then the chain's terminal network filter.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::filter_chain_match::ConnectionFacts;
use super::listener_filters::{Closed, Detected};
use super::stream::Accepted;
use super::{Listener, Terminal};
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
    use std::sync::atomic::Ordering;
    let counted = !listener.ignore_global_conn_limit;
    if counted {
        let active = super::GLOBAL_DOWNSTREAM_CONNECTIONS.load(Ordering::Relaxed);
        if snap
            .max_downstream_connections
            .is_some_and(|max| active >= max)
        {
            // Envoy closes a connection over the global limit at once.
            listener.stats.downstream_global_cx_overflow.inc();
            return;
        }
    }
    // `then`, not `then_some`: an uncounted connection must not make (and drop) a guard.
    let count = counted.then(GlobalConnection::acquire);
    let (snap, ctx) = (snap.clone(), ctx.clone());
    tokio::task::spawn_local(async move {
        let _count = count;
        let mut stream = stream;
        let local = stream.local_addr().unwrap_or(listener.address);
        let mut buf = BytesMut::new();
        let detected = Detected {
            local,
            restored: false,
            server_name: None,
            transport_protocol: "raw_buffer",
            application_protocols: Vec::new(),
        };
        let Some((l, detected)) =
            run_listener_filters(&mut stream, &mut buf, listener, detected, &snap).await
        else {
            return;
        };
        serve(stream, buf, remote, detected, l, ctx).await;
    });
}

/// Counts a connection toward the global limit until it ends; only [`GlobalConnection::acquire`]
/// makes one, so every decrement has its increment.
struct GlobalConnection(());

impl GlobalConnection {
    fn acquire() -> GlobalConnection {
        super::GLOBAL_DOWNSTREAM_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        GlobalConnection(())
    }
}

impl Drop for GlobalConnection {
    fn drop(&mut self) {
        super::GLOBAL_DOWNSTREAM_CONNECTIONS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The listener filters of the accepting listener, then, for a `use_original_dst` listener whose
/// connection was redirected, those of the listener of the original destination (Envoy's
/// hand-off). None when the filters closed the connection.
async fn run_listener_filters(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    mut l: Arc<Listener>,
    detected: Detected,
    snap: &Snapshot,
) -> Option<(Arc<Listener>, Detected)> {
    let mut detected = filters_of(&l, stream, buf, detected).await?;
    if l.use_original_dst && detected.restored {
        if let Some(target) = snap.listeners.for_original_destination(detected.local) {
            if !Arc::ptr_eq(target, &l) {
                l = target.clone();
                detected = filters_of(&l, stream, buf, detected).await?;
            }
        }
    }
    Some((l, detected))
}

async fn filters_of(
    l: &Listener,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    detected: Detected,
) -> Option<Detected> {
    if l.listener_filters.is_empty() {
        return Some(detected);
    }
    match l.listener_filters.run(stream, buf, detected).await {
        Ok(d) => Some(d),
        Err(Closed::Timeout) => {
            l.stats.downstream_pre_cx_timeout.inc();
            None
        }
        Err(Closed::PeerClosed) => {
            l.stats.downstream_listener_filter_remote_close.inc();
            None
        }
        Err(Closed::TooLarge) => None,
    }
}

async fn serve(
    stream: TcpStream,
    initial: BytesMut,
    remote: SocketAddr,
    d: Detected,
    l: Arc<Listener>,
    ctx: Rc<WorkerCtx>,
) {
    l.stats.downstream_cx_total.inc();
    let start_time = std::time::SystemTime::now();
    let facts = ConnectionFacts {
        destination: d.local,
        source: remote,
        direct_source: remote,
        server_name: d.server_name.as_deref(),
        transport_protocol: d.transport_protocol,
        application_protocols: &d.application_protocols,
    };
    let Some(target) = l.chain_for(&facts).cloned() else {
        // Envoy closes a connection no chain matches; the bytes the inspectors peeked are still
        // unread in its socket, so the peer sees a reset: so it does here.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        l.stats.no_filter_chain_match.inc();
        l.stats.downstream_cx_destroy.inc();
        if !l.access_logs.is_empty() {
            let mut v = crate::observe::formatter::StreamValues::new(start_time, remote, d.local);
            v.response_flags = "NR";
            v.response_code_details = "filter_chain_not_found";
            v.requested_server_name = d.server_name.as_deref().unwrap_or("");
            v.duration = Some(std::time::Duration::ZERO);
            crate::observe::access_log::log_all(&l.access_logs, &v);
        }
        return;
    };
    l.stats.downstream_cx_active.inc();
    let opened = std::time::Instant::now();
    let original_dst = d.restored.then_some(d.local);
    let accepted = Accepted {
        tcp: stream,
        initial,
        tls: target.tls.map(|t| (t, target.handshake_timeout)),
        filters: target.network_filters,
        facts: (remote, d.local, d.server_name.as_deref().map(Arc::from)),
    };
    match target.terminal {
        Terminal::Http(hcm) => {
            let info = ConnInfo {
                remote,
                local: d.local,
                original_dst,
                server_name: d.server_name.as_deref().map(Arc::from),
                tls: None,
                filter_state: Default::default(),
                mx_peer: None,
                codec_error: Default::default(),
            };
            let wire = if l.access_logs.is_empty() {
                None
            } else {
                super::wire_bytes::WireBytes::of(&accepted.tcp)
            };
            let end = conn_manager::serve(accepted, info, hcm, ctx, l.drain.for_connection()).await;
            if let Some(w) = wire {
                let (received, sent) = w.read();
                let mut v =
                    crate::observe::formatter::StreamValues::new(start_time, remote, d.local);
                v.protocol = end.protocol;
                v.response_flags = end.flags;
                v.bytes_received = received;
                v.bytes_sent = sent;
                v.duration = Some(opened.elapsed());
                v.requested_server_name = d.server_name.as_deref().unwrap_or("");
                v.downstream_tls = end.tls.as_deref();
                v.filter_state = end.filter_state.as_deref();
                crate::observe::access_log::log_all(&l.access_logs, &v);
            }
        }
        Terminal::Tcp(cfg) => {
            let sni = d.server_name.as_deref().map(Arc::from);
            let logs = l.access_logs.clone();
            crate::tcp::proxy::serve(accepted, original_dst, sni, cfg, logs, ctx, l.drain.clone())
                .await
        }
    }
    l.stats
        .downstream_cx_length_ms
        .record(opened.elapsed().as_millis() as u64);
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
