//! The watches that feed the [`Registry`]: ScaledObjects, Services and EndpointSlices
//! (the function Services' own slices, never Blink's, and the activator Service's,
//! whose ready endpoints count the activators).

use std::{net::IpAddr, sync::Arc};

use blink_crds::ScaledObject;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher, watcher::Event},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    registry::{Registry, SliceInfo},
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

/// Runs every watch until the process ends; `ready` turns true once each has listed.
pub async fn run(
    client: Client,
    scope: Scope,
    registry: Arc<Registry>,
    ready: watch::Sender<bool>,
) {
    let (listed_tx, mut listed_rx) = tokio::sync::mpsc::channel::<()>(3);
    let waiter = async move {
        for _ in 0..3 {
            listed_rx.recv().await;
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
        watch_slices(client, scope, registry, listed_tx),
        waiter
    );
}

type Listed = tokio::sync::mpsc::Sender<()>;

async fn watch_objects(client: Client, scope: Scope, registry: Arc<Registry>, listed: Listed) {
    let api: Api<ScaledObject> = scoped(client, &scope.namespace);
    let mut listing = true;
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        match events.try_next().await {
            Ok(Some(event)) => match event {
                Event::Init => listing = true,
                Event::InitApply(o) => registry.apply_object(&o),
                Event::InitDone => {
                    listing = false;
                    registry.rebuild();
                    let _ = listed.try_send(());
                }
                Event::Apply(o) => {
                    registry.apply_object(&o);
                    registry.rebuild();
                }
                Event::Delete(o) => {
                    if let Ok(key) = o.function_key() {
                        registry.delete_object(&key);
                        if !listing {
                            registry.rebuild();
                        }
                    }
                }
            },
            Ok(None) => return,
            Err(e) => warn!(error = %e, "ScaledObject watch failed; retrying"),
        }
    }
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
    let mut listing = true;
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        match events.try_next().await {
            Ok(Some(event)) => match event {
                Event::Init => listing = true,
                Event::InitApply(s) => {
                    registry.apply_service(
                        &s.namespace().unwrap_or_default(),
                        &s.name_any(),
                        service_info(&s),
                    );
                }
                Event::InitDone => {
                    listing = false;
                    registry.rebuild();
                    let _ = listed.try_send(());
                }
                Event::Apply(s) => {
                    registry.apply_service(
                        &s.namespace().unwrap_or_default(),
                        &s.name_any(),
                        service_info(&s),
                    );
                    registry.rebuild();
                }
                Event::Delete(s) => {
                    registry.delete_service(&s.namespace().unwrap_or_default(), &s.name_any());
                    if !listing {
                        registry.rebuild();
                    }
                }
            },
            Ok(None) => return,
            Err(e) => warn!(error = %e, "Service watch failed; retrying"),
        }
    }
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

async fn watch_slices(client: Client, scope: Scope, registry: Arc<Registry>, listed: Listed) {
    let api: Api<EndpointSlice> = scoped(client.clone(), &scope.namespace);
    // Blink's own slices point at the activators: never replicas.
    let config = watcher::Config::default().labels(&format!(
        "{LABEL_SERVICE_NAME},{LABEL_MANAGED_BY}!={BLINK_MANAGER}"
    ));
    let mut events = watcher(api, config).default_backoff().boxed();
    let activators = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        usize,
    >::new()));
    let count_activators = |slice: &EndpointSlice, deleted: bool| {
        let namespace = slice.namespace().unwrap_or_default();
        let service = slice.labels().get(LABEL_SERVICE_NAME).cloned();
        if (namespace, service.unwrap_or_default()) != scope.activator_service {
            return;
        }
        let mut counts = activators.lock().unwrap_or_else(|e| e.into_inner());
        if deleted {
            counts.remove(&slice.name_any());
        } else {
            counts.insert(slice.name_any(), slice_info(slice).ready.len());
        }
        registry.set_activators(counts.values().sum());
    };
    loop {
        match events.try_next().await {
            Ok(Some(event)) => match event {
                Event::Init => {}
                Event::InitApply(s) | Event::Apply(s) => {
                    count_activators(&s, false);
                    if let Some(service) = s.labels().get(LABEL_SERVICE_NAME) {
                        registry.apply_slice(
                            &s.namespace().unwrap_or_default(),
                            service,
                            &s.name_any(),
                            Some(slice_info(&s)),
                        );
                    }
                }
                Event::InitDone => {
                    let _ = listed.try_send(());
                }
                Event::Delete(s) => {
                    count_activators(&s, true);
                    if let Some(service) = s.labels().get(LABEL_SERVICE_NAME) {
                        registry.apply_slice(
                            &s.namespace().unwrap_or_default(),
                            service,
                            &s.name_any(),
                            None,
                        );
                    }
                }
            },
            Ok(None) => return,
            Err(e) => warn!(error = %e, "EndpointSlice watch failed; retrying"),
        }
    }
}
