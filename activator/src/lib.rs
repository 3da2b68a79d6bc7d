//! Blink's activator: the data plane for HTTP. It routes requests to functions by Host
//! and path, holds them while a function has no ready replica (poking the scaler at
//! once), and forwards them to ready replicas over pooled connections.
//!
//! - [`proxy`]: the request path as tower layers (route → observe → hold → balance →
//!   forward), with [`headers`] for what a proxy changes.
//! - [`function`]: one function's replicas, queue and demand; [`hold`] (queue bounds),
//!   [`balance`] (power of two choices) and [`meter`] (time-weighted averages) are its
//!   pure parts.
//! - [`routes`]: Host/path → function; [`registry`] derives it and every function from
//!   what [`watch`] sees (ScaledObjects, Services, EndpointSlices).
//! - [`pool`]: connections to one replica.
//! - [`demand`]: pokes and snapshots to the scaler that holds the Lease.
//! - [`server`]: the listener (bounds, timeouts, drain), with [`side`] for what waits
//!   beside a connection; [`admin`]: metrics and probes.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod demand;
pub mod function;
pub mod headers;
pub mod hold;
pub mod http1;
pub mod meter;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod registry;
pub mod routes;
pub mod server;
pub mod side;
pub mod socket;
#[cfg(test)]
mod testing;
pub mod watch;

use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The `blink-activator` binary: flags, logs, a runtime, and [`run`].
pub fn main_entry() {
    let config = config::Config::from_args();
    init_logs(&config.log_format);
    return_freed_memory_in_background();
    // One thread asked for: the current-thread scheduler, where the process is that one
    // thread (a multi-thread runtime of one worker keeps the caller's thread besides,
    // and pays for synchronising its queues with the other threads it could have).
    let mut runtime = match config.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(usize::from(threads));
            runtime
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all();
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("blink-activator: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(config)) {
        tracing::error!(error = format!("{e:#}"), "blink-activator stopped");
        std::process::exit(1);
    }
}

/// jemalloc (the binary's allocator, `main.rs` says why) gives freed pages back to the
/// system only when it is next called, and an idle activator hardly calls it: after
/// 10,000 held requests were served, 90 MB stayed resident (idle: 26 MB). Its
/// background thread purges on its own, by the same 10 s decay: 33 MB. One is enough.
fn return_freed_memory_in_background() {
    let enabled = tikv_jemalloc_ctl::max_background_threads::write(1)
        .and_then(|()| tikv_jemalloc_ctl::background_thread::write(true));
    if let Err(e) = enabled {
        tracing::warn!(error = %e, "jemalloc's background purging is off: memory freed after a burst returns only as the activator allocates");
    }
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A burst of held requests is a burst of open sockets: the soft limit on open files
/// goes up to the hard limit at start.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// Runs the activator until SIGTERM or SIGINT, then drains.
pub async fn run(config: config::Config) -> anyhow::Result<()> {
    raise_open_files_limit();
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(metrics::Metrics::register(&mut prometheus));
    let registry = Arc::new(registry::Registry::new(
        registry::Defaults {
            wait_timeout: config.wait_timeout,
            response_timeout: config.response_timeout,
            bounds: hold::QueueBounds {
                max_requests: config.queue_limit,
                max_body_bytes: config.queue_bytes,
            },
            pool: function::PoolConfigEq {
                max_connections: config.max_upstream_connections,
                connect_timeout: config.connect_timeout,
            },
        },
        metrics.clone(),
    ));

    let listener = server::bind(config.listen, config.backlog)
        .with_context(|| format!("cannot listen on --listen {}", config.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot listen on --admin-addr {}", config.admin_addr))?;

    let (listed_tx, listed) = tokio::sync::watch::channel(false);
    tokio::spawn(watch::run(
        client.clone(),
        watch::Scope {
            namespace: config.watch_namespace.clone(),
            activator_service: (config.namespace.clone(), config.activator_service.clone()),
        },
        registry.clone(),
        listed_tx,
    ));
    let (leader_tx, leader) = tokio::sync::watch::channel(None);
    let lease = (config.namespace.clone(), config.scaler_lease.clone());
    tokio::spawn(demand::follow_lease(client, lease.clone(), leader_tx));
    let poker = demand::start(
        demand::ReporterConfig {
            activator: config.pod_name.clone(),
            interval: config.stats_interval,
            token_file: config.token_file.clone(),
            lease,
        },
        registry.clone(),
        metrics.clone(),
        leader,
    );

    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(prometheus),
        admin::Readiness {
            listed,
            draining: shutdown.clone(),
        },
        CancellationToken::new(),
    ));

    let service = proxy::service(
        registry.clone(),
        Arc::new(poker),
        metrics.clone(),
        proxy::PathConfig {
            read_ahead: config::read_ahead(config.max_header_bytes),
            body_timeout: config.body_timeout,
        },
    );
    info!(listen = %config.listen, "blink-activator started");
    let drained = registry.clone();
    server::serve(
        listener,
        service,
        server::ServerConfig {
            max_connections: config.max_connections,
            header_timeout: config.header_timeout,
            max_header_bytes: config.max_header_bytes,
            drain_grace: config.drain_grace,
        },
        metrics,
        shutdown,
        move || drained.drain(),
    )
    .await;
    info!("blink-activator stopped");
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}
