//! The activator's warm path against the same replica reached directly and through
//! nginx (Debian's, one worker, upstream keepalive), in one run, on the test bed.
//!
//! `tests/bed/bed exec cargo bench -p blink-tests --bench activator_warm`
//! (`BLINK_BENCH_ROUNDS`, default 3; `BLINK_BENCH_SECONDS` per measurement, default 5;
//! `BLINK_BENCH_BASELINE`, the path of another build of the activator to measure beside
//! this one as `baseline`; `BLINK_BENCH_ACTIVATOR`, the path of the build measured as
//! `activator`, by default this bench's own release build).
//!
//! Each round measures every path in turn, so a noisy moment hurts them alike, each
//! round starting one path further on than the one before:
//! - max rate: `wrk -t1 -c32` (Debian's wrk), requests per second and wrk's p50/p99;
//! - a fixed 5,000 requests per second over 32 connections from this process, latency
//!   taken from each request's send (from its scheduled time when the path had made
//!   it fall more than an interval behind, so a stall counts against the path): p50,
//!   p90, p99 and p99.9, and the proxy's CPU, context switches and preemptions (taken
//!   off the CPU with work in hand) per request over it;
//! - CPU per request of the proxy (activator process, nginx worker) during the max-rate
//!   run, from `/proc`, and its context switches per request (all its threads): each
//!   voluntary one is a wait for events that found none ready;
//! - TCP segments sent per request during the max-rate run, in the whole namespace:
//!   a proxy's least is four (the request and the answer, each way), the direct path's two;
//! - h2c with prior knowledge from the client at the maximum rate: `h2load` (Debian's
//!   nghttp2-client), 8 connections of 4 streams each (as many requests in flight as
//!   wrk's), its rate, p50/p99 from its per-request log, and the proxy's CPU per
//!   request. nginx listens for it on a port of its own (`listen … http2`); both
//!   proxies forward over HTTP/1.1, as they do for the replica here.
//!
//! Ratios are to the direct path of the same round; the table's medians are over rounds.
//! Each proxy's rate, CPU per request and p99 are also put against nginx's round by
//! round (the targets), and the median of those printed.
//!
//! `BLINK_BENCH_CALLGRIND=<requests>` counts instead of timing: every proxy runs under
//! valgrind's callgrind, and the instructions each executes in user space for that many
//! requests (32 connections, after a tenth as many to warm up) are divided by them. A
//! count does not move with the machine's noise, which hides differences of a few
//! percent in CPU time; it says nothing of the kernel's part, nor of cache misses.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use blink_tests::{
    TestContext,
    activator::Activators,
    pods::{PodProcesses, in_own_session, replica_command},
    workloads::{create_deployment, create_scaled_object},
};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const ACTIVATOR: &str = env!("CARGO_BIN_EXE_activator");
const REPLICA: &str = env!("CARGO_BIN_EXE_test-replica");
const CONNECTIONS: usize = 32;
const FIXED_RATE: u64 = 5_000;
const NGINX_PORT: u16 = 18_080;
const NGINX_H2C_PORT: u16 = 18_081;
/// h2load's clients and streams per client: `CONNECTIONS` requests in flight.
const H2C_CLIENTS: usize = 8;
const H2C_STREAMS: usize = CONNECTIONS / H2C_CLIENTS;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One way to the replica.
#[derive(Debug, Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// Where it takes h2c with prior knowledge (nginx: a port of its own).
    h2c_addr: SocketAddr,
    host: String,
    /// The proxy's process, whose CPU time is counted (none for the direct path).
    proxy_pid: Option<u32>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    max_rps: f64,
    max_p50_ms: f64,
    max_p99_ms: f64,
    cpu_us_per_request: Option<f64>,
    /// The kernel's share of it.
    system_us_per_request: Option<f64>,
    /// Times the proxy's threads gave up the CPU (waiting for events) or were made to.
    switches_per_request: Option<f64>,
    /// TCP segments sent in the bed's network per request, by every process: each one
    /// is a pass through the kernel's TCP stack, where most of a proxy's CPU goes.
    segments_per_request: f64,
    fixed_p50_ms: f64,
    fixed_p99_ms: f64,
    fixed_p90_ms: f64,
    fixed_p999_ms: f64,
    fixed_errors: usize,
    /// The proxy's CPU per request at the fixed rate, where each request meets a
    /// thread asleep: the wake-ups' share shows here, not at the maximum rate.
    fixed_cpu_us_per_request: Option<f64>,
    fixed_switches_per_request: Option<f64>,
    fixed_preemptions_per_request: Option<f64>,
    h2c_rps: f64,
    h2c_p50_ms: f64,
    h2c_p99_ms: f64,
    h2c_cpu_us_per_request: Option<f64>,
}

