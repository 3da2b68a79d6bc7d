//! Leader election on a `coordination.k8s.io/v1` Lease, with a local deadline checked
//! before every write.
//!
//! One scaler writes at a time: the holder of the Lease (default name
//! [`DEFAULT_LEASE_NAME`] in Blink's namespace). Its `holderIdentity` is
//! `<pod-name>@<ip>:<port>` — the demand endpoint's address — so activators watching
//! the Lease know where to send demand ([`holder_identity`]).
//!
//! How the election runs ([`Leadership::start`]):
//! - Writes to the Lease are compare-and-swap on `resourceVersion`, so two candidates
//!   never both believe a write of theirs won.
//! - A candidate takes the Lease when it is free (no holder) or expired. Expiry is
//!   judged on this process's monotonic clock, as client-go does: a holder's lease has
//!   expired when its record (`resourceVersion`) has not changed for its
//!   `leaseDurationSeconds` since this process first saw that record. Wall clocks of
//!   different machines are never compared.
//! - Followers watch the Lease, so they see a renewal or a release as it happens and
//!   take over at once after a release, or one lease duration after a crash.
//! - The leader renews at expiry − `grace`, and keeps a **local deadline** = the start
//!   of its last successful renew + duration − grace/2. A follower cannot take the
//!   Lease before the start of that renew + duration, so the deadline ends this
//!   process's writes grace/2 before anyone else may start. [`Leadership::can_write`]
//!   checks it; [`Leadership::writable`] waits for the next successful renew rather
//!   than dropping a write refused by it.
//! - On shutdown the leader stops writing first, then releases the Lease (no holder,
//!   duration 1 s), so a successor takes over without waiting for expiry.
//!
//! What "may I write now" means is the pure function [`may_write`]; what a candidate
//! does with the Lease it read is the pure function `claim`. Both are tested with
//! tables; the task around them only moves data between the API and them.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Re-exported so callers of [`Leadership::start`] need no direct dependency.
pub use tokio_util::sync::CancellationToken;

/// The Lease's name unless configured otherwise.
pub const DEFAULT_LEASE_NAME: &str = "blink-scaler";

/// Where and as whom to take part in the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The Lease's namespace (Blink's namespace).
    pub namespace: String,
    /// The Lease's name, normally [`DEFAULT_LEASE_NAME`].
    pub name: String,
    /// This process's `holderIdentity`, normally [`holder_identity`] of the pod name and
    /// the demand endpoint's address.
    pub identity: String,
    /// `leaseDurationSeconds`: how long a holder that stops renewing keeps the Lease.
    /// Whole seconds on the wire (rounded up, at least 1 s).
    pub duration: Duration,
    /// The leader renews at expiry − `grace`; its local deadline is expiry − grace/2.
    /// Must be less than `duration`; larger values are clamped to half of it.
    pub grace: Duration,
}

/// `<pod-name>@<ip>:<port>`: the `holderIdentity` that tells activators where the
/// leader's demand endpoint listens (an IPv6 address is bracketed, `pod@[fd00::1]:9090`).
pub fn holder_identity(pod_name: &str, demand_addr: std::net::SocketAddr) -> String {
    format!("{pod_name}@{demand_addr}")
}

/// What this process knows about the election, as published to subscribers.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaderState {
    /// This process holds the Lease (as far as it knows; writes also need the
    /// deadline, see [`may_write`]).
    pub is_leader: bool,
    /// The current `holderIdentity`, if any (this process's own when leading).
    pub holder: Option<String>,
    /// When this process gained the Lease (the decision's "first stable window after
    /// gaining the lease" counts from here).
    pub acquired_at: Option<Instant>,
    /// The local deadline: no writes at or after it until the next renew. `None` while
    /// leading means no deadline (a process without a Lease, [`Leadership::always`]).
    pub deadline: Option<Instant>,
}

impl LeaderState {
    /// This process's term as leader: when it gained the Lease, `None` while not
    /// leading. A watch may merge "lost, then won again" into one change, which only
    /// the term tells apart from a renewal.
    pub fn term(&self) -> Option<Instant> {
        if self.is_leader {
            self.acquired_at
        } else {
            None
        }
    }

    /// Not leading, no holder known.
    pub fn follower(holder: Option<String>) -> Self {
        Self {
            is_leader: false,
            holder,
            acquired_at: None,
            deadline: None,
        }
    }
}

/// May a process in `state` write to the cluster at `now`? Only a leader, and only
/// before its local deadline.
pub fn may_write(state: &LeaderState, now: Instant) -> bool {
    state.is_leader && state.deadline.is_none_or(|deadline| now < deadline)
}

/// A cheap handle on this process's leadership; clones share one state.
#[derive(Clone, Debug)]
pub struct Leadership {
    state: Arc<watch::Sender<LeaderState>>,
}

/// Sets the state of a [`Leadership::manual`] handle.
#[derive(Debug)]
pub struct LeadershipControl {
    state: Arc<watch::Sender<LeaderState>>,
}

impl LeadershipControl {
    /// Publishes `state` to every clone and subscriber of the handle.
    pub fn set(&self, state: LeaderState) {
        self.state.send_replace(state);
    }
}

