//! One function as the activator sees it: its ready replicas, the requests it holds,
//! why it cannot wake (if it cannot), and the demand it reports.
//!
//! Admission ([`Function::admit`]) is where a request learns its fate: a replica at
//! once (nothing waits and one has room), a place in the queue (in arrival order), or
//! a refusal that says why. Requests leave the queue the moment a replica is ready or
//! has room ([`Function::dispatch`]), in arrival order; a waiter that gave up (timed
//! out, or its client went away) is skipped and its place is already free.
//!
//! A replica that refuses a connection (reported ready, but not listening yet, or
//! already gone) sits out: no request is sent its way until a probe — one per replica,
//! not one per request — connects to it; the request that met the refusal goes to
//! another replica or back to the front of the queue ([`Function::readmit`]).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use blink_crds::FunctionKey;
use tokio::sync::oneshot;

use crate::{
    balance,
    hold::{self, Held, QueueBounds, QueueFull},
    meter::{DemandMeter, DemandReading},
    metrics::FunctionMetrics,
    pool::{Connection, PoolConfig, Protocol, Upstream},
};

/// How a function is served, from its ScaledObject, its Service and the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub protocol: Protocol,
    /// This activator's share of `containerConcurrency` per replica.
    pub replica_limit: Option<usize>,
    pub wait_timeout: Duration,
    /// How long a replica has, once it has the whole request, to begin its answer.
    pub response_timeout: Duration,
    pub bounds: QueueBounds,
    pub pool: PoolConfigEq,
}

/// [`PoolConfig`] with equality, so settings compare.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfigEq {
    pub max_connections: usize,
    pub connect_timeout: Duration,
}

impl From<PoolConfigEq> for PoolConfig {
    fn from(c: PoolConfigEq) -> Self {
        PoolConfig {
            max_connections: c.max_connections,
            connect_timeout: c.connect_timeout,
        }
    }
}

/// One ready endpoint of the function's Service.
#[derive(Debug)]
pub struct Replica {
    pub upstream: Upstream,
    in_flight: AtomicUsize,
    /// It refused a connection; its probe has not connected since.
    sitting_out: AtomicBool,
}

impl Replica {
    fn new(upstream: Upstream) -> Self {
        Self {
            upstream,
            in_flight: AtomicUsize::new(0),
            sitting_out: AtomicBool::new(false),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.upstream.addr()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The in-flight count, or `None` while it sits out.
    fn load(&self) -> Option<usize> {
        (!self.sitting_out.load(Ordering::Relaxed)).then(|| self.in_flight())
    }
}

/// The pause before a sitting-out replica's next probe: short at first (a replica
/// reported ready usually listens within milliseconds, and a held request waits on the
/// probe), then slow for one that keeps refusing.
pub fn probe_pause(attempt: u32, refusing_for: Duration) -> Duration {
    if refusing_for >= Duration::from_secs(5) {
        Duration::from_millis(250)
    } else {
        Duration::from_millis(1 << attempt.min(4))
    }
}

/// Why a request gets no replica.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    QueueFull(#[from] QueueFull),
    /// The function cannot wake now (`ScaleUpStalled`, paused at zero, `Conflict`).
    #[error("{0}")]
    CannotWake(String),
    /// The activator is shutting down.
    #[error("the activator is shutting down")]
    Draining,
}

/// A slot on one replica, held from admission until the response has been sent.
#[derive(Debug)]
pub struct Ticket {
    replica: Arc<Replica>,
    function: Arc<Function>,
    /// The function's `responseTimeout` when the slot was taken: read here, under the
    /// lock already held, rather than under the lock once more on the way out.
    response_timeout: Duration,
}

impl Ticket {
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    pub fn function(&self) -> &Arc<Function> {
        &self.function
    }

    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Sequentially consistent with `enqueue`: either this sees the new waiter, or
        // the waiter's own dispatch sees this slot free (on x86 the same instructions
        // as weaker orderings).
        self.replica.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.function.metrics.in_flight.dec();
        self.function.meter().in_flight.decrement(Instant::now());
        // A freed slot matters only where a limit made someone wait.
        if self.function.waiting.load(Ordering::SeqCst) > 0 {
            self.function.dispatch();
        }
    }
}

