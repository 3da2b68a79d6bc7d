//! The KEDA compatibility walk: every property of KEDA v2.20.2's `ScaledObject`,
//! `TriggerAuthentication` and `ClusterTriggerAuthentication` schemas (spec and status)
//! exists in Blink's generated schema with a compatible type; and Blink's schemas are
//! structural (what the API server requires of a CRD).

mod common;

use std::collections::BTreeSet;

use serde_json::Value;

use common::{blink_crds, crd_of, keda_file, schema_of};

/// Every way `blink` fails to accept what `keda` accepts, one line per problem,
/// starting with the property path (`spec.triggers[].metadata{}`; `[]` is an array
/// item, `{}` a map value).
///
/// At each schema node of KEDA's it checks, in Blink's node at the same path:
/// - the property exists;
/// - `x-kubernetes-int-or-string` is kept where KEDA has it, otherwise `type` is equal;
/// - `format` is equal where KEDA has one (`int32`, `int64`, `date-time`);
/// - `items` and `additionalProperties` exist where KEDA has them, and are compatible;
/// - `enum`: Blink has none, or all of KEDA's values;
/// - `required`: Blink requires nothing KEDA does not;
/// - lower bounds (`minimum`, `minLength`, `minItems`): none stricter than KEDA's.
///
/// Upper bounds (`maxItems`, `maxLength`, `maxProperties`) are not compared: Blink adds
/// them on purpose, so the CEL rules stay within the API server's cost budget.
/// Properties only Blink has are not compared either: they are Blink's additions.
fn compat_problems(keda: &Value, blink: &Value, path: &str, problems: &mut Vec<String>) {
    let int_or_string = |s: &Value| s["x-kubernetes-int-or-string"] == Value::Bool(true);
    if int_or_string(keda) {
        if !int_or_string(blink) {
            problems.push(format!(
                "{path}: KEDA's is int-or-string, Blink's is not (type {})",
                blink["type"]
            ));
        }
    } else if keda.get("type") != blink.get("type") {
        problems.push(format!(
            "{path}: type {} in KEDA, {} in Blink",
            keda["type"], blink["type"]
        ));
        // The rest compares shapes of the same type; it would only repeat this problem.
        return;
    }

    if let Some(format) = keda.get("format")
        && blink.get("format") != Some(format)
    {
        problems.push(format!(
            "{path}: format {format} in KEDA, {} in Blink",
            blink["format"]
        ));
    }

    if let Some(keda_enum) = keda.get("enum").and_then(Value::as_array) {
        if let Some(blink_enum) = blink.get("enum").and_then(Value::as_array) {
            let missing: Vec<&Value> = keda_enum
                .iter()
                .filter(|v| !blink_enum.contains(v))
                .collect();
            if !missing.is_empty() {
                problems.push(format!("{path}: enum lacks KEDA's values {missing:?}"));
            }
        }
    } else if blink.get("enum").is_some() {
        problems.push(format!("{path}: Blink restricts to an enum, KEDA does not"));
    }

    let names = |s: &Value, key: &str| -> BTreeSet<String> {
        s.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    for extra in names(blink, "required").difference(&names(keda, "required")) {
        problems.push(format!("{path}: Blink requires {extra:?}, KEDA does not"));
    }

    for bound in ["minimum", "minLength", "minItems", "minProperties"] {
        let (k, b) = (
            keda.get(bound).and_then(Value::as_f64),
            blink.get(bound).and_then(Value::as_f64),
        );
        match (k, b) {
            (Some(k), Some(b)) if b > k => {
                problems.push(format!("{path}: {bound} {b} in Blink, {k} in KEDA"));
            }
            (None, Some(b)) => problems.push(format!("{path}: {bound} {b} in Blink, none in KEDA")),
            _ => {}
        }
    }

    if let Some(props) = keda.get("properties").and_then(Value::as_object) {
        for (name, keda_prop) in props {
            let sub = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            match blink.get("properties").and_then(|p| p.get(name)) {
                Some(blink_prop) => compat_problems(keda_prop, blink_prop, &sub, problems),
                None => problems.push(format!("{sub}: missing in Blink")),
            }
        }
    }

    if let Some(keda_items) = keda.get("items") {
        match blink.get("items") {
            Some(blink_items) => {
                compat_problems(keda_items, blink_items, &format!("{path}[]"), problems);
            }
            None => problems.push(format!("{path}[]: items missing in Blink")),
        }
    }

    if let Some(keda_values) = keda.get("additionalProperties").filter(|v| v.is_object()) {
        match blink.get("additionalProperties").filter(|v| v.is_object()) {
            Some(blink_values) => {
                compat_problems(keda_values, blink_values, &format!("{path}{{}}"), problems);
            }
            None => problems.push(format!("{path}{{}}: additionalProperties missing in Blink")),
        }
    }
}

/// KEDA's spec and status schemas of `kind` against Blink's.
fn walk_kind(keda_file_name: &str, kind: &str) -> Vec<String> {
    let keda_docs = keda_file(keda_file_name);
    let keda = schema_of(crd_of(&keda_docs, kind));
    let crds = blink_crds();
    let blink = schema_of(crd_of(&crds, kind));
    let mut problems = Vec::new();
    for part in ["spec", "status"] {
        assert!(
            keda["properties"][part].is_object(),
            "KEDA's {kind} has a {part}"
        );
        compat_problems(
            &keda["properties"][part],
            &blink["properties"][part],
            part,
            &mut problems,
        );
    }
    problems
}

fn assert_compatible(keda_file_name: &str, kind: &str) {
    let problems = walk_kind(keda_file_name, kind);
    assert!(
        problems.is_empty(),
        "Blink's {kind} schema does not accept all of KEDA's:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn scaled_object_accepts_all_of_kedas_schema() {
    assert_compatible("keda.sh_scaledobjects.yaml", "ScaledObject");
}

#[test]
fn trigger_authentication_accepts_all_of_kedas_schema() {
    assert_compatible(
        "keda.sh_triggerauthentications.yaml",
        "TriggerAuthentication",
    );
}

#[test]
fn cluster_trigger_authentication_accepts_all_of_kedas_schema() {
    assert_compatible(
        "keda.sh_clustertriggerauthentications.yaml",
        "ClusterTriggerAuthentication",
    );
}

#[test]
fn walk_reaches_deep_into_the_real_schemas() {
    // Take one deep property out of Blink's real ScaledObject schema: the walk must
    // name exactly that path, so it cannot have stopped early on the real files.
    let keda_docs = keda_file("keda.sh_scaledobjects.yaml");
    let keda = schema_of(crd_of(&keda_docs, "ScaledObject"));
    let crds = blink_crds();
    let mut blink = schema_of(crd_of(&crds, "ScaledObject")).clone();
    let policy = blink
        .pointer_mut(
            "/properties/spec/properties/advanced/properties/horizontalPodAutoscalerConfig\
             /properties/behavior/properties/scaleUp/properties/policies/items/properties",
        )
        .and_then(Value::as_object_mut)
        .expect("Blink has HPA scale-up policies");
    policy.remove("periodSeconds");
    let status = blink
        .pointer_mut(
            "/properties/status/properties/triggersActivity/additionalProperties/properties",
        )
        .and_then(Value::as_object_mut)
        .expect("Blink has triggersActivity");
    status.insert("isActive".into(), serde_json::json!({"type": "string"}));

    let mut problems = Vec::new();
    for part in ["spec", "status"] {
        compat_problems(
            &keda["properties"][part],
            &blink["properties"][part],
            part,
            &mut problems,
        );
    }
    assert_eq!(
        problems,
        [
            "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleUp.policies[].periodSeconds: \
             missing in Blink",
            r#"status.triggersActivity{}.isActive: type "boolean" in KEDA, "string" in Blink"#,
        ]
    );
}

/// The walker itself: a deliberately incomplete and mistyped schema must be reported,
/// path by path.
#[test]
fn walker_reports_every_incompatibility() {
    let keda = serde_json::json!({
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "replicas": {"type": "integer", "format": "int32", "minimum": 0},
            "tolerance": {"anyOf": [{"type": "integer"}, {"type": "string"}],
                          "x-kubernetes-int-or-string": true},
            "mode": {"type": "string", "enum": ["a", "b"]},
            "free": {"type": "string"},
            "when": {"type": "string", "format": "date-time"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "items": {"type": "array", "items": {
                "type": "object",
                "properties": {"key": {"type": "string"}, "size": {"type": "integer", "format": "int64"}}
            }},
            "nested": {"type": "object", "properties": {"deep": {"type": "boolean"}}}
        }
    });
    let blink = serde_json::json!({
        "type": "object",
        "required": ["name", "mode"],
        "properties": {
            "name": {"type": "string"},
            "replicas": {"type": "integer", "format": "int64", "minimum": 1},
            "tolerance": {"type": "string"},
            "mode": {"type": "string", "enum": ["a"]},
            "free": {"type": "string", "enum": ["x"], "maxLength": 10},
            "when": {"type": "string"},
            "labels": {"type": "object"},
            "items": {"type": "array", "items": {
                "type": "object",
                "properties": {"size": {"type": "integer", "format": "int32"}}
            }},
            "nested": {"type": "string"}
        }
    });
    let mut problems = Vec::new();
    compat_problems(&keda, &blink, "spec", &mut problems);
    problems.sort();
    let mut expected = vec![
        r#"spec: Blink requires "mode", KEDA does not"#.to_owned(),
        r#"spec.free: Blink restricts to an enum, KEDA does not"#.to_owned(),
        r#"spec.items[].key: missing in Blink"#.to_owned(),
        r#"spec.items[].size: format "int64" in KEDA, "int32" in Blink"#.to_owned(),
        r#"spec.labels{}: additionalProperties missing in Blink"#.to_owned(),
        r#"spec.mode: enum lacks KEDA's values [String("b")]"#.to_owned(),
        r#"spec.nested: type "object" in KEDA, "string" in Blink"#.to_owned(),
        r#"spec.replicas: format "int32" in KEDA, "int64" in Blink"#.to_owned(),
        r#"spec.replicas: minimum 1 in Blink, 0 in KEDA"#.to_owned(),
        r#"spec.tolerance: KEDA's is int-or-string, Blink's is not (type "string")"#.to_owned(),
        r#"spec.when: format "date-time" in KEDA, null in Blink"#.to_owned(),
    ];
    expected.sort();
    assert_eq!(problems, expected);

    // And a compatible schema (KEDA's own) reports nothing.
    let mut none = Vec::new();
    compat_problems(&keda, &keda, "spec", &mut none);
    assert!(none.is_empty(), "{none:?}");
}

/// Calls `visit(path, node)` for every schema node under `schema`.
fn each_schema_node(schema: &Value, path: &str, visit: &mut dyn FnMut(&str, &Value)) {
    visit(path, schema);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            each_schema_node(prop, &format!("{path}.{name}"), visit);
        }
    }
    if let Some(items) = schema.get("items") {
        each_schema_node(items, &format!("{path}[]"), visit);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        each_schema_node(values, &format!("{path}{{}}"), visit);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for (i, sub) in schema
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            each_schema_node(sub, &format!("{path}.{key}[{i}]"), visit);
        }
    }
}

