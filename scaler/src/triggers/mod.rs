//! Pull triggers (`rabbitmq`, `kafka`, `prometheus`, `cron`): KEDA's metadata names and
//! meanings, one measurement per poll. (Module docs go here.)

use std::fmt;

use futures::future::BoxFuture;

/// One poll of a pull trigger, in KEDA's terms: the decision computes the desire as
/// `ceil(value / target)` and calls the trigger active when `value > activation`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measurement {
    pub value: f64,
    pub target: f64,
    pub activation: f64,
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
            Self::Unreachable(_) => "TriggerSourceUnreachable",
            Self::Timeout(_) => "TriggerSourceTimeout",
        }
    }
}

/// A built pull trigger: cheap to poll, connections shared through [`Connections`].
pub trait PullTrigger: Send + Sync + fmt::Debug {
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, TriggerError>>;
}
