//! The `kafka` trigger: a consumer group's lag, with KEDA's metadata and arithmetic.
//!
//! Metadata: `bootstrapServers` (comma-separated; or `bootstrapServersFromEnv`),
//! `consumerGroup` (or `consumerGroupFromEnv`), `topic` (optional: without it, every
//! topic where the group has a committed offset), `lagThreshold` (default 10),
//! `activationLagThreshold` (default 0), `offsetResetPolicy` (`latest` | `earliest`,
//! default `latest`), `allowIdleConsumers`, `scaleToZeroOnInvalidOffset`,
//! `excludePersistentLag`, `limitToPartitionsWithLag`,
//! `ensureEvenDistributionOfPartitions`, `partitionLimitation` (`"0,2,5-7"`; ignored
//! without `topic`, as in KEDA), and SASL `sasl: plaintext` with `username` /
//! `password`. KEDA's `version` is accepted and unused (librdkafka negotiates).
//!
//! The lag of one partition is, as in KEDA's scaler, `latest − committed`, and when
//! the group has no committed offset there:
//! - `offsetResetPolicy: latest` → 1 (so a new group still wakes its consumer, which
//!   then commits), or 0 with `scaleToZeroOnInvalidOffset`;
//! - `offsetResetPolicy: earliest` → the partition's latest offset (everything would
//!   be read), or 0 with `scaleToZeroOnInvalidOffset`.
//!
//! The total is capped at `partitions × lagThreshold` (so the desire never exceeds the
//! partition count) unless `allowIdleConsumers`; `limitToPartitionsWithLag` caps at the
//! partitions that have lag instead; `ensureEvenDistributionOfPartitions` rounds the
//! desire up to a factor of the partition count. With `excludePersistentLag`, a
//! partition whose committed offset has not moved since the previous read adds
//! nothing to the metric (its consumer is stuck; more replicas would not help) but
//! still counts for activity.
//!
//! Refused, naming the key: `tls: enable`, SASL mechanisms other than PLAIN (the
//! scaler's librdkafka is built without TLS and SCRAM support).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use super::params::{Redacted, TriggerParams};
use super::{Connections, Measurement, PullTrigger, TriggerError};

/// KEDA's default `lagThreshold`.
pub const DEFAULT_LAG_THRESHOLD: i64 = 10;

/// Extra time the async side waits beyond the read timeout for the blocking reads,
/// which stop at the timeout themselves, to report librdkafka's own error.
const BLOCKING_GRACE: Duration = Duration::from_millis(500);

/// Where a group with no committed offset on a partition would start reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetResetPolicy {
    Latest,
    Earliest,
}

/// The arithmetic settings of a `kafka` trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LagRules {
    pub lag_threshold: i64,
    pub offset_reset_policy: OffsetResetPolicy,
    pub allow_idle_consumers: bool,
    pub scale_to_zero_on_invalid_offset: bool,
    pub exclude_persistent_lag: bool,
    pub limit_to_partitions_with_lag: bool,
    pub ensure_even_distribution: bool,
}

/// A parsed `kafka` trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaConfig {
    pub bootstrap_servers: Vec<String>,
    pub group: String,
    pub topic: Option<String>,
    pub partition_limitation: Option<BTreeSet<i32>>,
    pub activation_lag_threshold: i64,
    pub rules: LagRules,
    /// SASL PLAIN credentials.
    pub sasl_plain: Option<(String, Redacted)>,
}

