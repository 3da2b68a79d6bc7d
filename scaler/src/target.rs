//! The `ScaleTarget` seam: read and set a workload's replica count. The Kubernetes
//! implementation speaks the `/scale` subresource of any resource that has one
//! (Deployments, StatefulSets, custom resources), found by discovery once per kind.

use std::{collections::HashMap, fmt, sync::Arc};

use futures::future::BoxFuture;
use kube::{
    Client,
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::{self, Scope},
};
use tokio::sync::Mutex;

/// The field manager of every write Blink makes, so `managedFields` and the audit log
/// tell Blink's writes from everyone else's.
pub const FIELD_MANAGER: &str = "blink-scaler";

/// A workload's replica counts as `/scale` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    /// `spec.replicas`: what was asked for.
    pub desired: i32,
    /// `status.replicas`: what exists.
    pub current: i32,
}

/// Where a function's replicas live: `namespace`, API version, kind and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetRef {
    pub namespace: String,
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

impl TargetRef {
    /// The target of a `ScaledObject`: `apps/v1 Deployment` unless it says otherwise
    /// (KEDA's defaults).
    pub fn of(namespace: &str, target: &blink_crds::scaled_object::ScaleTarget) -> Self {
        Self {
            namespace: namespace.to_owned(),
            api_version: target
                .api_version
                .clone()
                .unwrap_or_else(|| "apps/v1".to_owned()),
            kind: target
                .kind
                .clone()
                .unwrap_or_else(|| "Deployment".to_owned()),
            name: target.name.clone(),
        }
    }

    pub fn gvk(&self) -> GroupVersionKind {
        let (group, version) = match self.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", self.api_version.as_str()),
        };
        GroupVersionKind::gvk(group, version, &self.kind)
    }
}

impl fmt::Display for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Why a target could not be read or set; the reason is a condition reason.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("scale target {0} does not exist")]
    NotFound(String),
    #[error("scale target kind {0} is not served by the API server")]
    UnknownKind(String),
    #[error("scale target {0} has no /scale subresource")]
    NoScaleSubresource(String),
    #[error(
        "SpinApp {0} does not set spec.enableAutoscaling: true, so the spin-operator owns its replicas; set it to let Blink scale the Deployment of the same name"
    )]
    SpinAppNotAutoscaled(String),
    #[error("scale target {target}: {source}")]
    Api {
        target: String,
        #[source]
        source: kube::Error,
    },
}

impl TargetError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "ScaleTargetNotFound",
            Self::UnknownKind(_) => "ScaleTargetKindUnknown",
            Self::NoScaleSubresource(_) => "ScaleTargetNotScalable",
            Self::SpinAppNotAutoscaled(_) => "SpinAppAutoscalingDisabled",
            Self::Api { .. } => "ScaleTargetError",
        }
    }
}

/// Read and set replicas. Kubernetes `/scale` here; a local runtime elsewhere.
pub trait ScaleTarget: Send + Sync + fmt::Debug {
    fn get(&self, target: &TargetRef) -> BoxFuture<'_, Result<Replicas, TargetError>>;
    fn set(
        &self,
        target: &TargetRef,
        replicas: i32,
    ) -> BoxFuture<'_, Result<Replicas, TargetError>>;
    /// Where the target's pods stand with the scheduler.
    fn placement(
        &self,
        target: &TargetRef,
        bound: std::time::Duration,
    ) -> BoxFuture<'_, Result<Placement, TargetError>>;
}

/// Where a target's pods stand with the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Pods the scheduler has refused (`Unschedulable`) for longer than the bound.
    pub stalled: usize,
    /// The workload has made as many pods as `spec.replicas`, and every pod that is
    /// neither going nor ended is on a node: the last scale-up has landed.
    pub all_placed: bool,
}

