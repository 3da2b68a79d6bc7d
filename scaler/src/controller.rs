//! Watches and bookkeeping: which functions exist, who claims which target, and what
//! changed on the targets. One [`crate::function`] worker per `ScaledObject`; the
//! controller starts, updates and stops them, and tells each about conflicts (two
//! objects on one target: both are left alone and say so) and target changes
//! (metadata-only watches of Deployments and StatefulSets).
//!
//! Annotated workloads get their generated `ScaledObject` here ([`crate::generated`]);
//! the leader alone writes it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use blink_crds::{FunctionKey, ScaledObject, listing::Listing};
use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, StatefulSet},
        autoscaling::v2::HorizontalPodAutoscaler,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{DeleteParams, PartialObjectMeta, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType},
        watcher::{self, Event},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    function::{self, Context, FunctionInput, Handle},
    generated,
    retry::Retries,
    target::{FIELD_MANAGER, TargetRef},
};

/// A target as the conflict check sees it: namespace, kind and name.
type TargetId = (String, String, String);

fn target_id(target: &TargetRef) -> TargetId {
    // A SpinApp is scaled through the Deployment of its name: one target, not two.
    let kind = if crate::target::is_spin_app(target) {
        "Deployment".to_owned()
    } else {
        target.kind.clone()
    };
    (target.namespace.clone(), kind, target.name.clone())
}

/// The `apiVersion` of the workload kinds Blink follows by annotation.
fn api_version_of(kind: &str) -> &'static str {
    if kind == "SpinApp" {
        SPIN_APP_API_VERSION
    } else {
        "apps/v1"
    }
}

const SPIN_APP_API_VERSION: &str = "core.spinkube.dev/v1alpha1";
/// How soon a generated object whose write or removal failed is tried again: the
/// first time, and at most (the wait doubles with each failure in a row).
const GENERATED_RETRY_FIRST: Duration = Duration::from_secs(5);
const GENERATED_RETRY_MAX: Duration = Duration::from_secs(300);

struct Entry {
    handle: Handle,
    object: Arc<ScaledObject>,
    target: TargetId,
}

/// The objects claiming one target, sorted. Almost always one: a Vec, where a BTreeSet
/// would allocate a half-kilobyte node per target.
#[derive(Debug, Default)]
struct Claimants(Vec<FunctionKey>);

impl Claimants {
    fn insert(&mut self, key: FunctionKey) {
        if let Err(at) = self.0.binary_search(&key) {
            self.0.insert(at, key);
        }
    }

