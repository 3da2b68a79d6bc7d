//! The scaler against the real servers: a `blink-scaler` process per test (its own
//! credential, following only the test's namespace, short clocks), real Deployments
//! with kwok pods, RabbitMQ and Kafka, and the audit log to count `/scale` writes.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, ensure};
use blink_crds::{Condition, FunctionKey, ScaledObject};
use blink_tests::{
    TestContext, audit,
    brokers::PrivateRabbitMq,
    demand::{DemandClient, demand, service_account_token},
    kafka, rabbitmq,
    scaler::{ACTIVATOR_SERVICE_ACCOUNT, ScalerProcess, leader_address, release_finalizers},
    wait,
    workloads::{
        ReplicaHistory, condition_state, create_deployment, create_hpa, create_scaled_object,
        desired, events, running_pods, until_available,
    },
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

const SCALER: &str = env!("CARGO_BIN_EXE_scaler");
const LONG: Duration = Duration::from_secs(60);

fn scaler_binary() -> &'static Path {
    Path::new(SCALER)
}

async fn start_scaler(ctx: &TestContext, user: &str) -> anyhow::Result<ScalerProcess> {
    ScalerProcess::start(ctx, scaler_binary(), user, &[]).await
}

/// Stops the scaler and lets the namespace go (Blink's finalizers removed).
async fn finish(ctx: &TestContext, scaler: ScalerProcess) -> anyhow::Result<()> {
    scaler.stop().await;
    release_finalizers(ctx).await
}

fn key(ctx: &TestContext, name: &str) -> FunctionKey {
    FunctionKey::new(ctx.namespace(), name).expect("valid key")
}

async fn until_desired(ctx: &TestContext, name: &str, expected: i32) -> anyhow::Result<()> {
    wait::until_eq(LONG, &format!("{name} replicas"), expected, || {
        desired(ctx, name)
    })
    .await
}

async fn until_condition(
    ctx: &TestContext,
    name: &str,
    kind: &str,
    status: &str,
    reason: &str,
) -> anyhow::Result<()> {
    wait::until_eq(
        LONG,
        &format!("{name} condition {kind}"),
        Some((status.to_owned(), reason.to_owned())),
        || condition_state(ctx, name, kind),
    )
    .await
}

fn scale_writes_by(ctx: &TestContext, user: &str) -> anyhow::Result<Vec<audit::AuditEvent>> {
    let events = audit::read(&ctx.bed().audit_log)?;
    Ok(audit::scale_writes(&events, ctx.namespace(), "deployments")
        .into_iter()
        .filter(|e| e.user.username == user)
        .collect())
}

/// The API server writes a request's audit line after it has sent the response, so a read
/// made just after a change was seen can miss the write that made it: wait (at most
/// [`LONG`]) for at least `at_least` lines, then read until two reads 300 ms apart agree
/// (for at most 10 s more).
async fn settled_scale_writes_by(
    ctx: &TestContext,
    user: &str,
    at_least: usize,
) -> anyhow::Result<Vec<audit::AuditEvent>> {
    let mut writes = wait::until(LONG, "the scale writes' audit lines", || async {
        let writes = scale_writes_by(ctx, user)?;
        Ok((writes.len() >= at_least).then_some(writes))
    })
    .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = scale_writes_by(ctx, user)?;
        if again.len() == writes.len() || std::time::Instant::now() > deadline {
            return Ok(again);
        }
        writes = again;
    }
}

#[test]
fn rabbitmq_queue_length_wakes_scales_and_idles_back_to_zero() {
    blink_tests::run("scaler-rabbitmq", |ctx| async move {
        let queue = format!("orders-{}", ctx.namespace());
        let amqp = ctx.bed().amqp_url.clone();
        create_deployment(&ctx, "worker", 0, json!({})).await?;
        let conn = rabbitmq::connect(&amqp).await?;
        // The queue exists before the object (a missing queue is a trigger error).
        rabbitmq::publish(&conn, &queue, 0).await?;
        let scaler = start_scaler(&ctx, "scaler-rabbitmq").await?;
        create_scaled_object(
            &ctx,
            &format!(
                "
metadata: {{name: worker}}
spec:
  scaleTargetRef: {{name: worker}}
  pollingInterval: 1
  cooldownPeriod: 3
  advanced: {{stableWindowSeconds: 6}}
  triggers:
  - type: rabbitmq
    metadata: {{host: '{amqp}', queueName: '{queue}', mode: QueueLength, value: '20'}}
"
            ),
        )
        .await?;
        until_condition(
            &ctx,
            "worker",
            Condition::READY,
            "True",
            "ScaledObjectReady",
        )
        .await?;
        let conn = rabbitmq::connect(&amqp).await?;
        rabbitmq::publish(&conn, &queue, 100).await?;
        until_desired(&ctx, "worker", 5).await?;
        wait::until_eq(LONG, "running workers", 5, || running_pods(&ctx, "worker")).await?;
        until_condition(&ctx, "worker", Condition::ACTIVE, "True", "TriggerActive").await?;

        let channel = conn.create_channel().await?;
        channel
            .queue_purge(
                queue.as_str().into(),
                lapin::options::QueuePurgeOptions::default(),
            )
            .await?;
        until_desired(&ctx, "worker", 0).await?;
        until_condition(
            &ctx,
            "worker",
            Condition::ACTIVE,
            "False",
            "TriggersInactive",
        )
        .await?;
        let reasons: Vec<String> = wait::until(LONG, "scale events", || async {
            let reasons: Vec<String> = events(&ctx, "worker")
                .await?
                .into_iter()
                .map(|e| e.0)
                .collect();
            Ok((reasons.contains(&"ScaledFromZero".to_owned())
                && reasons.contains(&"ScaledToZero".to_owned()))
            .then_some(reasons))
        })
        .await?;
        ensure!(!reasons.is_empty());
        let object = ctx.api::<ScaledObject>().get("worker").await?;
        let status = object.status.context("status")?;
        ensure!(status.original_replica_count == Some(0), "{status:?}");
        ensure!(status.last_active_time.is_some(), "{status:?}");
        finish(&ctx, scaler).await
    });
}

