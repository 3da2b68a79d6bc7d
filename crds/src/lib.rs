//! Blink's API: the `blink.sh/v1alpha1` custom resources and the demand protocol's
//! messages, shared by the scaler and the activator so nothing is defined twice.
//!
//! - [`scaled_object`]: the `ScaledObject` spec (KEDA v2.20's, plus Blink's own knobs
//!   under `advanced`) and the defaults Blink applies to it.
//! - [`trigger`]: one entry of `spec.triggers`, and the schema rules that check each
//!   trigger type's required metadata.
//! - [`status`]: the `ScaledObject` status and its conditions.
//! - [`auth`]: `TriggerAuthentication` and `ClusterTriggerAuthentication`.
//! - [`demand`]: the activator → scaler messages (snapshots, pokes, function keys).
//! - [`routing`]: what an `http` trigger claims on the activator, and who keeps a claim
//!   two objects want.
//! - [`listing`]: what a watch's latest list held, so what it left out can go.
//! - [`all_crds`] / [`crds_yaml`]: the CustomResourceDefinitions as installed; the
//!   `crdgen` binary prints them and a test keeps the committed YAML equal to them.
//!   Install these, not the derive's `ScaledObject::crd()`, which still marks optional
//!   properties `nullable` (see [`all_crds`] for why Blink's are not).
//!
//! The KEDA compatibility contract (every property of KEDA's specs exists here with a
//! compatible type; KEDA objects survive a serde round trip unchanged) is checked by
//! the tests in `crds/tests/`.
#![forbid(unsafe_code)]

pub mod auth;
mod crdgen;
pub mod demand;
pub mod duration;
pub mod listing;
pub mod routing;
pub mod scaled_object;
pub mod status;
pub mod trigger;

pub use auth::{ClusterTriggerAuthentication, TriggerAuthentication, TriggerAuthenticationSpec};
pub use crdgen::{all_crds, crds_yaml};
pub use demand::{FunctionDemand, FunctionKey, FunctionKeyError, Poke, Snapshot};
pub use scaled_object::{ScaledObject, ScaledObjectSpec};
pub use status::{Condition, ScaledObjectStatus};
pub use trigger::{ScaleTrigger, TriggerType};

/// The API group of every Blink resource.
pub const GROUP: &str = "blink.sh";
/// The version of every Blink resource.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every Blink resource.
pub const API_VERSION: &str = "blink.sh/v1alpha1";
