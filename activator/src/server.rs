//! The listener: HTTP/1.1 and h2c (prior knowledge) on one port, with upgrades, a
//! bound on open connections, timeouts against slow clients, and a graceful drain.
//!
//! - Connections past `max_connections` are accepted and answered `503` with
//!   `Retry-After`, then closed: a client learns why at once instead of waiting in the
//!   kernel's backlog.
//! - A client must send a request's head within `header_timeout` (slowloris), and a
//!   head larger than `max_header_bytes` is answered `431`.
//! - Drain: stop accepting, let HTTP/1.1 connections finish their current exchange and
//!   HTTP/2 ones get a GOAWAY, answer everything still held when the grace ends.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::Service;
use tracing::{debug, info, warn};

use crate::{
    headers::ClientAddress,
    metrics::Metrics,
    proxy::{self, Exchange, ProxyBody},
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
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        // A head larger than the buffer is answered 431; bodies stream through it.
        .max_buf_size(config.max_header_bytes.max(8192));
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(20)));
    Protocols { http1, http2 }
}

/// The 24 bytes an HTTP/2 client with prior knowledge starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client speaks h2c: peeks (reads nothing) until its first bytes either
/// are the HTTP/2 preface or cannot become it. `None`: it sent nothing in time.
async fn speaks_h2c(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let mut buffer = [0u8; 24];
    let peek = async {
        loop {
            let n = stream.peek(&mut buffer).await.ok()?;
            if n == 0 {
                return None;
            }
            if buffer[..n] != H2_PREFACE[..n] {
                return Some(false);
            }
            if n == H2_PREFACE.len() {
                return Some(true);
            }
            // Part of the preface so far: wait for more.
            stream.readable().await.ok()?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(timeout, peek).await.ok().flatten()
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
        let _ = stream.set_nodelay(true);
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        let service = service.clone();
        let address = Arc::new(ClientAddress::new(client));
        let handler = service_fn(move |request: Request<Incoming>| {
            let mut service = service.clone();
            service.call(Exchange::new(request, address.clone()))
        });
        let (metrics, protocols, closing) = (metrics.clone(), protocols.clone(), closing.clone());
        let header_timeout = config.header_timeout;
        connections.spawn(async move {
            metrics.connections.inc();
            let result = match speaks_h2c(&stream, header_timeout).await {
                None => Ok(()),
                Some(true) => {
                    // Boxed: an HTTP/2 connection's state is several times an HTTP/1.1
                    // one's, and inline every connection's task would carry it.
                    let mut connection = Box::pin(
                        protocols
                            .http2
                            .serve_connection(TokioIo::new(stream), handler),
                    );
                    until_done_or_drained(connection.as_mut(), &closing, |c| c.graceful_shutdown())
                        .await
                }
                Some(false) => {
                    let connection = std::pin::pin!(
                        protocols
                            .http1
                            .serve_connection(TokioIo::new(stream), handler)
                            .with_upgrades()
                    );
                    until_done_or_drained(connection, &closing, |c| c.graceful_shutdown()).await
                }
            };
            if let Err(e) = result {
                debug!(%client, error = %e, "client connection ended with an error");
            }
            metrics.connections.dec();
            drop(permit);
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

/// Runs a client connection to its end; once `closing` fires, `drain` tells it to finish
/// the exchange in hand (a GOAWAY for HTTP/2) and it runs until it has. The caller
/// pins the connection where it lives: moved in here, it would take its room in the
/// connection's task twice.
async fn until_done_or_drained<C: std::future::Future>(
    mut connection: std::pin::Pin<&mut C>,
    closing: &CancellationToken,
    drain: impl FnOnce(std::pin::Pin<&mut C>),
) -> C::Output {
    tokio::select! {
        result = connection.as_mut() => result,
        _ = closing.cancelled() => {
            drain(connection.as_mut());
            connection.await
        }
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
