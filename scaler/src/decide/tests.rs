//! Tests of the decision: per-trigger desires, each pipeline step and their
//! precedence (tables), behaviour over time (stepping `now`, never sleeping), and the
//! invariants of DESIGN.md as properties.

use std::time::{Duration, Instant};

use blink_crds::scaled_object::{Fallback, FallbackBehavior, ScaledObjectSpec};

use super::*;

/// Seconds after the lease was gained at which most tests start: past the first
/// stable window, so the lease rule does not get in the way unless a test wants it.
const LATE: f64 = 1000.0;

fn metric(value: f64) -> Reading {
    Reading::Metric {
        value,
        target: 10.0,
        activation: 0.0,
    }
}

fn http(concurrency: f64, active: bool) -> Reading {
    Reading::Http {
        concurrency,
        target: 10.0,
        active,
    }
}

fn trigger(name: &str) -> TriggerPolicy {
    TriggerPolicy {
        name: name.into(),
        value_metric: false,
    }
}

/// min 0, max 100, cooldown 30 s, stable window 60 s, one pull trigger.
fn pull_policy() -> Policy {
    Policy {
        triggers: vec![trigger("queue")],
        ..Policy::default()
    }
}

fn http_policy() -> Policy {
    Policy {
        triggers: vec![trigger("http")],
        ..Policy::default()
    }
}

fn fallback(threshold: i32, replicas: i32, behavior: FallbackBehavior) -> Option<Fallback> {
    Some(Fallback {
        behavior: Some(behavior),
        failure_threshold: threshold,
        replicas,
    })
}

/// A function's decisions over time: `now` is `base + t` seconds.
struct Run {
    base: Instant,
    policy: Policy,
    state: State,
    lease_at: f64,
}

impl Run {
    fn new(policy: Policy) -> Self {
        Self {
            base: Instant::now(),
            policy,
            state: State::default(),
            lease_at: 0.0,
        }
    }

    fn at(&self, t: f64) -> Instant {
        self.base + Duration::from_secs_f64(t)
    }

    fn tick(&mut self, t: f64, current: i32, readings: &[Reading]) -> Decision {
        self.tick_with(t, current, readings, |_| {})
    }

