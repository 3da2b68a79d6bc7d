//! A load client for the activator tests: opens `--requests` connections at once, one
//! GET each, and prints how they were answered as one JSON line. With `--first-host`,
//! each connection first carries a GET for that host and reads its answer, so the GET
//! counted goes over a kept-alive connection that has already been answered.
//!
//! `load --addr 10.244.0.5:8080 --host burst.ns --requests 10000 --timeout 300s`

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    host: String,
    /// A host asked for first on each connection (its answer read, not counted).
    #[arg(long)]
    first_host: Option<String>,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long)]
    requests: usize,
    #[arg(long, value_parser = blink_crds::duration::parse_duration, default_value = "300s")]
    timeout: Duration,
}

/// A request's status, and its body when it was not a success (for the summary).
async fn one(args: &Args) -> Result<(u16, Option<String>), String> {
    let stream = tokio::net::TcpStream::connect(args.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    if let Some(first_host) = &args.first_host {
        get(&mut sender, &args.path, first_host)
            .await
            .map_err(|e| format!("first {e}"))?;
        sender
            .ready()
            .await
            .map_err(|e| format!("connection after the first answer: {e}"))?;
    }
    let (status, body) = get(&mut sender, &args.path, &args.host).await?;
    let failure = (status >= 300).then(|| String::from_utf8_lossy(&body).trim().to_owned());
    Ok((status, failure))
}

/// One GET on the connection: its status and whole body.
async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>,
    path: &str,
    host: &str,
) -> Result<(u16, bytes::Bytes), String> {
    let request = http::Request::get(path)
        .header("host", host)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(Args::parse());
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..args.requests)
        .map(|_| {
            let args = args.clone();
            tokio::spawn(async move {
                tokio::time::timeout(args.timeout, one(&args))
                    .await
                    .unwrap_or_else(|_| Err("timeout".to_owned()))
            })
        })
        .collect();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    // The first few distinct bodies of answers that were not a success: they say why.
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        match task.await? {
            Ok((status, failure)) => {
                *statuses.entry(status.to_string()).or_default() += 1;
                if let Some(body) = failure {
                    let key = format!("{status} {body}");
                    if failures.len() < 5 || failures.contains_key(&key) {
                        *failures.entry(key).or_default() += 1;
                    }
                }
            }
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "statuses": statuses,
            "errors": errors,
            "failures": failures,
            "elapsed_ms": started.elapsed().as_millis() as u64,
        })
    );
    Ok(())
}
