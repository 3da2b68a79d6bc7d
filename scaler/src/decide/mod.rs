//! The decision: how many replicas a function should have now. Pure code, no I/O.
//!
//! [`decide`] runs once per function per tick (every `pollingInterval` for pull
//! triggers, every 1 s when there is an `http` trigger) and at once on a poke. It reads
//! the [`Policy`] (the spec with Blink's defaults), the function's [`State`] (its
//! windows and counters, which it updates) and the [`Input`] of this tick, and returns
//! a [`Decision`].
//!
//! Per trigger, the desire is `d = ceil(metric / target)` (`metricType: Value`:
//! `ceil(current × metric / target)`, the HPA's formula), and a trigger is *active*
//! when `metric > activation` (KEDA's meaning). For `http` the metric is Knative's KPA
//! average concurrency over the stable window, and over the panic window (`max(1 s,
//! panicWindowPercentage` of it)); *panic* starts when `ready ≥ 1` and the panic-window
//! desire is at least `panicThresholdPercentage` of `max(1, ready)`, and ends a stable
//! window after that last held (`kpa`).
//!
//! The count comes from an ordered pipeline; the first step that decides wins:
//! 1. **Paused:** `blink.sh/paused-replicas: N` → N; `blink.sh/paused` → no change.
//! 2. **Conflict** (another owner of the target) → no change.
//! 3. **Errors:** a failing trigger is neither active nor inactive and contributes its
//!    last good desire. Past `fallback.failureThreshold` consecutive failures
//!    (counted per poll, not per decision) it contributes the fallback count shaped by
//!    `fallback.behavior`, and the step decides — even from zero, and `replicas: 0` is
//!    honoured. Before the threshold (or with no fallback) an error neither wakes nor
//!    idles: with no trigger active and no work held, the count holds.
//! 4. **Stalled** (`ScaleUpStalled`) → hold the count.
//! 5. **Idle:** every trigger inactive and no work held for `cooldownPeriod` since the
//!    last active moment (and `initialCooldownPeriod` since the object was first seen,
//!    and not in the first stable window after gaining the lease) → `idleReplicaCount`
//!    if set, else 0 if `minReplicaCount` is 0. Idle beats panic and stabilization.
//!    With `minReplicaCount > 0` and no `idleReplicaCount`, activity does not matter.
//!    A transparent object with only `http` never idles once it has been warm.
//! 6. **Wake:** from 0 or idle, any active trigger or held work → `max(min, 1, D)` at
//!    once; without either, the function stays where it rests.
//! 7. **Scale:** `D = max d`. Up at once, to at most `maxScaleUpRate × max(1, ready)`
//!    and the HPA `scaleUp` policies. Down: not during panic; not below the highest
//!    `D` of the stabilization window (the stable window, or `scaleDown`'s
//!    `stabilizationWindowSeconds`); not below `ready / maxScaleDownRate` nor the HPA
//!    `scaleDown` policies; never in the first stable window after gaining the lease.
//!    Never to zero: only idle goes there.
//! 8. **Clamp** to `[min, max]` (a transparent `http`-only object: at least 1 once
//!    warm) for every step after 1 that sets a count; a count at the idle level stays.
//!    Conflict changes nothing, so there is nothing to clamp.
//!
//! Invariants, relative to that order: the count is within `[min, max]` or at
//! idle/zero/paused as the steps allow; never to zero while a trigger is active or an
//! activator holds work; never to zero *because of* an error unless `fallback.replicas`
//! is 0; no scale-down during panic or in the first stable window after gaining the
//! lease; no oscillation under constant demand (a settled count stays put).
//!
//! Submodules: `kpa` (the stable and panic windows), `behavior` (HPA stabilization
//! and rate policies), `tests`.

mod behavior;
mod kpa;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use blink_crds::scaled_object::{Fallback, FallbackBehavior, ScaledObjectSpec};