#[test]
fn kafka_lag_scales_to_the_partition_count_unless_idle_consumers_are_allowed() {
    blink_tests::run("scaler-kafka", |ctx| async move {
        let bootstrap = ctx.bed().kafka_bootstrap.clone();
        let topic = format!("events-{}", ctx.namespace());
        let group = format!("group-{}", ctx.namespace());
        kafka::create_topic(&bootstrap, &topic, 3).await?;
        {
            let (b, g, t) = (bootstrap.clone(), group.clone(), topic.clone());
            tokio::task::spawn_blocking(move || kafka::consume_and_commit(&b, &g, &t, 3, 0))
                .await??;
        }
        let partitions: Vec<i32> = (0..50).map(|i| i % 3).collect();
        kafka::produce(&bootstrap, &topic, &partitions).await?;
        let (lag, uncommitted) = {
            let (b, g, t) = (bootstrap.clone(), group.clone(), topic.clone());
            tokio::task::spawn_blocking(move || kafka::lag(&b, &g, &t)).await??
        };
        ensure!(
            lag == 50 && uncommitted.is_empty(),
            "lag {lag}, uncommitted {uncommitted:?}"
        );

        create_deployment(&ctx, "consumer", 0, json!({})).await?;
        let scaler = start_scaler(&ctx, "scaler-kafka").await?;
        let object = |allow: bool| {
            format!(
                "
metadata: {{name: consumer}}
spec:
  scaleTargetRef: {{name: consumer}}
  pollingInterval: 1
  maxReplicaCount: 10
  triggers:
  - type: kafka
    metadata: {{bootstrapServers: '{bootstrap}', consumerGroup: '{group}', topic: '{topic}', lagThreshold: '10', allowIdleConsumers: '{allow}'}}
"
            )
        };
        create_scaled_object(&ctx, &object(false)).await?;
        until_desired(&ctx, "consumer", 3).await?;
        let mut updated: ScaledObject = serde_yaml::from_str(&object(true))?;
        updated.metadata.namespace = Some(ctx.namespace().to_owned());
        let patch = json!({"spec": updated.spec});
        ctx.api::<ScaledObject>()
            .patch("consumer", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        until_desired(&ctx, "consumer", 5).await?;
        finish(&ctx, scaler).await
    });
}

/// The http trigger, driven by a client speaking the demand protocol.
#[test]
fn http_demand_pokes_wake_snapshots_scale_and_silence_idles() {
    blink_tests::run("scaler-http", |ctx| async move {
        create_deployment(&ctx, "web", 0, json!({})).await?;
        let scaler = start_scaler(&ctx, "scaler-http").await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: web}
spec:
  scaleTargetRef: {name: web}
  cooldownPeriod: 3
  advanced: {stableWindowSeconds: 6}
  triggers:
  - type: http
    metadata: {targetConcurrency: '10'}
",
        )
        .await?;
        until_condition(&ctx, "web", Condition::READY, "True", "ScaledObjectReady").await?;
        let history = ReplicaHistory::watch(&ctx, "web");
        // The watch has seen the starting count before anything changes it.
        wait::until(LONG, "replica history started", || async {
            Ok(history.values().first().copied())
        })
        .await?;
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let mut client = DemandClient::new(scaler.demand_addr, Some(token), "test-activator");
        let web = key(&ctx, "web");

        // A single poke, no snapshot: the poke alone wakes it.
        ensure!(client.poke(&web).await? / 100 == 2, "poke refused");
        until_desired(&ctx, "web", 1).await?;
        // Changes to the Deployment that leave its spec alone (its status as replicas
        // come up, several per wake; here its labels, twenty times: its annotations
        // would count as spec, since a Deployment copies them to its ReplicaSets) cannot be a
        // change of replicas: the scaler reads `/scale` at its next tick, not at each
        // of them: at most one read per tick (a second) of the time it takes, besides
        // one periodic re-read (`--resync 5s`) and one for a change of the spec (the
        // idle scale-down may fall in it).
        until_available(&ctx, "web", 1).await?;
        let scale_reads = r#"blink_scaler_api_reads_total{kind="scale"}"#;
        let reads_before = scaler.metric(scale_reads).await?;
        let started = std::time::Instant::now();
        for i in 0..20 {
            ctx.api::<Deployment>()
                .patch(
                    "web",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"note": i.to_string()}}})),
                )
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reads = scaler.metric(scale_reads).await? - reads_before;
        let bound = started.elapsed().as_secs_f64().ceil() + 2.0;
        println!("{reads} reads of /scale after 20 changes outside the spec (bound {bound})");
        ensure!(
            reads <= bound,
            "{reads} reads of /scale after 20 changes outside the Deployment's spec, over {bound}"
        );

        // 250 concurrent with a target of 10 → 25.
        let steady = async {
            loop {
                client.snapshot(vec![demand(&web, 250.0, 500)]).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                if desired(&ctx, "web").await? == 25 {
                    return anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(LONG, steady)
            .await
            .context("25 replicas")??;
        // Held there under the same demand: no PATCH in between. Once every pod is
        // placed the scale-up has landed, and the scaler stops looking for pods the
        // scheduler refuses (a LIST of pods every `--stall-after`/4 otherwise): one
        // look after they are up, then none while the count holds.
        let writes_at_25 = settled_scale_writes_by(&ctx, "scaler-http", 2).await?.len();
        let placed = async {
            loop {
                client.snapshot(vec![demand(&web, 250.0, 500)]).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let deployment = ctx.api::<Deployment>().get("web").await?;
                if deployment.status.and_then(|s| s.available_replicas) == Some(25) {
                    return anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(LONG, placed)
            .await
            .context("25 available")??;
        // The last look may come up to a look's interval (1.25 s) and a tick after
        // the last pod is placed, which can be just before it shows as available.
        for _ in 0..3 {
            client.snapshot(vec![demand(&web, 250.0, 500)]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let pod_reads = r#"blink_scaler_api_reads_total{kind="pods"}"#;
        let pod_reads_before = scaler.metric(pod_reads).await?;
        for _ in 0..4 {
            client.snapshot(vec![demand(&web, 250.0, 500)]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        ensure!(desired(&ctx, "web").await? == 25);
        ensure!(
            scale_writes_by(&ctx, "scaler-http")?.len() == writes_at_25,
            "PATCHes under constant demand"
        );
        let pod_reads = scaler.metric(pod_reads).await? - pod_reads_before;
        ensure!(
            pod_reads == 0.0,
            "{pod_reads} LISTs of pods while 25 placed replicas held"
        );

        // Sparse short requests (a few per second, tiny time-weighted concurrency)
        // keep it up past the cooldown.
        for _ in 0..8 {
            client.snapshot(vec![demand(&web, 0.01, 3)]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        ensure!(
            desired(&ctx, "web").await? >= 1,
            "sparse requests let it idle"
        );

        // Silence: empty snapshots → 0 after the cooldown.
        let silence = async {
            loop {
                client.snapshot(vec![]).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                if desired(&ctx, "web").await? == 0 {
                    return anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(LONG, silence)
            .await
            .context("back to 0")??;

        // One PATCH per change, and every one by this scaler (one read of the log for
        // both, so a line landing in between cannot tell them apart).
        settled_scale_writes_by(&ctx, "scaler-http", 3).await?;
        let writes = audit::scale_writes(
            &audit::read(&ctx.bed().audit_log)?,
            ctx.namespace(),
            "deployments",
        );
        let others: Vec<_> = writes
            .iter()
            .filter(|e| e.user.username != "scaler-http")
            .collect();
        ensure!(others.is_empty(), "someone else wrote /scale: {others:?}");
        // Each PATCH changed the count: as many PATCHes as changes the watch saw, once
        // the watch has seen the last one.
        let seen_all = wait::until(LONG, "the watch sees every change", || async {
            let values = history.values();
            Ok((values.last() == Some(&0) && values.len() > writes.len()).then_some(()))
        })
        .await;
        let values = history.values();
        ensure!(
            seen_all.is_ok() && writes.len() == values.len() - 1,
            "{} PATCHes for the changes {values:?}",
            writes.len()
        );
        ensure!(
            values.first() == Some(&0) && values.last() == Some(&0) && values.contains(&25),
            "{values:?}"
        );
        let metrics = scaler.metrics().await?;
        ensure!(
            metrics.contains("blink_scaler_poke_to_patch_seconds_count"),
            "{metrics}"
        );
        ensure!(
            metrics.contains("blink_scaler_cold_starts_total{"),
            "{metrics}"
        );
        finish(&ctx, scaler).await
    });
}

#[test]
fn demand_reports_need_the_activators_token() {
    blink_tests::run("scaler-demand-auth", |ctx| async move {
        create_deployment(&ctx, "web", 0, json!({})).await?;
        let scaler = start_scaler(&ctx, "scaler-auth").await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: web}
spec:
  scaleTargetRef: {name: web}
  triggers: [{type: http, metadata: {}}]
",
        )
        .await?;
        until_condition(&ctx, "web", Condition::READY, "True", "ScaledObjectReady").await?;
        let web = key(&ctx, "web");
        let other = service_account_token(&ctx, "someone-else", Some("blink-scaler")).await?;
        let default_audience = service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, None).await?;
        let cases = [
            (None, 401),
            (Some(other), 403),
            (Some(default_audience), 401),
            (Some("not-a-token".to_owned()), 401),
        ];
        for (token, expected) in cases {
            let client = DemandClient::new(scaler.demand_addr, token, "intruder");
            let status = client.poke(&web).await?;
            ensure!(status == expected, "expected {expected}, got {status}");
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        ensure!(desired(&ctx, "web").await? == 0, "a refused report scaled");
        ensure!(scale_writes_by(&ctx, "scaler-auth")?.is_empty());
        finish(&ctx, scaler).await
    });
}

#[test]
fn an_annotated_deployment_behaves_the_same_and_a_second_claim_is_a_conflict() {
    blink_tests::run("scaler-annotated", |ctx| async move {
        create_deployment(
            &ctx,
            "hello",
            0,
            json!({"blink.sh/scale-to-zero": "true", "blink.sh/target-concurrency": "10",
                   "blink.sh/cooldown": "3s"}),
        )
        .await?;
        let scaler = start_scaler(&ctx, "scaler-annotated").await?;
        // The generated object appears, owned by the Deployment, with its own status.
        let generated = wait::until(LONG, "generated ScaledObject", || async {
            Ok(ctx.api::<ScaledObject>().get_opt("hello").await?)
        })
        .await?;
        ensure!(
            generated
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("blink.sh/generated"))
                .map(String::as_str)
                == Some("true")
        );
        until_condition(&ctx, "hello", Condition::READY, "True", "ScaledObjectReady").await?;
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let mut client = DemandClient::new(scaler.demand_addr, Some(token), "test-activator");
        let hello = key(&ctx, "hello");
        ensure!(client.poke(&hello).await? / 100 == 2);
        until_desired(&ctx, "hello", 1).await?;
        client.snapshot(vec![demand(&hello, 30.0, 60)]).await?;
        until_desired(&ctx, "hello", 3).await?;

        // A user's ScaledObject for the same Deployment: both say Conflict, nothing scales.
        create_scaled_object(
            &ctx,
            "
metadata: {name: hello-user}
spec:
  scaleTargetRef: {name: hello}
  minReplicaCount: 7
  maxReplicaCount: 7
  triggers: [{type: http, metadata: {}}]
",
        )
        .await?;
        until_condition(
            &ctx,
            "hello-user",
            Condition::CONFLICT,
            "True",
            "TargetConflict",
        )
        .await?;
        until_condition(&ctx, "hello", Condition::CONFLICT, "True", "TargetConflict").await?;
        let before = settled_scale_writes_by(&ctx, "scaler-annotated", 0)
            .await?
            .len();
        for _ in 0..3 {
            client.snapshot(vec![demand(&hello, 90.0, 60)]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        ensure!(
            desired(&ctx, "hello").await? == 3,
            "a conflicted target was scaled"
        );
        ensure!(scale_writes_by(&ctx, "scaler-annotated")?.len() == before);

        // The annotation goes: so does the generated object, and the user's object,
        // alone on the target now, scales it.
        ctx.api::<Deployment>()
            .patch(
                "hello",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"blink.sh/scale-to-zero": null}}}),
                ),
            )
            .await?;
        wait::until(LONG, "the generated ScaledObject removed", || async {
            Ok(ctx
                .api::<ScaledObject>()
                .get_opt("hello")
                .await?
                .is_none()
                .then_some(()))
        })
        .await?;
        until_condition(
            &ctx,
            "hello-user",
            Condition::CONFLICT,
            "False",
            "NoConflict",
        )
        .await?;
        until_desired(&ctx, "hello", 7).await?;
        finish(&ctx, scaler).await
    });
}

#[test]
fn a_stopped_broker_means_fallback_never_zero_and_recovery_after() {
    blink_tests::run("scaler-fallback", |ctx| async move {
        let mut broker = PrivateRabbitMq::start(ctx.bed()).await?;
        let queue = "jobs";
        let conn = rabbitmq::connect(&broker.amqp_url).await?;
        rabbitmq::publish(&conn, queue, 40).await?;
        drop(conn);
        create_deployment(&ctx, "jobs", 0, json!({})).await?;
        let scaler = start_scaler(&ctx, "scaler-fallback").await?;
        create_scaled_object(
            &ctx,
            &format!(
                "
metadata: {{name: jobs}}
spec:
  scaleTargetRef: {{name: jobs}}
  pollingInterval: 1
  cooldownPeriod: 3
  fallback: {{failureThreshold: 2, replicas: 3}}
  triggers:
  - type: rabbitmq
    metadata: {{host: '{}', queueName: '{queue}', mode: QueueLength, value: '10'}}
",
                broker.amqp_url
            ),
        )
        .await?;
        until_desired(&ctx, "jobs", 4).await?;
        broker.stop().await;
        until_condition(&ctx, "jobs", Condition::FALLBACK, "True", "FallbackActive").await?;
        until_desired(&ctx, "jobs", 3).await?;
        // Held at the fallback count well past the cooldown: never 0.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            ensure!(desired(&ctx, "jobs").await? == 3, "left the fallback count");
        }
        broker.restart().await?;
        until_condition(&ctx, "jobs", Condition::FALLBACK, "False", "NoFallback").await?;
        until_desired(&ctx, "jobs", 4).await?;
        finish(&ctx, scaler).await
    });
}

#[test]
fn only_the_leader_writes_and_a_killed_leader_is_replaced() {
    blink_tests::run("scaler-leader", |ctx| async move {
        create_deployment(&ctx, "web", 0, json!({})).await?;
        let mut first = start_scaler(&ctx, "scaler-one").await?;
        // The first holds the lease before the second starts.
        wait::until(LONG, "a leader", || leader_address(&ctx)).await?;
        let second = start_scaler(&ctx, "scaler-two").await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: web}
spec:
  scaleTargetRef: {name: web}
  cooldownPeriod: 2
  advanced: {stableWindowSeconds: 15}
  triggers: [{type: http, metadata: {targetConcurrency: '10'}}]
",
        )
        .await?;
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let web = key(&ctx, "web");
        let (holder, addr) = leader_address(&ctx).await?.context("leader")?;
        ensure!(
            holder == "scaler-one",
            "the first scaler should lead, {holder} does"
        );
        // The follower refuses reports with 421.
        let to_follower =
            DemandClient::new(second.demand_addr, Some(token.clone()), "test-activator");
        ensure!(to_follower.poke(&web).await? == 421);
        let mut client = DemandClient::new(addr, Some(token.clone()), "test-activator");
        client.snapshot(vec![demand(&web, 40.0, 100)]).await?;
        until_desired(&ctx, "web", 4).await?;
        ensure!(
            !settled_scale_writes_by(&ctx, "scaler-one", 1)
                .await?
                .is_empty()
        );
        ensure!(
            scale_writes_by(&ctx, "scaler-two")?.is_empty(),
            "the follower wrote"
        );

        // kill -9 the leader: the other takes over once the lease has run out (5 s
        // here; the bound leaves room for a loaded machine, the time is printed).
        first.kill().await;
        let killed_at = std::time::Instant::now();
        let (holder, addr) = wait::until(Duration::from_secs(20), "the new leader", || async {
            Ok(leader_address(&ctx)
                .await?
                .filter(|(h, _)| h == "scaler-two"))
        })
        .await?;
        ensure!(holder == "scaler-two");
        let took = killed_at.elapsed();
        // The demand client follows the new leader; demand withheld (silence) for longer
        // than the cooldown: still no scale-down in the new leader's first stable window.
        let mut client = DemandClient::new(addr, Some(token), "test-activator");
        for _ in 0..5 {
            client.snapshot(vec![]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            ensure!(
                desired(&ctx, "web").await? == 4,
                "scaled down in the first stable window"
            );
        }
        client.snapshot(vec![demand(&web, 90.0, 100)]).await?;
        until_desired(&ctx, "web", 9).await?;
        ensure!(
            !settled_scale_writes_by(&ctx, "scaler-two", 1)
                .await?
                .is_empty(),
            "the new leader never wrote"
        );
        eprintln!("leader replaced {took:?} after kill -9");
        second.stop().await;
        first.stop().await;
        release_finalizers(&ctx).await
    });
}

#[test]
fn drift_is_undone_and_delete_restores_the_original_count() {
    blink_tests::run("scaler-drift", |ctx| async move {
        create_deployment(&ctx, "app", 2, json!({})).await?;
        let scaler = start_scaler(&ctx, "scaler-drift").await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: app}
spec:
  scaleTargetRef: {name: app}
  minReplicaCount: 3
  maxReplicaCount: 3
  advanced: {restoreToOriginalReplicaCount: true}
  triggers: [{type: http, metadata: {}}]
",
        )
        .await?;
        until_desired(&ctx, "app", 3).await?;
        // Someone scales by hand: Blink restores, with an Event.
        let by_hand = ctx.client_as("someone").await?;
        let deployments: kube::Api<Deployment> = kube::Api::namespaced(by_hand, ctx.namespace());
        let scale_by_hand = |replicas: i32| {
            let deployments = deployments.clone();
            async move {
                deployments
                    .patch_scale(
                        "app",
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"spec": {"replicas": replicas}})),
                    )
                    .await
            }
        };
        scale_by_hand(6).await?;
        until_desired(&ctx, "app", 3).await?;
        wait::until(LONG, "ReplicasRestored event", || async {
            Ok(events(&ctx, "app")
                .await?
                .into_iter()
                .find(|e| e.0 == "ReplicasRestored"))
        })
        .await?;
        // Scaled down by hand once its pods are placed (the scaler no longer looks at
        // them): the undo is a scale-up like any other, watched for pods the
        // scheduler refuses, so the scaler looks at them again.
        until_available(&ctx, "app", 3).await?;
        let pod_looks = r#"blink_scaler_api_reads_total{kind="pods"}"#;
        let settled = wait::until(LONG, "the scaler's looks at pods stop", || async {
            let before = scaler.metric(pod_looks).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after = scaler.metric(pod_looks).await?;
            Ok((after == before).then_some(after))
        })
        .await?;
        scale_by_hand(1).await?;
        wait::until(LONG, "a look at pods after the undo", || async {
            Ok((scaler.metric(pod_looks).await? > settled).then_some(()))
        })
        .await?;
        until_desired(&ctx, "app", 3).await?;
        // Deleted with restoreToOriginalReplicaCount: the original 2 come back.
        ctx.api::<ScaledObject>()
            .delete("app", &DeleteParams::default())
            .await?;
        until_desired(&ctx, "app", 2).await?;
        wait::until(LONG, "object gone", || async {
            Ok(ctx
                .api::<ScaledObject>()
                .get_opt("app")
                .await?
                .is_none()
                .then_some(()))
        })
        .await?;
        finish(&ctx, scaler).await
    });
}

