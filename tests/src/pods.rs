//! Pod processes: kwok runs no containers, so a test runs a real process for each
//! Running pod of a workload, listening on the pod's IP and container port (a local
//! address inside the bed's namespace). Then the pod's EndpointSlice entries and its
//! Service's ClusterIP reach something real.
//!
//! The process is a [`test replica`](replica_command) or any command a test gives
//! (later, the activator itself). It is started when the pod is Running with an IP and
//! stopped (SIGTERM, then SIGKILL) when the pod goes away or starts terminating.
//!
//! A pod with the readiness gate [`LISTENING_GATE`] (see
//! `workloads::create_gated_deployment`) is Ready
//! only once its process listens, as a real readiness probe would make it: the bed's
//! kwok holds such a pod not Ready (`tests/bed/kwok-stages.yaml`) until its condition
//! is True, which is set here when a connection to the pod's address succeeds. A pod
//! without the gate is Ready as soon as it runs, so a test can have endpoints that are
//! ready before anything listens.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// The pod a process stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodInfo {
    pub name: String,
    pub ip: IpAddr,
    pub port: u16,
}

type CommandFactory = dyn Fn(&PodInfo) -> Command + Send + Sync;

/// The readiness gate set once a pod's process listens.
pub const LISTENING_GATE: &str = "blink.test/listening";

/// Runs one process per Running pod matching a label selector, until dropped or
/// [`shut down`](PodProcesses::shutdown).
pub struct PodProcesses {
    running: Arc<Mutex<HashMap<String, (PodInfo, Child)>>>,
    watch: JoinHandle<()>,
}

impl std::fmt::Debug for PodProcesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodProcesses").finish_non_exhaustive()
    }
}

/// The command for a process standing for a pod: `program` in a session of its own.
///
/// A kubelet gives every pod a cgroup of its own, and the kernel shares the CPU
/// between groups before it shares it between their threads. The bed has no kubelet;
/// the kernel's autogroups (one group per session, where
/// `/proc/sys/kernel/sched_autogroup_enabled` is 1) do the same per session. Started
/// in the test's session, every pod process would share one group with the test and
/// with each other, and whenever the bed's servers (a session of their own) are busy
/// they would take the CPU from all of them at once: a woken activator then waited
/// tens of milliseconds for a core (the cold bench, README's "The test bed").
pub fn pod_command(program: &Path) -> Command {
    Command::from(in_own_session(program.as_os_str()))
}

/// `program` in a session of its own ([`pod_command`] says why), killed when the
/// thread that started it ends. Out of the test's session, it no longer gets the
/// terminal's Ctrl-C with the test; the parent-death signal stops it with the test
/// instead, even one killed outright. `setsid` and `setpriv` (util-linux) each exec
/// the next in the same process (no fork: a spawned child leads no process group), so
/// the pid is the program's.
pub fn in_own_session(program: &std::ffi::OsStr) -> std::process::Command {
    let mut cmd = std::process::Command::new("setsid");
    cmd.args(["setpriv", "--pdeathsig", "KILL"]).arg(program);
    cmd
}

/// The command for a test replica standing for `pod` (see `src/bin/test-replica.rs`;
/// a test passes `env!("CARGO_BIN_EXE_test-replica")`).
pub fn replica_command(binary: &Path, pod: &PodInfo) -> Command {
    let mut cmd = pod_command(binary);
    cmd.arg("--listen")
        .arg(format!("{}:{}", pod.ip, pod.port))
        .arg("--name")
        .arg(&pod.name);
    cmd
}

impl PodProcesses {
    /// Starts watching pods in `namespace` matching `selector` (e.g. `app=hello`).
    pub fn start(
        client: Client,
        namespace: &str,
        selector: &str,
        command: impl Fn(&PodInfo) -> Command + Send + Sync + 'static,
    ) -> Self {
        let running = Arc::new(Mutex::new(HashMap::new()));
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().labels(selector);
        let command: Arc<CommandFactory> = Arc::new(command);
        let watch = tokio::spawn(watch_pods(pods, config, command, running.clone()));
        Self { running, watch }
    }

    /// The pods that have a running process now.
    pub async fn running(&self) -> Vec<PodInfo> {
        let mut pods: Vec<PodInfo> = self
            .running
            .lock()
            .await
            .values()
            .map(|(p, _)| p.clone())
            .collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    }

    /// The process id standing for pod `name`, while it runs.
    pub async fn pid(&self, name: &str) -> Option<u32> {
        self.running
            .lock()
            .await
            .get(name)
            .and_then(|(_, child)| child.id())
    }

    /// Whether the process standing for pod `name` has exited (`None`: there is none,
    /// or its state could not be read).
    pub async fn has_exited(&self, name: &str) -> Option<bool> {
        let mut running = self.running.lock().await;
        let (_, child) = running.get_mut(name)?;
        child.try_wait().ok().map(|status| status.is_some())
    }

