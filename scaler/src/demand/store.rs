//! The demand activators reported, per activator and per function, and its sum per
//! function. Pure: no I/O and no clock — every call that depends on time takes `now`.
//!
//! The rules (DESIGN.md, "The demand protocol"):
//! - A snapshot replaces everything its activator reported before, unless it is older
//!   than the last one applied from the same session (`seq` ≤ last): then it is
//!   dropped. A snapshot from a new session replaces the old session's state.
//! - A poke counts as at least one queued request from its activator for that one
//!   key; it changes neither `seq` nor other keys, and the next snapshot replaces it.
//! - An activator silent for longer than `stale_after` keeps its last values (silence
//!   is never read as zero demand) until its pod leaves the activator Service's
//!   endpoints, or `forget_after` passes. A reporter never seen in those endpoints (a
//!   test client) is kept until `forget_after`.
//!
//! Sums are read per function every tick for thousands of functions, so reports are
//! indexed by function key: [`DemandStore::aggregate`] costs one entry per activator
//! that reported that key, never a scan of every activator's report.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blink_crds::demand::{FunctionKey, Poke, Snapshot};

/// How long reports count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemandConfig {
    /// A reporter silent for longer is stale: it keeps its values only while its pod
    /// is in the activator Service's endpoints. DESIGN.md: 3 s.
    pub stale_after: Duration,
    /// A reporter silent for longer is dropped whatever the endpoints say. DESIGN.md: 30 s.
    pub forget_after: Duration,
}

impl Default for DemandConfig {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(3),
            forget_after: Duration::from_secs(30),
        }
    }
}

/// A function's demand summed over activators.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FunctionDemandSum {
    /// Σ (inFlight + queued): the `http` trigger's concurrency sample.
    pub concurrency: f64,
    /// Σ requests that arrived in the activators' latest intervals.
    pub requests: u64,
    /// Σ queue messages the activators hold.
    pub held_messages: u64,
    /// Some activator's latest interval had `requests > 0` or `inFlight + queued > 0`.
    pub active: bool,
    /// Some activator holds work for the function: `queued > 0`, `heldMessages > 0`,
    /// or a poke.
    pub held_work: bool,
}

impl FunctionDemandSum {
    /// Any demand at all: what wakes a function at zero.
    pub fn any(&self) -> bool {
        self.active || self.held_work
    }
}

/// A snapshot that was not applied: it is not newer than the last one applied from the
/// same session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale {
    /// The `seq` of the last snapshot applied from that session.
    pub last_seq: u64,
}

/// One function's values from one activator.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Values {
    in_flight: f64,
    queued: f64,
    requests: u64,
    held_messages: u64,
    poked: bool,
}

impl Values {
    fn is_zero(&self) -> bool {
        self.in_flight <= 0.0
            && self.queued <= 0.0
            && self.requests == 0
            && self.held_messages == 0
            && !self.poked
    }
}

/// What is known about one reporter (an activator, or a test client).
#[derive(Clone, Debug)]
struct Reporter {
    session: String,
    /// The last snapshot applied from `session`; `None` when only pokes came so far.
    last_seq: Option<u64>,
    /// When its last snapshot (or, for a reporter known only from pokes, its first
    /// poke) arrived.
    received_at: Instant,
    /// Its pod has been seen in the activator Service's endpoints, so leaving them
    /// means the pod is gone.
    seen_in_endpoints: bool,
    /// The keys it has entries for in the index (may hold keys since forgotten).
    keys: Vec<FunctionKey>,
}

/// Reports from every activator, indexed by function.
#[derive(Debug)]
pub struct DemandStore {
    config: DemandConfig,
    reporters: HashMap<Arc<str>, Reporter>,
    /// Per function, the values of each reporter that reported it: a handful of
    /// entries, one per activator.
    by_key: HashMap<FunctionKey, Vec<(Arc<str>, Values)>>,
    /// Pod names in the activator Service's endpoints.
    pods: HashSet<String>,
}

