//! Process lifecycle: compile the bootstrap, start workers and the admin server, wait for
//! shutdown (SIGTERM/SIGINT or `/quitquitquit`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::admin::{self, AdminState};
use crate::cli::{Mode, Options};
use crate::config::xds_sink::{SharedSink, XdsState};
use crate::config::{self, snapshot::Snapshot, ConfigError};
use crate::listener::manager::ListenerManager;
use crate::observe::stats::Store;
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
    STARTED.get_or_init(Instant::now);
    let store = Store::default();
    crate::observe::access_log::set_flush_interval(std::time::Duration::from_millis(
        opts.file_flush_interval_msec.into(),
    ));
    crate::tls::secrets::registry().set_store(&store);
    let snapshot = load(&opts, &store)?;
    if opts.mode == Mode::Validate {
        return Ok(());
    }
    if let Some(f) = &snapshot.log_format {
        crate::logging::set_pattern(f);
    }
    crate::memory::release_config_memory();
    let started = Instant::now();
    let server_stats = ServerStats::new(&store, "server.");
    server_stats.concurrency.set(opts.concurrency as i64);
    server_stats
        .days_until_first_cert_expiring
        .set(i32::MAX as i64);
    server_stats.envoy_bug_failures.add(0);
    let admin_addr = snapshot.admin;
    let dynamic = snapshot.dynamic.clone();

    // Bind everything first so that a bad address fails the start, as in Envoy.
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..opts.concurrency {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        senders.push(tx);
        receivers.push(rx);
    }
    let mut manager = ListenerManager::new(senders);
    manager
        .update(&snapshot.listeners, &[])
        .map_err(|e| ServerError::Bind {
            addr: e.addr,
            err: e.err,
        })?;
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
    let current = Arc::new(ArcSwap::from_pointee(snapshot));

    for (i, rx) in receivers.into_iter().enumerate() {
        let current = current.clone();
        std::thread::Builder::new()
            .name(format!("wrk:worker_{i}"))
            .spawn(move || crate::worker::run(rx, current))?;
    }
    server_stats.live.set(1);
    let manager = Arc::new(std::sync::Mutex::new(manager));
    let initialized = Arc::new(AtomicBool::new(false));
    if dynamic.is_none() {
        // Nothing to wait for: workers accept at once.
        if let Ok(mut m) = manager.lock() {
            m.start_workers(&current.load().listeners);
        }
        store.gauge("listener_manager.workers_started").set(1);
        record_initialized(&store);
        server_stats.state.set(0);
        initialized.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // Otherwise INITIALIZING until xDS has answered (`check_init`); like Envoy, `server.state`
    // is not set (so `usedonly` omits it) until then.
    plog!(info, "main", "starting main dispatch loop");

    let opts_for_ads = opts.clone();
    let state = Arc::new(AdminState {
        current: current.clone(),
        store: store.clone(),
        options: opts.clone(),
        started,
        started_wall: std::time::SystemTime::now(),
        healthcheck_failed: AtomicBool::new(false),
        shutdown: tokio::sync::Notify::new(),
        initialized: initialized.clone(),
        manager: manager.clone(),
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
                    let Ok((s, peer)) = l.accept().await else {
                        continue;
                    };
                    let local = s.local_addr().unwrap_or(peer);
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            admin::handle_logged(req, st.clone(), peer, local)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
        }
        spawn_dns_refreshers(&current);
        // Envoy's stats flush (`stats_flush_interval`, 5 s): histograms merge what their workers
        // recorded; the admin shows them as of the last flush.
        let flushed = store.clone();
        let flush_every = current.load().stats_flush_interval;
        let sinks = current.load().stats_sinks.clone();
        if !sinks.is_empty() {
            store.set_sample_sink(Arc::new(crate::observe::stats_sink::AllSinks(
                sinks.clone(),
            )));
        }
        let flush_state = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(flush_every);
            every.tick().await;
            loop {
                every.tick().await;
                flushed.merge_histograms();
                // Envoy's server stats update: once initialized, `server.state` is DRAINING (1)
                // while the health check is failed, else LIVE (0) — what pilot-agent's
                // readiness probe reads.
                if flush_state
                    .initialized
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    let failed = flush_state
                        .healthcheck_failed
                        .load(std::sync::atomic::Ordering::Relaxed);
                    flushed.gauge("server.state").set(i64::from(failed));
                }
                if !sinks.is_empty() {
                    let snap = flushed.snapshot();
                    for s in &sinks {
                        s.flush(&snap);
                    }
                }
            }
        });
        let _ads = start_ads(&current, &store, &opts_for_ads, &manager, &initialized);
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
    opts: &Options,
    manager: &Arc<std::sync::Mutex<ListenerManager>>,
    initialized: &Arc<AtomicBool>,
) -> Option<xds_client::ads::AdsClient> {
    let snap = current.load();
    let d = snap.dynamic.clone()?;
    let handle = Arc::new(std::sync::OnceLock::new());
    let state = XdsState::new(
        current.clone(),
        store.clone(),
        opts.clone(),
        d.clone(),
        manager.clone(),
        handle.clone(),
        initialized.clone(),
    );
    let client = xds_client::ads::spawn(
        xds_client::ads::AdsConfig::new(d.target, d.api, announced_node(&snap.node)),
        SharedSink(state.clone()),
    );
    // The sink follows EDS/RDS names and starts LDS through the client it runs under.
    let _ = handle.set(client.clone());
    // SDS follows the secrets the TLS contexts name.
    tokio::spawn(crate::config::xds_secrets::follow(
        state.clone(),
        current.clone(),
        announced_node(&snap.node),
        Some(client.clone()),
    ));
    if d.cds.is_some() {
        client.subscribe(
            crate::config::xds_sink::CLUSTER_TYPE,
            xds_client::ads::Interest::Wildcard,
        );
    }
    if let Ok(mut s) = state.lock() {
        s.begin();
    }
    Some(client)
}

