//! The scaler's pull triggers against the bed's real brokers: RabbitMQ queue length
//! over AMQP and through the management API, the publish rate, a Kafka group's lag
//! with KEDA's caps and its rule for partitions without a committed offset, Prometheus
//! answers from a small local server, dead and slow sources failing within the read
//! timeout without holding up other triggers, and parameters resolved from Secrets and
//! container env in the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use blink_crds::{ScaleTrigger, TriggerAuthentication};
use blink_scaler::triggers::{self, Connections, Measurement, TriggerError, TriggerParams};
use blink_tests::brokers::PrivateRabbitMq;
use blink_tests::{kafka, rabbitmq, random_suffix, wait};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Secret};
use kube::api::PostParams;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Generous bound for broker statistics to catch up; tests poll, never time.
const SETTLE: Duration = Duration::from_secs(30);

fn params(pairs: &[(&str, &str)]) -> TriggerParams {
    TriggerParams::from_metadata(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

async fn measure(
    trigger_type: &str,
    pairs: &[(&str, &str)],
    connections: &Connections,
) -> Result<Measurement, TriggerError> {
    let trigger = triggers::build(trigger_type, &params(pairs), connections)?;
    trigger.measure().await
}

/// Polls a trigger until its value is `expected`; fails with the last reading.
async fn until_value(
    what: &str,
    trigger_type: &str,
    pairs: &[(&str, &str)],
    connections: &Connections,
    expected: f64,
) -> anyhow::Result<Measurement> {
    let trigger = triggers::build(trigger_type, &params(pairs), connections)?;
    wait::until(SETTLE, what, || {
        let trigger = trigger.clone();
        async move {
            let m = trigger.measure().await?;
            if m.value == expected {
                Ok(Some(m))
            } else {
                Err(anyhow::anyhow!("value {} (want {expected})", m.value))
            }
        }
    })
    .await
}

#[test]
fn rabbitmq_queue_length_over_amqp() {
    blink_tests::run("trig-rabbit-amqp", |ctx| async move {
        let queue = format!("orders-{}", random_suffix());
        let conn = rabbitmq::connect(&ctx.bed().amqp_url).await?;
        rabbitmq::publish(&conn, &queue, 7).await?;
        let connections = Connections::default();
        let amqp = ctx.bed().amqp_url.as_str();
        let m = measure(
            "rabbitmq",
            &[
                ("host", amqp),
                ("queueName", queue.as_str()),
                ("mode", "QueueLength"),
                ("value", "5"),
            ],
            &connections,
        )
        .await?;
        ensure!(m.value == 7.0 && m.target == 5.0 && m.active, "{m:?}");

        // The legacy `queueLength` and the default value; the same pooled connection.
        let m = measure(
            "rabbitmq",
            &[("host", amqp), ("queueName", queue.as_str())],
            &connections,
        )
        .await?;
        ensure!(m.value == 7.0 && m.target == 20.0, "{m:?}");
        let m = measure(
            "rabbitmq",
            &[
                ("host", amqp),
                ("queueName", queue.as_str()),
                ("queueLength", "3"),
                ("activationValue", "7"),
            ],
            &connections,
        )
        .await?;
        ensure!(
            m.target == 3.0 && !m.active,
            "7 messages are not above 7: {m:?}"
        );

        // A queue that does not exist is the trigger's error, and the next read of an
        // existing queue still works on the same connection.
        let missing = measure(
            "rabbitmq",
            &[("host", amqp), ("queueName", "no-such-queue-anywhere")],
            &connections,
        )
        .await;
        match missing {
            Err(TriggerError::Unreachable(msg)) => {
                ensure!(msg.contains("no-such-queue-anywhere"), "{msg}");
                ensure!(!msg.contains("guest:guest"), "credentials in {msg}");
            }
            other => bail!("missing queue: {other:?}"),
        }
        let m = measure(
            "rabbitmq",
            &[("host", amqp), ("queueName", queue.as_str())],
            &connections,
        )
        .await?;
        ensure!(m.value == 7.0, "{m:?}");
        conn.close(200, "done".into()).await?;
        Ok(())
    });
}

#[test]
fn rabbitmq_queue_length_through_the_management_api() {
    blink_tests::run("trig-rabbit-http", |ctx| async move {
        let queue = format!("jobs-{}", random_suffix());
        let conn = rabbitmq::connect(&ctx.bed().amqp_url).await?;
        rabbitmq::publish(&conn, &queue, 9).await?;
        let connections = Connections::default();
        let management = ctx.bed().rabbitmq_management_url.as_str();
        let pairs = [
            ("host", management),
            ("queueName", queue.as_str()),
            ("mode", "QueueLength"),
            ("value", "4"),
        ];
        let m = until_value(
            "management API length",
            "rabbitmq",
            &pairs,
            &connections,
            9.0,
        )
        .await?;
        ensure!(m.target == 4.0 && m.active, "{m:?}");
        // protocol: http with the vhost spelled out in the URL.
        let with_vhost = format!("{}/%2F", management.trim_end_matches('/'));
        let pairs = [
            ("host", with_vhost.as_str()),
            ("protocol", "http"),
            ("queueName", queue.as_str()),
        ];
        until_value(
            "management API length, explicit vhost",
            "rabbitmq",
            &pairs,
            &connections,
            9.0,
        )
        .await?;
        conn.close(200, "done".into()).await?;
        Ok(())
    });
}

#[test]
fn rabbitmq_message_rate_while_publishing() {
    blink_tests::run("trig-rabbit-rate", |ctx| async move {
        let queue = format!("events-{}", random_suffix());
        let conn = rabbitmq::connect(&ctx.bed().amqp_url).await?;
        rabbitmq::publish(&conn, &queue, 1).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = {
            let stop = stop.clone();
            let queue = queue.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    rabbitmq::publish(&conn, &queue, 5).await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                conn.close(200, "done".into()).await?;
                anyhow::Ok(())
            })
        };
        let connections = Connections::default();
        let management = ctx.bed().rabbitmq_management_url.clone();
        let trigger = triggers::build(
            "rabbitmq",
            &params(&[
                ("host", management.as_str()),
                ("queueName", queue.as_str()),
                ("mode", "MessageRate"),
                ("value", "10"),
            ]),
            &connections,
        )?;
        let seen = wait::until(SETTLE, "a publish rate above 0", || {
            let trigger = trigger.clone();
            async move {
                let m = trigger.measure().await?;
                Ok((m.value > 0.0).then_some(m))
            }
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        publisher.await??;
        let m = seen?;
        ensure!(m.target == 10.0 && m.active, "{m:?}");

        // MessageRate needs the management API.
        let amqp = ctx.bed().amqp_url.as_str();
        let refused = measure(
            "rabbitmq",
            &[
                ("host", amqp),
                ("queueName", queue.as_str()),
                ("mode", "MessageRate"),
                ("value", "1"),
            ],
            &connections,
        )
        .await;
        ensure!(
            matches!(refused, Err(TriggerError::InvalidMetadata(_))),
            "{refused:?}"
        );
        Ok(())
    });
}

/// A topic of 3 partitions with 50 messages, and a group that committed offset 0 on
/// each: lag 50.
async fn topic_with_lag(bootstrap: &str) -> anyhow::Result<(String, String)> {
    let topic = format!("events-{}", random_suffix());
    let group = format!("hello-{}", random_suffix());
    kafka::create_topic(bootstrap, &topic, 3).await?;
    let partitions: Vec<i32> = (0..50).map(|i| i % 3).collect();
    kafka::produce(bootstrap, &topic, &partitions).await?;
    let (b, g, t) = (bootstrap.to_owned(), group.clone(), topic.clone());
    tokio::task::spawn_blocking(move || kafka::consume_and_commit(&b, &g, &t, 3, 0)).await??;
    Ok((topic, group))
}

#[test]
fn kafka_lag_and_its_cap() {
    blink_tests::run("trig-kafka-lag", |ctx| async move {
        let bootstrap = ctx.bed().kafka_bootstrap.clone();
        let (topic, group) = topic_with_lag(&bootstrap).await?;
        let connections = Connections::default();
        let base = [
            ("bootstrapServers", bootstrap.as_str()),
            ("consumerGroup", group.as_str()),
            ("topic", topic.as_str()),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut pairs = base.to_vec();
            pairs.extend_from_slice(extra);
            pairs
        };
        // 50 lag over 3 partitions at the default threshold 10: capped at 3 × 10.
        let m = measure("kafka", &with(&[]), &connections).await?;
        ensure!(
            m.value == 30.0 && m.target == 10.0 && m.active,
            "capped: {m:?}"
        );
        let m = measure(
            "kafka",
            &with(&[("allowIdleConsumers", "true")]),
            &connections,
        )
        .await?;
        ensure!(m.value == 50.0, "uncapped: {m:?}");
        let m = measure("kafka", &with(&[("lagThreshold", "20")]), &connections).await?;
        ensure!(m.value == 50.0 && m.target == 20.0, "under the cap: {m:?}");
        let m = measure(
            "kafka",
            &with(&[("activationLagThreshold", "50")]),
            &connections,
        )
        .await?;
        ensure!(!m.active, "50 is not above 50: {m:?}");
        let m = measure(
            "kafka",
            &with(&[("partitionLimitation", "0"), ("allowIdleConsumers", "true")]),
            &connections,
        )
        .await?;
        ensure!(m.value == 17.0, "partition 0 holds 17 of the 50: {m:?}");

        // Without a topic: every topic the group committed on, here the one.
        let m = measure(
            "kafka",
            &[
                ("bootstrapServers", bootstrap.as_str()),
                ("consumerGroup", group.as_str()),
                ("allowIdleConsumers", "true"),
            ],
            &connections,
        )
        .await?;
        ensure!(m.value == 50.0, "all topics of the group: {m:?}");

        // The group consumes 20 more: lag 30.
        let (b, g, t) = (bootstrap.clone(), group.clone(), topic.clone());
        tokio::task::spawn_blocking(move || kafka::consume_and_commit(&b, &g, &t, 3, 20)).await??;
        let m = measure(
            "kafka",
            &with(&[("allowIdleConsumers", "true")]),
            &connections,
        )
        .await?;
        ensure!(m.value == 30.0, "after consuming 20: {m:?}");
        Ok(())
    });
}

#[test]
fn kafka_partitions_without_committed_offsets_follow_keda_s_rule() {
    blink_tests::run("trig-kafka-new", |ctx| async move {
        let bootstrap = ctx.bed().kafka_bootstrap.clone();
        let topic = format!("fresh-{}", random_suffix());
        kafka::create_topic(&bootstrap, &topic, 3).await?;
        let partitions: Vec<i32> = (0..50).map(|i| i % 3).collect();
        kafka::produce(&bootstrap, &topic, &partitions).await?;
        let group = format!("never-committed-{}", random_suffix());
        let connections = Connections::default();
        let base = [
            ("bootstrapServers", bootstrap.as_str()),
            ("consumerGroup", group.as_str()),
            ("topic", topic.as_str()),
            ("allowIdleConsumers", "true"),
        ];
        // (extra metadata, value, active)
        type Case<'a> = (&'a [(&'a str, &'a str)], f64, bool);
        let cases: [Case<'_>; 4] = [
            // latest: 1 per partition, so the consumer wakes and commits.
            (&[], 3.0, true),
            (&[("scaleToZeroOnInvalidOffset", "true")], 0.0, false),
            // earliest: everything in the partitions would be read.
            (&[("offsetResetPolicy", "earliest")], 50.0, true),
            (
                &[
                    ("offsetResetPolicy", "earliest"),
                    ("scaleToZeroOnInvalidOffset", "true"),
                ],
                0.0,
                false,
            ),
        ];
        for (extra, value, active) in cases {
            let mut pairs = base.to_vec();
            pairs.extend_from_slice(extra);
            let m = measure("kafka", &pairs, &connections).await?;
            ensure!(m.value == value && m.active == active, "{extra:?}: {m:?}");
        }
        // A topic that does not exist is an error, not a lag of 0.
        let mut pairs = base.to_vec();
        pairs[2] = ("topic", "no-such-topic-anywhere");
        let missing = measure("kafka", &pairs, &connections).await;
        ensure!(missing.is_err(), "{missing:?}");
        Ok(())
    });
}

/// A Prometheus stand-in on 127.0.0.1: answers `/api/v1/query` by the query's name,
/// and records the `Authorization` and `X-Scope-OrgID` headers it saw.
struct FakePrometheus {
    address: String,
    seen_headers: Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakePrometheus {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let seen_headers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = seen_headers.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let request = String::from_utf8_lossy(&request).into_owned();
                    for line in request.lines() {
                        let lower = line.to_ascii_lowercase();
                        if lower.starts_with("authorization:")
                            || lower.starts_with("x-scope-orgid:")
                        {
                            seen.lock().expect("not poisoned").push(line.to_owned());
                        }
                    }
                    let target = request.split_whitespace().nth(1).unwrap_or("");
                    let query = reqwest::Url::parse(&format!("http://x{target}"))
                        .ok()
                        .and_then(|u| {
                            u.query_pairs()
                                .find(|(k, _)| k == "query")
                                .map(|(_, v)| v.into_owned())
                        })
                        .unwrap_or_default();
                    let one = |v: &str| {
                        json!({"status": "success", "data": {"resultType": "vector",
                            "result": [{"metric": {}, "value": [1_700_000_000.0, v]}]}})
                    };
                    let (status, body) = match query.as_str() {
                        "one" => ("200 OK", one("12.5")),
                        "zero" => ("200 OK", one("0")),
                        "empty" => (
                            "200 OK",
                            json!({"status": "success",
                                   "data": {"resultType": "vector", "result": []}}),
                        ),
                        "two" => (
                            "200 OK",
                            json!({"status": "success", "data": {"resultType": "vector",
                                "result": [{"metric": {"a": "1"}, "value": [1, "1"]},
                                           {"metric": {"a": "2"}, "value": [1, "2"]}]}}),
                        ),
                        "scalar" => (
                            "200 OK",
                            json!({"status": "success",
                                   "data": {"resultType": "scalar", "result": [1, "3"]}}),
                        ),
                        "slow" => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            ("200 OK", one("1"))
                        }
                        _ => (
                            "400 Bad Request",
                            json!({"status": "error", "error": "unknown query"}),
                        ),
                    };
                    let body = body.to_string();
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Ok(Self {
            address,
            seen_headers,
        })
    }
}