    fn remove(&mut self, key: &FunctionKey) {
        if let Ok(at) = self.0.binary_search(key) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Claimants {
    type Item = &'a FunctionKey;
    type IntoIter = std::slice::Iter<'a, FunctionKey>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Everything the controller knows; owned by its one loop, so no locks.
struct Controller {
    ctx: Arc<Context>,
    functions: HashMap<FunctionKey, Entry>,
    claims: HashMap<TargetId, Claimants>,
    /// Workloads seen, for generated objects and change detection: only what those
    /// need ([`workload_record`]), boxed, so 10,000 plain Deployments cost little.
    workloads: HashMap<TargetId, Box<ObjectMeta>>,
    /// HorizontalPodAutoscalers by the target they scale: another owner of it.
    autoscalers: HashMap<TargetId, BTreeSet<String>>,
    /// What was last applied for each generated object, so it is written on change only.
    generated: HashMap<TargetId, ScaledObject>,
    /// Workloads whose generated object could not be written or removed: tried again
    /// with backoff until it works (a change of the workload tries at once).
    generated_retries: Retries<TargetId>,
    /// Objects whose `http` routes another, older object holds
    /// ([`blink_crds::routing::resolve`]), with why.
    route_conflicts: HashMap<FunctionKey, String>,
    /// An object with an `http` trigger changed since routes were last settled.
    routes_dirty: bool,
    /// Each watch's latest list: what a new list leaves out was deleted while the
    /// watch was away, and goes as if its deletion had been seen.
    listed_objects: Listing<FunctionKey>,
    /// HPAs by (namespace, name).
    listed_autoscalers: Listing<(String, String)>,
    /// Workloads of each kind by (namespace, name).
    listed_workloads: HashMap<&'static str, Listing<(String, String)>>,
}

enum Change {
    Autoscaler(Box<Event<HorizontalPodAutoscaler>>),
    Object(Box<Event<ScaledObject>>),
    Workload(&'static str, Box<Event<ObjectMeta>>),
    Leadership(bool),
}

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let namespace = ctx.config.watch_namespace.clone();
    let objects: Api<ScaledObject> = scoped(client.clone(), &namespace);
    let deployments: Api<PartialObjectMeta<Deployment>> = scoped_meta(client.clone(), &namespace);
    let statefulsets: Api<PartialObjectMeta<StatefulSet>> = scoped_meta(client.clone(), &namespace);
    let config = watcher::Config::default();
    // Changes of role only: generated objects are reconciled on becoming leader, not at
    // every renewal.
    let leader_changes = ctx.leadership.roles();
    let autoscalers: Api<HorizontalPodAutoscaler> = scoped(client.clone(), &namespace);
    let mut streams = vec![
        watcher::watcher(autoscalers, config.clone())
            .default_backoff()
            .filter_map(|e| async move {
                e.ok()
                    .map(|e| Change::Autoscaler(Box::new(e.modify(forget_managed_fields))))
            })
            .boxed(),
        watcher::watcher(objects, config.clone())
            .default_backoff()
            .filter_map(|e| async move {
                e.ok()
                    .map(|e| Change::Object(Box::new(e.modify(forget_managed_fields))))
            })
            .boxed(),
        watcher::watcher(deployments, config.clone())
            .default_backoff()
            .filter_map(|e| async move {
                e.ok()
                    .map(|e| Change::Workload("Deployment", Box::new(metadata_of(e))))
            })
            .boxed(),
        watcher::watcher(statefulsets, config)
            .default_backoff()
            .filter_map(|e| async move {
                e.ok()
                    .map(|e| Change::Workload("StatefulSet", Box::new(metadata_of(e))))
            })
            .boxed(),
        leader_changes.map(Change::Leadership).boxed(),
    ];
    // SpinApps are followed only where SpinKube's CRD is installed.
    let spin_gvk =
        kube::api::GroupVersionKind::gvk(crate::target::SPIN_GROUP, "v1alpha1", "SpinApp");
    if let Ok((resource, _)) = kube::discovery::pinned_kind(&client, &spin_gvk).await {
        info!("SpinApp CRD found: following annotated SpinApps");
        let apps: Api<PartialObjectMeta<kube::api::DynamicObject>> = if namespace.is_empty() {
            Api::all_with(client.clone(), &resource)
        } else {
            Api::namespaced_with(client.clone(), &namespace, &resource)
        };
        streams.push(
            watcher::watcher(apps, watcher::Config::default())
                .default_backoff()
                .filter_map(|e| async move {
                    e.ok()
                        .map(|e| Change::Workload("SpinApp", Box::new(metadata_of(e))))
                })
                .boxed(),
        );
    }
    // Every watch but the leadership one lists first; until all have, a worker could
    // act on a target whose other owner (an HPA, a second object) is not known yet.
    let mut listing = streams.len() - 1;
    let mut changes = futures::stream::select_all(streams);
    let mut controller = Controller {
        ctx,
        functions: HashMap::new(),
        claims: HashMap::new(),
        workloads: HashMap::new(),
        autoscalers: HashMap::new(),
        generated: HashMap::new(),
        generated_retries: Retries::new(GENERATED_RETRY_FIRST, GENERATED_RETRY_MAX),
        route_conflicts: HashMap::new(),
        routes_dirty: false,
        listed_objects: Listing::default(),
        listed_autoscalers: Listing::default(),
        listed_workloads: HashMap::new(),
    };
    // Routes are settled over every object (linear), so at most once a second.
    let mut settle_routes = tokio::time::interval(Duration::from_secs(1));
    settle_routes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_retry = controller.generated_retries.next_due();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = settle_routes.tick(), if controller.routes_dirty => controller.settle_routes(),
            () = sleep_until_some(next_retry), if next_retry.is_some() => {
                controller.retry_generated().await;
            }
            change = changes.next() => {
                let list_done = matches!(
                    &change,
                    Some(Change::Object(e)) if matches!(**e, Event::InitDone)
                ) || matches!(&change, Some(Change::Workload(_, e)) if matches!(**e, Event::InitDone))
                    || matches!(&change, Some(Change::Autoscaler(e)) if matches!(**e, Event::InitDone));
                if list_done {
                    listing = listing.saturating_sub(1);
                    if listing == 0 {
                        info!("initial lists done: workers may act");
                        controller.ctx.synced.store(true, std::sync::atomic::Ordering::Release);
                    }
                }
                match change {
                Some(Change::Object(event)) => controller.on_object(*event).await,
                Some(Change::Workload(kind, event)) => controller.on_workload(kind, *event).await,
                Some(Change::Autoscaler(event)) => controller.on_autoscaler(*event),
                Some(Change::Leadership(true)) => controller.reconcile_generated().await,
                Some(Change::Leadership(false)) => {}
                None => break,
                }
            }
        }
    }
    for (_, entry) in controller.functions.drain() {
        entry.handle.stop().await;
    }
    Ok(())
}

/// Sleeps until `at`; forever without one (a `select!` branch guarded by `is_some`).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn has_http(object: &ScaledObject) -> bool {
    object
        .spec
        .triggers
        .iter()
        .any(|t| t.trigger_type == "http")
}

