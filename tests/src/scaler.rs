//! A `blink-scaler` process for a test: its own credential (so the audit log names
//! it), its own ports, short clocks, following only the test's namespace, with its
//! Lease and activator ServiceAccount in that namespace too.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context as _;
use blink_crds::ScaledObject;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};

use crate::TestContext;

/// The ServiceAccount a test's scaler accepts demand reports from.
pub const ACTIVATOR_SERVICE_ACCOUNT: &str = "blink-activator";

#[derive(Debug)]
pub struct ScalerProcess {
    child: tokio::process::Child,
    pub user: String,
    pub demand_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub log: PathBuf,
}

/// A free port on 127.0.0.1 (bound and released; the scaler binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ScalerProcess {
    /// Starts `binary` (pass `env!("CARGO_BIN_EXE_scaler")`) as user `user`, with the
    /// test bed's short clocks; `extra` flags override them.
    pub async fn start(
        ctx: &TestContext,
        binary: &Path,
        user: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let kubeconfig = ctx.bed().credential(user, Some("system:masters"))?;
        let demand_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let admin_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log_dir = std::env::temp_dir().join("blink-tests");
        std::fs::create_dir_all(&log_dir)?;
        let log = log_dir.join(format!("{}-{user}.log", ctx.namespace()));
        let log_file = std::fs::File::create(&log)?;
        let ns = ctx.namespace();
        let mut args: Vec<String> = [
            "--pod-name",
            user,
            "--pod-ip",
            "127.0.0.1",
            "--namespace",
            ns,
            "--watch-namespace",
            ns,
            "--lease-duration",
            "5s",
            "--lease-grace",
            "2s",
            "--activator-service-account",
            ACTIVATOR_SERVICE_ACCOUNT,
            "--stall-after",
            "5s",
            "--resync",
            "5s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--demand-addr".into());
        args.push(demand_addr.to_string());
        args.push("--admin-addr".into());
        args.push(admin_addr.to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = crate::pods::pod_command(binary)
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,blink_scaler=debug")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let process = Self {
            child,
            user: user.to_owned(),
            demand_addr,
            admin_addr,
            log,
        };
        process.wait_ready().await?;
        Ok(process)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let url = format!("http://{}/readyz", self.admin_addr);
        let what = format!("scaler {} ready (log: {})", self.user, self.log.display());
        crate::wait::until_ok(Duration::from_secs(30), &what, &url).await
    }

    /// The scaler's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("http://{}/metrics", self.admin_addr))
            .await?
            .text()
            .await?)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident memory (VmRSS) in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// CPU time (user + system) so far, in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
    }

    /// A metric's value from `/metrics` (the first sample whose name and labels start
    /// with `prefix`).
    pub async fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        Ok(crate::sum_samples(&self.metrics().await?, prefix))
    }

    /// `kill -9`: no lease release, no goodbye.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait (the lease is released).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            self.kill().await;
        }
    }

    pub fn log_tail(&self) -> String {
        crate::log_tail(&self.log, 40)
    }
}

/// Removes Blink's finalizer from every ScaledObject of the namespace, so it can be
/// deleted after the test's scalers are gone.
pub async fn release_finalizers(ctx: &TestContext) -> anyhow::Result<()> {
    let api: Api<ScaledObject> = ctx.api();
    for object in api.list(&Default::default()).await? {
        let name = object.metadata.name.clone().unwrap_or_default();
        let patch = serde_json::json!({"metadata": {"finalizers": null}});
        let _ = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
    Ok(())
}

/// The demand address the Lease names (`holderIdentity: <pod>@<ip>:<port>`).
pub async fn leader_address(ctx: &TestContext) -> anyhow::Result<Option<(String, SocketAddr)>> {
    let leases: Api<Lease> = ctx.api();
    let Some(lease) = leases.get_opt("blink-scaler").await? else {
        return Ok(None);
    };
    let Some(holder) = lease.spec.and_then(|s| s.holder_identity) else {
        return Ok(None);
    };
    let Some((pod, addr)) = holder.split_once('@') else {
        return Ok(None);
    };
    Ok(addr.parse().ok().map(|a| (pod.to_owned(), a)))
}
