//! The client side of the demand protocol: pokes the moment a request waits for a
//! function with no replica, and a snapshot of every function's demand each interval,
//! to the scaler that holds the Lease, over one h2c connection.
//!
//! It follows the leader through the Lease (and through a `421` naming another), and
//! after any reconnect or change of leader sends a full snapshot at once. It never
//! blocks the request path (pokes go through an unbounded channel, deduplicated per
//! function) and never stops: every failure is logged, counted and retried.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use blink_crds::{
    FunctionDemand, FunctionKey, Poke, Snapshot,
    demand::{LEADER_HEADER, POKE_PATH, SNAPSHOT_PATH, leader_address},
};
use bytes::Bytes;
use futures::TryStreamExt;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{function::Function, metrics::Metrics, proxy, registry::Registry};

/// A poke for the same function is not repeated within this time: the first one
/// already woke the scaler, and the next snapshot carries the rest.
const POKE_REPEAT_AFTER: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a token read from its file is used before the file is read again.
const TOKEN_REREAD_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// This activator's pod name (the `activator` of every report).
    pub activator: String,
    pub interval: Duration,
    /// The projected ServiceAccount token (audience `blink-scaler`); read again as
    /// [`Token`] says, since the kubelet renews it.
    pub token_file: Option<PathBuf>,
    /// The scaler's Lease: namespace and name.
    pub lease: (String, String),
}

/// The request path's end: [`proxy::Poke`] into the reporter.
#[derive(Debug, Clone)]
pub struct Poker {
    sender: mpsc::UnboundedSender<(FunctionKey, Instant)>,
}

impl proxy::Poke for Poker {
    fn poke(&self, function: &FunctionKey) {
        let _ = self.sender.send((function.clone(), Instant::now()));
    }
}

/// Follows the scaler's Lease: the leader's demand address as it changes.
pub async fn follow_lease(
    client: Client,
    lease: (String, String),
    leader: watch::Sender<Option<SocketAddr>>,
) {
    let api: Api<Lease> = Api::namespaced(client, &lease.0);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", lease.1));
    let mut leases = watcher(api, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        match leases.try_next().await {
            Ok(Some(lease)) => {
                let address = lease
                    .spec
                    .and_then(|s| s.holder_identity)
                    .as_deref()
                    .and_then(leader_address);
                leader.send_if_modified(|current| {
                    let changed = *current != address;
                    *current = address;
                    changed
                });
            }
            Ok(None) => return,
            Err(e) => warn!(error = %e, "Lease watch failed; retrying"),
        }
    }
}

use futures::StreamExt as _;

/// Starts the reporter; returns the poke handle for the request path.
pub fn start(
    config: ReporterConfig,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    leader: watch::Receiver<Option<SocketAddr>>,
) -> Poker {
    if config.token_file.is_none() {
        warn!("no --token-file: demand reports carry no token, and the scaler refuses them (401)");
    }
    let (sender, pokes) = mpsc::unbounded_channel();
    let reporter = Reporter {
        token: Token::new(config.token_file.clone()),
        session: session_id(),
        seq: 0,
        config,
        registry,
        metrics,
        leader,
        redirect: None,
        delivered: false,
        pokes,
        last_poke: HashMap::new(),
    };
    tokio::spawn(reporter.run());
    Poker { sender }
}

fn session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

struct Reporter {
    token: Token,
    session: String,
    seq: u64,
    config: ReporterConfig,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    leader: watch::Receiver<Option<SocketAddr>>,
    /// A leader named by a `421`, until the Lease says otherwise.
    redirect: Option<SocketAddr>,
    /// Whether the current connection has delivered a snapshot.
    delivered: bool,
    /// Functions to poke, with when the request that asked arrived.
    pokes: mpsc::UnboundedReceiver<(FunctionKey, Instant)>,
    last_poke: HashMap<FunctionKey, Instant>,
}

/// Why a connection to the scaler was left.
enum Leave {
    LeaderChanged,
    Redirected(SocketAddr),
    Broken,
}

