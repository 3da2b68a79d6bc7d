//! Knative KPA's windows for the `http` trigger: the stable-window and panic-window
//! averages of the 1 s concurrency samples, and the panic mode they drive.
//!
//! Samples are kept per whole second of the decision clock. Decisions run every 1 s
//! for an `http` trigger and also at once on a poke; an extra decision inside a second
//! would otherwise count as an extra sample and pull the average towards whatever it
//! read. Inside a second the highest sample is kept: a poke carries at least one
//! queued request, which is real demand. A second without any sample (a late tick) is
//! left out of the average rather than read as zero, since a missed tick is no
//! evidence of silence.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One `http` trigger's concurrency samples over the stable window.
///
/// Values are `f32`: concurrency needs no more precision, and 10,000 functions with a
/// 60 s window keep a few megabytes instead of twice that.
#[derive(Clone, Debug, Default)]
pub(super) struct Window {
    samples: VecDeque<(u32, f32)>,
}

impl Window {
    /// Records `value` at second `sec`, keeping `keep` seconds of samples.
    pub(super) fn record(&mut self, sec: u32, value: f64, keep: u32) {
        let value = if value.is_finite() && value > 0.0 {
            value as f32
        } else {
            0.0
        };
        match self.samples.back_mut() {
            // Same second (a poke next to a tick), or an `Instant` taken before the
            // last call: merge into the newest bucket rather than reorder.
            Some((last, v)) if *last >= sec => *v = v.max(value),
            _ => self.samples.push_back((sec, value)),
        }
        while let Some(&(first, _)) = self.samples.front() {
            if first.saturating_add(keep) <= sec {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// Mean of the samples in the last `window` seconds up to `sec`; `None` before the
    /// first sample. A window not yet full is averaged over what it holds, as Knative
    /// does after a revision starts.
    pub(super) fn average(&self, sec: u32, window: u32) -> Option<f64> {
        let (sum, n) = self
            .samples
            .iter()
            .rev()
            .take_while(|&&(s, _)| s.saturating_add(window) > sec)
            .fold((0.0_f64, 0_u32), |(sum, n), &(_, v)| {
                (sum + f64::from(v), n + 1)
            });
        (n > 0).then(|| sum / f64::from(n))
    }
}

/// The panic window in whole seconds: `panicWindowPercentage` of the stable window,
/// at least 1 s (Knative's bucket) and at most the stable window. Rounded, since
/// samples are whole seconds.
pub(super) fn panic_window_secs(stable_secs: u32, percentage: f64) -> u32 {
    let w = (f64::from(stable_secs) * percentage / 100.0).round();
    if w.is_finite() && w >= 1.0 {
        (w as u32).min(stable_secs.max(1))
    } else {
        1
    }
}

/// Whether a panic-window desire is over the panic threshold: `ready ≥ 1` and the
/// desire at least `threshold %` of `max(1, ready)`.
pub(super) fn over_threshold(panic_desire: i32, ready: i32, threshold_percentage: f64) -> bool {
    ready >= 1 && f64::from(panic_desire) >= threshold_percentage / 100.0 * f64::from(ready.max(1))
}

/// Panic mode: entered when the threshold is crossed, extended while it stays
/// crossed, left one stable window after the last moment it was crossed.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Panic {
    last_over: Option<Instant>,
}

impl Panic {
    /// Updates with this decision's test and returns whether the function panics.
    pub(super) fn update(&mut self, now: Instant, over: bool, stable_window: Duration) -> bool {
        if over {
            self.last_over = Some(now);
        } else if let Some(t) = self.last_over
            && now.saturating_duration_since(t) >= stable_window
        {
            self.last_over = None;
        }
        self.last_over.is_some()
    }

    pub(super) fn is_active(&self) -> bool {
        self.last_over.is_some()
    }

    /// Leaves panic mode (the function went idle: there is nothing left to protect).
    pub(super) fn end(&mut self) {
        self.last_over = None;
    }
}