impl KafkaConfig {
    /// Parses KEDA's metadata (see the module docs). Pure.
    pub fn parse(params: &TriggerParams) -> Result<Self, TriggerError> {
        let invalid = |msg: &str| TriggerError::InvalidMetadata(msg.to_owned());
        let bootstrap_servers: Vec<String> = params
            .required("bootstrapServers")?
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if bootstrap_servers.is_empty() {
            return Err(invalid("bootstrapServers names no server"));
        }
        let group = params.required("consumerGroup")?.to_owned();
        let topic = params.get("topic").map(str::to_owned);
        let lag_threshold = params.i64_or("lagThreshold", DEFAULT_LAG_THRESHOLD)?;
        if lag_threshold <= 0 {
            return Err(invalid("metadata.lagThreshold must be a positive integer"));
        }
        let activation_lag_threshold = params.i64_or("activationLagThreshold", 0)?;
        if activation_lag_threshold < 0 {
            return Err(invalid(
                "metadata.activationLagThreshold must not be negative",
            ));
        }
        let offset_reset_policy = match params.get("offsetResetPolicy").unwrap_or("latest") {
            "latest" => OffsetResetPolicy::Latest,
            "earliest" => OffsetResetPolicy::Earliest,
            other => {
                return Err(TriggerError::InvalidMetadata(format!(
                    "metadata.offsetResetPolicy must be latest or earliest, not {other:?}"
                )));
            }
        };
        let rules = LagRules {
            lag_threshold,
            offset_reset_policy,
            allow_idle_consumers: params.bool_or("allowIdleConsumers", false)?,
            scale_to_zero_on_invalid_offset: params.bool_or("scaleToZeroOnInvalidOffset", false)?,
            exclude_persistent_lag: params.bool_or("excludePersistentLag", false)?,
            limit_to_partitions_with_lag: params.bool_or("limitToPartitionsWithLag", false)?,
            ensure_even_distribution: params
                .bool_or("ensureEvenDistributionOfPartitions", false)?,
        };
        if rules.allow_idle_consumers && rules.limit_to_partitions_with_lag {
            return Err(invalid(
                "metadata.allowIdleConsumers and metadata.limitToPartitionsWithLag cannot both \
                 be set",
            ));
        }
        if rules.limit_to_partitions_with_lag && rules.ensure_even_distribution {
            return Err(invalid(
                "metadata.limitToPartitionsWithLag and \
                 metadata.ensureEvenDistributionOfPartitions cannot both be set",
            ));
        }
        if topic.is_none() && rules.limit_to_partitions_with_lag {
            return Err(invalid(
                "metadata.limitToPartitionsWithLag needs metadata.topic",
            ));
        }
        if topic.is_none() && rules.ensure_even_distribution {
            return Err(invalid(
                "metadata.ensureEvenDistributionOfPartitions needs metadata.topic",
            ));
        }
        // Without a topic KEDA ignores the limitation; so does Blink.
        let partition_limitation = match (&topic, params.get("partitionLimitation")) {
            (Some(_), Some(list)) => Some(parse_partition_list(list)?),
            _ => None,
        };

        match params.get("tls") {
            None | Some("disable") => {}
            Some("enable") => {
                return Err(TriggerError::Unsupported(
                    "tls: enable is not supported for kafka triggers: the scaler's Kafka \
                     client is built without TLS"
                        .to_owned(),
                ));
            }
            Some(_) => return Err(invalid("parameter tls must be enable or disable")),
        }
        let sasl_plain = match params.get("sasl").unwrap_or("none") {
            "none" => None,
            "plaintext" => {
                let username = params
                    .get("username")
                    .ok_or_else(|| invalid("sasl: plaintext needs a username parameter"))?;
                let password = params
                    .get("password")
                    .ok_or_else(|| invalid("sasl: plaintext needs a password parameter"))?;
                Some((username.to_owned(), Redacted(password.to_owned())))
            }
            mechanism @ ("scram_sha256" | "scram_sha512" | "oauthbearer" | "gssapi") => {
                return Err(TriggerError::Unsupported(format!(
                    "sasl: {mechanism} is not supported for kafka triggers (none, plaintext)"
                )));
            }
            other => {
                return Err(TriggerError::InvalidMetadata(format!(
                    "parameter sasl must be none, plaintext, scram_sha256, scram_sha512, \
                     oauthbearer or gssapi, not {other:?}"
                )));
            }
        };
        Ok(Self {
            bootstrap_servers,
            group,
            topic,
            partition_limitation,
            activation_lag_threshold,
            rules,
            sasl_plain,
        })
    }

