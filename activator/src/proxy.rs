//! The request path, as tower layers, outermost first:
//!
//! 1. [`Route`] — Host (and path) → function, from the routing table; an unknown or
//!    ambiguous host is answered 404 with a body that says which. Before it, what no
//!    function could be sent as it is: no host or two `Host` fields, userinfo in the
//!    target, a body chunked twice (400); `CONNECT`, a transfer coding besides chunked
//!    (501).
//! 2. [`Observe`] — counts the answer by code and times it, per function.
//! 3. [`Hold`] — admission: a replica with room at once, or a place in the function's
//!    queue until one is ready (the scaler is poked when none is), or the precise
//!    refusal: 503 + `Retry-After` for a full queue, 503 with the reason when the
//!    function cannot wake, 504 when the wait passes the function's timeout.
//! 4. [`Balance`] — a connection to the chosen replica; one that refuses or resets
//!    the connection (just becoming ready, or just gone) sits out until its probe
//!    connects, and the request goes to another replica or back to the front of the
//!    queue, for as long as it may wait (the function's `waitTimeout`), then 502 (504
//!    when the replica was busy: every one of its connections in use).
//!    Nothing of the request has been sent yet, so its body is never needed twice.
//! 5. [`Forward`] — sends the request with proxy headers, streams both bodies, keeps
//!    the connection for reuse once the response is read, and tunnels upgrades. A
//!    replica that has the whole request and does not begin its answer within the
//!    function's `responseTimeout` is given up: 504, and the request is not resent.
//!    So is one that takes none of the request body for that long (over h2c: its
//!    flow-control window stays shut, found within two such times), and a client that
//!    pauses its body longer than `--body-timeout` before the answer begins is
//!    answered 408. Upgrades need an HTTP/1.1 replica (501 otherwise).
//!
//! Every layer answers errors itself (the services are infallible) and is always
//! ready: there is no backpressure through `poll_ready`, since admission is [`Hold`]'s.

use std::{
    convert::Infallible,
    future::{Future, Ready},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::Either;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::{Layer, Service};
use tracing::warn;

use crate::{
    function::{Admission, Function, Refusal, Ticket},
    headers,
    hold::held_body_bytes,
    http1,
    metrics::Metrics,
    pool::{BodyEnd, ConnectError, Connection, Protocol, UpstreamBody},
    registry::Registry,
    routes::Miss,
};

/// A request on its way through the layers, with what each layer found out.
#[derive(Debug)]
pub struct Exchange {
    pub request: Request<Incoming>,
    pub client: Arc<headers::ClientAddress>,
    /// When the request's head was read: its wait for a replica, connecting included,
    /// is bounded by the function's `waitTimeout` from here.
    arrived: Instant,
    /// What it may hold of its body while it waits (see [`held_body_bytes`]).
    held_body_bytes: u64,
    /// It waited in the queue for a replica.
    held: bool,
    function: Option<Arc<Function>>,
    ticket: Option<Ticket>,
    connection: Option<Connection>,
}

impl Exchange {
    pub fn new(request: Request<Incoming>, client: Arc<headers::ClientAddress>) -> Self {
        Self {
            request,
            client,
            arrived: Instant::now(),
            held_body_bytes: 0,
            held: false,
            function: None,
            ticket: None,
            connection: None,
        }
    }
}

pub type ProxyResponse = Response<ProxyBody>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<ProxyResponse, Infallible>> + Send>>;

/// Tells the scaler, at once, that a request waits for a function with no replica.
pub trait Poke: Send + Sync + std::fmt::Debug + 'static {
    fn poke(&self, function: &blink_crds::FunctionKey);
}

/// Knobs of the request path.
#[derive(Debug, Clone, Copy)]
pub struct PathConfig {
    /// What a held request may have taken in of its body ([`crate::config::read_ahead`]).
    pub read_ahead: usize,
    /// The longest pause a client may make while sending a forwarded request body.
    pub body_timeout: Duration,
}

