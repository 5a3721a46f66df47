//! Process lifecycle: compile the bootstrap, start workers and the admin server, wait for
//! shutdown (SIGTERM/SIGINT or `/quitquitquit`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::admin::{self, AdminState};
use crate::cli::{Mode, Options};
use crate::config::{self, snapshot::Snapshot, ConfigError};
use crate::http::conn_manager::{self, ConnInfo};
use crate::listener::filter_chain_match::ConnectionFacts;
use crate::observe::stats::Store;
use crate::worker::WorkerCtx;
use crate::{plog, stat_struct};

stat_struct!(ServerStats {
    gauge live,
    gauge state,
    gauge concurrency,
    gauge uptime,
    gauge total_connections,
    gauge days_until_first_cert_expiring,
    counter envoy_bug_failures,
});

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind {addr}: {err}")]
    Bind {
        addr: std::net::SocketAddr,
        err: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Loads and compiles the bootstrap (what `--mode validate` checks).
pub fn load(opts: &Options, store: &Store) -> Result<Snapshot, ConfigError> {
    let b = config::bootstrap::load(opts)?;
    config::snapshot::compile(&b, opts, store)
}

/// Runs Petrel until shutdown. Returns once the process should exit.
pub fn run(opts: Options) -> Result<(), ServerError> {
    let store = Store::default();
    let snapshot = load(&opts, &store)?;
    if opts.mode == Mode::Validate {
        return Ok(());
    }
    crate::memory::release_config_memory();
    let started = Instant::now();
    let server_stats = ServerStats::new(&store, "server.");
    server_stats.concurrency.set(opts.concurrency as i64);
    server_stats.state.set(0);
    server_stats
        .days_until_first_cert_expiring
        .set(i32::MAX as i64);
    server_stats.envoy_bug_failures.add(0);
    let listeners = snapshot.listeners.clone();
    let admin_addr = snapshot.admin;
    let current = Arc::new(ArcSwap::from_pointee(snapshot));

    // Bind everything first so that a bad address fails the start, as in Envoy.
    let mut per_worker = Vec::new();
    for _ in 0..opts.concurrency {
        let mut socks = Vec::new();
        for l in &listeners {
            let s = crate::listener::bind(l.address).map_err(|err| ServerError::Bind {
                addr: l.address,
                err,
            })?;
            socks.push((l.clone(), s));
        }
        per_worker.push(socks);
    }
    let admin_listener = match admin_addr {
        Some(a) => {
            Some(std::net::TcpListener::bind(a).map_err(|err| ServerError::Bind { addr: a, err })?)
        }
        None => None,
    };
    if let Some(path) = &opts.admin_address_path {
        if let Some(l) = &admin_listener {
            std::fs::write(path, l.local_addr()?.to_string())?;
        }
    }
    if opts.mode == Mode::InitOnly {
        return Ok(());
    }

    for (i, socks) in per_worker.into_iter().enumerate() {
        let current = current.clone();
        std::thread::Builder::new()
            .name(format!("wrk:worker_{i}"))
            .spawn(move || worker_main(socks, current))?;
    }
    store.gauge("listener_manager.workers_started").set(1);
    server_stats.live.set(1);
    plog!(info, "main", "starting main dispatch loop");

    let state = Arc::new(AdminState {
        current: current.clone(),
        store: store.clone(),
        options: opts.clone(),
        started,
        started_wall: std::time::SystemTime::now(),
        healthcheck_failed: AtomicBool::new(false),
        shutdown: tokio::sync::Notify::new(),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Some(l) = admin_listener {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            let st = state.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc =
                            hyper::service::service_fn(move |req| admin::handle(req, st.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
        }
        spawn_dns_refreshers(&current);
        let _ads = start_ads(&current, &store);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => plog!(warn, "main", "caught SIGTERM"),
            _ = tokio::signal::ctrl_c() => plog!(warn, "main", "caught SIGINT"),
            _ = state.shutdown.notified() => plog!(info, "main", "shutting down via /quitquitquit"),
        }
        Ok::<_, ServerError>(())
    })?;
    plog!(info, "main", "exiting");
    Ok(())
}

/// Starts the ADS client when the bootstrap has `dynamic_resources`, subscribed to what they
/// name (CDS today).
fn start_ads(
    current: &Arc<ArcSwap<Snapshot>>,
    store: &Store,
) -> Option<xds_client::ads::AdsClient> {
    let snap = current.load();
    let d = snap.dynamic.clone()?;
    let handle = Arc::new(std::sync::OnceLock::new());
    let sink =
        crate::config::xds_sink::XdsSink::new(current.clone(), store.clone(), handle.clone());
    let client = xds_client::ads::spawn(
        xds_client::ads::AdsConfig::new(d.target, d.api, snap.node.clone()),
        sink,
    );
    // The sink follows EDS names through the client it runs under.
    let _ = handle.set(client.clone());
    if d.cds {
        client.subscribe(
            crate::config::xds_sink::CLUSTER_TYPE,
            xds_client::ads::Interest::Wildcard,
        );
    }
    Some(client)
}

/// One task per DNS cluster re-resolves it every `dns_refresh_rate` and publishes a new
/// snapshot when its addresses change.
fn spawn_dns_refreshers(current: &Arc<ArcSwap<Snapshot>>) {
    let snap = current.load();
    for (name, cluster) in &snap.clusters {
        let Some(every) = cluster.dns_refresh else {
            continue;
        };
        let (name, current) = (name.clone(), current.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(old) = current.load().clusters.get(&name).cloned() else {
                    return;
                };
                // Resolution blocks in getaddrinfo: keep it off the admin/main loop.
                let refreshed =
                    tokio::task::spawn_blocking(move || crate::upstream::cluster::refresh(&old))
                        .await;
                match refreshed {
                    Ok(Ok(Some(new))) => {
                        let next = current.load().with_cluster(Arc::new(new));
                        current.store(Arc::new(next));
                        plog!(debug, "upstream", "DNS hosts of cluster {name} changed");
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => plog!(warn, "upstream", "DNS refresh of cluster {name}: {e}"),
                    Err(_) => return,
                }
            }
        });
    }
}

fn worker_main(
    socks: Vec<(Arc<crate::listener::Listener>, std::net::TcpListener)>,
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
        let mut accepts = Vec::new();
        for (l, s) in socks {
            let Ok(listener) = tokio::net::TcpListener::from_std(s) else {
                continue;
            };
            let ctx = ctx.clone();
            accepts.push(tokio::task::spawn_local(async move {
                loop {
                    let (stream, remote) = match listener.accept().await {
                        Ok(x) => x,
                        Err(_) => continue,
                    };
                    let local = stream.local_addr().unwrap_or(l.address);
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
                        continue;
                    };
                    l.stats.downstream_cx_active.inc();
                    let (l2, ctx) = (l.clone(), ctx.clone());
                    tokio::task::spawn_local(async move {
                        conn_manager::serve(stream, ConnInfo { remote, local }, hcm, ctx).await;
                        l2.stats.downstream_cx_active.dec();
                        l2.stats.downstream_cx_destroy.inc();
                    });
                }
            }));
        }
        for a in accepts {
            let _ = a.await;
        }
    });
}