    fn tick_with(
        &mut self,
        t: f64,
        current: i32,
        readings: &[Reading],
        tweak: impl FnOnce(&mut Input<'_>),
    ) -> Decision {
        let mut input = Input {
            now: self.at(t),
            current,
            ready: current,
            paused: None,
            conflict: false,
            stalled: false,
            triggers: readings,
            held_work: false,
            lease_acquired_at: self.at(self.lease_at),
        };
        tweak(&mut input);
        decide(&self.policy, &mut self.state, &input)
    }

    /// Ticks every second from `from` to `to` (inclusive), applying each decision as
    /// the caller would (ready = current); returns the last decision.
    fn follow(&mut self, from: f64, to: f64, current: &mut i32, readings: &[Reading]) -> Decision {
        let mut t = from;
        let mut last = self.tick(t, *current, readings);
        *current = last.replicas;
        while t + 1.0 <= to {
            t += 1.0;
            last = self.tick(t, *current, readings);
            *current = last.replicas;
        }
        last
    }
}

// ---------------------------------------------------------------- per-trigger desire

#[test]
fn desire_per_trigger_follows_keda_and_the_hpa() {
    // (value, target, metricType Value, current, expected d)
    let table = [
        (25.0, 10.0, false, 3, 3),
        (20.0, 10.0, false, 3, 2),
        (0.1, 10.0, false, 3, 1),
        (0.0, 10.0, false, 3, 0),
        (-5.0, 10.0, false, 3, 0),
        (15.0, 10.0, true, 4, 6),
        (10.0, 10.0, true, 4, 4),
        (15.0, 10.0, true, 0, 0),
        (5e12, 1.0, false, 3, i32::MAX),
    ];
    for (value, target, value_metric, current, want) in table {
        let mut run = Run::new(Policy {
            triggers: vec![TriggerPolicy {
                name: "m".into(),
                value_metric,
            }],
            ..Policy::default()
        });
        let r = [Reading::Metric {
            value,
            target,
            activation: 0.0,
        }];
        let d = run.tick(LATE, current, &r);
        assert_eq!(
            d.desired_per_trigger,
            vec![Some(want)],
            "value {value} target {target} Value={value_metric} current {current}"
        );
    }
}

#[test]
fn a_metric_is_active_only_above_its_activation() {
    for (value, activation, active) in [(5.0, 5.0, false), (5.1, 5.0, true), (0.0, -1.0, true)] {
        let mut run = Run::new(pull_policy());
        let r = [Reading::Metric {
            value,
            target: 10.0,
            activation,
        }];
        assert_eq!(
            run.tick(LATE, 2, &r).active,
            active,
            "{value} > {activation}"
        );
    }
}

#[test]
fn an_unusable_reading_counts_as_a_failure() {
    for bad in [
        Reading::Metric {
            value: f64::NAN,
            target: 10.0,
            activation: 0.0,
        },
        Reading::Metric {
            value: 5.0,
            target: 0.0,
            activation: 0.0,
        },
        Reading::Http {
            concurrency: 1.0,
            target: -1.0,
            active: true,
        },
    ] {
        let mut run = Run::new(pull_policy());
        let d = run.tick(LATE, 3, std::slice::from_ref(&bad));
        assert_eq!(d.step, Step::ErrorHold, "{bad:?}");
        assert_eq!(d.desired_per_trigger, vec![None]);
    }
}

#[test]
fn http_desire_is_the_stable_window_average() {
    let mut run = Run::new(http_policy());
    // 30 s at 0 then 30 s at 40: the 60 s average is 20, over target 10 → 2. (Four
    // ready replicas keep the panic desire, 4, under the threshold.)
    for s in 0..30 {
        run.tick(LATE + f64::from(s), 4, &[http(0.0, false)]);
    }
    let mut last = None;
    for s in 30..60 {
        last = Some(run.tick(LATE + f64::from(s), 4, &[http(40.0, true)]));
    }
    let mut last = last.expect("ticked");
    assert_eq!(last.desired_per_trigger, vec![Some(2)]);
    // Samples older than the window fall out: 60 more seconds at 40 → 4.
    for s in 60..120 {
        last = run.tick(LATE + f64::from(s), 4, &[http(40.0, true)]);
    }
    assert_eq!(last.desired_per_trigger, vec![Some(4)]);
}

#[test]
fn extra_decisions_on_pokes_do_not_distort_the_window() {
    // The same demand, with and without an extra decision inside each of the quiet
    // seconds (a poke): the stable average must be the same.
    let target4 = |c: f64, active: bool| Reading::Http {
        concurrency: c,
        target: 4.0,
        active,
    };
    let mut results = Vec::new();
    // Four ready replicas: the panic desire (5) stays under the threshold (8).
    for pokes in [false, true] {
        let mut run = Run::new(http_policy());
        for s in 0..30 {
            let t = LATE + f64::from(s);
            run.tick(t, 4, &[target4(0.0, false)]);
            if pokes {
                run.tick(t + 0.4, 4, &[target4(0.0, false)]);
            }
        }
        let mut last = None;
        for s in 30..60 {
            last = Some(run.tick(LATE + f64::from(s), 4, &[target4(20.0, true)]));
        }
        results.push(last.expect("ticked").desired_per_trigger);
    }
    // avg 10 over target 4 → 3; counting the poke decisions as samples would give 2.
    assert_eq!(results[0], vec![Some(3)]);
    assert_eq!(results[1], results[0]);
}

// ------------------------------------------------------------------------ precedence

#[test]
fn steps_decide_in_pipeline_order() {
    struct Row {
        paused: Option<Paused>,
        conflict: bool,
        a: Reading,
        fallback: Option<Fallback>,
        stalled: bool,
        b: Reading,
        current: i32,
        step: Step,
        replicas: i32,
    }
    let failed = || Reading::Failed;
    let fb = || fallback(1, 5, FallbackBehavior::Static);
    let rows = [
        // Paused beats everything below it, and may leave [min, max].
        Row {
            paused: Some(Paused::At(70)),
            conflict: true,
            a: failed(),
            fallback: fb(),
            stalled: true,
            b: metric(0.0),
            current: 3,
            step: Step::Paused,
            replicas: 70,
        },
        Row {
            paused: Some(Paused::Hold),
            conflict: true,
            a: failed(),
            fallback: fb(),
            stalled: true,
            b: metric(90.0),
            current: 3,
            step: Step::Paused,
            replicas: 3,
        },
        // Conflict beats errors.
        Row {
            paused: None,
            conflict: true,
            a: failed(),
            fallback: fb(),
            stalled: true,
            b: metric(0.0),
            current: 3,
            step: Step::Conflict,
            replicas: 3,
        },
        // A fallback beats stalled.
        Row {
            paused: None,
            conflict: false,
            a: failed(),
            fallback: fb(),
            stalled: true,
            b: metric(0.0),
            current: 3,
            step: Step::Fallback,
            replicas: 5,
        },
        // An error with nothing active holds, before stalled and idle.
        Row {
            paused: None,
            conflict: false,
            a: failed(),
            fallback: None,
            stalled: true,
            b: metric(0.0),
            current: 3,
            step: Step::ErrorHold,
            replicas: 3,
        },
        // Stalled beats idle.
        Row {
            paused: None,
            conflict: false,
            a: metric(0.0),
            fallback: None,
            stalled: true,
            b: metric(0.0),
            current: 3,
            step: Step::Stalled,
            replicas: 3,
        },
        // Idle (never active: the cooldown has passed).
        Row {
            paused: None,
            conflict: false,
            a: metric(0.0),
            fallback: None,
            stalled: false,
            b: metric(0.0),
            current: 3,
            step: Step::Idle,
            replicas: 0,
        },
        // An error with another trigger active does not hold: it wakes.
        Row {
            paused: None,
            conflict: false,
            a: failed(),
            fallback: None,
            stalled: false,
            b: metric(25.0),
            current: 0,
            step: Step::Wake,
            replicas: 3,
        },
        Row {
            paused: None,
            conflict: false,
            a: metric(0.0),
            fallback: None,
            stalled: false,
            b: metric(25.0),
            current: 0,
            step: Step::Wake,
            replicas: 3,
        },
        Row {
            paused: None,
            conflict: false,
            a: metric(0.0),
            fallback: None,
            stalled: false,
            b: metric(55.0),
            current: 3,
            step: Step::Scale,
            replicas: 6,
        },
        // Clamped to max (8 below).
        Row {
            paused: None,
            conflict: false,
            a: metric(0.0),
            fallback: None,
            stalled: false,
            b: metric(500.0),
            current: 3,
            step: Step::Scale,
            replicas: 8,
        },
    ];
    for (i, row) in rows.into_iter().enumerate() {
        let mut run = Run::new(Policy {
            max: 8,
            fallback: row.fallback.clone(),
            triggers: vec![trigger("a"), trigger("b")],
            ..Policy::default()
        });
        let readings = [row.a.clone(), row.b.clone()];
        let d = run.tick_with(LATE, row.current, &readings, |i| {
            i.paused = row.paused;
            i.conflict = row.conflict;
            i.stalled = row.stalled;
        });
        assert_eq!((d.step, d.replicas), (row.step, row.replicas), "row {i}");
    }
}

#[test]
fn clamp_applies_after_paused_only() {
    let policy = Policy {
        min: 2,
        max: 5,
        ..pull_policy()
    };
    // Outside [min, max] through external changes: every counting step brings it back.
    for (current, reading, stalled, step, want) in [
        (9, metric(60.0), false, Step::Scale, 5),
        // D 2, but at most halved per decision (ready 9 / 2).
        (9, metric(20.0), false, Step::Scale, 4),
        (9, metric(20.0), true, Step::Stalled, 5),
        (9, Reading::Failed, false, Step::ErrorHold, 5),
        (1, metric(0.0), false, Step::Scale, 2),
        (0, metric(0.0), false, Step::Scale, 2),
    ] {
        let mut run = Run::new(policy.clone());
        let d = run.tick_with(LATE, current, &[reading], |i| i.stalled = stalled);
        assert_eq!((d.step, d.replicas), (step, want), "from {current}");
    }
    // Paused and Conflict leave it where the user or the other owner put it.
    let mut run = Run::new(policy.clone());
    let d = run.tick_with(LATE, 9, &[metric(20.0)], |i| i.paused = Some(Paused::At(0)));
    assert_eq!(d.replicas, 0);
    let d = run.tick_with(LATE + 1.0, 9, &[metric(20.0)], |i| i.conflict = true);
    assert_eq!(d.replicas, 9);
}

// ---------------------------------------------------------------------------- errors

#[test]
fn a_failing_trigger_contributes_its_last_good_desire() {
    let mut run = Run::new(Policy {
        triggers: vec![trigger("a"), trigger("b")],
        ..Policy::default()
    });
    run.tick(LATE, 4, &[metric(40.0), metric(10.0)]);
    // `a` fails while `b` stays active: D still counts a's 4.
    let d = run.tick(LATE + 100.0, 4, &[Reading::Failed, metric(10.0)]);
    assert_eq!(d.desired_per_trigger, vec![Some(4), Some(1)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 4));
    assert!(!d.fallback);
}

#[test]
fn a_trigger_that_never_read_blocks_scale_down() {
    let mut run = Run::new(Policy {
        triggers: vec![trigger("a"), trigger("b")],
        ..Policy::default()
    });
    let d = run.tick(LATE, 6, &[Reading::Failed, metric(10.0)]);
    assert_eq!(d.desired_per_trigger, vec![None, Some(1)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 6));
    // Once it reads, the count may fall (by at most half: maxScaleDownRate 2).
    let d = run.tick(LATE + 1.0, 6, &[metric(0.0), metric(10.0)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 3));
}

#[test]
fn fallback_behaviors_shape_the_count() {
    use FallbackBehavior::*;
    // (behavior, fallback.replicas, current, expected)
    for (behavior, replicas, current, want) in [
        (Static, 2, 5, 2),
        (CurrentReplicas, 2, 5, 5),
        (CurrentReplicasIfHigher, 2, 5, 5),
        (CurrentReplicasIfHigher, 7, 5, 7),
        (CurrentReplicasIfLower, 2, 5, 2),
        (CurrentReplicasIfLower, 7, 5, 5),
        // Even from zero, as KEDA does.
        (Static, 3, 0, 3),
        (CurrentReplicasIfHigher, 3, 0, 3),
        // `replicas: 0` is honoured.
        (Static, 0, 5, 0),
        (CurrentReplicasIfLower, 0, 5, 0),
    ] {
        let mut run = Run::new(Policy {
            fallback: fallback(0, replicas, behavior),
            ..pull_policy()
        });
        let d = run.tick(LATE, current, &[Reading::Failed]);
        assert_eq!(
            (d.step, d.replicas, d.fallback),
            (Step::Fallback, want, true),
            "{behavior:?} replicas {replicas} current {current}"
        );
        assert_eq!(d.desired_per_trigger, vec![Some(want)]);
    }
}

#[test]
fn fallback_waits_for_the_threshold_and_holds_before_it() {
    let policy = Policy {
        fallback: fallback(3, 4, FallbackBehavior::Static),
        polling_interval: Duration::from_secs(5),
        ..pull_policy()
    };
    let mut run = Run::new(policy.clone());
    // From zero, decisions every second (as with an `http` trigger beside it) while
    // the polls at +0 and +5 fail: two failures, which neither wake nor do anything.
    for k in 0..10 {
        let d = run.tick(LATE + f64::from(k), 0, &[Reading::Failed]);
        assert_eq!(
            (d.step, d.replicas, d.fallback),
            (Step::ErrorHold, 0, false),
            "at +{k}"
        );
    }
    // The third failed poll, at +10.
    let d = run.tick(LATE + 10.0, 0, &[Reading::Failed]);
    assert_eq!((d.step, d.replicas, d.fallback), (Step::Fallback, 4, true));
    // One good read resets the count.
    run.tick(LATE + 11.0, 4, &[metric(30.0)]);
    let d = run.tick(LATE + 12.0, 4, &[Reading::Failed]);
    assert_eq!((d.step, d.replicas), (Step::ErrorHold, 4));

    // Decisions only at polls, which land a little early: still three failures.
    let mut run = Run::new(policy);
    for t in [0.0, 4.8] {
        assert_eq!(
            run.tick(LATE + t, 2, &[Reading::Failed]).step,
            Step::ErrorHold
        );
    }
    assert_eq!(
        run.tick(LATE + 9.7, 2, &[Reading::Failed]).step,
        Step::Fallback
    );
}

#[test]
fn a_failing_http_trigger_counts_a_failure_per_second() {
    let mut run = Run::new(Policy {
        fallback: fallback(3, 4, FallbackBehavior::Static),
        ..http_policy()
    });
    run.tick(LATE, 2, &[http(20.0, true)]);
    for k in 1..3 {
        let d = run.tick(LATE + f64::from(k), 2, &[Reading::Failed]);
        assert_eq!(d.step, Step::ErrorHold, "at +{k}");
    }
    assert_eq!(
        run.tick(LATE + 3.0, 2, &[Reading::Failed]).step,
        Step::Fallback
    );
}

#[test]
fn fallback_joins_the_other_triggers_and_respects_activity() {
    let mut run = Run::new(Policy {
        fallback: fallback(0, 0, FallbackBehavior::Static),
        triggers: vec![trigger("a"), trigger("b")],
        ..Policy::default()
    });
    // The other trigger wants 6: the max wins.
    let d = run.tick(LATE, 2, &[Reading::Failed, metric(60.0)]);
    assert_eq!((d.step, d.replicas), (Step::Fallback, 6));
    // A fallback of 0 never takes an active function to zero.
    let d = run.tick(
        LATE + 1.0,
        2,
        &[
            Reading::Failed,
            Reading::Metric {
                value: 0.0,
                target: 10.0,
                activation: -1.0,
            },
        ],
    );
    assert_eq!((d.step, d.replicas), (Step::Fallback, 1));
    let d = run.tick_with(LATE + 2.0, 2, &[Reading::Failed, metric(0.0)], |i| {
        i.held_work = true
    });
    assert_eq!((d.step, d.replicas), (Step::Fallback, 1));
    // Nothing active: the user asked for zero.
    let d = run.tick(LATE + 3.0, 2, &[Reading::Failed, metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Fallback, 0));
}

#[test]
fn fallback_stays_within_min_and_max() {
    let mut run = Run::new(Policy {
        min: 2,
        max: 6,
        fallback: fallback(0, 0, FallbackBehavior::Static),
        ..pull_policy()
    });
    assert_eq!(run.tick(LATE, 4, &[Reading::Failed]).replicas, 2);
    let mut run = Run::new(Policy {
        min: 2,
        max: 6,
        fallback: fallback(0, 50, FallbackBehavior::Static),
        ..pull_policy()
    });
    assert_eq!(run.tick(LATE, 4, &[Reading::Failed]).replicas, 6);
}

#[test]
fn an_error_never_idles_and_the_cooldown_restarts_after_it() {
    let mut run = Run::new(pull_policy());
    run.tick(LATE, 3, &[metric(30.0)]);
    // Failing for ten minutes without a fallback: the count holds.
    for s in 1..600 {
        let d = run.tick(LATE + f64::from(s), 3, &[Reading::Failed]);
        assert_eq!((d.step, d.replicas), (Step::ErrorHold, 3), "at {s}");
    }
    // Recovered and inactive: the cooldown counts from the last failure, not from
    // the last active moment ten minutes ago. (The scale step meanwhile lowers the
    // count to 1, by stabilization and the scale-down rate.)
    let mut current = 3;
    let d = run.follow(LATE + 600.0, LATE + 628.0, &mut current, &[metric(0.0)]);
    assert_ne!(d.step, Step::Idle);
    assert!(d.replicas >= 1);
    let d = run.tick(LATE + 629.0, current, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 0));
}