/// An answer the activator makes itself.
pub fn answer(status: StatusCode, message: impl Into<String>) -> ProxyResponse {
    let mut body = message.into();
    body.push('\n');
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// 503 with `Retry-After`: try again shortly.
pub fn unavailable(message: impl Into<String>, retry_after_seconds: u32) -> ProxyResponse {
    let mut response = answer(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
    response
}

fn boxed_now(response: ProxyResponse) -> BoxFuture {
    Box::pin(std::future::ready(Ok(response)))
}

/// The whole path: route → observe → hold → balance → forward.
pub fn service(
    registry: Arc<Registry>,
    poke: Arc<dyn Poke>,
    metrics: Arc<Metrics>,
    config: PathConfig,
) -> Route<Observe<Hold<Balance<Forward>>>> {
    tower::ServiceBuilder::new()
        .layer(RouteLayer { registry })
        .layer(ObserveLayer)
        .layer(HoldLayer { poke, config })
        .layer(BalanceLayer {
            metrics: metrics.clone(),
        })
        .service(Forward {
            metrics,
            body_timeout: config.body_timeout,
        })
}

// ---- 1. Route -------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct RouteLayer {
    registry: Arc<Registry>,
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            inner,
            registry: self.registry.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Route<S> {
    inner: S,
    registry: Arc<Registry>,
}

/// The future of the first two layers: not boxed, since every request has one (the
/// ones after them box theirs, and only when they must wait).
pub type Answered<F> = Either<Ready<Result<ProxyResponse, Infallible>>, F>;

impl<S> Service<Exchange> for Route<S>
where
    S: Service<Exchange, Response = ProxyResponse, Error = Infallible>,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Answered<S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut exchange: Exchange) -> Self::Future {
        let request = &exchange.request;
        if let Some(refusal) = unservable(request) {
            return Either::Left(ready_now(refusal));
        }
        let host = match headers::request_host(request.uri(), request.headers()) {
            Ok(host) => host,
            Err(no_host) => {
                return Either::Left(ready_now(answer(
                    StatusCode::BAD_REQUEST,
                    no_host.to_string(),
                )));
            }
        };
        let table = self.registry.table();
        match table.lookup(host, request.uri().path()) {
            Ok(function) => {
                exchange.function = Some(function.clone());
                Either::Right(self.inner.call(exchange))
            }
            // Routes nothing until a person settles the conflict.
            Err(Miss::Conflicted(reason)) => Either::Left(ready_now(unavailable(
                format!("host {host:?} is not routed: {reason}"),
                10,
            ))),
            Err(miss) => Either::Left(ready_now(answer(
                StatusCode::NOT_FOUND,
                describe_miss(host, miss),
            ))),
        }
    }
}

/// A request no function could be sent as it is, answered before routing: `CONNECT`
/// (the activator is no forward proxy, and a tunnel's framing is not a response's), and
/// a body in a transfer coding other than chunked (it goes to the replica framed anew,
/// which would lose the coding).
fn unservable<B: Body>(request: &Request<B>) -> Option<ProxyResponse> {
    if request.method() == Method::CONNECT {
        return Some(answer(
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not served: this is a reverse proxy for functions",
        ));
    }
    // A body of known length (none, or `Content-Length`) was not sent chunked: no
    // look-up for the field then, on the path of nearly every request.
    if request.body().size_hint().exact().is_some()
        || !request.headers().contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    // hyper's server has refused a body whose last coding is not chunked and takes
    // one layer of chunks off; the body goes to the replica framed anew.
    let codings = headers::transfer_codings(request.headers());
    if let Some(coding) = codings.other {
        return Some(answer(
            StatusCode::NOT_IMPLEMENTED,
            format!("transfer coding {coding:?} is not supported; only chunked is"),
        ));
    }
    (codings.chunked > 1).then(|| {
        answer(
            StatusCode::BAD_REQUEST,
            "the body is chunked twice (Transfer-Encoding names chunked more than once)",
        )
    })
}

fn ready_now(response: ProxyResponse) -> Ready<Result<ProxyResponse, Infallible>> {
    std::future::ready(Ok(response))
}