#[test]
fn invalid_input_is_reported_and_held_while_others_keep_scaling() {
    blink_tests::run("scaler-invalid", |ctx| async move {
        create_deployment(&ctx, "good", 0, json!({})).await?;
        for held in ["held-a", "held-b", "held-c", "held-d", "held-e"] {
            create_deployment(&ctx, held, 2, json!({})).await?;
        }
        let scaler = start_scaler(&ctx, "scaler-invalid").await?;
        let amqp = ctx.bed().amqp_url.clone();
        let cases = [
            (
                "unreachable",
                "{name: held-a}",
                "rabbitmq",
                "{host: 'amqp://guest:guest@127.0.0.1:1/', queueName: q}".to_owned(),
                "TriggerSourceUnreachable",
            ),
            (
                "no-secret",
                "{name: held-b}",
                "rabbitmq",
                "{queueName: q}".to_owned(),
                "TriggerAuthenticationFailed",
            ),
            (
                "no-target",
                "{name: missing}",
                "http",
                "{}".to_owned(),
                "ScaleTargetNotFound",
            ),
            (
                "no-scale",
                "{apiVersion: v1, kind: ConfigMap, name: cm}",
                "http",
                "{}".to_owned(),
                "ScaleTargetNotScalable",
            ),
            (
                "unsupported",
                "{name: held-c}",
                "aws-sqs-queue",
                "{queueURL: q}".to_owned(),
                "UnsupportedTrigger",
            ),
            (
                "no-time-to-answer",
                "{name: held-d}",
                "http",
                "{responseTimeout: '0'}".to_owned(),
                "InvalidTriggerMetadata",
            ),
            (
                "no-service-name",
                "{name: held-e}",
                "http",
                "{service: web.v2}".to_owned(),
                "InvalidTriggerMetadata",
            ),
        ];
        for (name, target, kind, metadata, _) in &cases {
            let auth = if *name == "no-secret" {
                "\n    authenticationRef: {name: rabbit-auth}"
            } else {
                ""
            };
            create_scaled_object(
                &ctx,
                &format!(
                    "
metadata: {{name: {name}}}
spec:
  scaleTargetRef: {target}
  pollingInterval: 1
  triggers:
  - type: {kind}
    metadata: {metadata}{auth}
"
                ),
            )
            .await?;
        }
        let auth: blink_crds::TriggerAuthentication = serde_yaml::from_str(
            "
metadata: {name: rabbit-auth}
spec:
  secretTargetRef: [{parameter: host, name: rabbit-secret, key: host}]
",
        )?;
        ctx.api::<blink_crds::TriggerAuthentication>()
            .create(&Default::default(), &auth)
            .await?;
        for (name, _, _, _, reason) in &cases {
            until_condition(&ctx, name, Condition::READY, "False", reason).await?;
            let condition = blink_tests::workloads::condition(&ctx, name, Condition::READY)
                .await?
                .context("Ready")?;
            let message = condition.message.unwrap_or_default();
            ensure!(
                !message.contains("guest:guest"),
                "a credential leaked: {message}"
            );
            let expected = match *name {
                "no-time-to-answer" => ["responseTimeout", "at least 1 second"],
                "no-service-name" => ["web.v2", "is not a Service name"],
                _ => continue,
            };
            ensure!(
                expected.iter().all(|part| message.contains(part)),
                "{name}: {message}"
            );
        }
        // Counts held: the Deployments that broken objects point at keep their 2.
        for held in ["held-a", "held-b", "held-c", "held-d", "held-e"] {
            ensure!(desired(&ctx, held).await? == 2, "{held} moved");
        }
        // A good object in the same namespace keeps scaling.
        let queue = format!("good-{}", ctx.namespace());
        create_scaled_object(
            &ctx,
            &format!(
                "
metadata: {{name: good}}
spec:
  scaleTargetRef: {{name: good}}
  pollingInterval: 1
  triggers:
  - type: rabbitmq
    metadata: {{host: '{amqp}', queueName: '{queue}', mode: QueueLength, value: '5'}}
"
            ),
        )
        .await?;
        let conn = rabbitmq::connect(&amqp).await?;
        rabbitmq::publish(&conn, &queue, 10).await?;
        until_desired(&ctx, "good", 2).await?;
        finish(&ctx, scaler).await
    });
}

