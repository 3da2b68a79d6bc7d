//! Connections to one replica, kept alive and reused, and bounded.
//!
//! Connecting is a step of its own, before anything of the request is sent: a replica
//! that refuses or resets the connection (just becoming ready, or just gone) costs the
//! request nothing, and the caller may try another replica with the same, unread body.
//!
//! HTTP/1.1 (spoken by [`crate::http1`], in the request's own task): a stack of idle
//! connections (the most recent first, so a burst's extra
//! connections go idle and close on the replica's side) and at most
//! `max_connections` open at once; a request that finds none idle and none left to
//! open waits for one to come back. h2c: one multiplexed connection, replaced when it
//! closes.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::TcpStream,
    sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot},
};

pub use crate::http1::Http1Connection;

/// The body of a request as the activator forwards it over h2c: the client's,
/// streamed, telling when the h2 client has taken all of it. The replica's time to
/// begin its answer runs from then, as it does over HTTP/1.1 from the last write (see
/// [`Http1Connection::send`]). Taken is not yet sent: the last frame may wait for the
/// replica's flow-control window, as HTTP/1.1's last bytes may wait in the socket's
/// send buffer. A client that pauses longer than the body timeout ends it with
/// [`BodyStalled`]; a replica whose window takes nothing for its `responseTimeout` is
/// found by the [`BodyWatch`].
#[derive(Debug)]
pub struct UpstreamBody<B = Incoming> {
    inner: B,
    /// Dropped once the body's last frame has been taken (or the body is dropped);
    /// sent [`BodyStalled`] when the client paused too long.
    all_taken: Option<oneshot::Sender<BodyStalled>>,
    /// The longest pause the client may make, and, while it is awaited, when it ends.
    /// Boxed and made at the first pause: a body that comes in one piece needs none.
    pause_limit: Duration,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// What the exchange watches while the body goes out (none for an empty body).
    progress: Option<Arc<BodyProgress>>,
}

/// How far an h2c request body has gone: parts taken by the h2 client, and whether it
/// is waiting on the client for the next. The h2 client takes a part only when the
/// replica's flow-control window has room for it.
#[derive(Debug, Default)]
struct BodyProgress {
    parts: AtomicU64,
    awaiting_client: AtomicBool,
}

/// Watches an h2c request body go out, for the exchange.
#[derive(Debug)]
pub struct BodyWatch {
    taken: oneshot::Receiver<BodyStalled>,
    progress: Arc<BodyProgress>,
}

/// How an h2c request body's sending ended.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyEnd {
    /// All of it taken (or the body dropped).
    Taken,
    /// The client paused this long.
    ClientStalled(Duration),
    /// The replica's window took no part for this long while the client had one
    /// ready: the replica stopped reading.
    NotTaken(Duration),
}

impl BodyWatch {
    /// Resolves when the body is all taken, the client paused too long, or the
    /// replica took nothing for `limit` (the replica's `responseTimeout`, as each
    /// write of an HTTP/1.1 body has) while the client had a part ready.
    pub async fn end(mut self, limit: Duration) -> BodyEnd {
        let mut seen = self.progress.parts.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                told = &mut self.taken => {
                    return match told {
                        Ok(BodyStalled(pause)) => BodyEnd::ClientStalled(pause),
                        Err(_) => BodyEnd::Taken,
                    };
                }
                () = tokio::time::sleep(limit) => {
                    // The flag first: a part taken just now is counted before the
                    // flag it clears is seen (see `poll_frame`).
                    let awaiting_client = self.progress.awaiting_client.load(Ordering::Acquire);
                    let parts = self.progress.parts.load(Ordering::Relaxed);
                    if parts == seen && !awaiting_client {
                        return BodyEnd::NotTaken(limit);
                    }
                    seen = parts;
                }
            }
        }
    }
}

/// The client paused too long while sending a request body (this long).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the client sent no part of the request body for {0:?}")]
pub struct BodyStalled(pub Duration);