impl Leadership {
    /// Takes part in the election on the Lease `config` names. The task runs until
    /// `shutdown` is cancelled, then stops writing and releases the Lease if it holds
    /// it. Aborting the task instead releases nothing: the local deadline still ends
    /// this process's writes, and others take over when the Lease expires.
    ///
    /// Needs RBAC `get`, `create`, `update`, `list` and `watch` on `leases` in the
    /// Lease's namespace.
    pub fn start(
        client: kube::Client,
        config: LeaseConfig,
        shutdown: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let store = KubeLeases {
            api: Api::namespaced(client, &config.namespace),
            name: config.name.clone(),
        };
        Self::start_with(store, config, shutdown)
    }

    fn start_with<S: LeaseStore>(
        store: S,
        config: LeaseConfig,
        shutdown: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let state = Arc::new(watch::Sender::new(LeaderState::follower(None)));
        let task = tokio::spawn(run(store, config, Arc::clone(&state), shutdown));
        (Self { state }, task)
    }

    /// Always the leader, with no deadline: a single process with no Lease (local mode).
    pub fn always(now: Instant) -> Self {
        Self::manual(LeaderState {
            is_leader: true,
            holder: None,
            acquired_at: Some(now),
            deadline: None,
        })
        .0
    }

    /// A handle whose state is set by hand through the returned control (tests, tools).
    pub fn manual(initial: LeaderState) -> (Self, LeadershipControl) {
        let state = Arc::new(watch::Sender::new(initial));
        (
            Self {
                state: Arc::clone(&state),
            },
            LeadershipControl { state },
        )
    }

    /// The latest state.
    pub fn state(&self) -> LeaderState {
        self.state.borrow().clone()
    }

    /// Leader, and `now` is before the local deadline ([`may_write`]).
    pub fn can_write(&self, now: Instant) -> bool {
        may_write(&self.state.borrow(), now)
    }

    /// Waits until this process may write, and returns the state that allows it. A
    /// write refused by the deadline waits here for the next successful renew.
    pub async fn writable(&self) -> LeaderState {
        let mut rx = self.state.subscribe();
        loop {
            // The clock is read before the state: a renewal published after this read
            // is made at a later time, past the deadline that refuses us here, so it
            // is news and wakes the wait below (read after, a renewal landing just
            // before the old deadline would be taken in silence and the wait would
            // never end).
            let at = now();
            let state = rx.borrow_and_update().clone();
            if may_write(&state, at) {
                return state;
            }
            if rx.changed().await.is_err() {
                // Unreachable while `self` holds the sender; never claim leadership.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Every change of state that [`is_news`], starting from the current one.
    pub fn subscribe(&self) -> watch::Receiver<LeaderState> {
        self.state.subscribe()
    }

    /// Each change of term, once: `true` when a term as leader begins (also straight
    /// after another one, if the Lease was lost and won back between two looks),
    /// `false` when one ends. Renewals and a new holder elsewhere are not changes.
    pub fn roles(&self) -> impl futures::Stream<Item = bool> + Send + 'static {
        let rx = self.state.subscribe();
        let term = rx.borrow().term();
        futures::stream::unfold((rx, term), |(mut rx, term)| async move {
            loop {
                rx.changed().await.ok()?;
                let now_term = rx.borrow_and_update().term();
                if now_term != term {
                    return Some((now_term.is_some(), (rx, now_term)));
                }
            }
        })
    }
}

/// The monotonic clock the election runs on: tokio's, so paused-time tests drive it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The election's clocks, derived once from a [`LeaseConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timing {
    duration: Duration,
    grace: Duration,
    /// Pause after a failed read or write before trying again.
    retry: Duration,
    /// Bound on one call to the API server, so a hung request cannot hold a renew.
    call_timeout: Duration,
}

impl Timing {
    fn new(duration: Duration, grace: Duration) -> Self {
        let duration = duration.max(Duration::from_secs(1));
        let grace = if grace.is_zero() || grace >= duration {
            duration / 2
        } else {
            grace
        };
        Self {
            duration,
            grace,
            retry: (grace / 4).max(Duration::from_millis(50)),
            call_timeout: (grace / 2).max(Duration::from_millis(500)),
        }
    }

    /// When the leader renews after a renew that started at `renewed_at`.
    fn renew_at(&self, renewed_at: Instant) -> Instant {
        renewed_at + self.duration - self.grace
    }

    /// The local deadline after a renew that started at `renewed_at`.
    fn deadline(&self, renewed_at: Instant) -> Instant {
        renewed_at + self.duration - self.grace / 2
    }

    /// `leaseDurationSeconds` as written: whole seconds, rounded up.
    fn duration_seconds(&self) -> i32 {
        let secs = self.duration.as_secs() + u64::from(self.duration.subsec_nanos() > 0);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }
}

/// A Lease record as the election sees it.
#[derive(Clone, Debug, PartialEq)]
struct Observed {
    resource_version: Option<String>,
    /// `holderIdentity`; empty means none.
    holder: Option<String>,
    /// The holder's `leaseDurationSeconds`, else ours.
    duration: Duration,
    /// When this process first saw this record (this `resourceVersion`).
    seen_at: Instant,
}

impl Observed {
    fn of(lease: &Lease, default_duration: Duration, now: Instant) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            resource_version: lease.metadata.resource_version.clone(),
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(default_duration, Duration::from_secs),
            seen_at: now,
        }
    }

    fn expires_at(&self) -> Instant {
        self.seen_at + self.duration
    }
}