pub use behavior::{RateKind, RatePolicy, ScalingRules, Select};
use behavior::{Recommendations, ScaleEvents, secs};
use kpa::{Panic, Window};

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
    /// `pollingInterval`: consecutive failures of a pull trigger are counted per poll,
    /// not per decision.
    pub polling_interval: Duration,
    pub fallback: Option<Fallback>,
    /// One per `spec.triggers` entry, same order as `Input::triggers`.
    pub triggers: Vec<TriggerPolicy>,
    /// Transparent mode with only `http` triggers: never idles after its first wake.
    pub transparent_http_only: bool,
    /// `horizontalPodAutoscalerConfig.behavior.scaleUp`, as written (empty if absent).
    pub scale_up: ScalingRules,
    /// `horizontalPodAutoscalerConfig.behavior.scaleDown`, as written (empty if absent);
    /// its window replaces the stable window for scale-down stabilization.
    pub scale_down: ScalingRules,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TriggerPolicy {
    /// `triggers[].name`, else the type; used in reasons and metrics.
    pub name: String,
    /// `metricType: Value` uses the HPA's `ceil(current × metric / target)`.
    pub value_metric: bool,
}

impl Default for Policy {
    /// Blink's defaults for an object that sets nothing, with no triggers.
    fn default() -> Self {
        use blink_crds::scaled_object as d;
        Self {
            min: d::DEFAULT_MIN_REPLICAS,
            max: d::DEFAULT_MAX_REPLICAS,
            idle: None,
            cooldown: d::DEFAULT_COOLDOWN_PERIOD,
            initial_cooldown: d::DEFAULT_INITIAL_COOLDOWN_PERIOD,
            stable_window: d::DEFAULT_STABLE_WINDOW,
            panic_window_percentage: d::DEFAULT_PANIC_WINDOW_PERCENTAGE,
            panic_threshold_percentage: d::DEFAULT_PANIC_THRESHOLD_PERCENTAGE,
            max_scale_up_rate: d::DEFAULT_MAX_SCALE_UP_RATE,
            max_scale_down_rate: d::DEFAULT_MAX_SCALE_DOWN_RATE,
            polling_interval: d::DEFAULT_POLLING_INTERVAL,
            fallback: None,
            triggers: Vec::new(),
            transparent_http_only: false,
            scale_up: ScalingRules::default(),
            scale_down: ScalingRules::default(),
        }
    }
}

impl Policy {
    /// The policy of a spec, with Blink's defaults (the spec's getters) applied.
    /// `transparent_http_only`: the object is in transparent mode and every trigger is
    /// `http` (the caller knows the mode from annotations).
    pub fn from_spec(spec: &ScaledObjectSpec, transparent_http_only: bool) -> Policy {
        let (scale_up, scale_down) = behavior::rules_from(spec.hpa_behavior());
        Policy {
            min: spec.min_replicas(),
            max: spec.max_replicas(),
            idle: spec.idle_replica_count,
            cooldown: spec.cooldown_period(),
            initial_cooldown: spec.initial_cooldown_period(),
            stable_window: spec.stable_window(),
            panic_window_percentage: spec.panic_window_percentage(),
            panic_threshold_percentage: spec.panic_threshold_percentage(),
            max_scale_up_rate: spec.max_scale_up_rate(),
            max_scale_down_rate: spec.max_scale_down_rate(),
            polling_interval: spec.polling_interval(),
            fallback: spec.fallback.clone(),
            triggers: spec
                .triggers
                .iter()
                .map(|t| TriggerPolicy {
                    name: t.name.clone().unwrap_or_else(|| t.trigger_type.clone()),
                    // KEDA compares the string exactly; anything else is AverageValue.
                    value_metric: t.metric_type.as_deref() == Some("Value"),
                })
                .collect(),
            transparent_http_only,
            scale_up,
            scale_down,
        }
    }

    /// Where the function rests when idle: `idleReplicaCount`, else 0 when `min` is 0;
    /// `None` when it never idles.
    fn idle_target(&self, warm_seen: bool) -> Option<i32> {
        if self.transparent_http_only && warm_seen {
            return None;
        }
        match self.idle {
            Some(n) => Some(n.max(0)),
            None if self.min <= 0 => Some(0),
            None => None,
        }
    }

    fn stable_secs(&self) -> u32 {
        secs(self.stable_window).max(1)
    }
}

