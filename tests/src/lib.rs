//! The test bed seen from Rust.
//!
//! Every test that needs real servers is written as
//!
//! ```no_run
//! #[test]
//! fn deployment_scales() {
//!     blink_tests::run("deploy", |ctx| async move {
//!         // ctx.client(), ctx.namespace(), ctx.bed().amqp_url, ...
//!         Ok(())
//!     });
//! }
//! ```
//!
//! [`run`] starts the test bed once per test run (or reuses a running one), moves the
//! test's thread into the bed's network namespace — where pod IPs are local addresses
//! and ClusterIPs work — builds a runtime there, installs Blink's CRDs, and hands the
//! test a client and a namespace of its own. So plain `cargo test` works from outside
//! the namespace, and so does `bed exec cargo test`.
#![forbid(unsafe_code)]

pub mod activator;
pub mod audit;
pub mod bed;
pub mod brokers;
pub mod demand;
pub mod kafka;
pub mod pods;
pub mod prometheus;
pub mod rabbitmq;
pub mod scaler;
pub mod wait;
pub mod workloads;

use std::future::Future;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};

pub use bed::BedEnv;

/// What a test gets: the bed's addresses, a client (cluster admin), and a fresh
/// namespace that is deleted when the test passes and kept when it fails.
#[derive(Clone)]
pub struct TestContext {
    bed: &'static BedEnv,
    client: Client,
    namespace: String,
}

impl std::fmt::Debug for TestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestContext")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl TestContext {
    pub fn bed(&self) -> &'static BedEnv {
        self.bed
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A typed API for a namespaced resource in the test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A client authenticated as its own user (a client certificate `CN=name`,
    /// member of `system:masters`), so the audit log can tell its writes apart.
    pub async fn client_as(&self, user: &str) -> anyhow::Result<Client> {
        let kubeconfig = self.bed.credential(user, Some("system:masters"))?;
        bed::client_from_kubeconfig(&kubeconfig).await
    }
}

/// Runs one test body against the test bed. Panics (fails the test) with the error
/// chain when the body returns an error; the namespace is then kept for inspection.
pub fn run<F, Fut>(test_name: &str, body: F)
where
    F: FnOnce(TestContext) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let bed = match bed::shared() {
        Ok(bed) => bed,
        Err(e) => panic!("test bed unavailable: {e:#}"),
    };
    if let Err(e) = bed.enter_namespace() {
        panic!("cannot enter the test bed's network namespace: {e:#}");
    }
    // Built after entering the namespace: its worker threads and every process they
    // spawn inherit it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        let client = bed::client_from_kubeconfig(&bed.kubeconfig).await?;
        bed::install_crds(&client).await?;
        let namespace = create_namespace(&client, test_name).await?;
        let ctx = TestContext {
            bed,
            client: client.clone(),
            namespace: namespace.clone(),
        };
        match body(ctx).await {
            Ok(()) => {
                // Deleting is asynchronous in the cluster; the test does not wait.
                let namespaces: Api<Namespace> = Api::all(client);
                let _ = namespaces
                    .delete(&namespace, &DeleteParams::background())
                    .await;
                Ok(())
            }
            Err(e) => Err(e.context(format!("test namespace {namespace} kept for inspection"))),
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    if let Err(e) = result {
        panic!("{e:#}");
    }
}

async fn create_namespace(client: &Client, test_name: &str) -> anyhow::Result<String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let name = format!("{}-{}", sanitize(test_name), random_suffix());
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            labels: Some([("blink.sh/test".to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(name)
}

fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(40);
    s.trim_matches('-').to_string()
}

/// FNV-1a, 64 bits: the test replica's `/upload` answers it for what it received,
/// so a test can tell a streamed upload arrived whole. Start from [`FNV_START`].
pub fn fnv1a(hash: u64, data: &[u8]) -> u64 {
    data.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The sum of the samples in Prometheus `text` whose line starts with `prefix` (a
/// metric name, or a name and the start of its labels).
pub fn sum_samples(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The project's shared folder (KEDA's CRDs and examples live in its `fixtures/`):
/// `BLINK_SHARED_DIR`, else `shared/` beside the repository.
pub fn shared_dir() -> std::path::PathBuf {
    std::env::var_os("BLINK_SHARED_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// Six hex digits from the clock and the process: unique enough between tests of one
/// run, and no extra dependency.
pub fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    format!("{:06x}", h.finish() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_valid_labels() {
        assert_eq!(sanitize("KEDA examples_v2"), "keda-examples-v2");
        assert!(sanitize(&"x".repeat(100)).len() <= 40);
        assert_ne!(random_suffix(), random_suffix());
    }
}
