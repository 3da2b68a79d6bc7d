//! The watches that feed the [`Registry`]: ScaledObjects, Services and EndpointSlices
//! (the function Services' own slices, never Blink's, and the activator Service's,
//! whose ready endpoints count the activators).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use blink_crds::{FunctionKey, ScaledObject, listing::Listing};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher, watcher::Event},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    registry::{Registry, ServiceId, SliceId, SliceInfo},
    routes::{ServiceInfo, ServicePort},
};

/// The label an EndpointSlice names its Service with.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The label saying who manages a slice; Blink's own say `blink.sh`.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const BLINK_MANAGER: &str = "blink.sh";

/// Where the watches look.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Empty: every namespace.
    pub namespace: String,
    /// The activator Service (namespace, name), whose ready endpoints are counted.
    pub activator_service: (String, String),
}

fn scoped<K>(client: Client, namespace: &str) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    if namespace.is_empty() {
        Api::all(client)
    } else {
        Api::namespaced(client, namespace)
    }
}

/// How many watches [`run`] runs.
const WATCHES: usize = 4;

/// Runs every watch until the process ends; `ready` turns true once each has listed.
pub async fn run(
    client: Client,
    scope: Scope,
    registry: Arc<Registry>,
    ready: watch::Sender<bool>,
) {
    // Each watch says so at the end of each list; a full channel (lists after the
    // first, once nobody reads) loses nothing that matters.
    let (listed_tx, mut listed_rx) = tokio::sync::mpsc::channel::<&'static str>(WATCHES);
    let waiter = async move {
        let mut listed = HashSet::new();
        while listed.len() < WATCHES {
            match listed_rx.recv().await {
                Some(what) => listed.insert(what),
                None => return,
            };
        }
        info!("every watch has listed: ready");
        let _ = ready.send(true);
        std::future::pending::<()>().await;
    };
    tokio::join!(
        watch_objects(
            client.clone(),
            scope.clone(),
            registry.clone(),
            listed_tx.clone()
        ),
        watch_services(
            client.clone(),
            scope.clone(),
            registry.clone(),
            listed_tx.clone()
        ),
        watch_slices(
            client.clone(),
            scope.clone(),
            registry.clone(),
            listed_tx.clone()
        ),
        watch_activators(client, scope, registry, listed_tx),
        waiter
    );
}

type Listed = tokio::sync::mpsc::Sender<&'static str>;

/// Runs one watch until the process ends, each event handed to `on_event`, which says
/// when a list is done.
async fn follow<K, F>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    listed: Listed,
    mut on_event: F,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: FnMut(Event<K>) -> bool,
{
    let mut events = watcher(api, config).default_backoff().boxed();
    loop {
        match events.try_next().await {
            Ok(Some(event)) => {
                if on_event(event) {
                    let _ = listed.try_send(what);
                }
            }
            Ok(None) => return,
            Err(e) => warn!(error = %e, "{what} watch failed; retrying"),
        }
    }
}

async fn watch_objects(client: Client, scope: Scope, registry: Arc<Registry>, listed: Listed) {
    let api: Api<ScaledObject> = scoped(client, &scope.namespace);
    let mut listing = Listing::default();
    follow(
        api,
        watcher::Config::default(),
        "ScaledObject",
        listed,
        |event| on_object(&registry, &mut listing, event),
    )
    .await;
}

/// One ScaledObject event; true when a list is done. Routes are rebuilt per change,
/// and once for a whole list.
fn on_object(
    registry: &Registry,
    listing: &mut Listing<FunctionKey>,
    event: Event<ScaledObject>,
) -> bool {
    match event {
        Event::Init => listing.begin(),
        Event::InitApply(o) => {
            if let Ok(key) = o.function_key() {
                listing.saw(key);
            }
            registry.apply_object(&o);
        }
        Event::InitDone => {
            registry.retain_objects(&listing.end());
            registry.rebuild();
            return true;
        }
        Event::Apply(o) => {
            registry.apply_object(&o);
            registry.rebuild();
        }
        Event::Delete(o) => {
            if let Ok(key) = o.function_key() {
                registry.delete_object(&key);
                if !listing.is_listing() {
                    registry.rebuild();
                }
            }
        }
    }
    false
}

