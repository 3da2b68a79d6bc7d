//! One task per function: the single writer of its replica count.
//!
//! A worker owns everything about one `ScaledObject` while this scaler leads: it polls
//! the pull triggers on their interval, reads the activators' demand every second (for
//! `http`) and at once on a poke, runs the pure [`crate::decide`] pipeline, PATCHes
//! `/scale` through the [`writer::Writer`] when the count changes, undoes drift, keeps
//! the status (coalesced) and publishes an Event on every scale. A slow trigger source
//! never delays a decision: reads run in their own tasks and report back.

pub mod plan;
pub mod status;
pub mod writer;

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use blink_crds::{Condition, FunctionKey, ScaledObject, ScaledObjectStatus};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{MissedTickBehavior, interval, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::Config,
    decide::{self, Decision, Input, Paused, Reading, Step},
    demand::{Demand, Wake},
    leader::Leadership,
    metrics::{FunctionLabels, Metrics, ScaleLabels, TriggerLabels},
    target::{FIELD_MANAGER, Placement, Replicas, TargetError},
    transparent::{self, Phase},
    triggers::{self, Connections, Measurement, PullTrigger, TriggerError},
};
use plan::{Plan, Refusal, TriggerPlan};
use status::StatusBook;
use writer::{Writer, Written};

/// Removed only after the target got its original count back (when asked) and
/// Blink's own objects for the function are gone.
pub const FINALIZER: &str = "blink.sh/finalizer";

/// What the controller tells a worker about its object.
#[derive(Clone, Debug)]
pub struct FunctionInput {
    pub object: Arc<ScaledObject>,
    /// Another object claims the same target: its description.
    pub conflict: Option<String>,
}

