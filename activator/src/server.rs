//! The listener: HTTP/1.1 and h2c (prior knowledge) on one port, with upgrades, a
//! bound on open connections, timeouts against slow clients, and a graceful drain.
//!
//! - Connections past `max_connections` are accepted and answered `503` with
//!   `Retry-After`, then closed: a client learns why at once instead of waiting in the
//!   kernel's backlog.
//! - A client must send a request's head within `header_timeout` (slowloris), and a
//!   head larger than `max_header_bytes` is answered `431`. This is [`Activity`]'s
//!   watch, one timer per connection: a connection with no exchange open and none
//!   begun or ended in a whole `header_timeout` is closed, so an idle or slow client
//!   goes after between one and two `header_timeout`s. (hyper's own header timeout
//!   arms and disarms a timer for every request, a cost on the warm path.) An HTTP/1.1
//!   connection is closed then; an HTTP/2 one gets a GOAWAY first, so that a request
//!   the client sends meanwhile is either served (it crossed the GOAWAY) or refused as
//!   unprocessed (safe to retry), not lost in a reset; once nothing is open, it is
//!   closed after one more quiet `header_timeout`. HTTP/2's pings (every 20 s) find a
//!   peer that is gone; the watch frees the place of one that stays and sends nothing.
//! - Drain: stop accepting, let HTTP/1.1 connections finish their current exchange and
//!   HTTP/2 ones get a GOAWAY, let tunnels run to their end, answer everything still
//!   held a second before the grace ends; what is open when it ends is cut.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::future::Either;
use http_body::{Body, Frame, SizeHint};
use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TaskTrackerToken},
};
use tower::Service;
use tracing::{debug, info, warn};

use crate::{
    headers::ClientAddress,
    metrics::Metrics,
    proxy::{self, BodyError, Exchange, ProxyBody},
    side::{Finished, WithSide},
};

#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long a drain may take before what is still held is answered.
    pub drain_grace: Duration,
}

/// Binds with a listen backlog sized for bursts (the kernel caps it at somaxconn).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Every connection accepted takes these over.
    crate::socket::tune(&socket);
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The protocol servers, built once: HTTP/1.1 (with upgrades) and h2c. A connection
/// gets one or the other from its first bytes, so its task holds only that one's state
/// (an `auto` connection holds room for both, and a held request pays for it).
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

fn protocols(config: &ServerConfig) -> Protocols {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        // Slow heads are cut by the connection's `Activity` watch instead.
        .header_read_timeout(None)
        // A head larger than the buffer is answered 431; bodies stream through it.
        .max_buf_size(config.max_header_bytes.max(crate::config::READ_BUFFER));
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        // What a held stream may have buffered of its body, as the queue's byte bound
        // counts it (hyper's default is 1 MiB per stream).
        .initial_stream_window_size(
            u32::try_from(crate::config::read_ahead(config.max_header_bytes)).unwrap_or(u32::MAX),
        )
        .keep_alive_interval(Some(Duration::from_secs(20)));
    Protocols { http1, http2 }
}

/// The 24 bytes an HTTP/2 client with prior knowledge starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client speaks h2c: peeks (reads nothing) until its first bytes either
/// are the HTTP/2 preface or cannot become it. `None`: it sent nothing in time.
///
/// A peek leaves the bytes queued, so the socket stays readable; a client that sent
/// part of the preface (`P`, as `POST` starts) and stalled would have this loop peek
/// again at once, forever. Each peek is therefore made in `try_io`: one that finds no
/// answer yet clears the readiness it was woken for, and the next waits for new bytes.
async fn speaks_h2c(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let mut buffer = [0u8; 24];
    let peek = async {
        loop {
            stream.readable().await.ok()?;
            let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
                let n = nix::sys::socket::recv(
                    std::os::fd::AsRawFd::as_raw_fd(stream),
                    &mut buffer,
                    nix::sys::socket::MsgFlags::MSG_PEEK,
                )?;
                #[cfg(test)]
                tests::PEEKS.with(|peeks| peeks.set(peeks.get() + 1));
                match preface_so_far(&buffer[..n]) {
                    Some(answer) => Ok(answer),
                    None => Err(std::io::ErrorKind::WouldBlock.into()),
                }
            });
            match peeked {
                Ok(answer) => return answer,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
        }
    };
    tokio::time::timeout(timeout, peek).await.ok().flatten()
}