/// One trigger's observation for this decision, in `Policy::triggers` order.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    /// A pull trigger's metric (KEDA's meaning): active when `value > activation`.
    Metric {
        value: f64,
        target: f64,
        activation: f64,
    },
    /// The `http` trigger: this tick's concurrency sample (`inFlight + queued` summed
    /// over activators) and whether the demand protocol calls it active.
    Http {
        concurrency: f64,
        target: f64,
        active: bool,
    },
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
    /// Went idle, or rests at the idle level (0 or `idleReplicaCount`) with no demand.
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
///
/// `State::default()` is a function first seen at its first decision;
/// [`State::seeded`] is one taken over from another leader.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The decision clock's zero: windows count whole seconds from here.
    origin: Option<Instant>,
    /// When the object was first seen (or created), for `initialCooldownPeriod`.
    created: Option<Instant>,
    last_active: Option<Instant>,
    /// The last decision that saw a failing trigger: a failing trigger is not
    /// inactive, so the quiet time before idling starts after it.
    last_failure: Option<Instant>,
    /// The target has had a replica since this state began (a transparent object
    /// with only `http` is blind to warm traffic from then on).
    warm_seen: bool,
    panic: Panic,
    triggers: Vec<TriggerMemory>,
    recommendations: Recommendations,
    /// `(second, count)` a new leader must not scale below during the down window.
    seed: Option<(u32, i32)>,
    events: ScaleEvents,
}

#[derive(Clone, Debug, Default)]
struct TriggerMemory {
    /// The first decision of the current run of failures.
    failing_since: Option<Instant>,
    last_good: Option<i32>,
    /// The trigger last read as `http` (its reads come every 1 s, not every poll).
    http: bool,
    window: Window,
}

impl TriggerMemory {
    /// Consecutive failed reads so far, counting the one at `now`.
    ///
    /// Decisions run more often than pull triggers are polled (every 1 s when the
    /// object also has an `http` trigger, and at once on a poke), and each gets the
    /// trigger's latest reading, so counting decisions would count one failed poll
    /// several times. The count is the polls that can have happened since the first
    /// failed one: one per `pollingInterval` (1 s for `http`), with a tenth of an
    /// interval of slack so a poll that lands a little early still counts.
    fn failures(&mut self, now: Instant, polling_interval: Duration) -> u64 {
        let since = *self.failing_since.get_or_insert(now);
        let interval = if self.http {
            Duration::from_secs(1)
        } else {
            polling_interval
        };
        let elapsed = now.saturating_duration_since(since) + interval / 10;
        match interval.as_nanos() {
            0 => 1,
            n => u64::try_from(elapsed.as_nanos() / n)
                .unwrap_or(u64::MAX)
                .saturating_add(1),
        }
    }
}

impl State {
    /// Seeds the windows after gaining the lease from the current `/scale` count and
    /// the last `status.desiredReplicas`, so the new leader does not scale down in its
    /// first stable window. The cooldown restarts at `now` unless
    /// [`State::with_last_active`] supplies the status's `lastActiveTime`.
    pub fn seeded(now: Instant, current: i32, last_desired: Option<i32>) -> Self {
        let seed = current.max(last_desired.unwrap_or(0)).max(0);
        Self {
            origin: Some(now),
            last_active: Some(now),
            warm_seen: current >= 1,
            seed: Some((0, seed)),
            ..Self::default()
        }
    }

    /// Sets when the object was created (its `creationTimestamp` on this process's
    /// clock), so `initialCooldownPeriod` counts from creation, not from first sight.
    pub fn created_at(mut self, created: Instant) -> Self {
        self.created = Some(created);
        self
    }

    /// Sets the last active moment (e.g. the status's `lastActiveTime` after a
    /// takeover); `None` means never active, which lets the cooldown pass at once.
    pub fn with_last_active(mut self, last_active: Option<Instant>) -> Self {
        self.last_active = last_active;
        self
    }

    /// The last moment a trigger was active or work was held, as this state knows it.
    pub fn last_active(&self) -> Option<Instant> {
        self.last_active
    }

    /// Whole seconds of the decision clock at `now`, starting the clock if needed.
    fn clock(&mut self, now: Instant) -> u32 {
        let origin = *self.origin.get_or_insert(now);
        self.created.get_or_insert(now);
        secs(now.saturating_duration_since(origin))
    }
}

/// What the triggers say this tick, after updating their memory.
struct Observed {
    /// Some trigger read active.
    active: bool,
    /// Some trigger's read failed.
    failing: bool,
    /// Some trigger is past its failure threshold (a fallback is configured).
    past_threshold: bool,
    /// Some failing trigger has no last good desire: scale-down would be blind to it.
    blind: bool,
    /// Some `http` trigger is over the panic threshold.
    panic_over: bool,
    per_trigger: Vec<Contribution>,
}