fn main() {
    blink_tests::run("bench-activator-warm", |ctx| async move {
        for (tool, package) in [
            ("wrk", "wrk"),
            ("nginx", "nginx"),
            ("h2load", "nghttp2-client"),
        ] {
            ensure!(
                which(tool),
                "{tool} is not installed: run tests/bed/install (it installs Debian's {package})"
            );
        }
        let rounds = env_number("BLINK_BENCH_ROUNDS", 3) as usize;
        let seconds = env_number("BLINK_BENCH_SECONDS", 5);
        let counted_requests = env_number("BLINK_BENCH_CALLGRIND", 0);
        let callgrind = (counted_requests > 0).then(Callgrind::new).transpose()?;
        let (replica, replica_addr) = start_replica(&ctx).await?;
        // As many threads as nginx has workers (one), as the comparison asks. A second
        // build of the activator (`BLINK_BENCH_BASELINE`, a path) is measured beside it
        // in the same rounds, so that a change is compared on the same noise.
        let baseline = std::env::var_os("BLINK_BENCH_BASELINE").map(PathBuf::from);
        let mut binaries = vec![blink_tests::activator::bench_binary(ACTIVATOR)];
        binaries.extend(baseline);
        if let Some(callgrind) = &callgrind {
            binaries = binaries
                .iter()
                .enumerate()
                .map(|(i, binary)| callgrind.wrapper(binary, i))
                .collect::<anyhow::Result<_>>()?;
        }
        let binary_paths: Vec<&Path> = binaries.iter().map(PathBuf::as_path).collect();
        let activators = Activators::start_mixed(
            &ctx,
            &binary_paths,
            i32::try_from(binaries.len())?,
            &["--worker-threads", "1"],
        )
        .await?;
        let host = format!("warm.{}", ctx.namespace());
        let nginx = Nginx::start(replica_addr, callgrind.as_ref()).await?;
        let mut paths = vec![
            Target {
                name: "direct",
                addr: replica_addr,
                h2c_addr: replica_addr,
                host: host.clone(),
                proxy_pid: None,
            },
            Target {
                name: "nginx",
                addr: nginx.addr,
                h2c_addr: nginx.h2c_addr,
                host: host.clone(),
                proxy_pid: Some(nginx.worker_pid()?),
            },
        ];
        for pod in &activators.pods {
            let name = if activators.binary(&pod.name).as_ref() == binaries.first() {
                "activator"
            } else {
                "baseline"
            };
            let addr: SocketAddr =
                format!("{}:{}", pod.ip, blink_tests::activator::PORT).parse()?;
            wait_for_200(addr, &host).await?;
            paths.push(Target {
                name,
                addr,
                h2c_addr: addr,
                host: host.clone(),
                proxy_pid: Some(
                    activators
                        .processes
                        .pid(&pod.name)
                        .await
                        .context("activator pid")?,
                ),
            });
        }
        paths.sort_by_key(|p| p.name != "direct" && p.name != "nginx" && p.name != "activator");
        if let Some(callgrind) = &callgrind {
            count_instructions(callgrind, &paths, counted_requests).await?;
            drop(nginx);
            activators.processes.shutdown().await;
            replica.shutdown().await;
            return Ok(());
        }
        for path in &paths {
            warm_up(path).await?;
        }
        let mut results: Vec<Vec<Measured>> = vec![Vec::new(); paths.len()];
        for round in 1..=rounds {
            // Each round starts one path further on, so that no path always follows
            // the same one, nor always sits at the same moment of the round (the
            // bed's own periodic work, the state a path before it leaves behind).
            for i in rotated(paths.len(), round - 1) {
                let path = &paths[i];
                let measured = measure(path, seconds).await?;
                println!(
                    "round {round} {:<9} max {:>8.0} rps (p50 {:.3} ms, p99 {:.3} ms{}) | {FIXED_RATE} rps: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms{}, errors {}",
                    path.name,
                    measured.max_rps,
                    measured.max_p50_ms,
                    measured.max_p99_ms,
                    measured
                        .cpu_us_per_request
                        .zip(measured.system_us_per_request)
                        .zip(measured.switches_per_request)
                        .map(|((us, system), switches)| format!(
                            ", {us:.1} µs CPU/request ({system:.1} kernel), {switches:.3} switches/request"
                        ))
                        .unwrap_or_default(),
                    measured.fixed_p50_ms,
                    measured.fixed_p90_ms,
                    measured.fixed_p99_ms,
                    measured.fixed_p999_ms,
                    measured
                        .fixed_cpu_us_per_request
                        .zip(measured.fixed_switches_per_request)
                        .zip(measured.fixed_preemptions_per_request)
                        .map(|((us, switches), preempted)| format!(
                            ", {us:.1} µs CPU/request, {switches:.3} switches/request ({preempted:.3} preempted)"
                        ))
                        .unwrap_or_default(),
                    measured.fixed_errors,
                );
                println!(
                    "round {round} {:<9} h2c max {:>8.0} rps (p50 {:.3} ms, p99 {:.3} ms{})",
                    path.name,
                    measured.h2c_rps,
                    measured.h2c_p50_ms,
                    measured.h2c_p99_ms,
                    measured
                        .h2c_cpu_us_per_request
                        .map(|us| format!(", {us:.1} µs CPU/request"))
                        .unwrap_or_default(),
                );
                results[i].push(measured);
            }
        }
        report(&paths, &results);
        drop(nginx);
        activators.processes.shutdown().await;
        replica.shutdown().await;
        Ok(())
    });
}