#[test]
fn prometheus_instant_queries() {
    blink_tests::run("trig-prometheus", |_ctx| async move {
        let prometheus = FakePrometheus::start().await?;
        let server = prometheus.address.as_str();
        let connections = Connections::new(Duration::from_secs(2));
        let query = |q: &'static str, extra: &[(&'static str, &'static str)]| {
            let mut pairs = vec![("serverAddress", server), ("query", q), ("threshold", "5")];
            pairs.extend_from_slice(extra);
            pairs
        };
        let m = measure("prometheus", &query("one", &[]), &connections).await?;
        ensure!(m.value == 12.5 && m.target == 5.0 && m.active, "{m:?}");
        let m = measure("prometheus", &query("zero", &[]), &connections).await?;
        ensure!(m.value == 0.0 && !m.active, "{m:?}");
        let m = measure(
            "prometheus",
            &query("scalar", &[("activationThreshold", "3")]),
            &connections,
        )
        .await?;
        ensure!(m.value == 3.0 && !m.active, "{m:?}");
        let m = measure("prometheus", &query("empty", &[]), &connections).await?;
        ensure!(m.value == 0.0, "ignoreNullValues defaults to true: {m:?}");
        let empty = measure(
            "prometheus",
            &query("empty", &[("ignoreNullValues", "false")]),
            &connections,
        )
        .await;
        ensure!(empty.is_err(), "{empty:?}");
        let two = measure("prometheus", &query("two", &[]), &connections).await;
        ensure!(
            matches!(&two, Err(e) if e.to_string().contains("2 elements")),
            "{two:?}"
        );
        let bad = measure("prometheus", &query("unknown", &[]), &connections).await;
        ensure!(
            matches!(&bad, Err(TriggerError::Unreachable(e)) if e.contains("400")),
            "{bad:?}"
        );

        // Credentials and custom headers reach the server.
        let trigger = triggers::build(
            "prometheus",
            &TriggerParams::new(
                query(
                    "one",
                    &[
                        ("authModes", "bearer"),
                        ("customHeaders", "X-Scope-OrgID=team-a"),
                    ],
                )
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
                [("bearerToken".to_owned(), "t0ken".to_owned())].into(),
                BTreeMap::new(),
            ),
            &connections,
        )?;
        ensure!(!format!("{trigger:?}").contains("t0ken"), "{trigger:?}");
        trigger.measure().await?;
        let seen = prometheus
            .seen_headers
            .lock()
            .expect("not poisoned")
            .clone();
        ensure!(
            seen.iter()
                .any(|h| h.eq_ignore_ascii_case("authorization: Bearer t0ken")),
            "{seen:?}"
        );
        ensure!(
            seen.iter()
                .any(|h| h.eq_ignore_ascii_case("x-scope-orgid: team-a")),
            "{seen:?}"
        );
        Ok(())
    });
}

