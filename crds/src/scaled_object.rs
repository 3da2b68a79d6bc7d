//! The `ScaledObject` resource: its spec, which is KEDA v2.20.2's property for property
//! (so a KEDA object moves to Blink by changing `apiVersion`), Blink's own knobs under
//! `advanced`, and the defaults Blink applies.
//!
//! Defaults live in methods ([`ScaledObjectSpec::min_replicas`],
//! [`ScaledObjectSpec::polling_interval`], …), never in the schema or in serde: a schema
//! default would be written into every stored object and a serde default would appear
//! on re-serialization, and either would break the promise that a KEDA object
//! round-trips unchanged. Two defaults differ from KEDA's on purpose, because a Wasm
//! replica is cheap to start again: `pollingInterval` 5 s (KEDA 30 s) and
//! `cooldownPeriod` 30 s (KEDA 300 s).
//!
//! Rules that span fields are CEL (`x-kubernetes-validations`) so the API server's
//! rejection names the problem:
//! - `minReplicaCount <= maxReplicaCount`, `maxReplicaCount` counting as 100 when
//!   absent (KEDA's own rule);
//! - `idleReplicaCount < minReplicaCount` when `idleReplicaCount` is set, with
//!   `minReplicaCount` counting as 0 when absent — so an `idleReplicaCount` without a
//!   `minReplicaCount` is refused, as KEDA's webhook refuses it.
//!
//! Per-trigger rules are in [`crate::trigger`].

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use kube::{CustomResource, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, Serializer};

use crate::{
    demand::{FunctionKey, FunctionKeyError},
    status::ScaledObjectStatus,
    trigger::ScaleTrigger,
};

/// Default `minReplicaCount` (KEDA's).
pub const DEFAULT_MIN_REPLICAS: i32 = 0;
/// Default `maxReplicaCount` (KEDA's).
pub const DEFAULT_MAX_REPLICAS: i32 = 100;
/// Default `pollingInterval`: 5 s (KEDA: 30 s). Pull triggers are polled this often.
pub const DEFAULT_POLLING_INTERVAL: Duration = Duration::from_secs(5);
/// Default `cooldownPeriod`: 30 s (KEDA: 300 s) without demand before going to zero.
pub const DEFAULT_COOLDOWN_PERIOD: Duration = Duration::from_secs(30);
/// Default `initialCooldownPeriod` (KEDA's): none.
pub const DEFAULT_INITIAL_COOLDOWN_PERIOD: Duration = Duration::ZERO;
/// Default `advanced.stableWindowSeconds` (Knative KPA's stable window).
pub const DEFAULT_STABLE_WINDOW: Duration = Duration::from_secs(60);
/// Default `advanced.panicWindowPercentage` (Knative's).
pub const DEFAULT_PANIC_WINDOW_PERCENTAGE: f64 = 10.0;
/// Default `advanced.panicThresholdPercentage` (Knative's).
pub const DEFAULT_PANIC_THRESHOLD_PERCENTAGE: f64 = 200.0;
/// Default `advanced.maxScaleUpRate` (Knative's).
pub const DEFAULT_MAX_SCALE_UP_RATE: f64 = 1000.0;
/// Default `advanced.maxScaleDownRate` (Knative's).
pub const DEFAULT_MAX_SCALE_DOWN_RATE: f64 = 2.0;