/// What a client's first bytes say: `Some(None)` it closed without a byte,
/// `Some(Some(h2c))` decided, `None` part of the preface so far (or nothing yet).
fn preface_so_far(first: &[u8]) -> Option<Option<bool>> {
    // `recv` answers 0 both for a closed connection and for an empty buffer; the
    // buffer is 24 bytes, so 0 is a close. (No bytes yet is EAGAIN, an error.)
    if first.is_empty() {
        return Some(None);
    }
    if first != &H2_PREFACE[..first.len()] {
        return Some(Some(false));
    }
    (first.len() == H2_PREFACE.len()).then_some(Some(true))
}

/// Serves `service` on `listener` until `shutdown`, then drains.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    config: ServerConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    on_drain: impl FnOnce(),
) where
    S: Service<Exchange, Response = proxy::ProxyResponse, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let protocols = Arc::new(protocols(&config));
    let open = Arc::new(Semaphore::new(config.max_connections));
    let connections = TaskTracker::new();
    // Told to every connection when the drain starts: finish the exchange in hand (a
    // GOAWAY for HTTP/2), then close.
    let closing = CancellationToken::new();
    loop {
        let (stream, client) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, mostly: pause rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = service.clone();
        metrics.connections.inc();
        let place = ConnectionPlace {
            _permit: permit,
            _drain: connections.token(),
            metrics: metrics.clone(),
        };
        let address = Arc::new(ClientAddress::new(client).holding(place));
        let (protocols, closing) = (protocols.clone(), closing.clone());
        let header_timeout = config.header_timeout;
        connections.spawn(async move {
            let result = match speaks_h2c(&stream, header_timeout).await {
                None => Ok(()),
                Some(true) => {
                    let activity = Arc::new(Activity::default());
                    let handler = watched(service, address, activity.clone());
                    // Boxed: an HTTP/2 connection's state is several times an HTTP/1.1
                    // one's, and inline every connection's task would carry it.
                    let mut connection = Box::pin(
                        protocols
                            .http2
                            .serve_connection(TokioIo::new(stream), handler),
                    );
                    let quiet = activity.quiet_for(header_timeout);
                    match until_done_or_stopped(connection.as_mut(), &closing, Some(quiet), |c| {
                        c.graceful_shutdown();
                    })
                    .await
                    {
                        Some(result) => result,
                        None => {
                            debug!(%client, "an idle HTTP/2 connection gets a GOAWAY");
                            connection.as_mut().graceful_shutdown();
                            // A request that crossed the GOAWAY may have been taken:
                            // it is served; a client that then keeps the connection
                            // open without using it is cut after one more quiet spell.
                            let quiet = activity.quiet_for(header_timeout);
                            match futures::future::select(connection, std::pin::pin!(quiet)).await {
                                Either::Left((result, _)) => result,
                                Either::Right(_) => Ok(()),
                            }
                        }
                    }
                }
                Some(false) => {
                    let activity = Arc::new(Activity::default());
                    let handler = watched(service, address, activity.clone());
                    let mut connection = std::pin::pin!(
                        protocols
                            .http1
                            .serve_connection(TokioIo::new(stream), handler)
                            .with_upgrades()
                    );
                    let quiet = activity.quiet_for(header_timeout);
                    until_done_or_stopped(connection.as_mut(), &closing, Some(quiet), |c| {
                        c.graceful_shutdown();
                    })
                    .await
                    .unwrap_or_else(|| {
                        debug!(%client, "closed a connection idle or slow to send a request");
                        Ok(())
                    })
                }
            };
            if let Err(e) = result {
                debug!(%client, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    info!(grace = ?config.drain_grace, "draining");
    closing.cancel();
    connections.close();
    // Held requests get the grace less a moment to be served; then they are answered,
    // and their connections can finish.
    let answer_held_at = config.drain_grace.saturating_sub(Duration::from_secs(1));
    let finished = connections.wait();
    tokio::pin!(finished);
    tokio::select! {
        _ = &mut finished => {
            on_drain();
            return;
        }
        _ = tokio::time::sleep(answer_held_at) => {}
    }
    on_drain();
    if tokio::time::timeout(config.drain_grace - answer_held_at, finished)
        .await
        .is_err()
    {
        info!("drain grace over with connections still open");
    }
}

/// A client connection's place under `--max-connections`, its count in the gauge, and
/// its part in what a drain waits for: given back when the connection ends, or, once
/// it became a tunnel (an upgrade), when the tunnel does. So a drain lets open tunnels
/// run to their end within the grace, as it lets exchanges finish.
struct ConnectionPlace {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _drain: TaskTrackerToken,
    metrics: Arc<Metrics>,
}

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

/// Runs a client connection to its end, unless it goes `quiet` first (`None`: closed,
/// idle or too slow sending a head). Once `closing` fires, `drain` tells it to finish
/// the exchange in hand (a GOAWAY for HTTP/2) and it runs until it has.
///
/// The quiet watch and the drain signal are polled only when they were woken
/// ([`WithSide`]), not at every wake of the connection. One await in the caller: the
/// connection's task keeps only this future's room, not its parts' beside it.
async fn until_done_or_stopped<C: Future>(
    mut connection: Pin<&mut C>,
    closing: &CancellationToken,
    quiet: Option<QuietFor<'_>>,
    drain: impl FnOnce(Pin<&mut C>),
) -> Option<C::Output> {
    let quiet = match quiet {
        Some(quiet) => Either::Left(quiet),
        None => Either::Right(std::future::pending()),
    };
    let closing = std::pin::pin!(closing.cancelled());
    match WithSide::new(connection.as_mut(), futures::future::select(quiet, closing)).await {
        Finished::Main(output) => Some(output),
        Finished::Side(Either::Left(_)) => None,
        Finished::Side(Either::Right(_)) => {
            drain(connection.as_mut());
            Some(connection.await)
        }
    }
}

/// The service of one client connection: each request an [`Exchange`], open for the
/// connection's idle watch until its response's body is done with.
fn watched<S>(
    service: S,
    address: Arc<ClientAddress>,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<Watched>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<Watched>, Infallible>> + Send + 'static,
>
where
    S: Service<Exchange, Response = proxy::ProxyResponse, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    service_fn(move |request: Request<Incoming>| {
        let exchange = OpenExchange::begin(&activity);
        let response = service
            .clone()
            .call(Exchange::new(request, address.clone()));
        async move {
            let response = response.await?;
            Ok(response.map(|body| Watched {
                body,
                _exchange: exchange,
            }))
        }
    })
}

/// What happens on one client connection, for its idle watch: exchanges begun or
/// ended, and those open. Over HTTP/1.1 only the connection's own task touches it (an
/// uncontended add per event); over HTTP/2 each stream's task does too.
#[derive(Debug, Default)]
struct Activity {
    /// Exchanges open in the low 32 bits, exchanges begun plus ended (wrapping) in the
    /// high 32: one add records an event, and one load tells whether any happened.
    state: AtomicU64,
}

/// An exchange begun: one more event, one more open.
const BEGIN: u64 = (1 << 32) + 1;
/// An exchange ended: one more event, one fewer open (the low half, at least 1, gives
/// its borrow to the carry that counts the event).
const END: u64 = (1 << 32) - 1;

impl Activity {
    /// Ready once a whole `period` passed with no exchange open and none begun or
    /// ended: the client is idle, or too slow sending a request's head.
    fn quiet_for(&self, period: Duration) -> QuietFor<'_> {
        let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        QuietFor {
            activity: self,
            checks,
            seen: self.state.load(Ordering::Relaxed),
        }
    }
}

/// See [`Activity::quiet_for`]: a check at every `period`. Written out, not an async
/// fn: it is `Unpin`, so it sits inline beside the drain signal in the connection's
/// task (see [`until_done_or_stopped`]).
#[derive(Debug)]
struct QuietFor<'a> {
    activity: &'a Activity,
    checks: tokio::time::Interval,
    /// The activity's state as of the last check.
    seen: u64,
}

impl Future for QuietFor<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            std::task::ready!(self.checks.poll_tick(cx));
            let state = self.activity.state.load(Ordering::Relaxed);
            let open = state as u32;
            if state == self.seen && open == 0 {
                return Poll::Ready(());
            }
            self.seen = state;
        }
    }
}

