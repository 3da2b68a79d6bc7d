//! Time-weighted averages for the demand protocol: `inFlight` and `queued` are the
//! average of a count over the report interval, so a request that lived 100 ms of a
//! 1 s interval counts 0.1 — short, sparse requests are not read as zero.

use std::time::Instant;

/// A count and the integral of it over time since the last [`Gauge::take`].
#[derive(Debug, Clone)]
pub struct Gauge {
    value: u64,
    changed_at: Instant,
    window_start: Instant,
    /// count × seconds over `[window_start, changed_at]`.
    integral: f64,
}

impl Gauge {
    pub fn new(now: Instant) -> Self {
        Self {
            value: 0,
            changed_at: now,
            window_start: now,
            integral: 0.0,
        }
    }

    pub fn value(&self) -> u64 {
        self.value
    }

    pub fn increment(&mut self, now: Instant) {
        self.advance(now);
        self.value += 1;
    }

    pub fn decrement(&mut self, now: Instant) {
        self.advance(now);
        self.value = self.value.saturating_sub(1);
    }

    /// The average count over the window that ends `now`; a new window starts.
    pub fn take(&mut self, now: Instant) -> f64 {
        self.advance(now);
        let span = now
            .saturating_duration_since(self.window_start)
            .as_secs_f64();
        let average = if span > 0.0 {
            self.integral / span
        } else {
            self.value as f64
        };
        self.window_start = now;
        self.integral = 0.0;
        average
    }

    fn advance(&mut self, now: Instant) {
        let now = now.max(self.changed_at);
        self.integral += self.value as f64 * (now - self.changed_at).as_secs_f64();
        self.changed_at = now;
    }
}

/// One function's demand as one activator sees it, between two snapshots.
#[derive(Debug, Clone)]
pub struct DemandMeter {
    pub in_flight: Gauge,
    pub queued: Gauge,
    /// Arrivals since the last snapshot.
    pub requests: u64,
}

/// What a snapshot reports for one function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemandReading {
    pub in_flight: f64,
    pub queued: f64,
    pub requests: u64,
}

impl DemandReading {
    /// A snapshot lists only functions with a non-zero value.
    pub fn is_zero(&self) -> bool {
        self.in_flight == 0.0 && self.queued == 0.0 && self.requests == 0
    }
}

impl DemandMeter {
    pub fn new(now: Instant) -> Self {
        Self {
            in_flight: Gauge::new(now),
            queued: Gauge::new(now),
            requests: 0,
        }
    }

    pub fn take(&mut self, now: Instant) -> DemandReading {
        let reading = DemandReading {
            in_flight: self.in_flight.take(now),
            queued: self.queued.take(now),
            requests: self.requests,
        };
        self.requests = 0;
        reading
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_short_request_counts_by_its_share_of_the_interval() {
        let t0 = Instant::now();
        let mut g = Gauge::new(t0);
        g.increment(at(t0, 100));
        g.decrement(at(t0, 200));
        assert!((g.take(at(t0, 1000)) - 0.1).abs() < 1e-9);
        // The next window starts empty.
        assert_eq!(g.take(at(t0, 2000)), 0.0);
    }

    #[test]
    fn a_steady_count_averages_to_itself() {
        let t0 = Instant::now();
        let mut g = Gauge::new(t0);
        for _ in 0..3 {
            g.increment(t0);
        }
        assert!((g.take(at(t0, 1000)) - 3.0).abs() < 1e-9);
        assert!((g.take(at(t0, 2000)) - 3.0).abs() < 1e-9);
        assert_eq!(g.value(), 3);
    }

    #[test]
    fn table() {
        // (events as (ms, +1/-1), take at ms, expected average)
        type Case<'a> = (&'a [(u64, i8)], u64, f64);
        let cases: &[Case] = &[
            (&[], 1000, 0.0),
            (&[(0, 1)], 1000, 1.0),
            (&[(500, 1)], 1000, 0.5),
            (&[(0, 1), (0, 1), (500, -1)], 1000, 1.5),
            (&[(250, 1), (750, -1)], 1000, 0.5),
        ];
        for (events, end, expected) in cases {
            let t0 = Instant::now();
            let mut g = Gauge::new(t0);
            for (ms, delta) in *events {
                if *delta > 0 {
                    g.increment(at(t0, *ms));
                } else {
                    g.decrement(at(t0, *ms));
                }
            }
            let got = g.take(at(t0, *end));
            assert!(
                (got - expected).abs() < 1e-9,
                "{events:?}: {got} != {expected}"
            );
        }
    }

    proptest! {
        /// The average lies between the smallest and largest count the window saw.
        #[test]
        fn average_is_within_the_counts_seen(steps in proptest::collection::vec((1u64..200, any::<bool>()), 0..50)) {
            let t0 = Instant::now();
            let mut g = Gauge::new(t0);
            let (mut now, mut low, mut high) = (0u64, 0u64, 0u64);
            for (dt, up) in steps {
                now += dt;
                if up { g.increment(at(t0, now)) } else { g.decrement(at(t0, now)) }
                low = low.min(g.value());
                high = high.max(g.value());
            }
            let average = g.take(at(t0, now + 1));
            prop_assert!(average >= low as f64 - 1e-9 && average <= high as f64 + 1e-9);
        }
    }
}
