//! Opt-in by annotation: a Deployment or StatefulSet annotated
//! `blink.sh/scale-to-zero: "true"` gets a generated `ScaledObject` of its own name,
//! owned by the workload and labelled `blink.sh/generated: "true"`, so annotated
//! workloads and `ScaledObject`s share one code path and one status.

use std::{collections::BTreeMap, time::Duration};

use blink_crds::{
    ScaleTrigger, ScaledObject, ScaledObjectSpec,
    scaled_object::{DEFAULT_COOLDOWN_PERIOD, ScaleTarget},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::config::parse_duration;

pub const ANNOTATION_SCALE_TO_ZERO: &str = "blink.sh/scale-to-zero";
/// Every annotation Blink reads on a workload starts with this.
pub const ANNOTATION_PREFIX: &str = "blink.sh/";
pub const LABEL_GENERATED: &str = "blink.sh/generated";

/// Annotations copied from the workload to its generated object, where the worker reads
/// them like on any `ScaledObject`.
const COPIED: [&str; 3] = [
    crate::function::plan::ANNOTATION_TRANSPARENT,
    crate::function::plan::ANNOTATION_PAUSED,
    crate::function::plan::ANNOTATION_PAUSED_REPLICAS,
];

pub fn opted_in(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(ANNOTATION_SCALE_TO_ZERO)
        .is_some_and(|v| v == "true")
}

/// The `ScaledObject` an annotated workload stands for, or a message naming the bad
/// annotation.
pub fn generate(
    api_version: &str,
    kind: &str,
    workload: &ObjectMeta,
) -> Result<ScaledObject, String> {
    let empty = BTreeMap::new();
    let annotations = workload.annotations.as_ref().unwrap_or(&empty);
    let name = workload.name.clone().unwrap_or_default();
    let get = |key: &str| {
        annotations
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let int = |key: &str| -> Result<Option<i32>, String> {
        get(key)
            .map(|v| {
                v.parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| format!("annotation {key}: {v:?} is not a non-negative integer"))
            })
            .transpose()
    };
    let min = int("blink.sh/min-scale")?;
    let max = int("blink.sh/max-scale")?;
    if let (Some(min), Some(max)) = (min, max)
        && min > max
    {
        return Err(format!(
            "annotations blink.sh/min-scale ({min}) is greater than blink.sh/max-scale ({max})"
        ));
    }
    let cooldown = get("blink.sh/cooldown")
        .map(|v| parse_duration(v).map_err(|e| format!("annotation blink.sh/cooldown: {e}")))
        .transpose()?
        .unwrap_or(DEFAULT_COOLDOWN_PERIOD);
    let mut metadata = BTreeMap::new();
    if let Some(c) = get("blink.sh/target-concurrency") {
        if !c.parse::<u32>().is_ok_and(|n| n > 0) {
            return Err(format!(
                "annotation blink.sh/target-concurrency: {c:?} is not a positive integer"
            ));
        }
        metadata.insert("targetConcurrency".to_owned(), c.to_owned());
    }
    if let Some(hosts) = get("blink.sh/hosts") {
        metadata.insert("hosts".to_owned(), hosts.to_owned());
    }
    metadata.insert(
        "service".to_owned(),
        get("blink.sh/service").unwrap_or(&name).to_owned(),
    );
    if let Some(port) = get("blink.sh/port") {
        metadata.insert("port".to_owned(), port.to_owned());
    }
    let mut object_annotations = BTreeMap::new();
    for key in COPIED {
        if let Some(v) = annotations.get(key) {
            object_annotations.insert(key.to_owned(), v.clone());
        }
    }
    let owner = OwnerReference {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        name: name.clone(),
        uid: workload.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(false),
    };
    let mut object = ScaledObject::new(
        &name,
        ScaledObjectSpec {
            scale_target_ref: ScaleTarget {
                api_version: Some(api_version.to_owned()),
                kind: Some(kind.to_owned()),
                name: name.clone(),
                env_source_container_name: None,
            },
            polling_interval: None,
            initial_cooldown_period: None,
            cooldown_period: Some(seconds(cooldown)),
            idle_replica_count: None,
            min_replica_count: min,
            max_replica_count: max,
            advanced: None,
            triggers: vec![ScaleTrigger {
                trigger_type: "http".to_owned(),
                name: Some("http".to_owned()),
                use_cached_metrics: None,
                metadata,
                authentication_ref: None,
                metric_type: None,
            }],
            fallback: None,
        },
    );
    object.metadata.namespace = workload.namespace.clone();
    object.metadata.labels = Some(BTreeMap::from([(
        LABEL_GENERATED.to_owned(),
        "true".to_owned(),
    )]));
    object.metadata.annotations = Some(object_annotations);
    object.metadata.owner_references = Some(vec![owner]);
    Ok(object)
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// Generated for a workload of `kind`: only that workload may update or remove it. A
/// SpinApp and the Deployment SpinKube makes for it share a name, so a plain
/// Deployment must not take the object generated for its annotated SpinApp as its own.
pub fn is_generated_for(object: &ScaledObject, kind: &str) -> bool {
    is_generated(object) && generated_for(object) == Some(kind)
}

/// The kind of workload an object was generated for (its controlling owner's).
pub fn generated_for(object: &ScaledObject) -> Option<&str> {
    object
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| owner.kind.as_str())
}

pub fn is_generated(object: &ScaledObject) -> bool {
    object
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_GENERATED))
        .is_some_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some("hello".into()),
            namespace: Some("ns".into()),
            uid: Some("u-1".into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn annotations_become_a_scaled_object() {
        let object = generate(
            "apps/v1",
            "Deployment",
            &meta(&[
                ("blink.sh/scale-to-zero", "true"),
                ("blink.sh/hosts", "hello.example.com"),
                ("blink.sh/port", "http"),
                ("blink.sh/target-concurrency", "10"),
                ("blink.sh/min-scale", "0"),
                ("blink.sh/max-scale", "50"),
                ("blink.sh/cooldown", "2m"),
                ("blink.sh/transparent", "true"),
            ]),
        )
        .expect("generates");
        assert!(is_generated(&object));
        assert_eq!(object.metadata.name.as_deref(), Some("hello"));
        assert_eq!(object.metadata.namespace.as_deref(), Some("ns"));
        let owner = &object.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Deployment", "u-1")
        );
        let spec = &object.spec;
        assert_eq!(spec.min_replica_count, Some(0));
        assert_eq!(spec.max_replica_count, Some(50));
        assert_eq!(spec.cooldown_period, Some(120));
        let trigger = &spec.triggers[0];
        assert_eq!(trigger.trigger_type, "http");
        assert_eq!(trigger.metadata["targetConcurrency"], "10");
        assert_eq!(trigger.metadata["hosts"], "hello.example.com");
        assert_eq!(
            trigger.metadata["service"], "hello",
            "defaults to the workload's name"
        );
        assert_eq!(trigger.metadata["port"], "http");
        assert_eq!(
            object.metadata.annotations.as_ref().expect("copied")["blink.sh/transparent"],
            "true"
        );
    }

    #[test]
    fn an_object_belongs_to_the_kind_it_was_generated_for() {
        let meta = meta(&[("blink.sh/scale-to-zero", "true")]);
        let for_spin_app =
            generate("core.spinkube.dev/v1alpha1", "SpinApp", &meta).expect("generates");
        assert!(is_generated_for(&for_spin_app, "SpinApp"));
        assert!(!is_generated_for(&for_spin_app, "Deployment"));
        assert_eq!(generated_for(&for_spin_app), Some("SpinApp"));
        let mut made_by_hand = for_spin_app.clone();
        made_by_hand.metadata.labels = None;
        assert!(!is_generated_for(&made_by_hand, "SpinApp"));
    }

    #[test]
    fn defaults() {
        let object = generate(
            "apps/v1",
            "StatefulSet",
            &meta(&[("blink.sh/scale-to-zero", "true")]),
        )
        .expect("generates");
        assert_eq!(object.spec.cooldown_period, Some(30));
        assert_eq!(object.spec.min_replica_count, None);
        assert_eq!(
            object.spec.scale_target_ref.kind.as_deref(),
            Some("StatefulSet")
        );
    }

    #[test]
    fn bad_annotations_are_named() {
        let cases = [
            (("blink.sh/min-scale", "-1"), "blink.sh/min-scale"),
            (("blink.sh/max-scale", "many"), "blink.sh/max-scale"),
            (("blink.sh/cooldown", "soon"), "blink.sh/cooldown"),
            (
                ("blink.sh/target-concurrency", "0"),
                "blink.sh/target-concurrency",
            ),
        ];
        for ((key, value), named) in cases {
            let err = generate("apps/v1", "Deployment", &meta(&[(key, value)])).expect_err(key);
            assert!(err.contains(named), "{err}");
        }
        let err = generate(
            "apps/v1",
            "Deployment",
            &meta(&[("blink.sh/min-scale", "5"), ("blink.sh/max-scale", "2")]),
        )
        .expect_err("min > max");
        assert!(err.contains("greater"), "{err}");
    }

    #[test]
    fn opt_in_needs_true() {
        let on = BTreeMap::from([(ANNOTATION_SCALE_TO_ZERO.to_owned(), "true".to_owned())]);
        let off = BTreeMap::from([(ANNOTATION_SCALE_TO_ZERO.to_owned(), "yes".to_owned())]);
        assert!(opted_in(&on));
        assert!(!opted_in(&off));
        assert!(!opted_in(&BTreeMap::new()));
    }
}