impl Placement {
    /// Where `pods` (those the target's selector matches) stand, for a target that
    /// should have `desired` and has made `created`, at `now`.
    fn of(
        pods: &[k8s_openapi::api::core::v1::Pod],
        desired: i32,
        created: i32,
        bound: std::time::Duration,
        now: k8s_openapi::jiff::Timestamp,
    ) -> Self {
        // Pods that will run: neither going nor ended (an evicted pod stays `Failed`,
        // on its node, until it is collected).
        let live: Vec<_> = pods
            .iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none() && !has_ended(pod))
            .collect();
        let stalled = live
            .iter()
            .filter(|pod| {
                unschedulable_since(pod)
                    .is_some_and(|since| now.duration_since(since).unsigned_abs() >= bound)
            })
            .count();
        let placed = live.iter().filter(|pod| is_placed(pod)).count();
        // The workload's own count of the pods it has made: until it has made them
        // all, other pods its selector matches could make up the number.
        Self {
            stalled,
            all_placed: placed == live.len()
                && created >= desired
                && live.len() >= usize::try_from(desired).unwrap_or(0),
        }
    }
}

/// `/scale` through the API server, with the resource of each kind discovered once.
#[derive(Clone)]
pub struct KubeScale {
    client: Client,
    resources: Arc<Mutex<HashMap<GroupVersionKind, Result<ApiResource, String>>>>,
}

impl fmt::Debug for KubeScale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeScale").finish_non_exhaustive()
    }
}

impl KubeScale {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            resources: Arc::default(),
        }
    }

    async fn api(&self, target: &TargetRef) -> Result<Api<DynamicObject>, TargetError> {
        if is_spin_app(target) {
            return self.spin_app_deployment(target).await;
        }
        let gvk = target.gvk();
        let cached = self.resources.lock().await.get(&gvk).cloned();
        let resource = match cached {
            Some(found) => found,
            None => {
                let found = match discovery::pinned_kind(&self.client, &gvk).await {
                    Ok((resource, caps)) if caps.scope == Scope::Namespaced => {
                        if caps
                            .subresources
                            .iter()
                            .any(|(sub, _)| sub.plural == "scale")
                        {
                            Ok(resource)
                        } else {
                            Err(format!("no-scale:{}", target.kind))
                        }
                    }
                    Ok(_) => Err(format!("no-scale:{}", target.kind)),
                    Err(kube::Error::Discovery(_)) => Err(format!("unknown:{}", target.kind)),
                    Err(kube::Error::Api(status)) if status.code == 404 => {
                        Err(format!("unknown:{}", target.kind))
                    }
                    Err(source) => {
                        return Err(TargetError::Api {
                            target: target.to_string(),
                            source,
                        });
                    }
                };
                // Only successes are kept: a kind installed later must be found then.
                if found.is_ok() {
                    self.resources.lock().await.insert(gvk, found.clone());
                }
                found
            }
        };
        match resource {
            Ok(resource) => Ok(Api::namespaced_with(
                self.client.clone(),
                &target.namespace,
                &resource,
            )),
            Err(e) if e.starts_with("no-scale:") => {
                Err(TargetError::NoScaleSubresource(target.to_string()))
            }
            Err(_) => Err(TargetError::UnknownKind(format!(
                "{} ({})",
                target.kind, target.api_version
            ))),
        }
    }

    /// A SpinApp has no `/scale`: with `enableAutoscaling: true` the spin-operator leaves
    /// the replicas of the Deployment of the same name free, and that is what Blink
    /// scales (DESIGN.md, "Acting on the cluster").
    async fn spin_app_deployment(
        &self,
        target: &TargetRef,
    ) -> Result<Api<DynamicObject>, TargetError> {
        let (resource, _) = discovery::pinned_kind(&self.client, &target.gvk())
            .await
            .map_err(|_| {
                TargetError::UnknownKind(format!("{} ({})", target.kind, target.api_version))
            })?;
        let apps: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &target.namespace, &resource);
        let app = apps
            .get_opt(&target.name)
            .await
            .map_err(|e| api_error(target, e))?
            .ok_or_else(|| TargetError::NotFound(target.to_string()))?;
        let autoscaling = app
            .data
            .get("spec")
            .and_then(|spec| spec.get("enableAutoscaling"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        if !autoscaling {
            return Err(TargetError::SpinAppNotAutoscaled(target.to_string()));
        }
        let deployments = ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&());
        Ok(Api::namespaced_with(
            self.client.clone(),
            &target.namespace,
            &deployments,
        ))
    }
}