#[derive(Clone, Copy)]
struct Contribution {
    /// The desire in steady state (an `http` trigger: its stable-window desire).
    steady: Option<i32>,
    /// An `http` trigger's panic-window desire (others: none).
    panic: Option<i32>,
}

/// `ceil(x)` as a replica count: 0 for anything not positive, saturating at `i32::MAX`.
fn ceil_count(x: f64) -> i32 {
    if x > 0.0 {
        // `as` saturates (and maps NaN, excluded above, to 0).
        x.ceil() as i32
    } else {
        0
    }
}

fn usable(x: f64) -> bool {
    x.is_finite()
}

/// The fallback count for the current replicas, shaped by `fallback.behavior`.
fn fallback_count(fallback: &Fallback, current: i32) -> i32 {
    let replicas = fallback.replicas.max(0);
    match fallback.behavior() {
        FallbackBehavior::CurrentReplicas => current,
        FallbackBehavior::CurrentReplicasIfHigher => current.max(replicas),
        FallbackBehavior::CurrentReplicasIfLower => current.min(replicas),
        // `scalingModifiers` is refused with Ready=False before a decision runs; should
        // one slip through, the fixed count is the least surprising reading.
        FallbackBehavior::Static | FallbackBehavior::ScalingModifiers => replicas,
    }
}

impl State {
    /// Reads every trigger, updating windows, failure counts and last good desires.
    fn observe(
        &mut self,
        policy: &Policy,
        input: &Input<'_>,
        sec: u32,
        current: i32,
        ready: i32,
    ) -> Observed {
        let stable = policy.stable_secs();
        let panic_secs = kpa::panic_window_secs(stable, policy.panic_window_percentage);
        // A trigger list that changed length means a new spec: keep what lines up.
        self.triggers
            .resize_with(input.triggers.len(), TriggerMemory::default);
        let mut obs = Observed {
            active: false,
            failing: false,
            past_threshold: false,
            blind: false,
            panic_over: false,
            per_trigger: Vec::with_capacity(input.triggers.len()),
        };
        for (i, (reading, mem)) in input.triggers.iter().zip(&mut self.triggers).enumerate() {
            let value_metric = policy.triggers.get(i).is_some_and(|t| t.value_metric);
            let contribution = match *reading {
                Reading::Metric {
                    value,
                    target,
                    activation,
                } if usable(value) && usable(target) && target > 0.0 => {
                    let d = if value_metric {
                        ceil_count(f64::from(current) * value / target)
                    } else {
                        ceil_count(value / target)
                    };
                    obs.active |= value > activation;
                    mem.http = false;
                    Some(Contribution {
                        steady: Some(d),
                        panic: None,
                    })
                }
                Reading::Http {
                    concurrency,
                    target,
                    active,
                } if usable(target) && target > 0.0 => {
                    mem.window.record(sec, concurrency, stable);
                    let avg = |w| mem.window.average(sec, w).unwrap_or(0.0);
                    let steady = ceil_count(avg(stable) / target);
                    let panic = ceil_count(avg(panic_secs) / target);
                    obs.panic_over |=
                        kpa::over_threshold(panic, ready, policy.panic_threshold_percentage);
                    obs.active |= active;
                    mem.http = true;
                    Some(Contribution {
                        steady: Some(steady),
                        panic: Some(panic),
                    })
                }
                // A failed read, or one that cannot be used (a non-finite value, a
                // target that is not positive): the metric is unknown either way.
                _ => None,
            };
            let contribution = match contribution {
                Some(c) => {
                    mem.failing_since = None;
                    mem.last_good = c.steady;
                    c
                }
                None => {
                    let failures = mem.failures(input.now, policy.polling_interval);
                    obs.failing = true;
                    let past = policy.fallback.as_ref().filter(|f| {
                        // A negative threshold (past the schema) counts as 0.
                        failures >= u64::try_from(f.failure_threshold).unwrap_or(0)
                    });
                    match past {
                        Some(f) => {
                            obs.past_threshold = true;
                            Contribution {
                                steady: Some(fallback_count(f, current)),
                                panic: None,
                            }
                        }
                        None => {
                            obs.blind |= mem.last_good.is_none();
                            Contribution {
                                steady: mem.last_good,
                                panic: None,
                            }
                        }
                    }
                }
            };
            obs.per_trigger.push(contribution);
        }
        obs
    }
}

