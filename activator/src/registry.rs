//! Everything the activator knows of the cluster, and what it derives from it: the
//! functions (with their settings, ready replicas and whether they can wake) and the
//! routing table. The watches feed it; the request path reads the table (swapped in
//! whole, no lock) and the functions it leads to.
//!
//! Endpoint changes touch one function and apply at once (a held request leaves the
//! moment its replica is ready). ScaledObject and Service changes rebuild the routes,
//! which is linear in the number of functions, so the watches rebuild once after their
//! first list and then per change.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use blink_crds::{
    FunctionKey, ScaledObject,
    routing::{self, Age, HttpRoute, RouteError},
};
use kube::ResourceExt;

use crate::{
    balance,
    function::{Function, PoolConfigEq, Settings},
    hold::QueueBounds,
    metrics::Metrics,
    pool::Protocol,
    routes::{RouteTable, ServiceInfo, service_port},
};

/// Defaults for what a ScaledObject does not say.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub wait_timeout: Duration,
    pub response_timeout: Duration,
    pub bounds: QueueBounds,
    pub pool: PoolConfigEq,
}

/// The ready addresses an EndpointSlice lists, per port name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SliceInfo {
    /// Port name (empty when unnamed) → port.
    pub ports: Vec<(String, u16)>,
    pub ready: Vec<IpAddr>,
}

#[derive(Debug)]
struct ObjectInfo {
    age: Age,
    route: Option<Result<HttpRoute, RouteError>>,
    /// From the object's status and annotations: why it cannot wake now.
    cannot_wake: Option<String>,
}

/// A Service: (namespace, name).
pub type ServiceId = (String, String);
/// An EndpointSlice: (namespace, its Service's name, its own name).
pub type SliceId = (String, String, String);

#[derive(Debug, Default)]
struct Known {
    objects: HashMap<FunctionKey, ObjectInfo>,
    services: HashMap<ServiceId, ServiceInfo>,
    /// (namespace, service) → slice name → slice.
    slices: HashMap<ServiceId, HashMap<String, SliceInfo>>,
    /// (namespace, slice name) → the Service it is filed under, so that a slice
    /// relabelled to another Service leaves the first.
    slice_services: HashMap<(String, String), String>,
    activators: usize,
    // Derived by `rebuild`:
    functions: HashMap<FunctionKey, Arc<Function>>,
    routes: HashMap<FunctionKey, HttpRoute>,
    by_service: HashMap<ServiceId, FunctionKey>,
}

impl Known {
    fn remove_slice(&mut self, service: &ServiceId, slice: &str) {
        if let Some(slices) = self.slices.get_mut(service) {
            slices.remove(slice);
            if slices.is_empty() {
                self.slices.remove(service);
            }
        }
    }
}

#[derive(Debug)]
pub struct Registry {
    known: Mutex<Known>,
    table: ArcSwap<RouteTable<Arc<Function>>>,
    defaults: Defaults,
    metrics: Arc<Metrics>,
    /// Shutting down: functions made from now on (the watches go on) drain too.
    draining: AtomicBool,
}

