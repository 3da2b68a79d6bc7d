//! Transparent mode: clients keep using the function's own Service, and while the
//! function is at zero a Blink-owned EndpointSlice on that Service points at the
//! activators. One state machine per transparent Service (DESIGN.md, "Traffic"):
//!
//! - `Warm`: replicas serve; no Blink slice.
//! - `Parking`: the decision said zero. The slice is added first, then a settle time
//!   (kube-proxy has no acknowledgement); any demand seen meanwhile → back to `Warm`
//!   (slice removed); none → PATCH to 0 → `Zero`.
//! - `Zero`: the Blink slice is the Service's only endpoint.
//! - `Waking`: a scale-up from zero was PATCHed; once the controller's own slice shows
//!   a ready endpoint the Blink slice is removed → `Warm`.
//!
//! [`next`] is the pure transition function; [`Slices`] does the API writes.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::Service,
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams},
};
use tokio::sync::watch;

use crate::target::FIELD_MANAGER;

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY_BLINK: &str = "blink.sh";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Warm,
    Parking { since: Instant },
    Zero,
    Waking,
}

/// What the worker saw this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    pub now: Instant,
    /// The decision's count.
    pub wanted: i32,
    /// The target's current `spec.replicas`.
    pub current: i32,
    /// Any request or held message reported since parking began.
    pub demand_seen: bool,
    /// The controller's slice of the Service shows a ready endpoint.
    pub replica_ready: bool,
}

/// What to do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    AddSlice,
    RemoveSlice,
    /// PATCH `/scale` to the decision's count (the writer re-reads demand before 0).
    Scale,
}

/// The transition function. Returns the next phase and the actions to take first.
pub fn next(phase: Phase, seen: Observed, settle: Duration) -> (Phase, Vec<Action>) {
    match phase {
        Phase::Warm if seen.wanted == 0 && seen.current > 0 => {
            (Phase::Parking { since: seen.now }, vec![Action::AddSlice])
        }
        Phase::Warm if seen.current == 0 && seen.wanted == 0 => {
            (Phase::Zero, vec![Action::AddSlice])
        }
        Phase::Warm if seen.wanted != seen.current => (Phase::Warm, vec![Action::Scale]),
        Phase::Warm => (Phase::Warm, vec![]),
        Phase::Parking { .. } if seen.demand_seen || seen.wanted > 0 => {
            (Phase::Warm, vec![Action::RemoveSlice])
        }
        Phase::Parking { since } if seen.now >= since + settle => {
            (Phase::Zero, vec![Action::Scale])
        }
        Phase::Parking { since } => (Phase::Parking { since }, vec![]),
        Phase::Zero if seen.wanted > 0 => (Phase::Waking, vec![Action::Scale]),
        Phase::Zero => (Phase::Zero, vec![]),
        Phase::Waking if seen.replica_ready => (Phase::Warm, vec![Action::RemoveSlice]),
        Phase::Waking if seen.wanted != seen.current && seen.wanted > 0 => {
            (Phase::Waking, vec![Action::Scale])
        }
        Phase::Waking => (Phase::Waking, vec![]),
    }
}

/// The phase a worker starts in from what the cluster shows.
pub fn initial(current: i32, blink_slice_exists: bool) -> Phase {
    match (current, blink_slice_exists) {
        (0, _) => Phase::Warm, // moves to Zero (slice ensured) on the first step
        (_, true) => Phase::Waking,
        (_, false) => Phase::Warm,
    }
}

/// The name of Blink's slice for a Service.
pub fn slice_name(service: &str) -> String {
    format!("{service}-blink")
}

/// Builds Blink's slice for `service`: one endpoint per activator address, ports named
/// exactly as the Service's ports, all on the activator's proxy port.
pub fn build_slice(
    service: &Service,
    activators: &[String],
    activator_port: u16,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> EndpointSlice {
    let name = service.metadata.name.clone().unwrap_or_default();
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ports| {
            ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone().unwrap_or_default()),
                    port: Some(i32::from(activator_port)),
                    protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".to_owned())),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect()
        });
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(&name)),
            namespace: service.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (LABEL_SERVICE_NAME.to_owned(), name),
                (LABEL_MANAGED_BY.to_owned(), MANAGED_BY_BLINK.to_owned()),
            ])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: endpoints(activators),
        ports,
    }
}