impl Reporter {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let target = self.redirect.or(*self.leader.borrow_and_update());
            let Some(addr) = target else {
                // No leader known: wait for one, keeping count of what waits.
                tokio::select! {
                    () = leader_changed(&mut self.leader) => {}
                    _ = tokio::time::sleep(self.config.interval) => self.discard_window(),
                }
                continue;
            };
            let pause = match self.connect(addr).await {
                Ok(sender) => {
                    info!(scaler = %addr, "reporting demand");
                    self.delivered = false;
                    let leave = self.report(sender, addr).await;
                    match leave {
                        Leave::LeaderChanged => self.redirect = None,
                        Leave::Redirected(to) => {
                            info!(from = %addr, to = %to, "scaler named another leader");
                            self.redirect = Some(to);
                        }
                        Leave::Broken => {}
                    }
                    // A session that delivered nothing is a failure too: two scalers
                    // naming each other in their 421s, or one that takes the
                    // connection and fails every report, must not be a busy loop.
                    // The first such hop is taken at once (a leader change is).
                    failures = if self.delivered { 0 } else { failures + 1 };
                    (failures > 1).then(|| backoff(failures - 1))
                }
                Err(e) => {
                    failures += 1;
                    warn!(scaler = %addr, error = %e, "cannot reach the scaler; retrying");
                    self.redirect = None;
                    Some(backoff(failures))
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = leader_changed(&mut self.leader) => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Demand no scaler will see: the meters start a new window so a later
    /// snapshot is not a mix.
    fn discard_window(&mut self) {
        let now = Instant::now();
        for function in self.registry.functions() {
            function.take_demand(now);
        }
    }

    async fn connect(&self, addr: SocketAddr) -> anyhow::Result<http2::SendRequest<Full<Bytes>>> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow::anyhow!("no answer in {CONNECT_TIMEOUT:?}"))??;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "scaler connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends a full snapshot at once, then pokes as they come and a snapshot every
    /// interval, until the connection breaks or the leader changes.
    async fn report(&mut self, sender: http2::SendRequest<Full<Bytes>>, addr: SocketAddr) -> Leave {
        let client = ScalerClient { sender, addr };
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One snapshot at a time; pokes go out while it waits for its answer.
        let mut in_flight: Option<SnapshotInFlight> = None;
        let leave = loop {
            tokio::select! {
                biased;
                () = leader_changed(&mut self.leader) => break Leave::LeaderChanged,
                Some((key, asked_at)) = self.pokes.recv() => {
                    let now = Instant::now();
                    if self.last_poke.get(&key).is_some_and(|at| now - *at < POKE_REPEAT_AFTER) {
                        continue;
                    }
                    self.last_poke.insert(key.clone(), now);
                    if self.last_poke.len() > 10_000 {
                        self.last_poke.retain(|_, at| now - *at < POKE_REPEAT_AFTER);
                    }
                    // When the request asked, by the wall clock, to follow one wake
                    // across the processes (the cold bench): the scaler logs when it
                    // applied the poke.
                    debug!(
                        function = %key,
                        asked_at = %k8s_openapi::jiff::Timestamp::now()
                            .checked_sub(asked_at.elapsed())
                            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
                        "poke asked"
                    );
                    let poke = Poke {
                        activator: self.config.activator.clone(),
                        session: self.session.clone(),
                        key,
                    };
                    // Pokes do not wait for each other's answers. One refused for
                    // its token is recovered by the next snapshot, which reads the
                    // renewed token.
                    let client = client.clone();
                    let token = self.token.current();
                    let metrics = self.metrics.clone();
                    tokio::spawn(async move {
                        match client.post(POKE_PATH, &poke, token.as_deref()).await {
                            Ok((status, _)) if status.is_success() => {
                                metrics.pokes_sent.inc();
                                metrics.poke_latency.observe(asked_at.elapsed().as_secs_f64());
                            }
                            Ok((status, _)) => warn!(%status, "the scaler refused a poke"),
                            Err(e) => warn!(error = %e, "poke failed"),
                        }
                    });
                }
                (sent, answer) = answered(&mut in_flight) => {
                    match self.settle_snapshot(sent, answer, &client) {
                        Ok(sent_again) => in_flight = sent_again,
                        Err(leave) => break leave,
                    }
                }
                _ = tick.tick(), if in_flight.is_none() => {
                    in_flight = Some(self.send_snapshot(&client));
                }
            }
        };
        // Left unanswered: as good as refused.
        if let Some(abandoned) = in_flight {
            abandoned.count_again();
        }
        leave
    }

    /// Takes the meters' readings and starts their snapshot on its way.
    fn send_snapshot(&mut self, client: &ScalerClient) -> SnapshotInFlight {
        let now = Instant::now();
        let mut functions = Vec::new();
        let mut counted = Vec::new();
        for function in self.registry.functions() {
            let reading = function.take_demand(now);
            if reading.is_zero() {
                continue;
            }
            functions.push(FunctionDemand {
                key: function.key().clone(),
                in_flight: reading.in_flight,
                queued: reading.queued,
                requests: reading.requests,
                held_messages: 0,
            });
            if reading.requests > 0 {
                counted.push((function, reading.requests));
            }
        }
        self.seq += 1;
        let snapshot = Arc::new(Snapshot {
            activator: self.config.activator.clone(),
            session: self.session.clone(),
            seq: self.seq,
            functions,
        });
        SnapshotInFlight::post(client, snapshot, counted, self.token.current(), false)
    }

    /// What a snapshot's answer leaves to do: nothing, the same snapshot sent again
    /// (a renewed token), or leaving the connection.
    fn settle_snapshot(
        &mut self,
        sent: SnapshotInFlight,
        answer: anyhow::Result<(StatusCode, Option<SocketAddr>)>,
        client: &ScalerClient,
    ) -> Result<Option<SnapshotInFlight>, Leave> {
        if matches!(answer, Ok((StatusCode::UNAUTHORIZED, _)))
            && !sent.sent_again
            && self.token.read_again()
        {
            // Renewed since it was read: the same snapshot, with the new token.
            let token = self.token.current();
            return Ok(Some(SnapshotInFlight::post(
                client,
                sent.snapshot,
                sent.counted,
                token,
                true,
            )));
        }
        if !matches!(&answer, Ok((status, _)) if status.is_success()) {
            sent.count_again();
        }
        match answer {
            Ok((status, _)) if status.is_success() => {
                self.metrics.snapshots.get_or_create(&kind("sent")).inc();
                self.delivered = true;
                Ok(None)
            }
            Ok((StatusCode::MISDIRECTED_REQUEST, leader)) => {
                self.metrics.snapshots.get_or_create(&kind("refused")).inc();
                after_misdirected(leader, client.addr, self.redirect.is_some()).map(|()| None)
            }
            Ok((status, _)) => {
                self.metrics.snapshots.get_or_create(&kind("refused")).inc();
                warn!(%status, "the scaler refused a snapshot");
                Ok(None)
            }
            Err(e) => {
                self.metrics.snapshots.get_or_create(&kind("failed")).inc();
                warn!(error = %e, "snapshot failed; reconnecting");
                Err(Leave::Broken)
            }
        }
    }
}

type Answer = anyhow::Result<(StatusCode, Option<SocketAddr>)>;

/// A snapshot on its way to the scaler. Its POST runs beside the pokes: a poke never
/// waits for a snapshot's answer, however slow the scaler is to give it.
struct SnapshotInFlight {
    snapshot: Arc<Snapshot>,
    /// Arrivals it took from the meters, put back unless the scaler applied it.
    counted: Vec<(Arc<Function>, u64)>,
    /// Sent a second time, with a renewed token after a 401.
    sent_again: bool,
    answer: Pin<Box<dyn Future<Output = Answer> + Send>>,
}

impl SnapshotInFlight {
    fn post(
        client: &ScalerClient,
        snapshot: Arc<Snapshot>,
        counted: Vec<(Arc<Function>, u64)>,
        token: Option<Arc<str>>,
        sent_again: bool,
    ) -> Self {
        let (client, body) = (client.clone(), snapshot.clone());
        let answer =
            Box::pin(async move { client.post(SNAPSHOT_PATH, &*body, token.as_deref()).await });
        Self {
            snapshot,
            counted,
            sent_again,
            answer,
        }
    }