impl DemandStore {
    pub fn new(config: DemandConfig) -> Self {
        Self {
            config,
            reporters: HashMap::new(),
            by_key: HashMap::new(),
            pods: HashSet::new(),
        }
    }

    /// Applies a snapshot received at `now`: it replaces everything its activator
    /// reported before. Returns the keys that had no demand before and have some now
    /// (their workers should decide at once), or why it was dropped.
    pub fn apply_snapshot(
        &mut self,
        snapshot: Snapshot,
        now: Instant,
    ) -> Result<Vec<FunctionKey>, Stale> {
        self.prune(now);
        let Snapshot {
            activator,
            session,
            seq,
            functions,
        } = snapshot;
        if let Some(reporter) = self.reporters.get(activator.as_str())
            && reporter.session == session
            && let Some(last_seq) = reporter.last_seq
            && seq <= last_seq
        {
            return Err(Stale { last_seq });
        }
        let mut woken = Vec::new();
        for demand in &functions {
            let values = values_of(demand);
            if !values.is_zero()
                && !self.aggregate(&demand.key, now).any()
                && !woken.contains(&demand.key)
            {
                woken.push(demand.key.clone());
            }
        }

        let id = self.remove_entries(&activator);
        let mut keys = Vec::with_capacity(functions.len());
        for demand in functions {
            let values = values_of(&demand);
            if values.is_zero() {
                continue;
            }
            let entries = self.by_key.entry(demand.key.clone()).or_default();
            match entries.iter_mut().find(|(name, _)| Arc::ptr_eq(name, &id)) {
                // The same key twice in one snapshot: both count.
                Some((_, existing)) => add(existing, &values),
                None => {
                    entries.push((Arc::clone(&id), values));
                    keys.push(demand.key);
                }
            }
        }
        let seen_in_endpoints = self.pods.contains(&*id)
            || self
                .reporters
                .get(&*id)
                .is_some_and(|r| r.seen_in_endpoints);
        self.reporters.insert(
            id,
            Reporter {
                session,
                last_seq: Some(seq),
                received_at: now,
                seen_in_endpoints,
                keys,
            },
        );
        Ok(woken)
    }

    /// Applies a poke received at `now`: at least one queued request from its
    /// activator for its key. Returns whether the key had no demand before.
    pub fn apply_poke(&mut self, poke: Poke, now: Instant) -> bool {
        self.prune(now);
        let woke = !self.aggregate(&poke.key, now).any();
        let Poke {
            activator,
            session,
            key,
        } = poke;
        let id = match self.reporters.get_key_value(activator.as_str()) {
            Some((id, _)) => Arc::clone(id),
            None => {
                let id: Arc<str> = Arc::from(activator);
                self.reporters.insert(
                    Arc::clone(&id),
                    Reporter {
                        session,
                        last_seq: None,
                        received_at: now,
                        seen_in_endpoints: self.pods.contains(&*id),
                        keys: Vec::new(),
                    },
                );
                id
            }
        };
        let entries = self.by_key.entry(key.clone()).or_default();
        match entries.iter_mut().find(|(name, _)| Arc::ptr_eq(name, &id)) {
            Some((_, values)) => {
                values.queued = values.queued.max(1.0);
                values.poked = true;
            }
            None => {
                entries.push((
                    Arc::clone(&id),
                    Values {
                        queued: 1.0,
                        poked: true,
                        ..Values::default()
                    },
                ));
                if let Some(reporter) = self.reporters.get_mut(&*id) {
                    reporter.keys.push(key);
                }
            }
        }
        woke
    }

    /// The function's demand summed over the reporters that still count at `now`.
    pub fn aggregate(&self, key: &FunctionKey, now: Instant) -> FunctionDemandSum {
        let mut sum = FunctionDemandSum::default();
        let Some(entries) = self.by_key.get(key) else {
            return sum;
        };
        for (id, values) in entries {
            let counts = self
                .reporters
                .get(&**id)
                .is_some_and(|reporter| self.counts(id, reporter, now));
            if !counts {
                continue;
            }
            let concurrency = values.in_flight + values.queued;
            sum.concurrency += concurrency;
            sum.requests = sum.requests.saturating_add(values.requests);
            sum.held_messages = sum.held_messages.saturating_add(values.held_messages);
            sum.active |= values.requests > 0 || concurrency > 0.0;
            sum.held_work |= values.queued > 0.0 || values.held_messages > 0 || values.poked;
        }
        sum
    }

