//! The HPA's `behavior` as Blink honours it (`horizontalPodAutoscalerConfig.behavior`):
//! stabilization windows over past recommendations, and `Percent` / `Pods` policies as
//! rate limits over their periods. Owns the per-function memory those need: the
//! recommendations of recent decisions and the scale changes Blink made.
//!
//! Only what the user wrote is applied. Where the HPA has defaults of its own (a 300 s
//! scale-down window, 100 % / 4 pods per 15 s up), Blink's KPA knobs stand in for them:
//! the scale-down window defaults to `stableWindowSeconds`, and `maxScaleUpRate` /
//! `maxScaleDownRate` always apply. The HPA's `tolerance` is not honoured: DESIGN.md
//! fixes each trigger's desire as `ceil(metric / target)`, and the stable window
//! already damps noise.

use std::collections::VecDeque;
use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::{HPAScalingRules, HorizontalPodAutoscalerBehavior};

/// How the limits of several policies combine (`selectPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Select {
    /// The policy that allows the largest change (the HPA's default).
    #[default]
    Max,
    /// The policy that allows the smallest change.
    Min,
    /// No change in this direction at all.
    Disabled,
}

/// What a policy's `value` counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateKind {
    /// Replicas per period.
    Pods,
    /// Percent of the replicas at the start of the period.
    Percent,
}

/// One `Pods` or `Percent` policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatePolicy {
    pub kind: RateKind,
    pub value: i32,
    pub period: Duration,
}

/// One direction of the HPA `behavior` (`scaleUp` or `scaleDown`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScalingRules {
    /// `stabilizationWindowSeconds`, when given.
    pub stabilization_window: Option<Duration>,
    /// The `Pods` / `Percent` policies; empty means no limit beyond Blink's own rates.
    pub policies: Vec<RatePolicy>,
    pub select: Select,
}

impl ScalingRules {
    /// The rules as written in one direction of an HPA `behavior`. A policy of a type
    /// other than `Pods` / `Percent`, or with a period that is not positive, limits
    /// nothing and is left out (the API server refuses both anyway).
    pub fn from_hpa(rules: &HPAScalingRules) -> Self {
        let policies = rules
            .policies
            .iter()
            .flatten()
            .filter_map(|p| {
                let kind = match p.type_.as_str() {
                    "Pods" => RateKind::Pods,
                    "Percent" => RateKind::Percent,
                    _ => return None,
                };
                let period = u64::try_from(p.period_seconds).ok().filter(|s| *s > 0)?;
                Some(RatePolicy {
                    kind,
                    value: p.value.max(0),
                    period: Duration::from_secs(period),
                })
            })
            .collect();
        let select = match rules.select_policy.as_deref() {
            Some("Min") => Select::Min,
            Some("Disabled") => Select::Disabled,
            _ => Select::Max,
        };
        Self {
            stabilization_window: rules
                .stabilization_window_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
            policies,
            select,
        }
    }

    /// Whether these rules can ever limit a change.
    pub(super) fn limits(&self) -> bool {
        self.select == Select::Disabled || !self.policies.is_empty()
    }

    fn longest_period(&self) -> u32 {
        self.policies
            .iter()
            .map(|p| secs(p.period))
            .max()
            .unwrap_or(0)
    }
}

/// `(scaleUp, scaleDown)` rules from an HPA `behavior`, empty when it is absent.
pub(super) fn rules_from(
    behavior: Option<&HorizontalPodAutoscalerBehavior>,
) -> (ScalingRules, ScalingRules) {
    let up = behavior
        .and_then(|b| b.scale_up.as_ref())
        .map(ScalingRules::from_hpa)
        .unwrap_or_default();
    let down = behavior
        .and_then(|b| b.scale_down.as_ref())
        .map(ScalingRules::from_hpa)
        .unwrap_or_default();
    (up, down)
}

/// Whole seconds of a duration, saturating (windows and periods are whole seconds in
/// the API).
pub(super) fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// Recommendations of recent decisions, one bucket per second of the decision clock
/// holding the lowest and highest recommendation of that second, so an extra decision
/// on a poke does not weigh more than a tick.
#[derive(Clone, Debug, Default)]
pub(super) struct Recommendations {
    buckets: VecDeque<(u32, i32, i32)>,
}