/// What every worker shares.
pub struct Context {
    pub client: Client,
    pub config: Arc<Config>,
    pub writer: Writer,
    pub demand: Arc<Demand>,
    pub leadership: Leadership,
    pub connections: Connections,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Blink's EndpointSlices for transparent mode.
    pub slices: Option<transparent::Slices>,
    /// Bounds the reads and background writes in flight, so a start with thousands
    /// of functions queues here instead of opening thousands of connections.
    pub api_permits: tokio::sync::Semaphore,
    /// Set by the controller once every watch has listed: no decision acts before
    /// every owner of every target is known.
    pub synced: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// The controller's end of a worker.
#[derive(Debug)]
pub struct Handle {
    pub input: watch::Sender<FunctionInput>,
    /// The target changed (any write).
    pub target_changed: watch::Sender<TargetChange>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// What the controller saw of a function's target at its latest change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TargetChange {
    /// Its `metadata.generation`, which moves with the spec (the replicas among it)
    /// and not with the status.
    pub generation: Option<i64>,
    /// The field manager of a replica change made by someone else, when the
    /// controller saw one.
    pub manager: Option<String>,
}

impl Handle {
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

pub fn spawn(ctx: Arc<Context>, key: FunctionKey, input: FunctionInput) -> Handle {
    let (input_tx, input_rx) = watch::channel(input);
    let (changed_tx, changed_rx) = watch::channel(TargetChange::default());
    let cancel = CancellationToken::new();
    let worker = Worker::new(ctx, key, input_rx, changed_rx);
    let task = tokio::spawn(worker.run(cancel.clone()));
    Handle {
        input: input_tx,
        target_changed: changed_tx,
        cancel,
        task,
    }
}

/// A function's own re-read period: `period` shortened by up to a quarter (`draw` is
/// uniform in [0, 1)), so functions created together do not all re-read `/scale` in
/// the same tick, and the API server sees a steady trickle instead of bursts.
fn spread_resync(period: Duration, draw: f64) -> Duration {
    period.mul_f64(1.0 - draw.clamp(0.0, 1.0) / 4.0)
}

/// A pull trigger's slot: the built trigger (or why it could not be built), its last
/// reading and when to poll next.
#[derive(Debug)]
struct PullSlot {
    index: usize,
    spec: blink_crds::ScaleTrigger,
    /// Built on the first read (and again after a failed build), in the read's task.
    trigger: Option<Arc<dyn PullTrigger>>,
    reading: Option<Reading>,
    last_error: Option<TriggerError>,
    in_flight: bool,
    next_poll: Instant,
}

struct PullResult {
    generation: u64,
    slot: usize,
    built: Option<Arc<dyn PullTrigger>>,
    result: Result<Measurement, TriggerError>,
}

struct Worker {
    ctx: Arc<Context>,
    key: FunctionKey,
    labels: FunctionLabels,
    input: watch::Receiver<FunctionInput>,
    target_changed: watch::Receiver<TargetChange>,
    /// The target's generation at the last change acted on.
    target_generation: Option<i64>,
    waker: Arc<Wake>,
    object: Arc<ScaledObject>,
    conflict: Option<String>,
    plan: Result<Plan, Refusal>,
    /// Bumped on every rebuild, so results of an older plan's reads are dropped.
    generation: u64,
    pulls: Vec<PullSlot>,
    /// Where pull reads report, made with the first read: a channel allocates its
    /// first block of slots at once, and most functions (`http` only) never read.
    results: Option<(mpsc::Sender<PullResult>, mpsc::Receiver<PullResult>)>,
    state: Option<decide::State>,
    replicas: Option<Replicas>,
    /// When the count in hand was read; `None` once a change of the target's status
    /// makes it old, so that it is read again at the next tick.
    last_read: Option<Instant>,
    /// This function's re-read period of `/scale` ([`spread_resync`]).
    resync: Duration,
    /// The count this worker last set (drift is a change away from it).
    last_set: Option<i32>,
    target_error: Option<TargetError>,
    book: StatusBook,
    was_active: bool,
    poked_at: Option<Instant>,
    undos: HashMap<String, u32>,
    /// Pods of a scale-up the scheduler keeps refusing (`ScaleUpStalled`).
    stalled: Option<usize>,
    last_stall_check: Option<Instant>,
    scaled_up_at: Option<Instant>,
    drift_conflict: Option<String>,
    taken_over: bool,
    /// Transparent mode's phase (`None` until the first step of a transparent object).
    phase: Option<Phase>,
    parking_demand: bool,
    decided_once: bool,
}

impl Worker {
    fn new(
        ctx: Arc<Context>,
        key: FunctionKey,
        input: watch::Receiver<FunctionInput>,
        target_changed: watch::Receiver<TargetChange>,
    ) -> Self {
        let first = input.borrow().clone();
        let waker = ctx.demand.waker(&key);
        let labels = FunctionLabels {
            namespace: key.namespace().to_owned(),
            name: key.name().to_owned(),
        };
        let resync = spread_resync(ctx.config.resync, rand::random());
        Self {
            book: StatusBook::new(first.object.status.clone(), Duration::from_secs(1)),
            plan: plan::plan(&first.object),
            object: first.object,
            conflict: first.conflict,
            ctx,
            key,
            labels,
            input,
            target_changed,
            target_generation: None,
            waker,
            generation: 0,
            pulls: Vec::new(),
            results: None,
            state: None,
            replicas: None,
            last_read: None,
            resync,
            last_set: None,
            target_error: None,
            was_active: false,
            poked_at: None,
            undos: HashMap::new(),
            stalled: None,
            last_stall_check: None,
            scaled_up_at: None,
            phase: None,
            parking_demand: false,
            decided_once: false,
            drift_conflict: None,
            taken_over: false,
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        Box::pin(self.rebuild()).await;
        let mut leadership = self.ctx.leadership.subscribe();
        let mut term = leadership.borrow_and_update().term();
        let mut tick = interval(self.tick_period());
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let status_due = self.book.next_write_at();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                changed = self.input.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let input = self.input.borrow_and_update().clone();
                    let spec_changed = input.object.spec != self.object.spec
                        || input.object.annotations() != self.object.annotations();
                    self.object = input.object;
                    self.conflict = input.conflict;
                    if spec_changed {
                        Box::pin(self.rebuild()).await;
                        tick = interval(self.tick_period());
                        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                }
                _ = self.waker.notified() => self.take_poke(),
                changed = self.target_changed.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let change = self.target_changed.borrow_and_update().clone();
                    if change.generation.is_some() && change.generation == self.target_generation {
                        // Only the status moved (replicas coming up or going): no
                        // drift to look for, and `/scale` is read at the next tick
                        // rather than at each of the several status writes of a wake,
                        // which would load the API server as the next wake's PATCH
                        // goes to it.
                        self.last_read = None;
                    } else if Box::pin(self.on_target_changed(change.manager)).await {
                        self.target_generation = change.generation;
                    } else {
                        // Not looked at (a failed read, or not the leader): the next
                        // change of this generation looks again for a drift.
                        self.last_read = None;
                    }
                }
                Some(result) = next_result(&mut self.results) => self.on_pull_result(result),
                changed = leadership.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now_term = leadership.borrow_and_update().term();
                    if now_term == term {
                        // A late renewal or another holder: no step (writes waiting
                        // for the renewal resume by themselves).
                        continue;
                    }
                    if term.is_some() {
                        // The term ended (another may have begun at once): the next
                        // starts from the cluster's state, not ours.
                        self.state = None;
                        self.replicas = None;
                    }
                    term = now_term;
                }
                _ = tick.tick() => {
                    self.poll_due();
                    // The periodic re-read of `/scale` gives way to a poke as the
                    // status write does: the poke's step uses the count in hand, and
                    // the read is made at a later tick.
                    if self.resync_due() {
                        let waker = Arc::clone(&self.waker);
                        tokio::select! {
                            biased;
                            _ = waker.notified() => self.take_poke(),
                            _ = Box::pin(self.resync_replicas()) => {}
                        }
                    }
                }
                _ = sleep_until(status_due.unwrap_or_else(Instant::now).into()), if status_due.is_some() => {
                    // A poke does not wait behind a status write (the API server's
                    // latency, or a place among the writes in flight): the write gives
                    // way, stays due, and is made after the poke's step.
                    let waker = Arc::clone(&self.waker);
                    tokio::select! {
                        biased;
                        _ = waker.notified() => self.take_poke(),
                        _ = Box::pin(self.write_status()) => continue,
                    }
                }
            }
            // Boxed: the task of an idle function holds only a pointer to the
            // decision's future (its kube requests nest deep), not the future itself;
            // with 10,000 functions that is most of the scaler's memory.
            Box::pin(self.step()).await;
        }
        debug!(function = %self.key, "worker stopped");
    }

    /// Every valid object ticks each second: `http` samples concurrency per second, and
    /// pull triggers keep their own `pollingInterval` in [`Self::poll_due`].
    fn tick_period(&self) -> Duration {
        match &self.plan {
            Ok(_) => Duration::from_secs(1),
            Err(_) => Duration::from_secs(5),
        }
    }

    /// Re-plans after a spec change; pull triggers are (re)built by their next read.
    async fn rebuild(&mut self) {
        self.generation += 1;
        // A changed object may fix what stalled (DESIGN.md: cleared on change).
        self.stalled = None;
        self.drift_conflict = None;
        self.undos.clear();
        self.plan = plan::plan(&self.object);
        // The target may be another one now: its next change is looked at in full.
        self.target_generation = None;
        self.pulls.clear();
        let Ok(plan) = &self.plan else { return };
        for (index, trigger) in plan.triggers.iter().enumerate() {
            if let TriggerPlan::Pull { trigger, .. } = trigger {
                self.pulls.push(PullSlot {
                    index,
                    spec: trigger.clone(),
                    trigger: None,
                    reading: None,
                    last_error: None,
                    in_flight: false,
                    next_poll: Instant::now(),
                });
            }
        }
        self.poll_due();
    }

    /// The target's pod template, for `…FromEnv` keys and `env` auth sources. Only
    /// Deployments and StatefulSets have one Blink reads.
    async fn pod_template(
        client: Client,
        target: crate::target::TargetRef,
    ) -> Option<k8s_openapi::api::core::v1::PodTemplateSpec> {
        use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
        match (target.api_version.as_str(), target.kind.as_str()) {
            ("apps/v1", "Deployment") => Api::<Deployment>::namespaced(client, &target.namespace)
                .get_opt(&target.name)
                .await
                .ok()
                .flatten()
                .and_then(|d| d.spec)
                .map(|s| s.template),
            ("apps/v1", "StatefulSet") => Api::<StatefulSet>::namespaced(client, &target.namespace)
                .get_opt(&target.name)
                .await
                .ok()
                .flatten()
                .and_then(|d| d.spec)
                .map(|s| s.template),
            _ => None,
        }
    }

    /// Starts a read of every pull trigger whose interval is up (leader only).
    fn poll_due(&mut self) {
        if !self.ctx.leadership.state().is_leader {
            return;
        }
        let Ok(plan) = &self.plan else { return };
        let now = Instant::now();
        let timeout = self.ctx.config.trigger_timeout;
        for (slot_index, slot) in self.pulls.iter_mut().enumerate() {
            if slot.in_flight || now < slot.next_poll {
                continue;
            }
            slot.next_poll = now + plan.polling_interval;
            slot.in_flight = true;
            let tx = self
                .results
                .get_or_insert_with(|| mpsc::channel(64))
                .0
                .clone();
            let generation = self.generation;
            let built = slot.trigger.clone();
            let spec = slot.spec.clone();
            let ctx = self.ctx.clone();
            let namespace = self.key.namespace().to_owned();
            let target = plan.target.clone();
            let env_container = self
                .object
                .spec
                .scale_target_ref
                .env_source_container_name
                .clone();
            tokio::spawn(async move {
                let read = async {
                    let trigger = match built {
                        Some(trigger) => trigger,
                        None => {
                            let template = Self::pod_template(ctx.client.clone(), target).await;
                            let params = triggers::resolve(
                                &ctx.client,
                                &namespace,
                                &spec,
                                template.as_ref(),
                                env_container.as_deref(),
                            )
                            .await?;
                            triggers::build(&spec.trigger_type, &params, &ctx.connections)?
                        }
                    };
                    let measured = trigger.measure().await;
                    Ok::<_, TriggerError>((trigger, measured))
                };
                let (built, result) = match tokio::time::timeout(timeout, read).await {
                    Ok(Ok((trigger, measured))) => (Some(trigger), measured),
                    Ok(Err(e)) => (None, Err(e)),
                    Err(_) => (
                        None,
                        Err(TriggerError::Timeout(format!(
                            "no answer within {timeout:?}"
                        ))),
                    ),
                };
                let _ = tx
                    .send(PullResult {
                        generation,
                        slot: slot_index,
                        built,
                        result,
                    })
                    .await;
            });
        }
    }

    fn on_pull_result(&mut self, result: PullResult) {
        if result.generation != self.generation {
            return;
        }
        let Some(slot) = self.pulls.get_mut(result.slot) else {
            return;
        };
        slot.in_flight = false;
        if result.built.is_some() {
            slot.trigger = result.built;
        }
        let name = match &self.plan {
            Ok(plan) => plan.triggers[slot.index].name().to_owned(),
            Err(_) => return,
        };
        let labels = TriggerLabels {
            namespace: self.labels.namespace.clone(),
            name: self.labels.name.clone(),
            trigger: name.clone(),
        };
        match result.result {
            Ok(m) => {
                self.ctx
                    .metrics
                    .trigger_value
                    .get_or_create(&labels)
                    .set(m.value);
                slot.reading = Some(reading_of(m));
                slot.last_error = None;
            }
            Err(e) => {
                self.ctx.metrics.trigger_errors.get_or_create(&labels).inc();
                debug!(function = %self.key, trigger = %name, error = %e, "trigger read failed");
                slot.reading = Some(Reading::Failed);
                slot.last_error = Some(e);
            }
        }
    }

    /// Reads `/scale` when this worker has no count in hand. A step never re-reads one
    /// it has: the target's watch re-reads on every change of its spec (at the next
    /// tick after one of its status only), and the tick's periodic
    /// re-read ([`Self::resync_due`]), which gives way to a poke, keeps it at most one
    /// resync period old. A re-read inside the step would make a poke arriving
    /// meanwhile wait for it.
    async fn ensure_replicas(&mut self, plan: &Plan) -> Option<Replicas> {
        if let Some(replicas) = self.replicas {
            return Some(replicas);
        }
        self.read_replicas(plan).await
    }

    /// The count in hand is older than this function's resync period, or outdated
    /// by a change of the target.
    fn resync_stale(&self) -> bool {
        self.last_read.is_none_or(|at| at.elapsed() >= self.resync)
    }

    /// A re-read of a count in hand is due, periodic or after a status change (a
    /// first read is the step's).
    fn resync_due(&self) -> bool {
        self.replicas.is_some()
            && self.resync_stale()
            && self.plan.is_ok()
            && self.ctx.leadership.state().is_leader
    }

    /// The periodic re-read; cancelling it leaves the count in hand as it was.
    async fn resync_replicas(&mut self) {
        if let Ok(plan) = self.plan.clone() {
            self.read_replicas(&plan).await;
        }
    }

    async fn read_replicas(&mut self, plan: &Plan) -> Option<Replicas> {
        let _permit = self.ctx.api_permits.acquire().await.ok();
        self.ctx.metrics.read("scale");
        match self.ctx.writer.scale().get(&plan.target).await {
            Ok(replicas) => {
                self.replicas = Some(replicas);
                self.last_read = Some(Instant::now());
                self.target_error = None;
                self.ctx
                    .metrics
                    .current_replicas
                    .get_or_create(&self.labels)
                    .set(i64::from(replicas.current));
                Some(replicas)
            }
            Err(e) => {
                self.target_error = Some(e);
                self.replicas = None;
                None
            }
        }
    }

    /// Reads the target after a change of its spec and undoes a replica count set by
    /// another writer; whether it was read (`false`: not the leader, or the read
    /// failed).
    async fn on_target_changed(&mut self, manager: Option<String>) -> bool {
        let Ok(plan) = self.plan.clone() else {
            return false;
        };
        // A deleted object's count belongs to the finalizer (restoring the original is
        // not drift), and a follower writes nothing.
        if !self.ctx.leadership.state().is_leader || self.object.meta().deletion_timestamp.is_some()
        {
            return false;
        }
        let Some(replicas) = self.read_replicas(&plan).await else {
            return false;
        };
        self.undo_drift(&plan, replicas, manager).await;
        true
    }

    /// Puts back the count this worker set when another writer changed it, up to
    /// `drift_undo_limit` times per writer, then leaves the target alone (`Conflict`).
    async fn undo_drift(&mut self, plan: &Plan, replicas: Replicas, manager: Option<String>) {
        let Some(ours) = self.last_set else { return };
        if replicas.desired == ours || self.drift_conflict.is_some() || self.conflict.is_some() {
            return;
        }
        let manager = manager.unwrap_or_else(|| "an unknown writer".to_owned());
        let undos = {
            let count = self.undos.entry(manager.clone()).or_insert(0);
            *count += 1;
            *count
        };
        if undos > self.ctx.config.drift_undo_limit {
            warn!(function = %self.key, %manager, "replica changes keep coming from another writer; leaving the target alone");
            self.drift_conflict = Some(manager.clone());
            self.event(
                EventType::Warning,
                "Conflict",
                "Conflict",
                format!(
                    "{} keeps setting the replicas of {} ({} times); Blink leaves it alone until the ScaledObject changes",
                    manager, plan.target, undos
                ),
            );
            return;
        }
        info!(function = %self.key, %manager, from = replicas.desired, to = ours, "undoing a replica change");
        if let Ok(Written::Set(after)) = self
            .ctx
            .writer
            .set(&self.key, &plan.target, ours, plan.policy.min.max(1))
            .await
        {
            self.replicas = Some(after);
            if ours > replicas.desired {
                // A scale-up like any other: watched for pods the scheduler refuses.
                self.scaled_up_at = Some(Instant::now());
            }
            self.event(
                EventType::Normal,
                "ReplicasRestored",
                "Scale",
                format!(
                    "{} set {} to {} replicas; restored to {}",
                    manager, plan.target, replicas.desired, ours
                ),
            );
        }
    }

    /// One decision, and whatever it takes to act on it.
    /// A wake-up: a poke's arrival (or now, for a snapshot's wake-up) is kept until a
    /// step decides on it.
    fn take_poke(&mut self) {
        let at = self.waker.take_poke().unwrap_or_else(Instant::now);
        self.poked_at.get_or_insert(at);
    }

    async fn step(&mut self) {
        let leader = self.ctx.leadership.state();
        if !leader.is_leader || !self.ctx.synced.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let plan = match &self.plan {
            Ok(plan) => plan.clone(),
            Err(refusal) => {
                let refusal = refusal.clone();
                self.book
                    .condition(Condition::READY, false, refusal.reason, refusal.message);
                return;
            }
        };
        if self.object.meta().deletion_timestamp.is_some() {
            self.finalize(&plan).await;
            return;
        }
        let Some(replicas) = self.ensure_replicas(&plan).await else {
            if let Some(e) = &self.target_error {
                let (reason, message) = (e.reason(), e.to_string());
                self.book
                    .condition(Condition::READY, false, reason, message);
            }
            return;
        };
        if !self.taken_over {
            self.take_over(replicas).await;
        }
        // Wait for every pull trigger's first read: deciding on "no reading yet" would
        // count as a failure or as silence, and neither is true.
        if self.pulls.iter().any(|slot| slot.reading.is_none()) {
            return;
        }
        self.check_stalled(&plan, replicas).await;
        let now = Instant::now();
        let acquired_at = leader.acquired_at.unwrap_or(now);
        let created = instant_of(self.object.metadata.creation_timestamp.as_ref(), now);
        let state = self.state.get_or_insert_with(|| {
            let seeded = decide::State::seeded(
                now,
                replicas.desired,
                self.object.status.as_ref().and_then(|s| s.desired_replicas),
            );
            // The cooldown restarts with the term (lastActiveTime is stamped at takeover);
            // initialCooldownPeriod counts from the object's creation, not this term.
            match created {
                Some(created) => seeded.created_at(created),
                None => seeded,
            }
        });
        // A poke that came while the worker was busy elsewhere (its wake-up not yet
        // waited for, or this step's reads of the API under way) is decided on now,
        // with the demand it brought, and its latency counted from its arrival.
        if let Some(at) = self.waker.take_poke() {
            self.poked_at.get_or_insert(at);
        }
        let demand = self.ctx.demand.aggregate(&self.key, now);
        let mut readings = Vec::with_capacity(plan.triggers.len());
        for (index, trigger) in plan.triggers.iter().enumerate() {
            readings.push(match trigger {
                TriggerPlan::Http {
                    target_concurrency, ..
                } => Reading::Http {
                    concurrency: demand.concurrency,
                    target: *target_concurrency,
                    active: demand.active,
                },
                TriggerPlan::Pull { .. } => self
                    .pulls
                    .iter()
                    .find(|slot| slot.index == index)
                    .and_then(|slot| slot.reading.clone())
                    .unwrap_or(Reading::Failed),
            });
        }
        let conflict = self.conflict.is_some() || self.drift_conflict.is_some();
        let input = Input {
            now,
            current: replicas.desired,
            ready: replicas.current,
            paused: plan.paused,
            conflict,
            stalled: self.stalled.is_some(),
            triggers: &readings,
            held_work: demand.held_work || self.poked_at.is_some(),
            lease_acquired_at: acquired_at,
        };
        let started = Instant::now();
        let decision = decide::decide(&plan.policy, state, &input);
        if !self.decided_once {
            self.decided_once = true;
            self.ctx.metrics.first_decisions.inc();
        }
        self.ctx
            .metrics
            .decision_duration
            .observe(started.elapsed().as_secs_f64());
        self.ctx
            .metrics
            .desired_replicas
            .get_or_create(&self.labels)
            .set(i64::from(decision.replicas));
        self.record_conditions(&plan, &decision);
        let poked_at = self.poked_at.take();
        if conflict {
            return;
        }
        if plan.transparent {
            let demand_seen = demand.active || demand.held_work || poked_at.is_some();
            self.transparent_step(&plan, replicas, &decision, &readings, poked_at, demand_seen)
                .await;
        } else if decision.replicas != replicas.desired {
            self.scale(&plan, replicas, &decision, &readings, poked_at)
                .await;
        }
    }

    /// Transparent mode: the decision's count goes through the Service's state machine
    /// ([`crate::transparent`]), which adds Blink's slice before a PATCH to zero and
    /// removes it only once a replica is ready.
    async fn transparent_step(
        &mut self,
        plan: &Plan,
        replicas: Replicas,
        decision: &Decision,
        readings: &[Reading],
        poked_at: Option<Instant>,
        demand_seen: bool,
    ) {
        let Some(slices) = self.ctx.slices.clone() else {
            return;
        };
        // The term this step's decision belongs to: its actions are not carried into
        // another (as `Writer::set` does for the PATCH).
        let term = self.ctx.leadership.state().term();
        let service = plan.service_name();
        let namespace = self.key.namespace().to_owned();
        let phase = *self
            .phase
            .get_or_insert_with(|| transparent::initial(replicas.desired, false));
        if matches!(phase, Phase::Parking { .. }) && demand_seen {
            self.parking_demand = true;
        }
        let replica_ready = match phase {
            Phase::Waking | Phase::Warm => slices
                .replica_ready(&namespace, &service)
                .await
                .unwrap_or(false),
            _ => false,
        };
        let observed = transparent::Observed {
            now: Instant::now(),
            wanted: decision.replicas,
            current: replicas.desired,
            demand_seen: self.parking_demand,
            replica_ready,
        };
        let (mut next, actions) =
            transparent::next(phase, observed, self.ctx.config.parking_settle);
        for action in actions {
            if self.ctx.leadership.writable().await.term() != term {
                // The phase stays: it remembers Blink's slice, which the next term's
                // first step settles.
                debug!(function = %self.key, ?action, "transparent step dropped: its term as leader ended");
                return;
            }
            let done = match action {
                transparent::Action::AddSlice => {
                    self.ctx.metrics.wrote("slice");
                    slices
                        .add(&namespace, &service, self.owner_reference())
                        .await
                        .map_err(|e| e.to_string())
                }
                transparent::Action::RemoveSlice => slices
                    .remove(&namespace, &service)
                    .await
                    .map_err(|e| e.to_string()),
                transparent::Action::Scale => {
                    match self
                        .scale(plan, replicas, decision, readings, poked_at)
                        .await
                    {
                        Some(Written::ZeroVetoed) => {
                            // Work arrived at the last moment: back to warm.
                            next = Phase::Warm;
                            slices
                                .remove(&namespace, &service)
                                .await
                                .map_err(|e| e.to_string())
                        }
                        Some(Written::ZeroRewoken(_)) => {
                            next = Phase::Waking;
                            Ok(())
                        }
                        Some(Written::Set(_)) => Ok(()),
                        Some(Written::TermEnded) => Err("the term as leader ended".to_owned()),
                        None => Err("scale failed".to_owned()),
                    }
                }
            };
            if let Err(e) = done {
                warn!(function = %self.key, ?action, error = %e, "transparent mode step failed; will retry");
                return;
            }
        }
        if next != phase {
            debug!(function = %self.key, from = ?phase, to = ?next, "transparent phase");
        }
        if !matches!(next, Phase::Parking { .. }) {
            self.parking_demand = false;
        }
        self.phase = Some(next);
    }

    fn owner_reference(&self) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: blink_crds::API_VERSION.to_owned(),
            kind: "ScaledObject".to_owned(),
            name: self.key.name().to_owned(),
            uid: self.object.metadata.uid.clone().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        }
    }

    /// While a scale-up is recent (or already stalled), looks for pods the scheduler
    /// has refused for longer than the bound.
    async fn check_stalled(&mut self, plan: &Plan, replicas: Replicas) {
        let bound = self.ctx.config.stall_after;
        let recent_scale_up = self
            .scaled_up_at
            .is_some_and(|at| at.elapsed() < bound * 20);
        if replicas.desired == 0 || !(recent_scale_up || self.stalled.is_some()) {
            self.stalled = None;
            return;
        }
        let every = (bound / 4).max(Duration::from_secs(1));
        if self.last_stall_check.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.last_stall_check = Some(Instant::now());
        // A look is a GET of `/scale` (for the selector) and a LIST of pods.
        self.ctx.metrics.read("scale");
        self.ctx.metrics.read("pods");
        match self.ctx.writer.scale().placement(&plan.target, bound).await {
            Ok(placement) if placement.stalled == 0 => {
                self.stalled = None;
                // The scale-up has landed: no more looks (each is a GET and a LIST
                // of pods) until the next one.
                if placement.all_placed {
                    self.scaled_up_at = None;
                }
            }
            Ok(Placement { stalled: n, .. }) => {
                if self.stalled.is_none() {
                    self.event(
                        EventType::Warning,
                        Condition::REASON_SCALE_UP_STALLED,
                        "Scale",
                        format!(
                            "{n} pods of {} cannot be scheduled; holding at {}",
                            plan.target, replicas.desired
                        ),
                    );
                }
                self.stalled = Some(n);
            }
            Err(e) => {
                debug!(function = %self.key, error = %e, "could not check for unschedulable pods")
            }
        }
    }

    fn record_conditions(&mut self, plan: &Plan, decision: &Decision) {
        let book = &mut self.book;
        book.update(|s| s.desired_replicas = Some(decision.replicas));
        if let Some(replicas) = self.replicas {
            book.update(|s| s.current_replicas = Some(replicas.current));
        }
        // Ready: the first trigger error names the problem; else all is well.
        let failing = self.pulls.iter().find_map(|slot| {
            let error = slot.last_error.as_ref()?;
            Some((plan.triggers[slot.index].name().to_owned(), error))
        });
        if let Some(stuck) = self.stalled {
            book.condition(
                Condition::READY,
                false,
                Condition::REASON_SCALE_UP_STALLED,
                format!(
                    "{stuck} pods of {} cannot be scheduled; the count is held",
                    plan.target
                ),
            );
        } else if let Some(conflict) = self.conflict.as_ref().or(self.drift_conflict.as_ref()) {
            let message = format!("Blink leaves {} alone: {conflict}", plan.target);
            book.condition(Condition::CONFLICT, true, "TargetConflict", message.clone());
            book.condition(Condition::READY, false, "Conflict", message);
        } else {
            book.condition(
                Condition::CONFLICT,
                false,
                "NoConflict",
                "Blink is the only owner of the target",
            );
            match failing {
                Some((name, error)) => book.condition(
                    Condition::READY,
                    false,
                    error.reason(),
                    format!("trigger {name}: {error}"),
                ),
                None if plan.policy.transparent_http_only => book.condition(
                    Condition::READY,
                    true,
                    "NoWarmTrafficTrigger",
                    "transparent mode with only the http trigger: warm traffic bypasses the activator, so after its first wake the function stays at 1 or more; add a trigger that sees warm traffic (e.g. prometheus) to let it go back to zero",
                ),
                None => book.condition(Condition::READY, true, "ScaledObjectReady", "the triggers are read and the target is scalable"),
            }
        }
        match plan.paused {
            Some(Paused::At(n)) => book.condition(
                Condition::PAUSED,
                true,
                "PausedReplicas",
                format!("paused at {n} replicas by annotation"),
            ),
            Some(Paused::Hold) => book.condition(
                Condition::PAUSED,
                true,
                "Paused",
                "paused by annotation: the count is frozen",
            ),
            None => book.condition(
                Condition::PAUSED,
                false,
                "NotPaused",
                "scaling follows the triggers",
            ),
        }
        if decision.fallback {
            let replicas = plan
                .policy
                .fallback
                .as_ref()
                .map(|f| f.replicas)
                .unwrap_or_default();
            book.condition(
                Condition::FALLBACK,
                true,
                "FallbackActive",
                format!("a trigger failed past its failureThreshold; its share is the fallback count ({replicas} replicas)"),
            );
        } else {
            book.condition(
                Condition::FALLBACK,
                false,
                "NoFallback",
                "every trigger is read",
            );
        }
        if decision.active {
            book.condition(
                Condition::ACTIVE,
                true,
                "TriggerActive",
                "a trigger is active or an activator holds work",
            );
        } else {
            book.condition(
                Condition::ACTIVE,
                false,
                "TriggersInactive",
                "no trigger is active and no work is held",
            );
        }
        // lastActiveTime is written when activity ends (the cooldown starts counting),
        // not on every active tick.
        if self.was_active && !decision.active {
            book.update(|s| s.last_active_time = Some(status::now()));
        }
        self.was_active = decision.active;
    }

    /// The count to restore on deletion: what this worker recorded (before its
    /// coalesced status write lands), else what an earlier leader wrote.
    fn original_replica_count(&self) -> Option<i32> {
        self.book.wanted().original_replica_count.or_else(|| {
            self.object
                .status
                .as_ref()
                .and_then(|s| s.original_replica_count)
        })
    }

    /// First decision of this term: record the original count (once per object) and
    /// make sure the finalizer is there; a new leader also stamps lastActiveTime.
    async fn take_over(&mut self, replicas: Replicas) {
        self.taken_over = true;
        if self.original_replica_count().is_none() {
            self.book
                .update(|s| s.original_replica_count = Some(replicas.desired));
        }
        self.book
            .update(|s| s.last_active_time = Some(status::now()));
        // A finalizer only where deletion has work to do: restoring the original count,
        // or leaving a transparent Service with endpoints. Elsewhere deletion needs
        // nothing from Blink, and 10,000 objects save 10,000 writes at start.
        let needs_finalizer = self
            .plan
            .as_ref()
            .is_ok_and(|plan| plan.restore_original || plan.transparent);
        if needs_finalizer && !self.object.finalizers().iter().any(|f| f == FINALIZER) {
            let mut finalizers = self.object.finalizers().to_vec();
            finalizers.push(FINALIZER.to_owned());
            let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
            self.ctx.metrics.wrote("finalizer");
            let _permit = self.ctx.api_permits.acquire().await.ok();
            if let Err(e) = self
                .api()
                .patch(
                    self.key.name(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                warn!(function = %self.key, error = %e, "could not add the finalizer");
                self.taken_over = false;
            }
        }
    }

    async fn scale(
        &mut self,
        plan: &Plan,
        before: Replicas,
        decision: &Decision,
        readings: &[Reading],
        poked_at: Option<Instant>,
    ) -> Option<Written> {
        let to = decision.replicas;
        let wake = plan.policy.min.max(1);
        if let Some(at) = poked_at {
            self.ctx
                .metrics
                .poke_to_patch_sent
                .observe(at.elapsed().as_secs_f64());
        }
        // The wall clock, so that the cold path can be followed across processes.
        let sent_at = poked_at.map(|_| k8s_openapi::jiff::Timestamp::now());
        let result = self.ctx.writer.set(&self.key, &plan.target, to, wake).await;
        if let Some(sent_at) = sent_at {
            debug!(function = %self.key, %sent_at, "scale written after a poke");
        }
        match &result {
            Ok(Written::Set(_)) => self.ctx.metrics.wrote("scale"),
            Ok(Written::ZeroRewoken(_)) => {
                self.ctx.metrics.wrote("scale");
                self.ctx.metrics.wrote("scale");
            }
            _ => {}
        }
        match result {
            Ok(written @ Written::Set(after)) => {
                self.after_scale(plan, before.desired, after, decision, readings, poked_at);
                Some(written)
            }
            Ok(written @ Written::ZeroRewoken(after)) => {
                self.after_scale(
                    plan,
                    before.desired,
                    Replicas {
                        desired: 0,
                        ..after
                    },
                    decision,
                    readings,
                    None,
                );
                self.after_scale(plan, 0, after, decision, readings, Some(Instant::now()));
                Some(written)
            }
            Ok(Written::ZeroVetoed) => {
                debug!(function = %self.key, "scale to zero vetoed: work arrived");
                Some(Written::ZeroVetoed)
            }
            Ok(Written::TermEnded) => {
                debug!(function = %self.key, "decision dropped: its term as leader ended");
                self.state = None;
                self.replicas = None;
                Some(Written::TermEnded)
            }
            Err(e) => {
                warn!(function = %self.key, error = %e, "scale failed");
                self.replicas = None;
                let (reason, message) = (e.reason(), e.to_string());
                self.book
                    .condition(Condition::READY, false, reason, message);
                None
            }
        }
    }

    fn after_scale(
        &mut self,
        plan: &Plan,
        from: i32,
        after: Replicas,
        decision: &Decision,
        readings: &[Reading],
        poked_at: Option<Instant>,
    ) {
        let to = after.desired;
        self.replicas = Some(after);
        self.last_set = Some(to);
        if let Some(at) = poked_at {
            self.ctx
                .metrics
                .poke_to_patch
                .observe(at.elapsed().as_secs_f64());
        }
        let direction = if to > from { "up" } else { "down" };
        self.ctx
            .metrics
            .scale_actions
            .get_or_create(&ScaleLabels {
                namespace: self.labels.namespace.clone(),
                name: self.labels.name.clone(),
                direction,
            })
            .inc();
        if to > from {
            self.scaled_up_at = Some(Instant::now());
        }
        if from == 0 && to > 0 {
            self.ctx
                .metrics
                .cold_starts
                .get_or_create(&self.labels)
                .inc();
        }
        let why = explain(plan, decision, readings);
        info!(function = %self.key, from, to, step = ?decision.step, %why, "scaled");
        let reason = match (from, to) {
            (0, _) => "ScaledFromZero",
            (_, 0) => "ScaledToZero",
            _ if to > from => "ScaledUp",
            _ => "ScaledDown",
        };
        self.event(
            EventType::Normal,
            reason,
            "Scale",
            format!("{} from {from} to {to}: {why}", plan.target),
        );
    }

    /// The object is being deleted: give the target back its original count when
    /// asked, then let the object go.
    async fn finalize(&mut self, plan: &Plan) {
        if !self.object.finalizers().iter().any(|f| f == FINALIZER) {
            return;
        }
        let original = self.original_replica_count();
        if plan.transparent && !self.release_transparent(plan, original).await {
            return;
        }
        if let (true, Some(original)) = (
            plan.restore_original,
            original.filter(|o| !plan.transparent || *o > 0),
        ) {
            match self
                .ctx
                .writer
                .set(&self.key, &plan.target, original, original.max(1))
                .await
            {
                Ok(_) => {
                    self.last_set = Some(original);
                    self.event(
                        EventType::Normal,
                        "ReplicasRestored",
                        "Finalize",
                        format!(
                            "{} restored to its original {original} replicas",
                            plan.target
                        ),
                    );
                }
                Err(TargetError::NotFound(_)) => {}
                Err(e) => {
                    warn!(function = %self.key, error = %e, "could not restore the original count; will retry");
                    return;
                }
            }
        }
        let finalizers: Vec<String> = self
            .object
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
        if let Err(e) = self
            .api()
            .patch(
                self.key.name(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            warn!(function = %self.key, error = %e, "could not remove the finalizer; will retry");
        }
    }

    /// Deleting a transparent object: scale to `max(1, original)` and remove Blink's
    /// slice only once a replica is ready, so the Service is never left without
    /// endpoints. `true` once the slice is gone.
    async fn release_transparent(&mut self, plan: &Plan, original: Option<i32>) -> bool {
        let Some(slices) = self.ctx.slices.clone() else {
            return true;
        };
        let namespace = self.key.namespace().to_owned();
        let service = plan.service_name();
        match slices.exists(&namespace, &service).await {
            Ok(false) => return true,
            Ok(true) => {}
            Err(e) => {
                warn!(function = %self.key, error = %e, "cannot read Blink's slice; will retry");
                return false;
            }
        }
        let floor = original.unwrap_or(1).max(1);
        self.ctx.metrics.read("scale");
        match self.ctx.writer.scale().get(&plan.target).await {
            Ok(replicas) if replicas.desired < 1 => {
                let _ = self
                    .ctx
                    .writer
                    .set(&self.key, &plan.target, floor, floor)
                    .await;
                return false;
            }
            Ok(_) => {}
            Err(TargetError::NotFound(_)) => {
                // No target left to serve: the slice cannot help anyone.
                return slices.remove(&namespace, &service).await.is_ok();
            }
            Err(_) => return false,
        }
        if !slices
            .replica_ready(&namespace, &service)
            .await
            .unwrap_or(false)
        {
            return false;
        }
        self.ctx.leadership.writable().await;
        slices.remove(&namespace, &service).await.is_ok()
    }

    async fn write_status(&mut self) {
        if !self.ctx.leadership.can_write(Instant::now()) {
            return;
        }
        // Background writes queue behind a bounded number in flight (scale writes do
        // not: a wake must not wait behind 10,000 status updates). The patch is built
        // after the wait, so 10,000 queued writers do not each hold one.
        let _permit = self.ctx.api_permits.acquire().await.ok();
        let Some(status) = self.book.due(Instant::now()) else {
            return;
        };
        let patch = serde_json::json!({ "status": status_patch(&status) });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        match self
            .api()
            .patch_status(self.key.name(), &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.ctx.metrics.wrote("status");
                self.book.written(status, Instant::now());
            }
            Err(e) => {
                debug!(function = %self.key, error = %e, "status write failed; will retry");
                self.book
                    .written(ScaledObjectStatus::default(), Instant::now());
            }
        }
    }

    fn api(&self) -> Api<ScaledObject> {
        Api::namespaced(self.ctx.client.clone(), self.key.namespace())
    }

    /// Publishes an Event about the object without holding up the worker.
    fn event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        if !self.ctx.leadership.can_write(Instant::now()) {
            return;
        }
        let recorder = self.ctx.recorder.clone();
        // Made when needed: 10,000 workers need not each keep one.
        let reference = self.object.object_ref(&());
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                debug!(error = %e, "event not published");
            }
        });
    }
}

