//! The Kubernetes part of the bed is real: Deployments and StatefulSets get Running
//! pods on 10.244.0.0/16 IPs from kwok, EndpointSlices from the controller manager,
//! ClusterIPs through kube-proxy's iptables rules, and a test replica process answers
//! on each pod IP. The audit log counts `/scale` writes per user.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use blink_tests::pods::{PodProcesses, replica_command};
use blink_tests::{TestContext, audit, wait};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const REPLICA: &str = env!("CARGO_BIN_EXE_test-replica");

fn pod_template(app: &str) -> serde_json::Value {
    json!({
        "metadata": {"labels": {"app": app}},
        "spec": {"containers": [{"name": "app", "image": "blink.sh/test-replica",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]}
    })
}

async fn create_deployment(ctx: &TestContext, name: &str, replicas: i32) -> anyhow::Result<()> {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": pod_template(name)}
    }))?;
    ctx.api::<Deployment>()
        .create(&PostParams::default(), &deployment)
        .await?;
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
    }))?;
    ctx.api::<Service>()
        .create(&PostParams::default(), &service)
        .await?;
    Ok(())
}

async fn running_pods(ctx: &TestContext, app: &str) -> anyhow::Result<Vec<Pod>> {
    let pods = ctx
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect())
}

async fn pod_count(ctx: &TestContext, app: &str) -> anyhow::Result<usize> {
    let pods = ctx
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?;
    Ok(pods.items.len())
}

/// Ready endpoint addresses over all of a Service's EndpointSlices.
async fn ready_endpoints(ctx: &TestContext, service: &str) -> anyhow::Result<BTreeSet<String>> {
    let slices = ctx
        .api::<EndpointSlice>()
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    Ok(slices
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect())
}

fn in_pod_cidr(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10 && v4.octets()[1] == 244)
}

/// GET over a fresh connection (no pooling), so kube-proxy balances every request.
async fn get_fresh(url: &str) -> anyhow::Result<String> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()?;
    let response = client.get(url).send().await?.error_for_status()?;
    Ok(response.text().await?.trim().to_string())
}

async fn patch_scale<K>(api: &Api<K>, name: &str, replicas: i32) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_scale(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .with_context(|| format!("PATCH {name}/scale to {replicas}"))?;
    Ok(())
}

#[test]
fn deployment_pods_serve_on_pod_ips_and_cluster_ip_then_scale_to_zero() {
    blink_tests::run("deploy-3", |ctx| async move {
        create_deployment(&ctx, "hello", 3).await?;
        let processes = PodProcesses::start(ctx.client(), ctx.namespace(), "app=hello", |pod| {
            replica_command(Path::new(REPLICA), pod)
        });

        let pods = wait::until(Duration::from_secs(60), "3 Running pods", || async {
            let pods = running_pods(&ctx, "hello").await?;
            let with_ips = pods
                .iter()
                .all(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some());
            Ok((pods.len() == 3 && with_ips).then_some(pods))
        })
        .await?;
        let mut ips = BTreeMap::new();
        for pod in &pods {
            let ip: IpAddr = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .context("pod IP")?
                .parse()?;
            ensure!(in_pod_cidr(&ip), "pod IP {ip} outside 10.244.0.0/16");
            ips.insert(
                ip.to_string(),
                pod.metadata.name.clone().unwrap_or_default(),
            );
        }
        let expected_ips: BTreeSet<String> = ips.keys().cloned().collect();
        wait::until_eq(
            Duration::from_secs(60),
            "3 ready endpoints",
            expected_ips,
            || ready_endpoints(&ctx, "hello"),
        )
        .await?;
        processes.wait_for(3, Duration::from_secs(30)).await?;

        // Each replica answers on its own pod IP with its own name.
        for (ip, name) in &ips {
            let url = format!("http://{ip}:8080/");
            let body = wait::until(
                Duration::from_secs(10),
                &format!("replica on {ip}"),
                || async { Ok(get_fresh(&url).await.ok()) },
            )
            .await?;
            ensure!(body == *name, "{ip} answered {body:?}, expected {name:?}");
        }

        // Through the Service's ClusterIP, kube-proxy reaches every replica.
        let service = ctx.api::<Service>().get("hello").await?;
        let cluster_ip = service
            .spec
            .and_then(|s| s.cluster_ip)
            .context("cluster IP")?;
        // kube-proxy's iptables sync trails the EndpointSlice by up to a second or so.
        let names: BTreeSet<String> = ips.values().cloned().collect();
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen != names && Instant::now() < deadline {
            if let Ok(body) = get_fresh(&format!("http://{cluster_ip}:80/")).await {
                ensure!(names.contains(&body), "ClusterIP answered {body:?}");
                seen.insert(body);
            }
        }
        ensure!(
            seen == names,
            "through {cluster_ip} saw only {seen:?} of {names:?}"
        );

        // One PATCH of /scale to 0 by a user of its own removes everything.
        let user = format!("scale-tester-{}", ctx.namespace());
        let as_user: Api<Deployment> =
            Api::namespaced(ctx.client_as(&user).await?, ctx.namespace());
        patch_scale(&as_user, "hello", 0).await?;
        wait::until_eq(Duration::from_secs(60), "no pods", 0, || {
            pod_count(&ctx, "hello")
        })
        .await?;
        wait::until_eq(
            Duration::from_secs(60),
            "no ready endpoints",
            BTreeSet::new(),
            || ready_endpoints(&ctx, "hello"),
        )
        .await?;
        processes.wait_for(0, Duration::from_secs(30)).await?;

        let events = audit::read(&ctx.bed().audit_log)?;
        let writes = audit::scale_writes(&events, ctx.namespace(), "deployments");
        ensure!(
            writes.len() == 1,
            "expected exactly one /scale write, audit shows {writes:#?}"
        );
        ensure!(
            writes[0].verb == "patch" && writes[0].user.username == user,
            "{:?}",
            writes[0]
        );
        processes.shutdown().await;
        Ok(())
    });
}