// --------------------------------------------------------------------------- stalled

#[test]
fn stalled_holds_even_against_demand() {
    let mut run = Run::new(pull_policy());
    let d = run.tick_with(LATE, 3, &[metric(90.0)], |i| i.stalled = true);
    assert_eq!((d.step, d.replicas, d.active), (Step::Stalled, 3, true));
    let d = run.tick_with(LATE + 1.0, 0, &[metric(90.0)], |i| i.stalled = true);
    assert_eq!((d.step, d.replicas), (Step::Stalled, 0));
}

// ------------------------------------------------------------------------------ idle

#[test]
fn idles_a_cooldown_after_the_last_active_moment() {
    let mut run = Run::new(pull_policy());
    let mut current = 0;
    let d = run.follow(LATE, LATE + 10.0, &mut current, &[metric(25.0)]);
    assert_eq!(d.replicas, 3);
    // Last active at LATE+10: not idle at +39, idle at +40.
    let d = run.follow(LATE + 11.0, LATE + 39.0, &mut current, &[metric(0.0)]);
    assert_eq!(d.step, Step::Scale);
    assert!(d.replicas >= 1);
    let d = run.tick(LATE + 40.0, current, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 0));
    // At zero with no demand it rests there.
    let d = run.tick(LATE + 41.0, 0, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 0));
}