#[test]
fn slow_and_dead_sources_fail_within_the_timeout_and_hold_up_no_one() {
    blink_tests::run("trig-dead", |ctx| async move {
        let prometheus = FakePrometheus::start().await?;
        // Long enough for a fresh AMQP connection on a loaded machine; the slow source
        // takes 30 s.
        let timeout = Duration::from_secs(5);
        let connections = Connections::new(timeout);
        // The bound is the read timeout plus slack for scheduling, not a timing claim.
        let bound = timeout + Duration::from_secs(5);

        let queue = format!("steady-{}", random_suffix());
        let conn = rabbitmq::connect(&ctx.bed().amqp_url).await?;
        rabbitmq::publish(&conn, &queue, 2).await?;
        let amqp = ctx.bed().amqp_url.clone();
        let slow_pairs = [
            ("serverAddress", prometheus.address.as_str()),
            ("query", "slow"),
            ("threshold", "1"),
        ];
        let steady_pairs = [("host", amqp.as_str()), ("queueName", queue.as_str())];
        let slow = measure("prometheus", &slow_pairs, &connections);
        let steady = measure("rabbitmq", &steady_pairs, &connections);
        let (slow, steady) = tokio::time::timeout(bound, futures::future::join(slow, steady))
            .await
            .context("reads did not return within the bound")?;
        ensure!(
            matches!(slow, Err(TriggerError::Timeout(_))),
            "slow source: {slow:?}"
        );
        ensure!(steady?.value == 2.0, "a slow trigger held up another");

        // Nothing listens on port 1: refused at once, or timed out.
        for (trigger_type, pairs) in [
            (
                "rabbitmq",
                vec![
                    ("host", "amqp://guest:guest@127.0.0.1:1/%2f"),
                    ("queueName", "q"),
                ],
            ),
            (
                "rabbitmq",
                vec![
                    ("host", "http://guest:guest@127.0.0.1:1/"),
                    ("queueName", "q"),
                ],
            ),
            (
                "kafka",
                vec![
                    ("bootstrapServers", "127.0.0.1:1"),
                    ("consumerGroup", "g"),
                    ("topic", "t"),
                ],
            ),
            (
                "prometheus",
                vec![
                    ("serverAddress", "http://127.0.0.1:1"),
                    ("query", "up"),
                    ("threshold", "1"),
                ],
            ),
        ] {
            let result = tokio::time::timeout(bound, measure(trigger_type, &pairs, &connections))
                .await
                .with_context(|| format!("{trigger_type} did not return within the bound"))?;
            match result {
                Err(TriggerError::Unreachable(msg) | TriggerError::Timeout(msg)) => {
                    ensure!(!msg.contains("guest:guest"), "credentials in {msg}");
                }
                other => bail!("{trigger_type} {pairs:?}: {other:?}"),
            }
        }
        conn.close(200, "done".into()).await?;
        Ok(())
    });
}