    /// Not applied: its arrivals go in the next snapshot. (Its averages do not: the
    /// next window measures the levels afresh.)
    fn count_again(self) {
        for (function, requests) in self.counted {
            function.count_again(requests);
        }
    }
}

/// The snapshot in flight, taken out with its answer once that comes; never, while
/// there is none.
async fn answered(in_flight: &mut Option<SnapshotInFlight>) -> (SnapshotInFlight, Answer) {
    if let Some(snapshot) = in_flight {
        let answer = (&mut snapshot.answer).await;
        if let Some(sent) = in_flight.take() {
            return (sent, answer);
        }
    }
    std::future::pending().await
}

/// The pause before the next attempt after `failures` in a row (at least 1): 100 ms,
/// doubling up to 1.6 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100 << failures.saturating_sub(1).min(4))
}

/// Where to report after a scaler at `addr` answered `421` naming `leader`: the leader
/// it names; else, when `addr` itself came from an earlier `421`, back to the Lease's
/// (its change was already seen, and will not be signalled again); else stay, until
/// the Lease names another.
fn after_misdirected(
    leader: Option<SocketAddr>,
    addr: SocketAddr,
    following_redirect: bool,
) -> Result<(), Leave> {
    match leader.filter(|l| *l != addr) {
        Some(leader) => Err(Leave::Redirected(leader)),
        None if following_redirect => Err(Leave::LeaderChanged),
        None => Ok(()),
    }
}