/// The HPAs by the target they scale, as `event` changes them; the targets whose
/// HPAs changed. An HPA is known by its namespace and name; a new list drops those it
/// leaves out.
fn autoscalers_after(
    autoscalers: &mut HashMap<TargetId, BTreeSet<String>>,
    listing: &mut Listing<(String, String)>,
    event: Event<HorizontalPodAutoscaler>,
) -> Vec<TargetId> {
    let namespace_of =
        |hpa: &HorizontalPodAutoscaler| hpa.metadata.namespace.clone().unwrap_or_default();
    let target_of = |hpa: &HorizontalPodAutoscaler| -> Option<TargetId> {
        let target = &hpa.spec.as_ref()?.scale_target_ref;
        Some((namespace_of(hpa), target.kind.clone(), target.name.clone()))
    };
    let mut touched = Vec::new();
    match event {
        Event::Apply(hpa) | Event::InitApply(hpa) => {
            let namespace = namespace_of(&hpa);
            let name = hpa.metadata.name.clone().unwrap_or_default();
            // Its target may have changed: drop its old claim (in its own namespace:
            // another namespace's HPA of that name is another HPA) first.
            for (id, names) in autoscalers.iter_mut() {
                if id.0 == namespace && names.remove(&name) {
                    touched.push(id.clone());
                }
            }
            if let Some(id) = target_of(&hpa) {
                autoscalers
                    .entry(id.clone())
                    .or_default()
                    .insert(name.clone());
                touched.push(id);
            }
            listing.saw((namespace, name));
        }
        Event::Delete(hpa) => {
            if let Some(id) = target_of(&hpa) {
                if let Some(names) = autoscalers.get_mut(&id) {
                    names.remove(&hpa.metadata.name.clone().unwrap_or_default());
                }
                touched.push(id);
            }
        }
        Event::Init => listing.begin(),
        Event::InitDone => {
            let listed = listing.end();
            for (id, names) in autoscalers.iter_mut() {
                let before = names.len();
                names.retain(|name| listed.contains(&(id.0.clone(), name.clone())));
                if names.len() != before {
                    touched.push(id.clone());
                }
            }
        }
    }
    autoscalers.retain(|_, names| !names.is_empty());
    touched
}