/// Decides the count for one function now, updating its memory.
pub fn decide(policy: &Policy, state: &mut State, input: &Input<'_>) -> Decision {
    let now = input.now;
    let current = input.current.max(0);
    let ready = input.ready.max(0);
    let sec = state.clock(now);
    state.warm_seen |= current >= 1;

    let obs = state.observe(policy, input, sec, current, ready);
    let active = obs.active || input.held_work;
    if active {
        state.last_active = Some(now);
    }
    if obs.failing {
        state.last_failure = Some(now);
    }
    let panicking = state
        .panic
        .update(now, obs.panic_over, policy.stable_window);

    // D in steady state (an `http` trigger in panic counts its panic desire too), and
    // D for a wake: from zero the stable window is mostly the silence before the wake,
    // so the panic window is the one that has seen the burst (Knative reaches the same
    // by dividing by max(1, ready) = 1 at zero).
    let steady = |c: &Contribution| {
        if panicking {
            c.steady.max(c.panic)
        } else {
            c.steady
        }
    };
    let d_steady = obs.per_trigger.iter().filter_map(steady).max().unwrap_or(0);
    let d_burst = obs
        .per_trigger
        .iter()
        .filter_map(|c| c.steady.max(c.panic))
        .max()
        .unwrap_or(0);

    let idle_target = policy.idle_target(state.warm_seen);
    // A transparent `http`-only object, once warm, is blind to its traffic: keep one.
    let floor = if policy.transparent_http_only && state.warm_seen {
        policy.min.max(1)
    } else {
        policy.min
    };
    let at_rest = current == 0 || Some(current) == idle_target;
    let waking = at_rest && active;
    let recommendation = if waking { d_burst } else { d_steady };
    let keep = secs(
        policy
            .scale_down
            .stabilization_window
            .unwrap_or(policy.stable_window),
    )
    .max(secs(
        policy.scale_up.stabilization_window.unwrap_or_default(),
    ))
    .max(1);
    state.recommendations.record(sec, recommendation, keep);

    let ctx = Ctx {
        policy,
        input,
        current,
        ready,
        sec,
        active,
        panicking,
        idle_target,
        floor,
        at_rest,
        d_steady,
        d_burst,
    };
    let (replicas, step) = ctx.pipeline(state, &obs);

    if step == Step::Idle && replicas != current {
        state.panic.end();
    }
    state.events.record(
        sec,
        replicas.saturating_sub(current),
        &policy.scale_up,
        &policy.scale_down,
    );

    Decision {
        replicas,
        step,
        active,
        panicking: state.panic.is_active(),
        fallback: obs.past_threshold,
        desired_per_trigger: obs.per_trigger.iter().map(steady).collect(),
    }
}

/// What every step reads.
struct Ctx<'a> {
    policy: &'a Policy,
    input: &'a Input<'a>,
    current: i32,
    ready: i32,
    sec: u32,
    active: bool,
    panicking: bool,
    idle_target: Option<i32>,
    /// The lowest count outside idle: `min`, or 1 for a warm transparent object.
    floor: i32,
    at_rest: bool,
    d_steady: i32,
    d_burst: i32,
}

