//! What a `ScaledObject` asks for, checked and with Blink's defaults applied: the
//! target, the decision's policy, the triggers, pause and traffic mode. Anything Blink
//! cannot honour is refused here with a condition reason that names it, never
//! silently ignored (DESIGN.md, "The API").

use std::time::Duration;

use blink_crds::{
    ScaledObject,
    scaled_object::FallbackBehavior,
    trigger::{ScaleTrigger, TriggerType},
};
use kube::ResourceExt;

use crate::{
    decide::{Paused, Policy},
    target::TargetRef,
};

pub const ANNOTATION_PAUSED: &str = "blink.sh/paused";
pub const ANNOTATION_PAUSED_REPLICAS: &str = "blink.sh/paused-replicas";
pub const ANNOTATION_TRANSPARENT: &str = "blink.sh/transparent";

/// Knative's default target concurrency per replica, when the `http` trigger names none.
pub const DEFAULT_TARGET_CONCURRENCY: f64 = 100.0;

#[derive(Clone, Debug)]
pub struct Plan {
    pub target: TargetRef,
    pub policy: Policy,
    pub triggers: Vec<TriggerPlan>,
    pub paused: Option<Paused>,
    pub transparent: bool,
    pub polling_interval: Duration,
    pub restore_original: bool,
}

#[derive(Clone, Debug)]
pub enum TriggerPlan {
    /// Blink's own `http` trigger: concurrency from the demand protocol.
    Http {
        name: String,
        target_concurrency: f64,
        service: Option<String>,
        port: Option<String>,
    },
    /// A pull trigger, read by [`crate::triggers`].
    Pull { name: String, trigger: ScaleTrigger },
}

impl TriggerPlan {
    pub fn name(&self) -> &str {
        match self {
            Self::Http { name, .. } | Self::Pull { name, .. } => name,
        }
    }
}

impl Plan {
    pub fn has_http(&self) -> bool {
        self.triggers
            .iter()
            .any(|t| matches!(t, TriggerPlan::Http { .. }))
    }

    /// The function's Service: the `http` trigger's `service`, else the target's name.
    pub fn service_name(&self) -> String {
        self.triggers
            .iter()
            .find_map(|t| match t {
                TriggerPlan::Http { service, .. } => service.clone(),
                TriggerPlan::Pull { .. } => None,
            })
            .unwrap_or_else(|| self.target.name.clone())
    }

    pub fn trigger_names(&self) -> Vec<String> {
        self.triggers.iter().map(|t| t.name().to_owned()).collect()
    }
}

/// Why a `ScaledObject` cannot be acted on: a condition reason and a message that
/// names the field or value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Checks a `ScaledObject` and turns it into a [`Plan`].
pub fn plan(object: &ScaledObject) -> Result<Plan, Refusal> {
    let spec = &object.spec;
    let namespace = object.namespace().unwrap_or_default();
    if let Some(advanced) = &spec.advanced
        && advanced.scaling_modifiers.is_some()
    {
        return Err(Refusal::new(
            "UnsupportedField",
            "spec.advanced.scalingModifiers is not supported by Blink; remove it (it changes what scales, so Blink will not ignore it)",
        ));
    }
    if let Some(fallback) = &spec.fallback
        && fallback.behavior() == FallbackBehavior::ScalingModifiers
    {
        return Err(Refusal::new(
            "UnsupportedField",
            "spec.fallback.behavior: scalingModifiers is not supported by Blink",
        ));
    }
    let paused = paused(object)?;
    let transparent = object
        .annotations()
        .get(ANNOTATION_TRANSPARENT)
        .is_some_and(|v| v == "true");
    // The activator routes by the same reading of the `http` trigger; what it cannot
    // route is refused here, by name.
    if let Some(Err(e)) = blink_crds::routing::http_route(object) {
        return Err(Refusal::new("InvalidTriggerMetadata", e.to_string()));
    }
    let mut triggers = Vec::with_capacity(spec.triggers.len());
    for (index, trigger) in spec.triggers.iter().enumerate() {
        let name = trigger
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("{}-{index}", trigger.trigger_type));
        match trigger.metric_type.as_deref() {
            None | Some("AverageValue") | Some("Value") => {}
            Some(other) => {
                return Err(Refusal::new(
                    "UnsupportedField",
                    format!(
                        "spec.triggers[{index}].metricType {other:?} is not supported (AverageValue or Value)"
                    ),
                ));
            }
        }
        match trigger.known_type() {
            Some(TriggerType::Http) => triggers.push(http_trigger(index, name, trigger)?),
            Some(_) => triggers.push(TriggerPlan::Pull {
                name,
                trigger: trigger.clone(),
            }),
            None => {
                return Err(Refusal::new(
                    blink_crds::Condition::REASON_UNSUPPORTED_TRIGGER,
                    format!(
                        "spec.triggers[{index}].type {:?} is not supported by Blink (http, rabbitmq, kafka, prometheus, cron)",
                        trigger.trigger_type
                    ),
                ));
            }
        }
    }
    let transparent_http_only = transparent
        && triggers
            .iter()
            .all(|t| matches!(t, TriggerPlan::Http { .. }));
    Ok(Plan {
        target: TargetRef::of(&namespace, &spec.scale_target_ref),
        policy: Policy::from_spec(spec, transparent_http_only),
        triggers,
        paused,
        transparent,
        polling_interval: spec.polling_interval(),
        restore_original: spec.restore_to_original_replica_count(),
    })
}