#[test]
fn zero_to_a_thousand_in_one_patch() {
    blink_tests::run("scaler-thousand", |ctx| async move {
        create_deployment(&ctx, "wide", 0, json!({})).await?;
        let scaler = start_scaler(&ctx, "scaler-thousand").await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: wide}
spec:
  scaleTargetRef: {name: wide}
  maxReplicaCount: 1000
  triggers: [{type: http, metadata: {targetConcurrency: '1'}}]
",
        )
        .await?;
        until_condition(&ctx, "wide", Condition::READY, "True", "ScaledObjectReady").await?;
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let mut client = DemandClient::new(scaler.demand_addr, Some(token), "test-activator");
        let wide = key(&ctx, "wide");
        // Demand for 1,000 and more at once, with queued work. The wake reads the
        // panic window's average, which may still hold a second or two of silence
        // before this snapshot: ten times the maximum reaches it whatever the window.
        client
            .snapshot(vec![blink_crds::FunctionDemand {
                key: wide.clone(),
                in_flight: 0.0,
                queued: 10_000.0,
                requests: 10_000,
                held_messages: 0,
            }])
            .await?;
        until_desired(&ctx, "wide", 1000).await?;
        // The audit line of the PATCH may land after its result is seen: settle first.
        let writes = settled_scale_writes_by(&ctx, "scaler-thousand", 1).await?;
        ensure!(
            writes.len() == 1,
            "0 → 1,000 should take one PATCH; the audit log shows {}: {writes:#?}",
            writes.len()
        );
        let keep = async {
            loop {
                client
                    .snapshot(vec![blink_crds::FunctionDemand {
                        key: wide.clone(),
                        in_flight: 1000.0,
                        queued: 0.0,
                        requests: 1000,
                        held_messages: 0,
                    }])
                    .await?;
                if running_pods(&ctx, "wide").await? == 1000 {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), keep)
            .await
            .context("1,000 running")??;
        let scale_to_zero = json!({"spec": {"replicas": 0}});
        finish(&ctx, scaler).await?;
        ctx.api::<Deployment>()
            .patch_scale(
                "wide",
                &PatchParams::default(),
                &Patch::Merge(&scale_to_zero),
            )
            .await?;
        Ok(())
    });
}