fn which(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A function with one replica (a release-built test replica on its pod IP) and a
/// ScaledObject the activator routes `warm.<namespace>` by.
async fn start_replica(ctx: &TestContext) -> anyhow::Result<(PodProcesses, SocketAddr)> {
    create_deployment(ctx, "warm", 1, serde_json::json!({})).await?;
    create_scaled_object(
        ctx,
        "
metadata: {name: warm}
spec:
  scaleTargetRef: {name: warm}
  minReplicaCount: 1
  triggers: [{type: http, metadata: {}}]
",
    )
    .await?;
    let replica = PodProcesses::start(ctx.client(), ctx.namespace(), "app=warm", |pod| {
        replica_command(Path::new(REPLICA), pod)
    });
    let pods = replica.wait_for(1, Duration::from_secs(60)).await?;
    let addr = SocketAddr::new(pods[0].ip, pods[0].port);
    Ok((replica, addr))
}

async fn wait_for_200(addr: SocketAddr, host: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut connection) = Client::connect(addr).await
            && connection.get(host).await.is_ok_and(|status| status == 200)
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{addr} did not answer 200 for {host}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Debian's nginx: one worker, an upstream with keepalive to the replica, configured to
/// do the activator's job: the same forwarded fields (`Forwarded`, `X-Forwarded-For`,
/// `-Host`, `-Proto`), and no connection closed after some number of requests (nginx
/// closes one after 1,000 by default on both sides; the activator never does).
struct Nginx {
    master: std::process::Child,
    addr: SocketAddr,
    /// Its h2c (prior knowledge) listener, same location.
    h2c_addr: SocketAddr,
    dir: PathBuf,
    /// One process, master and worker at once.
    single: bool,
}

impl Nginx {
    /// Under `callgrind` when given (its worker, forked, stays under it).
    async fn start(replica: SocketAddr, callgrind: Option<&Callgrind>) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("blink-bench-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{NGINX_PORT}").parse()?;
        let h2c_addr: SocketAddr = format!("127.0.0.1:{NGINX_H2C_PORT}").parse()?;
        // Under callgrind, the master is the worker: a forked worker cannot be reached
        // by `callgrind_control`. It serves requests the same way.
        let single = if callgrind.is_some() {
            "master_process off;"
        } else {
            ""
        };
        let config = format!(
            "worker_processes 1;
{single}
daemon off;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  upstream replica {{ server {replica}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen {addr};
    listen {h2c_addr} http2;
    location / {{
      proxy_pass http://replica;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header Forwarded \"for=$remote_addr;proto=$scheme;host=$host\";
    }}
  }}
}}
",
            dir = dir.display()
        );
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, config)?;
        // In a session, so a CPU group, of its own, as the activators are
        // (`pods::pod_command`): the proxies meet the CPU scheduler alike.
        let mut command = match callgrind {
            Some(callgrind) => {
                let mut command = in_own_session("valgrind".as_ref());
                command.args(callgrind.args("nginx")).arg("nginx");
                command
            }
            None => in_own_session("nginx".as_ref()),
        };
        let master = command
            .arg("-c")
            .arg(&config_path)
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let nginx = Self {
            master,
            addr,
            h2c_addr,
            dir,
            single: callgrind.is_some(),
        };
        wait_for_200(addr, "nginx.bench").await?;
        Ok(nginx)
    }

    /// The one worker: the master's child, or the master itself when single.
    fn worker_pid(&self) -> anyhow::Result<u32> {
        let master = self.master.id();
        if self.single {
            return Ok(master);
        }
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))?;
        children
            .split_whitespace()
            .next()
            .context("nginx has no worker")?
            .parse()
            .context("worker pid")
    }
}