fn service_info(service: &Service) -> ServiceInfo {
    let spec = service.spec.as_ref();
    ServiceInfo {
        cluster_ip: spec
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        ports: spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some(ServicePort {
                            name: p.name.clone().unwrap_or_default(),
                            port: u16::try_from(p.port).ok()?,
                            app_protocol: p.app_protocol.clone(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

async fn watch_services(client: Client, scope: Scope, registry: Arc<Registry>, listed: Listed) {
    let api: Api<Service> = scoped(client, &scope.namespace);
    let mut listing = Listing::default();
    follow(
        api,
        watcher::Config::default(),
        "Service",
        listed,
        |event| on_service(&registry, &mut listing, event),
    )
    .await;
}

/// One Service event; true when a list is done.
fn on_service(
    registry: &Registry,
    listing: &mut Listing<ServiceId>,
    event: Event<Service>,
) -> bool {
    let id = |s: &Service| (s.namespace().unwrap_or_default(), s.name_any());
    match event {
        Event::Init => listing.begin(),
        Event::InitApply(s) => {
            let id = id(&s);
            registry.apply_service(&id.0, &id.1, service_info(&s));
            listing.saw(id);
        }
        Event::InitDone => {
            registry.retain_services(&listing.end());
            registry.rebuild();
            return true;
        }
        Event::Apply(s) => {
            let id = id(&s);
            registry.apply_service(&id.0, &id.1, service_info(&s));
            registry.rebuild();
        }
        Event::Delete(s) => {
            let id = id(&s);
            registry.delete_service(&id.0, &id.1);
            if !listing.is_listing() {
                registry.rebuild();
            }
        }
    }
    false
}

/// Ready addresses and port names of a slice. An endpoint is ready unless its
/// `ready` condition says false (unset means ready, as the API defines it).
fn slice_info(slice: &EndpointSlice) -> SliceInfo {
    SliceInfo {
        ports: slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect(),
        ready: slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| e.addresses.iter())
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .collect(),
    }
}

/// The function Services' slices. Blink's own point at the activators: never replicas.
async fn watch_slices(client: Client, scope: Scope, registry: Arc<Registry>, listed: Listed) {
    let api: Api<EndpointSlice> = scoped(client, &scope.namespace);
    let config = watcher::Config::default().labels(&format!(
        "{LABEL_SERVICE_NAME},{LABEL_MANAGED_BY}!={BLINK_MANAGER}"
    ));
    let mut listing = Listing::default();
    follow(api, config, "EndpointSlice", listed, |event| {
        on_slice(&registry, &mut listing, event)
    })
    .await;
}

/// One function slice event; true when a list is done. Replicas change at once.
fn on_slice(
    registry: &Registry,
    listing: &mut Listing<SliceId>,
    event: Event<EndpointSlice>,
) -> bool {
    let id = |s: &EndpointSlice| -> Option<SliceId> {
        let service = s.labels().get(LABEL_SERVICE_NAME)?.clone();
        Some((s.namespace().unwrap_or_default(), service, s.name_any()))
    };
    match event {
        Event::Init => listing.begin(),
        Event::InitApply(s) | Event::Apply(s) => {
            if let Some(id) = id(&s) {
                registry.apply_slice(&id, Some(slice_info(&s)));
                listing.saw(id);
            }
        }
        Event::InitDone => {
            registry.retain_slices(&listing.end());
            return true;
        }
        Event::Delete(s) => {
            if let Some(id) = id(&s) {
                registry.apply_slice(&id, None);
            }
        }
    }
    false
}

/// The activator Service's slices, in Blink's namespace (which `--watch-namespace`
/// may leave out): their ready endpoints count the activators.
async fn watch_activators(client: Client, scope: Scope, registry: Arc<Registry>, listed: Listed) {
    let (namespace, service) = &scope.activator_service;
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().labels(&format!("{LABEL_SERVICE_NAME}={service}"));
    let mut counts = ActivatorSlices::default();
    follow(api, config, "activator EndpointSlice", listed, |event| {
        let (count, done) = counts.on_event(event);
        if let Some(count) = count {
            registry.set_activators(count);
        }
        done
    })
    .await;
}

/// Ready activators per slice of the activator Service.
#[derive(Debug, Default)]
struct ActivatorSlices {
    ready: HashMap<String, usize>,
    listing: Listing<String>,
}

impl ActivatorSlices {
    /// The activator count when it may have changed, and whether a list is done.
    fn on_event(&mut self, event: Event<EndpointSlice>) -> (Option<usize>, bool) {
        let mut done = false;
        match event {
            Event::Init => {
                self.listing.begin();
                return (None, false);
            }
            Event::InitApply(s) | Event::Apply(s) => {
                self.listing.saw(s.name_any());
                self.ready.insert(s.name_any(), slice_info(&s).ready.len());
            }
            Event::InitDone => {
                let seen = self.listing.end();
                self.ready.retain(|name, _| seen.contains(name));
                done = true;
            }
            Event::Delete(s) => {
                self.ready.remove(&s.name_any());
            }
        }
        (Some(self.ready.values().sum()), done)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::{function::PoolConfigEq, hold::QueueBounds, metrics::Metrics};

    pub(crate) fn registry() -> Registry {
        let mut prometheus = prometheus_client::registry::Registry::default();
        Registry::new(
            crate::registry::Defaults {
                wait_timeout: Duration::from_secs(60),
                response_timeout: Duration::from_secs(300),
                bounds: QueueBounds {
                    max_requests: 100,
                    max_body_bytes: 1 << 20,
                },
                pool: PoolConfigEq {
                    max_connections: 10,
                    connect_timeout: Duration::from_secs(1),
                },
            },
            Arc::new(Metrics::register(&mut prometheus)),
        )
    }

    fn object(name: &str, annotations: serde_json::Value) -> ScaledObject {
        serde_json::from_value(json!({
            "apiVersion": "blink.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": name, "namespace": "apps", "annotations": annotations,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"scaleTargetRef": {"name": name},
                     "triggers": [{"type": "http", "metadata": {"hosts": format!("{name}.example")}}]}
        }))
        .expect("valid object")
    }

    fn service(name: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "apps"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
        }))
        .expect("valid Service")
    }

    fn slice(name: &str, service: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "apps",
                         "labels": {LABEL_SERVICE_NAME: service}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
        }))
        .expect("valid EndpointSlice")
    }

    /// A function routed in `registry` as the watches make one: its object and its
    /// Service (no replicas yet).
    pub(crate) fn routed(registry: &Registry, name: &str) -> Arc<crate::function::Function> {
        registry.apply_object(&object(name, json!({})));
        registry.apply_service("apps", name, service_info(&service(name)));
        registry.rebuild();
        registry.function(&key(name)).expect("routed")
    }

    fn key(name: &str) -> FunctionKey {
        format!("apps/{name}").parse().expect("valid key")
    }

    fn replicas(registry: &Registry, name: &str) -> Vec<String> {
        let function = registry.function(&key(name)).expect("routed");
        function
            .replica_addrs()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Lists `items` whole, as a watch does when it starts or has lost its place.
    fn list<K, F>(items: Vec<K>, mut on_event: F) -> bool
    where
        F: FnMut(Event<K>) -> bool,
    {
        on_event(Event::Init);
        for item in items {
            assert!(
                !on_event(Event::InitApply(item)),
                "a list ends only at its end"
            );
        }
        on_event(Event::InitDone)
    }

    #[test]
    fn what_a_new_list_leaves_out_is_gone() {
        let registry = registry();
        let mut objects = Listing::default();
        let mut services = Listing::default();
        let mut slices = Listing::default();
        let on_o = |l: &mut Listing<FunctionKey>, e| on_object(&registry, l, e);
        assert!(list(
            vec![object("f", json!({})), object("g", json!({}))],
            |e| on_o(&mut objects, e)
        ));
        assert!(list(vec![service("f"), service("g")], |e| on_service(
            &registry,
            &mut services,
            e
        )));
        assert!(list(
            vec![
                slice("f-1", "f", "10.244.0.5"),
                slice("f-2", "f", "10.244.0.6"),
                slice("g-1", "g", "10.244.0.7"),
            ],
            |e| on_slice(&registry, &mut slices, e)
        ));
        assert_eq!(
            replicas(&registry, "f"),
            ["10.244.0.5:8080", "10.244.0.6:8080"]
        );
        assert!(registry.table().lookup("g.example", "/").is_ok());

        // The watches lost their place; meanwhile f's second slice and g (object and
        // Service) were deleted, with no event for either.
        list(
            vec![
                slice("f-1", "f", "10.244.0.5"),
                slice("g-1", "g", "10.244.0.7"),
            ],
            |e| on_slice(&registry, &mut slices, e),
        );
        assert_eq!(
            replicas(&registry, "f"),
            ["10.244.0.5:8080"],
            "the deleted slice's replica is gone at once"
        );
        list(vec![service("f")], |e| {
            on_service(&registry, &mut services, e)
        });
        list(vec![object("f", json!({}))], |e| on_o(&mut objects, e));
        assert!(
            registry.function(&key("g")).is_none(),
            "the deleted object is no longer a function"
        );
        assert!(
            registry.table().lookup("g.example", "/").is_err(),
            "nor routed"
        );
        assert!(registry.table().lookup("f.example", "/").is_ok());

        // A slice relabelled to another Service leaves the first.
        let mut event = |e| on_slice(&registry, &mut slices, e);
        event(Event::Apply(slice("g-1", "f", "10.244.0.7")));
        assert_eq!(
            replicas(&registry, "f"),
            ["10.244.0.5:8080", "10.244.0.7:8080"]
        );
        event(Event::Apply(slice("g-1", "other", "10.244.0.7")));
        assert_eq!(replicas(&registry, "f"), ["10.244.0.5:8080"]);
        event(Event::Delete(slice("g-1", "other", "10.244.0.7")));

        // Between lists, events apply one by one.
        on_slice(
            &registry,
            &mut slices,
            Event::Apply(slice("f-3", "f", "10.244.0.8")),
        );
        assert_eq!(
            replicas(&registry, "f"),
            ["10.244.0.5:8080", "10.244.0.8:8080"]
        );
        on_slice(
            &registry,
            &mut slices,
            Event::Delete(slice("f-1", "f", "10.244.0.5")),
        );
        assert_eq!(replicas(&registry, "f"), ["10.244.0.8:8080"]);
    }

    #[test]
    fn a_function_made_after_the_drain_began_drains_too() {
        let registry = registry();
        let mut objects = Listing::default();
        list(vec![object("f", json!({}))], |e| {
            on_object(&registry, &mut objects, e)
        });
        registry.drain();
        on_object(
            &registry,
            &mut objects,
            Event::Apply(object("g", json!({}))),
        );
        for name in ["f", "g"] {
            let function = registry.function(&key(name)).expect("routed");
            assert!(
                matches!(
                    function.admit(0, std::time::Instant::now()),
                    Err(crate::function::Refusal::Draining)
                ),
                "{name} takes requests while the activator drains"
            );
        }
    }

    #[test]
    fn the_activators_are_counted_over_the_latest_list() {
        let mut counts = ActivatorSlices::default();
        assert_eq!(counts.on_event(Event::Init), (None, false));
        assert_eq!(
            counts.on_event(Event::InitApply(slice(
                "a-1",
                "blink-activator",
                "10.244.1.1"
            ))),
            (Some(1), false)
        );
        assert_eq!(
            counts.on_event(Event::InitApply(slice(
                "a-2",
                "blink-activator",
                "10.244.1.2"
            ))),
            (Some(2), false)
        );
        assert_eq!(counts.on_event(Event::InitDone), (Some(2), true));
        // A new list without a-2 (deleted while the watch was away).
        counts.on_event(Event::Init);
        assert_eq!(
            counts.on_event(Event::InitApply(slice(
                "a-1",
                "blink-activator",
                "10.244.1.1"
            ))),
            (Some(2), false)
        );
        assert_eq!(counts.on_event(Event::InitDone), (Some(1), true));
        assert_eq!(
            counts.on_event(Event::Apply(slice("a-3", "blink-activator", "10.244.1.3"))),
            (Some(2), false)
        );
        assert_eq!(
            counts.on_event(Event::Delete(slice("a-1", "blink-activator", "10.244.1.1"))),
            (Some(1), false)
        );
    }

    #[test]
    fn pause_annotations_are_read_in_the_scalers_order() {
        let cases = [
            (json!({}), None),
            (
                json!({"blink.sh/paused": "true"}),
                Some("it is paused (blink.sh/paused)"),
            ),
            (json!({"blink.sh/paused": "false"}), None),
            (
                json!({"blink.sh/paused-replicas": "0"}),
                Some("it is paused at zero (blink.sh/paused-replicas: 0)"),
            ),
            (
                json!({"blink.sh/paused-replicas": " 00 "}),
                Some("it is paused at zero (blink.sh/paused-replicas: 0)"),
            ),
            // A pinned count above zero wins over a freeze: the scaler brings 2.
            (
                json!({"blink.sh/paused-replicas": "2", "blink.sh/paused": "true"}),
                None,
            ),
            (
                json!({"blink.sh/paused-replicas": "0", "blink.sh/paused": "true"}),
                Some("it is paused at zero (blink.sh/paused-replicas: 0)"),
            ),
            (
                json!({"blink.sh/paused-replicas": "two"}),
                Some("its annotation blink.sh/paused-replicas: \"two\" is not a replica count"),
            ),
            (
                json!({"blink.sh/paused-replicas": "-1"}),
                Some("its annotation blink.sh/paused-replicas: \"-1\" is not a replica count"),
            ),
        ];
        for (annotations, expected) in cases {
            let reason = crate::registry::cannot_wake(&object("f", annotations.clone()));
            assert_eq!(reason.as_deref(), expected, "{annotations}");
        }
    }
}