/// A wall-clock time from the API as a monotonic instant (`None` if in the future or
/// further back than the process's clock can express).
/// The next pull result, or never when no read was ever started.
async fn next_result(
    results: &mut Option<(mpsc::Sender<PullResult>, mpsc::Receiver<PullResult>)>,
) -> Option<PullResult> {
    match results {
        Some((_, receiver)) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

fn instant_of(
    time: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: Instant,
) -> Option<Instant> {
    let time = time?;
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(time.0);
    let age = Duration::try_from(age).ok()?;
    now.checked_sub(age)
}

/// A measurement as the decision reads it. The decision calls a metric active when
/// `value > activation`; where a trigger's own verdict differs (a cron window active
/// with `desiredReplicas: 0`, a `MessageRate` queue with messages waiting, persistent
/// lag excluded from the count but not from activity), the threshold passed on is
/// moved just enough that the decision reaches the trigger's verdict.
fn reading_of(m: Measurement) -> Reading {
    let activation = match (m.active, m.value > m.activation) {
        (true, false) => m.value - m.value.abs().max(1.0) * 1e-9,
        (false, true) => m.value,
        _ => m.activation,
    };
    Reading::Metric {
        value: m.value,
        target: m.target,
        activation,
    }
}

/// A merge patch sets only the fields it names; conditions are replaced whole.
fn status_patch(status: &ScaledObjectStatus) -> serde_json::Value {
    serde_json::to_value(status).unwrap_or_default()
}

/// One line naming what drove a decision: the step and each trigger's numbers.
fn explain(plan: &Plan, decision: &Decision, readings: &[Reading]) -> String {
    let mut parts = Vec::with_capacity(readings.len() + 1);
    parts.push(format!("{:?}", decision.step).to_lowercase());
    for (trigger, reading) in plan.triggers.iter().zip(readings) {
        parts.push(match reading {
            Reading::Metric { value, target, .. } => {
                format!("{} {value}/{target}", trigger.name())
            }
            Reading::Http {
                concurrency,
                target,
                ..
            } => format!("{} concurrency {concurrency:.1}/{target}", trigger.name()),
            Reading::Failed => format!("{} failing", trigger.name()),
        });
    }
    if decision.step == Step::Fallback {
        parts.push("fallback".to_owned());
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_function_re_reads_within_the_last_quarter_of_the_period() {
        let minute = Duration::from_secs(60);
        let cases = [
            (0.0, minute),
            (0.5, Duration::from_millis(52_500)),
            (0.999_999, Duration::from_secs(45)),
            // Out-of-range draws stay within the bounds.
            (-1.0, minute),
            (7.0, Duration::from_secs(45)),
        ];
        for (draw, expected) in cases {
            let period = spread_resync(minute, draw);
            let off = period.abs_diff(expected);
            assert!(off < Duration::from_millis(1), "{draw}: {period:?}");
        }
        for _ in 0..1_000 {
            let period = spread_resync(minute, rand::random());
            assert!(
                (Duration::from_secs(45)..=minute).contains(&period),
                "{period:?}"
            );
        }
    }

    #[test]
    fn the_triggers_own_activity_verdict_survives() {
        let cases = [
            // (value, activation, trigger says active) → decision sees active
            (5.0, 0.0, true),
            (0.0, 0.0, false),
            (0.0, 0.0, true),  // cron window with desiredReplicas: 0
            (3.0, 5.0, true),  // messages waiting under a rate threshold
            (7.0, 5.0, false), // lag that KEDA excludes from activity
            (1e12, 0.0, true),
        ];
        for (value, activation, active) in cases {
            let m = Measurement {
                value,
                target: 1.0,
                activation,
                active,
            };
            let Reading::Metric {
                value: v,
                activation: a,
                ..
            } = reading_of(m)
            else {
                panic!("a metric");
            };
            assert_eq!(v, value, "the value is passed on unchanged");
            assert_eq!(v > a, active, "{value} {activation} {active}");
        }
    }
}