/// What the controller keeps of a workload: its identity, its generation and Blink's
/// annotations — all that generated objects, Events and change detection read.
fn workload_record(meta: ObjectMeta) -> Box<ObjectMeta> {
    Box::new(ObjectMeta {
        annotations: meta.annotations.map(|annotations| {
            annotations
                .into_iter()
                .filter(|(key, _)| key.starts_with(generated::ANNOTATION_PREFIX))
                .collect()
        }),
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        generation: meta.generation,
        ..ObjectMeta::default()
    })
}

/// What is kept of an object once its worker has started: its status only as far as
/// workers read it after their first input (the counts); the conditions and the rest
/// live in the worker's status book, and 10,000 copies of them would cost ~10 MB.
fn kept_for_later(object: &Arc<ScaledObject>) -> Arc<ScaledObject> {
    let Some(status) = object.status.as_ref() else {
        return object.clone();
    };
    Arc::new(ScaledObject {
        metadata: object.metadata.clone(),
        spec: object.spec.clone(),
        status: Some(blink_crds::ScaledObjectStatus {
            desired_replicas: status.desired_replicas,
            original_replica_count: status.original_replica_count,
            ..Default::default()
        }),
    })
}

/// Who wrote which field is not needed from these objects, and at 10,000 of them it
/// would be most of the memory they take.
fn forget_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

fn scoped<K>(client: kube::Client, namespace: &str) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    if namespace.is_empty() {
        Api::all(client)
    } else {
        Api::namespaced(client, namespace)
    }
}

fn scoped_meta<K>(client: kube::Client, namespace: &str) -> Api<PartialObjectMeta<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    if namespace.is_empty() {
        Api::all(client)
    } else {
        Api::namespaced(client, namespace)
    }
}

/// Only a workload's metadata matters here, whatever its kind.
fn metadata_of<K>(event: Event<PartialObjectMeta<K>>) -> Event<ObjectMeta> {
    match event {
        Event::Apply(m) => Event::Apply(m.metadata),
        Event::InitApply(m) => Event::InitApply(m.metadata),
        Event::Delete(m) => Event::Delete(m.metadata),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    }
}

impl Controller {
    async fn on_object(&mut self, event: Event<ScaledObject>) {
        match event {
            Event::Apply(object) => self.apply(object).await,
            Event::InitApply(object) => {
                if let Ok(key) = object.function_key() {
                    self.listed_objects.saw(key);
                }
                self.apply(object).await;
            }
            Event::Delete(object) => {
                if let Ok(key) = object.function_key() {
                    self.remove(&key).await;
                }
            }
            Event::Init => self.listed_objects.begin(),
            Event::InitDone => {
                for key in self.listed_objects.end_and_find_gone(self.functions.keys()) {
                    info!(function = %key, "deleted while the watch was away");
                    self.remove(&key).await;
                }
            }
        }
    }

    async fn apply(&mut self, object: ScaledObject) {
        let key = match object.function_key() {
            Ok(key) => key,
            Err(e) => {
                warn!(error = %e, "ScaledObject with an unusable name");
                return;
            }
        };
        let target = target_id(&TargetRef::of(
            key.namespace(),
            &object.spec.scale_target_ref,
        ));
        let object = Arc::new(object);
        // Routes come from the triggers and the target; a status update changes neither.
        self.routes_dirty |= match self.functions.get(&key) {
            Some(entry) => {
                (has_http(&object) || has_http(&entry.object))
                    && (entry.object.spec.triggers != object.spec.triggers
                        || entry.object.spec.scale_target_ref != object.spec.scale_target_ref)
            }
            None => has_http(&object),
        };
        let mut touched = vec![target.clone()];
        match self.functions.get_mut(&key) {
            Some(entry) => {
                if entry.target != target {
                    if let Some(set) = self.claims.get_mut(&entry.target) {
                        set.remove(&key);
                    }
                    touched.push(entry.target.clone());
                    entry.target = target.clone();
                }
                entry.object = kept_for_later(&object);
            }
            None => {
                info!(function = %key, "following");
                // The worker's first input already says whether it is in conflict: on
                // another thread it may act before a later input arrives.
                self.claims
                    .entry(target.clone())
                    .or_default()
                    .insert(key.clone());
                let conflict = self.conflict_of(&key, &target);
                // The worker's first input is whole: its status book starts from the
                // conditions written before.
                let handle = function::spawn(
                    self.ctx.clone(),
                    key.clone(),
                    FunctionInput {
                        object: object.clone(),
                        conflict,
                    },
                );
                self.functions.insert(
                    key.clone(),
                    Entry {
                        handle,
                        object: kept_for_later(&object),
                        target: target.clone(),
                    },
                );
                self.ctx.metrics.functions.inc();
            }
        }
        self.claims.entry(target).or_default().insert(key);
        for target in touched {
            self.publish_claims(&target);
        }
    }