/// Kubernetes' structural-schema rules, as far as a generated schema can break them,
/// kept strict because Blink's schemas need none of the exceptions: a `type` (one
/// string) on every node except int-or-string ones, no `$ref`, no `anyOf`, `oneOf`,
/// `allOf` or `not`, never `properties` together with `additionalProperties`, no
/// `x-kubernetes-preserve-unknown-fields` (KEDA has none, and it would let typos
/// through), and no `nullable` (removed on purpose; see `blink_crds::all_crds`).
#[test]
fn blink_schemas_are_structural_and_closed() {
    let mut problems = Vec::new();
    for crd in blink_crds() {
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let schema = schema_of(&crd);
        assert!(
            schema["properties"]["spec"].is_object(),
            "{kind} has a spec"
        );
        each_schema_node(schema, &kind, &mut |path, node| {
            let obj = node.as_object().expect("schema nodes are objects");
            for forbidden in [
                "$ref",
                "anyOf",
                "oneOf",
                "allOf",
                "not",
                "x-kubernetes-preserve-unknown-fields",
                "nullable",
            ] {
                if obj.contains_key(forbidden) {
                    problems.push(format!("{path}: {forbidden}"));
                }
            }
            match obj.get("type") {
                Some(Value::String(_)) => {}
                Some(other) => problems.push(format!("{path}: type {other} is not one string")),
                None if node["x-kubernetes-int-or-string"] == Value::Bool(true) => {}
                None => problems.push(format!("{path}: no type")),
            }
            if obj.contains_key("properties")
                && obj
                    .get("additionalProperties")
                    .is_some_and(Value::is_object)
            {
                problems.push(format!("{path}: both properties and additionalProperties"));
            }
        });
    }
    assert!(
        problems.is_empty(),
        "not structural:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn crd_names_and_scopes() {
    let crds = blink_crds();
    let expect = [
        (
            "ScaledObject",
            "scaledobjects.blink.sh",
            "Namespaced",
            vec!["so"],
        ),
        (
            "TriggerAuthentication",
            "triggerauthentications.blink.sh",
            "Namespaced",
            vec!["ta", "triggerauth"],
        ),
        (
            "ClusterTriggerAuthentication",
            "clustertriggerauthentications.blink.sh",
            "Cluster",
            vec!["cta", "clustertriggerauth"],
        ),
    ];
    assert_eq!(crds.len(), expect.len());
    for (kind, name, scope, short) in expect {
        let crd = crd_of(&crds, kind);
        assert_eq!(crd["metadata"]["name"], name);
        assert_eq!(crd["spec"]["group"], "blink.sh");
        assert_eq!(crd["spec"]["scope"], scope);
        assert_eq!(crd["spec"]["names"]["shortNames"], serde_json::json!(short));
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(version["served"], true);
        assert_eq!(version["storage"], true);
        assert_eq!(
            version["subresources"],
            serde_json::json!({"status": {}}),
            "{kind}: status only, no scale"
        );
    }
}

#[test]
fn scaled_object_printer_columns() {
    let crds = blink_crds();
    let columns = &crd_of(&crds, "ScaledObject")["spec"]["versions"][0]["additionalPrinterColumns"];
    let got: Vec<(String, String)> = columns
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_owned(),
                c["jsonPath"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want = [
        ("Target", ".spec.scaleTargetRef.name"),
        ("Min", ".spec.minReplicaCount"),
        ("Max", ".spec.maxReplicaCount"),
        ("Current", ".status.currentReplicas"),
        ("Desired", ".status.desiredReplicas"),
        (
            "Active",
            r#".status.conditions[?(@.type=="Active")].status"#,
        ),
        ("Ready", r#".status.conditions[?(@.type=="Ready")].status"#),
        ("Age", ".metadata.creationTimestamp"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn cel_rules_have_the_bounds_their_cost_needs() {
    let crds = blink_crds();
    let spec = &schema_of(crd_of(&crds, "ScaledObject"))["properties"]["spec"];
    let triggers = &spec["properties"]["triggers"];
    assert_eq!(triggers["maxItems"], 32);
    assert_eq!(triggers["minItems"], 1);
    let trigger = &triggers["items"];
    assert_eq!(trigger["properties"]["type"]["maxLength"], 253);
    assert_eq!(trigger["properties"]["type"]["minLength"], 1);
    let metadata = &trigger["properties"]["metadata"];
    assert_eq!(metadata["maxProperties"], 64);
    assert_eq!(
        metadata["additionalProperties"],
        serde_json::json!({"type": "string", "maxLength": 4096})
    );
    // Every rule has a message: the API server's rejection is what users read.
    let mut rules = 0;
    each_schema_node(
        schema_of(crd_of(&crds, "ScaledObject")),
        "",
        &mut |path, node| {
            for rule in node
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                rules += 1;
                assert!(
                    rule["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{path}: {rule}"
                );
            }
        },
    );
    assert_eq!(rules, 14);
}
