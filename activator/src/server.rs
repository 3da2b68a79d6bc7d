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
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::{debug, info, warn};

use crate::{
    metrics::Metrics,
    proxy::{self, Exchange, ProxyBody},
};

#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    /// The read buffer of an HTTP/1.1 connection, at most; bounds what a held request
    /// may have read past its head.
    pub read_buffer: usize,
    pub backlog: u32,
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

fn builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        // A head larger than the buffer is answered 431; bodies stream through it.
        .max_buf_size(config.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(20)));
    builder
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
    let builder = Arc::new(builder(&config));
    let open = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
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
        let handler = service_fn(move |request: Request<Incoming>| {
            let mut service = service.clone();
            service.call(Exchange::new(request, client))
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), handler)
            .into_owned();
        let connection = graceful.watch(connection);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            metrics.connections.inc();
            if let Err(e) = connection.await {
                debug!(%client, error = %e, "client connection ended with an error");
            }
            metrics.connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    info!(grace = ?config.drain_grace, "draining");
    // Held requests get the grace less a moment to be served; then they are answered,
    // and their connections can finish.
    let answer_held_at = config.drain_grace.saturating_sub(Duration::from_secs(1));
    let finished = graceful.shutdown();
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
