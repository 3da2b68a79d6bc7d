//! The cold path with release builds of the scaler and the activator, on the test bed.
//!
//! `tests/bed/bed exec cargo bench -p blink-tests --bench activator_cold`
//! (`BLINK_BENCH_WAKES`, default 40).
//!
//! `BLINK_BENCH_WAKES` functions start at zero behind one activator whose snapshots come
//! once a minute, so only its poke wakes them. Each is woken in turn by one request, and
//! for each wake:
//! - **first byte at zero → PATCH**: this process sends the request (its clock, just
//!   before connecting) → the API server receives the scaler's `/scale` PATCH (the audit
//!   log's `requestReceivedTimestamp`; same machine, same clock);
//! - **endpoint ready → request forwarded**: the activator's histogram
//!   `blink_activator_ready_to_forward_seconds` (the function's first ready endpoint as
//!   the activator learns it → the held request connected to that replica);
//! - Blink's own part of the first: the activator's `blink_activator_poke_seconds` (the
//!   held request's head → the scaler has applied the poke and answered) and the
//!   scaler's `blink_scaler_poke_to_patch_sent_seconds` (the poke applied → the PATCH
//!   written to the API server's connection); the rest is the API server's;
//! - the whole wake as the client sees it.
//!
//! The functions' pods are Ready only once their replica listens (a readiness gate the
//! bed opens, as a real readiness probe would), so an endpoint the activator learns of
//! accepts connections.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use blink_tests::{
    activator::{Activators, get},
    audit,
    pods::{PodProcesses, replica_command},
    scaler::{ScalerProcess, release_finalizers},
    workloads::{create_gated_deployment, create_scaled_object},
};
use k8s_openapi::jiff::Timestamp;

const SCALER: &str = env!("CARGO_BIN_EXE_scaler");
const ACTIVATOR: &str = env!("CARGO_BIN_EXE_activator");
const REPLICA: &str = env!("CARGO_BIN_EXE_test-replica");

fn main() {
    blink_tests::run("bench-activator-cold", |ctx| async move {
        let wakes = std::env::var("BLINK_BENCH_WAKES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(40usize);
        let names: Vec<String> = (0..wakes).map(|i| format!("cold-{i}")).collect();
        for name in &names {
            create_gated_deployment(&ctx, name, 0).await?;
        }
        let replicas = PodProcesses::start(
            ctx.client(),
            ctx.namespace(),
            &format!("app in ({})", names.join(",")),
            |pod| replica_command(Path::new(REPLICA), pod),
        );
        let scaler = ScalerProcess::start(&ctx, Path::new(SCALER), "scaler-cold", &[]).await?;
        let activators =
            Activators::start(&ctx, Path::new(ACTIVATOR), 1, &["--stats-interval", "60s"]).await?;
        for name in &names {
            create_scaled_object(
                &ctx,
                &format!(
                    "
metadata: {{name: {name}}}
spec:
  scaleTargetRef: {{name: {name}}}
  cooldownPeriod: 300
  triggers: [{{type: http, metadata: {{}}}}]
"
                ),
            )
            .await?;
        }
        for name in &names {
            activators.until_routed(ctx.namespace(), name).await?;
        }

        let mut sent_at = Vec::with_capacity(wakes);
        let mut answered_in = Vec::with_capacity(wakes);
        for name in &names {
            let host = format!("{name}.{}", ctx.namespace());
            let sent = Timestamp::now();
            let started = Instant::now();
            let (status, body) = get(&activators.url(0), &host, Duration::from_secs(30)).await?;
            answered_in.push(started.elapsed());
            ensure!(status == 200, "{name}: answered {status} {body:?}");
            sent_at.push(sent);
        }

        let events = audit::read(&ctx.bed().audit_log)?;
        let writes = audit::scale_writes(&events, ctx.namespace(), "deployments");
        let mut to_patch = Vec::with_capacity(wakes);
        for (name, sent) in names.iter().zip(&sent_at) {
            let received = writes
                .iter()
                .filter(|e| e.object_ref.as_ref().and_then(|o| o.name.as_deref()) == Some(name))
                .filter_map(|e| e.request_received_timestamp.parse::<Timestamp>().ok())
                .filter(|at| at >= sent)
                .min()
                .with_context(|| format!("{name}: no /scale PATCH after its request"))?;
            let span = received.duration_since(*sent);
            to_patch.push(Duration::from_nanos(span.as_nanos().try_into()?));
        }

        println!("{wakes} wakes, one function each, release builds");
        report("first byte at zero → PATCH received", &mut to_patch);
        report("request at zero → answered (client)", &mut answered_in);
        let activator_metrics = activators.metrics(0).await?;
        let scaler_metrics = scaler.metrics().await?;
        for (metrics, histogram) in [
            (&activator_metrics, "blink_activator_poke_seconds"),
            (&scaler_metrics, "blink_scaler_poke_to_patch_sent_seconds"),
            (&scaler_metrics, "blink_scaler_poke_to_patch_seconds"),
            (
                &activator_metrics,
                "blink_activator_ready_to_forward_seconds",
            ),
        ] {
            println!("{histogram} (cumulative, le in seconds):");
            for line in metrics.lines().filter(|l| l.starts_with(histogram)) {
                println!("  {line}");
            }
        }
        // A replica that refused its first connection (it was not listening yet) shows
        // here; its probe's wait is in `ready_to_forward`.
        for line in activator_metrics
            .lines()
            .filter(|l| l.starts_with("blink_activator_proxy_errors"))
        {
            println!("{line}");
        }

        replicas.shutdown().await;
        activators.processes.shutdown().await;
        scaler.stop().await;
        release_finalizers(&ctx).await
    });
}

/// Prints p50, p90, p99 and the largest of `samples`.
fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms =
        |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "{what}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(1.0)
    );
}