/// The outcome of [`Function::admit`].
#[derive(Debug)]
pub enum Admission {
    Ready(Ticket),
    Wait(Waiting),
}

/// A place in the queue: await [`Waiting::ticket`]. Dropping it (timeout, client gone)
/// gives the place back at once.
#[derive(Debug)]
pub struct Waiting {
    receiver: oneshot::Receiver<Result<Ticket, Refusal>>,
    place: HeldPlace,
    /// No replica was ready when this request arrived: the scaler is to be poked.
    pub at_zero: bool,
}

impl Waiting {
    pub async fn ticket(mut self) -> Result<Ticket, Refusal> {
        let result = (&mut self.receiver).await.unwrap_or(Err(Refusal::Draining));
        drop(self.place);
        result
    }
}

#[derive(Debug)]
struct HeldPlace {
    function: Arc<Function>,
    body_bytes: u64,
}

impl Drop for HeldPlace {
    fn drop(&mut self) {
        let function = &self.function;
        function.waiting.fetch_sub(1, Ordering::AcqRel);
        function.metrics.queued.dec();
        function.meter().queued.decrement(Instant::now());
        let mut state = function.state();
        state.held.requests -= 1;
        state.held.body_bytes -= self.body_bytes;
        // Places given up leave closed senders behind; sweep once they dominate.
        if state.queue.len() > 64 && state.queue.len() > 2 * state.held.requests {
            state.queue.retain(|waiter| !waiter.is_closed());
        }
    }
}

type Waiter = oneshot::Sender<Result<Ticket, Refusal>>;

#[derive(Debug)]
struct State {
    settings: Arc<Settings>,
    replicas: Vec<Arc<Replica>>,
    /// Replicas no longer listed that still have requests in flight: one that comes
    /// back (a readiness blip, an endpoint moving between slices) keeps its count and
    /// connections, so its limit still holds.
    departed: Vec<Arc<Replica>>,
    queue: VecDeque<Waiter>,
    held: Held,
    cannot_wake: Option<String>,
    draining: bool,
    /// When the first replica became ready after none was, until the first held request
    /// connects to one (what [`Function::take_ready_since`] measures).
    ready_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Function {
    key: FunctionKey,
    state: Mutex<State>,
    /// Places held now; read without the lock on every completion.
    waiting: AtomicUsize,
    meter: Mutex<DemandMeter>,
    metrics: FunctionMetrics,
}

impl Function {
    pub fn new(key: FunctionKey, settings: Settings, metrics: FunctionMetrics) -> Arc<Self> {
        Arc::new(Self {
            key,
            metrics,
            state: Mutex::new(State {
                settings: Arc::new(settings),
                replicas: Vec::new(),
                departed: Vec::new(),
                queue: VecDeque::new(),
                held: Held::default(),
                cannot_wake: None,
                draining: false,
                ready_since: None,
            }),
            waiting: AtomicUsize::new(0),
            meter: Mutex::new(DemandMeter::new(Instant::now())),
        })
    }

    pub fn key(&self) -> &FunctionKey {
        &self.key
    }

    pub fn metrics(&self) -> &FunctionMetrics {
        &self.metrics
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves nothing half-done that matters more
        // than serving on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn meter(&self) -> MutexGuard<'_, DemandMeter> {
        self.meter.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.state().settings.clone()
    }

    pub fn held(&self) -> Held {
        self.state().held
    }

    /// Arrivals, in-flight and queued averages since the last call.
    pub fn take_demand(&self, now: Instant) -> DemandReading {
        self.meter().take(now)
    }

    /// Arrivals taken for a snapshot the scaler never applied: counted in the next, so
    /// the scaler sees each arrival once (late rather than never).
    pub fn count_again(&self, requests: u64) {
        let mut meter = self.meter();
        meter.requests = meter.requests.saturating_add(requests);
    }