#[test]
fn amqp_connection_comes_back_after_a_broker_restart() {
    blink_tests::run("trig-rabbit-restart", |ctx| async move {
        let mut broker = PrivateRabbitMq::start(ctx.bed()).await?;
        let conn = rabbitmq::connect(&broker.amqp_url).await?;
        rabbitmq::publish(&conn, "work", 4).await?;
        drop(conn);
        let connections = Connections::new(Duration::from_secs(5));
        let trigger = triggers::build(
            "rabbitmq",
            &params(&[("host", broker.amqp_url.as_str()), ("queueName", "work")]),
            &connections,
        )?;
        ensure!(trigger.measure().await?.value == 4.0);

        broker.stop().await;
        let down = tokio::time::timeout(Duration::from_secs(10), trigger.measure())
            .await
            .context("a read of a stopped broker did not return")?;
        ensure!(
            matches!(
                down,
                Err(TriggerError::Unreachable(_) | TriggerError::Timeout(_))
            ),
            "{down:?}"
        );

        broker.restart().await?;
        // The pooled connection died with the broker; the next reads reconnect.
        wait::until_eq(SETTLE, "length after the restart", 4.0, || {
            let trigger = trigger.clone();
            async move { Ok(trigger.measure().await?.value) }
        })
        .await?;
        Ok(())
    });
}