/// The node as sent to the management server: the bootstrap's, with Petrel's name and build
/// version in the fields Envoy fills with its own.
fn announced_node(
    node: &xds_client::pb::envoy::config::core::v3::Node,
) -> xds_client::pb::envoy::config::core::v3::Node {
    use xds_client::pb::envoy::config::core::v3::{node::UserAgentVersionType, BuildVersion};
    use xds_client::pb::envoy::r#type::v3::SemanticVersion;
    use xds_client::pb::google::protobuf::{value::Kind, Struct, Value};
    let mut n = node.clone();
    n.user_agent_name = "petrel".into();
    let part = |i: usize| {
        env!("CARGO_PKG_VERSION")
            .split('.')
            .nth(i)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    };
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    n.user_agent_version_type = Some(UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
        version: Some(SemanticVersion {
            major_number: part(0),
            minor_number: part(1),
            patch: part(2),
        }),
        metadata: Some(Struct {
            fields: [
                ("build.type".to_string(), text("RELEASE")),
                ("ssl.version".to_string(), text("rustls")),
            ]
            .into_iter()
            .collect(),
        }),
    }));
    n
}

/// When the server began starting (Envoy's `server.initialization_time_ms` counts from here).
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// `server.initialization_time_ms`: from the start until the workers start.
pub fn record_initialized(store: &Store) {
    let since = *STARTED.get_or_init(Instant::now);
    store
        .histogram("server.initialization_time_ms")
        .record(since.elapsed().as_millis() as u64);
}

/// One task per DNS cluster re-resolves it every `dns_refresh_rate` (or, with
/// `respect_dns_ttl`, when its records expire) and publishes a new snapshot when its addresses
/// change.
fn spawn_dns_refreshers(current: &Arc<ArcSwap<Snapshot>>) {
    use crate::upstream::cluster::{refresh, Lookup};
    let snap = current.load();
    for (name, cluster) in &snap.clusters {
        let Some(every) = cluster.dns_refresh else {
            continue;
        };
        let respect_ttl = cluster.respect_dns_ttl;
        let (name, current) = (name.clone(), current.clone());
        tokio::spawn(async move {
            // The boot-time answer came without a TTL: learn it at once.
            let mut wait = if respect_ttl { Duration::ZERO } else { every };
            loop {
                tokio::time::sleep(wait).await;
                wait = every;
                let Some(old) = current.load().clusters.get(&name).cloned() else {
                    return;
                };
                let refreshed = if respect_ttl {
                    let r = crate::upstream::dns_ttl::resolve(&old.dns_names()).await;
                    wait = r.ttl.unwrap_or(every);
                    match r.answers {
                        Some(a) => Ok(refresh(&old, Lookup::Answers(&a))),
                        // A failed resolution keeps the hosts the cluster has, as in Envoy.
                        None => Ok(Ok(None)),
                    }
                } else {
                    // Resolution blocks in getaddrinfo: keep it off the admin/main loop.
                    tokio::task::spawn_blocking(move || refresh(&old, Lookup::System)).await
                };
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