    /// A request arrives, at `arrived`, with `body_bytes` it may hold (see [`hold`]).
    pub fn admit(
        self: &Arc<Self>,
        body_bytes: u64,
        arrived: Instant,
    ) -> Result<Admission, Refusal> {
        let state = self.state();
        // The warm path: nobody waiting and a replica with room, the arrival counted
        // with the slot taken (one look at the meter, and the clock read at arrival).
        // Places given up leave closed senders in the queue until a dispatch or a sweep
        // takes them out: the count of places held says whether anyone waits.
        if !state.draining
            && state.held.requests == 0
            && let Some(ticket) = self.take_slot(&state, arrived, Arrival::CountNow)
        {
            return Ok(Admission::Ready(ticket));
        }
        self.meter().requests += 1;
        if state.draining {
            return Err(Refusal::Draining);
        }
        if let Some(reason) = state
            .cannot_wake
            .as_ref()
            .filter(|_| state.replicas.is_empty())
        {
            return Err(Refusal::CannotWake(reason.clone()));
        }
        hold::admit(state.settings.bounds, state.held, body_bytes)?;
        let at_zero = state.replicas.is_empty();
        Ok(Admission::Wait(self.enqueue(
            state,
            body_bytes,
            Place::Back,
            at_zero,
        )))
    }

    /// A request admitted before, whose replica refused the connection: a replica with
    /// room, or the front of the queue (it is older than everyone there, and its place
    /// was counted against the bounds when it arrived).
    pub fn readmit(self: &Arc<Self>, body_bytes: u64) -> Result<Admission, Refusal> {
        let state = self.state();
        if state.draining {
            return Err(Refusal::Draining);
        }
        if let Some(ticket) = self.take_slot(&state, Instant::now(), Arrival::AlreadyCounted) {
            return Ok(Admission::Ready(ticket));
        }
        Ok(Admission::Wait(self.enqueue(
            state,
            body_bytes,
            Place::Front,
            false,
        )))
    }

    fn enqueue(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, State>,
        body_bytes: u64,
        place: Place,
        at_zero: bool,
    ) -> Waiting {
        let (sender, receiver) = oneshot::channel();
        match place {
            Place::Back => state.queue.push_back(sender),
            Place::Front => state.queue.push_front(sender),
        }
        state.held.requests += 1;
        state.held.body_bytes += body_bytes;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        drop(state);
        self.metrics.queued.inc();
        self.meter().queued.increment(Instant::now());
        let waiting = Waiting {
            receiver,
            place: HeldPlace {
                function: self.clone(),
                body_bytes,
            },
            at_zero,
        };
        // A slot freed after this request found none, by a ticket that saw no waiter
        // yet (see `Ticket::drop`), is taken here.
        self.dispatch();
        waiting
    }

    /// Picks a replica with room (power of two choices, sitting-out ones excluded) and
    /// takes a slot on it at `now`; an `arrival` not yet counted is counted with it.
    fn take_slot(
        self: &Arc<Self>,
        state: &State,
        now: Instant,
        arrival: Arrival,
    ) -> Option<Ticket> {
        let replicas = &state.replicas;
        let chosen = balance::pick(
            replicas.len(),
            |i| replicas[i].load(),
            state.settings.replica_limit,
            |n| rand::random_range(0..n),
        )?;
        let replica = replicas[chosen].clone();
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.in_flight.inc();
        {
            let mut meter = self.meter();
            meter.in_flight.increment(now);
            if arrival == Arrival::CountNow {
                meter.requests += 1;
            }
        }
        Some(Ticket {
            replica,
            function: self.clone(),
            response_timeout: state.settings.response_timeout,
        })
    }

    /// When the function's first replica became ready after none was, the first time a
    /// held request asks once it has a connection; `None` after that.
    pub fn take_ready_since(&self) -> Option<Instant> {
        self.state().ready_since.take()
    }

    /// `replica` refused a connection: it takes no request until its probe connects.
    pub fn sit_out(self: &Arc<Self>, replica: &Arc<Replica>) {
        if !replica.sitting_out.swap(true, Ordering::AcqRel) {
            tokio::spawn(probe(Arc::downgrade(self), replica.clone()));
        }
    }

    /// Hands replicas to waiting requests, oldest first, while any has room.
    pub fn dispatch(self: &Arc<Self>) {
        // Tickets of waiters that left just now; dropped once the lock is free, since
        // dropping a ticket dispatches again.
        let mut undelivered = Vec::new();
        let mut state = self.state();
        while let Some(front) = state.queue.front() {
            if front.is_closed() {
                state.queue.pop_front();
                continue;
            }
            let Some(ticket) = self.take_slot(&state, Instant::now(), Arrival::AlreadyCounted)
            else {
                break;
            };
            if let Some(waiter) = state.queue.pop_front()
                && let Err(Ok(ticket)) = waiter.send(Ok(ticket))
            {
                undelivered.push(ticket);
            }
        }
        drop(state);
        drop(undelivered);
    }

