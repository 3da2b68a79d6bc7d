//! Blink's control plane: watches `ScaledObject`s and annotated workloads, decides from
//! demand, and patches `/scale`.
//!
//! Where things are decided:
//! - [`decide`]: how many replicas a function should have (pure, no I/O).
//! - [`function`]: acting on one function — its single writer, status and Events.
//! - [`controller`]: which functions exist, conflicts between them, target changes.
//! - [`generated`]: the `ScaledObject` an annotated workload stands for.
//! - [`triggers`]: what a pull trigger measures (RabbitMQ, Kafka, Prometheus, cron).
//! - [`demand`]: what activators report (snapshots, pokes) and who may report it.
//! - [`leader`]: whether this process may write.
//! - [`retry`]: when to try again what the API server refused.
//! - [`target`]: reading and setting replicas (`/scale`).
//! - [`config`], [`metrics`], [`admin`]: flags, Prometheus metrics, the admin port.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod controller;
pub mod decide;
pub mod demand;
pub mod function;
pub mod generated;
pub mod leader;
pub mod metrics;
pub mod retry;
pub mod target;
pub mod transparent;
pub mod triggers;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::Context as _;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Reads and background writes in flight at once (status, finalizers, `/scale` reads).
pub const API_CONCURRENCY: usize = 64;

/// The `blink-scaler` binary: flags, logs, a runtime, and [`run`].
pub fn main_entry() {
    let config = config::Config::from_args();
    init_logs(&config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("blink-scaler: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(config)) {
        tracing::error!(error = format!("{e:#}"), "blink-scaler stopped");
        std::process::exit(1);
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

/// Runs the scaler until SIGTERM or SIGINT.
pub async fn run(config: config::Config) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));
    let demand_metrics = demand::DemandMetrics::register(&mut registry);

    let demand_listener = tokio::net::TcpListener::bind(config.demand_addr)
        .await
        .with_context(|| format!("cannot listen on --demand-addr {}", config.demand_addr))?;
    let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot listen on --admin-addr {}", config.admin_addr))?;
    let advertised: SocketAddr =
        format!("{}:{}", config.pod_ip, demand_listener.local_addr()?.port())
            .parse()
            .with_context(|| format!("--pod-ip {:?} is not an IP address", config.pod_ip))?;
    let identity = leader::holder_identity(&config.pod_name, advertised);
    let (leadership, lease_task) = leader::Leadership::start(
        client.clone(),
        leader::LeaseConfig {
            namespace: config.namespace.clone(),
            name: config.lease_name.clone(),
            identity: identity.clone(),
            duration: config.lease_duration,
            grace: config.lease_grace,
        },
        shutdown.clone(),
    );

    let demand = demand::Demand::new(demand::DemandConfig {
        stale_after: config.demand_stale_after,
        forget_after: config.demand_forget_after,
    });
    // The activators' ready addresses, for Blink's slices in transparent mode.
    let (addresses, activator_addresses) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(demand::watch_activators(
        client.clone(),
        config.namespace.clone(),
        config.activator_service.clone(),
        demand.clone(),
        addresses,
    ));
    let server = demand::server::app(demand::server::ServerState::new(
        demand.clone(),
        leadership.clone(),
        Arc::new(demand::server::KubeTokenReviewer::new(client.clone())),
        config.activator_user(),
        demand_metrics,
    ));
    tokio::spawn(demand::server::serve(
        demand_listener,
        server,
        shutdown.clone(),
    ));

    let ready = Arc::new(AtomicBool::new(false));
    let admin = admin::app(admin::AdminState {
        registry: Arc::new(registry),
        ready: ready.clone(),
    });
    let admin_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(admin_listener, admin)
            .with_graceful_shutdown(admin_shutdown.cancelled_owned())
            .await;
    });

    let connections = triggers::Connections::new(config.trigger_timeout);
    let scale: Arc<dyn target::ScaleTarget> = Arc::new(target::KubeScale::new(client.clone()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "blink-scaler".into(),
            instance: Some(config.pod_name.clone()),
        },
    );
    tokio::spawn(transparent::follow_activators(
        client.clone(),
        (!config.watch_namespace.is_empty()).then(|| config.watch_namespace.clone()),
        activator_addresses.clone(),
        leadership.clone(),
        shutdown.clone(),
    ));
    let slices =
        transparent::Slices::new(client.clone(), activator_addresses, config.activator_port);
    let ctx = Arc::new(function::Context {
        slices: Some(slices),
        api_permits: tokio::sync::Semaphore::new(API_CONCURRENCY),
        synced: AtomicBool::new(false),
        client,
        writer: function::writer::Writer::new(scale, demand.clone(), leadership.clone()),
        config: config.clone(),
        demand,
        leadership,
        connections,
        metrics,
        recorder,
    });
    info!(%identity, "blink-scaler started");
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    controller::run(ctx, shutdown.clone()).await?;
    shutdown.cancel();
    let _ = lease_task.await;
    info!("blink-scaler stopped");
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