impl Ctx<'_> {
    fn pipeline(&self, state: &State, obs: &Observed) -> (i32, Step) {
        let p = self.policy;
        let now = self.input.now;

        // 1. Paused: the user's count, on purpose outside [min, max] if they say so.
        match self.input.paused {
            Some(Paused::At(n)) => return (n.max(0), Step::Paused),
            Some(Paused::Hold) => return (self.current, Step::Paused),
            None => {}
        }
        // 2. Conflict: the target is someone else's; leave it exactly as it is.
        if self.input.conflict {
            return (self.current, Step::Conflict);
        }
        // 3. Errors. Past the threshold the fallback count joins the other triggers'
        // desires (the HPA takes the max over metrics, the fallback being one of them)
        // and decides at once, from zero too.
        if obs.past_threshold {
            let mut n = self.d_steady;
            if self.active {
                n = n.max(1);
            }
            return (self.fit(n), Step::Fallback);
        }
        // Before it (or with no fallback) an error neither wakes nor idles; an active
        // trigger still scales, with the failing one holding its last good desire.
        if obs.failing && !self.active {
            return (self.fit(self.current), Step::ErrorHold);
        }
        // 4. Stalled: the pending pods are what a cluster autoscaler needs to see.
        if self.input.stalled {
            return (self.fit(self.current), Step::Stalled);
        }
        // 5. Idle.
        if let Some(target) = self.idle_target
            && !self.active
            && self.quiet_for(state) >= p.cooldown
            && state
                .created
                .is_none_or(|c| now.saturating_duration_since(c) >= p.initial_cooldown)
            && !self.in_lease_window()
        {
            return (target, Step::Idle);
        }
        // 6. Wake, or rest where idle with no demand.
        if self.at_rest {
            if self.active {
                let n = p.min.max(1).max(self.d_burst);
                return (self.fit(n), Step::Wake);
            }
            if self.idle_target.is_some() {
                return (self.current, Step::Idle);
            }
            // At zero below a minimum that is not an idle level: the scale step
            // brings it up to the floor.
        }
        // 7. Scale.
        (self.scale(state, obs), Step::Scale)
    }

    /// How long every trigger has been inactive with no work held: since the last
    /// active moment or the last failure, whichever is later; never active counts as
    /// quiet for ever (KEDA scales an object that never was active to zero at once,
    /// `initialCooldownPeriod` aside).
    fn quiet_for(&self, state: &State) -> Duration {
        match state.last_active.max(state.last_failure) {
            Some(t) => self.input.now.saturating_duration_since(t),
            None => Duration::MAX,
        }
    }

    fn in_lease_window(&self) -> bool {
        self.input
            .now
            .saturating_duration_since(self.input.lease_acquired_at)
            < self.policy.stable_window
    }

    /// Step 7: D shaped by stabilization, panic, the lease window and the rates.
    fn scale(&self, state: &State, obs: &Observed) -> i32 {
        let p = self.policy;
        let current = self.current;
        let d = self.d_steady;

        // HPA-style stabilization: up to the lowest recommendation of the up window
        // (none unless `scaleUp.stabilizationWindowSeconds` is given), down to the
        // highest of the down window (the stable window unless `scaleDown`'s is given).
        let up_window = secs(p.scale_up.stabilization_window.unwrap_or_default());
        let down_window = secs(p.scale_down.stabilization_window.unwrap_or(p.stable_window));
        let up_rec = match up_window {
            0 => d,
            w => state.recommendations.min_within(self.sec, w).unwrap_or(d),
        };
        let mut down_rec = match down_window {
            0 => d,
            w => state.recommendations.max_within(self.sec, w).unwrap_or(d),
        };
        if let Some((at, seed)) = state.seed
            && at.saturating_add(down_window.max(p.stable_secs())) > self.sec
        {
            down_rec = down_rec.max(seed);
        }
        let mut want = current.max(up_rec).min(down_rec);

        // Never down in panic, right after gaining the lease, or while a failing
        // trigger has never said what it wants (the HPA, missing a metric, does not
        // scale down on the others).
        if self.panicking || self.in_lease_window() || obs.blind {
            want = want.max(current);
        }

        if want > current {
            // Knative's rate: at most maxScaleUpRate × ready per decision.
            let rate = if p.max_scale_up_rate >= 1.0 {
                p.max_scale_up_rate
            } else {
                1.0
            };
            let cap = ceil_count(rate * f64::from(self.ready.max(1)));
            want = want.min(cap.max(current));
            if p.scale_up.limits()
                && let Some(limit) = state.events.up_limit(&p.scale_up, self.sec, current)
            {
                want = want.min(limit.max(current));
            }
        }
        if want < current {
            // Knative's rate: not below ready / maxScaleDownRate per decision.
            let rate = if p.max_scale_down_rate >= 1.0 {
                p.max_scale_down_rate
            } else {
                1.0
            };
            let floor = (f64::from(self.ready) / rate).floor() as i32;
            want = want.max(floor.min(current));
            if p.scale_down.limits()
                && let Some(limit) = state.events.down_limit(&p.scale_down, self.sec, current)
            {
                want = want.max(limit.min(current));
            }
        }

        // Zero and the idle level are the idle step's alone.
        self.fit(want.max(p.min).max(1))
    }

    /// Step 8: clamp to [min, max], at least 1 for a warm transparent `http`-only
    /// object; a count at the idle level stays there. `max` wins over a floor above
    /// it (an invalid spec), so Blink never scales past what the user allowed.
    fn fit(&self, n: i32) -> i32 {
        if Some(n) == self.idle_target {
            return n;
        }
        n.max(self.floor).min(self.policy.max.max(0))
    }
}