fn describe_miss(host: &str, miss: Miss) -> String {
    match miss {
        Miss::UnknownHost => format!("no function is routed for host {host:?}"),
        Miss::Conflicted(reason) => format!("host {host:?} is not routed: {reason}"),
        Miss::NoPrefix => format!("host {host:?} is routed, but no path prefix of it matches"),
        Miss::Ambiguous(a) => {
            let namespaces: Vec<String> = a.namespaces.into_iter().collect();
            format!(
                "host {host:?} is ambiguous: functions in namespaces {} have a Service of that name; use {host}.<namespace>",
                namespaces.join(", ")
            )
        }
    }
}

// ---- 2. Observe -----------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
}

impl<S> Service<Exchange> for Observe<S>
where
    S: Service<Exchange, Response = ProxyResponse, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, exchange: Exchange) -> Observed<S::Future> {
        let function = exchange.function.clone();
        let started = exchange.arrived;
        Observed {
            inner: self.inner.call(exchange),
            function,
            started,
        }
    }
}

/// A routed request's response, counted by status and timed when it comes.
#[derive(Debug)]
pub struct Observed<F> {
    inner: F,
    function: Option<Arc<Function>>,
    started: Instant,
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<ProxyResponse, Infallible>> + Unpin,
{
    type Output = Result<ProxyResponse, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(Pin::new(&mut self.inner).poll(cx));
        if let (Ok(response), Some(function)) = (&response, &self.function) {
            function
                .metrics()
                .answered(response.status(), self.started.elapsed());
        }
        Poll::Ready(response)
    }
}

// ---- 3. Hold --------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct HoldLayer {
    poke: Arc<dyn Poke>,
    config: PathConfig,
}

impl<S> Layer<S> for HoldLayer {
    type Service = Hold<S>;
    fn layer(&self, inner: S) -> Hold<S> {
        Hold {
            inner,
            poke: self.poke.clone(),
            config: self.config,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Hold<S> {
    inner: S,
    poke: Arc<dyn Poke>,
    config: PathConfig,
}

impl<S> Service<Exchange> for Hold<S>
where
    S: Service<Exchange, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut exchange: Exchange) -> BoxFuture {
        let Some(function) = exchange.function.clone() else {
            return boxed_now(answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                "unrouted request",
            ));
        };
        let content_length = exchange
            .request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .or_else(|| exchange.request.body().is_end_stream().then_some(0));
        let body_bytes = held_body_bytes(content_length, self.config.read_ahead);
        exchange.held_body_bytes = body_bytes;
        let waiting = match function.admit(body_bytes, exchange.arrived) {
            Ok(Admission::Ready(ticket)) => {
                exchange.ticket = Some(ticket);
                return self.inner.call(exchange);
            }
            Ok(Admission::Wait(waiting)) => waiting,
            Err(refusal) => return boxed_now(refused(&function, refusal)),
        };
        if waiting.at_zero {
            self.poke.poke(function.key());
        }
        headers::detach_from_read_buffer(&mut exchange.request);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let timeout = function.settings().wait_timeout;
            let started = exchange.arrived;
            let ticket = match tokio::time::timeout(timeout, waiting.ticket()).await {
                Ok(Ok(ticket)) => ticket,
                Ok(Err(refusal)) => return Ok(refused(&function, refusal)),
                Err(_) => {
                    return Ok(answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "no replica of {} could take the request within {}s",
                            function.key(),
                            timeout.as_secs()
                        ),
                    ));
                }
            };
            function.metrics().waited(started.elapsed());
            exchange.ticket = Some(ticket);
            exchange.held = true;
            inner.call(exchange).await
        })
    }
}

fn refused(function: &Function, refusal: Refusal) -> ProxyResponse {
    match refusal {
        Refusal::QueueFull(full) => unavailable(format!("{}: {full}", function.key()), 1),
        Refusal::CannotWake(reason) => {
            unavailable(format!("{} cannot wake now: {reason}", function.key()), 10)
        }
        Refusal::Draining => unavailable("the activator is shutting down; retry", 1),
    }
}