#[test]
fn unschedulable_pods_stall_the_scale_up_and_hold_the_count() {
    blink_tests::run("scaler-stalled", |ctx| async move {
        create_deployment(&ctx, "stuck", 0, json!({})).await?;
        // No node carries this label: every pod stays Pending, Unschedulable.
        let no_node = json!({"spec": {"template": {"spec": {"nodeSelector": {"blink.sh/no-such-node": "true"}}}}});
        ctx.api::<Deployment>()
            .patch("stuck", &PatchParams::default(), &Patch::Merge(&no_node))
            .await?;
        let scaler = start_scaler(&ctx, "scaler-stalled").await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: stuck}
spec:
  scaleTargetRef: {name: stuck}
  cooldownPeriod: 2
  triggers: [{type: http, metadata: {targetConcurrency: '10'}}]
",
        )
        .await?;
        until_condition(&ctx, "stuck", Condition::READY, "True", "ScaledObjectReady").await?;
        let token =
            service_account_token(&ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        let mut client = DemandClient::new(scaler.demand_addr, Some(token), "test-activator");
        let stuck = key(&ctx, "stuck");
        ensure!(client.poke(&stuck).await? / 100 == 2);
        until_desired(&ctx, "stuck", 1).await?;
        // Arrivals keep being reported (the activator answers them 503 meanwhile).
        let report = blink_crds::FunctionDemand {
            key: stuck.clone(),
            in_flight: 0.0,
            queued: 1.0,
            requests: 5,
            held_messages: 0,
        };
        let stalled = async {
            loop {
                client.snapshot(vec![report.clone()]).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                if condition_state(&ctx, "stuck", Condition::READY).await?
                    == Some(("False".to_owned(), "ScaleUpStalled".to_owned()))
                {
                    return anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(LONG, stalled)
            .await
            .context("ScaleUpStalled")??;
        // Held: neither dropped to zero (arrivals keep it active) nor raised.
        for _ in 0..5 {
            client.snapshot(vec![report.clone()]).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            ensure!(desired(&ctx, "stuck").await? == 1, "a stalled count moved");
        }
        finish(&ctx, scaler).await
    });
}

#[test]
fn an_hpa_on_the_same_target_is_a_conflict_reported_not_fought() {
    blink_tests::run("scaler-hpa-conflict", |ctx| async move {
        create_deployment(&ctx, "busy", 2, json!({})).await?;
        create_hpa(&ctx, "busy-hpa", "busy").await?;
        let scaler = start_scaler(&ctx, "scaler-hpa").await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: busy}
spec:
  scaleTargetRef: {name: busy}
  minReplicaCount: 4
  triggers: [{type: http, metadata: {}}]
",
        )
        .await?;
        until_condition(&ctx, "busy", Condition::CONFLICT, "True", "TargetConflict").await?;
        let message = blink_tests::workloads::condition(&ctx, "busy", Condition::CONFLICT)
            .await?
            .and_then(|c| c.message)
            .unwrap_or_default();
        ensure!(
            message.contains("HorizontalPodAutoscaler busy-hpa"),
            "{message}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(
            desired(&ctx, "busy").await? == 2,
            "a target with an HPA was scaled"
        );
        ensure!(scale_writes_by(&ctx, "scaler-hpa")?.is_empty());
        // The HPA goes: Blink takes the target (min 4).
        ctx.api::<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>()
            .delete("busy-hpa", &Default::default())
            .await?;
        until_desired(&ctx, "busy", 4).await?;
        finish(&ctx, scaler).await
    });
}