impl Drop for Nginx {
    /// SIGTERM, so the master stops its worker too (a killed master leaves it behind,
    /// still listening).
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.master.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.master.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where callgrind writes its counts, and how a process is put under it.
struct Callgrind {
    dir: PathBuf,
}

impl Callgrind {
    fn new() -> anyhow::Result<Self> {
        ensure!(
            which("valgrind") && which("callgrind_control"),
            "valgrind is not installed (Debian's valgrind has callgrind)"
        );
        let dir =
            std::env::temp_dir().join(format!("blink-bench-callgrind-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// Instrumentation starts off: only what [`count_instructions`] turns on is
    /// counted, not start-up (which also runs at nearly full speed).
    fn args(&self, name: &str) -> Vec<String> {
        vec![
            "--tool=callgrind".to_owned(),
            "--instr-atstart=no".to_owned(),
            format!("--callgrind-out-file={}/{name}.%p.out", self.dir.display()),
        ]
    }

    /// A script that runs `binary` under callgrind with the arguments it is given.
    fn wrapper(&self, binary: &Path, index: usize) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let name = format!("activator-{index}");
        let path = self.dir.join(&name);
        let args = self.args(&name).join(" ");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nexec valgrind {args} {} \"$@\"\n",
                binary.display()
            ),
        )?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path)
    }

