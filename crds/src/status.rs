//! The `ScaledObject` status: Blink's own fields (replica counts, conditions with
//! transition times) beside every property of KEDA's status, so tools written for
//! KEDA's status (dashboards, `kubectl` columns) read Blink's too.
//!
//! The condition types and the reasons other components act on are constants here,
//! because the activator reads what the scaler writes: it answers `503` at once for a
//! function whose `Ready` is `False` with reason [`Condition::REASON_SCALE_UP_STALLED`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a `ScaledObject`, written by the scaler.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaledObjectStatus {
    /// `Ready`, `Active`, `Fallback`, `Paused` and `Conflict`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Replicas of the target when last read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    /// Replicas the last decision asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When a trigger was last active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_active_time: Option<Time>,
    /// Replicas of the target before Blink first scaled it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_replica_count: Option<i32>,
    /// Replicas held while paused (the `blink.sh/paused-replicas` annotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_replica_count: Option<i32>,
    /// `metadata.generation` the status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Kind of the scale target (KEDA's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_target_kind: Option<String>,
    /// Group, version, kind and resource of the scale target (KEDA's).
    #[serde(rename = "scaleTargetGVKR", skip_serializing_if = "Option::is_none")]
    pub scale_target_gvkr: Option<GroupVersionKindResource>,
    /// External metric names (KEDA's; Blink has no metrics adapter and leaves it unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_metric_names: Option<Vec<String>>,
    /// Resource metric names (KEDA's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_metric_names: Option<Vec<String>>,
    /// Health per trigger (KEDA's), keyed by metric name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<BTreeMap<String, HealthStatus>>,
    /// Comma-separated trigger types (KEDA's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triggers_types: Option<String>,
    /// Activity per trigger (KEDA's), keyed by trigger name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triggers_activity: Option<BTreeMap<String, TriggerActivityStatus>>,
    /// Comma-separated authentication references (KEDA's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentications_types: Option<String>,
    /// Name of the composite scaler (KEDA's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub composite_scaler_name: Option<String>,
    /// Name of the HPA (KEDA's; Blink creates none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hpa_name: Option<String>,
}

impl ScaledObjectStatus {
    /// The condition of type `condition_type`, if set.
    pub fn condition(&self, condition_type: &str) -> Option<&Condition> {
        self.conditions
            .iter()
            .find(|c| c.condition_type == condition_type)
    }
}

/// One aspect of the object's state (KEDA's condition, plus `lastTransitionTime`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Active`, `Fallback`, `Paused` or `Conflict`.
    #[serde(rename = "type")]
    pub condition_type: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word saying why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What happened, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When `status` last changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

impl Condition {
    /// The object is set up correctly and can scale.
    pub const READY: &'static str = "Ready";
    /// A trigger has demand (the target runs above zero / `idleReplicaCount`).
    pub const ACTIVE: &'static str = "Active";
    /// A trigger keeps failing and `fallback.replicas` is in force.
    pub const FALLBACK: &'static str = "Fallback";
    /// Scaling is paused by annotation.
    pub const PAUSED: &'static str = "Paused";
    /// Another object already claims this object's host and path, or its Service.
    pub const CONFLICT: &'static str = "Conflict";

    /// `status` of a condition that holds.
    pub const TRUE: &'static str = "True";
    /// `status` of a condition that does not hold.
    pub const FALSE: &'static str = "False";
    /// `status` of a condition not known yet.
    pub const UNKNOWN: &'static str = "Unknown";

    /// `Ready=False`: a scale-up was asked for but replicas do not become ready.
    pub const REASON_SCALE_UP_STALLED: &'static str = "ScaleUpStalled";
    /// `Ready=False`: a trigger's type is not one Blink implements.
    pub const REASON_UNSUPPORTED_TRIGGER: &'static str = "UnsupportedTrigger";

    /// A condition of `condition_type` that holds (`status`) or not, without a
    /// transition time (the writer sets it when `status` changes).
    pub fn new(
        condition_type: impl Into<String>,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            condition_type: condition_type.into(),
            status: if status { Self::TRUE } else { Self::FALSE }.to_owned(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_transition_time: None,
        }
    }

    /// Whether `status` is `True`.
    pub fn is_true(&self) -> bool {
        self.status == Self::TRUE
    }
}

/// Group, version, kind and resource of the scale target (KEDA's `scaleTargetGVKR`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct GroupVersionKindResource {
    /// API group (`apps`; empty for the core group).
    pub group: String,
    /// Kind (`Deployment`).
    pub kind: String,
    /// Resource (`deployments`).
    pub resource: String,
    /// Version (`v1`).
    pub version: String,
}

/// Health of one trigger (KEDA's `HealthStatus`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthStatus {
    /// Consecutive failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_failures: Option<i32>,
    /// `Happy` or `Failing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// Activity of one trigger (KEDA's `TriggerActivityStatus`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerActivityStatus {
    /// Whether the trigger had demand at the last decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_active: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_lookup_and_constructor() {
        let status = ScaledObjectStatus {
            conditions: vec![
                Condition::new(Condition::READY, false, "ScaleUpStalled", "no node"),
                Condition::new(Condition::ACTIVE, true, "Demand", "3 in flight"),
            ],
            ..Default::default()
        };
        let ready = status.condition(Condition::READY).expect("ready is set");
        assert!(!ready.is_true());
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.reason.as_deref(),
            Some(Condition::REASON_SCALE_UP_STALLED)
        );
        assert!(
            status
                .condition(Condition::ACTIVE)
                .is_some_and(Condition::is_true)
        );
        assert!(status.condition(Condition::PAUSED).is_none());
    }

    #[test]
    fn status_round_trips_keda_fields() {
        let json = serde_json::json!({
            "conditions": [{"type": "Ready", "status": "True", "reason": "ScalerReady",
                            "message": "ok", "lastTransitionTime": "2026-11-25T10:00:00Z"}],
            "currentReplicas": 2,
            "desiredReplicas": 3,
            "lastActiveTime": "2026-11-25T10:00:01Z",
            "originalReplicaCount": 1,
            "pausedReplicaCount": 0,
            "scaleTargetKind": "apps/v1.Deployment",
            "scaleTargetGVKR": {"group": "apps", "kind": "Deployment",
                                "resource": "deployments", "version": "v1"},
            "externalMetricNames": ["s0-rabbitmq-orders"],
            "resourceMetricNames": [],
            "health": {"s0-rabbitmq-orders": {"numberOfFailures": 0, "status": "Happy"}},
            "triggersTypes": "rabbitmq",
            "triggersActivity": {"s0-rabbitmq-orders": {"isActive": true}},
            "authenticationsTypes": "rabbit-auth",
            "compositeScalerName": "",
            "hpaName": "keda-hpa-x",
            "observedGeneration": 4
        });
        let status: ScaledObjectStatus = serde_json::from_value(json.clone()).expect("valid");
        assert_eq!(serde_json::to_value(&status).expect("serializes"), json);
    }
}
