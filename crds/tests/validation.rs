//! Objects against Blink's types and CRDs: KEDA's documentation examples (and the
//! design's own example) survive a serde round trip unchanged and pass the CEL rules;
//! broken objects are refused with the message that names the problem.
//!
//! The CEL rules run client-side with kube's `cel` feature (kube-cel) against the
//! schema of `blink_crds::all_crds()`, i.e. the rules exactly as installed. The real
//! API server's verdict (including cost estimates) is checked by the cluster tests.

mod common;

use kube::core::cel::{Validator, compile_schema};
use serde_json::{Value, json};

use blink_crds::{ClusterTriggerAuthentication, ScaledObject, TriggerAuthentication};
use common::{blink_crds, crd_of, keda_file, schema_of, yaml_documents};

/// `doc` as Blink reads and writes it, after changing only `apiVersion`.
fn through_blink_types(mut doc: Value) -> (Value, Value) {
    doc["apiVersion"] = json!("blink.sh/v1alpha1");
    let kind = doc["kind"].as_str().expect("kind").to_owned();
    let out = match kind.as_str() {
        "ScaledObject" => serde_json::to_value(
            serde_json::from_value::<ScaledObject>(doc.clone()).expect("a ScaledObject"),
        ),
        "TriggerAuthentication" => serde_json::to_value(
            serde_json::from_value::<TriggerAuthentication>(doc.clone())
                .expect("a TriggerAuthentication"),
        ),
        "ClusterTriggerAuthentication" => serde_json::to_value(
            serde_json::from_value::<ClusterTriggerAuthentication>(doc.clone())
                .expect("a ClusterTriggerAuthentication"),
        ),
        other => panic!("unexpected kind {other}"),
    };
    (doc, out.expect("serializes"))
}

/// The CEL failures of `object` under Blink's CRD of its kind: `field: message`.
fn cel_failures(object: &Value) -> Vec<String> {
    let crds = blink_crds();
    let kind = object["kind"].as_str().expect("kind");
    let schema = schema_of(crd_of(&crds, kind));
    match Validator::new().validate(schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

fn keda_examples() -> Vec<Value> {
    let docs = keda_file("examples.yaml");
    assert_eq!(docs.len(), 6, "the fixture's six documents");
    docs
}

#[test]
fn keda_examples_round_trip_unchanged() {
    for doc in keda_examples() {
        let name = doc["metadata"]["name"].clone();
        let (input, output) = through_blink_types(doc);
        assert_eq!(output, input, "{name} changed in a round trip");
    }
}

#[test]
fn keda_examples_pass_the_cel_rules() {
    for mut doc in keda_examples() {
        doc["apiVersion"] = json!("blink.sh/v1alpha1");
        let failures = cel_failures(&doc);
        assert!(
            failures.is_empty(),
            "{}: {failures:?}",
            doc["metadata"]["name"]
        );
    }
}

#[test]
fn keda_examples_also_load_as_cluster_trigger_authentications() {
    for doc in keda_examples()
        .into_iter()
        .filter(|d| d["kind"] == "TriggerAuthentication")
    {
        let mut doc = doc;
        doc["kind"] = json!("ClusterTriggerAuthentication");
        if let Some(meta) = doc["metadata"].as_object_mut() {
            meta.remove("namespace");
        }
        let (input, output) = through_blink_types(doc);
        assert_eq!(output, input);
    }
}

/// The example of DESIGN.md's "The API", with Blink's own knobs and trigger.
const DESIGN_EXAMPLE: &str = r#"
apiVersion: blink.sh/v1alpha1
kind: ScaledObject
metadata: {name: hello, namespace: default}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: hello}
  minReplicaCount: 0
  maxReplicaCount: 1000
  pollingInterval: 5
  cooldownPeriod: 30
  fallback: {failureThreshold: 3, replicas: 2}
  advanced:
    restoreToOriginalReplicaCount: false
    stableWindowSeconds: 60
    panicWindowPercentage: 10
    panicThresholdPercentage: 200
    maxScaleUpRate: 1000
    maxScaleDownRate: 2.5
  triggers:
  - type: http
    metadata: {hosts: "hello.example.com", pathPrefixes: "/", targetConcurrency: "10",
               service: hello, port: "http"}
  - type: rabbitmq
    metadata: {protocol: amqp, queueName: orders, mode: QueueLength, value: "20",
               activationValue: "0", dispatch: "http", path: "/orders"}
    authenticationRef: {name: rabbit-auth}
  - type: kafka
    metadata: {bootstrapServers: "kafka:9092", consumerGroup: hello, topic: events,
               lagThreshold: "10", activationLagThreshold: "0"}
"#;

#[test]
fn design_example_round_trips_and_passes() {
    let doc = yaml_documents(DESIGN_EXAMPLE).remove(0);
    let (input, output) = through_blink_types(doc);
    assert_eq!(output, input);
    assert_eq!(cel_failures(&input), Vec::<String>::new());
    let so: ScaledObject = serde_json::from_value(input).expect("a ScaledObject");
    assert_eq!(so.spec.max_replicas(), 1000);
    assert_eq!(so.spec.max_scale_down_rate(), 2.5);
}

#[test]
fn keda_fields_blink_does_not_use_still_round_trip() {
    // Every optional KEDA ScaledObject field at once, including the ones Blink refuses
    // later with a condition (scalingModifiers) or ignores (useCachedMetrics).
    let doc = json!({
        "apiVersion": "blink.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "all", "namespace": "default"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w",
                               "envSourceContainerName": "main"},
            "pollingInterval": 30, "initialCooldownPeriod": 10, "cooldownPeriod": 300,
            "idleReplicaCount": 0, "minReplicaCount": 1, "maxReplicaCount": 10,
            "fallback": {"failureThreshold": 3, "replicas": 6, "behavior": "currentReplicasIfHigher"},
            "advanced": {
                "restoreToOriginalReplicaCount": true,
                "horizontalPodAutoscalerConfig": {
                    "name": "keda-hpa-w",
                    "behavior": {
                        "scaleDown": {"stabilizationWindowSeconds": 300, "selectPolicy": "Min",
                                      "tolerance": "0.05",
                                      "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}]},
                        "scaleUp": {"stabilizationWindowSeconds": 0,
                                    "policies": [{"type": "Pods", "value": 4, "periodSeconds": 15}]}
                    }
                },
                "scalingModifiers": {"formula": "a + b", "target": "2", "activationTarget": "1",
                                     "metricType": "AverageValue"}
            },
            "triggers": [
                {"type": "aws-sqs-queue", "name": "a", "useCachedMetrics": true,
                 "metricType": "Value", "metadata": {"queueURL": "q", "queueLength": "5"},
                 "authenticationRef": {"name": "aws", "kind": "ClusterTriggerAuthentication"}}
            ]
        },
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "ScaledObjectReady",
                            "message": "ok"}],
            "scaleTargetKind": "apps/v1.Deployment",
            "scaleTargetGVKR": {"group": "apps", "kind": "Deployment", "resource": "deployments",
                                "version": "v1"},
            "originalReplicaCount": 1,
            "lastActiveTime": "2026-11-25T10:00:00Z",
            "externalMetricNames": ["s0-aws-sqs-queue"],
            "health": {"s0-aws-sqs-queue": {"numberOfFailures": 0, "status": "Happy"}},
            "triggersTypes": "aws-sqs-queue",
            "triggersActivity": {"s0-aws-sqs-queue": {"isActive": false}},
            "authenticationsTypes": "aws",
            "hpaName": "keda-hpa-w"
        }
    });
    let (input, output) = through_blink_types(doc);
    assert_eq!(output, input);
    assert_eq!(cel_failures(&input), Vec::<String>::new());
}