    /// The replicas requests may go to now.
    #[cfg(test)]
    pub fn replica_addrs(&self) -> Vec<SocketAddr> {
        self.state().replicas.iter().map(|r| r.addr()).collect()
    }

    /// The ready endpoints changed: keep the replicas still listed (their connections
    /// and counts), take back departed ones listed again, add the new, and keep the
    /// gone while requests are in flight on them; then serve waiting requests.
    pub fn set_replicas(self: &Arc<Self>, addrs: &[SocketAddr]) {
        {
            let mut state = self.state();
            let settings = state.settings.clone();
            let mut next = Vec::with_capacity(addrs.len());
            for addr in addrs {
                let known = state
                    .replicas
                    .iter()
                    .chain(&state.departed)
                    .find(|r| r.addr() == *addr);
                match known {
                    Some(existing) => next.push(existing.clone()),
                    None => next.push(Arc::new(Replica::new(Upstream::new(
                        *addr,
                        settings.protocol,
                        settings.pool.into(),
                        self.metrics.upstream_connections.clone(),
                    )))),
                }
            }
            // Measured only for a wake: requests were waiting for the first replica.
            if next.is_empty() {
                state.ready_since = None;
            } else if state.replicas.is_empty() && state.held.requests > 0 {
                state.ready_since = Some(Instant::now());
            }
            let previous = std::mem::replace(&mut state.replicas, next);
            let mut departed = std::mem::take(&mut state.departed);
            departed.extend(previous);
            departed
                .retain(|r| r.in_flight() > 0 && !state.replicas.iter().any(|n| Arc::ptr_eq(n, r)));
            state.departed = departed;
        }
        self.dispatch();
    }

    /// New settings (a ScaledObject or Service changed). A new upstream protocol
    /// starts new connections.
    pub fn set_settings(self: &Arc<Self>, settings: Settings) {
        let addrs: Vec<SocketAddr> = {
            let mut state = self.state();
            if *state.settings == settings {
                return;
            }
            let protocol_changed = state.settings.protocol != settings.protocol;
            state.settings = Arc::new(settings);
            if !protocol_changed {
                drop(state);
                self.dispatch();
                return;
            }
            let addrs = state.replicas.iter().map(|r| r.addr()).collect();
            // New connections for the new protocol: nothing is taken back. Requests in
            // flight on the old ones no longer count against the limit.
            state.replicas.clear();
            state.departed.clear();
            addrs
        };
        self.set_replicas(&addrs);
    }

    /// Why the function cannot wake now (`None`: it can). Waiting requests are
    /// answered at once while no replica is ready.
    pub fn set_cannot_wake(&self, reason: Option<String>) {
        let mut state = self.state();
        state.cannot_wake = reason;
        if let Some(reason) = state.cannot_wake.clone()
            && state.replicas.is_empty()
        {
            for waiter in state.queue.drain(..) {
                let _ = waiter.send(Err(Refusal::CannotWake(reason.clone())));
            }
        }
    }

    /// Shutting down: no new admissions; every waiting request is answered.
    pub fn drain(&self) {
        let mut state = self.state();
        state.draining = true;
        for waiter in state.queue.drain(..) {
            let _ = waiter.send(Err(Refusal::Draining));
        }
    }
}

/// Whether a slot taken is also a request's arrival, to be counted in the meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// A request just admitted: its arrival is counted with its slot.
    CountNow,
    /// A request counted when it arrived (readmitted, or leaving the queue).
    AlreadyCounted,
}

/// Where a request waits in the queue.
#[derive(Debug, Clone, Copy)]
enum Place {
    Back,
    Front,
}