/// SpinKube's `SpinApp` (`core.spinkube.dev`).
pub fn is_spin_app(target: &TargetRef) -> bool {
    target.kind == "SpinApp" && target.gvk().group == SPIN_GROUP
}

pub const SPIN_GROUP: &str = "core.spinkube.dev";

fn replicas_of(scale: &k8s_openapi::api::autoscaling::v1::Scale) -> Replicas {
    Replicas {
        desired: scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
        current: scale.status.as_ref().map(|s| s.replicas).unwrap_or(0),
    }
}

fn api_error(target: &TargetRef, source: kube::Error) -> TargetError {
    match &source {
        kube::Error::Api(status) if status.code == 404 => TargetError::NotFound(target.to_string()),
        _ => TargetError::Api {
            target: target.to_string(),
            source,
        },
    }
}

impl ScaleTarget for KubeScale {
    fn get(&self, target: &TargetRef) -> BoxFuture<'_, Result<Replicas, TargetError>> {
        let target = target.clone();
        Box::pin(async move {
            let api = self.api(&target).await?;
            let scale = api
                .get_scale(&target.name)
                .await
                .map_err(|e| api_error(&target, e))?;
            Ok(replicas_of(&scale))
        })
    }

    fn placement(
        &self,
        target: &TargetRef,
        bound: std::time::Duration,
    ) -> BoxFuture<'_, Result<Placement, TargetError>> {
        let target = target.clone();
        Box::pin(async move {
            let api = self.api(&target).await?;
            let scale = api
                .get_scale(&target.name)
                .await
                .map_err(|e| api_error(&target, e))?;
            let desired = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
            let created = scale.status.as_ref().map_or(0, |s| s.replicas);
            let Some(selector) = scale.status.and_then(|s| s.selector) else {
                // No selector to find its pods by: nothing to look for again.
                return Ok(Placement {
                    stalled: 0,
                    all_placed: true,
                });
            };
            let pods: Api<k8s_openapi::api::core::v1::Pod> =
                Api::namespaced(self.client.clone(), &target.namespace);
            let list = pods
                .list(&kube::api::ListParams::default().labels(&selector))
                .await
                .map_err(|e| api_error(&target, e))?;
            Ok(Placement::of(
                &list.items,
                desired,
                created,
                bound,
                k8s_openapi::jiff::Timestamp::now(),
            ))
        })
    }

    fn set(
        &self,
        target: &TargetRef,
        replicas: i32,
    ) -> BoxFuture<'_, Result<Replicas, TargetError>> {
        let target = target.clone();
        Box::pin(async move {
            let api = self.api(&target).await?;
            let patch = serde_json::json!({ "spec": { "replicas": replicas } });
            let scale = api
                .patch_scale(
                    &target.name,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.to_owned()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(|e| api_error(&target, e))?;
            Ok(replicas_of(&scale))
        })
    }
}

/// The pod has run to its end (`Succeeded` or `Failed`): it takes no place any more.
fn has_ended(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The scheduler has put the pod on a node.
fn is_placed(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    let bound_to_a_node = pod
        .spec
        .as_ref()
        .is_some_and(|spec| spec.node_name.is_some());
    let scheduled = pod
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "PodScheduled" && c.status == "True")
        });
    bound_to_a_node || scheduled
}