#[test]
fn every_keda_authentication_source_round_trips() {
    let doc = json!({
        "apiVersion": "blink.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": "all", "namespace": "default"},
        "spec": {
            "podIdentity": {"provider": "aws", "roleArn": "arn:x", "identityOwner": "workload",
                            "externalID": "e", "identityId": "i", "identityTenantId": "t",
                            "identityAuthorityHost": "h"},
            "secretTargetRef": [{"parameter": "host", "name": "s", "key": "host"}],
            "configMapTargetRef": [{"parameter": "vhost", "name": "c", "key": "vhost"}],
            "env": [{"parameter": "user", "name": "USER", "containerName": "main"}],
            "hashiCorpVault": {
                "address": "https://vault:8200", "namespace": "n", "authentication": "kubernetes",
                "role": "r", "mount": "m",
                "credential": {"token": "t", "serviceAccount": "/var/run/sa", "serviceAccountName": "sa"},
                "secrets": [{"parameter": "p", "path": "secret/data/x", "key": "k", "type": "secretV2",
                             "pkiData": {"commonName": "c", "altNames": "a", "ipSans": "i",
                                         "uriSans": "u", "otherSans": "o", "ttl": "1h", "format": "pem"}},
                            {"parameter": "q", "path": "p", "key": "k", "type": ""}]
            },
            "azureKeyVault": {
                "vaultUri": "https://v", "podIdentity": {"provider": "azure-workload"},
                "credentials": {"clientId": "c", "tenantId": "t",
                                "clientSecret": {"valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}},
                "cloud": {"type": "AzurePublicCloud", "keyVaultResourceURL": "u",
                          "activeDirectoryEndpoint": "e"},
                "secrets": [{"parameter": "p", "name": "n", "version": "1"}]
            },
            "gcpSecretManager": {
                "secrets": [{"parameter": "p", "id": "i", "version": "latest"}],
                "credentials": {"clientSecret": {"valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}},
                "podIdentity": {"provider": "gcp"}
            },
            "awsSecretManager": {
                "secrets": [{"parameter": "p", "name": "n", "versionId": "v", "versionStage": "s",
                             "secretKey": "k"}],
                "credentials": {
                    "accessKey": {"valueFrom": {"secretKeyRef": {"name": "s", "key": "a"}}},
                    "accessSecretKey": {"valueFrom": {"secretKeyRef": {"name": "s", "key": "b"}}},
                    "accessToken": {"valueFrom": {"secretKeyRef": {"name": "s", "key": "c"}}}
                },
                "podIdentity": {"provider": "aws-eks"},
                "region": "eu-west-1"
            },
            "boundServiceAccountToken": [{"parameter": "token", "serviceAccountName": "sa"}],
            "filePath": "/etc/params.json",
            "oauth2": {"type": "clientCredentials", "clientId": "c", "tokenUrl": "https://t",
                       "clientSecret": {"valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                       "scopes": ["a", "b"], "tokenUrlParams": {"audience": "x"}}
        },
        "status": {"scaledobjects": "a,b", "scaledjobs": ""}
    });
    let (input, output) = through_blink_types(doc);
    assert_eq!(output, input);
}

/// A ScaledObject whose spec is `spec` (YAML).
fn scaled_object(spec: &str) -> Value {
    let spec: Value = serde_yaml::from_str(spec).expect("valid YAML");
    json!({
        "apiVersion": "blink.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": spec,
    })
}

/// `(case, spec, expected failures as "field: message")`; an empty list means accepted.
const CASES: &[(&str, &str, &[&str])] = &[
    (
        "minimal http",
        "{scaleTargetRef: {name: w}, triggers: [{type: http, metadata: {}}]}",
        &[],
    ),
    (
        "min within default max",
        "{scaleTargetRef: {name: w}, minReplicaCount: 100, triggers: [{type: http, metadata: {}}]}",
        &[],
    ),
    (
        "min above default max",
        "{scaleTargetRef: {name: w}, minReplicaCount: 101, triggers: [{type: http, metadata: {}}]}",
        &["spec: minReplicaCount must be less than or equal to maxReplicaCount (default 100)"],
    ),
    (
        "min above max",
        "{scaleTargetRef: {name: w}, minReplicaCount: 5, maxReplicaCount: 3, triggers: [{type: http, metadata: {}}]}",
        &["spec: minReplicaCount must be less than or equal to maxReplicaCount (default 100)"],
    ),
    (
        "idle below min",
        "{scaleTargetRef: {name: w}, idleReplicaCount: 0, minReplicaCount: 1, triggers: [{type: http, metadata: {}}]}",
        &[],
    ),
    (
        "idle without min (min defaults to 0)",
        "{scaleTargetRef: {name: w}, idleReplicaCount: 0, triggers: [{type: http, metadata: {}}]}",
        &["spec: idleReplicaCount must be less than minReplicaCount (default 0)"],
    ),
    (
        "idle equal to min",
        "{scaleTargetRef: {name: w}, idleReplicaCount: 2, minReplicaCount: 2, triggers: [{type: http, metadata: {}}]}",
        &["spec: idleReplicaCount must be less than minReplicaCount (default 0)"],
    ),
    (
        "unsupported trigger type is the scaler's business",
        "{scaleTargetRef: {name: w}, triggers: [{type: aws-sqs-queue, metadata: {queueURL: q}}]}",
        &[],
    ),
    (
        "rabbitmq complete",
        "{scaleTargetRef: {name: w}, triggers: [{type: rabbitmq, metadata: {queueName: q, host: 'amqp://h'}}]}",
        &[],
    ),
    (
        "rabbitmq host from env",
        "{scaleTargetRef: {name: w}, triggers: [{type: rabbitmq, metadata: {queueName: q, hostFromEnv: RABBIT_URL}}]}",
        &[],
    ),
    (
        "rabbitmq without queueName or host",
        "{scaleTargetRef: {name: w}, triggers: [{type: rabbitmq, metadata: {mode: QueueLength}}]}",
        &[
            "spec.triggers[0].metadata: rabbitmq trigger requires metadata.queueName",
            "spec.triggers[0].metadata: rabbitmq trigger requires metadata.host, metadata.hostFromEnv or an authenticationRef that supplies host",
        ],
    ),
    (
        "rabbitmq with an empty queueName",
        "{scaleTargetRef: {name: w}, triggers: [{type: rabbitmq, metadata: {queueName: '', host: h}}]}",
        &["spec.triggers[0].metadata: rabbitmq trigger requires metadata.queueName"],
    ),
    (
        "kafka from env",
        "{scaleTargetRef: {name: w}, triggers: [{type: kafka, metadata: {bootstrapServersFromEnv: B, consumerGroupFromEnv: G}}]}",
        &[],
    ),
    (
        "kafka bootstrap servers from an authenticationRef",
        "{scaleTargetRef: {name: w}, triggers: [{type: kafka, metadata: {consumerGroup: g}, authenticationRef: {name: k}}]}",
        &[],
    ),
    (
        "kafka without servers or group",
        "{scaleTargetRef: {name: w}, triggers: [{type: kafka, metadata: {topic: t}}]}",
        &[
            "spec.triggers[0].metadata: kafka trigger requires metadata.bootstrapServers, metadata.bootstrapServersFromEnv or an authenticationRef that supplies bootstrapServers",
            "spec.triggers[0].metadata: kafka trigger requires metadata.consumerGroup or metadata.consumerGroupFromEnv",
        ],
    ),
    (
        "kafka group cannot come from an authenticationRef",
        "{scaleTargetRef: {name: w}, triggers: [{type: kafka, metadata: {bootstrapServers: b}, authenticationRef: {name: k}}]}",
        &[
            "spec.triggers[0].metadata: kafka trigger requires metadata.consumerGroup or metadata.consumerGroupFromEnv",
        ],
    ),
    (
        "prometheus with nothing",
        "{scaleTargetRef: {name: w}, triggers: [{type: prometheus, metadata: {}}]}",
        &[
            "spec.triggers[0].metadata: prometheus trigger requires metadata.serverAddress or an authenticationRef that supplies serverAddress",
            "spec.triggers[0].metadata: prometheus trigger requires metadata.query",
            "spec.triggers[0].metadata: prometheus trigger requires metadata.threshold",
        ],
    ),
    (
        "prometheus server from an authenticationRef",
        "{scaleTargetRef: {name: w}, triggers: [{type: prometheus, metadata: {query: q, threshold: '1'}, authenticationRef: {name: p}}]}",
        &[],
    ),
    (
        "cron with nothing",
        "{scaleTargetRef: {name: w}, triggers: [{type: cron, metadata: {}}]}",
        &[
            "spec.triggers[0].metadata: cron trigger requires metadata.timezone",
            "spec.triggers[0].metadata: cron trigger requires metadata.start",
            "spec.triggers[0].metadata: cron trigger requires metadata.end",
            "spec.triggers[0].metadata: cron trigger requires metadata.desiredReplicas",
        ],
    ),
    (
        "http target concurrency",
        "{scaleTargetRef: {name: w}, triggers: [{type: http, metadata: {targetConcurrency: '100'}}]}",
        &[],
    ),
    (
        "http target concurrency zero",
        "{scaleTargetRef: {name: w}, triggers: [{type: http, metadata: {targetConcurrency: '0'}}]}",
        &[
            "spec.triggers[0].metadata.targetConcurrency: http trigger metadata.targetConcurrency must be a positive integer",
        ],
    ),
    (
        "http target concurrency fractional",
        "{scaleTargetRef: {name: w}, triggers: [{type: http, metadata: {targetConcurrency: '1.5'}}]}",
        &[
            "spec.triggers[0].metadata.targetConcurrency: http trigger metadata.targetConcurrency must be a positive integer",
        ],
    ),
    (
        "only the broken trigger is named",
        "{scaleTargetRef: {name: w}, triggers: [{type: http, metadata: {}}, {type: cron, metadata: {timezone: UTC, start: '0 6 * * *', end: '0 20 * * *'}}]}",
        &["spec.triggers[1].metadata: cron trigger requires metadata.desiredReplicas"],
    ),
];

#[test]
fn cel_rules_accept_and_refuse_with_precise_messages() {
    let mut wrong = Vec::new();
    for (case, spec, expected) in CASES {
        let mut got = cel_failures(&scaled_object(spec));
        got.sort();
        let mut want: Vec<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        if got != want {
            wrong.push(format!("{case}:\n    got  {got:?}\n    want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn every_rule_compiles() {
    for crd in blink_crds() {
        let compiled = compile_schema(schema_of(&crd));
        let mut errors = Vec::new();
        collect_compile_errors(&compiled, &mut errors);
        assert!(
            errors.is_empty(),
            "{}: {errors:?}",
            crd["spec"]["names"]["kind"]
        );
    }
}

fn collect_compile_errors(schema: &kube::core::cel::CompiledSchema, out: &mut Vec<String>) {
    out.extend(schema.compilation_errors().iter().map(|e| e.to_string()));
    for child in schema.properties.values() {
        collect_compile_errors(child, out);
    }
    for child in schema
        .items
        .iter()
        .chain(schema.additional_properties.iter())
    {
        collect_compile_errors(child, out);
    }
}
