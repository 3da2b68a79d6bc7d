//! The demand endpoint: the scaler's side of the demand protocol (DESIGN.md, "The demand
//! protocol").
//!
//! - [`store`]: the reports per activator and their sum per function (pure).
//! - [`Demand`]: the shared handle over the store that the server writes and the
//!   functions' workers read, with a [`Notify`] per function that wakes its worker on a
//!   poke or when a snapshot brings demand to a function that had none.
//! - [`watch_activators`]: follows the activator Service's EndpointSlices, so a
//!   silent activator whose pod is gone stops counting (and Blink's slices in
//!   transparent mode point at the ready ones).
//! - [`server`]: the HTTP endpoint (`POST` snapshots and pokes, h2c and HTTP/1.1),
//!   which only the leader answers, and only to the activators' ServiceAccount
//!   ([`auth`]).

pub mod auth;
pub mod metrics;
pub mod server;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use blink_crds::demand::{FunctionKey, Poke, Snapshot};
use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::Notify;

pub use auth::{Authenticator, KubeTokenReviewer, Review, ReviewError, TokenReviewer};
pub use metrics::DemandMetrics;
pub use store::{DemandConfig, FunctionDemandSum, Stale};

/// What became of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotOutcome {
    Applied,
    /// Not newer than the last snapshot applied from its session; dropped.
    Stale {
        last_seq: u64,
    },
}

/// The demand every activator reported, shared by the server (writes) and the
/// functions' workers (reads). Its locks are held only for in-memory work, never
/// across an `.await`.
#[derive(Debug)]
pub struct Demand {
    store: Mutex<store::DemandStore>,
    wakers: Mutex<HashMap<FunctionKey, Arc<Wake>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind, still consistent
    // enough to read; refusing all demand afterwards would be worse.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A function's wake-up, and when the earliest poke its worker has not taken yet
/// arrived: a poke's latency is counted from its arrival even when the worker was busy
/// and noticed it later.
#[derive(Debug, Default)]
pub struct Wake {
    notify: Notify,
    poked_at: Mutex<Option<Instant>>,
}

impl Wake {
    /// Ready at once if a wake-up came since the last wait.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// When the earliest poke not taken yet arrived; then none until the next poke.
    pub fn take_poke(&self) -> Option<Instant> {
        lock(&self.poked_at).take()
    }
}

impl Demand {
    pub fn new(config: DemandConfig) -> Arc<Self> {
        Arc::new(Self {
            store: Mutex::new(store::DemandStore::new(config)),
            wakers: Mutex::new(HashMap::new()),
        })
    }

    /// Applies a snapshot received at `now`, and wakes the functions it brings demand
    /// to.
    pub fn apply_snapshot(&self, snapshot: Snapshot, now: Instant) -> SnapshotOutcome {
        let result = lock(&self.store).apply_snapshot(snapshot, now);
        match result {
            Ok(woken) => {
                if !woken.is_empty() {
                    let wakers = lock(&self.wakers);
                    for key in &woken {
                        if let Some(waker) = wakers.get(key) {
                            waker.notify.notify_one();
                        }
                    }
                }
                SnapshotOutcome::Applied
            }
            Err(Stale { last_seq }) => SnapshotOutcome::Stale { last_seq },
        }
    }

    /// Applies a poke received at `now`, and wakes its function.
    pub fn apply_poke(&self, poke: Poke, now: Instant) {
        // The arrival is kept before the demand is applied: a worker that reads the
        // demand after taking no poke then cannot see it unattributed (and one that
        // takes the poke first counts it as held work).
        let waker = lock(&self.wakers).get(&poke.key).cloned();
        if let Some(waker) = &waker {
            lock(&waker.poked_at).get_or_insert(now);
        }
        lock(&self.store).apply_poke(poke, now);
        if let Some(waker) = waker {
            waker.notify.notify_one();
        }
    }

    /// The function's demand summed over the activators that still count at `now`.
    pub fn aggregate(&self, key: &FunctionKey, now: Instant) -> FunctionDemandSum {
        lock(&self.store).aggregate(key, now)
    }

