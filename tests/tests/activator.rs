//! The activator against the real servers: real `blink-activator` processes on the pod
//! IPs of an activator Deployment, the real scaler, test replicas on the pod IPs of
//! the function's Deployment.

use std::{path::Path, time::Duration};

use anyhow::ensure;
use blink_tests::{
    TestContext,
    activator::{Activators, get},
    pods::{PodProcesses, replica_command},
    scaler::{ScalerProcess, release_finalizers},
    wait,
    workloads::{create_deployment, create_scaled_object, desired},
};
use serde_json::json;

const SCALER: &str = env!("CARGO_BIN_EXE_scaler");
const ACTIVATOR: &str = env!("CARGO_BIN_EXE_activator");
const REPLICA: &str = env!("CARGO_BIN_EXE_test-replica");
const LONG: Duration = Duration::from_secs(60);

async fn start_scaler(ctx: &TestContext, user: &str) -> anyhow::Result<ScalerProcess> {
    ScalerProcess::start(ctx, Path::new(SCALER), user, &[]).await
}

fn replicas_of(ctx: &TestContext, app: &str) -> PodProcesses {
    PodProcesses::start(
        ctx.client(),
        ctx.namespace(),
        &format!("app={app}"),
        |pod| replica_command(Path::new(REPLICA), pod),
    )
}

async fn finish(ctx: &TestContext, scaler: ScalerProcess) -> anyhow::Result<()> {
    scaler.stop().await;
    release_finalizers(ctx).await
}

/// Only the poke can wake the function: the activator's snapshots come once a minute,
/// and the request is answered well within that.
#[test]
fn a_request_at_zero_wakes_the_function_through_the_poke_and_is_answered() {
    blink_tests::run("activator-wake", |ctx| async move {
        create_deployment(&ctx, "hello", 0, json!({})).await?;
        let replicas = replicas_of(&ctx, "hello");
        let scaler = start_scaler(&ctx, "scaler-wake").await?;
        let activators =
            Activators::start(&ctx, Path::new(ACTIVATOR), 1, &["--stats-interval", "60s"]).await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: hello}
spec:
  scaleTargetRef: {name: hello}
  cooldownPeriod: 300
  triggers: [{type: http, metadata: {}}]
",
        )
        .await?;
        let host = format!("hello.{}", ctx.namespace());
        // The route appears once the activator's watch has seen the object.
        wait::until(LONG, "the activator routes the host", || async {
            let (status, _) =
                get(&activators.url(0), "nobody.example", Duration::from_secs(5)).await?;
            ensure!(status == 404, "unexpected status {status}");
            let metrics = activators.metrics(0).await?;
            Ok(metrics.contains("blink_activator_in_flight{").then_some(()))
        })
        .await?;
        ensure!(desired(&ctx, "hello").await? == 0, "starts at zero");
        let started = std::time::Instant::now();
        let (status, body) = get(&activators.url(0), &host, Duration::from_secs(30)).await?;
        let waited = started.elapsed();
        ensure!(
            status == 200 && body.starts_with("hello-"),
            "answered {status} {body:?}; activator log:\n{}",
            activators.log_tail(0)
        );
        ensure!(desired(&ctx, "hello").await? >= 1, "woke the Deployment");
        let queue_waits = activators
            .metric(0, "blink_activator_queue_wait_seconds_count{")
            .await?;
        ensure!(queue_waits == 1.0, "queue-wait observations: {queue_waits}");
        let pokes = activators
            .metric(0, "blink_activator_pokes_sent_total")
            .await?;
        ensure!(pokes >= 1.0, "pokes sent: {pokes}");
        println!("request at zero answered after {waited:?}");
        // Warm: straight through, no wait recorded.
        let (status, _) = get(&activators.url(0), &host, Duration::from_secs(5)).await?;
        ensure!(status == 200, "warm request answered {status}");
        let queue_waits = activators
            .metric(0, "blink_activator_queue_wait_seconds_count{")
            .await?;
        ensure!(queue_waits == 1.0, "a warm request does not wait");
        replicas.shutdown().await;
        activators.processes.shutdown().await;
        finish(&ctx, scaler).await
    });
}