/// Scales a workload that has a `/scale` subresource (or a SpinApp's Deployment) from
/// zero to many replicas and back, driven by its triggers.
// kube's `printcolumn(…)` entries repeat `type_ = "…"` by design; clippy takes the
// repeats for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "blink.sh",
    version = "v1alpha1",
    kind = "ScaledObject",
    namespaced,
    shortname = "so",
    status = "ScaledObjectStatus",
    derive = "PartialEq",
    doc = "ScaledObject scales a workload from zero to many replicas and back, driven by \
           its triggers (KEDA's ScaledObject, in the blink.sh group).",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.scaleTargetRef.name"
    ),
    printcolumn(name = "Min", type_ = "integer", json_path = ".spec.minReplicaCount"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxReplicaCount"),
    printcolumn(
        name = "Current",
        type_ = "integer",
        json_path = ".status.currentReplicas"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(
        name = "Active",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Active")].status"#
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new(
        "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)"
    ).message("minReplicaCount must be less than or equal to maxReplicaCount (default 100)"),
    validation = Rule::new(
        "!has(self.idleReplicaCount) || self.idleReplicaCount < (has(self.minReplicaCount) ? self.minReplicaCount : 0)"
    ).message("idleReplicaCount must be less than minReplicaCount (default 0)"),
)]
#[serde(rename_all = "camelCase")]
pub struct ScaledObjectSpec {
    /// The workload to scale.
    pub scale_target_ref: ScaleTarget,

    /// Seconds between two polls of each pull trigger (default 5; KEDA's is 30).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub polling_interval: Option<i32>,

    /// Seconds after creation before the object may first scale to zero (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub initial_cooldown_period: Option<i32>,

    /// Seconds without demand before scaling to zero (default 30; KEDA's is 300).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cooldown_period: Option<i32>,

    /// Replicas while no trigger is active; must be less than `minReplicaCount`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub idle_replica_count: Option<i32>,

    /// Fewest replicas (default 0: scale to zero).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_replica_count: Option<i32>,

    /// Most replicas (default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_replica_count: Option<i32>,

    /// KEDA's advanced options and Blink's own scaling knobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advanced: Option<AdvancedConfig>,

    /// What drives scaling. At most 32, so the per-trigger validation rules stay
    /// within the API server's cost budget.
    #[schemars(length(min = 1, max = 32))]
    pub triggers: Vec<ScaleTrigger>,

    /// Replicas to hold while a trigger keeps failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

/// The workload a `ScaledObject` scales (KEDA's `ScaleTarget`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTarget {
    /// API version of the target (default `apps/v1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Kind of the target (default `Deployment`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the target, in the `ScaledObject`'s namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Container whose environment `…FromEnv` metadata keys read (default: the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_source_container_name: Option<String>,
}

/// KEDA's advanced options, plus Blink's own knobs (Knative KPA's, with Knative's
/// defaults). Blink's percentages and rates are numbers (`f64`) because fractional
/// values are meaningful (a scale-down rate of 1.5, say) and the decision computes in
/// `f64` anyway.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdvancedConfig {
    /// HPA-style behavior; Blink honours its stabilization windows and its `Percent` and
    /// `Pods` policies as rate limits, and ignores `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub horizontal_pod_autoscaler_config: Option<HorizontalPodAutoscalerConfig>,
    /// On deletion, scale the target back to the replicas it had before Blink took it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_to_original_replica_count: Option<bool>,
    /// KEDA's composite metric formula. Accepted by the schema; Blink refuses it with
    /// `Ready=False` rather than ignoring it, since it changes what scales.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling_modifiers: Option<ScalingModifiers>,

    /// Blink: seconds of the stable window the average demand is taken over (default 60).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub stable_window_seconds: Option<i32>,
    /// Blink: the panic window as a percentage of the stable window (default 10).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_number"
    )]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub panic_window_percentage: Option<f64>,
    /// Blink: demand over this percentage of current capacity, seen in the panic
    /// window, enters panic mode (default 200).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_number"
    )]
    #[schemars(range(min = 110.0, max = 1000.0))]
    pub panic_threshold_percentage: Option<f64>,
    /// Blink: at most this many times the ready replicas per decision (default 1000).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_number"
    )]
    #[schemars(range(min = 1.0))]
    pub max_scale_up_rate: Option<f64>,
    /// Blink: at least ready replicas divided by this per decision (default 2).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_number"
    )]
    #[schemars(range(min = 1.0))]
    pub max_scale_down_rate: Option<f64>,
}

/// Writes a whole number without a fraction (`10`, not `10.0`), the form the API
/// server stores (it decodes a whole JSON number as an integer), so an object read
/// from the cluster serializes back to the same JSON.
fn serialize_number<S: Serializer>(value: &Option<f64>, ser: S) -> Result<S::Ok, S::Error> {
    // Below 2^53 every whole f64 is exactly an i64, so the cast loses nothing.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match *value {
        Some(v) if v.fract() == 0.0 && v.abs() < EXACT => ser.serialize_i64(v as i64),
        Some(v) => ser.serialize_f64(v),
        None => ser.serialize_none(),
    }
}

/// KEDA's `horizontalPodAutoscalerConfig`.
///
/// `behavior` is k8s-openapi's autoscaling/v2 type, so its schema is the API's own.
/// One serde caveat: a `tolerance` written as a bare integer (`tolerance: 1`, which
/// the int-or-string schema allows) is read as the quantity `"1"` and written back as
/// that string; tolerances are fractions in practice (`"0.05"`), which are unaffected.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HorizontalPodAutoscalerConfig {
    /// autoscaling/v2 `HorizontalPodAutoscalerBehavior`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behavior: Option<HorizontalPodAutoscalerBehavior>,
    /// Name of the HPA KEDA would create; Blink creates none and ignores it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// KEDA's `scalingModifiers` (a formula over the triggers' metrics).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingModifiers {
    /// Activation target of the composed metric.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation_target: Option<String>,
    /// Formula over the triggers' metrics, by trigger name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub formula: Option<String>,
    /// How the composed metric is compared with `target`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric_type: Option<ScalingModifiersMetricType>,
    /// Target of the composed metric.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// How a composed metric is compared with its target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ScalingModifiersMetricType {
    /// The metric divided by the replicas is compared with the target.
    AverageValue,
    /// The metric itself is compared with the target.
    Value,
}