// ---- 4. Balance -----------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct BalanceLayer {
    metrics: Arc<Metrics>,
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Balance<S> {
        Balance {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Balance<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Exchange> for Balance<S>
where
    S: Service<Exchange, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut exchange: Exchange) -> BoxFuture {
        // The warm path: a connection to the chosen replica is ready now, so no future
        // of this layer's own (a request that waited has its ready → forward time to
        // record, below).
        if !exchange.held
            && let Some(ticket) = &exchange.ticket
            && let Some(connection) = ticket.replica().upstream.checkout_ready()
        {
            exchange.connection = Some(connection);
            return self.inner.call(exchange);
        }
        let mut inner = self.inner.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let Some(ticket) = exchange.ticket.take() else {
                return Ok(answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no replica chosen",
                ));
            };
            let (ticket, connection) = match connect_somewhere(
                ticket,
                exchange.held_body_bytes,
                exchange.arrived,
                &metrics,
            )
            .await
            {
                Ok(connected) => connected,
                Err(answer) => return Ok(answer),
            };
            if exchange.held
                && let Some(since) = ticket.function().take_ready_since()
            {
                metrics
                    .ready_to_forward
                    .observe(since.elapsed().as_secs_f64());
            }
            exchange.ticket = Some(ticket);
            exchange.connection = Some(connection);
            inner.call(exchange).await
        })
    }
}

/// A connection to `ticket`'s replica; when that replica refuses, to another with room,
/// or to the first one freed, for as long as the request may wait (its `waitTimeout`
/// from `arrived`). A replica that refuses sits out until its probe connects. Nothing
/// of the request has been sent to any of them.
async fn connect_somewhere(
    mut ticket: Ticket,
    held_body_bytes: u64,
    arrived: Instant,
    metrics: &Metrics,
) -> Result<(Ticket, Connection), ProxyResponse> {
    let deadline = arrived + ticket.function().settings().wait_timeout;
    loop {
        // A replica with every one of its connections in use makes this wait for one,
        // for as long as the request may wait.
        let checkout = ticket.replica().upstream.checkout_before(Some(deadline));
        let error = match checkout.await {
            Ok(connection) => return Ok((ticket, connection)),
            Err(error @ ConnectError::NoneFree { .. }) => {
                metrics.proxy_error("no_connection");
                let key = ticket.function().key();
                warn!(function = %key, %error, "no connection to a replica came free");
                return Err(answer(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("{key}: {error}"),
                ));
            }
            Err(error) => error,
        };
        metrics.proxy_error("connect");
        let function = ticket.function().clone();
        function.sit_out(ticket.replica());
        drop(ticket);
        // Another replica with room, or the front of the queue until one accepts, for
        // as long as the request may wait.
        let waiting = match function.readmit(held_body_bytes) {
            Ok(Admission::Ready(other)) => {
                ticket = other;
                continue;
            }
            Ok(Admission::Wait(waiting)) => waiting,
            Err(refusal) => return Err(refused(&function, refusal)),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        ticket = match tokio::time::timeout(left, waiting.ticket()).await {
            Ok(Ok(other)) => other,
            Ok(Err(refusal)) => return Err(refused(&function, refusal)),
            Err(_) => {
                warn!(function = %function.key(), %error, "no replica accepted a connection");
                return Err(answer(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "no replica of {} accepted a connection within {}s: {error}",
                        function.key(),
                        function.settings().wait_timeout.as_secs()
                    ),
                ));
            }
        };
    }
}

// ---- 5. Forward -----------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Forward {
    metrics: Arc<Metrics>,
    body_timeout: Duration,
}

impl Service<Exchange> for Forward {
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, exchange: Exchange) -> BoxFuture {
        // The exchange's future itself is boxed, not one that awaits it: each level
        // would move it (a few KiB) once more.
        Box::pin(forward(exchange, self.metrics.clone(), self.body_timeout))
    }
}

