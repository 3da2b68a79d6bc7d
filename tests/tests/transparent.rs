//! Transparent mode against the real servers: Blink's EndpointSlice on the function's
//! own Service, kube-proxy sending the ClusterIP to the address it names (a stand-in
//! process on an activator pod IP), and the order of slice and `/scale` writes in the
//! audit log.

use std::{collections::BTreeSet, path::Path, time::Duration};

use anyhow::{Context as _, ensure};
use blink_crds::{Condition, FunctionKey, ScaledObject};
use blink_tests::{
    TestContext, audit,
    demand::{DemandClient, demand, service_account_token},
    pods::{PodProcesses, replica_command},
    prometheus::FakePrometheus,
    scaler::{ACTIVATOR_SERVICE_ACCOUNT, ScalerProcess, release_finalizers},
    wait,
    workloads::{condition, create_deployment, create_scaled_object, desired},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service, discovery::v1::EndpointSlice};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const SCALER: &str = env!("CARGO_BIN_EXE_scaler");
const REPLICA: &str = env!("CARGO_BIN_EXE_test-replica");
const LONG: Duration = Duration::from_secs(60);

async fn blink_slice(ctx: &TestContext, service: &str) -> anyhow::Result<Option<EndpointSlice>> {
    Ok(ctx
        .api::<EndpointSlice>()
        .get_opt(&format!("{service}-blink"))
        .await?)
}

async fn until_slice(ctx: &TestContext, service: &str, present: bool) -> anyhow::Result<()> {
    wait::until_eq(
        LONG,
        &format!("Blink slice present = {present}"),
        present,
        || async { Ok(blink_slice(ctx, service).await?.is_some()) },
    )
    .await
}

/// Ready addresses over every slice of the Service (Blink's included).
async fn ready_addresses(ctx: &TestContext, service: &str) -> anyhow::Result<BTreeSet<String>> {
    let slices = ctx
        .api::<EndpointSlice>()
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    Ok(slices
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| e.addresses.clone())
        .collect())
}

async fn until_desired(ctx: &TestContext, name: &str, expected: i32) -> anyhow::Result<()> {
    wait::until_eq(LONG, &format!("{name} replicas"), expected, || {
        desired(ctx, name)
    })
    .await
}

/// An "activator": a Deployment and Service named `blink-activator` in the test's
/// namespace (the scaler's namespace), with a stand-in process on its pod IP.
async fn stand_in_activator(ctx: &TestContext) -> anyhow::Result<(PodProcesses, String)> {
    create_deployment(ctx, "blink-activator", 1, json!({})).await?;
    let processes = PodProcesses::start(
        ctx.client(),
        ctx.namespace(),
        "app=blink-activator",
        |pod| replica_command(Path::new(REPLICA), pod),
    );
    let pods = processes.wait_for(1, LONG).await?;
    let name = pods[0].name.clone();
    Ok((processes, name))
}

async fn get_through_cluster_ip(ctx: &TestContext, service: &str) -> anyhow::Result<String> {
    let svc = ctx.api::<Service>().get(service).await?;
    let ip = svc.spec.and_then(|s| s.cluster_ip).context("ClusterIP")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    Ok(http
        .get(format!("http://{ip}:80/"))
        .send()
        .await?
        .text()
        .await?
        .trim()
        .to_owned())
}

fn writes_in_order(ctx: &TestContext, user: &str) -> anyhow::Result<Vec<String>> {
    let events = audit::read(&ctx.bed().audit_log)?;
    let mut writes: Vec<audit::AuditEvent> =
        audit::scale_writes(&events, ctx.namespace(), "deployments")
            .into_iter()
            .chain(audit::endpoint_slice_writes(&events, ctx.namespace()))
            .filter(|e| e.user.username == user)
            .collect();
    writes.sort_by(|a, b| {
        a.request_received_timestamp
            .cmp(&b.request_received_timestamp)
    });
    Ok(writes
        .iter()
        .map(|e| {
            let what = e
                .object_ref
                .as_ref()
                .and_then(|o| o.subresource.clone().or(o.resource.clone()))
                .unwrap_or_default();
            format!("{} {what}", e.verb)
        })
        .collect())
}