impl Recommendations {
    /// Records `desired` at second `sec`, keeping `keep` seconds of history.
    pub(super) fn record(&mut self, sec: u32, desired: i32, keep: u32) {
        match self.buckets.back_mut() {
            // A decision stamped earlier than the last one (an `Instant` taken before
            // the previous call) merges into the newest bucket rather than reordering.
            Some((last, lo, hi)) if *last >= sec => {
                *lo = (*lo).min(desired);
                *hi = (*hi).max(desired);
            }
            _ => self.buckets.push_back((sec, desired, desired)),
        }
        while let Some(&(first, _, _)) = self.buckets.front() {
            if first.saturating_add(keep) <= sec {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// The highest recommendation in the last `window` seconds up to `sec`.
    pub(super) fn max_within(&self, sec: u32, window: u32) -> Option<i32> {
        self.within(sec, window).map(|&(_, _, hi)| hi).max()
    }

    /// The lowest recommendation in the last `window` seconds up to `sec`.
    pub(super) fn min_within(&self, sec: u32, window: u32) -> Option<i32> {
        self.within(sec, window).map(|&(_, lo, _)| lo).min()
    }

    fn within(&self, sec: u32, window: u32) -> impl Iterator<Item = &(u32, i32, i32)> {
        self.buckets
            .iter()
            .rev()
            .take_while(move |&&(s, _, _)| s.saturating_add(window) > sec)
    }
}

/// Scale changes Blink decided, for the policies' "per period" accounting (the HPA
/// keeps the same record of its own scale events).
#[derive(Clone, Debug, Default)]
pub(super) struct ScaleEvents {
    events: VecDeque<(u32, i32)>,
}

impl ScaleEvents {
    /// Records a change of `delta` replicas at `sec`, when some policy can use it.
    pub(super) fn record(&mut self, sec: u32, delta: i32, up: &ScalingRules, down: &ScalingRules) {
        let keep = up.longest_period().max(down.longest_period());
        if keep > 0 && delta != 0 {
            self.events.push_back((sec, delta));
        }
        while let Some(&(first, _)) = self.events.front() {
            if first.saturating_add(keep) <= sec {
                self.events.pop_front();
            } else {
                break;
            }
        }
    }

    /// Replicas added (`up`) or removed (`!up`) in the last `period` seconds.
    fn changed_within(&self, sec: u32, period: u32, up: bool) -> i64 {
        self.events
            .iter()
            .rev()
            .take_while(|&&(s, _)| s.saturating_add(period) > sec)
            .map(|&(_, d)| i64::from(d))
            .filter(|d| if up { *d > 0 } else { *d < 0 })
            .map(i64::abs)
            .sum()
    }

    /// The most replicas the scale-up policies allow now, `None` when unlimited.
    pub(super) fn up_limit(&self, rules: &ScalingRules, sec: u32, current: i32) -> Option<i32> {
        if rules.select == Select::Disabled {
            return Some(current);
        }
        let limits = rules.policies.iter().map(|p| {
            // The count at the start of the period: what the period's scale-ups built on.
            let start =
                (i64::from(current) - self.changed_within(sec, secs(p.period), true)).max(0);
            match p.kind {
                RateKind::Pods => start + i64::from(p.value),
                RateKind::Percent => {
                    (start as f64 * (1.0 + f64::from(p.value) / 100.0)).ceil() as i64
                }
            }
        });
        let limit = match rules.select {
            Select::Min => limits.min(),
            _ => limits.max(),
        }?;
        Some(saturate(limit))
    }

    /// The fewest replicas the scale-down policies allow now, `None` when unlimited.
    pub(super) fn down_limit(&self, rules: &ScalingRules, sec: u32, current: i32) -> Option<i32> {
        if rules.select == Select::Disabled {
            return Some(current);
        }
        let limits = rules.policies.iter().map(|p| {
            let start = i64::from(current) + self.changed_within(sec, secs(p.period), false);
            let limit = match p.kind {
                RateKind::Pods => start - i64::from(p.value),
                RateKind::Percent => {
                    (start as f64 * (1.0 - f64::from(p.value) / 100.0)).floor() as i64
                }
            };
            limit.max(0)
        });
        // For scale-down the policy allowing the largest change gives the lowest count.
        let limit = match rules.select {
            Select::Min => limits.max(),
            _ => limits.min(),
        }?;
        Some(saturate(limit))
    }
}

fn saturate(v: i64) -> i32 {
    i32::try_from(v).unwrap_or(if v < 0 { 0 } else { i32::MAX })
}