async fn forward(
    exchange: Exchange,
    metrics: Arc<Metrics>,
    body_timeout: Duration,
) -> Result<ProxyResponse, Infallible> {
    let Exchange {
        mut request,
        client,
        ticket,
        connection,
        arrived,
        held_body_bytes,
        ..
    } = exchange;
    let (Some(mut ticket), Some(mut connection)) = (ticket, connection) else {
        return Ok(answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no connection chosen",
        ));
    };
    // Changed in place: each move of the request (a few hundred bytes) is a copy.
    let mut upgrade = headers::is_upgrade(request.headers());
    let client_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>();
    let host = headers::request_host_value(request.uri(), request.headers());
    let protocol = ticket.replica().upstream.protocol();
    if upgrade && protocol == Protocol::H2c && headers::offers_only_h2c(request.headers()) {
        // An offer to speak HTTP/2, which a server may ignore: the replica gets the
        // request plain (it already speaks HTTP/2 to the activator).
        upgrade = false;
    } else if upgrade && protocol == Protocol::H2c {
        // HTTP/2 has no `Upgrade` (its client drops the field): the replica would see
        // a plain request, and the client would never get its tunnel.
        metrics.proxy_error("upgrade");
        return Ok(answer(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "{}'s replicas speak h2c (appProtocol kubernetes.io/h2c), which cannot carry a protocol upgrade; serve upgrades over HTTP/1.1",
                ticket.function().key()
            ),
        ));
    }
    headers::remove_hop_by_hop(request.headers_mut(), upgrade);
    headers::add_forwarded(request.headers_mut(), &client, host.as_ref());
    let host_from_target = request.uri().authority().is_some();
    headers::set_upstream_host(
        request.headers_mut(),
        host.as_ref(),
        host_from_target,
        protocol,
    );
    if let Some(target) = headers::upstream_target(request.uri(), host.as_ref(), protocol) {
        *request.uri_mut() = target;
    }
    *request.version_mut() = match protocol {
        Protocol::Http1 => Version::HTTP_11,
        Protocol::H2c => Version::HTTP_2,
    };
    request.extensions_mut().clear();
    // A slice of the client connection's read buffer, like the fields (see
    // `Http1Connection::send`): not kept through the wait.
    drop(host);
    // A pooled connection can close between its check and the send; the request comes
    // back unsent, and one more connection is tried.
    for attempt in 0..2 {
        let (unsent, error) = match connection {
            Connection::Http1(c) => match c
                .send(request, ticket.response_timeout(), body_timeout)
                .await
            {
                Ok(answer) => {
                    let upgrade = client_upgrade.filter(|_| upgrade).map(|on| (on, client));
                    return Ok(respond_http1(answer, ticket, upgrade, &metrics));
                }
                Err(http1::SendError {
                    error: http1::Error::NoAnswerInTime(timeout),
                    ..
                }) => return Ok(no_answer_in_time(&ticket, timeout, &metrics)),
                Err(http1::SendError {
                    error: http1::Error::BodyNotTaken(timeout),
                    ..
                }) => return Ok(body_not_taken(&ticket, timeout, &metrics)),
                Err(http1::SendError {
                    error: http1::Error::ClientBodyStalled(pause),
                    ..
                }) => return Ok(client_body_stalled(pause, &metrics)),
                Err(http1::SendError {
                    error: http1::Error::ClientBody(e),
                    ..
                }) => {
                    metrics.proxy_error("client_body");
                    return Ok(answer(
                        StatusCode::BAD_REQUEST,
                        format!("the request body could not be read: {e}"),
                    ));
                }
                Err(e) => (e.unsent, e.error.to_string()),
            },
            // Boxed: inline, the h2c exchange's state would make every request's
            // future larger (and each move of it longer), HTTP/1.1 ones included.
            Connection::H2(sender) => {
                let send = send_h2(sender, request, ticket.response_timeout(), body_timeout);
                match Box::pin(send).await {
                    Ok(response) => return Ok(respond_h2(response, ticket)),
                    Err(H2Failure::NoAnswerInTime(timeout)) => {
                        return Ok(no_answer_in_time(&ticket, timeout, &metrics));
                    }
                    Err(H2Failure::ClientBodyStalled(pause)) => {
                        return Ok(client_body_stalled(pause, &metrics));
                    }
                    Err(H2Failure::BodyNotTaken(timeout)) => {
                        return Ok(body_not_taken(&ticket, timeout, &metrics));
                    }
                    Err(H2Failure::Failed(unsent, error)) => (unsent, error),
                }
            }
        };
        match unsent {
            Some(unsent) if attempt == 0 => {
                metrics.proxy_error("stale_connection");
                request = unsent;
                // A new connection, to this replica or, should it refuse (gone since
                // its pooled connection was opened), to another. Boxed for the same
                // reason as the h2c exchange: a rare step.
                let connected = connect_somewhere(ticket, held_body_bytes, arrived, &metrics);
                (ticket, connection) = match Box::pin(connected).await {
                    Ok(connected) => connected,
                    Err(answer) => return Ok(answer),
                };
                // The request was made ready for `protocol` (an HTTP/1.1 one keeps
                // only its head as written): a replica that speaks another cannot
                // take it, which a Service changed meanwhile could make.
                if ticket.replica().upstream.protocol() != protocol {
                    return Ok(answer(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "{}'s upstream protocol changed while the request was sent; retry",
                            ticket.function().key()
                        ),
                    ));
                }
            }
            _ => {
                let key = ticket.function().key();
                let addr = ticket.replica().addr();
                metrics.proxy_error("upstream");
                warn!(function = %key, replica = %addr, %error, "a replica failed a request");
                return Ok(answer(
                    StatusCode::BAD_GATEWAY,
                    format!("replica {addr} of {key} failed the request: {error}"),
                ));
            }
        }
    }
    Ok(answer(
        StatusCode::BAD_GATEWAY,
        "the replica's connection closed twice",
    ))
}

