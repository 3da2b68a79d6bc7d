//! A test HTTP replica: stands for a function pod on the pod's IP and port, answers
//! every request (HTTP/1.1 or h2c) with `200` and its name, so a test can tell which
//! replica served it.
//!
//! `test-replica --listen 10.244.0.3:8080 --name hello-abc12`

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
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
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let body = Bytes::from(format!("{}\n", args.name));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = terminate.recv() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