#[test]
fn with_no_cooldown_it_idles_at_the_first_quiet_decision_and_never_while_active() {
    let mut run = Run::new(Policy {
        cooldown: Duration::ZERO,
        ..pull_policy()
    });
    let d = run.tick(LATE, 2, &[metric(20.0)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 2));
    let d = run.tick_with(LATE + 1.0, 2, &[metric(0.0)], |i| i.held_work = true);
    assert_eq!((d.step, d.replicas), (Step::Scale, 2));
    let d = run.tick(LATE + 2.0, 2, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 0));
}

#[test]
fn held_work_counts_as_activity() {
    let mut run = Run::new(pull_policy());
    run.tick(LATE, 2, &[metric(20.0)]);
    for s in 1..100 {
        let d = run.tick_with(LATE + f64::from(s), 2, &[metric(0.0)], |i| {
            i.held_work = true
        });
        assert!(d.active);
        assert_ne!(d.step, Step::Idle, "at {s}");
        assert!(d.replicas >= 1);
    }
    // From zero, a poke alone wakes it.
    let d = run.tick_with(LATE + 200.0, 0, &[metric(0.0)], |i| i.held_work = true);
    assert_eq!((d.step, d.replicas), (Step::Wake, 1));
}

#[test]
fn idle_replica_count_is_where_it_rests() {
    let mut run = Run::new(Policy {
        min: 3,
        idle: Some(1),
        ..pull_policy()
    });
    let d = run.tick(LATE, 3, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 1));
    let d = run.tick(LATE + 1.0, 1, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 1));
    // Demand wakes it to max(min, 1, D).
    let d = run.tick(LATE + 2.0, 1, &[metric(5.0)]);
    assert_eq!((d.step, d.replicas), (Step::Wake, 3));
    let d = run.tick(LATE + 3.0, 1, &[metric(45.0)]);
    assert_eq!((d.step, d.replicas), (Step::Wake, 5));
}

#[test]
fn with_min_and_no_idle_count_activity_does_not_matter() {
    let mut run = Run::new(Policy {
        min: 2,
        ..pull_policy()
    });
    let mut current = 5;
    let d = run.follow(LATE, LATE + 600.0, &mut current, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 2));
}

#[test]
fn initial_cooldown_counts_from_creation() {
    let policy = Policy {
        initial_cooldown: Duration::from_secs(120),
        ..pull_policy()
    };
    let mut run = Run::new(policy);
    run.state = State::default().created_at(run.at(LATE));
    let d = run.tick(LATE + 119.0, 1, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 1));
    let d = run.tick(LATE + 120.0, 1, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 0));
    // Without `created_at`, the first decision is creation.
    let mut run = Run::new(Policy {
        initial_cooldown: Duration::from_secs(120),
        ..pull_policy()
    });
    assert_eq!(run.tick(LATE, 1, &[metric(0.0)]).step, Step::Scale);
    assert_eq!(run.tick(LATE + 120.0, 1, &[metric(0.0)]).step, Step::Idle);
}

#[test]
fn never_idles_in_the_first_stable_window_after_the_lease() {
    let mut run = Run::new(pull_policy());
    run.lease_at = LATE;
    for s in 0..60 {
        let d = run.tick(LATE + f64::from(s), 2, &[metric(0.0)]);
        assert_eq!((d.step, d.replicas), (Step::Scale, 2), "at {s}");
    }
    let d = run.tick(LATE + 60.0, 2, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 0));
}

#[test]
fn idle_beats_panic_and_stabilization() {
    let mut run = Run::new(Policy {
        cooldown: Duration::from_secs(5),
        ..http_policy()
    });
    let mut current = 1;
    // A burst on one replica: panic.
    let d = run.follow(LATE, LATE + 3.0, &mut current, &[http(100.0, true)]);
    assert!(d.panicking);
    // Silence from +4: panic lasts a stable window, stabilization holds the count,
    // but the cooldown (5 s after the last active moment, +3) ends it first.
    let d = run.follow(LATE + 4.0, LATE + 7.0, &mut current, &[http(0.0, false)]);
    assert!(d.panicking);
    assert!(d.replicas >= 10);
    let d = run.tick(LATE + 8.0, current, &[http(0.0, false)]);
    assert_eq!((d.step, d.replicas, d.panicking), (Step::Idle, 0, false));
}

#[test]
fn a_transparent_http_only_object_never_idles_once_warm() {
    let mut run = Run::new(Policy {
        transparent_http_only: true,
        ..http_policy()
    });
    // Cold: it rests at zero, and wakes on demand.
    let d = run.tick(LATE, 0, &[http(0.0, false)]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 0));
    let d = run.tick(LATE + 1.0, 0, &[http(1.0, true)]);
    assert_eq!((d.step, d.replicas), (Step::Wake, 1));
    // Warm traffic bypasses the activator: silence for an hour keeps one replica.
    let mut current = 1;
    let d = run.follow(LATE + 2.0, LATE + 3600.0, &mut current, &[http(0.0, false)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 1));
    // Even if someone takes it to zero, the floor brings it back.
    let d = run.tick(LATE + 3601.0, 0, &[http(0.0, false)]);
    assert_eq!(d.replicas, 1);
}

// ------------------------------------------------------------------------------ wake

#[test]
fn wake_uses_the_burst_and_ignores_the_rates() {
    let mut run = Run::new(Policy {
        max_scale_up_rate: 1.0,
        ..http_policy()
    });
    for s in 0..60 {
        run.tick(LATE + f64::from(s), 0, &[http(0.0, false)]);
    }
    // One sample of 1000 after a minute of silence: stable average ≈ 16 (→ 2), panic
    // window (6 s) average ≈ 167 (→ 17).
    let d = run.tick(LATE + 60.0, 0, &[http(1000.0, true)]);
    assert_eq!((d.step, d.replicas), (Step::Wake, 17));
    // Next tick, pods not ready yet: the wake's desire holds the count.
    let d = run.tick_with(LATE + 61.0, 17, &[http(1000.0, true)], |i| i.ready = 0);
    assert_eq!(d.replicas, 17);
}