/// 504: the replica had the whole request and did not begin its answer in time.
fn no_answer_in_time(ticket: &Ticket, timeout: Duration, metrics: &Metrics) -> ProxyResponse {
    replica_too_slow(
        ticket,
        metrics,
        format!(
            "did not begin its answer within {}s of having the whole request",
            timeout.as_secs_f64()
        ),
    )
}

/// 408: the client paused too long while sending the request body. The replica has
/// part of it; its slot is freed as the exchange ends.
fn client_body_stalled(pause: Duration, metrics: &Metrics) -> ProxyResponse {
    metrics.proxy_error("client_body_timeout");
    let mut response = answer(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "no part of the request body came for {}s",
            pause.as_secs_f64()
        ),
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    response
}

/// 504: the replica stopped reading the request body.
fn body_not_taken(ticket: &Ticket, timeout: Duration, metrics: &Metrics) -> ProxyResponse {
    replica_too_slow(
        ticket,
        metrics,
        format!(
            "took none of the request body for {}s",
            timeout.as_secs_f64()
        ),
    )
}

/// 504 for a replica given up within `responseTimeout`. The request is not sent
/// again: the replica has it, or part of it, and may be acting on it.
fn replica_too_slow(ticket: &Ticket, metrics: &Metrics, what: String) -> ProxyResponse {
    let key = ticket.function().key();
    let addr = ticket.replica().addr();
    metrics.proxy_error("response_timeout");
    warn!(function = %key, replica = %addr, "a replica {what}");
    answer(
        StatusCode::GATEWAY_TIMEOUT,
        format!("replica {addr} of {key} {what}"),
    )
}

/// Why an h2c exchange failed. Returned once, on a rare path: its size costs nothing
/// where it matters, and boxing the request would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum H2Failure {
    /// The request when it was not sent, and why.
    Failed(Option<Request<Incoming>>, String),
    /// The replica took the whole request and did not begin its answer within this.
    NoAnswerInTime(Duration),
    /// The client paused this long while sending the request body.
    ClientBodyStalled(Duration),
    /// The replica took none of the request body for this long.
    BodyNotTaken(Duration),
}