impl<B: Body> UpstreamBody<B> {
    /// `body`, and its watch; `None` for a body that is empty from the start.
    pub fn watched(body: B, pause_limit: Duration) -> (Self, Option<BodyWatch>) {
        let (all_taken, progress, watch) = if body.is_end_stream() {
            (None, None, None)
        } else {
            let (all_taken, taken) = oneshot::channel();
            let progress = Arc::new(BodyProgress::default());
            let watch = BodyWatch {
                taken,
                progress: progress.clone(),
            };
            (Some(all_taken), Some(progress), Some(watch))
        };
        let body = Self {
            inner: body,
            all_taken,
            pause_limit,
            pause: None,
            progress,
        };
        (body, watch)
    }

    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for UpstreamBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(progress) = &this.progress {
            if polled.is_ready() {
                progress.parts.fetch_add(1, Ordering::Relaxed);
            }
            progress
                .awaiting_client
                .store(polled.is_pending(), Ordering::Release);
        }
        let Poll::Ready(frame) = polled else {
            // Timed only until the replica's answer begins (the exchange stops waiting
            // for the body then): a stream both ways, as gRPC's, may be quiet on the
            // client's side for as long as it likes while the replica answers.
            if this.all_taken.as_ref().is_none_or(|all| all.is_closed()) {
                return Poll::Pending;
            }
            let limit = this.pause_limit;
            let pause = this
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
            if pause.as_mut().poll(cx).is_ready() {
                // Told before the error: the h2 client resets the stream for it, and
                // the exchange answers the client by what it was told.
                if let Some(all_taken) = this.all_taken.take() {
                    let _ = all_taken.send(BodyStalled(limit));
                }
                return Poll::Ready(Some(Err(BodyStalled(limit).into())));
            }
            return Poll::Pending;
        };
        // A part came: the next pause is timed afresh.
        if let Some(pause) = this.pause.as_mut() {
            pause
                .as_mut()
                .reset(tokio::time::Instant::now() + this.pause_limit);
        }
        if frame.is_none() || this.inner.is_end_stream() {
            this.all_taken = None;
        }
        Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the activator speaks to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (the Service port's `appProtocol` is
    /// `kubernetes.io/h2c`).
    H2c,
}

/// Why no connection could be had. Every case happened before any byte of the request
/// was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: no answer in {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// Every connection the replica may have was in use until the deadline: the
    /// replica is busy, not failing.
    #[error(
        "no connection to {addr} came free in time (each of its --max-upstream-connections was in use)"
    )]
    NoneFree { addr: SocketAddr },
}

/// How often an h2c connection to a replica is pinged, and how long an answer may take
/// before the connection is given up.
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    pub max_connections: usize,
    pub connect_timeout: Duration,
}

/// A connection ready for one request.
#[derive(Debug)]
pub enum Connection {
    Http1(Http1Connection),
    H2(http2::SendRequest<UpstreamBody>),
}

/// One replica's connections.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    protocol: Protocol,
    config: PoolConfig,
    /// Connections open now (the function's gauge, shared by its replicas).
    open_gauge: prometheus_client::metrics::gauge::Gauge,
    idle: Mutex<Vec<Http1Connection>>,
    /// Permits to open HTTP/1.1 connections; a connection holds one while it lives.
    open: Arc<Semaphore>,
    returned: Notify,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<UpstreamBody>>>,
}

impl Upstream {
    pub fn new(
        addr: SocketAddr,
        protocol: Protocol,
        config: PoolConfig,
        open_gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        Self {
            addr,
            protocol,
            config,
            open_gauge,
            idle: Mutex::new(Vec::new()),
            open: Arc::new(Semaphore::new(config.max_connections.max(1))),
            returned: Notify::new(),
            h2: tokio::sync::Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// A connection ready to take a request: an idle one, a new one, or (at the bound)
    /// the next one given back.
    pub async fn checkout(&self) -> Result<Connection, ConnectError> {
        self.checkout_before(None).await
    }

    /// The same, waiting for one given back no later than `deadline` (a connect
    /// begun before it has its own timeout).
    pub async fn checkout_before(
        &self,
        deadline: Option<std::time::Instant>,
    ) -> Result<Connection, ConnectError> {
        match self.protocol {
            Protocol::Http1 => self.checkout_http1(deadline).await.map(Connection::Http1),
            Protocol::H2c => self.checkout_h2().await.map(Connection::H2),
        }
    }

    /// A connection ready now, without waiting: an idle HTTP/1.1 one, or the h2c one
    /// when it is open and not being replaced. The warm path's checkout.
    pub fn checkout_ready(&self) -> Option<Connection> {
        match self.protocol {
            Protocol::Http1 => self.idle_http1().map(Connection::Http1),
            Protocol::H2c => {
                let shared = self.h2.try_lock().ok()?;
                let sender = shared.as_ref().filter(|s| !s.is_closed())?;
                Some(Connection::H2(sender.clone()))
            }
        }
    }

    async fn checkout_http1(
        &self,
        deadline: Option<std::time::Instant>,
    ) -> Result<Http1Connection, ConnectError> {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(until_deadline);
        loop {
            if let Some(idle) = self.idle_http1() {
                return Ok(idle);
            }
            let returned = self.returned.notified();
            tokio::pin!(returned);
            // Registered before the permit check, so a connection given back in
            // between is not missed.
            returned.as_mut().enable();
            if let Ok(permit) = self.open.clone().try_acquire_owned() {
                return self.connect_http1(permit).await;
            }
            tokio::select! {
                permit = self.open.clone().acquire_owned() => {
                    if let Ok(permit) = permit {
                        return self.connect_http1(permit).await;
                    }
                }
                _ = returned => {}
                () = &mut until_deadline => return Err(ConnectError::NoneFree { addr: self.addr }),
            }
        }
    }

    /// The most recent idle connection still open; an idle connection the replica
    /// closed is dropped here, not met mid-request.
    fn idle_http1(&self) -> Option<Http1Connection> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(connection) = idle.pop() {
            if connection.still_open() {
                return Some(connection);
            }
        }
        None
    }

    /// Back to the pool, after its response was read to the end.
    pub fn give_back(&self, connection: Http1Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(connection.reused());
        }
        self.returned.notify_one();
    }