    /// librdkafka settings for this trigger's client; the pool key in [`Connections`].
    pub fn client_config(&self) -> BTreeMap<String, String> {
        let mut config: BTreeMap<String, String> = [
            ("bootstrap.servers", self.bootstrap_servers.join(",")),
            ("group.id", self.group.clone()),
            ("client.id", "blink-scaler".to_owned()),
            ("enable.auto.commit", "false".to_owned()),
            // KEDA compares committed offsets with the high watermark; read_committed
            // would report the last stable offset instead.
            ("isolation.level", "read_uncommitted".to_owned()),
            ("allow.auto.create.topics", "false".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if let Some((username, password)) = &self.sasl_plain {
            config.insert("security.protocol".into(), "SASL_PLAINTEXT".into());
            config.insert("sasl.mechanism".into(), "PLAIN".into());
            config.insert("sasl.username".into(), username.clone());
            config.insert("sasl.password".into(), password.0.clone());
        }
        config
    }

    /// How the trigger is named in messages (no credentials).
    fn shown(&self) -> String {
        format!(
            "Kafka {} group {}{}",
            self.bootstrap_servers.join(","),
            self.group,
            self.topic
                .as_deref()
                .map(|t| format!(" topic {t}"))
                .unwrap_or_default()
        )
    }
}

/// `"0,2,5-7"` → {0, 2, 5, 6, 7}.
fn parse_partition_list(list: &str) -> Result<BTreeSet<i32>, TriggerError> {
    let bad = || {
        TriggerError::InvalidMetadata(format!(
            "metadata.partitionLimitation must list partition ids and ranges like \
             \"0,2,5-7\", not {list:?}"
        ))
    };
    let mut out = BTreeSet::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((from, to)) => {
                let from: i32 = from.trim().parse().map_err(|_| bad())?;
                let to: i32 = to.trim().parse().map_err(|_| bad())?;
                if from < 0 || to < from {
                    return Err(bad());
                }
                out.extend(from..=to);
            }
            None => {
                let id: i32 = part.parse().map_err(|_| bad())?;
                if id < 0 {
                    return Err(bad());
                }
                out.insert(id);
            }
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// One partition as read: the group's committed offset (`None`: never committed) and
/// the partition's latest offset (its high watermark).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub latest: i64,
}

/// A partition's lag: what the metric counts, and what activity counts (they differ
/// only for a persistent lag excluded by `excludePersistentLag`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub lag: i64,
    pub lag_with_persistent: i64,
}

impl PartitionLag {
    fn both(lag: i64) -> Self {
        Self {
            lag,
            lag_with_persistent: lag,
        }
    }
}

/// One partition's lag by KEDA's rule (see the module docs). `previous_committed` is
/// the committed offset seen at the previous read, for `excludePersistentLag`. Pure.
pub fn partition_lag(
    committed: Option<i64>,
    latest: i64,
    previous_committed: Option<i64>,
    rules: &LagRules,
) -> PartitionLag {
    let Some(committed) = committed else {
        if rules.scale_to_zero_on_invalid_offset {
            return PartitionLag::both(0);
        }
        return PartitionLag::both(match rules.offset_reset_policy {
            OffsetResetPolicy::Latest => 1,
            OffsetResetPolicy::Earliest => latest,
        });
    };
    let lag = latest - committed;
    if rules.exclude_persistent_lag && previous_committed == Some(committed) {
        return PartitionLag {
            lag: 0,
            lag_with_persistent: lag,
        };
    }
    PartitionLag::both(lag)
}

/// The metric and the activity lag of a trigger: the sums of the partitions' lags,
/// with KEDA's caps. Pure.
pub fn total_lag(lags: &[PartitionLag], rules: &LagRules) -> (i64, i64) {
    let mut total: i64 = lags.iter().map(|l| l.lag).sum();
    let with_persistent = lags.iter().map(|l| l.lag_with_persistent).sum();
    let partitions = i64::try_from(lags.len()).unwrap_or(i64::MAX);
    let threshold = rules.lag_threshold.max(1);
    if !rules.allow_idle_consumers
        || rules.limit_to_partitions_with_lag
        || rules.ensure_even_distribution
    {
        let mut upper = partitions;
        if rules.ensure_even_distribution {
            total = even_factor(total, partitions, threshold) * threshold;
        }
        if rules.limit_to_partitions_with_lag {
            upper = i64::try_from(lags.iter().filter(|l| l.lag > 0).count()).unwrap_or(i64::MAX);
        }
        // Integer division, as KEDA: a total within one threshold of the cap stays.
        if total / threshold > upper {
            total = upper.saturating_mul(threshold);
        }
    }
    (total, with_persistent)
}

/// The smallest factor of `partitions` whose replicas cover `total` at `threshold`
/// each (so partitions spread evenly over consumers), or `partitions`.
fn even_factor(total: i64, partitions: i64, threshold: i64) -> i64 {
    (1..=partitions)
        .filter(|f| partitions % f == 0)
        .find(|f| f.saturating_mul(threshold) >= total)
        .unwrap_or(partitions)
}

/// A built `kafka` trigger.
#[derive(Debug)]
pub struct KafkaTrigger {
    config: Arc<KafkaConfig>,
    client_config: Arc<BTreeMap<String, String>>,
    connections: Connections,
    /// Committed offsets at the previous read, for `excludePersistentLag`. A std lock:
    /// held only to copy or update the map, never across an `.await`.
    previous: Mutex<HashMap<(String, i32), i64>>,
}

impl KafkaTrigger {
    pub fn new(params: &TriggerParams, connections: &Connections) -> Result<Self, TriggerError> {
        let config = KafkaConfig::parse(params)?;
        Ok(Self {
            client_config: Arc::new(config.client_config()),
            config: Arc::new(config),
            connections: connections.clone(),
            previous: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Reads every partition's offsets, off the runtime (librdkafka blocks).
    async fn read(&self) -> Result<Vec<PartitionOffsets>, TriggerError> {
        let timeout = self.connections.read_timeout();
        let connections = self.connections.clone();
        let client_config = self.client_config.clone();
        let config = self.config.clone();
        let blocking = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + timeout;
            let client = connections.kafka(&client_config)?;
            let result = read_offsets(&client, &config, deadline);
            // Serve the client's queued events (errors, logs) so they do not pile up.
            let _ = client.poll(Duration::ZERO);
            result
        });
        match tokio::time::timeout(timeout + BLOCKING_GRACE, blocking).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(TriggerError::Unreachable(format!(
                "{}: the read failed: {join}",
                self.config.shown()
            ))),
            Err(_) => Err(TriggerError::Timeout(format!(
                "{}: no answer within {timeout:?}",
                self.config.shown()
            ))),
        }
    }