#[test]
fn a_bad_flag_exits_64_with_one_line() -> anyhow::Result<()> {
    let output = std::process::Command::new(SCALER)
        .args(["--lease-duration", "soon"])
        .output()?;
    ensure!(output.status.code() == Some(64), "{:?}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(stderr.lines().count() == 1, "{stderr}");
    ensure!(stderr.contains("--lease-duration"), "{stderr}");
    let output = std::process::Command::new(SCALER)
        .args(["--lease-duration", "5s", "--lease-grace", "9s"])
        .output()?;
    ensure!(output.status.code() == Some(64), "{:?}", output.status);
    Ok(())
}

#[test]
fn repeated_changes_by_another_writer_end_in_conflict_not_a_fight() {
    blink_tests::run("scaler-drift-conflict", |ctx| async move {
        create_deployment(&ctx, "contested", 0, json!({})).await?;
        let scaler = start_scaler(&ctx, "scaler-contested").await?;
        create_scaled_object(
            &ctx,
            "
metadata: {name: contested}
spec:
  scaleTargetRef: {name: contested}
  minReplicaCount: 2
  maxReplicaCount: 2
  triggers: [{type: http, metadata: {}}]
",
        )
        .await?;
        until_desired(&ctx, "contested", 2).await?;
        let other = ctx.client_as("other-autoscaler").await?;
        let deployments: kube::Api<Deployment> = kube::Api::namespaced(other, ctx.namespace());
        // The default limit is 3 undos per field manager; the fourth change stands.
        for round in 1..=4 {
            deployments
                .patch_scale(
                    "contested",
                    &PatchParams {
                        field_manager: Some("other-autoscaler".to_owned()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&json!({"spec": {"replicas": 5 + round}})),
                )
                .await?;
            if round <= 3 {
                until_desired(&ctx, "contested", 2).await?;
            }
        }
        until_condition(
            &ctx,
            "contested",
            Condition::CONFLICT,
            "True",
            "TargetConflict",
        )
        .await?;
        let message = blink_tests::workloads::condition(&ctx, "contested", Condition::CONFLICT)
            .await?
            .and_then(|c| c.message)
            .unwrap_or_default();
        ensure!(
            message.contains("other-autoscaler") || message.contains("kube"),
            "{message}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(desired(&ctx, "contested").await? == 9, "Blink fought on");
        finish(&ctx, scaler).await
    });
}

/// A generated object the API server refuses is tried again on its own: the workload
/// does not change, no leadership changes, and yet the object appears once allowed.
#[test]
fn a_refused_generated_object_is_written_once_the_api_server_allows_it() {
    blink_tests::run("scaler-generated-retry", |ctx| async move {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        // Refuses generated ScaledObjects in this test's namespace only.
        let name = format!("deny-generated-{}", ctx.namespace());
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {"failurePolicy": "Fail",
                     "matchConstraints": {"resourceRules": [{"apiGroups": ["blink.sh"],
                         "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"],
                         "resources": ["scaledobjects"]}]},
                     "validations": [{"expression":
                         "!has(object.metadata.labels) || !('blink.sh/generated' in object.metadata.labels)",
                         "message": "generated ScaledObjects are refused for this test"}]}
        }))?;
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"],
                     "matchResources": {"namespaceSelector": {"matchLabels":
                         {"kubernetes.io/metadata.name": ctx.namespace()}}}}
        }))?;
        let policies: kube::Api<ValidatingAdmissionPolicy> = kube::Api::all(ctx.client());
        let bindings: kube::Api<ValidatingAdmissionPolicyBinding> = kube::Api::all(ctx.client());
        policies.create(&Default::default(), &policy).await?;
        bindings.create(&Default::default(), &binding).await?;
        // In force once a dry run of a generated object is refused.
        let probe: ScaledObject = serde_yaml::from_str(
            "
metadata: {name: probe, labels: {blink.sh/generated: 'true'}}
spec:
  scaleTargetRef: {name: probe}
  triggers: [{type: http, metadata: {}}]
",
        )?;
        let dry_run = kube::api::PostParams {
            dry_run: true,
            ..Default::default()
        };
        wait::until(
            LONG,
            "the admission policy refuses generated objects",
            || async {
                let refused = match ctx.api::<ScaledObject>().create(&dry_run, &probe).await {
                    Ok(_) => false,
                    Err(e) if e.to_string().contains("refused for this test") => true,
                    Err(e) => return Err(e.into()),
                };
                Ok(refused.then_some(()))
            },
        )
        .await?;

        create_deployment(
            &ctx,
            "refused",
            0,
            json!({"blink.sh/scale-to-zero": "true"}),
        )
        .await?;
        let scaler = start_scaler(&ctx, "scaler-generated-retry").await?;
        // Refused twice: the first write and at least one try after it.
        let writes = r#"blink_scaler_api_writes_total{kind="generated"}"#;
        wait::until(
            LONG,
            "two refused writes of the generated object",
            || async { Ok((scaler.metric(writes).await? >= 2.0).then_some(())) },
        )
        .await?;
        ensure!(
            ctx.api::<ScaledObject>()
                .get_opt("refused")
                .await?
                .is_none(),
            "the generated object was written despite the policy"
        );

        bindings.delete(&name, &DeleteParams::default()).await?;
        policies.delete(&name, &DeleteParams::default()).await?;
        wait::until(LONG, "the generated object, once allowed", || async {
            Ok(ctx.api::<ScaledObject>().get_opt("refused").await?)
        })
        .await?;
        finish(&ctx, scaler).await
    });
}