    async fn connect_http1(
        &self,
        permit: OwnedSemaphorePermit,
    ) -> Result<Http1Connection, ConnectError> {
        let io = self.connect_tcp().await?;
        Ok(Http1Connection::new(io, permit, self.open_gauge.clone()))
    }

    async fn checkout_h2(&self) -> Result<http2::SendRequest<UpstreamBody>, ConnectError> {
        let mut shared = self.h2.lock().await;
        if let Some(sender) = shared.as_ref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let io = TokioIo::new(self.connect_tcp().await?);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // A replica whose node is gone sends no reset: without pings, requests
            // would go to the dead connection and wait out their timeout, and bodies
            // streaming from it would hang with their slots.
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: self.addr,
                source,
            })?;
        self.drive(connection);
        *shared = Some(sender.clone());
        Ok(sender)
    }

    /// Runs an h2c connection until it closes, counted in the gauge meanwhile. Its
    /// errors end it; the request that meets them reports them.
    fn drive<E>(
        &self,
        connection: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let open = self.open_gauge.clone();
        open.inc();
        tokio::spawn(async move {
            let _ = connection.await;
            open.dec();
        });
    }

    async fn connect_tcp(&self) -> Result<TcpStream, ConnectError> {
        let timeout = self.config.connect_timeout;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout {
                addr: self.addr,
                timeout,
            })?
            .map_err(|source| ConnectError::Io {
                addr: self.addr,
                source,
            })?;
        crate::socket::tune(&stream);
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    /// A client that sent nothing of its body, and sends nothing more.
    fn silent() -> http_body_util::StreamBody<
        futures::stream::Pending<Result<Frame<Bytes>, std::convert::Infallible>>,
    > {
        http_body_util::StreamBody::new(futures::stream::pending())
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_silent_while_its_body_is_awaited_is_given_up() {
        let limit = Duration::from_secs(60);
        let (mut body, taken) = UpstreamBody::watched(silent(), limit);
        let started = tokio::time::Instant::now();
        let error = body.frame().await.expect("a frame").expect_err("given up");
        assert!(
            error.to_string().contains("no part of the request body"),
            "{error}"
        );
        assert_eq!(started.elapsed(), limit);
        let told = taken.expect("a body to wait for").end(limit * 10).await;
        assert_eq!(told, BodyEnd::ClientStalled(limit));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_whose_window_stays_shut_is_given_up() {
        let limit = Duration::from_secs(5);
        let parts = (0..3).map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::new())));
        let client = http_body_util::StreamBody::new(futures::stream::iter(parts));
        let (mut body, watch) = UpstreamBody::watched(client, Duration::from_secs(60));
        // The h2 client takes one part, then no more: no room in the window.
        body.frame().await.expect("a part").expect("data");
        let started = tokio::time::Instant::now();
        let end = watch.expect("a body to watch").end(limit).await;
        assert_eq!(end, BodyEnd::NotTaken(limit));
        assert_eq!(started.elapsed(), limit);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_is_not_the_replicas_fault() {
        let (mut body, watch) = UpstreamBody::watched(silent(), Duration::from_secs(60));
        // Asked for a part the client has not sent.
        assert!(futures::poll!(std::pin::pin!(body.frame())).is_pending());
        let end = tokio::time::timeout(
            Duration::from_secs(30),
            watch.expect("watch").end(Duration::from_secs(5)),
        )
        .await;
        assert!(end.is_err(), "given up on the replica: {end:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn once_the_answer_began_a_silent_client_is_not_timed() {
        // A stream both ways (gRPC's): the replica answered, the client is quiet.
        let limit = Duration::from_secs(60);
        let (mut body, taken) = UpstreamBody::watched(silent(), limit);
        drop(taken);
        let frame = tokio::time::timeout(limit * 10, body.frame()).await;
        assert!(frame.is_err(), "still waiting for the client: {frame:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2c_replica_that_stops_answering_is_given_up() {
        let (listener, addr) = crate::testing::listening().await;
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accepted");
            // The handshake, then nothing: pings go unanswered, as from a replica
            // whose node is gone.
            let _connection = h2::server::handshake(stream).await.expect("handshake");
            std::future::pending::<()>().await;
        });
        let config = PoolConfig {
            max_connections: 1,
            connect_timeout: Duration::from_secs(1),
        };
        let upstream = Upstream::new(addr, Protocol::H2c, config, Default::default());
        let Ok(Connection::H2(sender)) = upstream.checkout().await else {
            panic!("an h2c connection");
        };
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(300), async {
            while !sender.is_closed() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the connection is closed once a ping goes unanswered");
        assert!(started.elapsed() <= H2_PING_INTERVAL + H2_PING_TIMEOUT + Duration::from_secs(1));
        assert!(upstream.checkout_ready().is_none(), "not used again");
    }
}