    async fn remove(&mut self, key: &FunctionKey) {
        let Some(entry) = self.functions.remove(key) else {
            return;
        };
        self.routes_dirty |= has_http(&entry.object);
        info!(function = %key, "no longer following");
        if let Some(set) = self.claims.get_mut(&entry.target) {
            set.remove(key);
            if set.is_empty() {
                self.claims.remove(&entry.target);
            }
        }
        let triggers: Vec<String> = entry
            .object
            .spec
            .triggers
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| format!("{}-{i}", t.trigger_type))
            })
            .collect();
        entry.handle.stop().await;
        self.ctx
            .metrics
            .forget(key.namespace(), key.name(), &triggers);
        self.ctx.metrics.functions.dec();
        self.ctx.demand.forget(key);
        self.publish_claims(&entry.target.clone());
    }

    /// An HPA on a target Blink scales makes two owners: both are left alone.
    fn on_autoscaler(&mut self, event: Event<HorizontalPodAutoscaler>) {
        let touched = autoscalers_after(&mut self.autoscalers, &mut self.listed_autoscalers, event);
        for id in touched {
            self.publish_claims(&id);
        }
    }

    /// Settles `http` routes over every object; objects whose conflict changed hear
    /// of it.
    fn settle_routes(&mut self) {
        self.routes_dirty = false;
        let routes = self
            .functions
            .iter()
            .filter_map(|(key, entry)| {
                let route = blink_crds::routing::http_route(&entry.object)?.ok()?;
                Some((
                    blink_crds::routing::Age::of(&entry.object, key.clone()),
                    route,
                ))
            })
            .collect();
        let conflicts: HashMap<FunctionKey, String> = blink_crds::routing::resolve(routes)
            .conflicts
            .into_iter()
            .collect();
        let changed: Vec<TargetId> = conflicts
            .iter()
            .filter(|(key, reason)| self.route_conflicts.get(*key) != Some(*reason))
            .map(|(key, _)| key)
            .chain(
                self.route_conflicts
                    .keys()
                    .filter(|key| !conflicts.contains_key(*key)),
            )
            .filter_map(|key| self.functions.get(key).map(|e| e.target.clone()))
            .collect();
        self.route_conflicts = conflicts;
        for target in changed {
            self.publish_claims(&target);
        }
    }

    /// Sends each claimant of `target` its input, with a conflict when there are two
    /// owners (two objects, or an object and an HPA), or when another object holds
    /// its routes.
    fn publish_claims(&self, target: &TargetId) {
        let Some(claimants) = self.claims.get(target) else {
            return;
        };
        for key in claimants {
            let Some(entry) = self.functions.get(key) else {
                continue;
            };
            let input = FunctionInput {
                object: entry.object.clone(),
                conflict: self.conflict_of(key, target),
            };
            entry.handle.input.send_replace(input);
        }
    }

    /// Why `key` may not scale `target`: another claimant (an object, or an HPA), or
    /// another object holding its routes.
    fn conflict_of(&self, key: &FunctionKey, target: &TargetId) -> Option<String> {
        let others: Vec<String> = self
            .claims
            .get(target)
            .into_iter()
            .flatten()
            .filter(|k| *k != key)
            .map(|k| format!("ScaledObject {}", k.name()))
            .chain(
                self.autoscalers
                    .get(target)
                    .into_iter()
                    .flatten()
                    .map(|name| format!("HorizontalPodAutoscaler {name}")),
            )
            .collect();
        (!others.is_empty())
            .then(|| {
                format!(
                    "{} {} is also claimed by {}",
                    target.1,
                    target.2,
                    others.join(", ")
                )
            })
            .or_else(|| self.route_conflicts.get(key).cloned())
    }

    async fn on_workload(&mut self, kind: &'static str, event: Event<ObjectMeta>) {
        match event {
            Event::Apply(meta) | Event::InitApply(meta) => {
                let id = (
                    meta.namespace.clone().unwrap_or_default(),
                    kind.to_owned(),
                    meta.name.clone().unwrap_or_default(),
                );
                if let Some(listing) = self.listed_workloads.get_mut(kind) {
                    listing.saw((id.0.clone(), id.2.clone()));
                }
                // Managed fields matter only now (who set the replicas); not kept.
                let manager = replicas_manager(&meta);
                let generation = meta.generation;
                let previous = self.workloads.insert(id.clone(), workload_record(meta));
                let generation_changed = previous
                    .as_ref()
                    .is_some_and(|p| p.generation != generation);
                if let Some(claimants) = self.claims.get(&id) {
                    let manager = manager.filter(|_| generation_changed);
                    for key in claimants {
                        if let Some(entry) = self.functions.get(key) {
                            // Every change wakes the worker; the replica writer's name
                            // is kept until a newer one is seen, so a status update
                            // right after a PATCH does not erase who made it.
                            entry.handle.target_changed.send_modify(|current| {
                                current.generation = generation;
                                if manager.is_some() {
                                    current.manager.clone_from(&manager);
                                }
                            });
                        }
                    }
                }
                self.reconcile_workload(&id).await;
            }
            Event::Delete(meta) => {
                let id = (
                    meta.namespace.clone().unwrap_or_default(),
                    kind.to_owned(),
                    meta.name.clone().unwrap_or_default(),
                );
                self.forget_workload(&id);
            }
            Event::Init => self.listed_workloads.entry(kind).or_default().begin(),
            Event::InitDone => {
                let known = self
                    .workloads
                    .keys()
                    .filter(|(_, k, _)| k == kind)
                    .map(|(namespace, _, name)| (namespace.clone(), name.clone()))
                    .collect::<Vec<_>>();
                let gone = self
                    .listed_workloads
                    .entry(kind)
                    .or_default()
                    .end_and_find_gone(&known);
                for (namespace, name) in gone {
                    self.forget_workload(&(namespace, kind.to_owned(), name));
                }
            }
        }
    }

    /// A workload is gone.
    fn forget_workload(&mut self, id: &TargetId) {
        self.workloads.remove(id);
        // The generated object goes with its owner (garbage collection).
        self.generated.remove(id);
        self.generated_retries.succeeded(id);
    }

    /// Tries again the generated objects whose last write or removal failed and whose
    /// wait is over.
    async fn retry_generated(&mut self) {
        let ids = self.generated_retries.take_due(tokio::time::Instant::now());
        for id in ids {
            self.reconcile_workload(&id).await;
        }
    }

    async fn reconcile_generated(&mut self) {
        let ids: Vec<TargetId> = self.workloads.keys().cloned().collect();
        self.generated.clear();
        for id in ids {
            self.reconcile_workload(&id).await;
        }
    }

    /// Writes, updates or deletes the generated object of one workload (leader only);
    /// what the API server refused is tried again later.
    async fn reconcile_workload(&mut self, id: &TargetId) {
        match self.reconcile_generated_object(id).await {
            Ok(()) => self.generated_retries.succeeded(id),
            Err(failure) => {
                let retry_in = self
                    .generated_retries
                    .failed(id.clone(), tokio::time::Instant::now());
                warn!(
                    workload = %id.2,
                    kind = %id.1,
                    error = %failure.error,
                    failures = self.generated_retries.failures(id),
                    ?retry_in,
                    "could not {} the generated ScaledObject",
                    failure.action,
                );
            }
        }
    }

    async fn reconcile_generated_object(&mut self, id: &TargetId) -> Result<(), GeneratedFailure> {
        if !self.ctx.leadership.state().is_leader {
            // Becoming leader reconciles every workload.
            return Ok(());
        }
        let Some(meta) = self.workloads.get(id) else {
            return Ok(());
        };
        let metadata = ObjectMeta::clone(meta);
        let empty = BTreeMap::new();
        let annotations = metadata.annotations.as_ref().unwrap_or(&empty);
        let api: Api<ScaledObject> = Api::namespaced(self.ctx.client.clone(), &id.0);
        // What exists is known from the ScaledObject watch: no API reads here, so a
        // namespace of 10,000 plain Deployments costs nothing.
        let existing = FunctionKey::new(id.0.as_str(), id.2.as_str())
            .ok()
            .and_then(|key| self.functions.get(&key))
            .map(|entry| entry.object.clone());
        if !generated::opted_in(annotations) {
            self.generated.remove(id);
            if existing.is_some_and(|o| generated::is_generated_for(&o, &id.1)) {
                return delete_generated(&api, &id.1, &id.2).await;
            }
            return Ok(());
        }
        let wanted = match generated::generate(api_version_of(&id.1), &id.1, &metadata) {
            Ok(object) => object,
            Err(message) => {
                self.workload_event(
                    id,
                    &metadata,
                    EventType::Warning,
                    "InvalidAnnotation",
                    message,
                );
                return Ok(());
            }
        };
        if self.generated.get(id) == Some(&wanted) {
            return Ok(());
        }
        match existing {
            Some(existing) if !generated::is_generated_for(&existing, &id.1) => {
                let made_by = match generated::generated_for(&existing) {
                    Some(kind) if generated::is_generated(&existing) => {
                        format!("was generated by Blink for the {kind} of that name")
                    }
                    _ => "was not generated by Blink".to_owned(),
                };
                self.workload_event(
                    id,
                    &metadata,
                    EventType::Warning,
                    "Conflict",
                    format!(
                        "a ScaledObject named {} already exists and {made_by}; the annotation is not applied",
                        id.2
                    ),
                );
                return Ok(());
            }
            Some(existing)
                if existing.spec == wanted.spec
                    && existing.metadata.annotations == wanted.metadata.annotations =>
            {
                self.generated.insert(id.clone(), wanted);
                return Ok(());
            }
            _ => {}
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.ctx.metrics.wrote("generated");
        api.patch(&id.2, &params, &Patch::Apply(&wanted))
            .await
            .map_err(|error| GeneratedFailure {
                action: "write",
                error,
            })?;
        self.generated.insert(id.clone(), wanted);
        Ok(())
    }

    fn workload_event(
        &self,
        id: &TargetId,
        metadata: &ObjectMeta,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(api_version_of(&id.1).to_owned()),
            kind: Some(id.1.clone()),
            name: metadata.name.clone(),
            namespace: metadata.namespace.clone(),
            uid: metadata.uid.clone(),
            ..Default::default()
        };
        let recorder = self.ctx.recorder.clone();
        let event = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Generate".to_owned(),
            secondary: None,
        };
        tokio::spawn(async move {
            let _ = recorder.publish(&event, &reference).await;
        });
    }
}