fn http_trigger(
    index: usize,
    name: String,
    trigger: &ScaleTrigger,
) -> Result<TriggerPlan, Refusal> {
    let target_concurrency = match trigger.metadata.get("targetConcurrency") {
        None => DEFAULT_TARGET_CONCURRENCY,
        Some(text) => match text.parse::<f64>() {
            Ok(v) if v > 0.0 && v.is_finite() => v,
            _ => {
                return Err(Refusal::new(
                    "InvalidTriggerMetadata",
                    format!(
                        "spec.triggers[{index}].metadata.targetConcurrency {text:?} is not a positive number"
                    ),
                ));
            }
        },
    };
    Ok(TriggerPlan::Http {
        name,
        target_concurrency,
        service: trigger.metadata.get("service").cloned(),
        port: trigger.metadata.get("port").cloned(),
    })
}

/// KEDA's pause annotations under Blink's prefix: `paused-replicas: N` pins the count,
/// `paused: "true"` freezes it.
fn paused(object: &ScaledObject) -> Result<Option<Paused>, Refusal> {
    let annotations = object.annotations();
    if let Some(text) = annotations.get(ANNOTATION_PAUSED_REPLICAS) {
        return match text.trim().parse::<i32>() {
            Ok(n) if n >= 0 => Ok(Some(Paused::At(n))),
            _ => Err(Refusal::new(
                "InvalidAnnotation",
                format!("annotation {ANNOTATION_PAUSED_REPLICAS}: {text:?} is not a replica count"),
            )),
        };
    }
    Ok(match annotations.get(ANNOTATION_PAUSED) {
        Some(v) if v == "true" => Some(Paused::Hold),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(yaml: &str) -> ScaledObject {
        serde_yaml::from_str(yaml).expect("valid object")
    }

    const BASE: &str = "
apiVersion: blink.sh/v1alpha1
kind: ScaledObject
metadata: {name: hello, namespace: ns}
spec:
  scaleTargetRef: {name: hello}
  triggers:
  - {type: http, metadata: {targetConcurrency: '10'}}
  - {type: rabbitmq, name: orders, metadata: {queueName: q, host: 'amqp://x'}}
";

    #[test]
    fn a_plain_object_plans() {
        let plan = plan(&object(BASE)).expect("plans");
        assert_eq!(plan.target.kind, "Deployment");
        assert_eq!(plan.target.api_version, "apps/v1");
        assert_eq!(plan.target.namespace, "ns");
        assert_eq!(plan.trigger_names(), ["http-0", "orders"]);
        assert!(plan.has_http());
        assert!(matches!(
            plan.triggers[0],
            TriggerPlan::Http { target_concurrency, .. } if target_concurrency == 10.0
        ));
        assert_eq!(plan.paused, None);
        assert!(!plan.transparent);
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let cases = [
            (
                BASE.replace("type: rabbitmq", "type: aws-sqs-queue"),
                "UnsupportedTrigger",
                "aws-sqs-queue",
            ),
            (
                format!("{BASE}  advanced: {{scalingModifiers: {{formula: 'a+b'}}}}\n"),
                "UnsupportedField",
                "scalingModifiers",
            ),
            (
                format!(
                    "{BASE}  fallback: {{failureThreshold: 3, replicas: 1, behavior: scalingModifiers}}\n"
                ),
                "UnsupportedField",
                "fallback.behavior",
            ),
            (
                BASE.replace("targetConcurrency: '10'", "targetConcurrency: 'lots'"),
                "InvalidTriggerMetadata",
                "targetConcurrency",
            ),
            (
                BASE.replace("targetConcurrency: '10'", "pathPrefixes: api"),
                "InvalidTriggerMetadata",
                "pathPrefixes",
            ),
            (
                BASE.replace("targetConcurrency: '10'", "responseTimeout: '0'"),
                "InvalidTriggerMetadata",
                "responseTimeout",
            ),
            (
                BASE.replace(
                    "name: hello, namespace: ns",
                    "name: hello, namespace: ns, annotations: {blink.sh/paused-replicas: 'x'}",
                ),
                "InvalidAnnotation",
                "paused-replicas",
            ),
            (
                BASE.replace("name: orders,", "name: orders, metricType: Utilization,"),
                "UnsupportedField",
                "metricType",
            ),
        ];
        for (yaml, reason, names) in cases {
            let refusal = plan(&object(&yaml)).expect_err(names);
            assert_eq!(refusal.reason, reason, "{names}");
            assert!(refusal.message.contains(names), "{}", refusal.message);
        }
    }

    #[test]
    fn pause_annotations() {
        let cases = [
            ("{blink.sh/paused-replicas: '3'}", Some(Paused::At(3))),
            ("{blink.sh/paused: 'true'}", Some(Paused::Hold)),
            ("{blink.sh/paused: 'false'}", None),
            (
                "{blink.sh/paused: 'true', blink.sh/paused-replicas: '0'}",
                Some(Paused::At(0)),
            ),
        ];
        for (annotations, expected) in cases {
            let yaml = BASE.replace(
                "name: hello, namespace: ns",
                &format!("name: hello, namespace: ns, annotations: {annotations}"),
            );
            assert_eq!(
                plan(&object(&yaml)).expect("plans").paused,
                expected,
                "{annotations}"
            );
        }
    }

    #[test]
    fn transparent_http_only_is_flagged_for_the_decision() {
        let yaml = "
metadata: {name: hello, namespace: ns, annotations: {blink.sh/transparent: 'true'}}
spec:
  scaleTargetRef: {name: hello}
  triggers: [{type: http, metadata: {}}]
";
        let plan = plan(&object(yaml)).expect("plans");
        assert!(plan.transparent);
        assert!(plan.policy.transparent_http_only);
    }
}