/// Sends `request` over an h2c connection; the replica has `response_timeout` from
/// when the connection has taken the whole request to begin its answer.
async fn send_h2(
    mut sender: hyper::client::conn::http2::SendRequest<UpstreamBody>,
    request: Request<Incoming>,
    response_timeout: Duration,
    body_timeout: Duration,
) -> Result<Response<Incoming>, H2Failure> {
    if let Err(e) = sender.ready().await {
        return Err(H2Failure::Failed(Some(request), e.to_string()));
    }
    let (parts, body) = request.into_parts();
    let (body, taken) = UpstreamBody::watched(body, body_timeout);
    let response = sender.try_send_request(Request::from_parts(parts, body));
    let answer_due = async {
        if let Some(watch) = taken {
            // Sent or dropped, the body is over either way; a client that paused too
            // long, or a replica that stopped taking it, says so (the stream's reset
            // for it fails the response too).
            match watch.end(response_timeout).await {
                BodyEnd::Taken => {}
                BodyEnd::ClientStalled(pause) => return H2Failure::ClientBodyStalled(pause),
                BodyEnd::NotTaken(limit) => return H2Failure::BodyNotTaken(limit),
            }
        }
        tokio::time::sleep(response_timeout).await;
        H2Failure::NoAnswerInTime(response_timeout)
    };
    tokio::select! {
        biased;
        failure = answer_due => Err(failure),
        response = response => response.map_err(|mut e| {
            let unsent = e.take_message().map(|r| r.map(UpstreamBody::into_inner));
            H2Failure::Failed(unsent, e.into_error().to_string())
        }),
    }
}

/// A replica's answer over HTTP/1.1. A body that came whole with the head frees the
/// connection and the replica's slot at once; a longer one is read as the client
/// takes it. `101` to an upgrade becomes a tunnel.
fn respond_http1(
    reply: http1::Answer,
    ticket: Ticket,
    upgrade: Option<(hyper::upgrade::OnUpgrade, Arc<headers::ClientAddress>)>,
    metrics: &Arc<Metrics>,
) -> ProxyResponse {
    match reply {
        http1::Answer::Switched(mut parts, upgraded) => {
            let Some((client_upgrade, client)) = upgrade else {
                metrics.proxy_error("upstream");
                return answer(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "replica {} of {} switched protocols unasked",
                        ticket.replica().addr(),
                        ticket.function().key()
                    ),
                );
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                // The ticket lasts as long as the tunnel (the connection's place in
                // the pool does, inside `upgraded`), and so does the client
                // connection's place under the server's bound.
                let (_ticket, _client) = (ticket, client);
                let http1::Upgraded { mut io, early, .. } = upgraded;
                let Ok(client) = client_upgrade.await else {
                    metrics.proxy_error("upgrade");
                    return;
                };
                let mut client = hyper_util::rt::TokioIo::new(client);
                if tokio::io::AsyncWriteExt::write_all(&mut client, &early)
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut io).await;
                }
            });
            headers::remove_hop_by_hop(&mut parts.headers, true);
            Response::from_parts(parts, ProxyBody::empty())
        }
        http1::Answer::Response(mut parts, mut body) => {
            headers::remove_hop_by_hop(&mut parts.headers, false);
            if let Some(whole) = body.take_whole() {
                if let Some(connection) = body.into_reusable() {
                    ticket.replica().upstream.give_back(connection);
                }
                let body = if whole.is_empty() {
                    ProxyBody::empty()
                } else {
                    ProxyBody::full(whole)
                };
                return Response::from_parts(parts, body);
            }
            let body = Http1Body {
                body: Some(body),
                ticket: Some(ticket),
            };
            Response::from_parts(parts, ProxyBody::Http1(Box::new(body)))
        }
    }
}

/// A replica's answer over h2c (never an upgrade: see [`forward`]).
fn respond_h2(response: Response<Incoming>, ticket: Ticket) -> ProxyResponse {
    let (mut parts, body) = response.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers, false);
    let body = H2Body {
        inner: body,
        ticket: Some(ticket),
    };
    Response::from_parts(parts, ProxyBody::H2(Box::new(body)))
}

// ---- Bodies ---------------------------------------------------------------------

/// A response body: the replica's, streamed, or one the activator wrote.
#[derive(Debug)]
pub enum ProxyBody {
    Full(Option<Bytes>),
    Http1(Box<Http1Body>),
    H2(Box<H2Body>),
}