/// What a candidate does with the Lease it just read.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Claim {
    /// No Lease yet: create it holding it.
    Create,
    /// Free or expired: take it (a new acquisition).
    Acquire,
    /// Already ours: renew it.
    Renew,
    /// Someone else holds it until `until` (unless it is renewed or released).
    Wait { holder: String, until: Instant },
}

/// The election's rule, pure: what `identity` may do with the Lease as observed, now.
fn claim(identity: &str, observed: Option<&Observed>, now: Instant) -> Claim {
    let Some(observed) = observed else {
        return Claim::Create;
    };
    match observed.holder.as_deref() {
        None => Claim::Acquire,
        Some(holder) if holder == identity => Claim::Renew,
        Some(_) if now >= observed.expires_at() => Claim::Acquire,
        Some(holder) => Claim::Wait {
            holder: holder.to_owned(),
            until: observed.expires_at(),
        },
    }
}

/// This process's side of the election, between calls to the API server.
#[derive(Debug)]
struct Elector {
    identity: String,
    timing: Timing,
    /// The latest Lease record seen (`None` before the first read, or when none exists).
    observed: Option<Observed>,
    /// Whether `observed` reflects a read at all (`None` above is then "no Lease").
    read: bool,
    leading: Option<Leading>,
    /// After a failure or conflict: the next attempt, overriding the schedule.
    retry_at: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leading {
    acquired_at: Instant,
    /// When the last successful write was sent (the Lease's expiry, as any follower
    /// can judge it, is later than this + duration).
    renewed_at: Instant,
}

impl Elector {
    fn new(identity: String, timing: Timing) -> Self {
        Self {
            identity,
            timing,
            observed: None,
            read: false,
            leading: None,
            retry_at: None,
        }
    }

    /// Records the Lease as read or watched at `now`. A changed record restarts its
    /// expiry clock; a record held by someone else ends this process's leadership.
    fn observe(&mut self, lease: Option<&Lease>, now: Instant) {
        self.read = true;
        let Some(lease) = lease else {
            self.observed = None;
            return;
        };
        let fresh = Observed::of(lease, self.timing.duration, now);
        let unchanged = self.observed.as_ref().is_some_and(|o| {
            o.resource_version.is_some() && o.resource_version == fresh.resource_version
        });
        if !unchanged {
            if fresh.holder.as_deref() != Some(self.identity.as_str()) {
                self.leading = None;
            }
            self.observed = Some(fresh);
        }
    }

    /// A watch event: followers learn of renewals and releases at once. A leader
    /// ignores them: a watch event may be older than its own last write, and its
    /// deadline already ends its writes before anyone else could take over.
    fn watched(&mut self, lease: Option<&Lease>, now: Instant) {
        if self.leading.is_none() {
            self.observe(lease, now);
        }
    }

    /// A write of ours succeeded: it was sent at `sent_at` and returned `lease`.
    fn won(&mut self, lease: &Lease, sent_at: Instant, now: Instant) {
        let acquired_at = self.leading.map_or(sent_at, |l| l.acquired_at);
        self.leading = Some(Leading {
            acquired_at,
            renewed_at: sent_at,
        });
        self.observed = Some(Observed::of(lease, self.timing.duration, now));
        self.retry_at = None;
    }

    fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + self.timing.retry);
    }

    /// When to read the Lease next.
    fn next_attempt(&self, now: Instant) -> Instant {
        if let Some(at) = self.retry_at {
            return at;
        }
        if let Some(leading) = self.leading {
            return self.timing.renew_at(leading.renewed_at);
        }
        if !self.read {
            return now;
        }
        match claim(&self.identity, self.observed.as_ref(), now) {
            // Without a watch this is also the polling period; with one, the record
            // restarts its clock whenever it changes.
            Claim::Wait { until, .. } => until,
            Claim::Create | Claim::Acquire | Claim::Renew => now,
        }
    }

    fn state(&self) -> LeaderState {
        match self.leading {
            Some(leading) => LeaderState {
                is_leader: true,
                holder: Some(self.identity.clone()),
                acquired_at: Some(leading.acquired_at),
                deadline: Some(self.timing.deadline(leading.renewed_at)),
            },
            None => LeaderState::follower(self.observed.as_ref().and_then(|o| o.holder.clone())),
        }
    }

    /// The Lease to write for `claim`, from the Lease just read (`None`: create).
    fn desired(&self, current: Option<&Lease>, claim: &Claim, wall: MicroTime) -> Lease {
        let mut lease = current.cloned().unwrap_or_else(|| Lease {
            metadata: ObjectMeta::default(),
            spec: None,
        });
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if !matches!(claim, Claim::Renew) || self.leading.is_none() {
            spec.acquire_time = Some(wall.clone());
        }
        if matches!(claim, Claim::Acquire) {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        } else if matches!(claim, Claim::Create) {
            spec.lease_transitions = Some(0);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.timing.duration_seconds());
        spec.renew_time = Some(wall);
        lease
    }
}