#[test]
fn wake_respects_min_and_max() {
    let mut run = Run::new(Policy {
        min: 4,
        idle: Some(0),
        max: 10,
        ..pull_policy()
    });
    assert_eq!(run.tick(LATE, 0, &[metric(1.0)]).replicas, 4);
    assert_eq!(run.tick(LATE + 1.0, 0, &[metric(1000.0)]).replicas, 10);
}

// ----------------------------------------------------------------------------- scale

#[test]
fn scale_up_is_immediate_but_capped_by_the_rate() {
    let mut run = Run::new(Policy {
        max_scale_up_rate: 2.0,
        ..pull_policy()
    });
    let d = run.tick(LATE, 2, &[metric(100.0)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 4));
    // ready 0 counts as 1.
    let d = run.tick_with(LATE + 1.0, 4, &[metric(100.0)], |i| i.ready = 0);
    assert_eq!(d.replicas, 4);
    let d = run.tick(LATE + 2.0, 4, &[metric(100.0)]);
    assert_eq!(d.replicas, 8);
}

#[test]
fn scale_down_waits_for_the_stable_window_and_the_rate() {
    let mut run = Run::new(pull_policy());
    let mut current = 10;
    run.follow(LATE, LATE + 10.0, &mut current, &[metric(100.0)]);
    assert_eq!(current, 10);
    // Demand drops to 2 at +11; the last D of 10 (at +10) stays in the window for
    // 60 s, up to +69.
    let d = run.follow(LATE + 11.0, LATE + 69.0, &mut current, &[metric(20.0)]);
    assert_eq!(d.replicas, 10);
    // Then down, but not below ready / 2 per decision.
    let d = run.tick(LATE + 70.0, current, &[metric(20.0)]);
    assert_eq!(d.replicas, 5);
    let d = run.tick(LATE + 71.0, 5, &[metric(20.0)]);
    assert_eq!(d.replicas, 2);
}

#[test]
fn hpa_scale_down_window_replaces_the_stable_window() {
    let mut run = Run::new(Policy {
        scale_down: ScalingRules {
            stabilization_window: Some(Duration::from_secs(10)),
            ..ScalingRules::default()
        },
        max_scale_down_rate: 100.0,
        ..pull_policy()
    });
    let mut current = 10;
    run.follow(LATE, LATE + 10.0, &mut current, &[metric(100.0)]);
    let d = run.follow(LATE + 11.0, LATE + 19.0, &mut current, &[metric(20.0)]);
    assert_eq!(d.replicas, 10);
    let d = run.tick(LATE + 20.0, current, &[metric(20.0)]);
    assert_eq!(d.replicas, 2);
}

#[test]
fn hpa_scale_up_window_takes_the_lowest_recent_recommendation() {
    let mut run = Run::new(Policy {
        scale_up: ScalingRules {
            stabilization_window: Some(Duration::from_secs(5)),
            ..ScalingRules::default()
        },
        ..pull_policy()
    });
    let mut current = 1;
    run.follow(LATE, LATE + 10.0, &mut current, &[metric(10.0)]);
    let d = run.follow(LATE + 11.0, LATE + 14.0, &mut current, &[metric(50.0)]);
    assert_eq!(d.replicas, 1);
    let d = run.tick(LATE + 15.0, current, &[metric(50.0)]);
    assert_eq!(d.replicas, 5);
}

#[test]
fn hpa_policies_limit_changes_per_period() {
    let pods_up = ScalingRules {
        policies: vec![RatePolicy {
            kind: RateKind::Pods,
            value: 4,
            period: Duration::from_secs(60),
        }],
        ..ScalingRules::default()
    };
    let mut run = Run::new(Policy {
        scale_up: pods_up.clone(),
        ..pull_policy()
    });
    let mut current = 1;
    let d = run.tick(LATE, current, &[metric(200.0)]);
    assert_eq!(d.replicas, 5);
    current = d.replicas;
    // Within the period the 4 pods are spent.
    let d = run.follow(LATE + 1.0, LATE + 59.0, &mut current, &[metric(200.0)]);
    assert_eq!(d.replicas, 5);
    let d = run.tick(LATE + 60.0, current, &[metric(200.0)]);
    assert_eq!(d.replicas, 9);

    // Percent and Pods together: selectPolicy Max takes the larger allowance, Min the
    // smaller.
    for (select, want) in [(Select::Max, 20), (Select::Min, 14)] {
        let mut rules = pods_up.clone();
        rules.policies.push(RatePolicy {
            kind: RateKind::Percent,
            value: 100,
            period: Duration::from_secs(15),
        });
        rules.policies[0].value = 4;
        rules.select = select;
        let mut run = Run::new(Policy {
            scale_up: rules,
            ..pull_policy()
        });
        assert_eq!(
            run.tick(LATE, 10, &[metric(500.0)]).replicas,
            want,
            "{select:?}"
        );
    }

    // Scale-down: 50 % per 60 s.
    let mut run = Run::new(Policy {
        scale_down: ScalingRules {
            stabilization_window: Some(Duration::ZERO),
            policies: vec![RatePolicy {
                kind: RateKind::Percent,
                value: 50,
                period: Duration::from_secs(60),
            }],
            select: Select::Max,
        },
        max_scale_down_rate: 100.0,
        ..pull_policy()
    });
    let mut current = 16;
    let d = run.tick(LATE, current, &[metric(10.0)]);
    assert_eq!(d.replicas, 8);
    current = d.replicas;
    let d = run.follow(LATE + 1.0, LATE + 59.0, &mut current, &[metric(10.0)]);
    assert_eq!(d.replicas, 8);
    let d = run.tick(LATE + 60.0, current, &[metric(10.0)]);
    assert_eq!(d.replicas, 4);
}

#[test]
fn select_policy_disabled_forbids_that_direction() {
    let disabled = ScalingRules {
        select: Select::Disabled,
        ..ScalingRules::default()
    };
    let mut run = Run::new(Policy {
        scale_down: disabled.clone(),
        ..pull_policy()
    });
    let mut current = 6;
    let d = run.follow(LATE, LATE + 300.0, &mut current, &[metric(10.0)]);
    assert_eq!(d.replicas, 6);
    let mut run = Run::new(Policy {
        scale_up: disabled,
        ..pull_policy()
    });
    assert_eq!(run.tick(LATE, 2, &[metric(90.0)]).replicas, 2);
}