    fn lags(&self, offsets: &[PartitionOffsets]) -> Vec<PartitionLag> {
        let mut previous = self
            .previous
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let lags = offsets
            .iter()
            .map(|p| {
                let key = (p.topic.clone(), p.partition);
                partition_lag(
                    p.committed,
                    p.latest,
                    previous.get(&key).copied(),
                    &self.config.rules,
                )
            })
            .collect();
        if self.config.rules.exclude_persistent_lag {
            previous.clear();
            for p in offsets {
                if let Some(committed) = p.committed {
                    previous.insert((p.topic.clone(), p.partition), committed);
                }
            }
        }
        lags
    }
}

impl PullTrigger for KafkaTrigger {
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, TriggerError>> {
        async move {
            let offsets = self.read().await?;
            let lags = self.lags(&offsets);
            let (total, with_persistent) = total_lag(&lags, &self.config.rules);
            Ok(Measurement::new(
                total as f64,
                self.config.rules.lag_threshold as f64,
                self.config.activation_lag_threshold as f64,
            )
            .with_active(with_persistent > self.config.activation_lag_threshold))
        }
        .boxed()
    }
}

/// The time left until `deadline`, or a timeout error.
fn remaining(deadline: Instant, config: &KafkaConfig) -> Result<Duration, TriggerError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(TriggerError::Timeout(format!(
            "{}: no answer within the read timeout",
            config.shown()
        )));
    }
    Ok(left)
}

