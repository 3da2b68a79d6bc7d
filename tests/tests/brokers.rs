//! The bed's brokers are real: RabbitMQ queue depths read over AMQP and through the
//! management API, a Kafka consumer group's lag read through rdkafka, and private
//! instances that a test may stop and start again without disturbing the others.

use std::time::Duration;

use anyhow::ensure;
use blink_tests::brokers::{PrivateKafka, PrivateRabbitMq};
use blink_tests::{kafka, rabbitmq, random_suffix, wait};

#[test]
fn rabbitmq_queue_depth_by_passive_declare_and_management_api() {
    blink_tests::run("rabbit-depth", |ctx| async move {
        let queue = format!("orders-{}", random_suffix());
        let conn = rabbitmq::connect(&ctx.bed().amqp_url).await?;
        rabbitmq::publish(&conn, &queue, 5).await?;
        ensure!(rabbitmq::passive_depth(&conn, &queue).await? == 5);
        // The management API's statistics lag behind by about a second.
        let management = ctx.bed().rabbitmq_management_url.clone();
        wait::until_eq(Duration::from_secs(15), "management API depth", 5, || {
            rabbitmq::management_depth(&management, &queue)
        })
        .await?;
        conn.close(200, "done".into()).await?;
        Ok(())
    });
}

#[test]
fn kafka_consumer_group_lag_through_rdkafka() {
    blink_tests::run("kafka-lag", |ctx| async move {
        let bootstrap = ctx.bed().kafka_bootstrap.clone();
        let topic = format!("events-{}", random_suffix());
        let group = format!("hello-{}", random_suffix());
        kafka::create_topic(&bootstrap, &topic, 3).await?;
        kafka::produce(&bootstrap, &topic, &[0, 1, 2, 0, 1]).await?;
        let (b, g, t) = (bootstrap.clone(), group.clone(), topic.clone());
        tokio::task::spawn_blocking(move || kafka::consume_and_commit(&b, &g, &t, 3, 2)).await??;
        let (lag, uncommitted) =
            tokio::task::spawn_blocking(move || kafka::lag(&bootstrap, &group, &topic)).await??;
        ensure!(
            uncommitted.is_empty(),
            "partitions without a committed offset: {uncommitted:?}"
        );
        ensure!(lag == 3, "lag {lag}, expected 3 (5 produced, 2 committed)");
        Ok(())
    });
}

#[test]
fn private_rabbitmq_stops_and_comes_back_with_its_persistent_messages() {
    blink_tests::run("rabbit-private", |ctx| async move {
        let mut broker = PrivateRabbitMq::start(ctx.bed()).await?;
        ensure!(
            broker.amqp_url != ctx.bed().amqp_url,
            "not a private instance"
        );
        let conn = rabbitmq::connect(&broker.amqp_url).await?;
        rabbitmq::publish(&conn, "jobs", 3).await?;
        drop(conn);

        broker.stop().await;
        ensure!(
            rabbitmq::connect(&broker.amqp_url).await.is_err(),
            "a stopped broker still accepts connections"
        );
        // The shared broker is untouched.
        let shared = rabbitmq::connect(&ctx.bed().amqp_url).await?;
        shared.close(200, "done".into()).await?;

        broker.restart().await?;
        let conn = rabbitmq::connect(&broker.amqp_url).await?;
        ensure!(rabbitmq::passive_depth(&conn, "jobs").await? == 3);
        Ok(())
    });
}

#[test]
fn private_kafka_stops_and_comes_back_with_its_offsets() {
    blink_tests::run("kafka-private", |ctx| async move {
        let mut broker = PrivateKafka::start(ctx.bed()).await?;
        let bootstrap = broker.bootstrap.clone();
        ensure!(
            bootstrap != ctx.bed().kafka_bootstrap,
            "not a private instance"
        );
        kafka::create_topic(&bootstrap, "events", 2).await?;
        kafka::produce(&bootstrap, "events", &[0, 1, 1]).await?;
        let b = bootstrap.clone();
        tokio::task::spawn_blocking(move || kafka::consume_and_commit(&b, "g", "events", 2, 1))
            .await??;

        broker.stop().await;
        let b = bootstrap.clone();
        ensure!(
            tokio::task::spawn_blocking(move || kafka::cluster_id(&b))
                .await?
                .is_err(),
            "a stopped broker still answers"
        );
        broker.restart().await?;
        // Up means its metadata answers; the group's offsets may still be loading.
        wait::until_eq(
            Duration::from_secs(60),
            "lag and uncommitted partitions after restart",
            (2, Vec::new()),
            || {
                let b = bootstrap.clone();
                async move {
                    tokio::task::spawn_blocking(move || kafka::lag(&b, "g", "events")).await?
                }
            },
        )
        .await?;
        Ok(())
    });
}