/// One ready endpoint per activator address.
fn endpoints(activators: &[String]) -> Vec<Endpoint> {
    activators
        .iter()
        .map(|ip| Endpoint {
            addresses: vec![ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..Default::default()
        })
        .collect()
}

/// The addresses a slice points at, sorted.
fn addresses(slice: &EndpointSlice) -> Vec<String> {
    let mut all: Vec<String> = slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    all.sort();
    all
}

/// Blink's slice writes and the reads that decide them.
#[derive(Clone)]
pub struct Slices {
    client: Client,
    activators: watch::Receiver<Vec<String>>,
    activator_port: u16,
}

impl std::fmt::Debug for Slices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slices")
            .field("activator_port", &self.activator_port)
            .finish_non_exhaustive()
    }
}

impl Slices {
    pub fn new(
        client: Client,
        activators: watch::Receiver<Vec<String>>,
        activator_port: u16,
    ) -> Self {
        Self {
            client,
            activators,
            activator_port,
        }
    }

    /// Creates or updates Blink's slice (server-side apply, Blink's field manager).
    pub async fn add(
        &self,
        namespace: &str,
        service: &str,
        owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    ) -> Result<(), kube::Error> {
        let services: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let service = services.get(service).await?;
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
        loop {
            let activators = self.activators.borrow().clone();
            let slice = build_slice(&service, &activators, self.activator_port, owner.clone());
            let name = slice.metadata.name.clone().unwrap_or_default();
            slices
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&slice),
                )
                .await?;
            // The activators changed while this was written: [`follow_activators`] may
            // have listed the slices before this one existed, so write it again.
            if *self.activators.borrow() == activators {
                return Ok(());
            }
        }
    }

    pub async fn remove(&self, namespace: &str, service: &str) -> Result<(), kube::Error> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
        match slices
            .delete(&slice_name(service), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn exists(&self, namespace: &str, service: &str) -> Result<bool, kube::Error> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
        Ok(slices.get_opt(&slice_name(service)).await?.is_some())
    }

    /// Whether a slice of the Service that Blink does not manage has a ready endpoint.
    pub async fn replica_ready(&self, namespace: &str, service: &str) -> Result<bool, kube::Error> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
        let list = slices
            .list(&ListParams::default().labels(&format!(
                "{LABEL_SERVICE_NAME}={service},{LABEL_MANAGED_BY}!={MANAGED_BY_BLINK}"
            )))
            .await?;
        Ok(list.items.iter().any(|slice| {
            slice
                .endpoints
                .iter()
                .any(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        }))
    }
}

/// The addresses of a slice's ready endpoints.
pub fn ready_addresses(slice: &EndpointSlice) -> Vec<String> {
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| e.addresses.clone())
        .collect()
}

/// How often every Blink slice is checked against the activators even without a change
/// (a write that failed, or a slice edited by hand). Rare: it lists every Blink slice,
/// and with thousands of transparent functions that list is large.
const SLICE_RESYNC: Duration = Duration::from_secs(300);