/// Replicas to hold while a trigger keeps failing (KEDA's `fallback`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// How the fallback replica count is chosen (default `static`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behavior: Option<FallbackBehavior>,
    /// Consecutive failures of a trigger before falling back.
    #[schemars(range(min = 0))]
    pub failure_threshold: i32,
    /// Replicas to fall back to.
    #[schemars(range(min = 0))]
    pub replicas: i32,
}

impl Fallback {
    /// `behavior`, or `static` when absent (KEDA's default).
    pub fn behavior(&self) -> FallbackBehavior {
        self.behavior.unwrap_or(FallbackBehavior::Static)
    }
}

/// How the fallback replica count is chosen (default `static`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FallbackBehavior {
    /// Exactly `fallback.replicas`.
    Static,
    /// Keep the current replicas.
    CurrentReplicas,
    /// The higher of current replicas and `fallback.replicas`.
    CurrentReplicasIfHigher,
    /// The lower of current replicas and `fallback.replicas`.
    CurrentReplicasIfLower,
    /// KEDA's scaling-modifiers fallback; Blink refuses it with `Ready=False`.
    ScalingModifiers,
}

/// Seconds from the API (non-negative by schema) as a [`Duration`]; a negative value
/// that bypassed the schema counts as absent rather than wrapping around.
fn seconds(value: Option<i32>) -> Option<Duration> {
    value
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
}

impl ScaledObjectSpec {
    /// `minReplicaCount`, default 0.
    pub fn min_replicas(&self) -> i32 {
        self.min_replica_count.unwrap_or(DEFAULT_MIN_REPLICAS)
    }

    /// `maxReplicaCount`, default 100.
    pub fn max_replicas(&self) -> i32 {
        self.max_replica_count.unwrap_or(DEFAULT_MAX_REPLICAS)
    }

    /// `pollingInterval`, default 5 s (KEDA: 30 s).
    pub fn polling_interval(&self) -> Duration {
        seconds(self.polling_interval).unwrap_or(DEFAULT_POLLING_INTERVAL)
    }

    /// `cooldownPeriod`, default 30 s (KEDA: 300 s).
    pub fn cooldown_period(&self) -> Duration {
        seconds(self.cooldown_period).unwrap_or(DEFAULT_COOLDOWN_PERIOD)
    }

    /// `initialCooldownPeriod`, default 0.
    pub fn initial_cooldown_period(&self) -> Duration {
        seconds(self.initial_cooldown_period).unwrap_or(DEFAULT_INITIAL_COOLDOWN_PERIOD)
    }

    /// `advanced.restoreToOriginalReplicaCount`, default false.
    pub fn restore_to_original_replica_count(&self) -> bool {
        self.advanced
            .as_ref()
            .and_then(|a| a.restore_to_original_replica_count)
            .unwrap_or(false)
    }

    /// `advanced.stableWindowSeconds`, default 60 s.
    pub fn stable_window(&self) -> Duration {
        seconds(self.advanced.as_ref().and_then(|a| a.stable_window_seconds))
            .unwrap_or(DEFAULT_STABLE_WINDOW)
    }

    /// `advanced.panicWindowPercentage`, default 10.
    pub fn panic_window_percentage(&self) -> f64 {
        self.advanced
            .as_ref()
            .and_then(|a| a.panic_window_percentage)
            .unwrap_or(DEFAULT_PANIC_WINDOW_PERCENTAGE)
    }

    /// `advanced.panicThresholdPercentage`, default 200.
    pub fn panic_threshold_percentage(&self) -> f64 {
        self.advanced
            .as_ref()
            .and_then(|a| a.panic_threshold_percentage)
            .unwrap_or(DEFAULT_PANIC_THRESHOLD_PERCENTAGE)
    }

    /// `advanced.maxScaleUpRate`, default 1000.
    pub fn max_scale_up_rate(&self) -> f64 {
        self.advanced
            .as_ref()
            .and_then(|a| a.max_scale_up_rate)
            .unwrap_or(DEFAULT_MAX_SCALE_UP_RATE)
    }

    /// `advanced.maxScaleDownRate`, default 2.
    pub fn max_scale_down_rate(&self) -> f64 {
        self.advanced
            .as_ref()
            .and_then(|a| a.max_scale_down_rate)
            .unwrap_or(DEFAULT_MAX_SCALE_DOWN_RATE)
    }