/// Connects to a sitting-out replica until it accepts (the connection is kept for the
/// next request), then serves waiting requests; gives up once the replica is no longer
/// one of the function's.
async fn probe(function: Weak<Function>, replica: Arc<Replica>) {
    let started = Instant::now();
    for attempt in 0.. {
        tokio::time::sleep(probe_pause(attempt, started.elapsed())).await;
        let Some(function) = function.upgrade() else {
            return;
        };
        let listed = function
            .state()
            .replicas
            .iter()
            .any(|r| Arc::ptr_eq(r, &replica));
        if !listed {
            return;
        }
        if let Ok(connection) = replica.upstream.checkout().await {
            if let Connection::Http1(connection) = connection {
                replica.upstream.give_back(connection);
            }
            replica.sitting_out.store(false, Ordering::Release);
            function.dispatch();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(limit: Option<usize>, max_requests: usize) -> Settings {
        Settings {
            protocol: Protocol::Http1,
            replica_limit: limit,
            wait_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            bounds: QueueBounds {
                max_requests,
                max_body_bytes: 1 << 20,
            },
            pool: PoolConfigEq {
                max_connections: 8,
                connect_timeout: Duration::from_secs(1),
            },
        }
    }

    fn function(limit: Option<usize>, max_requests: usize) -> Arc<Function> {
        let key = FunctionKey::new("ns", "f").expect("key");
        let metrics = crate::metrics::Metrics::register(&mut Default::default());
        Function::new(
            key.clone(),
            settings(limit, max_requests),
            metrics.function(&key),
        )
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 244, 0, i], 8080))
    }

    fn waiting(admission: Result<Admission, Refusal>) -> Waiting {
        match admission {
            Ok(Admission::Wait(w)) => w,
            other => panic!("expected to wait, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn requests_wait_at_zero_and_leave_in_arrival_order() {
        let f = function(Some(1), 10);
        let first = waiting(f.admit(0, Instant::now()));
        let second = waiting(f.admit(0, Instant::now()));
        assert!(first.at_zero && second.at_zero);
        assert_eq!(f.held().requests, 2);
        f.set_replicas(&[addr(1)]);
        // Limit 1: only the first gets the replica; the second follows when it is done.
        let ticket = first.ticket().await.expect("first served");
        assert_eq!(ticket.replica().addr(), addr(1));
        let second = tokio::spawn(second.ticket());
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        drop(ticket);
        let ticket = second.await.expect("joined").expect("second served");
        assert_eq!(ticket.replica().in_flight(), 1);
        drop(ticket);
        assert_eq!(f.held(), Held::default());
    }

    #[tokio::test]
    async fn a_request_that_gives_up_frees_its_place_at_once() {
        let f = function(None, 1);
        let w = waiting(f.admit(100, Instant::now()));
        assert!(matches!(
            f.admit(0, Instant::now()),
            Err(Refusal::QueueFull(_))
        ));
        drop(w);
        assert_eq!(f.held(), Held::default());
        let w = waiting(f.admit(0, Instant::now()));
        f.set_replicas(&[addr(1)]);
        assert!(w.ticket().await.is_ok());
    }

    #[tokio::test]
    async fn a_place_given_up_does_not_hold_back_the_next_request() {
        let f = function(Some(1), 10);
        f.set_replicas(&[addr(1)]);
        let busy = ready(f.admit(0, Instant::now()));
        // At the limit: this one waits, then its client leaves (or its wait ends).
        drop(waiting(f.admit(0, Instant::now())));
        drop(busy);
        // The replica is free and nobody waits: straight through, not behind the
        // place given up.
        let next = ready(f.admit(0, Instant::now()));
        assert_eq!(next.replica().addr(), addr(1));
        assert_eq!(f.held(), Held::default());
    }

    #[tokio::test]
    async fn a_slot_freed_while_a_request_joins_the_queue_is_not_lost() {
        let f = function(Some(1), 10);
        f.set_replicas(&[addr(1)]);
        // `admit` found the replica at its limit; before the request is in the queue,
        // the request in flight ends and its ticket sees nobody waiting.
        let busy = ready(f.admit(0, Instant::now()));
        drop(busy);
        let joined = f.enqueue(f.state(), 0, Place::Back, false);
        let ticket = tokio::time::timeout(Duration::from_secs(1), joined.ticket())
            .await
            .expect("served by the slot that was freed")
            .expect("a replica");
        assert_eq!(ticket.replica().addr(), addr(1));
    }

    #[tokio::test]
    async fn a_replica_listed_again_keeps_its_requests_in_flight() {
        let f = function(Some(1), 10);
        f.set_replicas(&[addr(1)]);
        let busy = ready(f.admit(0, Instant::now()));
        // A readiness blip: gone from the endpoints, then back.
        f.set_replicas(&[]);
        f.set_replicas(&[addr(1)]);
        let second = waiting(f.admit(0, Instant::now()));
        assert!(!second.at_zero);
        let second = tokio::spawn(second.ticket());
        tokio::task::yield_now().await;
        assert!(
            !second.is_finished(),
            "two at once on a replica whose limit is 1"
        );
        drop(busy);
        let ticket = second
            .await
            .expect("joined")
            .expect("served once the first is done");
        assert_eq!(ticket.replica().in_flight(), 1);
        drop(ticket);
        // With nothing in flight, a replica gone is forgotten.
        f.set_replicas(&[]);
        assert!(f.state().departed.is_empty());
    }

    #[tokio::test]
    async fn a_wake_is_timed_only_for_requests_still_waiting() {
        let f = function(None, 10);
        drop(waiting(f.admit(0, Instant::now())));
        f.set_replicas(&[addr(1)]);
        assert_eq!(f.take_ready_since(), None, "nobody waited for this replica");
        f.set_replicas(&[]);
        let held = waiting(f.admit(0, Instant::now()));
        f.set_replicas(&[addr(1)]);
        assert!(f.take_ready_since().is_some());
        drop(held);
    }

    #[tokio::test]
    async fn warm_requests_skip_the_queue() {
        let f = function(None, 10);
        f.set_replicas(&[addr(1), addr(2)]);
        let tickets: Vec<Ticket> = (0..10)
            .map(|_| match f.admit(0, Instant::now()) {
                Ok(Admission::Ready(t)) => t,
                other => panic!("{other:?}"),
            })
            .collect();
        // Power of two choices over two replicas: the load stays even.
        let on_first = tickets
            .iter()
            .filter(|t| t.replica().addr() == addr(1))
            .count();
        assert_eq!(on_first, 5);
    }

    #[tokio::test]
    async fn cannot_wake_answers_waiting_and_new_requests() {
        let f = function(None, 10);
        let w = waiting(f.admit(0, Instant::now()));
        f.set_cannot_wake(Some("ScaleUpStalled: no node fits".to_owned()));
        assert!(
            matches!(w.ticket().await, Err(Refusal::CannotWake(r)) if r.contains("ScaleUpStalled"))
        );
        assert!(matches!(
            f.admit(0, Instant::now()),
            Err(Refusal::CannotWake(_))
        ));
        // With a ready replica, requests are served whatever the scaler says.
        f.set_replicas(&[addr(1)]);
        assert!(matches!(
            f.admit(0, Instant::now()),
            Ok(Admission::Ready(_))
        ));
    }

    fn ready(admission: Result<Admission, Refusal>) -> Ticket {
        match admission {
            Ok(Admission::Ready(t)) => t,
            other => panic!("expected a replica, got {other:?}"),
        }
    }

    #[test]
    fn probe_pauses() {
        let second = Duration::from_secs(1);
        for (attempt, refusing_for, expected_ms) in [
            (0, Duration::ZERO, 1),
            (1, Duration::ZERO, 2),
            (4, second, 16),
            (30, 4 * second, 16),
            (30, 5 * second, 250),
        ] {
            assert_eq!(
                probe_pause(attempt, refusing_for),
                Duration::from_millis(expected_ms),
                "attempt {attempt} after {refusing_for:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_replica_that_refused_sits_out_and_readmission_goes_elsewhere() {
        let f = function(None, 10);
        f.set_replicas(&[addr(1), addr(2)]);
        let refused = ready(f.admit(0, Instant::now()));
        let first = refused.replica().clone();
        f.sit_out(&first);
        drop(refused);
        for _ in 0..20 {
            let t = ready(f.readmit(0));
            assert_ne!(
                t.replica().addr(),
                first.addr(),
                "sent to the sitting-out replica"
            );
        }
    }

    #[tokio::test]
    async fn readmitted_requests_wait_at_the_front() {
        let f = function(Some(1), 10);
        f.set_replicas(&[addr(1)]);
        let busy = ready(f.admit(0, Instant::now()));
        let older_arrival = waiting(f.admit(0, Instant::now()));
        let readmitted = waiting(f.readmit(0));
        drop(busy);
        let t = readmitted
            .ticket()
            .await
            .expect("the readmitted request goes first");
        assert_eq!(t.replica().addr(), addr(1));
        drop(t);
        assert!(older_arrival.ticket().await.is_ok());
    }

    /// A replica refusing connections sits out, waiting requests stay queued, and the
    /// probe hands them the replica once it listens.
    #[tokio::test]
    async fn the_probe_brings_a_replica_back_once_it_listens() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        drop(listener);
        let f = function(None, 10);
        f.set_replicas(&[address]);
        let refused = ready(f.admit(0, Instant::now()));
        assert!(refused.replica().upstream.checkout().await.is_err());
        let replica = refused.replica().clone();
        f.sit_out(&replica);
        drop(refused);
        let held = waiting(f.readmit(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            f.held().requests,
            1,
            "still waiting while the replica refuses"
        );
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .expect("rebind");
        let accepting = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let ticket = tokio::time::timeout(Duration::from_secs(5), held.ticket())
            .await
            .expect("served once the replica listens")
            .expect("a ticket");
        assert!(Arc::ptr_eq(ticket.replica(), &replica));
        assert!(accepting.await.is_ok(), "the probe connected");
        // The probe's connection waits in the pool for the request.
        assert!(ticket.replica().upstream.checkout().await.is_ok());
    }

    #[tokio::test]
    async fn replicas_kept_across_updates_keep_their_counts() {
        let f = function(None, 10);
        f.set_replicas(&[addr(1)]);
        let t = match f.admit(0, Instant::now()) {
            Ok(Admission::Ready(t)) => t,
            other => panic!("{other:?}"),
        };
        f.set_replicas(&[addr(2), addr(1)]);
        assert_eq!(t.replica().in_flight(), 1);
        let kept = f
            .state()
            .replicas
            .iter()
            .find(|r| r.addr() == addr(1))
            .cloned();
        assert!(Arc::ptr_eq(&kept.expect("kept"), t.replica()));
    }

    #[tokio::test]
    async fn ready_since_marks_a_wake_once() {
        let f = function(None, 10);
        f.set_replicas(&[addr(1)]);
        assert!(
            f.take_ready_since().is_none(),
            "warm from the start: no wake"
        );
        f.set_replicas(&[]);
        let w = waiting(f.admit(0, Instant::now()));
        f.set_replicas(&[addr(1)]);
        assert!(
            f.take_ready_since().is_some(),
            "a wake with a request waiting"
        );
        assert!(f.take_ready_since().is_none(), "measured once");
        drop(w);
    }

    #[tokio::test]
    async fn drain_answers_everything_waiting() {
        let f = function(None, 10);
        let w = waiting(f.admit(0, Instant::now()));
        f.drain();
        assert!(matches!(w.ticket().await, Err(Refusal::Draining)));
        assert!(matches!(f.admit(0, Instant::now()), Err(Refusal::Draining)));
    }

    #[tokio::test]
    async fn demand_counts_arrivals_and_waiting() {
        let f = function(None, 10);
        let w = waiting(f.admit(0, Instant::now()));
        std::thread::sleep(Duration::from_millis(20));
        let reading = f.take_demand(Instant::now());
        assert_eq!(reading.requests, 1);
        assert!(reading.queued > 0.9, "{reading:?}");
        drop(w);
        let reading = f.take_demand(Instant::now());
        assert_eq!(reading.requests, 0);
    }

    #[tokio::test]
    async fn each_request_counts_once_whichever_way_it_takes() {
        let f = function(Some(1), 10);
        f.set_replicas(&[addr(1)]);
        // At once (the warm path), then queued behind the busy replica, then readmitted
        // after its replica refused: three slots taken, two arrivals.
        let warm = ready(f.admit(0, Instant::now()));
        let queued = waiting(f.admit(0, Instant::now()));
        std::thread::sleep(Duration::from_millis(20));
        drop(warm);
        let dispatched = queued
            .ticket()
            .await
            .expect("dispatched when the slot frees");
        drop(dispatched);
        let readmitted = ready(f.readmit(0));
        std::thread::sleep(Duration::from_millis(20));
        let reading = f.take_demand(Instant::now());
        assert_eq!(reading.requests, 2, "{reading:?}");
        assert!(reading.in_flight > 0.5, "{reading:?}");
        drop(readmitted);
    }
}