/// Resolves when the Lease names another leader. Should the Lease's watch end, never:
/// the last leader known stays (a closed channel would resolve at once, forever).
async fn leader_changed(leader: &mut watch::Receiver<Option<SocketAddr>>) {
    if leader.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn kind(kind: &'static str) -> crate::metrics::KindLabels {
    crate::metrics::KindLabels { kind }
}

/// The projected ServiceAccount token. The kubelet writes a new one into the file
/// before the old one expires (at 80 % of its life), and the scaler refuses an expired
/// one (`401`): the file is read again once a minute, as client-go does, and at once
/// after a `401`.
#[derive(Debug)]
struct Token {
    path: Option<PathBuf>,
    value: Option<Arc<str>>,
    read_at: Option<Instant>,
}

impl Token {
    fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            value: None,
            read_at: None,
        }
    }

    /// The token to send now: the file's, read again when the last read is a minute
    /// old.
    fn current(&mut self) -> Option<Arc<str>> {
        let fresh = self
            .read_at
            .is_some_and(|at| at.elapsed() < TOKEN_REREAD_AFTER);
        if !fresh {
            self.read_again();
        }
        self.value.clone()
    }

    /// Reads the file now; true when the token changed. A token that cannot be read
    /// leaves the last one in use (the scaler will say whether it still holds).
    fn read_again(&mut self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        self.read_at = Some(Instant::now());
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let token = text.trim();
                if self.value.as_deref() == Some(token) {
                    return false;
                }
                if self.value.is_some() {
                    info!(path = %path.display(), "the ServiceAccount token was renewed");
                }
                self.value = Some(token.into());
                true
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the ServiceAccount token");
                false
            }
        }
    }
}