    /// The function's wake-up: notified (`notify_one`, so a wake-up that comes while
    /// the worker is busy is kept for its next wait) on every poke for it, and when a
    /// snapshot brings it demand after none. Meant for the function's one worker.
    pub fn waker(&self, key: &FunctionKey) -> Arc<Wake> {
        Arc::clone(lock(&self.wakers).entry(key.clone()).or_default())
    }

    /// Drops the function's wake-up and its reported demand (the function is gone).
    pub fn forget(&self, key: &FunctionKey) {
        lock(&self.wakers).remove(key);
        lock(&self.store).forget(key);
    }

    /// The pod names now in the activator Service's endpoints.
    pub fn set_activator_pods(&self, pods: HashSet<String>) {
        lock(&self.store).set_activator_pods(pods);
    }

    /// The pod names now known to be in the activator Service's endpoints.
    pub fn activator_pods(&self) -> HashSet<String> {
        lock(&self.store).activator_pods().clone()
    }

    /// Drops reporters that no longer count at `now` (also done on every report).
    pub fn prune(&self, now: Instant) {
        lock(&self.store).prune(now);
    }
}

/// What one EndpointSlice of the activator Service says: the pods of its endpoints
/// (demand counts their reports) and its ready addresses (Blink's slices point there).
#[derive(Debug, Default)]
struct Members {
    pods: HashSet<String>,
    ready: Vec<String>,
}

impl Members {
    fn of(slice: &EndpointSlice) -> Self {
        Self {
            pods: pods_of(slice),
            ready: crate::transparent::ready_addresses(slice),
        }
    }
}

/// Follows the activator Service's EndpointSlices (`kubernetes.io/service-name`) in
/// `namespace`: feeds the pod names of their endpoints to `demand`, and their ready
/// addresses, sorted, to `addresses` (changed only once a list is complete, so never a
/// partial set mid-relist). Runs until the task is dropped; watch errors are retried
/// with backoff. Needs RBAC `list` and `watch` on `endpointslices` in that namespace.
pub async fn watch_activators(
    client: kube::Client,
    namespace: String,
    service_name: String,
    demand: Arc<Demand>,
    addresses: tokio::sync::watch::Sender<Vec<String>>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service_name}"));
    let mut slices: HashMap<String, Members> = HashMap::new();
    // Slices listed since the watch (re)started; replaces `slices` once complete.
    let mut relisting: Option<HashMap<String, Members>> = None;
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => {
                relisting = Some(HashMap::new());
                continue;
            }
            Ok(watcher::Event::InitApply(slice)) => {
                if let Some(listed) = relisting.as_mut() {
                    listed.insert(slice_name(&slice), Members::of(&slice));
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(listed) = relisting.take() {
                    slices = listed;
                }
            }
            Ok(watcher::Event::Apply(slice)) => {
                slices.insert(slice_name(&slice), Members::of(&slice));
            }
            Ok(watcher::Event::Delete(slice)) => {
                slices.remove(&slice_name(&slice));
            }
            Err(e) => {
                tracing::warn!(error = %e, service = %service_name,
                    "watching the activator Service's EndpointSlices failed; retrying");
                continue;
            }
        }
        demand.set_activator_pods(union(slices.values().map(|m| &m.pods)));
        let mut ready: Vec<String> = slices.values().flat_map(|m| m.ready.clone()).collect();
        ready.sort();
        ready.dedup();
        addresses.send_if_modified(|current| {
            let changed = *current != ready;
            *current = ready;
            changed
        });
    }
}

fn slice_name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

/// The pods (`targetRef.name`) an EndpointSlice lists, except terminating ones: a pod
/// on its way out that still reports is counted while fresh anyway, and once silent
/// should stop counting.
pub fn pods_of(slice: &EndpointSlice) -> HashSet<String> {
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.terminating) != Some(true))
        .filter_map(|e| e.target_ref.as_ref())
        .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"))
        .filter_map(|r| r.name.clone())
        .collect()
}

fn union<'a>(sets: impl Iterator<Item = &'a HashSet<String>>) -> HashSet<String> {
    sets.flatten().cloned().collect()
}

#[cfg(test)]
mod tests;