    /// The pod names now in the activator Service's endpoints.
    pub fn set_activator_pods(&mut self, pods: HashSet<String>) {
        for (id, reporter) in &mut self.reporters {
            if pods.contains(&**id) {
                reporter.seen_in_endpoints = true;
            }
        }
        self.pods = pods;
    }

    /// The pod names last set by [`set_activator_pods`](Self::set_activator_pods).
    pub fn activator_pods(&self) -> &HashSet<String> {
        &self.pods
    }

    /// Drops everything reported for `key` (the function is gone).
    pub fn forget(&mut self, key: &FunctionKey) {
        self.by_key.remove(key);
    }

    /// Drops the reporters that no longer count at `now`, and their entries.
    pub fn prune(&mut self, now: Instant) {
        let gone: Vec<Arc<str>> = self
            .reporters
            .iter()
            .filter(|(id, reporter)| !self.counts(id, reporter, now))
            .map(|(id, _)| Arc::clone(id))
            .collect();
        for id in gone {
            self.remove_entries(&id);
            self.reporters.remove(&*id);
        }
    }

    /// How many reporters are kept (counting or not yet pruned).
    pub fn reporters(&self) -> usize {
        self.reporters.len()
    }

    /// Whether a reporter's values still count at `now`.
    fn counts(&self, id: &str, reporter: &Reporter, now: Instant) -> bool {
        let silent = now.saturating_duration_since(reporter.received_at);
        if silent > self.config.forget_after {
            return false;
        }
        let left_endpoints = reporter.seen_in_endpoints && !self.pods.contains(id);
        !(silent > self.config.stale_after && left_endpoints)
    }

    /// Removes a reporter's entries from the index; returns its shared id (a new one
    /// if it was unknown).
    fn remove_entries(&mut self, activator: &str) -> Arc<str> {
        let Some((id, reporter)) = self.reporters.get_key_value(activator) else {
            return Arc::from(activator);
        };
        let id = Arc::clone(id);
        for key in &reporter.keys {
            if let Some(entries) = self.by_key.get_mut(key) {
                entries.retain(|(name, _)| !Arc::ptr_eq(name, &id));
                if entries.is_empty() {
                    self.by_key.remove(key);
                }
            }
        }
        id
    }
}

fn values_of(demand: &blink_crds::demand::FunctionDemand) -> Values {
    Values {
        in_flight: demand.in_flight.max(0.0),
        queued: demand.queued.max(0.0),
        requests: demand.requests,
        held_messages: demand.held_messages,
        poked: false,
    }
}

fn add(into: &mut Values, values: &Values) {
    into.in_flight += values.in_flight;
    into.queued += values.queued;
    into.requests = into.requests.saturating_add(values.requests);
    into.held_messages = into.held_messages.saturating_add(values.held_messages);
}

#[cfg(test)]
mod tests {
    use super::*;
    use blink_crds::demand::FunctionDemand;
    use proptest::prelude::*;

    const STALE: Duration = Duration::from_secs(3);
    const FORGET: Duration = Duration::from_secs(30);

    fn key(s: &str) -> FunctionKey {
        s.parse().expect("valid key")
    }

    fn config() -> DemandConfig {
        DemandConfig {
            stale_after: STALE,
            forget_after: FORGET,
        }
    }

    fn demand(k: &str, in_flight: f64, queued: f64, requests: u64, held: u64) -> FunctionDemand {
        FunctionDemand {
            key: key(k),
            in_flight,
            queued,
            requests,
            held_messages: held,
        }
    }

    fn snapshot(
        activator: &str,
        session: &str,
        seq: u64,
        functions: Vec<FunctionDemand>,
    ) -> Snapshot {
        Snapshot {
            activator: activator.into(),
            session: session.into(),
            seq,
            functions,
        }
    }

