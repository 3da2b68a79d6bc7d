//! One entry of a `ScaledObject`'s `spec.triggers` (KEDA's `ScaleTriggers`), the trigger
//! types Blink implements, and the schema rules that check each type's metadata.
//!
//! `type` is a free string: a trigger type Blink does not implement must still be
//! accepted by the API server, so the scaler can report it (`Ready=False`, reason
//! `UnsupportedTrigger`) instead of the user meeting a schema error that hides which
//! type is missing. `metadata` is a string → string map, as in KEDA.
//!
//! The CEL rules on a trigger require what KEDA's scalers require, so a broken object
//! is refused at `kubectl apply` with a message naming the key, not later in a
//! condition. A key that `authenticationRef` (a `secretTargetRef`, say) or a KEDA
//! `…FromEnv` key (the target container's env) can supply is not required in
//! `metadata` when that source is given; the scaler checks the source itself. A
//! required key must be present and non-empty (KEDA treats an empty value as missing).
//!
//! - `rabbitmq`: `queueName`; `host` unless `hostFromEnv` or `authenticationRef`.
//! - `kafka`: `bootstrapServers` unless `bootstrapServersFromEnv` or
//!   `authenticationRef`; `consumerGroup` unless `consumerGroupFromEnv`. `topic` is
//!   optional, as in KEDA (all topics of the group).
//! - `prometheus`: `serverAddress` unless `authenticationRef`; `query`; `threshold`.
//! - `cron`: `timezone`, `start`, `end`, `desiredReplicas`.
//! - `http` (Blink's own): nothing is required — the Service and port may come from
//!   the `blink.sh/service` / `blink.sh/port` annotations or default to the workload's
//!   name, and hosts and path prefixes are optional routes. `targetConcurrency`, when
//!   present, must be a positive integer (at most nine digits).
//!
//! The rules touch `type` (at most 253 characters), `metadata` (at most 64 keys, values
//! at most 4096 characters) and run once per trigger (at most 32): those bounds keep
//! the API server's estimate of the rules' cost within its budget. Metadata values are
//! read by index (`self.metadata['key']`), not by field selection
//! (`self.metadata.key`): the API server's cost estimator applies the values'
//! `maxLength` only to the former, and estimated the `matches` rule at over 100 times
//! its budget with the latter.

use std::collections::BTreeMap;

use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A trigger: what drives scaling, and how to read it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new(
        "self.type != 'rabbitmq' || ('queueName' in self.metadata && self.metadata['queueName'] != '')"
    ).message("rabbitmq trigger requires metadata.queueName")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'rabbitmq' || has(self.authenticationRef) || ('host' in self.metadata && self.metadata['host'] != '') || ('hostFromEnv' in self.metadata && self.metadata['hostFromEnv'] != '')"
    ).message("rabbitmq trigger requires metadata.host, metadata.hostFromEnv or an authenticationRef that supplies host")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'kafka' || has(self.authenticationRef) || ('bootstrapServers' in self.metadata && self.metadata['bootstrapServers'] != '') || ('bootstrapServersFromEnv' in self.metadata && self.metadata['bootstrapServersFromEnv'] != '')"
    ).message("kafka trigger requires metadata.bootstrapServers, metadata.bootstrapServersFromEnv or an authenticationRef that supplies bootstrapServers")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'kafka' || ('consumerGroup' in self.metadata && self.metadata['consumerGroup'] != '') || ('consumerGroupFromEnv' in self.metadata && self.metadata['consumerGroupFromEnv'] != '')"
    ).message("kafka trigger requires metadata.consumerGroup or metadata.consumerGroupFromEnv")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'prometheus' || has(self.authenticationRef) || ('serverAddress' in self.metadata && self.metadata['serverAddress'] != '')"
    ).message("prometheus trigger requires metadata.serverAddress or an authenticationRef that supplies serverAddress")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'prometheus' || ('query' in self.metadata && self.metadata['query'] != '')"
    ).message("prometheus trigger requires metadata.query")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'prometheus' || ('threshold' in self.metadata && self.metadata['threshold'] != '')"
    ).message("prometheus trigger requires metadata.threshold")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'cron' || ('timezone' in self.metadata && self.metadata['timezone'] != '')"
    ).message("cron trigger requires metadata.timezone")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'cron' || ('start' in self.metadata && self.metadata['start'] != '')"
    ).message("cron trigger requires metadata.start")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'cron' || ('end' in self.metadata && self.metadata['end'] != '')"
    ).message("cron trigger requires metadata.end")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'cron' || ('desiredReplicas' in self.metadata && self.metadata['desiredReplicas'] != '')"
    ).message("cron trigger requires metadata.desiredReplicas")
        .field_path(".metadata").reason(Reason::FieldValueRequired),
    validation = Rule::new(
        "self.type != 'http' || !('targetConcurrency' in self.metadata) || self.metadata['targetConcurrency'].matches('^[1-9][0-9]{0,8}$')"
    ).message("http trigger metadata.targetConcurrency must be a positive integer")
        .field_path(".metadata.targetConcurrency"),
)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTrigger {
    /// The trigger type: `http`, `rabbitmq`, `kafka`, `prometheus` or `cron` in Blink;
    /// any other (KEDA) type is accepted here and reported as unsupported.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 253))]
    pub trigger_type: String,

    /// A name for the trigger, unique within the object (used in metric names,
    /// conditions and `scalingModifiers` formulas).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,

    /// KEDA's metrics cache switch; harmless and ignored by Blink, which reads each
    /// trigger once per decision anyway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_cached_metrics: Option<bool>,

    /// The trigger's parameters, by KEDA's key names.
    #[schemars(schema_with = "metadata_schema")]
    pub metadata: BTreeMap<String, String>,

    /// Where to read credentials and other parameters from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication_ref: Option<AuthenticationRef>,

    /// How the metric is compared with its target: `AverageValue` (the default:
    /// divided by replicas) or `Value`. A free string, as in KEDA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric_type: Option<String>,
}

