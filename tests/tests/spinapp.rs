//! SpinKube's SpinApp as a target: Blink scales the Deployment of the same name when
//! the SpinApp sets `enableAutoscaling: true`, and says why it cannot otherwise. The
//! SpinApp CRD here is a stand-in with SpinKube's group, kind and the one field Blink
//! reads; the spin-operator itself is not part of the bed.

use std::{path::Path, time::Duration};

use anyhow::ensure;
use blink_crds::{Condition, FunctionKey, ScaledObject};
use blink_tests::{
    TestContext,
    demand::{DemandClient, service_account_token},
    scaler::{ACTIVATOR_SERVICE_ACCOUNT, ScalerProcess, release_finalizers},
    wait,
    workloads::{condition_state, create_deployment, create_scaled_object, desired},
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::json;

const SCALER: &str = env!("CARGO_BIN_EXE_scaler");
const LONG: Duration = Duration::from_secs(60);

async fn install_spin_app_crd(ctx: &TestContext) -> anyhow::Result<ApiResource> {
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "spinapps.core.spinkube.dev"},
        "spec": {"group": "core.spinkube.dev", "scope": "Namespaced",
                 "names": {"plural": "spinapps", "singular": "spinapp", "kind": "SpinApp"},
                 "versions": [{"name": "v1alpha1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                   "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))?;
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client());
    crds.patch(
        "spinapps.core.spinkube.dev",
        &PatchParams::apply("blink-tests").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    wait::until(LONG, "SpinApp CRD established", || async {
        let crd = crds.get("spinapps.core.spinkube.dev").await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        Ok(established.then_some(()))
    })
    .await?;
    Ok(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("core.spinkube.dev", "v1alpha1", "SpinApp"),
        "spinapps",
    ))
}

#[test]
fn a_spin_app_scales_through_its_deployment_only_with_autoscaling_enabled() {
    blink_tests::run("scaler-spinapp", |ctx| async move {
        let resource = install_spin_app_crd(&ctx).await?;
        let apps: Api<DynamicObject> =
            Api::namespaced_with(ctx.client(), ctx.namespace(), &resource);
        let app = |enable: bool, annotations: serde_json::Value| {
            json!({"apiVersion": "core.spinkube.dev/v1alpha1", "kind": "SpinApp",
                   "metadata": {"name": "spin", "annotations": annotations},
                   "spec": {"image": "ghcr.io/example/spin:1", "executor": "containerd-shim-spin",
                            "replicas": 1, "enableAutoscaling": enable}})
        };
        apps.patch(
            "spin",
            &PatchParams::apply("blink-tests"),
            &Patch::Apply(app(false, json!({}))),
        )
        .await?;
        // What the spin-operator would have made: the Deployment of the same name.
        create_deployment(&ctx, "spin", 0, json!({})).await?;
        let scaler = ScalerProcess::start(&ctx, Path::new(SCALER), "scaler-spinapp", &[]).await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: spin}
spec:
  scaleTargetRef: {apiVersion: core.spinkube.dev/v1alpha1, kind: SpinApp, name: spin}
  triggers: [{type: http, metadata: {targetConcurrency: '10'}}]
",
        )
        .await?;
        wait::until_eq(
            LONG,
            "Ready=False SpinAppAutoscalingDisabled",
            Some(("False".to_owned(), "SpinAppAutoscalingDisabled".to_owned())),
            || condition_state(&ctx, "spin", Condition::READY),
        )
        .await?;

        apps.patch(
            "spin",
            &PatchParams::apply("blink-tests"),
            &Patch::Apply(app(true, json!({}))),
        )
        .await?;
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let client = DemandClient::new(scaler.demand_addr, Some(token), "test-activator");
        let key = FunctionKey::new(ctx.namespace(), "spin")?;
        let woken = async {
            loop {
                client.poke(&key).await?;
                if desired(&ctx, "spin").await? >= 1 {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::time::timeout(LONG, woken).await??;
        wait::until_eq(
            LONG,
            "Ready=True",
            Some(("True".to_owned(), "ScaledObjectReady".to_owned())),
            || condition_state(&ctx, "spin", Condition::READY),
        )
        .await?;
        ensure!(desired(&ctx, "spin").await? >= 1);
        scaler.stop().await;
        release_finalizers(&ctx).await?;
        let _ = ctx
            .api::<ScaledObject>()
            .delete("spin", &Default::default())
            .await;
        Ok(())
    });
}

#[test]
fn an_annotated_spin_app_gets_a_generated_scaled_object() {
    blink_tests::run("scaler-spinapp-annotated", |ctx| async move {
        let resource = install_spin_app_crd(&ctx).await?;
        let apps: Api<DynamicObject> =
            Api::namespaced_with(ctx.client(), ctx.namespace(), &resource);
        let app = json!({"apiVersion": "core.spinkube.dev/v1alpha1", "kind": "SpinApp",
                         "metadata": {"name": "hi", "annotations": {"blink.sh/scale-to-zero": "true"}},
                         "spec": {"image": "ghcr.io/example/hi:1", "enableAutoscaling": true}});
        apps.patch("hi", &PatchParams::apply("blink-tests"), &Patch::Apply(app))
            .await?;
        create_deployment(&ctx, "hi", 0, json!({})).await?;
        let scaler =
            ScalerProcess::start(&ctx, Path::new(SCALER), "scaler-spin-annotated", &[]).await?;
        let generated = wait::until(LONG, "generated ScaledObject", || async {
            Ok(ctx.api::<ScaledObject>().get_opt("hi").await?)
        })
        .await?;
        let target = &generated.spec.scale_target_ref;
        ensure!(target.kind.as_deref() == Some("SpinApp"), "{target:?}");
        ensure!(target.api_version.as_deref() == Some("core.spinkube.dev/v1alpha1"));
        wait::until_eq(
            LONG,
            "Ready=True",
            Some(("True".to_owned(), "ScaledObjectReady".to_owned())),
            || condition_state(&ctx, "hi", Condition::READY),
        )
        .await?;

        // SpinKube's Deployment of the same name is a plain (not annotated) workload:
        // a change to it must leave the object generated for the SpinApp alone, through
        // the change and the Lease renewals after it (every 3 s here).
        let uid = generated.metadata.uid.clone();
        ctx.api::<Deployment>()
            .patch(
                "hi",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
            )
            .await?;
        let watched_until = tokio::time::Instant::now() + Duration::from_secs(8);
        while tokio::time::Instant::now() < watched_until {
            let now = ctx.api::<ScaledObject>().get_opt("hi").await?;
            let now_uid = now.as_ref().and_then(|o| o.metadata.uid.clone());
            ensure!(
                now_uid == uid,
                "the SpinApp's generated ScaledObject was removed or replaced after its Deployment changed (uid {uid:?} -> {now_uid:?})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        scaler.stop().await;
        release_finalizers(&ctx).await
    });
}
