//! Pull triggers (`rabbitmq`, `kafka`, `prometheus`, `cron`): KEDA's metadata names and
//! meanings, one [`Measurement`] per poll.
//!
//! The path from a `spec.triggers` entry to a number:
//! 1. [`params::resolve`] merges the trigger's `metadata` with what its
//!    `authenticationRef` and KEDA's `…FromEnv` keys point at (Secrets, ConfigMaps, the
//!    scale target's container env) into [`TriggerParams`], whose `Debug` shows keys
//!    only.
//! 2. [`build`] parses the parameters for the trigger's type (every metadata error is
//!    found here, before any I/O) and returns a [`PullTrigger`] that reads its source
//!    through the process-wide [`Connections`].
//! 3. The caller polls [`PullTrigger::measure`] every `pollingInterval`. Each read is
//!    bounded by a timeout, so a slow source fails only its own trigger.
//!
//! Nothing here writes a secret into an error, a log line or a `Debug` output:
//! URLs are shown without their password, and resolved parameters never print values.

pub mod connections;
pub mod cron;
pub mod kafka;
pub mod params;
pub mod prometheus;
pub mod rabbitmq;

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;

pub use connections::Connections;
pub use params::{TriggerParams, resolve};

/// One poll of a pull trigger, in KEDA's terms: the decision computes the desire as
/// `ceil(value / target)`.
///
/// `active` is the trigger's own verdict. It equals `value > activation` (what
/// [`Measurement::new`] sets) except where KEDA's scaler decides activity from more
/// than the metric: RabbitMQ's `MessageRate` mode is also active while messages wait,
/// Kafka's `excludePersistentLag` leaves stuck partitions out of the metric but not
/// out of activity, and a cron window is active even with `desiredReplicas: 0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measurement {
    pub value: f64,
    pub target: f64,
    pub activation: f64,
    pub active: bool,
}

impl Measurement {
    /// A measurement that is active when `value > activation`.
    pub fn new(value: f64, target: f64, activation: f64) -> Self {
        Self {
            value,
            target,
            activation,
            active: value > activation,
        }
    }

    /// The same metric with activity decided by the trigger.
    pub fn with_active(self, active: bool) -> Self {
        Self { active, ..self }
    }
}

/// Why a trigger could not be built or read. `reason()` is the condition reason
/// (CamelCase) and `Display` the message: neither ever contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// Metadata missing or malformed (a bad number, an unknown mode).
    #[error("{0}")]
    InvalidMetadata(String),
    /// A `TriggerAuthentication`, Secret, ConfigMap or env var could not be read.
    #[error("{0}")]
    Authentication(String),
    /// A KEDA setting that Blink does not implement (an authentication source such as
    /// `podIdentity`, TLS client certificates, …): refused, never silently ignored,
    /// because it changes what is read.
    #[error("{0}")]
    Unsupported(String),
    /// The source could not be reached or answered with an error.
    #[error("{0}")]
    Unreachable(String),
    /// The source did not answer within the read timeout.
    #[error("{0}")]
    Timeout(String),
}

impl TriggerError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidMetadata(_) => "InvalidTriggerMetadata",
            Self::Authentication(_) => "TriggerAuthenticationFailed",
            Self::Unsupported(_) => "UnsupportedTriggerSetting",
            Self::Unreachable(_) => "TriggerSourceUnreachable",
            Self::Timeout(_) => "TriggerSourceTimeout",
        }
    }

    /// Whether retrying the same configuration can succeed: a source that is down or
    /// slow, or a Secret that may yet be created. Metadata errors and unsupported
    /// settings need a change to the object.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_) | Self::Timeout(_) | Self::Authentication(_)
        )
    }
}

/// An error and its sources on one line (`error sending request: tcp connect error:
/// Connection refused`): the top-level message of an HTTP error alone says little.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some errors repeat their source's text in their own; say it once.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A built pull trigger: cheap to poll, connections shared through [`Connections`].
pub trait PullTrigger: Send + Sync + fmt::Debug {
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, TriggerError>>;
}

/// Builds the pull trigger of type `trigger_type` from resolved parameters. All
/// metadata is checked here, so a bad object fails before any connection is made;
/// no I/O happens until the first [`PullTrigger::measure`].
pub fn build(
    trigger_type: &str,
    params: &TriggerParams,
    connections: &Connections,
) -> Result<Arc<dyn PullTrigger>, TriggerError> {
    Ok(match trigger_type {
        "rabbitmq" => Arc::new(rabbitmq::RabbitMqTrigger::new(params, connections)?),
        "kafka" => Arc::new(kafka::KafkaTrigger::new(params, connections)?),
        "prometheus" => Arc::new(prometheus::PrometheusTrigger::new(params, connections)?),
        "cron" => Arc::new(cron::CronTrigger::new(params)?),
        other => {
            return Err(TriggerError::Unsupported(format!(
                "trigger type {other:?} is not a pull trigger Blink implements \
                 (rabbitmq, kafka, prometheus, cron)"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurement_is_active_above_activation() {
        assert!(Measurement::new(1.0, 10.0, 0.0).active);
        assert!(!Measurement::new(0.0, 10.0, 0.0).active);
        assert!(!Measurement::new(5.0, 10.0, 5.0).active);
        assert!(Measurement::new(0.0, 1.0, 0.0).with_active(true).active);
    }

    #[test]
    fn reasons_are_camel_case_and_distinct() {
        let errors = [
            TriggerError::InvalidMetadata(String::new()),
            TriggerError::Authentication(String::new()),
            TriggerError::Unsupported(String::new()),
            TriggerError::Unreachable(String::new()),
            TriggerError::Timeout(String::new()),
        ];
        let reasons: std::collections::BTreeSet<_> = errors.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons.len(), errors.len());
        for reason in reasons {
            assert!(reason.chars().all(|c| c.is_ascii_alphabetic()));
            assert!(reason.starts_with(|c: char| c.is_ascii_uppercase()));
        }
    }

    #[test]
    fn error_chains_read_as_one_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("tcp connect error"));
        assert_eq!(error_chain(&e), "error sending request: tcp connect error");
    }

    #[test]
    fn unknown_type_is_refused_by_name() {
        let params = TriggerParams::from_metadata(Default::default());
        let err = build("aws-sqs-queue", &params, &Connections::default())
            .expect_err("not a pull trigger");
        assert!(matches!(err, TriggerError::Unsupported(_)));
        assert!(err.to_string().contains("aws-sqs-queue"));
    }
}