/// Most keys in a trigger's `metadata` (a bound for the rules' cost).
pub const MAX_METADATA_KEYS: u32 = 64;
/// Longest value in a trigger's `metadata` (a bound for the rules' cost).
pub const MAX_METADATA_VALUE_LEN: u32 = 4096;

/// `additionalProperties: {type: string}` with the bounds the CEL rules need; written
/// by hand because schemars has no attribute for `maxProperties` or for a bound on a
/// map's values.
fn metadata_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "description": "The trigger's parameters, by KEDA's key names.",
        "maxProperties": MAX_METADATA_KEYS,
        "additionalProperties": {
            "type": "string",
            "maxLength": MAX_METADATA_VALUE_LEN,
        },
    })
}

/// Points at the `TriggerAuthentication` (in the object's namespace) or
/// `ClusterTriggerAuthentication` that supplies a trigger's parameters.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationRef {
    /// Kind of the referenced object (default `TriggerAuthentication`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<AuthenticationRefKind>,
    /// Name of the referenced object.
    pub name: String,
}

impl AuthenticationRef {
    /// `kind`, or `TriggerAuthentication` when absent (KEDA's default).
    pub fn kind(&self) -> AuthenticationRefKind {
        self.kind
            .unwrap_or(AuthenticationRefKind::TriggerAuthentication)
    }
}

/// Kind of the object an `authenticationRef` points at (default
/// `TriggerAuthentication`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AuthenticationRefKind {
    /// A `TriggerAuthentication` in the object's namespace.
    TriggerAuthentication,
    /// A cluster-scoped `ClusterTriggerAuthentication`.
    ClusterTriggerAuthentication,
}

/// The trigger types Blink implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TriggerType {
    /// Requests through the activator (Blink's own).
    Http,
    /// Messages in a RabbitMQ queue.
    Rabbitmq,
    /// Consumer-group lag on a Kafka topic.
    Kafka,
    /// The value of a Prometheus query.
    Prometheus,
    /// A schedule.
    Cron,
}

impl TriggerType {
    /// Every type Blink implements.
    pub const ALL: [TriggerType; 5] = [
        TriggerType::Http,
        TriggerType::Rabbitmq,
        TriggerType::Kafka,
        TriggerType::Prometheus,
        TriggerType::Cron,
    ];

    /// The `type` string of this trigger type.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerType::Http => "http",
            TriggerType::Rabbitmq => "rabbitmq",
            TriggerType::Kafka => "kafka",
            TriggerType::Prometheus => "prometheus",
            TriggerType::Cron => "cron",
        }
    }

    /// The implemented type named `name` (case-sensitive, as KEDA), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl std::fmt::Display for TriggerType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ScaleTrigger {
    /// The trigger's type if Blink implements it; `None` means "unsupported".
    pub fn known_type(&self) -> Option<TriggerType> {
        TriggerType::from_name(&self.trigger_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_types_round_trip_their_names() {
        for t in TriggerType::ALL {
            assert_eq!(TriggerType::from_name(t.as_str()), Some(t));
            assert_eq!(t.to_string(), t.as_str());
        }
        assert_eq!(TriggerType::from_name("aws-sqs-queue"), None);
        assert_eq!(
            TriggerType::from_name("HTTP"),
            None,
            "case-sensitive, as KEDA"
        );
    }

    #[test]
    fn unknown_trigger_type_deserializes() {
        let t: ScaleTrigger =
            serde_yaml::from_str("{type: aws-sqs-queue, metadata: {queueURL: q}}").expect("valid");
        assert_eq!(t.known_type(), None);
        assert_eq!(t.trigger_type, "aws-sqs-queue");
    }

    #[test]
    fn authentication_ref_kind_defaults_to_namespaced() {
        let r: AuthenticationRef = serde_yaml::from_str("{name: a}").expect("valid");
        assert_eq!(r.kind(), AuthenticationRefKind::TriggerAuthentication);
        let r: AuthenticationRef =
            serde_yaml::from_str("{name: a, kind: ClusterTriggerAuthentication}").expect("valid");
        assert_eq!(
            r.kind(),
            AuthenticationRefKind::ClusterTriggerAuthentication
        );
    }
}