/// When the scheduler last said a pod cannot be placed, if that is its state now.
fn unschedulable_since(
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Option<k8s_openapi::jiff::Timestamp> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled")?;
    (condition.status == "False" && condition.reason.as_deref() == Some("Unschedulable"))
        .then(|| condition.last_transition_time.as_ref().map(|t| t.0))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn unschedulable_pods_are_recognised() {
        let pod = |status: &str, reason: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p"},
                "status": {"phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": status, "reason": reason,
                    "lastTransitionTime": "2026-11-30T01:00:00Z"}]}
            }))
            .expect("pod")
        };
        assert!(unschedulable_since(&pod("False", "Unschedulable")).is_some());
        assert!(unschedulable_since(&pod("True", "")).is_none());
        assert!(unschedulable_since(&pod("False", "SchedulerError")).is_none());
        assert!(is_placed(&pod("True", "")));
        assert!(!is_placed(&pod("False", "Unschedulable")));
        let bound: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"}, "spec": {"nodeName": "n", "containers": []}
        }))
        .expect("pod");
        assert!(
            is_placed(&bound),
            "bound to a node before its condition is written"
        );
        let ended = |phase: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p"}, "spec": {"nodeName": "n", "containers": []},
                "status": {"phase": phase}
            }))
            .expect("pod")
        };
        assert!(
            has_ended(&ended("Failed")),
            "evicted: on its node, not running"
        );
        assert!(has_ended(&ended("Succeeded")));
        assert!(!has_ended(&ended("Running")));
        assert!(!has_ended(&bound));
    }

    #[test]
    fn a_scale_up_has_landed_once_its_pods_are_made_and_placed() {
        let pod = |phase: &str, node: Option<&str>, refused: bool, going: bool| -> Pod {
            let mut pod = serde_json::json!({
                "metadata": {"name": "p"},
                "spec": {"containers": [], "nodeName": node},
                "status": {"phase": phase}
            });
            if refused {
                pod["status"]["conditions"] = serde_json::json!([{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "lastTransitionTime": "2026-11-30T01:00:00Z"}]);
            }
            if going {
                pod["metadata"]["deletionTimestamp"] = "2026-11-30T01:00:00Z".into();
            }
            serde_json::from_value(pod).expect("pod")
        };
        let running = pod("Running", Some("n"), false, false);
        let pending = pod("Pending", None, false, false);
        let refused = pod("Pending", None, true, false);
        let evicted = pod("Failed", Some("n"), false, false);
        let going = pod("Running", Some("n"), false, true);
        let bound = std::time::Duration::from_secs(60);
        let now: k8s_openapi::jiff::Timestamp = "2026-11-30T01:00:30Z".parse().expect("time");
        let later: k8s_openapi::jiff::Timestamp = "2026-11-30T01:05:00Z".parse().expect("time");
        // (pods, desired, created, at) → (stalled, all placed)
        let cases = [
            (vec![running.clone(); 3], 3, 3, now, (0, true)),
            (
                vec![running.clone(), running.clone(), pending.clone()],
                3,
                3,
                now,
                (0, false),
            ),
            // Made, not all there yet (the list is behind the workload's count), or
            // not all made yet.
            (vec![running.clone(); 2], 3, 3, now, (0, false)),
            (vec![running.clone(); 2], 3, 2, now, (0, false)),
            // Ended pods on their nodes do not make up the number.
            (
                vec![running.clone(), evicted.clone(), evicted.clone()],
                3,
                1,
                now,
                (0, false),
            ),
            (
                vec![running.clone(), evicted.clone()],
                2,
                2,
                now,
                (0, false),
            ),
            (
                vec![running.clone(), running.clone(), evicted.clone()],
                2,
                2,
                now,
                (0, true),
            ),
            // Going pods neither.
            (vec![running.clone(), going.clone()], 2, 2, now, (0, false)),
            // Refused: a stall once the bound has passed.
            (
                vec![running.clone(), refused.clone()],
                2,
                2,
                now,
                (0, false),
            ),
            (
                vec![running.clone(), refused.clone()],
                2,
                2,
                later,
                (1, false),
            ),
        ];
        for (index, (pods, desired, created, at, expected)) in cases.into_iter().enumerate() {
            let placement = Placement::of(&pods, desired, created, bound, at);
            assert_eq!(
                (placement.stalled, placement.all_placed),
                expected,
                "case {index}"
            );
        }
    }

    #[test]
    fn target_defaults_are_kedas() {
        let target = TargetRef::of(
            "ns",
            &blink_crds::scaled_object::ScaleTarget {
                name: "web".into(),
                ..Default::default()
            },
        );
        assert_eq!(
            target.gvk(),
            GroupVersionKind::gvk("apps", "v1", "Deployment")
        );
        let core = TargetRef {
            api_version: "v1".into(),
            kind: "ReplicationController".into(),
            ..target
        };
        assert_eq!(
            core.gvk(),
            GroupVersionKind::gvk("", "v1", "ReplicationController")
        );
    }
}