#[test]
fn panic_starts_holds_and_ends_a_stable_window_later() {
    // No stabilization and no scale-down rate: only panic can hold the count.
    let mut run = Run::new(Policy {
        stable_window: Duration::from_secs(20),
        scale_down: ScalingRules {
            stabilization_window: Some(Duration::ZERO),
            ..ScalingRules::default()
        },
        max_scale_down_rate: 1000.0,
        ..http_policy()
    });
    // Two ready replicas at target: no panic.
    let mut current = 2;
    let d = run.follow(LATE, LATE + 30.0, &mut current, &[http(20.0, true)]);
    assert!(!d.panicking);
    assert_eq!(d.replicas, 2);
    // Panic window (2 s) sees 80 → 8 ≥ 200 % of 2 ready: panic, and the count jumps
    // to the panic desire, not the stable one.
    let d = run.tick(LATE + 31.0, 2, &[http(80.0, true)]);
    assert!(d.panicking);
    assert!(d.replicas >= 5, "panic desire, got {}", d.replicas);
    current = d.replicas;
    // Demand falls back at once: no scale-down while panicking.
    let mut t = LATE + 32.0;
    while t < LATE + 51.0 {
        let d = run.tick(t, current, &[http(20.0, true)]);
        assert!(d.panicking, "at {t}");
        assert!(d.replicas >= current, "scaled down in panic at {t}");
        current = d.replicas;
        t += 1.0;
    }
    // A stable window after the last time over the threshold, panic ends, and the
    // count follows the stable desire down.
    let d = run.tick(LATE + 51.0, current, &[http(20.0, true)]);
    assert!(!d.panicking);
    assert!(d.replicas < current, "{} → {}", current, d.replicas);
}

#[test]
fn no_panic_without_ready_replicas() {
    let mut run = Run::new(http_policy());
    let d = run.tick_with(LATE, 1, &[http(500.0, true)], |i| i.ready = 0);
    assert!(!d.panicking);
}

#[test]
fn a_new_leader_does_not_scale_down_in_its_first_stable_window() {
    let mut run = Run::new(pull_policy());
    run.lease_at = LATE;
    run.state = State::seeded(run.at(LATE), 8, Some(10));
    let mut current = 8;
    for s in 0..60 {
        let d = run.tick(LATE + f64::from(s), current, &[metric(20.0)]);
        assert!(d.replicas >= 8, "scaled down at {s}");
        current = d.replicas;
    }
    let d = run.tick(LATE + 60.0, current, &[metric(20.0)]);
    assert_eq!(d.replicas, 4, "then down, at most by half");
    // Up is allowed at once inside the window.
    let mut run = Run::new(pull_policy());
    run.lease_at = LATE;
    run.state = State::seeded(run.at(LATE), 2, None);
    assert_eq!(run.tick(LATE, 2, &[metric(90.0)]).replicas, 9);
}

#[test]
fn the_seed_holds_for_the_window_even_without_the_lease_rule() {
    // The last desired count (10) is above current (8): the down window keeps the
    // count from falling below... the current count, and never raises it to the seed.
    let mut run = Run::new(pull_policy());
    run.state = State::seeded(run.at(LATE), 8, Some(10));
    let d = run.tick(LATE + 1.0, 8, &[metric(20.0)]);
    assert_eq!(d.replicas, 8);
    let d = run.tick(LATE + 61.0, 8, &[metric(20.0)]);
    assert_eq!(d.replicas, 4);
}

#[test]
fn scale_never_goes_to_zero() {
    // min 0 but the cooldown has not passed: the scale step stops at 1.
    let mut run = Run::new(Policy {
        stable_window: Duration::from_secs(1),
        max_scale_down_rate: 100.0,
        cooldown: Duration::from_secs(3600),
        ..pull_policy()
    });
    let mut current = 5;
    run.tick(LATE, current, &[metric(50.0)]);
    let d = run.follow(LATE + 1.0, LATE + 100.0, &mut current, &[metric(0.0)]);
    assert_eq!((d.step, d.replicas), (Step::Scale, 1));
}

#[test]
fn more_readings_than_policies_and_a_changed_list_do_not_panic() {
    let mut run = Run::new(pull_policy());
    let d = run.tick(LATE, 1, &[metric(20.0), http(30.0, true)]);
    assert_eq!(d.desired_per_trigger, vec![Some(2), Some(3)]);
    let d = run.tick(LATE + 1.0, 1, &[metric(20.0)]);
    assert_eq!(d.desired_per_trigger, vec![Some(2)]);
    let d = run.tick(LATE + 40.0, 1, &[]);
    assert_eq!((d.step, d.replicas), (Step::Idle, 0));
}

// ------------------------------------------------------------------------- from_spec

#[test]
fn from_spec_applies_defaults() {
    let spec: ScaledObjectSpec = serde_yaml::from_str(
        "{scaleTargetRef: {name: h}, triggers: [{type: http, metadata: {}}, {type: kafka, name: lag, metricType: Value, metadata: {}}]}",
    )
    .expect("valid spec");
    let p = Policy::from_spec(&spec, true);
    assert_eq!(
        p,
        Policy {
            triggers: vec![
                TriggerPolicy {
                    name: "http".into(),
                    value_metric: false
                },
                TriggerPolicy {
                    name: "lag".into(),
                    value_metric: true
                },
            ],
            transparent_http_only: true,
            ..Policy::default()
        }
    );
    assert_eq!(p.cooldown, Duration::from_secs(30));
    assert_eq!(p.max, 100);
}

#[test]
fn from_spec_reads_every_field() {
    let spec: ScaledObjectSpec = serde_yaml::from_str(
        r#"
scaleTargetRef: {name: h}
minReplicaCount: 2
maxReplicaCount: 9
idleReplicaCount: 1
cooldownPeriod: 7
initialCooldownPeriod: 11
pollingInterval: 2
fallback: {failureThreshold: 3, replicas: 4, behavior: currentReplicasIfHigher}
advanced:
  stableWindowSeconds: 30
  panicWindowPercentage: 20
  panicThresholdPercentage: 150
  maxScaleUpRate: 10
  maxScaleDownRate: 1.5
  horizontalPodAutoscalerConfig:
    behavior:
      scaleUp:
        stabilizationWindowSeconds: 5
        selectPolicy: Min
        policies: [{type: Pods, value: 4, periodSeconds: 15}, {type: Percent, value: 100, periodSeconds: 30}]
      scaleDown:
        stabilizationWindowSeconds: 120
        selectPolicy: Disabled
triggers: [{type: rabbitmq, metricType: AverageValue, metadata: {queueName: q}}]
"#,
    )
    .expect("valid spec");
    let p = Policy::from_spec(&spec, false);
    assert_eq!((p.min, p.max, p.idle), (2, 9, Some(1)));
    assert_eq!(p.cooldown, Duration::from_secs(7));
    assert_eq!(p.polling_interval, Duration::from_secs(2));
    assert_eq!(p.initial_cooldown, Duration::from_secs(11));
    assert_eq!(p.stable_window, Duration::from_secs(30));
    assert_eq!(
        (
            p.panic_window_percentage,
            p.panic_threshold_percentage,
            p.max_scale_up_rate,
            p.max_scale_down_rate
        ),
        (20.0, 150.0, 10.0, 1.5)
    );
    assert_eq!(
        p.fallback
            .as_ref()
            .map(|f| (f.failure_threshold, f.replicas, f.behavior())),
        Some((3, 4, FallbackBehavior::CurrentReplicasIfHigher))
    );
    assert_eq!(
        p.scale_up,
        ScalingRules {
            stabilization_window: Some(Duration::from_secs(5)),
            policies: vec![
                RatePolicy {
                    kind: RateKind::Pods,
                    value: 4,
                    period: Duration::from_secs(15)
                },
                RatePolicy {
                    kind: RateKind::Percent,
                    value: 100,
                    period: Duration::from_secs(30)
                },
            ],
            select: Select::Min,
        }
    );
    assert_eq!(
        p.scale_down,
        ScalingRules {
            stabilization_window: Some(Duration::from_secs(120)),
            policies: vec![],
            select: Select::Disabled,
        }
    );
    assert_eq!(p.triggers, vec![trigger("rabbitmq")]);
    assert!(!p.transparent_http_only);
}