    /// Runs `callgrind_control <option> <pid>`.
    async fn control(&self, option: &[&str], pid: u32) -> anyhow::Result<()> {
        let output = tokio::process::Command::new("callgrind_control")
            .args(option)
            .arg(pid.to_string())
            .output()
            .await
            .context("running callgrind_control")?;
        ensure!(
            output.status.success(),
            "callgrind_control {option:?} {pid}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// The instructions counted since counting was turned on: dumps them, reads the
    /// dump's `totals:` line, and keeps the dump as `keep_as` for `callgrind_annotate`.
    async fn dump_total(&self, pid: u32, keep_as: &Path) -> anyhow::Result<u64> {
        self.control(&["--dump"], pid).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let dumps = std::fs::read_dir(&self.dir)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.contains(&format!(".{pid}.out.")))
                });
            for dump in dumps {
                let text = std::fs::read_to_string(&dump)?;
                // `totals: 123456`, which may run into what vgdb printed after it.
                if let Some(total) = text.lines().find_map(|l| l.strip_prefix("totals:")) {
                    let digits: String = total
                        .trim_start()
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    std::fs::rename(&dump, keep_as)?;
                    return digits.parse().context("callgrind totals");
                }
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = std::fs::read_dir(&self.dir)?
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                bail!("no callgrind dump from {pid} in {names:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Callgrind {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each proxy's user-space instructions per request, counted by callgrind over
/// `requests` requests, and put against nginx's.
async fn count_instructions(
    callgrind: &Callgrind,
    paths: &[Target],
    requests: u64,
) -> anyhow::Result<()> {
    let mut counted = Vec::new();
    for path in paths {
        let Some(pid) = path.proxy_pid else { continue };
        closed_loop(path, requests / 10).await?;
        callgrind.control(&["--instr=on"], pid).await?;
        closed_loop(path, requests).await?;
        callgrind.control(&["--instr=off"], pid).await?;
        let dump = std::env::temp_dir().join(format!("blink-bench-callgrind-{}.out", path.name));
        let total = callgrind.dump_total(pid, &dump).await?;
        counted.push((path.name, total as f64 / requests as f64));
    }
    println!(
        "user-space instructions per request (callgrind; {requests} requests over {CONNECTIONS} connections; the counts by function are in {}):",
        std::env::temp_dir()
            .join("blink-bench-callgrind-<path>.out")
            .display()
    );
    let nginx = counted
        .iter()
        .find(|(name, _)| *name == "nginx")
        .map(|(_, n)| *n);
    for (name, per_request) in &counted {
        let against = nginx.map_or(String::new(), |n| {
            format!(" ({:.3}× nginx's)", per_request / n)
        });
        println!("{name:<9} {per_request:>9.0}{against}");
    }
    Ok(())
}

/// Exactly `requests` requests, spread over `CONNECTIONS` connections each sending
/// its next as soon as it has its answer; every one must be answered 200.
async fn closed_loop(path: &Target, requests: u64) -> anyhow::Result<()> {
    let connections = CONNECTIONS as u64;
    let workers: Vec<_> = (0..connections)
        .map(|c| {
            let path = path.clone();
            let share = requests / connections + u64::from(c < requests % connections);
            tokio::spawn(async move {
                let mut client = Client::connect(path.addr).await?;
                for _ in 0..share {
                    let status = client.get(&path.host).await?;
                    ensure!(status == 200, "{} answered {status}", path.name);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

/// A few seconds of load, not counted: pools filled, caches warm.
async fn warm_up(path: &Target) -> anyhow::Result<()> {
    wrk(path, 2).await.map(|_| ())
}

async fn measure(path: &Target, seconds: u64) -> anyhow::Result<Measured> {
    let before = ProxyCounters::read(path)?;
    let segments_before = tcp_segments_sent()?;
    let max = wrk(path, seconds).await?;
    let segments = tcp_segments_sent()?.saturating_sub(segments_before);
    let during_max = ProxyCounters::since(path, before)?;
    let before = ProxyCounters::read(path)?;
    let fixed = fixed_rate(path, seconds).await?;
    let during_fixed = ProxyCounters::since(path, before)?;
    let before = ProxyCounters::read(path)?;
    let h2c = h2load(path, seconds).await?;
    let during_h2c = ProxyCounters::since(path, before)?;
    Ok(Measured {
        max_rps: max.rps,
        max_p50_ms: max.p50_ms,
        max_p99_ms: max.p99_ms,
        cpu_us_per_request: during_max.map(|c| c.cpu_us_per(max.requests)),
        system_us_per_request: during_max
            .map(|c| c.cpu.system.as_secs_f64() * 1e6 / max.requests as f64),
        switches_per_request: during_max.map(|c| c.switches as f64 / max.requests as f64),
        segments_per_request: segments as f64 / max.requests as f64,
        fixed_p50_ms: fixed.p50_ms,
        fixed_p99_ms: fixed.p99_ms,
        fixed_p90_ms: fixed.p90_ms,
        fixed_p999_ms: fixed.p999_ms,
        fixed_errors: fixed.errors,
        fixed_cpu_us_per_request: during_fixed.map(|c| c.cpu_us_per(fixed.requests)),
        fixed_switches_per_request: during_fixed.map(|c| c.switches as f64 / fixed.requests as f64),
        fixed_preemptions_per_request: during_fixed
            .map(|c| c.preemptions as f64 / fixed.requests as f64),
        h2c_rps: h2c.rps,
        h2c_p50_ms: h2c.p50_ms,
        h2c_p99_ms: h2c.p99_ms,
        h2c_cpu_us_per_request: during_h2c.map(|c| c.cpu_us_per(h2c.requests)),
    })
}

/// What the proxy's process (none on the direct path) has spent so far: read before
/// and after each run, the difference is the run's.
#[derive(Debug, Clone, Copy)]
struct ProxyCounters {
    cpu: CpuTime,
    switches: u64,
    preemptions: u64,
}

impl ProxyCounters {
    fn read(path: &Target) -> anyhow::Result<Option<Self>> {
        let Some(pid) = path.proxy_pid else {
            return Ok(None);
        };
        Ok(Some(Self {
            cpu: cpu_time(pid)?,
            switches: context_switches(pid)?,
            preemptions: preemptions(pid)?,
        }))
    }

    /// What the proxy spent since `before` was read.
    fn since(path: &Target, before: Option<Self>) -> anyhow::Result<Option<Self>> {
        Ok(Self::read(path)?.zip(before).map(|(now, before)| Self {
            cpu: now.cpu.since(before.cpu),
            switches: now.switches.saturating_sub(before.switches),
            preemptions: now.preemptions.saturating_sub(before.preemptions),
        }))
    }

    fn cpu_us_per(&self, requests: u64) -> f64 {
        (self.cpu.user + self.cpu.system).as_secs_f64() * 1e6 / requests as f64
    }
}

#[derive(Debug, Clone, Copy)]
struct CpuTime {
    user: Duration,
    system: Duration,
}

impl CpuTime {
    fn since(self, before: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }
}

/// User and system CPU time of a process so far.
fn cpu_time(pid: u32) -> anyhow::Result<CpuTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // `/proc` counts in USER_HZ, 100 on Linux whatever the kernel's own tick.
    let ticks = |field: &str| -> anyhow::Result<Duration> {
        Ok(Duration::from_millis(field.parse::<u64>()? * 10))
    };
    Ok(CpuTime {
        user: ticks(fields[11])?,
        system: ticks(fields[12])?,
    })
}

/// TCP segments sent so far in this network namespace (`Tcp: OutSegs`).
fn tcp_segments_sent() -> anyhow::Result<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp")?;
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = tcp.next().zip(tcp.next()).context("no Tcp lines")?;
    let column = names
        .split_whitespace()
        .position(|name| name == "OutSegs")
        .context("no OutSegs")?;
    let value = values
        .split_whitespace()
        .nth(column)
        .context("OutSegs value")?;
    Ok(value.parse()?)
}

/// Context switches of all of a process's threads so far, voluntary or not.
fn context_switches(pid: u32) -> anyhow::Result<u64> {
    switches_counted(
        pid,
        &["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"],
    )
}

/// Times a process's threads were taken off the CPU while they had work: each one
/// holds up the requests in hand for the time slice another thread got.
fn preemptions(pid: u32) -> anyhow::Result<u64> {
    switches_counted(pid, &["nonvoluntary_ctxt_switches:"])
}

fn switches_counted(pid: u32, fields: &[&str]) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread can end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(count) = fields.iter().find_map(|field| line.strip_prefix(field)) {
                total += count.trim().parse::<u64>()?;
            }
        }
    }
    Ok(total)
}

struct WrkResult {
    rps: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn wrk(path: &Target, seconds: u64) -> anyhow::Result<WrkResult> {
    let output = tokio::process::Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-H",
            &format!("Host: {}", path.host),
            &format!("http://{}/", path.addr),
        ])
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "wrk failed: {text}");
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("{} answered errors under load:\n{text}", path.name);
    }
    let value_after = |label: &str| -> anyhow::Result<String> {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(label).map(str::trim))
            .map(str::to_owned)
            .with_context(|| format!("wrk output has no {label:?}:\n{text}"))
    };
    // "  123456 requests in 5.00s, 12.34MB read"
    let requests: u64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("wrk's request count:\n{text}"))?;
    Ok(WrkResult {
        rps: value_after("Requests/sec:")?.parse()?,
        requests,
        p50_ms: wrk_duration_ms(&value_after("50%")?)?,
        p99_ms: wrk_duration_ms(&value_after("99%")?)?,
    })
}