#[test]
fn parameters_come_from_secrets_and_container_env() {
    blink_tests::run("trig-params", |ctx| async move {
        let client = ctx.client();
        let ns = ctx.namespace().to_owned();
        let queue = format!("secret-{}", random_suffix());
        let conn = rabbitmq::connect(&ctx.bed().amqp_url).await?;
        rabbitmq::publish(&conn, &queue, 3).await?;
        conn.close(200, "done".into()).await?;

        let auth: TriggerAuthentication = serde_json::from_value(json!({
            "apiVersion": "blink.sh/v1alpha1", "kind": "TriggerAuthentication",
            "metadata": {"name": "rabbit-auth"},
            "spec": {"secretTargetRef": [{"parameter": "host", "name": "rabbit-creds",
                                          "key": "url"}]}
        }))?;
        ctx.api::<TriggerAuthentication>()
            .create(&PostParams::default(), &auth)
            .await?;
        let trigger: ScaleTrigger = serde_json::from_value(json!({
            "type": "rabbitmq", "metadata": {"queueName": queue},
            "authenticationRef": {"name": "rabbit-auth"}
        }))?;

        // The Secret does not exist yet: an authentication error naming it and the key.
        match triggers::resolve(&client, &ns, &trigger, None, None).await {
            Err(TriggerError::Authentication(msg)) => {
                ensure!(msg.contains("rabbit-creds") && msg.contains("url"), "{msg}");
            }
            other => bail!("without the Secret: {other:?}"),
        }

        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "rabbit-creds"},
            "stringData": {"url": ctx.bed().amqp_url}
        }))?;
        ctx.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await?;
        let resolved = triggers::resolve(&client, &ns, &trigger, None, None).await?;
        ensure!(
            !format!("{resolved:?}").contains("guest"),
            "values in Debug: {resolved:?}"
        );
        let connections = Connections::default();
        let m = triggers::build("rabbitmq", &resolved, &connections)?
            .measure()
            .await?;
        ensure!(m.value == 3.0, "{m:?}");

        // `hostFromEnv`: the target's container env, its value from the same Secret.
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "spec": {"containers": [
                {"name": "sidecar", "image": "x", "env": [{"name": "RABBIT", "value": "nope"}]},
                {"name": "app", "image": "x", "env": [{"name": "RABBIT", "valueFrom":
                    {"secretKeyRef": {"name": "rabbit-creds", "key": "url"}}}]}
            ]}
        }))?;
        let from_env: ScaleTrigger = serde_json::from_value(json!({
            "type": "rabbitmq", "metadata": {"queueName": queue, "hostFromEnv": "RABBIT"}
        }))?;
        let resolved =
            triggers::resolve(&client, &ns, &from_env, Some(&template), Some("app")).await?;
        let m = triggers::build("rabbitmq", &resolved, &connections)?
            .measure()
            .await?;
        ensure!(m.value == 3.0, "{m:?}");

        // A source Blink does not implement is refused by name.
        let identity: TriggerAuthentication = serde_json::from_value(json!({
            "apiVersion": "blink.sh/v1alpha1", "kind": "TriggerAuthentication",
            "metadata": {"name": "with-identity"},
            "spec": {"podIdentity": {"provider": "aws"}}
        }))?;
        ctx.api::<TriggerAuthentication>()
            .create(&PostParams::default(), &identity)
            .await?;
        let mut refused = trigger.clone();
        if let Some(r) = refused.authentication_ref.as_mut() {
            r.name = "with-identity".into();
        }
        match triggers::resolve(&client, &ns, &refused, None, None).await {
            Err(TriggerError::Unsupported(msg)) => ensure!(msg.contains("podIdentity"), "{msg}"),
            other => bail!("podIdentity: {other:?}"),
        }
        // And a reference to an object that does not exist.
        let mut dangling = trigger;
        if let Some(r) = dangling.authentication_ref.as_mut() {
            r.name = "nowhere".into();
        }
        match triggers::resolve(&client, &ns, &dangling, None, None).await {
            Err(TriggerError::Authentication(msg)) => ensure!(msg.contains("nowhere"), "{msg}"),
            other => bail!("dangling reference: {other:?}"),
        }
        Ok(())
    });
}