    fn poke(activator: &str, session: &str, k: &str) -> Poke {
        Poke {
            activator: activator.into(),
            session: session.into(),
            key: key(k),
        }
    }

    fn sum(concurrency: f64, requests: u64, held_messages: u64) -> FunctionDemandSum {
        FunctionDemandSum {
            concurrency,
            requests,
            held_messages,
            active: requests > 0 || concurrency > 0.0,
            held_work: held_messages > 0,
        }
    }

    #[test]
    fn sums_over_activators_by_key() {
        let t0 = Instant::now();
        let mut store = DemandStore::new(config());
        let a = snapshot(
            "a",
            "s1",
            1,
            vec![
                demand("ns/f", 1.5, 0.0, 10, 0),
                demand("ns/g", 0.0, 0.0, 0, 4),
            ],
        );
        let b = snapshot("b", "s1", 7, vec![demand("ns/f", 2.0, 0.5, 3, 0)]);
        assert_eq!(
            store.apply_snapshot(a, t0),
            Ok(vec![key("ns/f"), key("ns/g")])
        );
        assert_eq!(
            store.apply_snapshot(b, t0),
            Ok(vec![]),
            "ns/f already had demand"
        );
        let f = store.aggregate(&key("ns/f"), t0);
        assert_eq!(
            f,
            FunctionDemandSum {
                concurrency: 4.0,
                requests: 13,
                held_messages: 0,
                active: true,
                held_work: true, // b queues 0.5
            }
        );
        assert_eq!(store.aggregate(&key("ns/g"), t0), sum(0.0, 0, 4));
        assert_eq!(
            store.aggregate(&key("ns/none"), t0),
            FunctionDemandSum::default()
        );
    }

    #[test]
    fn what_counts_as_active_and_held() {
        let t0 = Instant::now();
        // (in_flight, queued, requests, held) → (active, held_work)
        let cases = [
            ((0.0, 0.0, 0, 0), (false, false)),
            ((0.0, 0.0, 1, 0), (true, false)),
            ((0.01, 0.0, 0, 0), (true, false)),
            ((0.0, 0.01, 0, 0), (true, true)),
            ((0.0, 0.0, 0, 1), (false, true)),
            ((2.0, 1.0, 5, 3), (true, true)),
        ];
        for ((in_flight, queued, requests, held), (active, held_work)) in cases {
            let mut store = DemandStore::new(config());
            let s = snapshot(
                "a",
                "s",
                1,
                vec![demand("ns/f", in_flight, queued, requests, held)],
            );
            store.apply_snapshot(s, t0).expect("applies");
            let got = store.aggregate(&key("ns/f"), t0);
            assert_eq!(
                (got.active, got.held_work),
                (active, held_work),
                "{in_flight} {queued} {requests} {held}"
            );
        }
    }

    #[test]
    fn older_snapshots_of_a_session_are_dropped_and_a_new_session_replaces() {
        let t0 = Instant::now();
        // Each step: (session, seq, requests reported) → applied?, requests summed after.
        let steps = [
            ("s1", 5, 5, true, 5),
            ("s1", 5, 99, false, 5),
            ("s1", 4, 99, false, 5),
            ("s1", 6, 6, true, 6),
            // A restarted activator starts over at a low seq in a new session.
            ("s2", 1, 1, true, 1),
            ("s2", 1, 99, false, 1),
            ("s1", 7, 7, true, 7),
        ];
        let mut store = DemandStore::new(config());
        for (session, seq, requests, applied, expected) in steps {
            let s = snapshot(
                "a",
                session,
                seq,
                vec![demand("ns/f", 0.0, 0.0, requests, 0)],
            );
            let result = store.apply_snapshot(s, t0);
            assert_eq!(result.is_ok(), applied, "{session} {seq}");
            assert_eq!(
                store.aggregate(&key("ns/f"), t0).requests,
                expected,
                "{session} {seq}"
            );
        }
        let s = snapshot("a", "s1", 3, vec![]);
        assert_eq!(store.apply_snapshot(s, t0), Err(Stale { last_seq: 7 }));
    }

