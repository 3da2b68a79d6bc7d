//! Blink's API in a real kube-apiserver: the CRDs are served, valid objects are
//! accepted, invalid ones are rejected with a message that names the problem, and
//! KEDA's documentation examples are accepted with strict field validation after
//! changing only `apiVersion`.

use anyhow::{Context as _, bail, ensure};
use blink_crds::{ScaledObject, TriggerAuthentication};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

fn scaled_object(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "blink.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name},
        "spec": spec,
    })
}

fn rabbitmq_trigger() -> Value {
    json!({"type": "rabbitmq", "metadata": {
        "queueName": "orders", "host": "amqp://guest:guest@rabbitmq:5672/", "value": "20"}})
}

fn dynamic_api(
    client: kube::Client,
    ns: &str,
    api_version: &str,
    kind: &str,
) -> Api<DynamicObject> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let resource = ApiResource::from_gvk(&gvk);
    if kind == "ClusterTriggerAuthentication" {
        Api::all_with(client, &resource)
    } else {
        Api::namespaced_with(client, ns, &resource)
    }
}

#[test]
fn crds_are_installed_and_served() {
    blink_tests::run("crds-served", |ctx| async move {
        let crds: Api<CustomResourceDefinition> = Api::all(ctx.client());
        for name in [
            "scaledobjects.blink.sh",
            "triggerauthentications.blink.sh",
            "clustertriggerauthentications.blink.sh",
        ] {
            let crd = crds
                .get(name)
                .await
                .with_context(|| format!("CRD {name}"))?;
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            ensure!(
                conditions
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True"),
                "{name} not established: {conditions:?}"
            );
            ensure!(
                crd.spec
                    .versions
                    .iter()
                    .any(|v| v.name == "v1alpha1" && v.served),
                "{name} does not serve v1alpha1"
            );
        }
        // The objects are really served: an empty list answers.
        let sos: Api<ScaledObject> = ctx.api();
        ensure!(sos.list(&Default::default()).await?.items.is_empty());
        let tas: Api<TriggerAuthentication> = ctx.api();
        ensure!(tas.list(&Default::default()).await?.items.is_empty());
        Ok(())
    });
}

#[test]
fn valid_scaled_object_is_accepted_and_stored_unchanged() {
    blink_tests::run("valid-so", |ctx| async move {
        let api = dynamic_api(
            ctx.client(),
            ctx.namespace(),
            "blink.sh/v1alpha1",
            "ScaledObject",
        );
        let spec = json!({
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "hello"},
            "minReplicaCount": 1,
            "maxReplicaCount": 1000,
            "idleReplicaCount": 0,
            "pollingInterval": 5,
            "cooldownPeriod": 30,
            "fallback": {"failureThreshold": 3, "replicas": 2},
            "advanced": {"restoreToOriginalReplicaCount": false, "stableWindowSeconds": 60,
                         "panicWindowPercentage": 10, "panicThresholdPercentage": 200,
                         "maxScaleUpRate": 1000, "maxScaleDownRate": 2},
            "triggers": [
                {"type": "http", "metadata": {"hosts": "hello.example.com", "pathPrefixes": "/",
                    "targetConcurrency": "10", "service": "hello", "port": "http"}},
                {"type": "rabbitmq", "metadata": {"protocol": "amqp", "queueName": "orders",
                    "mode": "QueueLength", "value": "20", "activationValue": "0"},
                 "authenticationRef": {"name": "rabbit-auth"}},
                {"type": "kafka", "metadata": {"bootstrapServers": "kafka:9092",
                    "consumerGroup": "hello", "topic": "events", "lagThreshold": "10"}}
            ]
        });
        let obj: DynamicObject = serde_json::from_value(scaled_object("hello", spec.clone()))?;
        let created = api.create(&PostParams::default(), &obj).await?;
        ensure!(
            created.data["spec"] == spec,
            "stored spec differs: {}",
            created.data["spec"]
        );
        // And it reads back through Blink's own types.
        let typed: Api<ScaledObject> = ctx.api();
        let so = typed.get("hello").await?;
        ensure!(so.spec.triggers.len() == 3);
        ensure!(so.spec.scale_target_ref.name == "hello");
        Ok(())
    });
}

