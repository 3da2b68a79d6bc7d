//! Activators for a test: a Deployment and Service named `blink-activator` in the
//! test's namespace (the scaler's namespace too), and a real `blink-activator` process
//! on each of its pod IPs, with a ServiceAccount token for the `blink-scaler` audience
//! and its own credential.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use serde_json::json;

use crate::{
    TestContext,
    demand::service_account_token,
    pods::{PodInfo, PodProcesses, pod_command},
    scaler::ACTIVATOR_SERVICE_ACCOUNT,
    workloads::create_deployment,
};

/// The port activators serve on (the Deployment's container port `http`).
pub const PORT: u16 = 8080;
/// Their admin port.
pub const ADMIN_PORT: u16 = 9091;

/// The build of the activator a benchmark measures: `BLINK_BENCH_ACTIVATOR` (a path,
/// e.g. the profile-guided build of `tests/bed/release-activator`), else `built`, the
/// bench's own release build.
pub fn bench_binary(built: &str) -> std::path::PathBuf {
    std::env::var_os("BLINK_BENCH_ACTIVATOR").map_or_else(|| built.into(), Into::into)
}

#[derive(Debug)]
pub struct Activators {
    pub processes: PodProcesses,
    pub pods: Vec<PodInfo>,
    pub log_dir: PathBuf,
    /// Which binary each pod runs (by pod name).
    binaries: Arc<Mutex<HashMap<String, PathBuf>>>,
}

impl Activators {
    /// Starts `replicas` activators (pass `env!("CARGO_BIN_EXE_activator")`); `extra`
    /// flags are added to each.
    pub async fn start(
        ctx: &TestContext,
        binary: &Path,
        replicas: i32,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_mixed(ctx, &[binary], replicas, extra).await
    }

    /// The same, the pods taking `binaries` in turn as they start (a benchmark compares
    /// two builds this way); [`Activators::binary`] says which pod runs which.
    pub async fn start_mixed(
        ctx: &TestContext,
        binaries: &[&Path],
        replicas: i32,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let token =
            service_account_token(ctx, ACTIVATOR_SERVICE_ACCOUNT, Some("blink-scaler")).await?;
        Self::start_with_token(ctx, binaries, replicas, extra, &token).await
    }

    /// The same, with `token` in the token file instead of one the scaler accepts
    /// ([`Activators::token_file`] can be written later, as the kubelet renews it).
    pub async fn start_with_token(
        ctx: &TestContext,
        binaries: &[&Path],
        replicas: i32,
        extra: &[&str],
        token: &str,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!binaries.is_empty(), "no activator binary given");
        create_deployment(ctx, "blink-activator", replicas, json!({})).await?;
        let log_dir = std::env::temp_dir()
            .join("blink-tests")
            .join(format!("{}-activators", ctx.namespace()));
        std::fs::create_dir_all(&log_dir)?;
        let token_file = log_dir.join("token");
        std::fs::write(&token_file, token)?;
        let kubeconfig = ctx
            .bed()
            .credential("blink-activator", Some("system:masters"))?;
        let choices: Vec<PathBuf> = binaries.iter().map(|b| b.to_path_buf()).collect();
        let started = AtomicUsize::new(0);
        let chosen = Arc::new(Mutex::new(HashMap::new()));
        let record = chosen.clone();
        let namespace = ctx.namespace().to_owned();
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let logs = log_dir.clone();
        let processes = PodProcesses::start(
            ctx.client(),
            ctx.namespace(),
            "app=blink-activator",
            move |pod| {
                let binary = &choices[started.fetch_add(1, Ordering::Relaxed) % choices.len()];
                if let Ok(mut record) = record.lock() {
                    record.insert(pod.name.clone(), binary.clone());
                }
                let mut cmd = pod_command(binary);
                cmd.args([
                    "--listen",
                    &format!("{}:{PORT}", pod.ip),
                    "--admin-addr",
                    &format!("{}:{ADMIN_PORT}", pod.ip),
                    "--pod-name",
                    &pod.name,
                    "--namespace",
                    &namespace,
                    "--watch-namespace",
                    &namespace,
                    "--token-file",
                ])
                .arg(&token_file)
                .args(&extra)
                .env("KUBECONFIG", &kubeconfig)
                .env("RUST_LOG", "info,blink_activator=debug");
                if let Ok(log) = std::fs::File::create(logs.join(format!("{}.log", pod.name))) {
                    if let Ok(copy) = log.try_clone() {
                        cmd.stdout(copy);
                    }
                    cmd.stderr(log);
                }
                cmd
            },
        );
        let pods = processes
            .wait_for(usize::try_from(replicas)?, Duration::from_secs(60))
            .await?;
        let activators = Self {
            processes,
            pods,
            log_dir,
            binaries: chosen,
        };
        for pod in &activators.pods {
            activators.wait_ready(pod).await?;
        }
        Ok(activators)
    }

    /// The binary `pod` runs.
    pub fn binary(&self, pod: &str) -> Option<PathBuf> {
        self.binaries.lock().ok()?.get(pod).cloned()
    }

    async fn wait_ready(&self, pod: &PodInfo) -> anyhow::Result<()> {
        let url = format!("http://{}:{ADMIN_PORT}/readyz", pod.ip);
        let what = format!(
            "activator {} ready (logs: {})",
            pod.name,
            self.log_dir.display()
        );
        crate::wait::until_ok(Duration::from_secs(30), &what, &url).await
    }

    /// `http://<pod ip>:8080` of activator `index`.
    pub fn url(&self, index: usize) -> String {
        format!("http://{}:{PORT}", self.pods[index].ip)
    }

    /// The `/metrics` text of activator `index`.
    pub async fn metrics(&self, index: usize) -> anyhow::Result<String> {
        let url = format!("http://{}:{ADMIN_PORT}/metrics", self.pods[index].ip);
        Ok(reqwest::get(url).await?.text().await?)
    }

    /// The sum of the samples of activator `index` whose line starts with `prefix`.
    pub async fn metric(&self, index: usize, prefix: &str) -> anyhow::Result<f64> {
        Ok(crate::sum_samples(&self.metrics(index).await?, prefix))
    }

    /// Waits until activator 0 routes function `name` of `namespace` (its series
    /// appear once the activator's watch has seen the object).
    pub async fn until_routed(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let series =
            format!("blink_activator_in_flight{{namespace=\"{namespace}\",name=\"{name}\"}}");
        crate::wait::until(
            Duration::from_secs(60),
            &format!("the activator routes {name}"),
            || async { Ok(self.metrics(0).await?.contains(&series).then_some(())) },
        )
        .await
    }

    /// The file every activator reads its ServiceAccount token from.
    pub fn token_file(&self) -> PathBuf {
        self.log_dir.join("token")
    }

    /// Activator `index`'s log (its debug lines included).
    pub fn log_path(&self, index: usize) -> PathBuf {
        self.log_dir.join(format!("{}.log", self.pods[index].name))
    }

    /// The last lines of activator `index`'s log.
    pub fn log_tail(&self, index: usize) -> String {
        crate::log_tail(&self.log_path(index), 40)
    }
}

/// A request to `url` (an activator) for `host`, with a client timeout.
pub async fn get(url: &str, host: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let response = reqwest::Client::builder()
        .timeout(timeout)
        .build()?
        .get(url)
        .header(reqwest::header::HOST, host)
        .send()
        .await
        .with_context(|| format!("GET {url} for {host}"))?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}