/// The Lease API as the election uses it: a seam so the task can run against an
/// in-memory Lease in tests.
trait LeaseStore: Send + Sync + 'static {
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, StoreError>> + Send;
    fn create(&self, lease: Lease) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    /// Replaces the Lease if its `resourceVersion` still matches.
    fn replace(&self, lease: Lease) -> impl Future<Output = Result<Lease, StoreError>> + Send;
    /// The Lease as it changes (`None`: deleted).
    fn watch(&self) -> BoxStream<'static, Option<Lease>>;
}

#[derive(Debug, thiserror::Error)]
enum StoreError {
    /// Someone else wrote first (409: changed or already exists).
    #[error("the Lease changed since it was read")]
    Conflict,
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

fn from_kube(e: kube::Error) -> StoreError {
    match &e {
        kube::Error::Api(status) if status.is_conflict() || status.is_already_exists() => {
            StoreError::Conflict
        }
        _ => StoreError::Kube(e),
    }
}

struct KubeLeases {
    api: Api<Lease>,
    name: String,
}

impl LeaseStore for KubeLeases {
    async fn get(&self) -> Result<Option<Lease>, StoreError> {
        self.api.get_opt(&self.name).await.map_err(from_kube)
    }

    async fn create(&self, mut lease: Lease) -> Result<Lease, StoreError> {
        lease.metadata.name = Some(self.name.clone());
        self.api
            .create(&PostParams::default(), &lease)
            .await
            .map_err(from_kube)
    }

    async fn replace(&self, lease: Lease) -> Result<Lease, StoreError> {
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map_err(from_kube)
    }

    fn watch(&self) -> BoxStream<'static, Option<Lease>> {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        watcher(self.api.clone(), config)
            .default_backoff()
            .filter_map(|event| async move {
                match event {
                    Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
                        Some(Some(lease))
                    }
                    Ok(watcher::Event::Delete(_)) => Some(None),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                    Err(e) => {
                        tracing::debug!(error = %e, "Lease watch interrupted; resuming");
                        None
                    }
                }
            })
            .boxed()
    }
}

async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)))
}

/// The election task: read, decide, write, publish, sleep until the next attempt.
async fn run<S: LeaseStore>(
    store: S,
    config: LeaseConfig,
    state: Arc<watch::Sender<LeaderState>>,
    shutdown: CancellationToken,
) {
    let timing = Timing::new(config.duration, config.grace);
    let mut elector = Elector::new(config.identity.clone(), timing);
    let mut watch = store.watch();
    let mut watching = true;
    loop {
        let wake = tokio::time::Instant::from_std(elector.next_attempt(now()));
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = watch.next(), if watching => match event {
                Some(lease) => elector.watched(lease.as_ref(), now()),
                // The watch ended: renewals are then seen when the expiry is checked.
                None => watching = false,
            },
            () = tokio::time::sleep_until(wake) => attempt(&store, &mut elector).await,
        }
        publish(&state, elector.state(), &config);
    }
    if elector.leading.is_some() {
        // Stop writing before the Lease says so.
        elector.leading = None;
        publish(&state, LeaderState::follower(None), &config);
        release(&store, &config.identity, timing).await;
    }
}

/// Whether subscribers must be woken for `next`: a change of role, holder or term, or
/// a renewal that comes after the deadline passed (writes wait for it in
/// [`Leadership::writable`]). A renewal that only moves a deadline not yet passed is
/// news to nobody: every function worker subscribes, and waking them all at each
/// renewal made each run a step and re-read `/scale` in one burst, which pokes then
/// queued behind.
pub fn is_news(current: &LeaderState, next: &LeaderState, now: Instant) -> bool {
    current.is_leader != next.is_leader
        || current.holder != next.holder
        || current.acquired_at != next.acquired_at
        || (current.deadline != next.deadline && current.deadline.is_none_or(|d| now >= d))
}

fn publish(state: &watch::Sender<LeaderState>, next: LeaderState, config: &LeaseConfig) {
    state.send_if_modified(|current| {
        if *current == next {
            return false;
        }
        // Stored either way: `state()`, `can_write()` and a later `borrow` see it.
        let news = is_news(current, &next, now());
        if current.is_leader != next.is_leader {
            if next.is_leader {
                tracing::info!(lease = %config.name, identity = %config.identity, "became leader");
            } else {
                tracing::info!(lease = %config.name, holder = ?next.holder, "not leader");
            }
        }
        *current = next;
        news
    });
}

/// One read and, if the rule allows, one write.
async fn attempt<S: LeaseStore>(store: &S, elector: &mut Elector) {
    let timing = elector.timing;
    let current = match bounded(timing.call_timeout, store.get()).await {
        Ok(current) => current,
        Err(e) => {
            tracing::warn!(error = %e, "reading the Lease failed");
            elector.failed(now());
            return;
        }
    };
    elector.observe(current.as_ref(), now());
    let claim = claim(&elector.identity, elector.observed.as_ref(), now());
    if matches!(claim, Claim::Wait { .. }) {
        elector.retry_at = None;
        return;
    }
    let sent_at = now();
    let desired = elector.desired(
        current.as_ref(),
        &claim,
        MicroTime(k8s_openapi::jiff::Timestamp::now()),
    );
    let write = match claim {
        Claim::Create => bounded(timing.call_timeout, store.create(desired)).await,
        _ => bounded(timing.call_timeout, store.replace(desired)).await,
    };
    match write {
        Ok(written) => elector.won(&written, sent_at, now()),
        Err(StoreError::Conflict) => {
            // Someone else wrote between our read and write: read again at once.
            elector.retry_at = Some(now());
        }
        Err(e) => {
            tracing::warn!(error = %e, ?claim, "writing the Lease failed");
            elector.failed(now());
        }
    }
}