#[test]
fn invalid_scaled_objects_are_rejected_with_a_message_naming_the_problem() {
    blink_tests::run("invalid-so", |ctx| async move {
        let api = dynamic_api(
            ctx.client(),
            ctx.namespace(),
            "blink.sh/v1alpha1",
            "ScaledObject",
        );
        let target = json!({"name": "hello"});
        let cases = [
            (
                "min-above-max",
                json!({"scaleTargetRef": target, "minReplicaCount": 5, "maxReplicaCount": 2,
                       "triggers": [rabbitmq_trigger()]}),
                "minReplicaCount must be less than or equal to maxReplicaCount",
            ),
            (
                "min-above-default-max",
                json!({"scaleTargetRef": target, "minReplicaCount": 101,
                       "triggers": [rabbitmq_trigger()]}),
                "minReplicaCount must be less than or equal to maxReplicaCount",
            ),
            (
                "idle-equal-min",
                json!({"scaleTargetRef": target, "minReplicaCount": 1, "idleReplicaCount": 1,
                       "triggers": [rabbitmq_trigger()]}),
                "idleReplicaCount must be less than minReplicaCount",
            ),
            (
                "idle-without-min",
                json!({"scaleTargetRef": target, "idleReplicaCount": 0,
                       "triggers": [rabbitmq_trigger()]}),
                "idleReplicaCount must be less than minReplicaCount",
            ),
            (
                "no-triggers",
                json!({"scaleTargetRef": target, "triggers": []}),
                "spec.triggers",
            ),
            (
                "missing-queue-name",
                json!({"scaleTargetRef": target, "triggers": [
                    {"type": "rabbitmq", "metadata": {"host": "amqp://rabbitmq:5672/", "value": "5"}}]}),
                "rabbitmq trigger requires metadata.queueName",
            ),
            (
                "rabbitmq-without-host",
                json!({"scaleTargetRef": target, "triggers": [
                    {"type": "rabbitmq", "metadata": {"queueName": "q"}}]}),
                "rabbitmq trigger requires metadata.host",
            ),
            (
                "bad-target-concurrency",
                json!({"scaleTargetRef": target, "triggers": [
                    {"type": "http", "metadata": {"targetConcurrency": "0"}}]}),
                "http trigger metadata.targetConcurrency must be a positive integer",
            ),
        ];
        let mut failures = Vec::new();
        for (name, spec, expected) in cases {
            let obj: DynamicObject = serde_json::from_value(scaled_object(name, spec))?;
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => failures.push(format!("{name}: accepted")),
                Err(kube::Error::Api(status)) => {
                    if status.code != 422 || !status.message.contains(expected) {
                        failures.push(format!(
                            "{name}: expected 422 naming {expected:?}, got {} {:?}",
                            status.code, status.message
                        ));
                    }
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        // Nothing was stored.
        let typed: Api<ScaledObject> = ctx.api();
        ensure!(typed.list(&Default::default()).await?.items.is_empty());
        Ok(())
    });
}

#[test]
fn keda_documentation_examples_are_accepted_with_strict_field_validation() {
    blink_tests::run("keda-examples", |ctx| async move {
        let path = blink_tests::shared_dir().join("fixtures/keda-v2.20.2/examples.yaml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let mut count = 0;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let mut object: Value = serde::Deserialize::deserialize(document)?;
            if object.is_null() {
                continue;
            }
            // The only change: the API group.
            let api_version = object["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ensure!(
                api_version == "keda.sh/v1alpha1",
                "unexpected {api_version}"
            );
            object["apiVersion"] = json!("blink.sh/v1alpha1");
            let kind = object["kind"].as_str().context("kind")?.to_string();
            let name = object["metadata"]["name"]
                .as_str()
                .context("name")?
                .to_string();
            let namespace = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let api = dynamic_api(ctx.client(), &namespace, "blink.sh/v1alpha1", &kind);
            // Server-side apply with fieldValidation=Strict: an unknown or misplaced
            // field is an error, not a silent prune.
            let params = PatchParams::apply("blink-keda-compat")
                .force()
                .validation_strict();
            let stored = api
                .patch(&name, &params, &Patch::Apply(&object))
                .await
                .with_context(|| format!("{kind} {namespace}/{name} refused"))?;
            // Stored exactly as given: nothing pruned, nothing defaulted.
            ensure!(
                stored.data["spec"] == object["spec"],
                "{kind} {name}: stored spec {} differs from {}",
                stored.data["spec"],
                object["spec"]
            );
            count += 1;
        }
        ensure!(count == 6, "expected the 6 KEDA examples, applied {count}");
        Ok(())
    });
}

#[test]
fn unknown_fields_are_refused_under_strict_validation() {
    // The other side of the KEDA test: strict validation really refuses what the schema
    // does not know, so the test above cannot pass by accident.
    blink_tests::run("strict-unknown", |ctx| async move {
        let api = dynamic_api(
            ctx.client(),
            ctx.namespace(),
            "blink.sh/v1alpha1",
            "ScaledObject",
        );
        let mut object = scaled_object(
            "typo",
            json!({"scaleTargetRef": {"name": "x"}, "triggers": [rabbitmq_trigger()]}),
        );
        object["spec"]["minReplicas"] = json!(1);
        let params = PatchParams::apply("blink-keda-compat").validation_strict();
        match api.patch("typo", &params, &Patch::Apply(&object)).await {
            Ok(_) => bail!("a ScaledObject with spec.minReplicas (unknown) was accepted"),
            Err(kube::Error::Api(status)) => ensure!(
                status.message.contains("minReplicas"),
                "refusal does not name the field: {}",
                status.message
            ),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    });
}
