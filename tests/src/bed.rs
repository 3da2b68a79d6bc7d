//! Finding, starting and entering the test bed (`tests/bed/bed`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// How to reach the running bed: the `KEY=value` lines `bed start` writes.
#[derive(Debug, Clone)]
pub struct BedEnv {
    pub run_dir: PathBuf,
    pub netns: String,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub audit_log: PathBuf,
    pub amqp_url: String,
    pub rabbitmq_management_url: String,
    pub kafka_bootstrap: String,
}

/// The folder of the bed's scripts (`tests/bed`).
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bed")
}

fn run_dir() -> PathBuf {
    std::env::var_os("BLINK_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/blink-bed"))
}

/// The bed of this test run: started once (or reused when one runs), then shared by
/// every test of the process.
pub fn shared() -> anyhow::Result<&'static BedEnv> {
    static BED: OnceLock<Result<BedEnv, String>> = OnceLock::new();
    BED.get_or_init(|| start_or_reuse().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn start_or_reuse() -> anyhow::Result<BedEnv> {
    // `bed start` reuses a running bed (and says so) or cleans up a leftover first.
    let script = scripts_dir().join("bed");
    let status = Command::new(&script)
        .arg("start")
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} start failed ({status})", script.display());
    }
    BedEnv::read(&run_dir().join("env"))
}

impl BedEnv {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .collect();
        let get = |key: &str| {
            vars.get(key)
                .map(|v| v.to_string())
                .with_context(|| format!("{key} missing from {}", path.display()))
        };
        Ok(Self {
            run_dir: get("BLINK_BED_RUN")?.into(),
            netns: get("BLINK_NETNS")?,
            kubeconfig: get("KUBECONFIG")?.into(),
            kubectl: get("BLINK_KUBECTL")?.into(),
            audit_log: get("BLINK_AUDIT_LOG")?.into(),
            amqp_url: get("BLINK_AMQP_URL")?,
            rabbitmq_management_url: get("BLINK_RABBITMQ_MANAGEMENT_URL")?,
            kafka_bootstrap: get("BLINK_KAFKA_BOOTSTRAP")?,
        })
    }

    /// Moves the calling thread into the bed's network namespace. A network namespace
    /// is per thread: threads and processes created afterwards by this thread inherit
    /// it, which is why [`crate::run`] builds its runtime after this call.
    pub fn enter_namespace(&self) -> anyhow::Result<()> {
        let path = Path::new("/run/netns").join(&self.netns);
        let ns =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", path.display()))?;
        Ok(())
    }

    /// A kubeconfig for a client certificate of user `name` (optionally in `group`),
    /// so each component a test runs has its own identity in the audit log.
    pub fn credential(&self, name: &str, group: Option<&str>) -> anyhow::Result<PathBuf> {
        let mut cmd = Command::new(scripts_dir().join("bed"));
        cmd.args(["credential", name]);
        if let Some(group) = group {
            cmd.arg(group);
        }
        let out = cmd.output().context("running bed credential")?;
        if !out.status.success() {
            bail!(
                "bed credential {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.read_timeout = Some(Duration::from_secs(60));
    Ok(Client::try_from(config)?)
}

/// Installs (server-side applies) Blink's CRDs and waits until they are served.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("blink-tests").force();
    for crd in blink_crds::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        crate::wait::until(
            Duration::from_secs(30),
            &format!("CRD {name} established"),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let crd = crds.get(&name).await?;
                    let established = crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    Ok(established.then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(())
}