/// One exchange of a connection, from its head until its response's body is done
/// with (written or dropped).
#[derive(Debug)]
struct OpenExchange(Arc<Activity>);

impl OpenExchange {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.state.fetch_add(BEGIN, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for OpenExchange {
    fn drop(&mut self) {
        self.0.state.fetch_add(END, Ordering::Relaxed);
    }
}

/// A response body that keeps its exchange open while it lives.
#[derive(Debug)]
struct Watched {
    body: ProxyBody,
    /// Held for its drop.
    _exchange: OpenExchange,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection over the bound: one `503` and close.
async fn refuse(stream: TcpStream) {
    let service = service_fn(|_request: Request<Incoming>| async {
        let mut response = proxy::unavailable(
            "the activator has too many open connections; retry shortly",
            1,
        );
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        Ok::<_, Infallible>(response.map(|b: ProxyBody| b))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .serve_connection(TokioIo::new(stream), service);
    let _ = connection.await;
}

#[cfg(test)]
mod tests {
    use tokio::time::{Instant, advance, sleep, timeout};

    use super::*;

    const PERIOD: Duration = Duration::from_secs(10);

    thread_local! {
        /// `speaks_h2c`'s peeks on this thread (each test has its own runtime thread).
        pub(super) static PEEKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A client connected to a listener, and the server's side of it.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let client = TcpStream::connect(listener.local_addr().expect("its address"));
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.expect("connected"), accepted.expect("accepted").0)
    }

    #[tokio::test]
    async fn the_first_bytes_tell_h2c_from_http1() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = connected().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("sent");
        assert_eq!(speaks_h2c(&server, PERIOD).await, Some(false));

        let (mut client, server) = connected().await;
        client.write_all(H2_PREFACE).await.expect("sent");
        assert_eq!(speaks_h2c(&server, PERIOD).await, Some(true));

        let (client, server) = connected().await;
        drop(client);
        assert_eq!(speaks_h2c(&server, PERIOD).await, None, "closed");

        let (_client, server) = connected().await;
        let silent = speaks_h2c(&server, Duration::from_millis(50)).await;
        assert_eq!(silent, None, "nothing sent in time");
    }

    #[tokio::test]
    async fn a_client_stalled_inside_the_preface_is_waited_for_not_polled() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = connected().await;
        // `P` may begin `POST` or the preface: no answer until more comes.
        client.write_all(b"P").await.expect("sent");
        let rest = async {
            sleep(Duration::from_millis(300)).await;
            client.write_all(&H2_PREFACE[1..]).await.expect("sent");
        };
        PEEKS.with(|peeks| peeks.set(0));
        let (answer, ()) = tokio::join!(speaks_h2c(&server, PERIOD), rest);
        assert_eq!(answer, Some(true));
        // One peek for `P`, one (or two, should the rest come in parts) after it.
        let peeks = PEEKS.with(std::cell::Cell::get);
        assert!(
            peeks <= 4,
            "{peeks} peeks while the client stalled for 300 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_does_nothing_is_quiet_after_one_period() {
        let activity = Activity::default();
        let started = Instant::now();
        activity.quiet_for(PERIOD).await;
        assert_eq!(started.elapsed(), PERIOD);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_exchange_is_never_quiet_and_its_end_gives_a_whole_period() {
        let activity = Arc::new(Activity::default());
        let exchange = OpenExchange::begin(&activity);
        let watch = activity.quiet_for(PERIOD);
        tokio::pin!(watch);
        // A long upload or download: many periods with the exchange open.
        assert!(timeout(PERIOD * 10, watch.as_mut()).await.is_err());
        // It ends just before a check: that check sees the end, so the connection
        // gets at least a whole period of idleness before it is closed.
        advance(PERIOD - Duration::from_millis(100)).await;
        drop(exchange);
        let ended = Instant::now();
        watch.await;
        assert!(
            ended.elapsed() >= PERIOD,
            "closed {:?} after",
            ended.elapsed()
        );
        assert!(
            ended.elapsed() < 2 * PERIOD,
            "closed {:?} after",
            ended.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn overlapping_exchanges_keep_the_connection_until_the_last_ends() {
        let activity = Arc::new(Activity::default());
        let first = OpenExchange::begin(&activity);
        let second = OpenExchange::begin(&activity);
        drop(first);
        let watch = activity.quiet_for(PERIOD);
        tokio::pin!(watch);
        assert!(timeout(PERIOD * 5, watch.as_mut()).await.is_err());
        let third = OpenExchange::begin(&activity);
        drop(second);
        assert!(timeout(PERIOD * 5, watch.as_mut()).await.is_err());
        drop(third);
        assert_eq!(activity.state.load(Ordering::Relaxed) as u32, 0);
        // Ended between checks: the next check sees the event, the one after it quiet.
        assert!(timeout(PERIOD * 3, watch.as_mut()).await.is_ok());
    }

    /// An h2c connection with prior knowledge to `addr`, and its task.
    async fn h2c(
        addr: SocketAddr,
    ) -> (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ) {
        let stream = TcpStream::connect(addr).await.expect("connected");
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2c handshake");
        (sender, tokio::spawn(connection))
    }

    /// `serve` on a port of its own, with `header_timeout`, 16 KiB heads at most and a
    /// 2 s drain grace: its address, its task, and what stops it.
    fn serving<S>(
        service: S,
        header_timeout: Duration,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>, CancellationToken)
    where
        S: Service<Exchange, Response = proxy::ProxyResponse, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let listener = bind("127.0.0.1:0".parse().expect("address"), 16).expect("bound");
        let addr = listener.local_addr().expect("address");
        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::register(&mut prometheus));
        let config = ServerConfig {
            max_connections: 10,
            header_timeout,
            max_header_bytes: 16 * 1024,
            drain_grace: Duration::from_secs(2),
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            service,
            config,
            metrics,
            shutdown.clone(),
            || {},
        ));
        (addr, server, shutdown)
    }

    #[tokio::test]
    async fn a_held_h2c_stream_takes_in_no_more_body_than_the_read_ahead() {
        // A function at zero: each request is held, its body left unread.
        let service = tower::service_fn(|_: Exchange| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(proxy::answer(http::StatusCode::OK, "never"))
        });
        let (addr, _server, _shutdown) = serving(service, Duration::from_secs(10));

        let stream = TcpStream::connect(addr).await.expect("connected");
        let (client, connection) = h2::client::handshake(stream).await.expect("handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("ready");
        let request = Request::post("http://f.example/up")
            .body(())
            .expect("request");
        let (_response, mut body) = client.send_request(request, false).expect("sent");
        // A 1 MiB upload: sent as fast as the windows let it, until they stay shut.
        let mut sent = 0;
        body.reserve_capacity(1 << 20);
        while let Ok(Some(Ok(room))) = timeout(
            Duration::from_millis(300),
            std::future::poll_fn(|cx| body.poll_capacity(cx)),
        )
        .await
        {
            body.send_data(Bytes::from(vec![7u8; room]), false)
                .expect("sent");
            sent += room;
            body.reserve_capacity((1 << 20) - sent);
        }
        let read_ahead = crate::config::read_ahead(16 * 1024);
        assert!(
            sent > 0 && sent <= read_ahead,
            "{sent} bytes taken in for a held request (read ahead {read_ahead})"
        );
    }

    #[tokio::test]
    async fn an_idle_http2_connection_gets_a_goaway_and_a_busy_one_stays() {
        let service = tower::service_fn(|_: Exchange| async {
            Ok::<_, Infallible>(proxy::answer(http::StatusCode::OK, "ok"))
        });
        // Wide enough that a stall of a loaded machine does not make the busy one quiet.
        let period = Duration::from_millis(500);
        let (addr, server, shutdown) = serving(service, period);

        let (mut idle, idle_connection) = h2c(addr).await;
        let (mut busy, busy_connection) = h2c(addr).await;
        // Four periods with a request every tenth of one, nothing on the other.
        for _ in 0..40 {
            let request = Request::get("http://f.example/")
                .body(http_body_util::Empty::new())
                .expect("request");
            let response = busy.send_request(request).await.expect("answered");
            assert_eq!(response.status(), http::StatusCode::OK);
            sleep(period / 10).await;
        }
        assert!(
            !busy_connection.is_finished(),
            "a connection in use was closed"
        );
        let ended = timeout(Duration::from_secs(5), idle_connection)
            .await
            .expect("the idle connection was closed")
            .expect("its task ran");
        assert!(ended.is_ok(), "closed cleanly, after a GOAWAY: {ended:?}");
        let request = Request::get("http://f.example/")
            .body(http_body_util::Empty::new())
            .expect("request");
        assert!(
            idle.send_request(request).await.is_err(),
            "the idle connection takes no more requests"
        );
        shutdown.cancel();
        drop(busy);
        timeout(Duration::from_secs(5), server)
            .await
            .expect("drained")
            .expect("the server ran");
    }

    /// A server whose exchanges each send their client address to the test, and one
    /// exchange on it, answered: the test then holds the address as a tunnel does (the
    /// connection's place lives in it), after the connection closed.
    async fn an_exchange_kept_as_a_tunnel() -> (
        Arc<ClientAddress>,
        tokio::task::JoinHandle<()>,
        CancellationToken,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (kept_tx, mut kept) = tokio::sync::mpsc::unbounded_channel();
        let service = tower::service_fn(move |exchange: Exchange| {
            let _ = kept_tx.send(exchange.client.clone());
            async { Ok::<_, Infallible>(proxy::answer(http::StatusCode::OK, "ok")) }
        });
        let (addr, server, shutdown) = serving(service, Duration::from_secs(10));
        let mut stream = TcpStream::connect(addr).await.expect("connected");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: f.example\r\nConnection: close\r\n\r\n")
            .await
            .expect("sent");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("answered");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        let tunnel = kept.recv().await.expect("the exchange's client");
        (tunnel, server, shutdown)
    }

    #[tokio::test]
    async fn a_drain_waits_for_a_tunnel_within_the_grace() {
        let (tunnel, server, shutdown) = an_exchange_kept_as_a_tunnel().await;
        shutdown.cancel();
        sleep(Duration::from_millis(300)).await;
        assert!(!server.is_finished(), "the drain ended with a tunnel open");
        drop(tunnel);
        timeout(Duration::from_millis(500), server)
            .await
            .expect("drained once the tunnel ended")
            .expect("the server ran");

        // A tunnel that outlives the grace (2 s here) does not hold the drain longer.
        let (_tunnel, server, shutdown) = an_exchange_kept_as_a_tunnel().await;
        shutdown.cancel();
        timeout(Duration::from_secs(5), server)
            .await
            .expect("the grace bounds the drain")
            .expect("the server ran");
    }

    #[tokio::test(start_paused = true)]
    async fn exchanges_in_every_period_keep_the_connection() {
        let activity = Arc::new(Activity::default());
        let client = {
            let activity = activity.clone();
            async move {
                for _ in 0..20 {
                    drop(OpenExchange::begin(&activity));
                    sleep(PERIOD / 2).await;
                }
            }
        };
        tokio::select! {
            () = activity.quiet_for(PERIOD) => panic!("closed while the client kept sending"),
            () = client => {}
        }
    }
}