/// Gives the Lease up if this process still holds it: no holder, duration 1 s.
async fn release<S: LeaseStore>(store: &S, identity: &str, timing: Timing) {
    let result = bounded(timing.call_timeout, async {
        let Some(mut lease) = store.get().await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(identity) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        store.replace(lease).await.map(|_| true)
    })
    .await;
    match result {
        Ok(true) => tracing::info!(%identity, "released the Lease"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "releasing the Lease failed; it will expire"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn may_write_only_as_leader_before_the_deadline() {
        let t0 = Instant::now();
        let state = |is_leader, deadline: Option<Duration>| LeaderState {
            is_leader,
            holder: None,
            acquired_at: None,
            deadline: deadline.map(|d| t0 + d),
        };
        let cases = [
            (state(true, Some(SECOND)), Duration::ZERO, true),
            (state(true, Some(SECOND)), SECOND / 2, true),
            (state(true, Some(SECOND)), SECOND, false),
            (state(true, Some(SECOND)), 2 * SECOND, false),
            (state(true, None), 1000 * SECOND, true),
            (state(false, None), Duration::ZERO, false),
            (state(false, Some(SECOND)), Duration::ZERO, false),
        ];
        for (state, at, expected) in cases {
            assert_eq!(may_write(&state, t0 + at), expected, "{state:?} at +{at:?}");
        }
        assert!(Leadership::always(t0).can_write(t0 + 1000 * SECOND));
    }

    #[test]
    fn timing_renews_before_the_deadline_and_the_deadline_before_expiry() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // (duration, grace) → (renew after, deadline after, seconds on the wire)
        let cases = [
            ((5 * SECOND, 2 * SECOND), (3 * SECOND, 4 * SECOND, 5)),
            ((15 * SECOND, 5 * SECOND), (10 * SECOND, ms(12_500), 15)),
            // Grace not below the duration: half of it.
            ((4 * SECOND, 4 * SECOND), (2 * SECOND, 3 * SECOND, 4)),
            ((4 * SECOND, Duration::ZERO), (2 * SECOND, 3 * SECOND, 4)),
            // Sub-second parts round up on the wire; never under a second.
            ((ms(1500), ms(500)), (SECOND, ms(1250), 2)),
            (
                (ms(10), ms(5)),
                (ms(995), Duration::from_micros(997_500), 1),
            ),
            ((ms(10), ms(0)), (ms(500), ms(750), 1)),
        ];
        for ((duration, grace), (renew, deadline, seconds)) in cases {
            let timing = Timing::new(duration, grace);
            assert_eq!(timing.renew_at(t0), t0 + renew, "{duration:?}/{grace:?}");
            assert_eq!(timing.deadline(t0), t0 + deadline, "{duration:?}/{grace:?}");
            assert_eq!(timing.duration_seconds(), seconds, "{duration:?}/{grace:?}");
            assert!(renew < deadline && deadline < timing.duration);
        }
    }

    fn lease(rv: &str, holder: Option<&str>, seconds: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("blink-scaler".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: seconds,
                lease_transitions: Some(3),
                acquire_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn only_a_change_of_role_holder_or_term_or_a_late_renewal_is_news() {
        let t0 = Instant::now();
        let leading = |deadline: Duration| LeaderState {
            is_leader: true,
            holder: Some("me".into()),
            acquired_at: Some(t0),
            deadline: Some(t0 + deadline),
        };
        let cases = [
            // A renewal before the deadline: stored, nobody woken.
            (leading(4 * SECOND), leading(7 * SECOND), 3 * SECOND, false),
            // A renewal after it: writes are waiting for it.
            (leading(4 * SECOND), leading(9 * SECOND), 4 * SECOND, true),
            (leading(4 * SECOND), leading(9 * SECOND), 5 * SECOND, true),
            // Becoming leader, losing it, a new term, a new holder elsewhere.
            (
                LeaderState::follower(None),
                leading(4 * SECOND),
                Duration::ZERO,
                true,
            ),
            (
                leading(4 * SECOND),
                LeaderState::follower(None),
                SECOND,
                true,
            ),
            (
                leading(4 * SECOND),
                LeaderState {
                    acquired_at: Some(t0 + SECOND),
                    ..leading(4 * SECOND)
                },
                SECOND,
                true,
            ),
            (
                LeaderState::follower(Some("a".into())),
                LeaderState::follower(Some("b".into())),
                SECOND,
                true,
            ),
        ];
        for (current, next, at, news) in cases {
            assert_eq!(
                is_news(&current, &next, t0 + at),
                news,
                "{current:?} -> {next:?} at +{at:?}"
            );
        }
    }

    #[tokio::test]
    async fn renewals_wake_no_subscriber_and_roles_change_once() {
        let shared = Arc::new(Shared::default());
        let c = candidate(&shared, "a");
        let mut roles = Box::pin(c.leadership.roles());
        let became = tokio::time::timeout(10 * SECOND, roles.next())
            .await
            .expect("a role change");
        assert_eq!(became, Some(true));
        let mut rx = c.leadership.subscribe();
        rx.borrow_and_update();
        let first = c.leadership.state().deadline.expect("deadline");
        // Several renewals (every 600 ms): the deadline moves, nobody is woken.
        tokio::time::sleep(2 * SECOND).await;
        assert!(c.leadership.state().deadline.expect("deadline") > first);
        assert!(
            !rx.has_changed().expect("sender alive"),
            "a renewal woke a subscriber"
        );
        c.shutdown.cancel();
        let lost = tokio::time::timeout(10 * SECOND, roles.next())
            .await
            .expect("a role change");
        assert_eq!(lost, Some(false));
        assert!(
            rx.has_changed().expect("sender alive"),
            "losing the role is news"
        );
        c.task.await.expect("task ends");
    }

    #[tokio::test]
    async fn a_term_lost_and_won_back_between_two_looks_is_a_new_term() {
        let t0 = Instant::now();
        let leader = |acquired_at: Instant| LeaderState {
            is_leader: true,
            holder: Some("me".into()),
            acquired_at: Some(acquired_at),
            deadline: Some(acquired_at + 10 * SECOND),
        };
        let (leadership, control) = Leadership::manual(leader(t0));
        let mut roles = Box::pin(leadership.roles());
        // Lost, then won back, before the stream looks: one change, a new term.
        control.set(LeaderState::follower(Some("other".into())));
        control.set(leader(t0 + SECOND));
        let next = tokio::time::timeout(SECOND, roles.next()).await;
        assert_eq!(next.ok(), Some(Some(true)), "a new term went unseen");
        assert_eq!(leadership.state().term(), Some(t0 + SECOND));
        // A renewal in the same term is no change.
        control.set(LeaderState {
            deadline: Some(t0 + 20 * SECOND),
            ..leader(t0 + SECOND)
        });
        assert!(
            tokio::time::timeout(SECOND / 10, roles.next())
                .await
                .is_err(),
            "a renewal was taken for a new term"
        );
        control.set(LeaderState::follower(None));
        let next = tokio::time::timeout(SECOND, roles.next()).await;
        assert_eq!(next.ok(), Some(Some(false)));
    }

    #[test]
    fn claim_takes_a_free_or_expired_lease_only() {
        let t0 = Instant::now();
        let observed = |holder: Option<&str>| Observed {
            resource_version: Some("7".into()),
            holder: holder.map(String::from),
            duration: 5 * SECOND,
            seen_at: t0,
        };
        let wait = |holder: &str| Claim::Wait {
            holder: holder.into(),
            until: t0 + 5 * SECOND,
        };
        let cases = [
            (None, Duration::ZERO, Claim::Create),
            (Some(observed(None)), Duration::ZERO, Claim::Acquire),
            (Some(observed(Some("me"))), Duration::ZERO, Claim::Renew),
            (Some(observed(Some("me"))), 60 * SECOND, Claim::Renew),
            (Some(observed(Some("other"))), Duration::ZERO, wait("other")),
            (Some(observed(Some("other"))), 4 * SECOND, wait("other")),
            (Some(observed(Some("other"))), 5 * SECOND, Claim::Acquire),
        ];
        for (observed, at, expected) in cases {
            assert_eq!(
                claim("me", observed.as_ref(), t0 + at),
                expected,
                "{observed:?} +{at:?}"
            );
        }
    }

    #[test]
    fn a_record_is_read_on_the_local_clock() {
        let t0 = Instant::now();
        let timing = Timing::new(5 * SECOND, 2 * SECOND);
        let cases = [
            // The holder's own duration wins; an empty holder is none.
            (lease("1", Some("x"), Some(9)), Some("x"), 9 * SECOND),
            (lease("1", Some(""), Some(9)), None, 9 * SECOND),
            (lease("1", Some("x"), None), Some("x"), 5 * SECOND),
            (lease("1", Some("x"), Some(0)), Some("x"), 5 * SECOND),
            (lease("1", Some("x"), Some(-3)), Some("x"), 5 * SECOND),
        ];
        for (lease, holder, duration) in cases {
            let observed = Observed::of(&lease, timing.duration, t0);
            assert_eq!(observed.holder.as_deref(), holder, "{lease:?}");
            assert_eq!(observed.expires_at(), t0 + duration, "{lease:?}");
        }

        let mut elector = Elector::new("me".into(), timing);
        elector.observe(Some(&lease("1", Some("x"), Some(5))), t0);
        // Reading the same record again does not extend it...
        elector.observe(Some(&lease("1", Some("x"), Some(5))), t0 + 4 * SECOND);
        assert_eq!(elector.next_attempt(t0 + 4 * SECOND), t0 + 5 * SECOND);
        // ...a renewal (new resourceVersion) does.
        elector.watched(Some(&lease("2", Some("x"), Some(5))), t0 + 4 * SECOND);
        assert_eq!(elector.next_attempt(t0 + 4 * SECOND), t0 + 9 * SECOND);
        assert_eq!(elector.state(), LeaderState::follower(Some("x".into())));
        // A release or a deletion: try at once.
        elector.watched(Some(&lease("3", None, Some(1))), t0 + 5 * SECOND);
        assert_eq!(elector.next_attempt(t0 + 5 * SECOND), t0 + 5 * SECOND);
        elector.watched(None, t0 + 6 * SECOND);
        assert_eq!(elector.next_attempt(t0 + 6 * SECOND), t0 + 6 * SECOND);
    }

    #[test]
    fn leading_follows_writes_not_watch_events() {
        let t0 = Instant::now();
        let timing = Timing::new(5 * SECOND, 2 * SECOND);
        let mut elector = Elector::new("me".into(), timing);
        elector.won(&lease("4", Some("me"), Some(5)), t0, t0);
        let leading = LeaderState {
            is_leader: true,
            holder: Some("me".into()),
            acquired_at: Some(t0),
            deadline: Some(t0 + 4 * SECOND),
        };
        assert_eq!(elector.state(), leading);
        assert_eq!(elector.next_attempt(t0), t0 + 3 * SECOND);
        // A late watch event from before our write changes nothing.
        elector.watched(Some(&lease("3", Some("other"), Some(5))), t0);
        assert_eq!(elector.state(), leading);
        // A renew keeps the acquisition time and moves the deadline.
        elector.won(
            &lease("5", Some("me"), Some(5)),
            t0 + 3 * SECOND,
            t0 + 3 * SECOND,
        );
        assert_eq!(elector.state().acquired_at, Some(t0));
        assert_eq!(elector.state().deadline, Some(t0 + 7 * SECOND));
        // A failed renew retries soon; the deadline stays.
        elector.failed(t0 + 6 * SECOND);
        assert_eq!(
            elector.next_attempt(t0 + 6 * SECOND),
            t0 + 6 * SECOND + timing.retry
        );
        assert_eq!(elector.state().deadline, Some(t0 + 7 * SECOND));
        // A read showing another holder ends it.
        elector.observe(Some(&lease("9", Some("other"), Some(5))), t0 + 8 * SECOND);
        assert_eq!(elector.state(), LeaderState::follower(Some("other".into())));
    }

    #[test]
    fn desired_lease_records_acquisitions_and_renewals() {
        let t0 = Instant::now();
        let wall = MicroTime(k8s_openapi::jiff::Timestamp::from_second(1_000).expect("time"));
        let mut elector = Elector::new("me".into(), Timing::new(5 * SECOND, 2 * SECOND));
        let current = lease("1", Some("other"), Some(5));

        let acquired = elector.desired(Some(&current), &Claim::Acquire, wall.clone());
        let spec = acquired.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.acquire_time.as_ref(), Some(&wall));
        assert_eq!(spec.renew_time.as_ref(), Some(&wall));
        assert_eq!(spec.lease_duration_seconds, Some(5));
        assert_eq!(
            acquired.metadata.resource_version.as_deref(),
            Some("1"),
            "CAS on what was read"
        );

        elector.won(&lease("2", Some("me"), Some(5)), t0, t0);
        let renewed = elector.desired(
            Some(&lease("2", Some("me"), Some(5))),
            &Claim::Renew,
            wall.clone(),
        );
        let spec = renewed.spec.expect("spec");
        assert_eq!(
            spec.lease_transitions,
            Some(3),
            "a renewal is no transition"
        );
        assert_ne!(
            spec.acquire_time.as_ref(),
            Some(&wall),
            "a renewal keeps acquireTime"
        );

        let created = elector.desired(None, &Claim::Create, wall);
        let spec = created.spec.expect("spec");
        assert_eq!(
            (spec.lease_transitions, spec.holder_identity.as_deref()),
            (Some(0), Some("me"))
        );
    }

    // --- the task, against an in-memory Lease ---

    #[derive(Default)]
    struct Shared {
        lease: Mutex<(u64, Option<Lease>)>,
        changes: watch::Sender<Option<Lease>>,
    }

    /// One candidate's view of a shared in-memory Lease; `cut` makes its calls fail.
    #[derive(Clone)]
    struct MemoryLeases {
        shared: Arc<Shared>,
        cut: Arc<AtomicBool>,
    }

    impl MemoryLeases {
        fn candidate(shared: &Arc<Shared>) -> Self {
            Self {
                shared: Arc::clone(shared),
                cut: Arc::new(AtomicBool::new(false)),
            }
        }

        fn check(&self) -> Result<(), StoreError> {
            if self.cut.load(Ordering::SeqCst) {
                return Err(StoreError::Timeout(Duration::ZERO));
            }
            Ok(())
        }

        fn write(&self, mut lease: Lease, create: bool) -> Result<Lease, StoreError> {
            self.check()?;
            let mut guard = self.shared.lease.lock().expect("lock");
            let (rv, current) = &mut *guard;
            let matches = match current {
                None => create,
                Some(current) => {
                    !create && current.metadata.resource_version == lease.metadata.resource_version
                }
            };
            if !matches {
                return Err(StoreError::Conflict);
            }
            *rv += 1;
            lease.metadata.resource_version = Some(rv.to_string());
            *current = Some(lease.clone());
            self.shared.changes.send_replace(Some(lease.clone()));
            Ok(lease)
        }

        fn holder(&self) -> Option<String> {
            let guard = self.shared.lease.lock().expect("lock");
            guard
                .1
                .as_ref()
                .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
        }
    }

    impl LeaseStore for MemoryLeases {
        async fn get(&self) -> Result<Option<Lease>, StoreError> {
            self.check()?;
            Ok(self.shared.lease.lock().expect("lock").1.clone())
        }

        async fn create(&self, lease: Lease) -> Result<Lease, StoreError> {
            self.write(lease, true)
        }

        async fn replace(&self, lease: Lease) -> Result<Lease, StoreError> {
            self.write(lease, false)
        }

        fn watch(&self) -> BoxStream<'static, Option<Lease>> {
            let rx = self.shared.changes.subscribe();
            futures::stream::unfold(rx, |mut rx| async move {
                rx.changed().await.ok()?;
                let lease = rx.borrow_and_update().clone();
                Some((lease, rx))
            })
            .boxed()
        }
    }

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: "blink".into(),
            name: DEFAULT_LEASE_NAME.into(),
            identity: identity.into(),
            duration: SECOND,
            grace: Duration::from_millis(400),
        }
    }

    struct Candidate {
        leadership: Leadership,
        task: JoinHandle<()>,
        shutdown: CancellationToken,
        store: MemoryLeases,
    }

    fn candidate(shared: &Arc<Shared>, identity: &str) -> Candidate {
        let store = MemoryLeases::candidate(shared);
        let shutdown = CancellationToken::new();
        let (leadership, task) =
            Leadership::start_with(store.clone(), config(identity), shutdown.clone());
        Candidate {
            leadership,
            task,
            shutdown,
            store,
        }
    }

    async fn until_leads(candidate: &Candidate) {
        tokio::time::timeout(10 * SECOND, async {
            let mut rx = candidate.leadership.subscribe();
            while !rx.borrow_and_update().is_leader {
                rx.changed().await.expect("sender alive");
            }
        })
        .await
        .expect("becomes leader");
    }

    /// Waits until exactly one of two leads; returns (leader, other).
    async fn one_leads(a: Candidate, b: Candidate) -> (Candidate, Candidate) {
        tokio::select! {
            () = until_leads(&a) => (a, b),
            () = until_leads(&b) => (b, a),
        }
    }

    #[tokio::test]
    async fn one_of_two_leads_and_a_release_hands_over() {
        let shared = Arc::new(Shared::default());
        let (leader, other) = one_leads(candidate(&shared, "a"), candidate(&shared, "b")).await;
        let identity = leader.leadership.state().holder.expect("holder");
        assert_eq!(leader.store.holder().as_deref(), Some(identity.as_str()));
        assert!(leader.leadership.can_write(now()));
        // Several renewals later, still exactly one leader.
        tokio::time::sleep(2 * SECOND).await;
        assert!(leader.leadership.state().is_leader);
        let follower = other.leadership.state();
        assert!(!follower.is_leader);
        assert_eq!(follower.holder.as_deref(), Some(identity.as_str()));

        leader.shutdown.cancel();
        leader.task.await.expect("task ends");
        assert!(!leader.leadership.can_write(now()));
        assert_eq!(leader.store.holder(), None, "released");
        until_leads(&other).await;
        let state = other.leadership.state();
        assert!(state.acquired_at.is_some() && other.leadership.can_write(now()));
        other.shutdown.cancel();
        other.task.await.expect("task ends");
    }

    #[tokio::test]
    async fn a_crashed_leaders_deadline_passes_before_anyone_takes_over() {
        let shared = Arc::new(Shared::default());
        let (leader, other) = one_leads(candidate(&shared, "a"), candidate(&shared, "b")).await;
        leader.task.abort();
        let _ = leader.task.await;
        let old = leader.leadership.state();
        until_leads(&other).await;
        let new = other.leadership.state();
        let (deadline, acquired) = (
            old.deadline.expect("deadline"),
            new.acquired_at.expect("acquired"),
        );
        assert!(
            deadline < acquired,
            "old deadline {deadline:?} not before takeover {acquired:?}"
        );
        assert!(!leader.leadership.can_write(now()));
        assert!(
            old.is_leader,
            "an aborted task publishes nothing; the deadline still holds"
        );
        other.shutdown.cancel();
    }

    #[tokio::test]
    async fn a_leader_cut_off_stops_at_its_deadline_and_resumes_after_a_renew() {
        let shared = Arc::new(Shared::default());
        let c = candidate(&shared, "a");
        until_leads(&c).await;
        c.store.cut.store(true, Ordering::SeqCst);
        let deadline = c.leadership.state().deadline.expect("deadline");
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
        assert!(!c.leadership.can_write(now()));
        let waiting = c.leadership.clone();
        let writable = tokio::spawn(async move { waiting.writable().await });
        tokio::task::yield_now().await;
        assert!(!writable.is_finished(), "a write waits for the next renew");
        c.store.cut.store(false, Ordering::SeqCst);
        let state = tokio::time::timeout(10 * SECOND, writable)
            .await
            .expect("renewed")
            .expect("task");
        assert!(state.deadline.is_some_and(|d| d > deadline));
        assert_eq!(
            state.acquired_at,
            c.leadership.state().acquired_at,
            "never lost it"
        );
        c.shutdown.cancel();
        c.task.await.expect("task ends");
    }
}
