//! Private broker instances for tests that stop or break a broker, so other tests
//! running at the same time keep the bed's shared brokers. Each runs the bed's own
//! scripts (`tests/bed/rabbitmq`, `tests/bed/kafka`) in a directory of its own, on
//! ports of its own, inside the namespace (the test's thread is already there).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::bed::scripts_dir;

/// Ports for private brokers come from 30000–39999, below the namespace's ephemeral
/// range (40000+, set by the bed), each instance a block of 16, offset by process so
/// test binaries running at once do not collide.
fn port_block() -> anyhow::Result<u16> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    for _ in 0..64 {
        let slot = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = 30000 + ((std::process::id() as u16 % 20) * 32 + slot % 32) * 16;
        if base > 39_984 {
            continue;
        }
        let free = (base..base + 16).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return Ok(base);
        }
    }
    bail!("no free block of ports for a private broker in 30000-39999")
}

/// A broker process and its directory; stopped (SIGTERM, then its process group
/// killed) on [`stop`](Broker::stop) or drop.
#[derive(Debug)]
struct Broker {
    name: &'static str,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Broker {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let script = scripts_dir().join(self.name);
        let log = std::fs::File::create(self.dir.join("serve.log"))?;
        let child = Command::new(&script)
            .arg("serve")
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group, so a kill reaches the JVM / Erlang VM under it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        self.child = Some(child);
        Ok(())
    }

    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait().await;
            }
        }
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log"))
            .map(|s| {
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(10)..].join("\n")
            })
            .unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(pid) = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .and_then(|id| i32::try_from(id).ok())
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn private_dir(env: &crate::BedEnv, kind: &str) -> anyhow::Result<PathBuf> {
    let dir = env
        .run_dir
        .join("data")
        .join(format!("{kind}-{}", crate::random_suffix()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A RabbitMQ broker of the test's own.
#[derive(Debug)]
pub struct PrivateRabbitMq {
    broker: Broker,
    pub amqp_url: String,
    pub management_url: String,
    management_port: u16,
}

impl PrivateRabbitMq {
    pub async fn start(env: &crate::BedEnv) -> anyhow::Result<Self> {
        let base = port_block()?;
        let (amqp, mgmt, dist, epmd) = (base, base + 1, base + 2, base + 15);
        let dir = private_dir(env, "rabbitmq")?;
        let mut broker = Broker {
            name: "rabbitmq",
            args: vec![
                dir.display().to_string(),
                amqp.to_string(),
                mgmt.to_string(),
                dist.to_string(),
                epmd.to_string(),
            ],
            dir,
            child: None,
        };
        broker.spawn()?;
        let mut this = Self {
            broker,
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp}/%2f"),
            management_url: format!("http://guest:guest@127.0.0.1:{mgmt}"),
            management_port: mgmt,
        };
        this.wait_ready().await?;
        Ok(this)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/api/overview", self.management_port);
        let http = reqwest::Client::new();
        let ready = crate::wait::until(Duration::from_secs(90), "private RabbitMQ", || {
            let req = http.get(&url).basic_auth("guest", Some("guest"));
            async move { Ok(req.send().await?.status().is_success().then_some(())) }
        })
        .await;
        ready.with_context(|| format!("log:\n{}", self.broker.log_tail()))?;
        // The management API can answer before the AMQP listener is up (RabbitMQ starts
        // client listeners last): ready means an AMQP connection is accepted too.
        let amqp_url = self.amqp_url.clone();
        let ready = crate::wait::until(Duration::from_secs(90), "private RabbitMQ's AMQP", || {
            let amqp_url = amqp_url.clone();
            async move {
                Ok(match crate::rabbitmq::connect(&amqp_url).await {
                    Ok(conn) => {
                        conn.close(200, "ready".into()).await.ok();
                        Some(())
                    }
                    Err(_) => None,
                })
            }
        })
        .await;
        ready.with_context(|| format!("log:\n{}", self.broker.log_tail()))
    }

    /// Stops the broker (gracefully: persistent messages survive).
    pub async fn stop(&mut self) {
        self.broker.stop().await;
    }

    /// Starts it again on the same ports and data, and waits until it serves.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.broker.stop().await;
        self.broker.spawn()?;
        self.wait_ready().await
    }
}

/// A Kafka broker of the test's own.
#[derive(Debug)]
pub struct PrivateKafka {
    broker: Broker,
    pub bootstrap: String,
}

impl PrivateKafka {
    pub async fn start(env: &crate::BedEnv) -> anyhow::Result<Self> {
        let base = port_block()?;
        let dir = private_dir(env, "kafka")?;
        let mut broker = Broker {
            name: "kafka",
            args: vec![
                dir.display().to_string(),
                base.to_string(),
                (base + 1).to_string(),
            ],
            dir,
            child: None,
        };
        broker.spawn()?;
        let mut this = Self {
            broker,
            bootstrap: format!("127.0.0.1:{base}"),
        };
        this.wait_ready().await?;
        Ok(this)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let bootstrap = self.bootstrap.clone();
        let ready = crate::wait::until(Duration::from_secs(90), "private Kafka", || {
            let bootstrap = bootstrap.clone();
            async move {
                let ok = tokio::task::spawn_blocking(move || crate::kafka::cluster_id(&bootstrap))
                    .await??;
                Ok(Some(ok))
            }
        })
        .await;
        ready
            .map(|_| ())
            .with_context(|| format!("log:\n{}", self.broker.log_tail()))
    }

    pub async fn stop(&mut self) {
        self.broker.stop().await;
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.broker.stop().await;
        self.broker.spawn()?;
        self.wait_ready().await
    }
}
