//! The cold path with release builds of the scaler and the activator, on the test bed.
//!
//! `tests/bed/bed exec cargo bench -p blink-tests --bench activator_cold`
//! (`BLINK_BENCH_WAKES`, default 40; `BLINK_BENCH_ACTIVATOR`, the path of the build of
//! the activator to measure, by default this bench's own release build;
//! `BLINK_BENCH_SETTLE_MS`, default 0, see below; `BLINK_BENCH_WORKER_THREADS`, the
//! activator's `--worker-threads`, by default its own default: one per CPU).
//!
//! `BLINK_BENCH_WAKES` functions start at zero behind one activator whose snapshots come
//! once a minute, so only its poke wakes them. Each is woken in turn by one request, and
//! for each wake:
//! - **first byte at zero → PATCH**: this process writes the request's first byte on a
//!   connection it opened just before (its clock, just before the write) → the API server
//!   receives the scaler's `/scale` PATCH (the audit log's `requestReceivedTimestamp`;
//!   same machine, same clock). The client's own connect is timed apart: it is no part
//!   of the request (the activator's accept of it, tens of µs, may fall before the
//!   first byte too);
//! - **endpoint ready → request forwarded**: the activator's histogram
//!   `blink_activator_ready_to_forward_seconds` (the function's first ready endpoint as
//!   the activator learns it → the held request connected to that replica);
//! - the same wake followed across the processes by wall clock (same machine): first
//!   byte → the activator asks for a poke (its debug line `poke asked`, field
//!   `asked_at`: the request's head read, routed and held) → the poke applied at the
//!   scaler (its debug line `poke applied`, field `arrived_at`) → the PATCH written
//!   (`scale written after a poke`, `sent_at`: the moment the scaler hands the PATCH to
//!   its API client) → received by the API server. First byte → PATCH written is
//!   Blink's part; the rest is the API server's;
//! - the same parts from the processes' histograms: the activator's
//!   `blink_activator_poke_seconds` (the held request's head → the scaler has applied
//!   the poke and answered) and the scaler's `blink_scaler_poke_to_patch_sent_seconds`;
//! - the whole wake as the client sees it;
//! - the machine's idle CPU over the wake (`/proc/stat`, first byte → answer, in ticks
//!   of 10 ms on each core, so coarse over one wake of tens of ms): on the
//!   bed's two cores the API server, kube-controller-manager, kwok, the replicas and this
//!   process share the CPUs with Blink, so a slow stage is often a wait for one.
//!
//! Back to back (the default), each wake starts the moment the one before is answered,
//! while the cluster is still busy with it (its Deployment's and ReplicaSet's status,
//! the EndpointSlice, kwok's pod status). With `BLINK_BENCH_SETTLE_MS=N`, each wake
//! waits until the previous function's Deployment reports its replica available, then
//! N ms more: each wake meets a cluster that is no longer busy with another.
//!
//! The functions' pods are Ready only once their replica listens (a readiness gate the
//! bed opens, as a real readiness probe would), so an endpoint the activator learns of
//! accepts connections.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use blink_tests::{
    activator::{Activators, PORT},
    audit,
    pods::{PodProcesses, replica_command},
    scaler::{ScalerProcess, release_finalizers},
    workloads::{create_gated_deployment, create_scaled_object, until_available},
};
use k8s_openapi::jiff::Timestamp;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const SCALER: &str = env!("CARGO_BIN_EXE_scaler");
const ACTIVATOR: &str = env!("CARGO_BIN_EXE_activator");
const REPLICA: &str = env!("CARGO_BIN_EXE_test-replica");