/// h2load at the maximum rate over h2c with prior knowledge; the percentiles come
/// from its per-request log (start µs, status, latency µs), as it prints none.
async fn h2load(path: &Target, seconds: u64) -> anyhow::Result<WrkResult> {
    let log = std::env::temp_dir().join(format!(
        "blink-bench-h2load-{}-{}.tsv",
        std::process::id(),
        path.name
    ));
    let output = tokio::process::Command::new("h2load")
        .args([
            "-t1",
            &format!("-c{H2C_CLIENTS}"),
            &format!("-m{H2C_STREAMS}"),
            &format!("-D{seconds}"),
            "-H",
            &format!(":authority: {}", path.host),
            "--log-file",
        ])
        .arg(&log)
        .arg(format!("http://{}/", path.h2c_addr))
        .output()
        .await
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(output.status.success(), "h2load failed: {text}");
    // "requests: 250000 total, 250032 started, 250000 done, 250000 succeeded, 0 failed, …"
    // and "status codes: 250000 2xx, 0 3xx, 0 4xx, 0 5xx".
    let counts = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .with_context(|| format!("h2load's request counts:\n{text}"))?;
    let count_of = |what: &str| -> Option<u64> {
        counts
            .split(',')
            .find(|part| part.trim().ends_with(what))
            .and_then(|part| part.split_whitespace().find_map(|w| w.parse().ok()))
    };
    let (succeeded, failed) = (count_of("succeeded"), count_of("failed"));
    ensure!(
        failed == Some(0) && succeeded.is_some_and(|n| n > 0),
        "{} answered errors over h2c:\n{text}",
        path.name
    );
    // Its status count can include one answer that came after the duration ended.
    let others_than_2xx: Option<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("status codes:"))
        .map(|l| {
            l.split(',')
                .filter(|part| !part.trim().ends_with("2xx"))
                .filter_map(|part| part.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        });
    ensure!(
        others_than_2xx == Some(0),
        "{} answered other than 2xx over h2c:\n{text}",
        path.name
    );
    // "finished in 5.00s, 51234.56 req/s, 1.23MB/s"
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|part| part.trim().strip_suffix(" req/s"))
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("h2load's rate:\n{text}"))?;
    let mut latencies_us: Vec<u64> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|line| line.split('\t').nth(2)?.parse().ok())
        .collect();
    let _ = std::fs::remove_file(&log);
    ensure!(!latencies_us.is_empty(), "h2load's log is empty");
    latencies_us.sort_unstable();
    let quantile_ms =
        |q: f64| latencies_us[((latencies_us.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    Ok(WrkResult {
        rps,
        requests: succeeded.unwrap_or_default(),
        p50_ms: quantile_ms(0.5),
        p99_ms: quantile_ms(0.99),
    })
}

/// wrk's `123.45us` / `1.23ms` / `1.02s` in milliseconds.
fn wrk_duration_ms(text: &str) -> anyhow::Result<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        bail!("wrk duration {text:?}")
    };
    Ok(number.parse::<f64>()? * factor)
}

