//! The decision: how many replicas a function should have now. Pure code, no I/O.
//!
//! (Module docs restating DESIGN.md's ordered pipeline go here.)

use std::time::{Duration, Instant};

/// What the object's spec says about scaling, with Blink's defaults applied.
/// Built once per spec change (`Policy::from_spec`), reused on every decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub min: i32,
    pub max: i32,
    pub idle: Option<i32>,
    pub cooldown: Duration,
    pub initial_cooldown: Duration,
    pub stable_window: Duration,
    pub panic_window_percentage: f64,
    pub panic_threshold_percentage: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub fallback: Option<blink_crds::scaled_object::Fallback>,
    /// One per `spec.triggers` entry, same order as `Input::triggers`.
    pub triggers: Vec<TriggerPolicy>,
    /// Transparent mode with only `http` triggers: never idles after its first wake.
    pub transparent_http_only: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TriggerPolicy {
    /// `triggers[].name`, else the type; used in reasons and metrics.
    pub name: String,
    /// `metricType: Value` uses the HPA's `ceil(current × metric / target)`.
    pub value_metric: bool,
}

/// One trigger's observation for this decision, in `Policy::triggers` order.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    /// A pull trigger's metric (KEDA's meaning): active when `value > activation`.
    Metric { value: f64, target: f64, activation: f64 },
    /// The `http` trigger: this tick's concurrency sample (`inFlight + queued` summed
    /// over activators) and whether the demand protocol calls it active.
    Http { concurrency: f64, target: f64, active: bool },
    /// The read failed (timeout, unreachable, bad answer).
    Failed,
}

/// `blink.sh/paused-replicas: N` → `At(N)`; `blink.sh/paused: "true"` → `Hold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paused {
    At(i32),
    Hold,
}

/// Everything a decision reads besides the policy and its own memory.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub now: Instant,
    /// The target's `/scale` `spec.replicas`.
    pub current: i32,
    /// Ready replicas (the target's `/scale` `status.replicas` or ready endpoints).
    pub ready: i32,
    pub paused: Option<Paused>,
    pub conflict: bool,
    pub stalled: bool,
    pub triggers: &'a [Reading],
    /// An activator holds a request or message for this function (queued > 0 or
    /// heldMessages > 0), or a poke arrived since the last decision.
    pub held_work: bool,
    /// When this scaler gained the lease: the first stable window after it never
    /// scales down and never idles.
    pub lease_acquired_at: Instant,
}

/// Which step of the pipeline decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Paused,
    Conflict,
    Fallback,
    ErrorHold,
    Stalled,
    Idle,
    Wake,
    Scale,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The count to set, clamped as the steps allow; equal to `current` means no change.
    pub replicas: i32,
    pub step: Step,
    /// Any trigger active or work held (for the `Active` condition and lastActiveTime).
    pub active: bool,
    pub panicking: bool,
    /// A trigger is past its failure threshold and contributes the fallback count.
    pub fallback: bool,
    /// Per trigger, the desire it contributed (`None` for a failing trigger with no
    /// last good desire); same order as `Policy::triggers`.
    pub desired_per_trigger: Vec<Option<i32>>,
}

/// A function's decision memory: windows, failure counts, the last active moment.
#[derive(Clone, Debug, Default)]
pub struct State {}

impl State {
    /// Seeds the windows after gaining the lease from the current `/scale` count and
    /// the last `status.desiredReplicas`, so the new leader does not scale down in its
    /// first stable window.
    pub fn seeded(_now: Instant, _current: i32, _last_desired: Option<i32>) -> Self {
        Self {}
    }
}

pub fn decide(_policy: &Policy, _state: &mut State, input: &Input<'_>) -> Decision {
    Decision {
        replicas: input.current,
        step: Step::Scale,
        active: false,
        panicking: false,
        fallback: false,
        desired_per_trigger: vec![],
    }
}