impl Registry {
    pub fn new(defaults: Defaults, metrics: Arc<Metrics>) -> Self {
        Self {
            known: Mutex::new(Known {
                activators: 1,
                ..Known::default()
            }),
            table: ArcSwap::from_pointee(RouteTable::default()),
            defaults,
            metrics,
            draining: AtomicBool::new(false),
        }
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The routing table now.
    pub fn table(&self) -> arc_swap::Guard<Arc<RouteTable<Arc<Function>>>> {
        self.table.load()
    }

    /// Every function now.
    pub fn functions(&self) -> Vec<Arc<Function>> {
        self.known().functions.values().cloned().collect()
    }

    pub fn function(&self, key: &FunctionKey) -> Option<Arc<Function>> {
        self.known().functions.get(key).cloned()
    }

    pub fn apply_object(&self, object: &ScaledObject) {
        let Ok(key) = object.function_key() else {
            return;
        };
        let info = ObjectInfo {
            age: Age::of(object, key.clone()),
            route: routing::http_route(object),
            cannot_wake: cannot_wake(object),
        };
        self.known().objects.insert(key, info);
    }

    pub fn delete_object(&self, key: &FunctionKey) {
        self.known().objects.remove(key);
    }

    /// A list of every ScaledObject ended: those it left out were deleted meanwhile.
    /// Routes change at the next [`Registry::rebuild`].
    pub fn retain_objects(&self, listed: &HashSet<FunctionKey>) {
        self.known().objects.retain(|key, _| listed.contains(key));
    }

    pub fn apply_service(&self, namespace: &str, name: &str, info: ServiceInfo) {
        self.known()
            .services
            .insert((namespace.to_owned(), name.to_owned()), info);
    }

    pub fn delete_service(&self, namespace: &str, name: &str) {
        self.known()
            .services
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// A list of every Service ended: those it left out were deleted meanwhile.
    /// Routes change at the next [`Registry::rebuild`].
    pub fn retain_services(&self, listed: &HashSet<ServiceId>) {
        self.known().services.retain(|id, _| listed.contains(id));
    }

    /// An EndpointSlice changed (`None`: deleted): the function behind its Service
    /// gets its new replicas at once.
    pub fn apply_slice(&self, (namespace, service, slice): &SliceId, info: Option<SliceInfo>) {
        let mut known = self.known();
        let filed = (namespace.clone(), slice.clone());
        let mut changed = Vec::with_capacity(2);
        match info {
            Some(info) => {
                let id = (namespace.clone(), service.clone());
                if let Some(before) = known.slice_services.insert(filed, service.clone())
                    && before != *service
                {
                    let before = (namespace.clone(), before);
                    known.remove_slice(&before, slice);
                    changed.push(before);
                }
                known
                    .slices
                    .entry(id.clone())
                    .or_default()
                    .insert(slice.clone(), info);
                changed.push(id);
            }
            None => {
                let filed_under = known.slice_services.remove(&filed);
                let id = (
                    namespace.clone(),
                    filed_under.unwrap_or_else(|| service.clone()),
                );
                known.remove_slice(&id, slice);
                changed.push(id);
            }
        }
        Self::update_replicas(known, &changed);
    }

    /// A list of every function slice ended: those it left out were deleted meanwhile,
    /// and their functions lose those replicas at once.
    pub fn retain_slices(&self, listed: &HashSet<SliceId>) {
        let mut known = self.known();
        let mut changed = Vec::new();
        known.slice_services.retain(|(namespace, slice), service| {
            listed.contains(&(namespace.clone(), service.clone(), slice.clone()))
        });
        known.slices.retain(|(namespace, service), slices| {
            let before = slices.len();
            slices.retain(|slice, _| {
                listed.contains(&(namespace.clone(), service.clone(), slice.clone()))
            });
            if slices.len() != before {
                changed.push((namespace.clone(), service.clone()));
            }
            !slices.is_empty()
        });
        Self::update_replicas(known, &changed);
    }

    /// Gives the functions behind `services` their ready replicas now.
    fn update_replicas(known: MutexGuard<'_, Known>, services: &[ServiceId]) {
        let updates: Vec<(Arc<Function>, Vec<SocketAddr>)> = services
            .iter()
            .filter_map(|id| {
                let key = known.by_service.get(id)?;
                let function = known.functions.get(key)?.clone();
                Some((function, replica_addrs(&known, key)))
            })
            .collect();
        drop(known);
        for (function, addrs) in updates {
            function.set_replicas(&addrs);
        }
    }

    /// The number of ready activators (this one included), which shares out each
    /// function's `containerConcurrency`.
    pub fn set_activators(&self, count: usize) {
        let changed = {
            let mut known = self.known();
            let count = count.max(1);
            let changed = known.activators != count;
            known.activators = count;
            changed
        };
        if changed {
            self.rebuild();
        }
    }

    /// Settles claims, then derives every function's settings, replicas and routes,
    /// and swaps in the new table.
    pub fn rebuild(&self) {
        let mut known = self.known();
        let routes: Vec<(Age, HttpRoute)> = known
            .objects
            .values()
            .filter_map(|o| match &o.route {
                Some(Ok(route)) => Some((o.age.clone(), route.clone())),
                _ => None,
            })
            .collect();
        let resolution = routing::resolve(routes);
        let mut functions = HashMap::with_capacity(resolution.routes.len());
        let mut by_service = HashMap::with_capacity(resolution.routes.len());
        let mut updates = Vec::with_capacity(resolution.routes.len());
        for route in &resolution.routes {
            let key = route.key.clone();
            let service_id = (key.namespace().to_owned(), route.service.clone());
            let service = known.services.get(&service_id);
            let (settings, problem) = self.settings(route, service, known.activators);
            let function = known.functions.get(&key).cloned().unwrap_or_else(|| {
                Function::new(key.clone(), settings.clone(), self.metrics.function(&key))
            });
            let cannot_wake =
                problem.or_else(|| known.objects.get(&key).and_then(|o| o.cannot_wake.clone()));
            updates.push((function.clone(), settings, cannot_wake));
            by_service.insert(service_id, key.clone());
            functions.insert(key, function);
        }
        for (_, gone) in known
            .functions
            .iter()
            .filter(|(k, _)| !functions.contains_key(*k))
        {
            self.metrics.forget(gone.metrics());
        }
        let previous = std::mem::replace(&mut known.functions, functions);
        known.by_service = by_service;
        known.routes = resolution
            .routes
            .iter()
            .map(|r| (r.key.clone(), r.clone()))
            .collect();
        let table = RouteTable::build(resolution.routes.iter().map(|route| {
            let service = known
                .services
                .get(&(route.key.namespace().to_owned(), route.service.clone()));
            let function = known.functions[&route.key].clone();
            (route, service, function)
        }))
        .with_conflicted(resolution.conflicts.iter().filter_map(|(key, reason)| {
            match &known.objects.get(key)?.route {
                Some(Ok(route)) => Some((route, reason.as_str())),
                _ => None,
            }
        }));
        let replicas: Vec<Vec<SocketAddr>> = updates
            .iter()
            .map(|(f, _, _)| replica_addrs(&known, f.key()))
            .collect();
        drop(known);
        let draining = self.draining.load(Ordering::SeqCst);
        for ((function, settings, cannot_wake), addrs) in updates.into_iter().zip(replicas) {
            function.set_settings(settings);
            function.set_cannot_wake(cannot_wake);
            function.set_replicas(&addrs);
            if draining {
                function.drain();
            }
        }
        self.table.store(Arc::new(table));
        // Functions no longer routed answer what they hold.
        for (key, function) in previous {
            if self.function(&key).is_none() {
                function.set_cannot_wake(Some(format!("{key} is no longer routed")));
            }
        }
    }

    /// A function's settings, and why it cannot be served if its Service says so.
    fn settings(
        &self,
        route: &HttpRoute,
        service: Option<&ServiceInfo>,
        activators: usize,
    ) -> (Settings, Option<String>) {
        let (protocol, problem) = match service {
            None => (
                Protocol::Http1,
                Some(format!(
                    "Service {}/{} does not exist",
                    route.key.namespace(),
                    route.service
                )),
            ),
            Some(service) => match service_port(route, service) {
                Ok(port) => (port.protocol(), None),
                Err(e) => (Protocol::Http1, Some(e)),
            },
        };
        let settings = Settings {
            protocol,
            replica_limit: balance::share_of_limit(route.container_concurrency, activators),
            wait_timeout: route.wait_timeout.unwrap_or(self.defaults.wait_timeout),
            response_timeout: route
                .response_timeout
                .unwrap_or(self.defaults.response_timeout),
            bounds: QueueBounds {
                max_requests: route
                    .queue_limit
                    .unwrap_or(self.defaults.bounds.max_requests),
                max_body_bytes: self.defaults.bounds.max_body_bytes,
            },
            pool: self.defaults.pool,
        };
        (settings, problem)
    }

    /// Shutting down: every function answers what it holds and takes no more.
    pub fn drain(&self) {
        // Before the functions are listed: one a rebuild makes meanwhile is either
        // listed here or sees the flag.
        self.draining.store(true, Ordering::SeqCst);
        for function in self.functions() {
            function.drain();
        }
    }
}

/// Ready addresses of a function's Service, on the port its route names.
fn replica_addrs(known: &Known, key: &FunctionKey) -> Vec<SocketAddr> {
    let Some(route) = known.routes.get(key) else {
        return Vec::new();
    };
    let id = (key.namespace().to_owned(), route.service.clone());
    let Some(port_name) = known
        .services
        .get(&id)
        .and_then(|s| service_port(route, s).ok())
        .map(|p| p.name.clone())
    else {
        return Vec::new();
    };
    let mut addrs: Vec<SocketAddr> = known
        .slices
        .get(&id)
        .into_iter()
        .flat_map(|slices| slices.values())
        .filter_map(|slice| {
            let port = slice.ports.iter().find(|(name, _)| *name == port_name)?.1;
            Some(slice.ready.iter().map(move |ip| SocketAddr::new(*ip, port)))
        })
        .flatten()
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// Why a function cannot wake now, from what the scaler wrote: `ScaleUpStalled` or
/// `Conflict` in `Ready`, or a pause annotation that holds it at zero. The annotations
/// are read in the scaler's order: a pinned count (`blink.sh/paused-replicas`) wins
/// over a frozen one (`blink.sh/paused`), and a pinned count that is no count holds
/// the object (the scaler refuses it).
pub fn cannot_wake(object: &ScaledObject) -> Option<String> {
    let annotations = object.annotations();
    if let Some(text) = annotations.get("blink.sh/paused-replicas") {
        match text.trim().parse::<i32>() {
            Ok(0) => {
                return Some("it is paused at zero (blink.sh/paused-replicas: 0)".to_owned());
            }
            // Pinned above zero: the scaler brings that many.
            Ok(n) if n > 0 => {}
            _ => {
                return Some(format!(
                    "its annotation blink.sh/paused-replicas: {text:?} is not a replica count"
                ));
            }
        }
    } else if annotations
        .get("blink.sh/paused")
        .is_some_and(|v| v == "true")
    {
        return Some("it is paused (blink.sh/paused)".to_owned());
    }
    let ready = object.status.as_ref()?.condition("Ready")?;
    let reason = ready.reason.as_deref().unwrap_or_default();
    (ready.status == "False" && matches!(reason, "ScaleUpStalled" | "Conflict")).then(|| {
        format!(
            "{reason}: {}",
            ready.message.as_deref().unwrap_or("no message")
        )
    })
}
