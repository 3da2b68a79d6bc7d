//! When to try again what the API server refused: per key, a delay that doubles with
//! each consecutive failure, from `first` up to `max`, so a refusal that lasts (an
//! admission policy, a webhook down) costs a write every few minutes per key, not one
//! every few seconds. Pure: the caller passes the time.

use std::{
    collections::{BTreeSet, HashMap},
    hash::Hash,
    time::Duration,
};

use tokio::time::Instant;

#[derive(Debug)]
pub struct Retries<K> {
    pending: HashMap<K, Pending>,
    /// The keys with a try to come, by when: the loop asks for the earliest after
    /// every event, so it must not cost a scan of every key.
    schedule: BTreeSet<(Instant, K)>,
    first: Duration,
    max: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Consecutive failures so far.
    failures: u32,
    /// When it is tried again; `None` while a try is under way.
    due: Option<Instant>,
}

impl<K: Ord + Hash + Clone> Retries<K> {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            pending: HashMap::new(),
            schedule: BTreeSet::new(),
            first,
            max: max.max(first),
        }
    }

    /// The wait before the try after `failures` consecutive failures.
    pub fn delay_after(&self, failures: u32) -> Duration {
        delay_after(self.first, self.max, failures)
    }

    /// Records one more consecutive failure of `key` at `now`; returns the wait before
    /// it is tried again.
    pub fn failed(&mut self, key: K, now: Instant) -> Duration {
        let pending = self.pending.entry(key.clone()).or_insert(Pending {
            failures: 0,
            due: None,
        });
        pending.failures = pending.failures.saturating_add(1);
        let failures = pending.failures;
        let delay = delay_after(self.first, self.max, failures);
        let due = now + delay;
        if let Some(before) = pending.due.replace(due) {
            self.schedule.remove(&(before, key.clone()));
        }
        self.schedule.insert((due, key));
        delay
    }

    /// Forgets `key`: it worked, or there is nothing left to do for it.
    pub fn succeeded(&mut self, key: &K) {
        if let Some(Pending { due: Some(due), .. }) = self.pending.remove(key) {
            self.schedule.remove(&(due, key.clone()));
        }
    }

    /// The keys due at `now`. Their failures are remembered (the next failure waits
    /// longer) but they are not due again until they fail again.
    pub fn take_due(&mut self, now: Instant) -> Vec<K> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.schedule.first()
            && *at <= now
        {
            let Some((_, key)) = self.schedule.pop_first() else {
                break;
            };
            if let Some(pending) = self.pending.get_mut(&key) {
                pending.due = None;
            }
            due.push(key);
        }
        due
    }

    /// The earliest time a key is due, if any is.
    pub fn next_due(&self) -> Option<Instant> {
        self.schedule.first().map(|(at, _)| *at)
    }

    /// Consecutive failures of `key` so far.
    pub fn failures(&self, key: &K) -> u32 {
        self.pending.get(key).map_or(0, |p| p.failures)
    }
}