fn kafka_error(config: &KafkaConfig, what: &str, e: &KafkaError) -> TriggerError {
    let msg = format!("{}: {what}: {e}", config.shown());
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::MessageTimedOut,
        ) => TriggerError::Timeout(msg),
        _ => TriggerError::Unreachable(msg),
    }
}

/// The group's committed offsets and the latest offsets of the partitions it reads:
/// the topic's (limited to `partitionLimitation`), or without a topic those of every
/// topic where the group has committed. Blocking; each call bounded by `deadline`.
fn read_offsets(
    client: &BaseConsumer,
    config: &KafkaConfig,
    deadline: Instant,
) -> Result<Vec<PartitionOffsets>, TriggerError> {
    let metadata = client
        .fetch_metadata(config.topic.as_deref(), remaining(deadline, config)?)
        .map_err(|e| kafka_error(config, "reading metadata", &e))?;
    let mut partitions = TopicPartitionList::new();
    for topic in metadata.topics() {
        match &config.topic {
            Some(wanted) if topic.name() != wanted => continue,
            Some(_) => {}
            // Kafka's own topics (`__consumer_offsets`, …) are never a group's input.
            None if topic.name().starts_with("__") => continue,
            None => {}
        }
        if let Some(err) = topic.error() {
            return Err(TriggerError::Unreachable(format!(
                "{}: topic {}: {}",
                config.shown(),
                topic.name(),
                RDKafkaErrorCode::from(err)
            )));
        }
        for p in topic.partitions() {
            let limited = config
                .partition_limitation
                .as_ref()
                .is_some_and(|ids| !ids.contains(&p.id()));
            if !limited {
                partitions.add_partition(topic.name(), p.id());
            }
        }
    }
    if let Some(topic) = &config.topic
        && partitions.count() == 0
    {
        return Err(TriggerError::Unreachable(format!(
            "{}: topic {topic} has no partitions{}",
            config.shown(),
            if config.partition_limitation.is_some() {
                " matching partitionLimitation"
            } else {
                " (does it exist?)"
            }
        )));
    }
    if partitions.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = client
        .committed_offsets(partitions, remaining(deadline, config)?)
        .map_err(|e| kafka_error(config, "reading committed offsets", &e))?;
    let mut rows: Vec<(String, i32, Option<i64>)> = Vec::new();
    for element in committed.elements() {
        element
            .error()
            .map_err(|e| kafka_error(config, "reading a committed offset", &e))?;
        let offset = match element.offset() {
            Offset::Offset(n) if n >= 0 => Some(n),
            _ => None,
        };
        rows.push((element.topic().to_owned(), element.partition(), offset));
    }
    if config.topic.is_none() {
        // KEDA reads the topics the group has committed offsets for.
        let topics: BTreeSet<String> = rows
            .iter()
            .filter(|(_, _, offset)| offset.is_some())
            .map(|(topic, _, _)| topic.clone())
            .collect();
        rows.retain(|(topic, _, _)| topics.contains(topic));
        if rows.is_empty() {
            return Ok(Vec::new());
        }
    }
    // A list-offsets request for timestamp -1 (`Offset::End`) answers each partition's
    // high watermark, for all partitions at once.
    let mut latest_query = TopicPartitionList::new();
    for (topic, partition, _) in &rows {
        latest_query
            .add_partition_offset(topic, *partition, Offset::End)
            .map_err(|e| kafka_error(config, "preparing the latest-offset query", &e))?;
    }
    let latest = client
        .offsets_for_times(latest_query, remaining(deadline, config)?)
        .map_err(|e| kafka_error(config, "reading latest offsets", &e))?;
    let mut latest_by_partition = HashMap::new();
    for element in latest.elements() {
        element
            .error()
            .map_err(|e| kafka_error(config, "reading a latest offset", &e))?;
        if let Offset::Offset(n) = element.offset() {
            latest_by_partition.insert((element.topic().to_owned(), element.partition()), n);
        }
    }
    rows.into_iter()
        .map(|(topic, partition, committed)| {
            let latest = latest_by_partition
                .get(&(topic.clone(), partition))
                .copied()
                .ok_or_else(|| {
                    TriggerError::Unreachable(format!(
                        "{}: no latest offset for {topic}/{partition}",
                        config.shown()
                    ))
                })?;
            Ok(PartitionOffsets {
                topic,
                partition,
                committed,
                latest,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> TriggerParams {
        TriggerParams::from_metadata(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    const BASE: [(&str, &str); 3] = [
        ("bootstrapServers", "k1:9092, k2:9092"),
        ("consumerGroup", "g"),
        ("topic", "events"),
    ];

    fn parse(extra: &[(&str, &str)]) -> Result<KafkaConfig, TriggerError> {
        let mut pairs = BASE.to_vec();
        pairs.extend_from_slice(extra);
        KafkaConfig::parse(&params(&pairs))
    }

    fn rules() -> LagRules {
        LagRules {
            lag_threshold: 10,
            offset_reset_policy: OffsetResetPolicy::Latest,
            allow_idle_consumers: false,
            scale_to_zero_on_invalid_offset: false,
            exclude_persistent_lag: false,
            limit_to_partitions_with_lag: false,
            ensure_even_distribution: false,
        }
    }

    #[test]
    fn defaults_are_keda_s() {
        let c = parse(&[]).expect("valid");
        assert_eq!(c.bootstrap_servers, vec!["k1:9092", "k2:9092"]);
        assert_eq!(c.group, "g");
        assert_eq!(c.topic.as_deref(), Some("events"));
        assert_eq!(c.rules, rules());
        assert_eq!(c.activation_lag_threshold, 0);
        assert_eq!(c.partition_limitation, None);
        assert_eq!(c.sasl_plain, None);
        let config = c.client_config();
        assert_eq!(config["bootstrap.servers"], "k1:9092,k2:9092");
        assert_eq!(config["group.id"], "g");
    }

    #[test]
    fn settings_parse() {
        let c = parse(&[
            ("lagThreshold", "5"),
            ("activationLagThreshold", "2"),
            ("offsetResetPolicy", "earliest"),
            ("allowIdleConsumers", "true"),
            ("scaleToZeroOnInvalidOffset", "1"),
            ("excludePersistentLag", "true"),
            ("partitionLimitation", "0, 2,5-7"),
            ("version", "2.8.0"),
        ])
        .expect("valid");
        assert_eq!(c.rules.lag_threshold, 5);
        assert_eq!(c.activation_lag_threshold, 2);
        assert_eq!(c.rules.offset_reset_policy, OffsetResetPolicy::Earliest);
        assert!(c.rules.allow_idle_consumers);
        assert!(c.rules.scale_to_zero_on_invalid_offset);
        assert!(c.rules.exclude_persistent_lag);
        assert_eq!(c.partition_limitation, Some([0, 2, 5, 6, 7].into()));

        let no_topic = KafkaConfig::parse(&params(&[
            ("bootstrapServers", "k:9092"),
            ("consumerGroup", "g"),
            ("partitionLimitation", "1"),
        ]))
        .expect("valid");
        assert_eq!(no_topic.topic, None);
        assert_eq!(
            no_topic.partition_limitation, None,
            "ignored without a topic"
        );
    }

    #[test]
    fn bad_metadata_names_the_key() {
        for (extra, key) in [
            (vec![("lagThreshold", "ten")], "lagThreshold"),
            (vec![("lagThreshold", "0")], "lagThreshold"),
            (vec![("lagThreshold", "1.5")], "lagThreshold"),
            (
                vec![("activationLagThreshold", "-1")],
                "activationLagThreshold",
            ),
            (
                vec![("activationLagThreshold", "x")],
                "activationLagThreshold",
            ),
            (vec![("offsetResetPolicy", "newest")], "offsetResetPolicy"),
            (vec![("allowIdleConsumers", "yes")], "allowIdleConsumers"),
            (
                vec![("scaleToZeroOnInvalidOffset", "2")],
                "scaleToZeroOnInvalidOffset",
            ),
            (vec![("partitionLimitation", "a,b")], "partitionLimitation"),
            (vec![("partitionLimitation", "5-2")], "partitionLimitation"),
            (
                vec![
                    ("allowIdleConsumers", "true"),
                    ("limitToPartitionsWithLag", "true"),
                ],
                "limitToPartitionsWithLag",
            ),
            (
                vec![
                    ("limitToPartitionsWithLag", "true"),
                    ("ensureEvenDistributionOfPartitions", "true"),
                ],
                "ensureEvenDistributionOfPartitions",
            ),
            (vec![("sasl", "plaintext"), ("username", "u")], "password"),
            (vec![("sasl", "kerberos")], "sasl"),
        ] {
            let err = parse(&extra).expect_err(key);
            assert!(
                matches!(err, TriggerError::InvalidMetadata(_)),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        for (pairs, key) in [
            (vec![("consumerGroup", "g")], "bootstrapServers"),
            (vec![("bootstrapServers", "k:1")], "consumerGroup"),
            (
                vec![
                    ("bootstrapServers", "k:1"),
                    ("consumerGroup", "g"),
                    ("limitToPartitionsWithLag", "true"),
                ],
                "topic",
            ),
        ] {
            let err = KafkaConfig::parse(&params(&pairs)).expect_err(key);
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        for (extra, key) in [
            (vec![("tls", "enable")], "tls"),
            (vec![("sasl", "scram_sha512")], "scram_sha512"),
        ] {
            let err = parse(&extra).expect_err(key);
            assert!(
                matches!(err, TriggerError::Unsupported(_)),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn sasl_plain_credentials_stay_out_of_debug() {
        let c = KafkaConfig::parse(&TriggerParams::new(
            BASE.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            [
                ("sasl", "plaintext"),
                ("username", "svc"),
                ("password", "hunter2"),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
            BTreeMap::new(),
        ))
        .expect("valid");
        assert!(!format!("{c:?}").contains("hunter2"));
        let config = c.client_config();
        assert_eq!(config["security.protocol"], "SASL_PLAINTEXT");
        assert_eq!(config["sasl.password"], "hunter2");
    }

    #[test]
    fn partition_lag_table() {
        let r = rules();
        let with = |f: fn(&mut LagRules)| {
            let mut r = rules();
            f(&mut r);
            r
        };
        let earliest = with(|r| r.offset_reset_policy = OffsetResetPolicy::Earliest);
        let to_zero = with(|r| r.scale_to_zero_on_invalid_offset = true);
        let earliest_to_zero = with(|r| {
            r.offset_reset_policy = OffsetResetPolicy::Earliest;
            r.scale_to_zero_on_invalid_offset = true;
        });
        let persistent = with(|r| r.exclude_persistent_lag = true);
        // (committed, latest, previous, rules) → (lag, lag_with_persistent)
        // (committed, latest, previous, rules) → (lag, lag_with_persistent)
        type Row<'a> = (Option<i64>, i64, Option<i64>, &'a LagRules, (i64, i64));
        let table: [Row<'_>; 11] = [
            (Some(5), 20, None, &r, (15, 15)),
            (Some(20), 20, None, &r, (0, 0)),
            (None, 20, None, &r, (1, 1)),
            (None, 0, None, &r, (1, 1)),
            (None, 20, None, &to_zero, (0, 0)),
            (None, 20, None, &earliest, (20, 20)),
            (None, 20, None, &earliest_to_zero, (0, 0)),
            (Some(5), 20, None, &persistent, (15, 15)),
            (Some(5), 20, Some(5), &persistent, (0, 15)),
            (Some(6), 20, Some(5), &persistent, (14, 14)),
            (Some(5), 20, Some(5), &r, (15, 15)),
        ];
        for (committed, latest, previous, rules, want) in table {
            let got = partition_lag(committed, latest, previous, rules);
            assert_eq!(
                (got.lag, got.lag_with_persistent),
                want,
                "{committed:?} {latest} {previous:?} {rules:?}"
            );
        }
    }

    #[test]
    fn total_lag_table() {
        let lags = |values: &[i64]| {
            values
                .iter()
                .map(|v| PartitionLag::both(*v))
                .collect::<Vec<_>>()
        };
        let with = |f: fn(&mut LagRules)| {
            let mut r = rules();
            f(&mut r);
            r
        };
        let r = rules();
        let idle = with(|r| r.allow_idle_consumers = true);
        let limit = with(|r| r.limit_to_partitions_with_lag = true);
        let even = with(|r| r.ensure_even_distribution = true);
        let even_idle = with(|r| {
            r.ensure_even_distribution = true;
            r.allow_idle_consumers = true;
        });
        let table: [(Vec<PartitionLag>, &LagRules, i64); 13] = [
            // 3 partitions, 50 messages: capped at 3 × 10.
            (lags(&[20, 20, 10]), &r, 30),
            (lags(&[20, 20, 10]), &idle, 50),
            // Under the cap: unchanged.
            (lags(&[5, 5, 5]), &r, 15),
            // Integer division: 39 / 10 = 3, not above 3 partitions, so it stays.
            (lags(&[13, 13, 13]), &r, 39),
            (lags(&[14, 13, 13]), &r, 30),
            (lags(&[30, 30, 30]), &r, 30),
            // Only one partition has lag: the cap is 1 × 10.
            (lags(&[50, 0, 0]), &limit, 10),
            (lags(&[5, 0, 0]), &limit, 5),
            // 6 partitions, factors 1,2,3,6: 25 lag needs 3 → 30.
            (lags(&[25, 0, 0, 0, 0, 0]), &even, 30),
            (lags(&[0, 0, 0, 0, 0, 0]), &even, 10),
            (lags(&[100, 0, 0, 0, 0, 0]), &even_idle, 60),
            (lags(&[]), &r, 0),
            (lags(&[1, 1, 1]), &r, 3),
        ];
        for (i, (lags, rules, want)) in table.iter().enumerate() {
            assert_eq!(total_lag(lags, rules).0, *want, "row {i}");
        }
        let persistent = [
            PartitionLag {
                lag: 0,
                lag_with_persistent: 15,
            },
            PartitionLag::both(3),
        ];
        assert_eq!(total_lag(&persistent, &r), (3, 18));
    }

    #[test]
    fn even_factors() {
        assert_eq!(even_factor(0, 6, 10), 1);
        assert_eq!(even_factor(11, 6, 10), 2);
        assert_eq!(even_factor(21, 6, 10), 3);
        assert_eq!(even_factor(31, 6, 10), 6);
        assert_eq!(even_factor(1000, 6, 10), 6);
        assert_eq!(even_factor(15, 7, 10), 7);
    }

    #[test]
    fn persistent_lag_needs_two_reads() {
        let trigger = KafkaTrigger::new(
            &params(&[
                ("bootstrapServers", "k:1"),
                ("consumerGroup", "g"),
                ("topic", "t"),
                ("excludePersistentLag", "true"),
            ]),
            &Connections::default(),
        )
        .expect("valid");
        let read = |committed| {
            vec![PartitionOffsets {
                topic: "t".into(),
                partition: 0,
                committed: Some(committed),
                latest: 100,
            }]
        };
        assert_eq!(trigger.lags(&read(40))[0].lag, 60, "first read counts");
        assert_eq!(
            trigger.lags(&read(40))[0],
            PartitionLag {
                lag: 0,
                lag_with_persistent: 60
            }
        );
        assert_eq!(trigger.lags(&read(41))[0].lag, 59, "moving again counts");
    }
}