/// Removes the object generated for the workload `kind`/`name`.
async fn delete_generated(
    api: &Api<ScaledObject>,
    kind: &str,
    name: &str,
) -> Result<(), GeneratedFailure> {
    let result = match api.get_opt(name).await {
        // Only the object just read: one created in its place meanwhile is
        // refused (409) and looked at again on the retry.
        Ok(Some(object)) if generated::is_generated_for(&object, kind) => api
            .delete(
                name,
                &DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        uid: object.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                },
            )
            .await
            .map(|_| ())
            .or_else(|e| match &e {
                kube::Error::Api(status) if status.is_not_found() => Ok(()),
                _ => Err(e),
            }),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|error| GeneratedFailure {
        action: "delete",
        error,
    })
}

/// A write or removal of a generated object the API server refused.
struct GeneratedFailure {
    action: &'static str,
    error: kube::Error,
}

/// The field manager that owns `spec.replicas` now, when it is not Blink.
fn replicas_manager(metadata: &ObjectMeta) -> Option<String> {
    let entries = metadata.managed_fields.as_ref()?;
    let owner = entries.iter().rev().find(|entry| {
        entry.subresource.as_deref() == Some("scale")
            || entry
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|spec| spec.get("f:replicas"))
                .is_some()
    })?;
    let manager = owner.manager.clone()?;
    (manager != FIELD_MANAGER).then_some(manager)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn entry(
        manager: &str,
        subresource: Option<&str>,
        fields: serde_json::Value,
    ) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.to_owned()),
            subresource: subresource.map(str::to_owned),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    fn hpa(namespace: &str, name: &str, target: &str) -> HorizontalPodAutoscaler {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"maxReplicas": 5,
                     "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}}
        }))
        .expect("valid HPA")
    }

    fn target(namespace: &str, name: &str) -> TargetId {
        (
            namespace.to_owned(),
            "Deployment".to_owned(),
            name.to_owned(),
        )
    }

    #[test]
    fn hpas_are_known_by_namespace_and_name_and_a_new_list_drops_the_deleted() {
        let mut autoscalers = HashMap::new();
        let mut listing = Listing::default();
        let mut event = |e| autoscalers_after(&mut autoscalers, &mut listing, e);
        event(Event::Init);
        event(Event::InitApply(hpa("a", "web", "x")));
        event(Event::InitApply(hpa("b", "web", "y")));
        event(Event::InitApply(hpa("a", "api", "z")));
        assert_eq!(event(Event::InitDone), Vec::<TargetId>::new());
        let owned = |m: &HashMap<TargetId, BTreeSet<String>>| {
            let mut ids: Vec<TargetId> = m.keys().cloned().collect();
            ids.sort();
            ids
        };
        assert_eq!(
            owned(&autoscalers),
            [target("a", "x"), target("a", "z"), target("b", "y")]
        );

        // b's "web" changes: a's "web" still owns a/x.
        let mut event = |e| autoscalers_after(&mut autoscalers, &mut listing, e);
        event(Event::Apply(hpa("b", "web", "y")));
        // a's "api" moves to another target.
        assert_eq!(
            event(Event::Apply(hpa("a", "api", "w"))),
            [target("a", "z"), target("a", "w")]
        );
        assert_eq!(
            owned(&autoscalers),
            [target("a", "w"), target("a", "x"), target("b", "y")]
        );

        // The watch lost its place; meanwhile a's "web" was deleted with no event.
        let mut event = |e| autoscalers_after(&mut autoscalers, &mut listing, e);
        event(Event::Init);
        event(Event::InitApply(hpa("b", "web", "y")));
        event(Event::InitApply(hpa("a", "api", "w")));
        assert_eq!(
            event(Event::InitDone),
            [target("a", "x")],
            "its target hears of it"
        );
        assert_eq!(owned(&autoscalers), [target("a", "w"), target("b", "y")]);

        let mut event = |e| autoscalers_after(&mut autoscalers, &mut listing, e);
        assert_eq!(
            event(Event::Delete(hpa("b", "web", "y"))),
            [target("b", "y")]
        );
        assert_eq!(owned(&autoscalers), [target("a", "w")]);
    }

    #[test]
    fn the_replicas_owner_is_found() {
        let replicas = serde_json::json!({"f:spec": {"f:replicas": {}}});
        let other = serde_json::json!({"f:spec": {"f:template": {}}});
        let cases = [
            (
                vec![entry("kubectl", None, replicas.clone())],
                Some("kubectl"),
            ),
            (
                vec![entry(FIELD_MANAGER, Some("scale"), replicas.clone())],
                None,
            ),
            (
                vec![entry("kubectl-scale", Some("scale"), replicas.clone())],
                Some("kubectl-scale"),
            ),
            (vec![entry("kubectl", None, other)], None),
            (vec![], None),
        ];
        for (entries, expected) in cases {
            let metadata = ObjectMeta {
                managed_fields: Some(entries),
                ..Default::default()
            };
            assert_eq!(replicas_manager(&metadata).as_deref(), expected);
        }
    }
}