#[test]
fn parking_zero_and_waking_follow_the_state_machine() {
    blink_tests::run("transparent-cycle", |ctx| async move {
        let (activator, activator_pod) = stand_in_activator(&ctx).await?;
        create_deployment(&ctx, "hello", 1, json!({})).await?;
        let replicas = PodProcesses::start(ctx.client(), ctx.namespace(), "app=hello", |pod| {
            replica_command(Path::new(REPLICA), pod)
        });
        replicas.wait_for(1, LONG).await?;
        let prometheus = FakePrometheus::start(0.0).await?;
        let scaler = ScalerProcess::start(
            &ctx,
            Path::new(SCALER),
            "scaler-transparent",
            &["--parking-settle", "4s"],
        )
        .await?;
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let mut client = DemandClient::new(scaler.demand_addr, Some(token), "test-activator");
        let hello = FunctionKey::new(ctx.namespace(), "hello")?;
        create_scaled_object(
            &ctx,
            &format!(
                "
metadata: {{name: hello, annotations: {{blink.sh/transparent: 'true'}}}}
spec:
  scaleTargetRef: {{name: hello}}
  pollingInterval: 1
  cooldownPeriod: 2
  advanced: {{stableWindowSeconds: 2}}
  triggers:
  - {{type: http, metadata: {{service: hello}}}}
  - {{type: prometheus, metadata: {{serverAddress: '{}', query: 'sum(rate(requests[1m]))', threshold: '10'}}}}
",
                prometheus.url
            ),
        )
        .await?;

        // Parking, and a request during parking: back to warm, slice removed, no PATCH.
        until_slice(&ctx, "hello", true).await?;
        client.snapshot(vec![demand(&hello, 1.0, 5)]).await?;
        until_slice(&ctx, "hello", false).await?;
        ensure!(
            desired(&ctx, "hello").await? == 1,
            "parking with demand went to zero"
        );
        client.snapshot(vec![]).await?;

        // Quiet: parking again, then zero. The slice is written before the PATCH to 0.
        until_desired(&ctx, "hello", 0).await?;
        ensure!(
            blink_slice(&ctx, "hello").await?.is_some(),
            "at zero without Blink's slice"
        );
        // The audit line of a request is written after its response is sent: wait for it.
        let (order, first_zero) = wait::until(LONG, "the PATCH to 0 in the audit log", || async {
            let order = writes_in_order(&ctx, "scaler-transparent")?;
            Ok(order
                .iter()
                .position(|w| w == "patch scale")
                .map(|first_zero| (order.clone(), first_zero)))
        })
        .await?;
        ensure!(
            order[..first_zero]
                .iter()
                .any(|w| w.ends_with("endpointslices")),
            "PATCH to 0 before the slice: {order:?}"
        );
        replicas.wait_for(0, LONG).await?;

        // At zero the ClusterIP reaches the activator the slice names.
        let answer = wait::until(LONG, "ClusterIP through Blink's slice", || async {
            Ok(get_through_cluster_ip(&ctx, "hello")
                .await
                .ok()
                .filter(|a| *a == activator_pod))
        })
        .await?;
        ensure!(answer == activator_pod);

        // Waking: pods that cannot be scheduled keep the slice in place...
        let no_node = json!({"spec": {"template": {"spec": {"nodeSelector": {"blink.sh/no-such-node": "true"}}}}});
        ctx.api::<Deployment>()
            .patch("hello", &PatchParams::default(), &Patch::Merge(&no_node))
            .await?;
        ensure!(client.poke(&hello).await? / 100 == 2);
        until_desired(&ctx, "hello", 1).await?;
        for _ in 0..4 {
            client.snapshot(vec![demand(&hello, 1.0, 3)]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            ensure!(
                blink_slice(&ctx, "hello").await?.is_some(),
                "the slice went before a replica was ready"
            );
        }
        // ...and it goes once the controller's slice shows a ready endpoint.
        let schedulable = json!({"spec": {"template": {"spec": {"nodeSelector": null}}}});
        ctx.api::<Deployment>()
            .patch(
                "hello",
                &PatchParams::default(),
                &Patch::Merge(&schedulable),
            )
            .await?;
        until_slice(&ctx, "hello", false).await?;
        replicas.wait_for(1, LONG).await?;

        scaler.stop().await;
        release_finalizers(&ctx).await?;
        replicas.shutdown().await;
        activator.shutdown().await;
        Ok(())
    });
}

#[test]
fn http_only_stays_warm_and_deleting_at_zero_never_leaves_the_service_empty() {
    blink_tests::run("transparent-http-only", |ctx| async move {
        let (activator, _) = stand_in_activator(&ctx).await?;
        create_deployment(&ctx, "solo", 0, json!({})).await?;
        let replicas = PodProcesses::start(ctx.client(), ctx.namespace(), "app=solo", |pod| {
            replica_command(Path::new(REPLICA), pod)
        });
        let scaler = ScalerProcess::start(&ctx, Path::new(SCALER), "scaler-http-only", &[]).await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: solo, annotations: {blink.sh/transparent: 'true'}}
spec:
  scaleTargetRef: {name: solo}
  cooldownPeriod: 2
  advanced: {stableWindowSeconds: 2}
  triggers: [{type: http, metadata: {}}]
",
        )
        .await?;
        // At zero from the start: the slice is the Service's only endpoint.
        until_slice(&ctx, "solo", true).await?;

        // Deleting at zero: the Service always has a ready endpoint, and ends with a replica.
        let object = ctx.api::<ScaledObject>().get("solo").await?;
        ensure!(object.metadata.deletion_timestamp.is_none());
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let client = DemandClient::new(scaler.demand_addr, Some(token), "test-activator");
        let solo = FunctionKey::new(ctx.namespace(), "solo")?;

        // First a wake: then it stays at ≥ 1 through silence, and says why.
        ensure!(client.poke(&solo).await? / 100 == 2);
        until_desired(&ctx, "solo", 1).await?;
        until_slice(&ctx, "solo", false).await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        ensure!(
            desired(&ctx, "solo").await? >= 1,
            "an http-only transparent object idled"
        );
        let ready = condition(&ctx, "solo", Condition::READY)
            .await?
            .context("Ready")?;
        ensure!(
            ready.reason.as_deref() == Some("NoWarmTrafficTrigger"),
            "{ready:?}"
        );

        // Back to zero by hand (paused-replicas 0), then deleted at zero.
        let pause = json!({"metadata": {"annotations": {"blink.sh/paused-replicas": "0"}}});
        ctx.api::<ScaledObject>()
            .patch("solo", &PatchParams::default(), &Patch::Merge(&pause))
            .await?;
        until_desired(&ctx, "solo", 0).await?;
        until_slice(&ctx, "solo", true).await?;
        wait::until_eq(LONG, "only the activator serves", 1, || async {
            Ok(ready_addresses(&ctx, "solo").await?.len())
        })
        .await?;
        ctx.api::<ScaledObject>()
            .delete("solo", &DeleteParams::default())
            .await?;
        let watched = async {
            loop {
                let addresses = ready_addresses(&ctx, "solo").await?;
                ensure!(!addresses.is_empty(), "the Service had no ready endpoint");
                if ctx.api::<ScaledObject>().get_opt("solo").await?.is_none() {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(LONG, watched)
            .await
            .context("object deleted")??;
        ensure!(desired(&ctx, "solo").await? >= 1);
        ensure!(blink_slice(&ctx, "solo").await?.is_none());
        scaler.stop().await;
        replicas.shutdown().await;
        activator.shutdown().await;
        Ok(())
    });
}

/// The addresses Blink's slice names, sorted.
async fn blink_slice_addresses(ctx: &TestContext, service: &str) -> anyhow::Result<Vec<String>> {
    let mut addresses: Vec<String> = blink_slice(ctx, service)
        .await?
        .map(|s| s.endpoints.into_iter().flat_map(|e| e.addresses).collect())
        .unwrap_or_default();
    addresses.sort();
    Ok(addresses)
}

async fn pod_ips(processes: &PodProcesses) -> Vec<String> {
    let mut ips: Vec<String> = processes
        .running()
        .await
        .into_iter()
        .map(|p| p.ip.to_string())
        .collect();
    ips.sort();
    ips
}

async fn scale_activators(ctx: &TestContext, replicas: i32) -> anyhow::Result<()> {
    ctx.api::<Deployment>()
        .patch(
            "blink-activator",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": replicas}})),
        )
        .await?;
    Ok(())
}

/// Waits until Blink's slice of `idle` names exactly the `count` running activators.
async fn until_slice_names(
    ctx: &TestContext,
    activators: &PodProcesses,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let what = format!("the slice names {count} live activators");
    wait::until(LONG, &what, || async {
        let ips = pod_ips(activators).await;
        let named = blink_slice_addresses(ctx, "idle").await?;
        Ok((ips.len() == count && named == ips).then_some(named))
    })
    .await
}

/// Blink's slice names the activators there are now: none yet when the function goes
/// to zero, then the first one, both when they scale to two, one when they scale back,
/// and its replacement when it is deleted; the ClusterIP reaches a live one.
#[test]
fn blink_slices_follow_the_activators() {
    blink_tests::run("transparent-follow", |ctx| async move {
        create_deployment(&ctx, "idle", 0, json!({})).await?;
        let scaler = ScalerProcess::start(&ctx, Path::new(SCALER), "scaler-follow", &[]).await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: idle, annotations: {blink.sh/transparent: 'true'}}
spec:
  scaleTargetRef: {name: idle}
  triggers: [{type: http, metadata: {}}]
",
        )
        .await?;
        until_slice(&ctx, "idle", true).await?;
        ensure!(
            blink_slice_addresses(&ctx, "idle").await?.is_empty(),
            "a slice naming activators before there are any"
        );
        let (activators, _) = stand_in_activator(&ctx).await?;
        until_slice_names(&ctx, &activators, 1).await?;
        let reached = wait::until(LONG, "the ClusterIP reaches the activator", || async {
            Ok(get_through_cluster_ip(&ctx, "idle").await.ok())
        })
        .await?;
        ensure!(reached.starts_with("blink-activator-"), "{reached}");

        scale_activators(&ctx, 2).await?;
        until_slice_names(&ctx, &activators, 2).await?;

        // Back to one activator: the slice drops the one that went. Then that one is
        // deleted and its Deployment replaces it: the slice names the replacement.
        scale_activators(&ctx, 1).await?;
        until_slice_names(&ctx, &activators, 1).await?;
        let gone = activators
            .running()
            .await
            .into_iter()
            .next()
            .context("the remaining activator")?;
        ctx.api::<k8s_openapi::api::core::v1::Pod>()
            .delete(&gone.name, &DeleteParams::default().grace_period(0))
            .await?;
        // kwok may give the replacement the deleted pod's address back, so the check is
        // by name: the replacement runs and the slice names exactly it.
        wait::until(LONG, "the slice names the replacement", || async {
            let running = activators.running().await;
            let replaced = running.len() == 1 && running[0].name != gone.name;
            let named = blink_slice_addresses(&ctx, "idle").await?;
            Ok((replaced && named == pod_ips(&activators).await).then_some(()))
        })
        .await?;
        wait::until(LONG, "the ClusterIP reaches the replacement", || async {
            Ok(get_through_cluster_ip(&ctx, "idle")
                .await
                .ok()
                .filter(|reached| *reached != gone.name))
        })
        .await?;
        scaler.stop().await;
        release_finalizers(&ctx).await?;
        activators.shutdown().await;
        Ok(())
    });
}