impl ProxyBody {
    pub fn full(text: impl Into<Bytes>) -> Self {
        Self::Full(Some(text.into()))
    }

    pub fn empty() -> Self {
        Self::Full(None)
    }
}

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A replica's body over HTTP/1.1. Read to the end, it gives its connection back to
/// the pool (when the exchange left it fit for another) and frees its slot on the
/// replica; dropped early, the connection closes and the slot is freed.
#[derive(Debug)]
pub struct Http1Body {
    body: Option<http1::ResponseBody>,
    ticket: Option<Ticket>,
}

impl Http1Body {
    fn finish(&mut self) {
        if let (Some(body), Some(ticket)) = (self.body.take(), self.ticket.take())
            && let Some(connection) = body.into_reusable()
        {
            ticket.replica().upstream.give_back(connection);
        }
    }
}

/// A replica's body over h2c; the stream's end frees its slot on the replica.
#[derive(Debug)]
pub struct H2Body {
    inner: Incoming,
    ticket: Option<Ticket>,
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Http1(body) => {
                let Some(inner) = body.body.as_mut() else {
                    return Poll::Ready(None);
                };
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                let ended = inner.is_end_stream();
                match &polled {
                    Poll::Ready(None) => body.finish(),
                    Poll::Ready(Some(Err(_))) => {
                        body.body = None;
                        body.ticket = None;
                    }
                    Poll::Ready(Some(Ok(_))) if ended => body.finish(),
                    _ => {}
                }
                polled.map_err(Into::into)
            }
            Self::H2(body) => {
                let polled = Pin::new(&mut body.inner).poll_frame(cx);
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
                    || body.inner.is_end_stream()
                {
                    body.ticket = None;
                }
                polled.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(data) => data.is_none(),
            Self::Http1(body) => body.body.as_ref().is_none_or(|b| b.is_end_stream()),
            Self::H2(body) => body.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Http1(body) => body
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint()),
            Self::H2(body) => body.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        testing::listening,
        watch::tests::{registry, routed},
    };

    #[tokio::test]
    async fn a_replica_that_refuses_sends_the_request_to_another() {
        let registry = registry();
        let function = routed(&registry, "web");
        let (_listener, live) = listening().await;
        // A port nobody listens on any more: connections are refused.
        let (_, gone) = listening().await;
        function.set_replicas(&[gone, live]);
        // A slot on the replica that is gone (the balancer picks either).
        let ticket = (0..1000)
            .find_map(|_| match function.admit(0, Instant::now()) {
                Ok(Admission::Ready(ticket)) => (ticket.replica().addr() == gone).then_some(ticket),
                other => panic!("a replica with room: {other:?}"),
            })
            .expect("the replica that is gone chosen once");
        let metrics = Metrics::register(&mut Default::default());
        let (ticket, _connection) = connect_somewhere(ticket, 0, Instant::now(), &metrics)
            .await
            .expect("connected to the other");
        assert_eq!(ticket.replica().addr(), live);
    }

    #[tokio::test]
    async fn a_replica_with_every_connection_in_use_is_waited_for_within_the_wait() {
        let registry = registry();
        let function = routed(&registry, "web");
        let (_listener, addr) = listening().await;
        function.set_replicas(&[addr]);
        let Ok(Admission::Ready(ticket)) = function.admit(0, Instant::now()) else {
            panic!("a replica with room");
        };
        // Every connection the replica may have, in use.
        let settings = function.settings();
        let mut in_use = Vec::new();
        for _ in 0..settings.pool.max_connections {
            in_use.push(
                ticket
                    .replica()
                    .upstream
                    .checkout()
                    .await
                    .expect("connected"),
            );
        }
        // A request with 300 ms of its wait left: 504 then.
        let arrived = Instant::now() - settings.wait_timeout + Duration::from_millis(300);
        let metrics = Metrics::register(&mut Default::default());
        let Err(answer) = connect_somewhere(ticket, 0, arrived, &metrics).await else {
            panic!("a connection beyond the bound");
        };
        assert_eq!(answer.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(Instant::now() >= arrived + settings.wait_timeout);
        drop(in_use);
    }
}
