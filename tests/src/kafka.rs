//! Kafka through rdkafka, as the scaler will read it: topics, producing, committing
//! a consumer group's offsets, and the group's lag.
//!
//! rdkafka's calls block; async tests run them with `spawn_blocking`.

use std::time::Duration;

use anyhow::{Context as _, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(10);

fn config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// The cluster's id: proves the broker answers metadata requests.
pub fn cluster_id(bootstrap: &str) -> anyhow::Result<String> {
    let consumer: BaseConsumer = config(bootstrap).create()?;
    let metadata = consumer.fetch_metadata(None, TIMEOUT)?;
    if metadata.brokers().is_empty() {
        bail!("no brokers in metadata from {bootstrap}");
    }
    consumer
        .client()
        .fetch_cluster_id(TIMEOUT)
        .context("no cluster id")
}

pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = config(bootstrap).create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
        )
        .await?;
    for result in results {
        result.map_err(|(name, code)| anyhow::anyhow!("creating topic {name}: {code}"))?;
    }
    Ok(())
}

/// Produces one message to each of `partitions` in turn, waiting for each ack.
pub async fn produce(bootstrap: &str, topic: &str, partitions: &[i32]) -> anyhow::Result<()> {
    let producer: FutureProducer = config(bootstrap).set("acks", "all").create()?;
    for (i, partition) in partitions.iter().enumerate() {
        let payload = format!("message {i}");
        producer
            .send(
                FutureRecord::<(), _>::to(topic)
                    .partition(*partition)
                    .payload(&payload),
                TIMEOUT,
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}/{partition}: {e}"))?;
    }
    Ok(())
}

/// Consumes `count` messages from the start of every partition as `group`, then
/// commits, for every partition, the offset after the last message consumed there
/// (0 where none was), so the group has a committed offset everywhere. Blocking.
pub fn consume_and_commit(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    count: usize,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut next = vec![0i64; usize::try_from(partitions)?];
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut consumed = 0;
    while consumed < count {
        if std::time::Instant::now() > deadline {
            bail!("consumed {consumed} of {count} messages from {topic}");
        }
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            use rdkafka::Message as _;
            next[usize::try_from(message.partition())?] = message.offset() + 1;
            consumed += 1;
        }
    }
    let mut commit = TopicPartitionList::new();
    for (p, offset) in next.iter().enumerate() {
        commit.add_partition_offset(topic, i32::try_from(p)?, Offset::Offset(*offset))?;
    }
    consumer.commit(&commit, CommitMode::Sync)?;
    Ok(())
}

/// The group's lag on `topic`: the sum over partitions of (high watermark − committed
/// offset). Partitions without a committed offset are reported separately, because
/// what they mean depends on the reader's policy (KEDA's `offsetResetPolicy`).
/// Blocking.
pub fn lag(bootstrap: &str, group: &str, topic: &str) -> anyhow::Result<(i64, Vec<i32>)> {
    let consumer: BaseConsumer = config(bootstrap).set("group.id", group).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut list = TopicPartitionList::new();
    for p in &partitions {
        list.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(list, TIMEOUT)?;
    let mut lag = 0;
    let mut uncommitted = Vec::new();
    for element in committed.elements() {
        let (_, high) = consumer.fetch_watermarks(topic, element.partition(), TIMEOUT)?;
        match element.offset() {
            Offset::Offset(offset) => lag += high - offset,
            _ => uncommitted.push(element.partition()),
        }
    }
    Ok((lag, uncommitted))
}