    /// `advanced.horizontalPodAutoscalerConfig.behavior`, if set.
    pub fn hpa_behavior(&self) -> Option<&HorizontalPodAutoscalerBehavior> {
        self.advanced
            .as_ref()?
            .horizontal_pod_autoscaler_config
            .as_ref()?
            .behavior
            .as_ref()
    }
}

impl ScaledObject {
    /// The demand protocol's key for this object: its `namespace/name`.
    pub fn function_key(&self) -> Result<FunctionKey, FunctionKeyError> {
        FunctionKey::new(
            self.namespace().unwrap_or_default(),
            self.metadata.name.clone().unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ScaledObjectSpec {
        serde_yaml::from_str(yaml).expect("valid spec")
    }

    #[test]
    fn defaults_when_absent() {
        let s = spec("{scaleTargetRef: {name: hello}, triggers: [{type: http, metadata: {}}]}");
        assert_eq!(s.min_replicas(), 0);
        assert_eq!(s.max_replicas(), 100);
        assert_eq!(s.polling_interval(), Duration::from_secs(5));
        assert_eq!(s.cooldown_period(), Duration::from_secs(30));
        assert_eq!(s.initial_cooldown_period(), Duration::ZERO);
        assert!(!s.restore_to_original_replica_count());
        assert_eq!(s.stable_window(), Duration::from_secs(60));
        assert_eq!(s.panic_window_percentage(), 10.0);
        assert_eq!(s.panic_threshold_percentage(), 200.0);
        assert_eq!(s.max_scale_up_rate(), 1000.0);
        assert_eq!(s.max_scale_down_rate(), 2.0);
        assert!(s.hpa_behavior().is_none());
    }

    #[test]
    fn values_when_present() {
        let s = spec(
            r#"
scaleTargetRef: {name: hello}
minReplicaCount: 1
maxReplicaCount: 7
pollingInterval: 2
cooldownPeriod: 9
initialCooldownPeriod: 4
advanced:
  restoreToOriginalReplicaCount: true
  stableWindowSeconds: 6
  panicWindowPercentage: 20
  panicThresholdPercentage: 150.5
  maxScaleUpRate: 10
  maxScaleDownRate: 1.5
  horizontalPodAutoscalerConfig:
    behavior: {scaleDown: {stabilizationWindowSeconds: 12}}
triggers: [{type: http, metadata: {}}]
"#,
        );
        assert_eq!(s.min_replicas(), 1);
        assert_eq!(s.max_replicas(), 7);
        assert_eq!(s.polling_interval(), Duration::from_secs(2));
        assert_eq!(s.cooldown_period(), Duration::from_secs(9));
        assert_eq!(s.initial_cooldown_period(), Duration::from_secs(4));
        assert!(s.restore_to_original_replica_count());
        assert_eq!(s.stable_window(), Duration::from_secs(6));
        assert_eq!(s.panic_window_percentage(), 20.0);
        assert_eq!(s.panic_threshold_percentage(), 150.5);
        assert_eq!(s.max_scale_up_rate(), 10.0);
        assert_eq!(s.max_scale_down_rate(), 1.5);
        let down = s.hpa_behavior().and_then(|b| b.scale_down.as_ref());
        assert_eq!(down.and_then(|d| d.stabilization_window_seconds), Some(12));
    }

    #[test]
    fn negative_seconds_fall_back_to_defaults() {
        let s = spec(
            "{scaleTargetRef: {name: h}, cooldownPeriod: -1, pollingInterval: -5, triggers: []}",
        );
        assert_eq!(s.cooldown_period(), DEFAULT_COOLDOWN_PERIOD);
        assert_eq!(s.polling_interval(), DEFAULT_POLLING_INTERVAL);
    }

    #[test]
    fn fallback_behavior_defaults_to_static() {
        let f: Fallback =
            serde_yaml::from_str("{failureThreshold: 3, replicas: 2}").expect("valid");
        assert_eq!(f.behavior(), FallbackBehavior::Static);
        let f: Fallback = serde_yaml::from_str(
            "{failureThreshold: 3, replicas: 2, behavior: currentReplicasIfHigher}",
        )
        .expect("valid");
        assert_eq!(f.behavior(), FallbackBehavior::CurrentReplicasIfHigher);
    }

    #[test]
    fn function_key_is_namespace_and_name() {
        let mut so = ScaledObject::new("hello", spec("{scaleTargetRef: {name: h}, triggers: []}"));
        assert!(so.function_key().is_err(), "no namespace yet");
        so.metadata.namespace = Some("default".into());
        let key = so.function_key().expect("valid key");
        assert_eq!(key.to_string(), "default/hello");
    }
}