// ------------------------------------------------------------------------ properties

mod properties {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    struct Kind {
        http: bool,
        value_metric: bool,
    }

    fn policy(allow_value_metric: bool) -> impl Strategy<Value = (Policy, Vec<Kind>)> {
        let kinds = prop::collection::vec(
            (any::<bool>(), prop::bool::weighted(0.2)).prop_map(move |(http, v)| Kind {
                http,
                value_metric: allow_value_metric && !http && v,
            }),
            1..=3,
        );
        let fb = prop::option::of((
            0..4_i32,
            0..6_i32,
            prop::sample::select(vec![
                FallbackBehavior::Static,
                FallbackBehavior::CurrentReplicas,
                FallbackBehavior::CurrentReplicasIfHigher,
                FallbackBehavior::CurrentReplicasIfLower,
            ]),
        ));
        let rates = (
            prop::option::of(0..40_u64),
            prop::option::of((1..5_i32, 1..30_u64)),
            prop::option::of((10..200_i32, 1..30_u64)),
        );
        (
            (0..4_i32, 1..30_i32, prop::option::of(0..4_i32)),
            (
                prop_oneof![Just(0_u64), 0..40_u64],
                prop_oneof![Just(0_u64), 0..30_u64],
                1..30_u64,
                1..8_u64,
            ),
            (5.0..50.0_f64, 110.0..400.0_f64, 1.0..10.0_f64, 1.0..4.0_f64),
            fb,
            kinds,
            any::<bool>(),
            rates,
        )
            .prop_map(
                |(
                    (min, extra, idle),
                    (cooldown, initial, stable, polling),
                    (pwp, ptp, up, down),
                    fb,
                    kinds,
                    transparent,
                    (down_window, pods_up, percent_down),
                )| {
                    let policy = Policy {
                        min,
                        max: min + extra,
                        idle: idle.filter(|i| *i < min),
                        cooldown: Duration::from_secs(cooldown),
                        initial_cooldown: Duration::from_secs(initial),
                        stable_window: Duration::from_secs(stable),
                        panic_window_percentage: pwp,
                        panic_threshold_percentage: ptp,
                        max_scale_up_rate: up,
                        max_scale_down_rate: down,
                        polling_interval: Duration::from_secs(polling),
                        fallback: fb.map(|(t, r, b)| Fallback {
                            behavior: Some(b),
                            failure_threshold: t,
                            replicas: r,
                        }),
                        triggers: kinds
                            .iter()
                            .map(|k| TriggerPolicy {
                                name: "t".into(),
                                value_metric: k.value_metric,
                            })
                            .collect(),
                        transparent_http_only: transparent,
                        scale_up: ScalingRules {
                            policies: pods_up
                                .map(|(v, p)| RatePolicy {
                                    kind: RateKind::Pods,
                                    value: v,
                                    period: Duration::from_secs(p),
                                })
                                .into_iter()
                                .collect(),
                            ..ScalingRules::default()
                        },
                        scale_down: ScalingRules {
                            stabilization_window: down_window.map(Duration::from_secs),
                            policies: percent_down
                                .map(|(v, p)| RatePolicy {
                                    kind: RateKind::Percent,
                                    value: v,
                                    period: Duration::from_secs(p),
                                })
                                .into_iter()
                                .collect(),
                            select: Select::Max,
                        },
                    };
                    (policy, kinds)
                },
            )
    }

    /// One trigger's raw draw: (failed, value, activation, active flag).
    type Draw = (bool, f64, f64, bool);

    fn draw() -> impl Strategy<Value = Draw> {
        (
            prop::bool::weighted(0.12),
            prop_oneof![Just(0.0), 0.0..200.0_f64],
            prop_oneof![Just(0.0), 0.0..20.0_f64],
            any::<bool>(),
        )
    }

    fn reading(kind: &Kind, (failed, value, activation, active): Draw) -> Reading {
        if failed {
            Reading::Failed
        } else if kind.http {
            Reading::Http {
                concurrency: value,
                target: 10.0,
                // The demand protocol calls it active whenever there is concurrency.
                active: active || value > 0.0,
            }
        } else {
            Reading::Metric {
                value,
                target: 10.0,
                activation,
            }
        }
    }

    #[derive(Clone, Debug)]
    struct Event {
        dt_ms: u64,
        draws: Vec<Draw>,
        paused: Option<Paused>,
        conflict: bool,
        stalled: bool,
        held: bool,
        /// Someone else set the count (or a PATCH did not land).
        external: Option<i32>,
        ready_fraction: f64,
    }