/// A pod gated on its process listening (what `workloads::create_gated_deployment`
/// makes) is Running but not Ready, with no ready endpoint, while its process does not
/// listen yet; once it listens the gate opens and its endpoint is ready — the order a
/// real readiness probe gives.
#[test]
fn a_gated_pod_is_ready_only_once_its_process_listens() {
    blink_tests::run("gated", |ctx| async move {
        blink_tests::workloads::create_gated_deployment(&ctx, "gated", 1).await?;
        let processes = PodProcesses::start(ctx.client(), ctx.namespace(), "app=gated", |pod| {
            let mut cmd = replica_command(Path::new(REPLICA), pod);
            cmd.args(["--listen-after", "2s"]);
            cmd
        });
        let pods = processes.wait_for(1, Duration::from_secs(60)).await?;
        let started = Instant::now();
        let pod = &pods[0];
        let is_ready = || async {
            let pod: Pod = ctx.api::<Pod>().get(&pod.name).await?;
            Ok::<_, anyhow::Error>(
                pod.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True"),
            )
        };
        tokio::time::sleep(Duration::from_millis(800)).await;
        ensure!(
            !is_ready().await?,
            "the pod is Ready before its process listens"
        );
        ensure!(
            ready_endpoints(&ctx, "gated").await?.is_empty(),
            "an endpoint is ready before its process listens"
        );
        wait::until_eq(
            Duration::from_secs(30),
            "the gated pod's endpoint ready",
            BTreeSet::from([pod.ip.to_string()]),
            || ready_endpoints(&ctx, "gated"),
        )
        .await?;
        ensure!(
            started.elapsed() >= Duration::from_millis(1500),
            "ready {:?} after the process started, before it listened",
            started.elapsed()
        );
        tokio::net::TcpStream::connect((pod.ip, pod.port))
            .await
            .context("the ready pod listens")?;
        ensure!(is_ready().await?, "the pod is Ready");
        processes.shutdown().await;
        Ok(())
    });
}

#[test]
fn statefulset_scaled_to_two_gets_two_running_pods() {
    blink_tests::run("sts-2", |ctx| async move {
        let statefulset: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"replicas": 0, "serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
                     "template": pod_template("web")}
        }))?;
        let api = ctx.api::<StatefulSet>();
        api.create(&PostParams::default(), &statefulset).await?;
        patch_scale(&api, "web", 2).await?;
        let pods = wait::until(Duration::from_secs(60), "2 Running pods", || async {
            let pods = running_pods(&ctx, "web").await?;
            Ok((pods.len() == 2).then_some(pods))
        })
        .await?;
        let names: BTreeSet<String> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        ensure!(
            names == BTreeSet::from(["web-0".to_string(), "web-1".to_string()]),
            "{names:?}"
        );
        let events = audit::read(&ctx.bed().audit_log)?;
        ensure!(audit::scale_writes(&events, ctx.namespace(), "statefulsets").len() == 1);
        Ok(())
    });
}

#[test]
fn one_patch_takes_a_deployment_from_zero_to_a_thousand() {
    blink_tests::run("deploy-1000", |ctx| async move {
        create_deployment(&ctx, "big", 0).await?;
        let api = ctx.api::<Deployment>();
        let started = Instant::now();
        patch_scale(&api, "big", 1000).await?;
        wait::until_eq(
            Duration::from_secs(180),
            "1000 Running pods",
            1000,
            || async { Ok(running_pods(&ctx, "big").await?.len()) },
        )
        .await?;
        let running_after = started.elapsed();
        wait::until_eq(
            Duration::from_secs(180),
            "1000 ready endpoints",
            1000,
            || async { Ok(ready_endpoints(&ctx, "big").await?.len()) },
        )
        .await?;
        let endpoints_after = started.elapsed();
        let events = audit::read(&ctx.bed().audit_log)?;
        let writes = audit::scale_writes(&events, ctx.namespace(), "deployments");
        ensure!(
            writes.len() == 1,
            "expected one /scale write, audit shows {}",
            writes.len()
        );

        // Back to zero, so the node's capacity is free for other tests.
        let down = Instant::now();
        patch_scale(&api, "big", 0).await?;
        wait::until_eq(Duration::from_secs(180), "no pods", 0, || {
            pod_count(&ctx, "big")
        })
        .await?;
        eprintln!(
            "0 -> 1000: all Running in {:.1}s, 1000 ready endpoints in {:.1}s; 1000 -> 0 in {:.1}s",
            running_after.as_secs_f64(),
            endpoints_after.as_secs_f64(),
            down.elapsed().as_secs_f64()
        );
        Ok(())
    });
}