/// Keeps every Blink slice pointing at the activators there are now. Activators come
/// and go (a rollout replaces them all); a function at zero must stay reachable, so a
/// change of the set is written to every Blink slice at once, by the leader.
pub async fn follow_activators(
    client: Client,
    watch_namespace: Option<String>,
    mut activators: watch::Receiver<Vec<String>>,
    leadership: crate::leader::Leadership,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let api: Api<EndpointSlice> = match &watch_namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let as_blink = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    let blink_slices =
        ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY_BLINK}"));
    // Nothing is known until the first list of the activators' slices.
    tokio::select! {
        _ = shutdown.cancelled() => return,
        changed = activators.changed() => if changed.is_err() { return },
    }
    loop {
        leadership.writable().await;
        let want = activators.borrow_and_update().clone();
        let (mut updated, mut failed) = (0, 0);
        match api.list(&blink_slices).await {
            Ok(list) => {
                for slice in list.items.iter().filter(|s| addresses(s) != want) {
                    let (Some(namespace), Some(name)) = (
                        slice.metadata.namespace.as_deref(),
                        slice.metadata.name.as_deref(),
                    ) else {
                        continue;
                    };
                    let patch = serde_json::json!({"endpoints": endpoints(&want)});
                    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
                    match slices.patch(name, &as_blink, &Patch::Merge(&patch)).await {
                        Ok(_) => updated += 1,
                        Err(e) => {
                            failed += 1;
                            tracing::warn!(%namespace, slice = %name, error = %e, "could not update a Blink slice; will retry");
                        }
                    }
                }
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(error = %e, "cannot list Blink slices; will retry");
            }
        }
        if updated > 0 {
            tracing::info!(updated, activators = ?want, "Blink slices follow the activators");
        }
        // A failed write is tried again soon, not at the next resync.
        let next_pass = if failed > 0 {
            Duration::from_secs(5)
        } else {
            SLICE_RESYNC
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = activators.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(next_pass) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(3);

    fn seen(now: Instant, wanted: i32, current: i32) -> Observed {
        Observed {
            now,
            wanted,
            current,
            demand_seen: false,
            replica_ready: false,
        }
    }

    #[test]
    fn every_transition() {
        let t0 = Instant::now();
        let later = t0 + SETTLE;
        let parking = Phase::Parking { since: t0 };
        let cases: Vec<(&str, Phase, Observed, Phase, Vec<Action>)> = vec![
            (
                "warm stays warm",
                Phase::Warm,
                seen(t0, 2, 2),
                Phase::Warm,
                vec![],
            ),
            (
                "warm scales while warm",
                Phase::Warm,
                seen(t0, 3, 2),
                Phase::Warm,
                vec![Action::Scale],
            ),
            (
                "warm → parking adds the slice, no PATCH yet",
                Phase::Warm,
                seen(t0, 0, 2),
                parking,
                vec![Action::AddSlice],
            ),
            (
                "at zero without a slice → zero with one",
                Phase::Warm,
                seen(t0, 0, 0),
                Phase::Zero,
                vec![Action::AddSlice],
            ),
            (
                "parking waits the settle time",
                parking,
                seen(t0 + Duration::from_secs(1), 0, 2),
                parking,
                vec![],
            ),
            (
                "parking → zero after the settle time",
                parking,
                seen(later, 0, 2),
                Phase::Zero,
                vec![Action::Scale],
            ),
            (
                "a request during parking → warm",
                parking,
                Observed {
                    demand_seen: true,
                    ..seen(t0 + Duration::from_secs(1), 0, 2)
                },
                Phase::Warm,
                vec![Action::RemoveSlice],
            ),
            (
                "the decision changing its mind → warm",
                parking,
                seen(t0, 1, 2),
                Phase::Warm,
                vec![Action::RemoveSlice],
            ),
            (
                "zero stays zero",
                Phase::Zero,
                seen(t0, 0, 0),
                Phase::Zero,
                vec![],
            ),
            (
                "zero → waking PATCHes up, keeps the slice",
                Phase::Zero,
                seen(t0, 1, 0),
                Phase::Waking,
                vec![Action::Scale],
            ),
            (
                "waking keeps the slice until a replica is ready",
                Phase::Waking,
                seen(t0, 1, 1),
                Phase::Waking,
                vec![],
            ),
            (
                "waking → warm removes the slice",
                Phase::Waking,
                Observed {
                    replica_ready: true,
                    ..seen(t0, 1, 1)
                },
                Phase::Warm,
                vec![Action::RemoveSlice],
            ),
        ];
        for (what, phase, observed, expected_phase, expected_actions) in cases {
            let (phase, actions) = next(phase, observed, SETTLE);
            assert_eq!(phase, expected_phase, "{what}");
            assert_eq!(actions, expected_actions, "{what}");
        }
    }

    #[test]
    fn the_slice_names_the_services_ports_and_the_activators() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "hello", "namespace": "ns"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080},
                               {"name": "grpc", "port": 81, "appProtocol": "kubernetes.io/h2c"}]}
        }))
        .expect("service");
        let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "blink.sh/v1alpha1".into(),
            kind: "ScaledObject".into(),
            name: "hello".into(),
            uid: "u".into(),
            ..Default::default()
        };
        let slice = build_slice(
            &service,
            &["10.244.0.7".into(), "10.244.0.8".into()],
            8080,
            owner,
        );
        assert_eq!(slice.metadata.name.as_deref(), Some("hello-blink"));
        let labels = slice.metadata.labels.expect("labels");
        assert_eq!(labels[LABEL_SERVICE_NAME], "hello");
        assert_eq!(labels[LABEL_MANAGED_BY], "blink.sh");
        let ports = slice.ports.expect("ports");
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].name.as_deref(), Some("http"));
        assert_eq!(ports[1].name.as_deref(), Some("grpc"));
        assert!(ports.iter().all(|p| p.port == Some(8080)));
        assert_eq!(ports[1].app_protocol.as_deref(), Some("kubernetes.io/h2c"));
        assert_eq!(slice.endpoints.len(), 2);
        assert_eq!(
            slice.metadata.owner_references.expect("owned")[0].kind,
            "ScaledObject"
        );
    }
}
