//! Blink's job end to end on the test bed (`make run`): the scaler, an activator, and a
//! sample function `hello` at zero replicas behind a ScaledObject. Prints the command
//! that sends it a request (which wakes it) and how to watch it go back to zero; runs
//! until Ctrl-C, then cleans up.
//!
//! Built and started by `tests/bed/run-blink`, which passes the binaries to run.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use blink_tests::{
    activator::Activators,
    pods::{PodProcesses, replica_command},
    scaler::{ScalerProcess, release_finalizers},
    workloads::{create_deployment, create_scaled_object},
};
use clap::Parser;
use serde_json::json;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    scaler: PathBuf,
    #[arg(long)]
    activator: PathBuf,
    #[arg(long)]
    replica: PathBuf,
}

fn main() {
    let args = Args::parse();
    blink_tests::run("demo", move |ctx| async move {
        let ns = ctx.namespace().to_owned();
        println!("Starting Blink in namespace {ns} ...");
        let scaler = ScalerProcess::start(&ctx, &args.scaler, "blink-scaler", &[]).await?;
        let activators = Activators::start(&ctx, &args.activator, 1, &[]).await?;
        create_deployment(&ctx, "hello", 0, json!({})).await?;
        let replica = args.replica.clone();
        let replicas = PodProcesses::start(ctx.client(), &ns, "app=hello", move |pod| {
            replica_command(&replica, pod)
        });
        create_scaled_object(
            &ctx,
            "
metadata: {name: hello}
spec:
  scaleTargetRef: {name: hello}
  cooldownPeriod: 20
  advanced: {stableWindowSeconds: 10}
  triggers: [{type: http, metadata: {hosts: hello.example}}]
",
        )
        .await?;
        let activator = activators.url(0);
        println!(
            "
Blink is running: the scaler, an activator at {activator}, and the function `hello`
(Deployment {ns}/hello) at zero replicas.

Send it a request — the activator holds it, the scaler wakes `hello`, a replica answers:

    tests/bed/bed exec curl -s -H 'Host: hello.example' {activator}/

Watch it wake, then go back to zero about 30 s after the last request:

    tests/bed/bed kubectl get deployment hello -n {ns} -w

Logs: scaler {scaler_log}, activator {activator_logs}.
Ctrl-C stops Blink and removes the namespace.
",
            scaler_log = scaler.log.display(),
            activator_logs = activators.log_dir.display(),
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        println!("stopping ...");
        replicas.shutdown().await;
        activators.processes.shutdown().await;
        scaler.stop().await;
        release_finalizers(&ctx).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(())
    });
}