#[derive(Clone)]
struct ScalerClient {
    sender: http2::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl ScalerClient {
    /// POSTs JSON with `token` as its bearer; the status and, on a `421`, the leader
    /// it names.
    async fn post<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
        token: Option<&str>,
    ) -> anyhow::Result<(StatusCode, Option<SocketAddr>)> {
        let body = serde_json::to_vec(body)?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{path}", self.addr))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        let mut sender = self.sender.clone();
        let response = tokio::time::timeout(REQUEST_TIMEOUT, async {
            sender.ready().await?;
            sender.send_request(request).await
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer in {REQUEST_TIMEOUT:?}"))??;
        let status = response.status();
        let leader = response
            .headers()
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(leader_address);
        // Read the (small) body so the stream closes cleanly.
        let _ = response.into_body().collect().await;
        Ok((status, leader))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use hyper::{body::Incoming, service::service_fn};

    use super::*;
    use crate::{
        testing::listening,
        watch::tests::{registry, routed},
    };

    /// A stand-in scaler for one conversation: answers each report by `answer`,
    /// counting connections and pokes and keeping the snapshots it was sent. A
    /// snapshot's answer waits `snapshot_answer_after` (a scaler slow to apply it).
    #[derive(Clone, Default)]
    struct Scaler {
        connections: Arc<AtomicUsize>,
        pokes: Arc<AtomicUsize>,
        snapshots: Arc<Mutex<Vec<Snapshot>>>,
        snapshot_answer_after: Duration,
    }

    impl Scaler {
        async fn serve(
            &self,
            listener: tokio::net::TcpListener,
            answer: impl Fn(usize) -> (StatusCode, Option<SocketAddr>) + Clone + Send + 'static,
        ) {
            let scaler = self.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    scaler.connections.fetch_add(1, Ordering::SeqCst);
                    let (scaler, answer) = (scaler.clone(), answer.clone());
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (scaler, answer) = (scaler.clone(), answer.clone());
                        async move {
                            let is_snapshot = request.uri().path() == SNAPSHOT_PATH;
                            let body = request.into_body().collect().await?.to_bytes();
                            let seen = if is_snapshot {
                                let snapshot = serde_json::from_slice(&body).expect("a snapshot");
                                let mut snapshots = scaler.snapshots.lock().expect("lock");
                                snapshots.push(snapshot);
                                snapshots.len()
                            } else {
                                scaler.pokes.fetch_add(1, Ordering::SeqCst);
                                0
                            };
                            if is_snapshot {
                                tokio::time::sleep(scaler.snapshot_answer_after).await;
                            }
                            let (status, leader) = answer(seen);
                            let mut response = http::Response::builder().status(status);
                            if let Some(leader) = leader {
                                response =
                                    response.header(LEADER_HEADER, format!("scaler@{leader}"));
                            }
                            Ok::<_, hyper::Error>(
                                response.body(Full::new(Bytes::new())).expect("a response"),
                            )
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            });
        }

        fn snapshots(&self) -> Vec<Snapshot> {
            self.snapshots.lock().expect("lock").clone()
        }
    }

    /// A reporter following `leader`; the Lease's side of it and the request path's.
    fn reporter_to(
        leader: SocketAddr,
        interval: Duration,
        registry: Arc<Registry>,
    ) -> (watch::Sender<Option<SocketAddr>>, Poker) {
        let (sender, receiver) = watch::channel(Some(leader));
        let mut prometheus = prometheus_client::registry::Registry::default();
        let config = ReporterConfig {
            activator: "activator-0".into(),
            interval,
            token_file: None,
            lease: ("blink".into(), "blink-scaler".into()),
        };
        let metrics = Arc::new(Metrics::register(&mut prometheus));
        let poker = start(config, registry, metrics, receiver);
        (sender, poker)
    }

    /// Waits until `done`, failing the test after `limit`.
    async fn within(limit: Duration, what: &str, done: impl Fn() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_poke_does_not_wait_for_a_snapshot_answer() {
        let registry = Arc::new(registry());
        let web = routed(&registry, "web");
        let (listener, addr) = listening().await;
        let scaler = Scaler {
            snapshot_answer_after: Duration::from_secs(3),
            ..Scaler::default()
        };
        scaler.serve(listener, |_| (StatusCode::OK, None)).await;
        let (_leader, poker) = reporter_to(addr, Duration::from_millis(50), registry);
        within(Duration::from_secs(2), "the first snapshot", || {
            !scaler.snapshots().is_empty()
        })
        .await;
        // Its answer is 3 s away; the poke goes now.
        proxy::Poke::poke(&poker, web.key());
        within(
            Duration::from_millis(1_500),
            "the poke at the scaler",
            || scaler.pokes.load(Ordering::SeqCst) == 1,
        )
        .await;
        assert_eq!(
            scaler.snapshots().len(),
            1,
            "one snapshot at a time: the next waits for the first's answer"
        );
    }

    #[tokio::test]
    async fn arrivals_of_a_refused_snapshot_go_in_the_next() {
        let registry = Arc::new(registry());
        let web = routed(&registry, "web");
        // One arrival, held (no replica yet), then gone: the only demand there is.
        drop(web.admit(0, Instant::now()));
        let (listener, addr) = listening().await;
        let scaler = Scaler::default();
        // The first snapshot refused (an overloaded scaler), the rest applied.
        scaler
            .serve(listener, |seen| match seen {
                1 => (StatusCode::SERVICE_UNAVAILABLE, None),
                _ => (StatusCode::OK, None),
            })
            .await;
        let _reporter = reporter_to(addr, Duration::from_millis(50), registry.clone());
        let arrivals =
            |snapshot: &Snapshot| -> u64 { snapshot.functions.iter().map(|f| f.requests).sum() };
        within(Duration::from_secs(5), "three snapshots", || {
            scaler.snapshots().len() >= 3
        })
        .await;
        let snapshots = scaler.snapshots();
        assert_eq!(arrivals(&snapshots[0]), 1, "the refused one counted it");
        assert_eq!(arrivals(&snapshots[1]), 1, "and so does the next");
        assert_eq!(
            arrivals(&snapshots[2]),
            0,
            "once applied, it is not counted again"
        );
    }

    #[tokio::test]
    async fn two_scalers_naming_each_other_are_not_a_busy_loop() {
        let ((first, a), (second, b)) = (listening().await, listening().await);
        let scaler = Scaler::default();
        scaler
            .serve(first, move |_| (StatusCode::MISDIRECTED_REQUEST, Some(b)))
            .await;
        scaler
            .serve(second, move |_| (StatusCode::MISDIRECTED_REQUEST, Some(a)))
            .await;
        let _reporter = reporter_to(a, Duration::from_secs(1), Arc::new(registry()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Pauses of 0, 0, 100, 200, 400 ms: five connections in the second, the sixth
        // at 1.5 s (a loop without pauses makes hundreds).
        let connections = scaler.connections.load(Ordering::SeqCst);
        assert!(
            (3..=8).contains(&connections),
            "{connections} connections in 1 s"
        );
    }

    #[test]
    fn the_pause_doubles_up_to_a_bound() {
        let pauses: Vec<u64> = (1..=7).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 1600, 1600]);
    }

    #[test]
    fn a_421_sends_the_report_where_the_leader_is() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.244.0.1:9092".parse().expect("address"),
            "10.244.0.2:9092".parse().expect("address"),
        );
        let cases = [
            (Some(b), a, false, "redirected to b"),
            (Some(b), a, true, "redirected to b"),
            (Some(a), a, false, "stay"),
            (None, a, false, "stay"),
            // Reached through a 421, and it knows no leader: back to the Lease's.
            (None, a, true, "the Lease's"),
            (Some(a), a, true, "the Lease's"),
        ];
        for (leader, addr, following, expected) in cases {
            let outcome = match after_misdirected(leader, addr, following) {
                Err(Leave::Redirected(to)) if to == b => "redirected to b",
                Ok(()) => "stay",
                Err(Leave::LeaderChanged) => "the Lease's",
                _ => "other",
            };
            assert_eq!(
                outcome, expected,
                "{leader:?} from {addr}, following {following}"
            );
        }
    }

    #[tokio::test]
    async fn a_lease_watch_that_ends_leaves_the_last_leader() {
        let (sender, mut leader) = watch::channel(None);
        sender.send_replace(Some("10.244.0.1:9092".parse().expect("address")));
        tokio::time::timeout(Duration::from_millis(100), leader_changed(&mut leader))
            .await
            .expect("a change is told");
        drop(sender);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), leader_changed(&mut leader))
                .await
                .is_err(),
            "the end of the watch is no change of leader"
        );
        assert_eq!(
            *leader.borrow(),
            Some("10.244.0.1:9092".parse().expect("address"))
        );
    }

    #[test]
    fn the_token_is_read_again_when_renewed() {
        let dir = std::env::temp_dir().join(format!("blink-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let path = dir.join("token");
        std::fs::write(&path, "first\n").expect("token written");
        let mut token = Token::new(Some(path.clone()));
        assert_eq!(token.current().as_deref(), Some("first"));

        // Renewed by the kubelet: used once the minute is up, or at once after a 401.
        std::fs::write(&path, "second").expect("token written");
        assert_eq!(
            token.current().as_deref(),
            Some("first"),
            "read once a minute"
        );
        assert!(token.read_again(), "a new token");
        assert_eq!(token.current().as_deref(), Some("second"));
        assert!(!token.read_again(), "the same token: nothing to resend");
        // A minute on (or never read, on a machine up for less than a minute).
        token.read_at = Instant::now().checked_sub(TOKEN_REREAD_AFTER);
        std::fs::write(&path, "third").expect("token written");
        assert_eq!(
            token.current().as_deref(),
            Some("third"),
            "a minute on, read again"
        );

        // A file that cannot be read leaves the last token in use.
        std::fs::remove_file(&path).expect("token removed");
        assert!(!token.read_again());
        assert_eq!(token.current().as_deref(), Some("third"));
        let _ = std::fs::remove_dir_all(&dir);

        let mut none = Token::new(None);
        assert_eq!(none.current(), None);
        assert!(!none.read_again());
    }
}