fn delay_after(first: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    first
        .checked_mul(1 << doublings)
        .map_or(max, |delay| delay.min(max))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const FIRST: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn the_delay_doubles_from_the_first_up_to_the_max() {
        let retries = Retries::<u8>::new(FIRST, MAX);
        for (failures, seconds) in [
            (1, 5),
            (2, 10),
            (3, 20),
            (4, 40),
            (5, 80),
            (6, 160),
            (7, 300),
            (8, 300),
            (40, 300),
            (u32::MAX, 300),
        ] {
            assert_eq!(
                retries.delay_after(failures),
                Duration::from_secs(seconds),
                "after {failures} failures"
            );
        }
    }

    #[test]
    fn a_key_is_due_once_per_failure_and_forgotten_on_success() {
        let start = Instant::now();
        let mut retries = Retries::new(FIRST, MAX);
        assert_eq!(retries.failed("a", start), FIRST);
        assert_eq!(retries.next_due(), Some(start + FIRST));
        assert!(retries.take_due(start + FIRST / 2).is_empty());
        assert_eq!(retries.take_due(start + FIRST), vec!["a"]);
        // Under way: not due again, however late it gets, until it fails again.
        assert_eq!(retries.next_due(), None);
        assert!(retries.take_due(start + MAX * 10).is_empty());
        let again = start + FIRST;
        assert_eq!(retries.failed("a", again), 2 * FIRST);
        assert_eq!(retries.next_due(), Some(again + 2 * FIRST));
        assert_eq!(retries.failures(&"a"), 2);
        retries.succeeded(&"a");
        assert_eq!(retries.failures(&"a"), 0);
        assert_eq!(retries.next_due(), None);
        // A failure after a success starts from the first delay again.
        assert_eq!(retries.failed("a", again), FIRST);
    }

    #[test]
    fn keys_keep_their_own_counts_and_the_earliest_is_next() {
        let start = Instant::now();
        let mut retries = Retries::new(FIRST, MAX);
        retries.failed("old", start);
        retries.take_due(start + FIRST);
        retries.failed("old", start + FIRST); // due at 15 s
        retries.failed("new", start + Duration::from_secs(8)); // due at 13 s
        assert_eq!(retries.next_due(), Some(start + Duration::from_secs(13)));
        assert_eq!(
            retries.take_due(start + Duration::from_secs(13)),
            vec!["new"]
        );
        assert_eq!(retries.next_due(), Some(start + Duration::from_secs(15)));
        let mut due = retries.take_due(start + MAX);
        due.sort_unstable();
        assert_eq!(due, vec!["old"]);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Fail(u8),
        Succeed(u8),
        TakeDue,
        Wait(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..4).prop_map(Step::Fail),
            (0u8..4).prop_map(Step::Succeed),
            Just(Step::TakeDue),
            (0u16..400).prop_map(Step::Wait),
        ]
    }

    proptest! {
        /// The schedule agrees with a plain model: per key, its failures and when it
        /// is due, scanned.
        #[test]
        fn the_schedule_agrees_with_a_scan_of_every_key(steps in proptest::collection::vec(step(), 0..60)) {
            let start = Instant::now();
            let mut now = start;
            let mut retries = Retries::new(FIRST, MAX);
            let mut model: HashMap<u8, (u32, Option<Instant>)> = HashMap::new();
            for step in steps {
                match step {
                    Step::Fail(key) => {
                        let entry = model.entry(key).or_insert((0, None));
                        entry.0 += 1;
                        let delay = retries.failed(key, now);
                        prop_assert_eq!(delay, retries.delay_after(entry.0));
                        entry.1 = Some(now + delay);
                    }
                    Step::Succeed(key) => {
                        retries.succeeded(&key);
                        model.remove(&key);
                    }
                    Step::TakeDue => {
                        let mut taken = retries.take_due(now);
                        taken.sort_unstable();
                        let mut expected: Vec<u8> = model
                            .iter_mut()
                            .filter(|(_, (_, due))| due.is_some_and(|at| at <= now))
                            .map(|(key, (_, due))| {
                                *due = None;
                                *key
                            })
                            .collect();
                        expected.sort_unstable();
                        prop_assert_eq!(taken, expected);
                    }
                    Step::Wait(seconds) => now += Duration::from_secs(seconds.into()),
                }
                prop_assert_eq!(retries.next_due(), model.values().filter_map(|(_, due)| *due).min());
                for (key, (failures, _)) in &model {
                    prop_assert_eq!(retries.failures(key), *failures);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn delays_grow_and_stay_within_bounds(first_ms in 1u64..100_000, max_ms in 1u64..10_000_000, failures in 1u32..200) {
            let first = Duration::from_millis(first_ms);
            let retries = Retries::<u8>::new(first, Duration::from_millis(max_ms));
            let delay = retries.delay_after(failures);
            let next = retries.delay_after(failures + 1);
            prop_assert!(delay >= first);
            prop_assert!(delay <= Duration::from_millis(max_ms).max(first));
            prop_assert!(next >= delay);
            prop_assert!(next <= delay * 2);
        }
    }
}