    fn event() -> impl Strategy<Value = Event> {
        (
            prop_oneof![Just(1000_u64), Just(400), 0..5000_u64],
            prop::collection::vec(draw(), 3),
            prop::option::weighted(
                0.05,
                prop_oneof![(0..40_i32).prop_map(Paused::At), Just(Paused::Hold)],
            ),
            prop::bool::weighted(0.04),
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.1),
            prop::option::weighted(0.04, 0..50_i32),
            prop_oneof![Just(1.0), 0.0..1.0_f64],
        )
            .prop_map(
                |(dt_ms, draws, paused, conflict, stalled, held, external, ready_fraction)| Event {
                    dt_ms,
                    draws,
                    paused,
                    conflict,
                    stalled,
                    held,
                    external,
                    ready_fraction,
                },
            )
    }

    fn check(
        policy: &Policy,
        input: &Input<'_>,
        d: &Decision,
        warm_seen: bool,
    ) -> Result<(), TestCaseError> {
        let r = d.replicas;
        let current = input.current;
        let free = input.paused.is_some() || input.conflict;
        let active = input.held_work
            || input.triggers.iter().any(|t| match *t {
                Reading::Metric {
                    value, activation, ..
                } => value > activation,
                Reading::Http { active, .. } => active,
                Reading::Failed => false,
            });
        prop_assert_eq!(d.active, active);

        // Within [min, max] or at the idle level / zero, as the steps allow.
        if !free {
            let at_idle = r == 0 || Some(r) == policy.idle;
            prop_assert!(
                (policy.min..=policy.max).contains(&r) || at_idle,
                "{r} outside [{}, {}]",
                policy.min,
                policy.max
            );
            prop_assert!(r <= policy.max);
            if matches!(d.step, Step::Scale | Step::Wake) {
                prop_assert!(r >= policy.min.max(1));
            }
            if policy.transparent_http_only && warm_seen {
                prop_assert!(r >= 1, "transparent http-only went to {r} once warm");
            }
        }
        // Never to zero while something is active.
        if r == 0 && current > 0 && input.paused.is_none() {
            prop_assert!(!active, "to zero while active ({:?})", d.step);
        }
        if r == 0 && active && input.paused.is_none() {
            prop_assert!(
                current == 0 && matches!(d.step, Step::Conflict | Step::Stalled),
                "zero while active at {:?}",
                d.step
            );
        }
        // Never to zero because of an error, unless fallback.replicas is 0.
        let failing = input.triggers.contains(&Reading::Failed);
        if r == 0 && current > 0 && failing && input.paused.is_none() {
            prop_assert_eq!(d.step, Step::Fallback);
            prop_assert_eq!(policy.fallback.as_ref().map(|f| f.replicas), Some(0));
        }
        // No scale-down in panic (scale step) or in the lease window.
        let floor = current.min(policy.max);
        if d.panicking && d.step == Step::Scale {
            prop_assert!(r >= floor, "down in panic: {current} → {r}");
        }
        let lease_window =
            input.now.saturating_duration_since(input.lease_acquired_at) < policy.stable_window;
        if lease_window && !free && d.step != Step::Fallback {
            prop_assert!(
                r >= floor,
                "down in lease window: {current} → {r} ({:?})",
                d.step
            );
        }
        Ok(())
    }

    struct Sim {
        base: Instant,
        t: Duration,
        current: i32,
        warm_seen: bool,
    }

    impl Sim {
        fn step(
            &mut self,
            policy: &Policy,
            state: &mut State,
            lease_at: Duration,
            readings: &[Reading],
            ev: &Event,
        ) -> Result<Decision, TestCaseError> {
            if let Some(n) = ev.external {
                self.current = n;
            }
            let ready = (f64::from(self.current) * ev.ready_fraction).floor() as i32;
            let input = Input {
                now: self.base + self.t,
                current: self.current,
                ready,
                paused: ev.paused,
                conflict: ev.conflict,
                stalled: ev.stalled,
                triggers: readings,
                held_work: ev.held,
                lease_acquired_at: self.base + lease_at,
            };
            self.warm_seen |= self.current >= 1;
            let d = decide(policy, state, &input);
            check(policy, &input, &d, self.warm_seen)?;
            self.current = d.replicas;
            Ok(d)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn invariants_hold_over_any_history(
            (policy, kinds) in policy(true),
            start in 0..20_i32,
            lease_at in 0..120_u64,
            seeded in any::<bool>(),
            events in prop::collection::vec(event(), 1..250),
        ) {
            let base = Instant::now();
            let lease_at = Duration::from_secs(lease_at);
            let mut state = if seeded {
                State::seeded(base + lease_at, start, Some(start + 1))
            } else {
                State::default()
            };
            let mut sim = Sim { base, t: Duration::ZERO, current: start, warm_seen: seeded && start >= 1 };
            for ev in &events {
                sim.t += Duration::from_millis(ev.dt_ms);
                let readings: Vec<Reading> =
                    kinds.iter().zip(&ev.draws).map(|(k, d)| reading(k, *d)).collect();
                sim.step(&policy, &mut state, lease_at, &readings, ev)?;
            }
        }

        #[test]
        fn constant_demand_settles_and_stays(
            (policy, kinds) in policy(false),
            start in 0..20_i32,
            events in prop::collection::vec(event(), 0..80),
            constant in prop::collection::vec(draw(), 3),
            held in prop::bool::weighted(0.2),
        ) {
            let base = Instant::now();
            let mut state = State::default();
            let mut sim = Sim { base, t: Duration::ZERO, current: start, warm_seen: false };
            for ev in &events {
                sim.t += Duration::from_millis(ev.dt_ms);
                let readings: Vec<Reading> =
                    kinds.iter().zip(&ev.draws).map(|(k, d)| reading(k, *d)).collect();
                sim.step(&policy, &mut state, Duration::ZERO, &readings, ev)?;
            }
            // Constant, healthy readings, every second, the caller applying each count
            // and every replica ready.
            let readings: Vec<Reading> = kinds
                .iter()
                .zip(&constant)
                .map(|(k, &(_, v, a, act))| reading(k, (false, v, a, act)))
                .collect();
            let calm = Event {
                dt_ms: 1000,
                draws: vec![],
                paused: None,
                conflict: false,
                stalled: false,
                held,
                external: None,
                ready_fraction: 1.0,
            };
            // Settled: unchanged for longer than every window, cooldown and policy
            // period together. A panic counts twice: it holds for a stable window after
            // its last trigger, and the desires of its last seconds stay in the
            // scale-down window for another. The slowest generated rate policy (1 pod
            // or 10 % per 29 s) crosses the whole range well within the 4000 s allowed.
            let rules = |r: &ScalingRules| {
                r.policies.iter().map(|p| p.period).max().unwrap_or_default()
                    + r.stabilization_window.unwrap_or_default()
            };
            let span = (policy.stable_window * 2
                + policy.cooldown
                + policy.initial_cooldown
                + rules(&policy.scale_up)
                + rules(&policy.scale_down))
            .as_secs()
                + 10;
            let mut unchanged = 0;
            let mut elapsed = 0;
            while unchanged < span {
                prop_assert!(elapsed < 4000, "still moving after {} s", elapsed);
                let before = sim.current;
                sim.t += Duration::from_secs(1);
                sim.step(&policy, &mut state, Duration::ZERO, &readings, &calm)?;
                unchanged = if sim.current == before { unchanged + 1 } else { 0 };
                elapsed += 1;
            }
            // And it stays put.
            let settled = sim.current;
            for k in 0..(policy.stable_window.as_secs() * 2 + 30) {
                sim.t += Duration::from_secs(1);
                let d = sim.step(&policy, &mut state, Duration::ZERO, &readings, &calm)?;
                prop_assert_eq!(d.replicas, settled, "moved {} s after settling", k);
            }
        }
    }
}