    #[test]
    fn a_snapshot_replaces_all_of_its_activators_keys() {
        let t0 = Instant::now();
        let mut store = DemandStore::new(config());
        let s1 = snapshot(
            "a",
            "s",
            1,
            vec![
                demand("ns/f", 1.0, 0.0, 1, 0),
                demand("ns/g", 1.0, 0.0, 1, 0),
            ],
        );
        let s2 = snapshot("a", "s", 2, vec![demand("ns/g", 2.0, 0.0, 1, 0)]);
        store.apply_snapshot(s1, t0).expect("applies");
        store.apply_snapshot(s2, t0).expect("applies");
        assert_eq!(
            store.aggregate(&key("ns/f"), t0),
            FunctionDemandSum::default()
        );
        assert_eq!(store.aggregate(&key("ns/g"), t0).concurrency, 2.0);
        // An empty snapshot is silence.
        store
            .apply_snapshot(snapshot("a", "s", 3, vec![]), t0)
            .expect("applies");
        assert_eq!(
            store.aggregate(&key("ns/g"), t0),
            FunctionDemandSum::default()
        );
        assert!(
            store.by_key.is_empty(),
            "no entries left behind: {:?}",
            store.by_key
        );
    }

    #[test]
    fn a_poke_is_one_queued_request_for_one_key_until_the_next_snapshot() {
        let t0 = Instant::now();
        let mut store = DemandStore::new(config());
        let s = snapshot(
            "a",
            "s",
            4,
            vec![
                demand("ns/f", 0.0, 2.5, 1, 0),
                demand("ns/g", 1.0, 0.0, 1, 0),
            ],
        );
        store.apply_snapshot(s, t0).expect("applies");

        // Onto a key with more queued: at least one, so unchanged, but held.
        assert!(
            !store.apply_poke(poke("a", "s", "ns/f"), t0),
            "ns/f had demand"
        );
        assert_eq!(store.aggregate(&key("ns/f"), t0).concurrency, 2.5);
        // Onto a key the activator did not report: one queued request.
        assert!(
            store.apply_poke(poke("a", "s", "ns/h"), t0),
            "ns/h had none"
        );
        let h = store.aggregate(&key("ns/h"), t0);
        assert_eq!((h.concurrency, h.active, h.held_work), (1.0, true, true));
        // Other keys and seq untouched: seq 4 is still the last applied.
        assert_eq!(store.aggregate(&key("ns/g"), t0).concurrency, 1.0);
        assert_eq!(
            store.apply_snapshot(snapshot("a", "s", 4, vec![]), t0),
            Err(Stale { last_seq: 4 })
        );
        // The next snapshot replaces the poke.
        store
            .apply_snapshot(snapshot("a", "s", 5, vec![]), t0)
            .expect("applies");
        assert_eq!(
            store.aggregate(&key("ns/h"), t0),
            FunctionDemandSum::default()
        );
    }

    #[test]
    fn a_poke_before_any_snapshot_starts_the_reporter() {
        let t0 = Instant::now();
        let mut store = DemandStore::new(config());
        assert!(store.apply_poke(poke("a", "s9", "ns/f"), t0));
        assert!(store.aggregate(&key("ns/f"), t0).held_work);
        // Its session's first snapshot applies whatever its seq.
        let s = snapshot("a", "s9", 0, vec![demand("ns/f", 0.0, 1.0, 1, 0)]);
        assert_eq!(store.apply_snapshot(s, t0), Ok(vec![]));
        // A poke from another session merges into the current state.
        store.apply_poke(poke("a", "other", "ns/g"), t0);
        assert!(store.aggregate(&key("ns/g"), t0).held_work);
        assert!(store.aggregate(&key("ns/f"), t0).held_work);
    }