    /// Sends `signal` to the process standing for pod `name`.
    pub async fn signal(&self, name: &str, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self
            .pid(name)
            .await
            .with_context(|| format!("no process for pod {name}"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// Waits until exactly `count` processes run.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> anyhow::Result<Vec<PodInfo>> {
        crate::wait::until(timeout, &format!("{count} pod processes"), || async {
            let pods = self.running().await;
            Ok((pods.len() == count).then_some(pods))
        })
        .await
    }

    /// Stops watching and stops every process.
    pub async fn shutdown(self) {
        self.watch.abort();
        let mut running = self.running.lock().await;
        for (_, (_, child)) in running.drain() {
            stop(child).await;
        }
    }
}

impl Drop for PodProcesses {
    fn drop(&mut self) {
        // Children are spawned with kill_on_drop, so dropping the map kills them.
        self.watch.abort();
    }
}

async fn watch_pods(
    pods: Api<Pod>,
    config: watcher::Config,
    command: Arc<CommandFactory>,
    running: Arc<Mutex<HashMap<String, (PodInfo, Child)>>>,
) {
    let mut events = watcher(pods.clone(), config).boxed();
    let mut seen_in_relist = HashSet::new();
    while let Some(event) = events.next().await {
        let Ok(event) = event else {
            // The watcher retries by itself; a transient error changes nothing.
            continue;
        };
        match event {
            watcher::Event::Init => seen_in_relist.clear(),
            watcher::Event::InitApply(pod) => {
                if let Some(name) = pod.metadata.name.clone() {
                    seen_in_relist.insert(name);
                }
                reconcile(&pods, &pod, &command, &running).await;
            }
            watcher::Event::InitDone => {
                let gone: Vec<String> = running
                    .lock()
                    .await
                    .keys()
                    .filter(|name| !seen_in_relist.contains(*name))
                    .cloned()
                    .collect();
                for name in gone {
                    remove(&name, &running).await;
                }
            }
            watcher::Event::Apply(pod) => reconcile(&pods, &pod, &command, &running).await,
            watcher::Event::Delete(pod) => {
                if let Some(name) = pod.metadata.name {
                    remove(&name, &running).await;
                }
            }
        }
    }
}

/// What a process should stand for, if anything: a Running pod with an IP that is not
/// terminating.
fn wanted(pod: &Pod) -> Option<PodInfo> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_ref()?.parse().ok()?;
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| p.container_port)
        .next()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(8080);
    Some(PodInfo {
        name: pod.metadata.name.clone()?,
        ip,
        port,
    })
}

async fn reconcile(
    pods: &Api<Pod>,
    pod: &Pod,
    command: &Arc<CommandFactory>,
    running: &Arc<Mutex<HashMap<String, (PodInfo, Child)>>>,
) {
    let Some(name) = pod.metadata.name.clone() else {
        return;
    };
    match wanted(pod) {
        Some(info) => {
            let mut running = running.lock().await;
            if running.get(&name).is_some_and(|(p, _)| *p == info) {
                return;
            }
            if let Some((_, old)) = running.remove(&name) {
                stop(old).await;
            }
            let mut cmd = command(&info);
            cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
            match cmd.spawn() {
                Ok(child) => {
                    if is_gated(pod) {
                        tokio::spawn(pass_gate_once_listening(pods.clone(), info.clone()));
                    }
                    running.insert(name, (info, child));
                }
                Err(e) => eprintln!("pod process for {name}: cannot spawn: {e}"),
            }
        }
        None => remove(&name, running).await,
    }
}

fn is_gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|gates| gates.iter().any(|g| g.condition_type == LISTENING_GATE))
}

/// Connects to the pod's address every millisecond until something accepts, then sets
/// the gate's condition True; gives up after a minute (the pod stays not Ready).
async fn pass_gate_once_listening(pods: Api<Pod>, pod: PodInfo) {
    let addr = std::net::SocketAddr::new(pod.ip, pod.port);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            eprintln!(
                "pod {}: nothing listens on {addr}; its gate stays closed",
                pod.name
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = serde_json::json!({"status": {"conditions": [{
        "type": LISTENING_GATE,
        "status": "True",
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
    }]}});
    let patch = kube::api::Patch::Strategic(status);
    if let Err(e) = pods
        .patch_status(&pod.name, &kube::api::PatchParams::default(), &patch)
        .await
    {
        eprintln!(
            "pod {}: cannot set its {LISTENING_GATE} condition: {e}",
            pod.name
        );
    }
}

async fn remove(name: &str, running: &Arc<Mutex<HashMap<String, (PodInfo, Child)>>>) {
    let removed = running.lock().await.remove(name);
    if let Some((_, child)) = removed {
        stop(child).await;
    }
}

/// SIGTERM, up to 5 s to exit, then SIGKILL; always reaped.
async fn stop(mut child: Child) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    /// Until process `pid` runs `sleep` (the wrappers before it have exec'd).
    fn wait_until_running_sleep(pid: u32) {
        for _ in 0..500 {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("process {pid} does not run sleep after 5 s");
    }

    /// Field `n` (1-based, after the command's name) of `/proc/<pid>/stat`.
    fn stat_field(pid: u32, n: usize) -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let after_name = &stat[stat.rfind(')').expect("a name") + 2..];
        after_name
            .split(' ')
            .nth(n - 3)
            .expect("field")
            .parse()
            .expect("a number")
    }

    #[test]
    fn a_pod_process_has_a_session_of_its_own_and_the_programs_pid() {
        let mut child = in_own_session("sleep".as_ref())
            .arg("30")
            .spawn()
            .expect("started");
        // `setsid` and `setpriv` exec in place: the pid becomes `sleep`'s.
        wait_until_running_sleep(child.id());
        let own_session = stat_field(std::process::id(), 6);
        assert_eq!(
            stat_field(child.id(), 6),
            i64::from(child.id()),
            "leads its session"
        );
        assert_ne!(stat_field(child.id(), 6), own_session);
        child.kill().expect("killed");
        let _ = child.wait();
    }

    #[test]
    fn a_pod_process_ends_with_the_thread_that_started_it() {
        let mut child = std::thread::spawn(|| {
            let child = in_own_session("sleep".as_ref())
                .arg("30")
                .spawn()
                .expect("started");
            // Until `setpriv` has set the parent-death signal and exec'd `sleep`.
            wait_until_running_sleep(child.id());
            child
        })
        .join()
        .expect("the starting thread");
        let status = child.wait().expect("waited");
        assert_eq!(
            status.signal(),
            Some(9),
            "killed when its thread ended: {status:?}"
        );
    }
}
