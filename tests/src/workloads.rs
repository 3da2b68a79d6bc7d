//! Workloads and objects for scaler tests: Deployments with a Service, ScaledObjects
//! from YAML, and reads of what the scaler did (replica counts, conditions, Events).

use anyhow::Context as _;
use blink_crds::{Condition, ScaledObject};
use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{Event, Pod, Service},
};
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::TestContext;

/// A Deployment of `replicas` (pods labelled `app: <name>`, port `http` 8080) and a
/// Service of the same name. Its pods are Ready as soon as they run.
pub async fn create_deployment(
    ctx: &TestContext,
    name: &str,
    replicas: i32,
    annotations: serde_json::Value,
) -> anyhow::Result<()> {
    create_deployment_with(ctx, name, replicas, annotations, json!([])).await
}

/// The same, with pods Ready only once their process listens (the readiness gate
/// [`crate::pods::LISTENING_GATE`], which [`crate::pods::PodProcesses`] opens), as a
/// real readiness probe would have it.
pub async fn create_gated_deployment(
    ctx: &TestContext,
    name: &str,
    replicas: i32,
) -> anyhow::Result<()> {
    let gates = json!([{"conditionType": crate::pods::LISTENING_GATE}]);
    create_deployment_with(ctx, name, replicas, json!({}), gates).await
}

async fn create_deployment_with(
    ctx: &TestContext,
    name: &str,
    replicas: i32,
    annotations: serde_json::Value,
    readiness_gates: serde_json::Value,
) -> anyhow::Result<()> {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"readinessGates": readiness_gates,
                             "containers": [{"name": "app", "image": "blink.sh/test-replica",
                                             "ports": [{"name": "http", "containerPort": 8080}]}]}}}
    }))?;
    ctx.api::<Deployment>()
        .create(&PostParams::default(), &deployment)
        .await
        .context("creating the Deployment")?;
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

/// Creates a ScaledObject from YAML (namespace filled in).
pub async fn create_scaled_object(ctx: &TestContext, yaml: &str) -> anyhow::Result<ScaledObject> {
    let mut object: ScaledObject = serde_yaml::from_str(yaml).context("ScaledObject YAML")?;
    object.metadata.namespace = Some(ctx.namespace().to_owned());
    Ok(ctx
        .api::<ScaledObject>()
        .create(&PostParams::default(), &object)
        .await?)
}

/// An HPA `name` for Deployment `target` (1 to 5 replicas): another owner of it.
pub async fn create_hpa(ctx: &TestContext, name: &str, target: &str) -> anyhow::Result<()> {
    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                 "minReplicas": 1, "maxReplicas": 5}
    }))?;
    ctx.api::<HorizontalPodAutoscaler>()
        .create(&PostParams::default(), &hpa)
        .await
        .context("creating the HPA")?;
    Ok(())
}

/// `spec.replicas` of a Deployment.
pub async fn desired(ctx: &TestContext, name: &str) -> anyhow::Result<i32> {
    let scale = ctx.api::<Deployment>().get_scale(name).await?;
    Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0))
}

/// Waits (30 s at most) until a Deployment reports `replicas` available: its rollout's
/// status writes are done.
pub async fn until_available(ctx: &TestContext, name: &str, replicas: i32) -> anyhow::Result<()> {
    crate::wait::until(
        std::time::Duration::from_secs(30),
        &format!("{name}: {replicas} replicas available"),
        || async {
            let deployment = ctx.api::<Deployment>().get(name).await?;
            let available = deployment.status.and_then(|s| s.available_replicas);
            Ok(available.is_some_and(|n| n >= replicas).then_some(()))
        },
    )
    .await
}

/// Running pods of `app` that are not being deleted.
pub async fn running_pods(ctx: &TestContext, app: &str) -> anyhow::Result<usize> {
    let pods = ctx
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?;
    Ok(pods
        .items
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .count())
}

/// A condition of a ScaledObject's status.
pub async fn condition(
    ctx: &TestContext,
    name: &str,
    kind: &str,
) -> anyhow::Result<Option<Condition>> {
    let object = ctx.api::<ScaledObject>().get(name).await?;
    Ok(object.status.and_then(|s| s.condition(kind).cloned()))
}

/// `(status, reason)` of a condition, for `until_eq`.
pub async fn condition_state(
    ctx: &TestContext,
    name: &str,
    kind: &str,
) -> anyhow::Result<Option<(String, String)>> {
    Ok(condition(ctx, name, kind)
        .await?
        .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default())))
}

/// `(reason, message)` of every Event about object `name` in the namespace.
pub async fn events(ctx: &TestContext, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let events = ctx.api::<Event>().list(&ListParams::default()).await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect())
}

/// Every value a Deployment's `spec.replicas` took, in order, as a watch saw them.
#[derive(Debug)]
pub struct ReplicaHistory {
    values: std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplicaHistory {
    pub fn watch(ctx: &TestContext, name: &str) -> Self {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let values = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher::watcher(ctx.api::<Deployment>(), config)
            .default_backoff()
            .applied_objects();
        let seen = values.clone();
        let task = tokio::spawn(async move {
            let mut stream = stream.boxed();
            // A watch error is followed by a re-list (backed off), not the end.
            while let Some(item) = stream.next().await {
                let Ok(deployment) = item else { continue };
                let replicas = deployment.spec.and_then(|s| s.replicas).unwrap_or(0);
                if let Ok(mut values) = seen.lock()
                    && values.last() != Some(&replicas)
                {
                    values.push(replicas);
                }
            }
        });
        Self { values, task }
    }

    pub fn values(&self) -> Vec<i32> {
        self.values.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for ReplicaHistory {
    fn drop(&mut self) {
        self.task.abort();
    }
}
