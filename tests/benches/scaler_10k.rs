//! The scaler at 10,000 functions, against the test bed's real API server.
//!
//! `tests/bed/bed exec cargo bench -p blink-tests --bench scaler_10k`
//! (`BLINK_BENCH_FUNCTIONS` changes the count; `BLINK_BENCH_RSS_ONLY=1` stops after the
//! start-up settles). Prints: scaler start → first full
//! decision pass, RSS, API writes and CPU per minute under steady demand, and poke →
//! PATCH latency for functions at zero while the others exist (client-side, from the
//! poke's send to the Deployment's `spec.replicas` seen by a watch; and the scaler's
//! own histogram).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use blink_crds::{FunctionKey, ScaledObject};
use blink_tests::{
    demand::{DemandClient, demand, service_account_token},
    scaler::{ACTIVATOR_SERVICE_ACCOUNT, ScalerProcess, release_finalizers},
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

const SCALER: &str = env!("CARGO_BIN_EXE_scaler");

fn main() {
    let functions: usize = std::env::var("BLINK_BENCH_FUNCTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    blink_tests::run("bench-10k", move |ctx| async move {
        let ns = ctx.namespace().to_owned();
        let deployments: Api<Deployment> = ctx.api();
        let objects: Api<ScaledObject> = ctx.api();
        let created = Instant::now();
        futures::stream::iter(0..functions)
            .map(|i| {
                let (deployments, objects) = (deployments.clone(), objects.clone());
                async move {
                    let name = format!("f{i:05}");
                    let deployment: Deployment = serde_json::from_value(json!({
                        "metadata": {"name": name},
                        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                                 "template": {"metadata": {"labels": {"app": name}},
                                              "spec": {"containers": [{"name": "app", "image": "blink.sh/f"}]}}}
                    }))?;
                    deployments.create(&PostParams::default(), &deployment).await?;
                    let object: ScaledObject = serde_json::from_value(json!({
                        "apiVersion": "blink.sh/v1alpha1", "kind": "ScaledObject",
                        "metadata": {"name": name},
                        "spec": {"scaleTargetRef": {"name": name}, "cooldownPeriod": 30,
                                 "advanced": {"stableWindowSeconds": 10},
                                 "triggers": [{"type": "http", "metadata": {"targetConcurrency": "10"}}]}
                    }))?;
                    objects.create(&PostParams::default(), &object).await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(64)
            .try_collect::<Vec<()>>()
            .await?;
        println!(
            "created {functions} Deployments and ScaledObjects in {:.1?}",
            created.elapsed()
        );

        let started = Instant::now();
        let scaler = ScalerProcess::start(
            &ctx,
            Path::new(SCALER),
            "scaler-bench",
            &["--resync", "10m"],
        )
        .await?;
        loop {
            let decided = scaler
                .metric("blink_scaler_first_decisions_total")
                .await
                .unwrap_or(0.0);
            if decided as usize >= functions {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "no full pass after 10 min ({decided} decided)"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let first_pass = started.elapsed();
        let rss_after_pass = scaler.rss_bytes().unwrap_or(0);
        println!(
            "scaler start → first full pass over {functions}: {first_pass:.2?}; RSS {} MB",
            rss_after_pass / 1_000_000
        );

        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        // The start-up burst (a status write per object) settles before latency is
        // measured: the API server is shared, and the question is one function's wake
        // while 9,999 others exist, not during the first pass.
        let mut last = scaler.metric("blink_scaler_api_writes_total").await?;
        let settling = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = scaler.metric("blink_scaler_api_writes_total").await?;
            if now == last || settling.elapsed() > Duration::from_secs(300) {
                break;
            }
            last = now;
        }
        println!(
            "start-up writes settled {:.0?} after the first pass ({last} writes)",
            settling.elapsed()
        );

        // `BLINK_BENCH_RSS_ONLY=1`: stop once the start-up settles (memory runs).
        if std::env::var("BLINK_BENCH_RSS_ONLY").is_ok() {
            println!(
                "RSS settled {} MB",
                scaler.rss_bytes().unwrap_or(0) / 1_000_000
            );
            scaler.stop().await;
            return Ok(());
        }
        // Baseline, same run: a PATCH of /scale by this client, seen by the same kind of
        // watch, on Deployments Blink does not follow.
        let mut direct = Vec::new();
        for i in 0..50 {
            let name = format!("direct-{i:02}");
            let deployment: Deployment = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}},
                                      "spec": {"containers": [{"name": "app", "image": "blink.sh/f"}]}}}
            }))?;
            deployments
                .create(&PostParams::default(), &deployment)
                .await?;
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut changes = watcher::watcher(deployments.clone(), config)
                .applied_objects()
                .boxed();
            changes.try_next().await?.context("initial state")?;
            let sent = Instant::now();
            deployments
                .patch_scale(
                    &name,
                    &Default::default(),
                    &kube::api::Patch::Merge(&json!({"spec": {"replicas": 1}})),
                )
                .await?;
            loop {
                let deployment = changes.try_next().await?.context("watch ended")?;
                if deployment.spec.and_then(|s| s.replicas).unwrap_or(0) > 0 {
                    direct.push(sent.elapsed());
                    break;
                }
            }
        }
        direct.sort();
        println!(
            "baseline: a direct PATCH of /scale seen by a watch, {} PATCHes: p50 {:.2?}, p99 {:.2?}",
            direct.len(),
            direct[direct.len() / 2],
            direct[(direct.len() * 99 / 100).min(direct.len() - 1)]
        );

        // Poke → PATCH for functions at zero while the others exist.
        let mut latencies = Vec::new();
        let poker = DemandClient::new(scaler.demand_addr, Some(token.clone()), "bench-poker");
        for i in 0..200 {
            let name = format!("f{:05}", functions - 1 - i);
            let key = FunctionKey::new(&ns, &name)?;
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut changes = watcher::watcher(deployments.clone(), config)
                .applied_objects()
                .boxed();
            // The first event is the current state (0 replicas).
            changes.try_next().await?.context("initial state")?;
            let sent = Instant::now();
            poker.poke(&key).await?;
            loop {
                let deployment = changes.try_next().await?.context("watch ended")?;
                if deployment.spec.and_then(|s| s.replicas).unwrap_or(0) > 0 {
                    latencies.push(sent.elapsed());
                    break;
                }
            }
        }
        latencies.sort();
        let p =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        println!(
            "poke → PATCH seen by a watch, {} pokes: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            latencies.len(),
            p(0.5),
            p(0.99),
            latencies[latencies.len() - 1]
        );
        let metrics = scaler.metrics().await?;
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("blink_scaler_poke_to_patch"))
        {
            println!("  {line}");
        }
        // Steady demand: a hundredth of the functions at a constant 20 concurrent (→ 2 each),
        // the rest silent; snapshots every second, as activators send them.
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let mut client =
            DemandClient::new(scaler.demand_addr, Some(token.clone()), "bench-activator");
        let busy: Vec<FunctionKey> = (0..functions / 100)
            .map(|i| FunctionKey::new(&ns, format!("f{i:05}")))
            .collect::<Result<_, _>>()?;
        let snapshot: Vec<_> = busy.iter().map(|k| demand(k, 20.0, 40)).collect();
        for _ in 0..30 {
            client.snapshot(snapshot.clone()).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let writes_before = scaler.metric("blink_scaler_api_writes_total").await?;
        let cpu_before = scaler.cpu_seconds().unwrap_or(0.0);
        let steady = Instant::now();
        while steady.elapsed() < Duration::from_secs(60) {
            client.snapshot(snapshot.clone()).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let writes = scaler.metric("blink_scaler_api_writes_total").await? - writes_before;
        let cpu = scaler.cpu_seconds().unwrap_or(0.0) - cpu_before;
        let rss_steady = scaler.rss_bytes().unwrap_or(0);
        println!(
            "steady demand ({} busy at 2 replicas, the rest at zero) for 60 s: {writes} API writes; scaler CPU {cpu:.1} s/min; RSS {} MB",
            busy.len(),
            rss_steady / 1_000_000
        );

        scaler.stop().await;
        release_finalizers(&ctx).await?;
        Ok(())
    });
}