fn main() {
    blink_tests::run("bench-activator-cold", |ctx| async move {
        let wakes = std::env::var("BLINK_BENCH_WAKES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(40usize);
        ensure!(wakes > 0, "BLINK_BENCH_WAKES must be at least 1");
        let names: Vec<String> = (0..wakes).map(|i| format!("cold-{i}")).collect();
        for name in &names {
            create_gated_deployment(&ctx, name, 0).await?;
        }
        let replicas = PodProcesses::start(
            ctx.client(),
            ctx.namespace(),
            &format!("app in ({})", names.join(",")),
            |pod| replica_command(Path::new(REPLICA), pod),
        );
        let scaler = ScalerProcess::start(&ctx, Path::new(SCALER), "scaler-cold", &[]).await?;
        let activator = blink_tests::activator::bench_binary(ACTIVATOR);
        let mut activator_args = vec!["--stats-interval".to_owned(), "60s".to_owned()];
        if let Ok(threads) = std::env::var("BLINK_BENCH_WORKER_THREADS") {
            activator_args.extend(["--worker-threads".to_owned(), threads]);
        }
        let activator_args: Vec<&str> = activator_args.iter().map(String::as_str).collect();
        let activators = Activators::start(&ctx, &activator, 1, &activator_args).await?;
        for name in &names {
            create_scaled_object(
                &ctx,
                &format!(
                    "
metadata: {{name: {name}}}
spec:
  scaleTargetRef: {{name: {name}}}
  cooldownPeriod: 300
  triggers: [{{type: http, metadata: {{}}}}]
"
                ),
            )
            .await?;
        }
        for name in &names {
            activators.until_routed(ctx.namespace(), name).await?;
        }

        let settle = std::env::var("BLINK_BENCH_SETTLE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::ZERO);
        let activator_addr = SocketAddr::new(activators.pods[0].ip, PORT);
        let mut connected_in = Vec::with_capacity(wakes);
        let mut sent_at = Vec::with_capacity(wakes);
        let mut answered_in = Vec::with_capacity(wakes);
        let mut idle_during = Vec::with_capacity(wakes);
        for name in &names {
            let host = format!("{name}.{}", ctx.namespace());
            let connecting = Instant::now();
            let mut stream = TcpStream::connect(activator_addr).await?;
            connected_in.push(connecting.elapsed());
            let cpu_before = CpuTimes::now()?;
            let sent = Timestamp::now();
            let started = Instant::now();
            let answer =
                tokio::time::timeout(Duration::from_secs(30), get_and_close(&mut stream, &host))
                    .await
                    .with_context(|| format!("{name}: no answer within 30 s"))??;
            answered_in.push(started.elapsed());
            idle_during.push(CpuTimes::now()?.idle_since(&cpu_before));
            ensure!(
                answer.starts_with("HTTP/1.1 200 "),
                "{name}: answered {answer:?}"
            );
            sent_at.push(sent);
            if !settle.is_zero() {
                until_available(&ctx, name, 1).await?;
                tokio::time::sleep(settle).await;
            }
        }

        // The last wake's lines may land after its answer: read until two reads agree.
        let mut events = audit::read(&ctx.bed().audit_log)?;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let again = audit::read(&ctx.bed().audit_log)?;
            let settled = again.len() == events.len();
            events = again;
            if settled {
                break;
            }
        }
        let writes = audit::scale_writes(&events, ctx.namespace(), "deployments");
        let scaler_log = std::fs::read_to_string(&scaler.log)?;
        let activator_log = std::fs::read_to_string(activators.log_path(0))?;
        let asked = log_times(&activator_log, "poke asked", "asked_at", ctx.namespace());
        let poked = log_times(&scaler_log, "poke applied", "arrived_at", ctx.namespace());
        let written = log_times(
            &scaler_log,
            "scale written after a poke",
            "sent_at",
            ctx.namespace(),
        );
        let mut to_patch = Vec::with_capacity(wakes);
        let (mut to_poke, mut poke_to_written, mut to_written, mut written_to_received) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut to_asked, mut asked_to_poke) = (Vec::new(), Vec::new());
        for (name, sent) in names.iter().zip(&sent_at) {
            let first_after = |times: &HashMap<String, Vec<Timestamp>>| {
                times
                    .get(name)
                    .and_then(|t| t.iter().filter(|at| *at >= sent).min().copied())
                    .with_context(|| format!("{name}: no log line after its request"))
            };
            let (arrived, patched) = (first_after(&poked)?, first_after(&written)?);
            let asked_at = first_after(&asked)?;
            to_asked.push(span(*sent, asked_at));
            asked_to_poke.push(span(asked_at, arrived));
            to_poke.push(span(*sent, arrived));
            poke_to_written.push(span(arrived, patched));
            to_written.push(span(*sent, patched));
            let received = writes
                .iter()
                .filter(|e| e.object_ref.as_ref().and_then(|o| o.name.as_deref()) == Some(name))
                .filter_map(|e| e.request_received_timestamp.parse::<Timestamp>().ok())
                .filter(|at| at >= sent)
                .min()
                .with_context(|| format!("{name}: no /scale PATCH after its request"))?;
            to_patch.push(span(*sent, received));
            written_to_received.push(span(patched, received));
        }
        let mut by_to_patch: Vec<usize> = (0..to_patch.len()).collect();
        by_to_patch.sort_by_key(|&i| std::cmp::Reverse(to_patch[i]));
        let slowest_to_patch: Vec<String> = by_to_patch
            .iter()
            .take(3)
            .map(|&i| {
                format!(
                    "{} {:.2} ms (Blink's part {:.2} ms, of it {:.2} ms before the activator asked for the poke; idle CPU over the wake {:.0} %)",
                    names[i],
                    to_patch[i].as_secs_f64() * 1e3,
                    to_written[i].as_secs_f64() * 1e3,
                    to_asked[i].as_secs_f64() * 1e3,
                    idle_during[i] * 100.0
                )
            })
            .collect();

        if settle.is_zero() {
            println!("{wakes} wakes, one function each, release builds, back to back");
        } else {
            println!(
                "{wakes} wakes, one function each, release builds, each {} ms after the one before settled",
                settle.as_millis()
            );
        }
        if let Ok(threads) = std::env::var("BLINK_BENCH_WORKER_THREADS") {
            println!("the activator on --worker-threads {threads}");
        }
        let mut idle_sorted = idle_during.clone();
        idle_sorted.sort_by(f64::total_cmp);
        println!(
            "idle CPU over a wake: p50 {:.0} %, p10 {:.0} %, min {:.0} %",
            idle_sorted[idle_sorted.len() / 2] * 100.0,
            idle_sorted[idle_sorted.len() / 10] * 100.0,
            idle_sorted[0] * 100.0
        );
        report("first byte at zero → PATCH received", &mut to_patch);
        report(
            "first byte at zero → PATCH written (Blink's part)",
            &mut to_written,
        );
        report("  first byte → poke applied at the scaler", &mut to_poke);
        report(
            "    first byte → the activator asks for a poke (head read, routed, held)",
            &mut to_asked,
        );
        report("    poke asked → applied at the scaler", &mut asked_to_poke);
        report("  poke applied → PATCH written", &mut poke_to_written);
        report(
            "PATCH written → received by the API server",
            &mut written_to_received,
        );
        println!(
            "slowest first byte → PATCH received: {}",
            slowest_to_patch.join("; ")
        );
        slowest_wakes(&names, &sent_at, &answered_in, &events, ctx.namespace());
        report("request at zero → answered (client)", &mut answered_in);
        report(
            "the client's connect to the activator, before the first byte",
            &mut connected_in,
        );
        let activator_metrics = activators.metrics(0).await?;
        let scaler_metrics = scaler.metrics().await?;
        // The scaler's own load on the API server, which its next PATCH queues behind
        // (from its start: the functions' creation included).
        let per_wake =
            |series: &str| blink_tests::sum_samples(&scaler_metrics, series) / wakes as f64;
        println!(
            "the scaler's requests per wake, from its start: reads of /scale {:.1}, of pods {:.1}; writes of /scale {:.1}, of status {:.1}",
            per_wake(r#"blink_scaler_api_reads_total{kind="scale"}"#),
            per_wake(r#"blink_scaler_api_reads_total{kind="pods"}"#),
            per_wake(r#"blink_scaler_api_writes_total{kind="scale"}"#),
            per_wake(r#"blink_scaler_api_writes_total{kind="status"}"#),
        );
        for (metrics, histogram) in [
            (&activator_metrics, "blink_activator_poke_seconds"),
            (&scaler_metrics, "blink_scaler_poke_to_patch_sent_seconds"),
            (&scaler_metrics, "blink_scaler_poke_to_patch_seconds"),
            (
                &activator_metrics,
                "blink_activator_ready_to_forward_seconds",
            ),
        ] {
            println!("{histogram} (cumulative, le in seconds):");
            for line in metrics.lines().filter(|l| l.starts_with(histogram)) {
                println!("  {line}");
            }
        }
        // A replica that refused its first connection (it was not listening yet) shows
        // here; its probe's wait is in `ready_to_forward`.
        for line in activator_metrics
            .lines()
            .filter(|l| l.starts_with("blink_activator_proxy_errors"))
        {
            println!("{line}");
        }

        replicas.shutdown().await;
        activators.processes.shutdown().await;
        scaler.stop().await;
        release_finalizers(&ctx).await
    });
}

/// The three slowest wakes as the client saw them, each with the audit log's writes in
/// between: the `/scale` PATCH (the scaler's) and the function Service's EndpointSlice
/// writes (kube-controller-manager's: the endpoint listed, then listed ready). A wake
/// that waits on the slice's second write is waiting on the cluster, not on Blink.
fn slowest_wakes(
    names: &[String],
    sent_at: &[Timestamp],
    answered_in: &[Duration],
    events: &[audit::AuditEvent],
    namespace: &str,
) {
    let slices = audit::endpoint_slice_writes(events, namespace);
    let scales = audit::scale_writes(events, namespace, "deployments");
    let mut order: Vec<usize> = (0..answered_in.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(answered_in[i]));
    println!("slowest wakes (ms after the first byte):");
    for &i in order.iter().take(3) {
        let (name, sent) = (&names[i], sent_at[i]);
        let end = Duration::from_millis(answered_in[i].as_millis() as u64 + 1);
        let after = |e: &audit::AuditEvent| {
            let at = e.request_received_timestamp.parse::<Timestamp>().ok()?;
            let since = span(sent, at);
            (at >= sent && since <= end).then(|| format!("{:.1}", since.as_secs_f64() * 1e3))
        };
        let object = |e: &audit::AuditEvent| {
            e.object_ref
                .as_ref()
                .and_then(|o| o.name.clone())
                .unwrap_or_default()
        };
        let patched: Vec<String> = scales
            .iter()
            .filter(|e| object(e) == *name)
            .filter_map(after)
            .collect();
        let prefix = format!("{name}-");
        let sliced: Vec<String> = slices
            .iter()
            .filter(|e| object(e).starts_with(&prefix))
            .filter_map(after)
            .collect();
        println!(
            "  {name}: answered at {:.1}; PATCH received at {}; EndpointSlice written at {}",
            answered_in[i].as_secs_f64() * 1e3,
            patched.join(", "),
            sliced.join(", ")
        );
    }
}

/// Sends `GET /` for `host` on `stream` (one write: its first byte is the request's),
/// asking the activator to close after the answer, and returns the whole answer.
async fn get_and_close(stream: &mut TcpStream, host: &str) -> anyhow::Result<String> {
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Waits until `name`'s Deployment reports a replica available (the status writes of a
/// wake are done).
/// The machine's CPU time from `/proc/stat`'s first line, in clock ticks.
struct CpuTimes {
    idle: u64,
    total: u64,
}

impl CpuTimes {
    fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("/proc/stat is empty")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        ensure!(ticks.len() >= 8, "/proc/stat: {line}");
        // user nice system idle iowait irq softirq steal, then guest times already
        // counted in user and nice: idle and iowait are the time no one wanted.
        Ok(Self {
            idle: ticks[3] + ticks[4],
            total: ticks[..8].iter().sum(),
        })
    }

    /// The idle share of the CPU time since `before` (1 when no tick passed).
    fn idle_since(&self, before: &Self) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 1.0;
        }
        self.idle.saturating_sub(before.idle) as f64 / total as f64
    }
}

/// `to - from`; zero if `to` is earlier (the audit log's times are whole microseconds).
fn span(from: Timestamp, to: Timestamp) -> Duration {
    Duration::from_nanos(u64::try_from(to.duration_since(from).as_nanos()).unwrap_or(0))
}

/// From a scaler's log: for each function of `namespace`, the wall-clock times a field
/// of one debug line carries (`poke applied` with `arrived_at`, `scale written after a
/// poke` with `sent_at`).
fn log_times(
    log: &str,
    message: &str,
    field: &str,
    namespace: &str,
) -> HashMap<String, Vec<Timestamp>> {
    let function = format!("function={namespace}/");
    let field = format!("{field}=");
    let mut times: HashMap<String, Vec<Timestamp>> = HashMap::new();
    for line in log
        .lines()
        .map(strip_colours)
        .filter(|l| l.contains(message))
    {
        let words = || line.split_whitespace();
        let name = words().find_map(|w| w.strip_prefix(function.as_str()));
        let at = words()
            .find_map(|w| w.strip_prefix(field.as_str()))
            .and_then(|t| t.parse::<Timestamp>().ok());
        if let (Some(name), Some(at)) = (name, at) {
            times.entry(name.to_owned()).or_default().push(at);
        }
    }
    times
}

/// A log line without its terminal colour codes (`ESC [ … m`).
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints p50, p90, p99 and the largest of `samples`.
fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms =
        |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "{what}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(1.0)
    );
}