    #[test]
    fn staleness() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        // (silent for, in endpoints when it reported, in endpoints now) → counts
        let cases = [
            (secs(0), true, true, true),
            (secs(2), true, false, true), // fresh: counts even after leaving
            (secs(3), true, false, true), // "older than 3 s" is strict
            (secs(4), true, true, true),  // stale, pod still there: last values kept
            (secs(4), true, false, false), // stale, pod gone
            (secs(4), false, false, true), // never an endpoint (test client): kept
            (secs(29), true, true, true),
            (secs(29), false, false, true),
            (secs(30), false, false, true),
            (secs(31), true, true, false), // 30 s pass, whatever the endpoints say
            (secs(31), false, false, false),
        ];
        for (silent, was_endpoint, is_endpoint, counts) in cases {
            let mut store = DemandStore::new(config());
            let pods = |present: bool| {
                if present {
                    HashSet::from(["a".to_owned()])
                } else {
                    HashSet::from(["other".to_owned()])
                }
            };
            store.set_activator_pods(pods(was_endpoint));
            let s = snapshot("a", "s", 1, vec![demand("ns/f", 1.0, 0.0, 1, 0)]);
            store.apply_snapshot(s, t0).expect("applies");
            store.set_activator_pods(pods(is_endpoint));
            let got = store.aggregate(&key("ns/f"), t0 + silent);
            assert_eq!(
                got.active, counts,
                "{silent:?} was={was_endpoint} is={is_endpoint}"
            );
            // Pruning agrees with reading.
            store.prune(t0 + silent);
            assert_eq!(
                store.reporters() == 1,
                counts,
                "{silent:?} was={was_endpoint} is={is_endpoint}"
            );
            assert_eq!(store.aggregate(&key("ns/f"), t0 + silent).active, counts);
        }
    }

    #[test]
    fn an_activator_that_joins_the_endpoints_after_reporting_is_tracked() {
        let t0 = Instant::now();
        let mut store = DemandStore::new(config());
        let s = snapshot("a", "s", 1, vec![demand("ns/f", 1.0, 0.0, 1, 0)]);
        store.apply_snapshot(s, t0).expect("applies");
        store.set_activator_pods(HashSet::from(["a".to_owned()]));
        store.set_activator_pods(HashSet::new());
        assert!(
            !store
                .aggregate(&key("ns/f"), t0 + Duration::from_secs(4))
                .active
        );
    }

    #[test]
    fn forget_drops_a_key_and_later_reports_bring_it_back() {
        let t0 = Instant::now();
        let mut store = DemandStore::new(config());
        let s = snapshot("a", "s", 1, vec![demand("ns/f", 1.0, 0.0, 1, 0)]);
        store.apply_snapshot(s, t0).expect("applies");
        store.forget(&key("ns/f"));
        assert_eq!(
            store.aggregate(&key("ns/f"), t0),
            FunctionDemandSum::default()
        );
        store.apply_poke(poke("a", "s", "ns/f"), t0);
        assert!(store.aggregate(&key("ns/f"), t0).held_work);
        let s = snapshot("a", "s", 2, vec![demand("ns/f", 3.0, 0.0, 1, 0)]);
        store.apply_snapshot(s, t0).expect("applies");
        assert_eq!(store.aggregate(&key("ns/f"), t0).concurrency, 3.0);
    }

    #[test]
    fn the_same_key_twice_in_a_snapshot_adds_up() {
        let t0 = Instant::now();
        let mut store = DemandStore::new(config());
        let s = snapshot(
            "a",
            "s",
            1,
            vec![
                demand("ns/f", 1.0, 0.0, 1, 0),
                demand("ns/f", 2.0, 0.0, 2, 0),
            ],
        );
        store.apply_snapshot(s, t0).expect("applies");
        assert_eq!(store.aggregate(&key("ns/f"), t0), sum(3.0, 3, 0));
        store
            .apply_snapshot(snapshot("a", "s", 2, vec![]), t0)
            .expect("applies");
        assert!(store.by_key.is_empty());
    }

    #[test]
    fn ten_thousand_functions_from_three_activators() {
        let t0 = Instant::now();
        let mut store = DemandStore::new(config());
        let keys: Vec<String> = (0..10_000).map(|i| format!("ns/f{i}")).collect();
        for (n, activator) in ["a", "b", "c"].into_iter().enumerate() {
            let functions = keys
                .iter()
                .map(|k| demand(k, 1.0, 0.0, n as u64, 0))
                .collect();
            store
                .apply_snapshot(snapshot(activator, "s", 1, functions), t0)
                .expect("applies");
        }
        for k in &keys {
            assert_eq!(store.aggregate(&key(k), t0), sum(3.0, 3, 0));
        }
        // Each key holds one entry per activator, no more.
        assert!(store.by_key.values().all(|entries| entries.len() == 3));
    }

    // --- property tests against a model without the index ---

    /// The rules, written the slow way: every reporter keeps its whole report and
    /// every read scans all of them.
    #[derive(Default)]
    struct Model {
        reporters: HashMap<String, ModelReporter>,
        pods: HashSet<String>,
    }

    struct ModelReporter {
        session: String,
        last_seq: Option<u64>,
        at: Instant,
        seen: bool,
        functions: Vec<(FunctionKey, Values)>,
    }

    impl Model {
        fn counts(&self, name: &str, r: &ModelReporter, now: Instant) -> bool {
            let silent = now.saturating_duration_since(r.at);
            silent <= FORGET && !(silent > STALE && r.seen && !self.pods.contains(name))
        }

        fn prune(&mut self, now: Instant) {
            let gone: Vec<String> = self
                .reporters
                .iter()
                .filter(|(n, r)| !self.counts(n, r, now))
                .map(|(n, _)| n.clone())
                .collect();
            for n in gone {
                self.reporters.remove(&n);
            }
        }

        fn snapshot(&mut self, s: &Snapshot, now: Instant) -> bool {
            self.prune(now);
            if let Some(r) = self.reporters.get(&s.activator)
                && r.session == s.session
                && r.last_seq.is_some_and(|l| s.seq <= l)
            {
                return false;
            }
            let seen = self.pods.contains(&s.activator)
                || self.reporters.get(&s.activator).is_some_and(|r| r.seen);
            let functions = s
                .functions
                .iter()
                .map(|f| (f.key.clone(), values_of(f)))
                .collect();
            self.reporters.insert(
                s.activator.clone(),
                ModelReporter {
                    session: s.session.clone(),
                    last_seq: Some(s.seq),
                    at: now,
                    seen,
                    functions,
                },
            );
            true
        }

        fn poke(&mut self, p: &Poke, now: Instant) {
            self.prune(now);
            let seen = self.pods.contains(&p.activator);
            let r = self
                .reporters
                .entry(p.activator.clone())
                .or_insert_with(|| ModelReporter {
                    session: p.session.clone(),
                    last_seq: None,
                    at: now,
                    seen,
                    functions: vec![],
                });
            r.functions.push((
                p.key.clone(),
                Values {
                    queued: 1.0,
                    poked: true,
                    ..Values::default()
                },
            ));
        }

        fn pods(&mut self, pods: HashSet<String>) {
            for (n, r) in &mut self.reporters {
                r.seen |= pods.contains(n);
            }
            self.pods = pods;
        }

        fn aggregate(&self, key: &FunctionKey, now: Instant) -> FunctionDemandSum {
            let mut sum = FunctionDemandSum::default();
            for (name, r) in &self.reporters {
                if !self.counts(name, r, now) {
                    continue;
                }
                // A poke merges with the reported values: max of queued, plus the flag.
                let mut merged: Option<Values> = None;
                for (_, v) in r.functions.iter().filter(|(k, _)| k == key) {
                    merged = Some(match merged {
                        None => *v,
                        Some(mut m) if v.poked => {
                            m.queued = m.queued.max(1.0);
                            m.poked = true;
                            m
                        }
                        Some(mut m) => {
                            add(&mut m, v);
                            m
                        }
                    });
                }
                if let Some(v) = merged.filter(|v| !v.is_zero()) {
                    sum.concurrency += v.in_flight + v.queued;
                    sum.requests += v.requests;
                    sum.held_messages += v.held_messages;
                    sum.active |= v.requests > 0 || v.in_flight + v.queued > 0.0;
                    sum.held_work |= v.queued > 0.0 || v.held_messages > 0 || v.poked;
                }
            }
            sum
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Snapshot {
            activator: usize,
            session: usize,
            seq: u64,
            functions: Vec<(usize, u8, u8, u8, u8)>,
        },
        Poke {
            activator: usize,
            session: usize,
            key: usize,
        },
        Pods(Vec<usize>),
        Wait(u64),
    }

    const ACTIVATORS: [&str; 4] = ["a", "b", "c", "test-client"];
    const KEYS: [&str; 5] = ["ns/a", "ns/b", "ns/c", "other/a", "other/b"];

    fn op() -> impl Strategy<Value = Op> {
        // Quarters and small integers: sums are exact in f64, whatever the order.
        let function = (0..KEYS.len(), 0u8..8, 0u8..8, 0u8..3, 0u8..3);
        prop_oneof![
            4 => (0..4usize, 0..2usize, 0u64..6, proptest::collection::vec(function, 0..5)).prop_map(
                |(activator, session, seq, functions)| Op::Snapshot { activator, session, seq, functions }
            ),
            2 => (0..4usize, 0..2usize, 0..KEYS.len()).prop_map(|(activator, session, key)| Op::Poke { activator, session, key }),
            1 => proptest::collection::vec(0..3usize, 0..3).prop_map(Op::Pods),
            2 => (0u64..12_000).prop_map(Op::Wait),
        ]
    }

    proptest! {
        #[test]
        fn index_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..40)) {
            let mut now = Instant::now();
            let mut store = DemandStore::new(config());
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Snapshot { activator, session, seq, functions } => {
                        let s = snapshot(
                            ACTIVATORS[activator],
                            ["s0", "s1"][session],
                            seq,
                            functions
                                .into_iter()
                                .map(|(k, i, q, r, h)| demand(KEYS[k], f64::from(i) / 4.0, f64::from(q) / 4.0, r.into(), h.into()))
                                .collect(),
                        );
                        let applied = model.snapshot(&s, now);
                        prop_assert_eq!(store.apply_snapshot(s, now).is_ok(), applied);
                    }
                    Op::Poke { activator, session, key } => {
                        let p = poke(ACTIVATORS[activator], ["s0", "s1"][session], KEYS[key]);
                        model.poke(&p, now);
                        store.apply_poke(p, now);
                    }
                    Op::Pods(pods) => {
                        let pods: HashSet<String> = pods.into_iter().map(|i| ACTIVATORS[i].to_owned()).collect();
                        model.pods(pods.clone());
                        store.set_activator_pods(pods);
                    }
                    Op::Wait(ms) => now += Duration::from_millis(ms),
                }
                for k in KEYS {
                    prop_assert_eq!(store.aggregate(&key(k), now), model.aggregate(&key(k), now), "{}", k);
                }
            }
        }

        /// Silence is never read as zero: while an activator's pod stays in the
        /// endpoints, what it last reported counts until `forget_after`.
        #[test]
        fn silence_is_not_zero_demand(
            requests in 1u64..100,
            silent_ms in 0u64..30_000,
            stale_seq in 0u64..10,
        ) {
            let t0 = Instant::now();
            let mut store = DemandStore::new(config());
            store.set_activator_pods(HashSet::from(["a".to_owned()]));
            let s = snapshot("a", "s", 10, vec![demand("ns/f", 0.0, 0.0, requests, 0)]);
            store.apply_snapshot(s, t0).expect("applies");
            let later = t0 + Duration::from_millis(silent_ms);
            // A late, older snapshot saying "nothing" changes nothing either.
            prop_assert!(store.apply_snapshot(snapshot("a", "s", stale_seq, vec![]), later).is_err());
            prop_assert_eq!(store.aggregate(&key("ns/f"), later).requests, requests);
        }
    }
}