/// One HTTP/1.1 connection of the fixed-rate client.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    async fn get(&mut self, host: &str) -> anyhow::Result<u16> {
        self.sender.ready().await?;
        let request = http::Request::get("/")
            .header(http::header::HOST, host)
            .body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        Ok(status)
    }
}

struct FixedResult {
    p50_ms: f64,
    p99_ms: f64,
    /// The shape of the tail, printed round by round: whether a p99 apart comes from
    /// all slower requests (p90 apart too) or from a few stalls (p99.9 alone).
    p90_ms: f64,
    p999_ms: f64,
    errors: usize,
    /// Requests sent, answered or not.
    requests: u64,
}

/// `FIXED_RATE` requests per second spread over `CONNECTIONS` connections, each
/// request's latency taken from when it was due (coordinated omission corrected).
async fn fixed_rate(path: &Target, seconds: u64) -> anyhow::Result<FixedResult> {
    let interval = Duration::from_secs_f64(CONNECTIONS as f64 / FIXED_RATE as f64);
    let per_connection = (seconds * FIXED_RATE) as usize / CONNECTIONS;
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let path = path.clone();
            tokio::spawn(async move {
                let mut client = Client::connect(path.addr).await?;
                // Connections are staggered over one interval.
                let offset = interval.mul_f64(c as f64 / CONNECTIONS as f64);
                let mut latencies = Vec::with_capacity(per_connection);
                let mut errors = 0;
                for i in 0..per_connection {
                    let due = start + offset + interval * i as u32;
                    tokio::time::sleep_until(due).await;
                    // From the send, not from when it was due: the timer itself fires
                    // up to a millisecond late. A request more than an interval
                    // behind (the path stalled earlier ones) counts from when it was
                    // due, so a stall is not hidden.
                    let sent = tokio::time::Instant::now();
                    let from = if sent - due > interval { due } else { sent };
                    match client.get(&path.host).await {
                        Ok(200) => latencies.push(from.elapsed()),
                        _ => {
                            errors += 1;
                            client = Client::connect(path.addr).await?;
                        }
                    }
                }
                anyhow::Ok((latencies, errors))
            })
        })
        .collect();
    let mut all = Vec::with_capacity(per_connection * CONNECTIONS);
    let mut errors = 0;
    for worker in workers {
        let (latencies, failed) = worker.await??;
        all.extend(latencies);
        errors += failed;
    }
    all.sort();
    let quantile = |q: f64| -> f64 {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    Ok(FixedResult {
        p50_ms: quantile(0.50),
        p99_ms: quantile(0.99),
        p90_ms: quantile(0.90),
        p999_ms: quantile(0.999),
        errors,
        requests: (all.len() + errors) as u64,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `0..len`, started at `by % len` and wrapped around.
fn rotated(len: usize, by: usize) -> impl Iterator<Item = usize> {
    (0..len).map(move |i| (i + by) % len)
}

/// The median over rounds of `f(a round)`, rounds without a value left out.
fn over_rounds(measured: &[Measured], f: impl Fn(&Measured) -> Option<f64>) -> f64 {
    median(measured.iter().filter_map(f).collect())
}

/// In how many rounds `rate(this path)` was at or above `rate(the other path)`: a
/// median near 1 says as much of a tie as of a draw, the count of rounds won says which.
fn rounds_at_or_above(
    measured: &[Measured],
    other: &[Measured],
    rate: fn(&Measured) -> f64,
) -> usize {
    measured
        .iter()
        .zip(other)
        .filter(|(m, o)| rate(m) >= rate(o))
        .count()
}

/// The median over rounds of `f(this path's round, the other path's same round)`.
fn per_round(
    measured: &[Measured],
    other: &[Measured],
    f: impl Fn(&Measured, &Measured) -> Option<f64>,
) -> f64 {
    median(
        measured
            .iter()
            .zip(other)
            .filter_map(|(m, o)| f(m, o))
            .collect(),
    )
}

/// Paths in order: direct, nginx, then the activators.
fn report(paths: &[Target], results: &[Vec<Measured>]) {
    let direct = &results[0];
    println!();
    println!(
        "medians over {} rounds (ratios: to direct in the same round)",
        direct.len()
    );
    // The targets are against nginx: each proxy put against it round by round.
    let nginx = &results[1];
    for (i, (path, measured)) in paths.iter().zip(results).enumerate() {
        let rate_ratio = per_round(measured, direct, |m, d| Some(m.max_rps / d.max_rps));
        let added_p99 = per_round(measured, direct, |m, d| {
            Some(m.fixed_p99_ms - d.fixed_p99_ms)
        });
        let cpu = over_rounds(measured, |m| m.cpu_us_per_request);
        let system = over_rounds(measured, |m| m.system_us_per_request);
        let switches = over_rounds(measured, |m| m.switches_per_request);
        let segments = median(measured.iter().map(|m| m.segments_per_request).collect());
        let fixed_cpu = over_rounds(measured, |m| m.fixed_cpu_us_per_request);
        let fixed_switches = over_rounds(measured, |m| m.fixed_switches_per_request);
        if i > 1 {
            let rate = per_round(measured, nginx, |m, n| Some(m.max_rps / n.max_rps));
            let cpu = per_round(measured, nginx, |m, n| {
                Some(m.cpu_us_per_request? / n.cpu_us_per_request?)
            });
            let p99 = per_round(measured, nginx, |m, n| {
                Some(m.fixed_p99_ms - n.fixed_p99_ms)
            });
            let p50 = per_round(measured, nginx, |m, n| {
                Some(m.fixed_p50_ms - n.fixed_p50_ms)
            });
            let p90 = per_round(measured, nginx, |m, n| {
                Some(m.fixed_p90_ms - n.fixed_p90_ms)
            });
            let p999 = per_round(measured, nginx, |m, n| {
                Some(m.fixed_p999_ms - n.fixed_p999_ms)
            });
            let fixed_cpu_ratio = per_round(measured, nginx, |m, n| {
                Some(m.fixed_cpu_us_per_request? / n.fixed_cpu_us_per_request?)
            });
            let faster = rounds_at_or_above(measured, nginx, |m| m.max_rps);
            println!(
                "{:<9} against nginx, round by round (medians): rate {rate:.2}× (at or above nginx's in {faster} of {} rounds), CPU per request {cpu:.2}×; at {FIXED_RATE} rps p50 {p50:+.3} ms, p90 {p90:+.3} ms, p99 {p99:+.3} ms, p99.9 {p999:+.3} ms, CPU per request {fixed_cpu_ratio:.2}×",
                path.name,
                measured.len()
            );
            let h2c_rate = per_round(measured, nginx, |m, n| Some(m.h2c_rps / n.h2c_rps));
            let h2c_cpu = per_round(measured, nginx, |m, n| {
                Some(m.h2c_cpu_us_per_request? / n.h2c_cpu_us_per_request?)
            });
            let h2c_faster = rounds_at_or_above(measured, nginx, |m| m.h2c_rps);
            println!(
                "{:<9} h2c against nginx, round by round (medians): rate {h2c_rate:.2}× (at or above nginx's in {h2c_faster} of {} rounds), CPU per request {h2c_cpu:.2}×",
                path.name,
                measured.len()
            );
        }
        println!(
            "{:<9} max {:>8.0} rps ({:.2} of direct), p50/p99 {:.3}/{:.3} ms, {segments:.2} TCP segments/request | {FIXED_RATE} rps p50/p99 {:.3}/{:.3} ms, p99 added {:+.3} ms{} | CPU {} | errors {}",
            path.name,
            median(measured.iter().map(|m| m.max_rps).collect()),
            rate_ratio,
            median(measured.iter().map(|m| m.max_p50_ms).collect()),
            median(measured.iter().map(|m| m.max_p99_ms).collect()),
            median(measured.iter().map(|m| m.fixed_p50_ms).collect()),
            median(measured.iter().map(|m| m.fixed_p99_ms).collect()),
            added_p99,
            if fixed_cpu.is_nan() {
                String::new()
            } else {
                format!(", {fixed_cpu:.1} µs CPU/request, {fixed_switches:.3} switches/request")
            },
            if cpu.is_nan() {
                "—".to_owned()
            } else {
                format!("{cpu:.1} µs/request ({system:.1} kernel), {switches:.3} switches/request")
            },
            measured.iter().map(|m| m.fixed_errors).sum::<usize>(),
        );
        let h2c_cpu = over_rounds(measured, |m| m.h2c_cpu_us_per_request);
        println!(
            "{:<9} h2c max {:>8.0} rps ({:.2} of direct), p50/p99 {:.3}/{:.3} ms | CPU {}",
            path.name,
            median(measured.iter().map(|m| m.h2c_rps).collect()),
            per_round(measured, direct, |m, d| Some(m.h2c_rps / d.h2c_rps)),
            median(measured.iter().map(|m| m.h2c_p50_ms).collect()),
            median(measured.iter().map(|m| m.h2c_p99_ms).collect()),
            if h2c_cpu.is_nan() {
                "—".to_owned()
            } else {
                format!("{h2c_cpu:.1} µs/request")
            },
        );
    }
}
