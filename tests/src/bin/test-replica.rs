//! A test HTTP replica: stands for a function pod on the pod's IP and port, serving
//! HTTP/1.1 and h2c, so a test can tell which replica served it and how.
//!
//! - any path: `200` with its name as the body; headers `x-served-by` (the name) and
//!   `x-http-version` (the version the request arrived in), `x-forwarded` echoing
//!   the request's `Forwarded` field, and `x-in-flight`: the requests this replica was
//!   serving when this one arrived, itself included;
//! - `/slow/<ms>`: the same, after `<ms>` milliseconds;
//! - `/stream/<n>`: `n` chunks of 1 KiB, one every 20 ms;
//! - `/upload`: reads the body as it streams and answers `<bytes> <fnv1a-64 hex>`;
//! - `/ws`: a WebSocket that echoes every text and binary message.
//!
//! `test-replica --listen 10.244.0.3:8080 --name hello-abc12`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on (the pod IP and container port).
    #[arg(long)]
    listen: SocketAddr,
    /// Name to answer with (the pod name).
    #[arg(long)]
    name: String,
    /// Start listening only after this long (a replica reported ready before it
    /// listens).
    #[arg(long, value_parser = blink_crds::duration::parse_duration)]
    listen_after: Option<std::time::Duration>,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Accepts a WebSocket upgrade and echoes messages until the client closes.
fn websocket(mut request: Request<Incoming>) -> Response<Body> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        let mut response = Response::new(full("not a WebSocket request\n"));
        *response.status_mut() = hyper::StatusCode::BAD_REQUEST;
        return response;
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        use futures::SinkExt as _;
        while let Some(Ok(message)) = socket.next().await {
            if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
                break;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        "upgrade",
        hyper::header::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        "connection",
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    if let Ok(accept) = accept.parse() {
        headers.insert("sec-websocket-accept", accept);
    }
    response
}

/// Requests being served now.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a request in [`IN_FLIGHT`] while it lives.
struct InFlight(usize);

impl InFlight {
    fn enter() -> Self {
        Self(IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn serve(name: String, request: Request<Incoming>) -> Response<Body> {
    if request.uri().path() == "/ws" {
        return websocket(request);
    }
    let in_flight = InFlight::enter();
    let version = format!("{:?}", request.version());
    let forwarded = request
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let path = request.uri().path().to_owned();
    let body = if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        full(format!("{name}\n"))
    } else if let Some(n) = path.strip_prefix("/stream/") {
        let n: usize = n.parse().unwrap_or(1);
        let chunks = futures::stream::iter(0..n).then(|_| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; 1024])))
        });
        BodyExt::boxed(StreamBody::new(chunks))
    } else if path == "/upload" {
        let mut body = request.into_body();
        let (mut bytes, mut hash) = (0u64, blink_tests::FNV_START);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        bytes += data.len() as u64;
                        hash = blink_tests::fnv1a(hash, data);
                    }
                }
                Err(_) => break,
            }
        }
        full(format!("{bytes} {hash:016x}\n"))
    } else {
        full(format!("{name}\n"))
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    let arrived_with = in_flight.0.to_string();
    drop(in_flight);
    for (key, value) in [
        ("x-served-by", name.as_str()),
        ("x-http-version", version.as_str()),
        ("x-forwarded", forwarded.as_str()),
        ("x-in-flight", arrived_with.as_str()),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(key, value);
        }
    }
    response
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(pause) = args.listen_after {
        tokio::time::sleep(pause).await;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = terminate.recv() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let name = args.name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(serve(name, request).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}
