//! What a ScaledObject's `http` trigger claims on the activator, and who keeps a claim
//! when two objects want the same one. The scaler (which reports `Conflict`) and the
//! activator (which routes) both decide with this module, so they never disagree.
//!
//! A function claims:
//! - each `host` × `pathPrefix` of its `http` trigger (`hosts` and `pathPrefixes`,
//!   comma-separated; prefixes default to `/`), hosts compared without case or port;
//! - its Service (`service`, default the target's name) in its namespace, which stands
//!   for the Service's own names (`svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`,
//!   the ClusterIP) and, in transparent mode, for its endpoints.
//!
//! Two objects claiming the same thing: the older (creation time, then namespace/name)
//! keeps every claim it has; the newer is in `Conflict` and routes nothing, so a
//! function is never half-routed.
//!
//! A Service's DNS names (`svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) are
//! claims too, against the objects that list one of them in `hosts`: the older side
//! keeps the name (objects listing it share it, by path prefix, as any host), and the
//! other side is in `Conflict`.

use std::collections::{BTreeMap, HashMap};

use kube::ResourceExt;

use crate::{ScaledObject, demand::FunctionKey};

/// The longest `waitTimeout` or `responseTimeout`: a year. Longer, a deadline computed
/// from it could overflow.
pub const MAX_TIMEOUT_SECONDS: u64 = 365 * 24 * 3600;

/// The `http` trigger's metadata keys read by the activator.
pub mod keys {
    /// Comma-separated host names.
    pub const HOSTS: &str = "hosts";
    /// Comma-separated path prefixes (default `/`).
    pub const PATH_PREFIXES: &str = "pathPrefixes";
    /// The function's Service (default: the scale target's name).
    pub const SERVICE: &str = "service";
    /// The Service port, by name or number (default: the Service's only port).
    pub const PORT: &str = "port";
    /// Requests one replica serves at once (Knative's `containerConcurrency`); unset or
    /// `0` means no limit.
    pub const CONTAINER_CONCURRENCY: &str = "containerConcurrency";
    /// Seconds a request may wait for a replica before a 504.
    pub const WAIT_TIMEOUT: &str = "waitTimeout";
    /// Requests held for the function at once, at most.
    pub const QUEUE_LIMIT: &str = "queueLimit";
    /// Seconds a replica has, once it has the whole request, to begin its answer
    /// before a 504.
    pub const RESPONSE_TIMEOUT: &str = "responseTimeout";
}

/// One function's `http` routing, read from its ScaledObject.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    pub key: FunctionKey,
    /// Lowercase, without port.
    pub hosts: Vec<String>,
    /// Each starts with `/`.
    pub path_prefixes: Vec<String>,
    pub service: String,
    /// Name or number, as written.
    pub port: Option<String>,
    pub container_concurrency: Option<u32>,
    pub wait_timeout: Option<std::time::Duration>,
    pub queue_limit: Option<usize>,
    pub response_timeout: Option<std::time::Duration>,
}

/// Why an `http` trigger cannot be routed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("spec.triggers[{index}].metadata.{key} {value:?} {problem}")]
pub struct RouteError {
    pub index: usize,
    pub key: &'static str,
    pub value: String,
    pub problem: &'static str,
}

/// The routing of `object`'s first `http` trigger; `None` without one.
pub fn http_route(object: &ScaledObject) -> Option<Result<HttpRoute, RouteError>> {
    let key = object.function_key().ok()?;
    let (index, trigger) = object
        .spec
        .triggers
        .iter()
        .enumerate()
        .find(|(_, t)| t.trigger_type == "http")?;
    let metadata = &trigger.metadata;
    let list = |name: &str| -> Vec<String> {
        metadata
            .get(name)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let error = |key: &'static str, value: &str, problem: &'static str| RouteError {
        index,
        key,
        value: value.to_owned(),
        problem,
    };
    let mut hosts = Vec::new();
    for host in list(keys::HOSTS) {
        let bare = bare_host(&host).to_ascii_lowercase();
        if bare.is_empty() || bare.contains('/') || bare.contains(' ') {
            return Some(Err(error(keys::HOSTS, &host, "is not a host name")));
        }
        hosts.push(bare);
    }
    let mut path_prefixes = list(keys::PATH_PREFIXES);
    if let Some(bad) = path_prefixes.iter().find(|p| !p.starts_with('/')) {
        return Some(Err(error(
            keys::PATH_PREFIXES,
            bad,
            "does not start with /",
        )));
    }
    if path_prefixes.is_empty() {
        path_prefixes.push("/".to_owned());
    }
    let number = |name: &'static str| -> Result<Option<u64>, RouteError> {
        match metadata.get(name).map(|v| v.trim()) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| error(name, v, "is not a non-negative integer")),
        }
    };
    let container_concurrency = match number(keys::CONTAINER_CONCURRENCY) {
        Ok(n) => n
            .filter(|n| *n > 0)
            .map(|n| n.min(u64::from(u32::MAX)) as u32),
        Err(e) => return Some(Err(e)),
    };
    let seconds = |name: &'static str| match number(name) {
        Ok(Some(0)) => Err(error(name, "0", "must be at least 1 second")),
        Ok(Some(n)) if n > MAX_TIMEOUT_SECONDS => Err(error(
            name,
            &n.to_string(),
            "must be at most 31536000 seconds (a year)",
        )),
        Ok(n) => Ok(n.map(std::time::Duration::from_secs)),
        Err(e) => Err(e),
    };
    let wait_timeout = match seconds(keys::WAIT_TIMEOUT) {
        Ok(timeout) => timeout,
        Err(e) => return Some(Err(e)),
    };
    let response_timeout = match seconds(keys::RESPONSE_TIMEOUT) {
        Ok(timeout) => timeout,
        Err(e) => return Some(Err(e)),
    };
    let queue_limit = match number(keys::QUEUE_LIMIT) {
        // None held: a function at zero could hold no request while it wakes.
        Ok(Some(0)) => return Some(Err(error(keys::QUEUE_LIMIT, "0", "must be at least 1"))),
        Ok(n) => n.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        Err(e) => return Some(Err(e)),
    };
    let service = metadata
        .get(keys::SERVICE)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| object.spec.scale_target_ref.name.clone());
    if !is_dns_label(&service) {
        return Some(Err(error(keys::SERVICE, &service, NOT_A_SERVICE_NAME)));
    }
    Some(Ok(HttpRoute {
        key,
        hosts,
        path_prefixes,
        service,
        port: metadata
            .get(keys::PORT)
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty()),
        container_concurrency,
        wait_timeout,
        queue_limit,
        response_timeout,
    }))
}

const NOT_A_SERVICE_NAME: &str = "is not a Service name (at most 63 lowercase letters, digits and '-', starting with a letter; set `service` when the target's name is not one)";

/// A Service's name is a DNS-1035 label, so its DNS names never collide with
/// another Service's.
fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// A host as routes are keyed: without its port and without the trailing dot of a
/// fully qualified name (`web.example.:8080` → `web.example`). Case is the caller's.
pub fn bare_host(host: &str) -> &str {
    let host = strip_port(host);
    host.strip_suffix('.').unwrap_or(host)
}

/// `host` without a `:port` (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// A claim one object makes; equal claims conflict.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Claim {
    HostPath { host: String, prefix: String },
    Service { namespace: String, name: String },
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HostPath { host, prefix } => write!(f, "host {host} path {prefix}"),
            Self::Service { namespace, name } => write!(f, "Service {namespace}/{name}"),
        }
    }
}

impl HttpRoute {
    /// The names of the function's Service in the cluster's DNS, which it claims.
    pub fn service_names(&self) -> [String; 3] {
        let (name, namespace) = (&self.service, self.key.namespace());
        [
            format!("{name}.{namespace}"),
            format!("{name}.{namespace}.svc"),
            format!("{name}.{namespace}.svc.cluster.local"),
        ]
    }

    pub fn claims(&self) -> Vec<Claim> {
        let mut claims: Vec<Claim> = self
            .hosts
            .iter()
            .flat_map(|host| {
                self.path_prefixes.iter().map(|prefix| Claim::HostPath {
                    host: host.clone(),
                    prefix: prefix.clone(),
                })
            })
            .collect();
        claims.push(Claim::Service {
            namespace: self.key.namespace().to_owned(),
            name: self.service.clone(),
        });
        claims
    }
}

/// An object's place in the "older keeps it" order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Age {
    /// Creation time; an object without one counts as the newest.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    pub key: FunctionKey,
}

impl Age {
    pub fn of(object: &ScaledObject, key: FunctionKey) -> Self {
        Self {
            created: object.creation_timestamp().map(|t| t.0),
            key,
        }
    }
}

/// Routes that keep their claims, and the objects in `Conflict` with the reason.
#[derive(Debug, Default)]
pub struct Resolution {
    pub routes: Vec<HttpRoute>,
    pub conflicts: BTreeMap<FunctionKey, String>,
}

/// Settles every claim: the oldest claimant of each claim holds it (for a Service's
/// name, the older of its Service's function and the objects listing it as a host),
/// and an object that does not hold every one of its claims is in `Conflict` (naming
/// the holder) and routes nothing. Each object's fate depends only on who else claims
/// what it claims, so the scaler and the activator reach the same answer from the same
/// objects.
pub fn resolve(routes: Vec<(Age, HttpRoute)>) -> Resolution {
    // Each object's place in the order; one without a creation time counts as newest.
    let orders: Vec<(bool, &Age)> = routes
        .iter()
        .map(|(age, _)| (age.created.is_none(), age))
        .collect();
    let keep_oldest = |oldest: &mut usize, candidate: usize| {
        if orders[candidate] < orders[*oldest] {
            *oldest = candidate;
        }
    };
    // By index into `routes`: each claim's holder, and for each Service name the oldest
    // object whose Service has it and the oldest that lists it as a host. The name goes
    // to the older of the two sides; objects listing it share it, by path prefix.
    let mut holders: HashMap<Claim, usize> = HashMap::new();
    let mut oldest_service: HashMap<String, usize> = HashMap::new();
    let mut oldest_lister: HashMap<&str, usize> = HashMap::new();
    for (i, (_, route)) in routes.iter().enumerate() {
        for claim in route.claims() {
            keep_oldest(holders.entry(claim).or_insert(i), i);
        }
        for name in route.service_names() {
            keep_oldest(oldest_service.entry(name).or_insert(i), i);
        }
        for host in &route.hosts {
            keep_oldest(oldest_lister.entry(host).or_insert(i), i);
        }
    }
    let key = |i: usize| &routes[i].1.key;
    let reasons: Vec<Option<String>> = routes
        .iter()
        .enumerate()
        .map(|(i, (_, route))| {
            let taken = route.claims().into_iter().find_map(|claim| {
                let holder = holders[&claim];
                (holder != i).then(|| {
                    format!(
                        "{claim} is already routed to {}, which is older",
                        key(holder)
                    )
                })
            });
            let name_listed_by_older = || {
                route.service_names().into_iter().find_map(|name| {
                    let lister = *oldest_lister.get(name.as_str())?;
                    (orders[lister] < orders[i]).then(|| {
                        format!(
                            "{name}, the name of Service {}/{}, is a host of {}, which is older",
                            route.key.namespace(),
                            route.service,
                            key(lister)
                        )
                    })
                })
            };
            let host_named_by_older = || {
                route.hosts.iter().find_map(|host| {
                    let service = *oldest_service.get(host)?;
                    (orders[service] < orders[oldest_lister[host.as_str()]]).then(|| {
                        format!(
                            "host {host} is a Service's name, routed to {}, which is older",
                            key(service)
                        )
                    })
                })
            };
            taken
                .or_else(name_listed_by_older)
                .or_else(host_named_by_older)
        })
        .collect();
    let mut resolution = Resolution::default();
    for ((_, route), reason) in routes.into_iter().zip(reasons) {
        match reason {
            Some(reason) => {
                resolution.conflicts.insert(route.key.clone(), reason);
            }
            None => resolution.routes.push(route),
        }
    }
    resolution.routes.sort_by(|a, b| a.key.cmp(&b.key));
    resolution
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, created: &str, metadata: &[(&str, &str)]) -> ScaledObject {
        let metadata: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "blink.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
            "spec": {"scaleTargetRef": {"name": name},
                     "triggers": [{"type": "http", "metadata": metadata}]}
        }))
        .expect("valid object")
    }

    fn route(o: &ScaledObject) -> HttpRoute {
        http_route(o).expect("http trigger").expect("valid route")
    }

    #[test]
    fn defaults_and_parsing() {
        let r = route(&object("hello", "2026-01-01T00:00:00Z", &[]));
        assert_eq!(r.service, "hello");
        assert_eq!(r.path_prefixes, ["/"]);
        assert!(r.hosts.is_empty());
        assert_eq!(r.port, None);
        let r = route(&object(
            "hello",
            "2026-01-01T00:00:00Z",
            &[
                ("hosts", "Hello.Example.com:8080, api.example.com"),
                ("pathPrefixes", "/a,/b"),
                ("service", "svc"),
                ("port", "http"),
                ("containerConcurrency", "4"),
                ("waitTimeout", "30"),
                ("queueLimit", "500"),
                ("responseTimeout", "120"),
            ],
        ));
        assert_eq!(r.hosts, ["hello.example.com", "api.example.com"]);
        assert_eq!(r.path_prefixes, ["/a", "/b"]);
        assert_eq!(r.service, "svc");
        assert_eq!(r.port.as_deref(), Some("http"));
        assert_eq!(r.container_concurrency, Some(4));
        assert_eq!(r.wait_timeout, Some(std::time::Duration::from_secs(30)));
        assert_eq!(r.queue_limit, Some(500));
        assert_eq!(
            r.response_timeout,
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(r.claims().len(), 5);
    }

    #[test]
    fn bad_metadata_is_named() {
        for (key, value, problem) in [
            ("pathPrefixes", "api", "does not start with /"),
            (
                "containerConcurrency",
                "-1",
                "is not a non-negative integer",
            ),
            ("waitTimeout", "0", "must be at least 1 second"),
            ("responseTimeout", "0", "must be at least 1 second"),
            ("responseTimeout", "1m", "is not a non-negative integer"),
            (
                "responseTimeout",
                "31536001",
                "must be at most 31536000 seconds (a year)",
            ),
            (
                "waitTimeout",
                "18446744073709551615",
                "must be at most 31536000 seconds (a year)",
            ),
            ("queueLimit", "many", "is not a non-negative integer"),
            ("queueLimit", "0", "must be at least 1"),
            ("hosts", "a/b", "is not a host name"),
            ("service", "web.v2", NOT_A_SERVICE_NAME),
            ("service", "Web", NOT_A_SERVICE_NAME),
            ("service", "2web", NOT_A_SERVICE_NAME),
            ("service", "web-", NOT_A_SERVICE_NAME),
        ] {
            let e = http_route(&object("f", "2026-01-01T00:00:00Z", &[(key, value)]))
                .expect("http trigger")
                .expect_err(key);
            assert_eq!((e.key, e.problem), (key, problem), "{key}={value}");
            assert!(e.to_string().contains(key), "{e}");
        }
        assert_eq!(MAX_TIMEOUT_SECONDS, 31_536_000, "the message's bound");
    }

    #[test]
    fn ports_are_stripped() {
        for (host, bare) in [
            ("a.example.com", "a.example.com"),
            ("a.example.com:80", "a.example.com"),
            ("10.96.0.1:8080", "10.96.0.1"),
            ("[::1]:80", "[::1]"),
            ("[::1]", "[::1]"),
        ] {
            assert_eq!(strip_port(host), bare);
        }
        for (host, bare) in [
            ("a.example.com.", "a.example.com"),
            ("a.example.com.:80", "a.example.com"),
            ("a.example.com:80", "a.example.com"),
            ("[::1]:80", "[::1]"),
        ] {
            assert_eq!(bare_host(host), bare);
        }
    }

    #[test]
    fn the_older_object_keeps_a_shared_claim() {
        let old = object("old", "2026-01-01T00:00:00Z", &[("hosts", "h.example")]);
        let new = object("new", "2026-02-01T00:00:00Z", &[("hosts", "H.example")]);
        let other = object("other", "2026-03-01T00:00:00Z", &[("hosts", "o.example")]);
        let with_age = |o: &ScaledObject| {
            let r = route(o);
            (Age::of(o, r.key.clone()), r)
        };
        // Whatever order they arrive in.
        for order in [[&new, &old, &other], [&old, &other, &new]] {
            let resolution = resolve(order.iter().map(|o| with_age(o)).collect());
            let routed: Vec<&str> = resolution.routes.iter().map(|r| r.key.name()).collect();
            assert_eq!(routed, ["old", "other"]);
            let reason = &resolution.conflicts[&route(&new).key];
            assert!(
                reason.contains("h.example") && reason.contains("ns/old"),
                "{reason}"
            );
        }
    }

    #[test]
    fn one_service_is_one_function() {
        let a = object("a", "2026-01-01T00:00:00Z", &[("service", "web")]);
        let b = object("b", "2026-01-02T00:00:00Z", &[("service", "web")]);
        let resolution = resolve(
            [&b, &a]
                .iter()
                .map(|o| (Age::of(o, route(o).key), route(o)))
                .collect(),
        );
        assert_eq!(resolution.routes.len(), 1);
        assert!(resolution.conflicts[&route(&b).key].contains("Service ns/web"));
    }

    #[test]
    fn a_services_name_goes_to_the_older_side() {
        let resolved = |objects: &[&ScaledObject]| {
            let resolution = resolve(
                objects
                    .iter()
                    .map(|o| (Age::of(o, route(o).key), route(o)))
                    .collect(),
            );
            let routed: Vec<String> = resolution
                .routes
                .iter()
                .map(|r| r.key.name().to_owned())
                .collect();
            (routed, resolution.conflicts)
        };
        let shop = object("shop", "2026-02-01T00:00:00Z", &[("service", "web")]);
        // Listed as a host after the Service's function came: the lister is told.
        let late = object(
            "late",
            "2026-03-01T00:00:00Z",
            &[("hosts", "x.example, WEB.ns.svc.cluster.local.")],
        );
        let (routed, conflicts) = resolved(&[&late, &shop]);
        assert_eq!(routed, ["shop"]);
        assert_eq!(
            conflicts[&route(&late).key],
            "host web.ns.svc.cluster.local is a Service's name, routed to ns/shop, which is older"
        );
        // Listed before: the lister keeps it, and the Service's function is told.
        let early = object(
            "early",
            "2026-01-01T00:00:00Z",
            &[("hosts", "web.ns"), ("pathPrefixes", "/api")],
        );
        let (routed, conflicts) = resolved(&[&shop, &early]);
        assert_eq!(routed, ["early"]);
        assert_eq!(
            conflicts[&route(&shop).key],
            "web.ns, the name of Service ns/web, is a host of ns/early, which is older"
        );
        // Listers share the name by prefix; their own names are theirs; another
        // namespace's name is another name.
        let also_early = object(
            "also",
            "2026-02-15T00:00:00Z",
            &[
                ("hosts", "web.ns, also.ns, web.other"),
                ("pathPrefixes", "/b"),
            ],
        );
        let (routed, conflicts) = resolved(&[&shop, &early, &also_early]);
        assert_eq!(routed, ["also", "early"]);
        assert_eq!(conflicts.len(), 1);
        // An older object listing a newer one's Service name and one of its hosts
        // keeps both: the name is never left routed nowhere.
        let older = object(
            "older",
            "2026-01-01T00:00:00Z",
            &[("hosts", "foo.example, web.ns")],
        );
        let newer = object(
            "newer",
            "2026-02-01T00:00:00Z",
            &[("hosts", "foo.example"), ("service", "web")],
        );
        let (routed, conflicts) = resolved(&[&newer, &older]);
        assert_eq!(routed, ["older"]);
        assert!(conflicts[&route(&newer).key].contains("foo.example"));
    }

    #[test]
    fn different_prefixes_on_one_host_share_it() {
        let a = object(
            "a",
            "2026-01-01T00:00:00Z",
            &[("hosts", "h"), ("pathPrefixes", "/a")],
        );
        let b = object(
            "b",
            "2026-01-02T00:00:00Z",
            &[("hosts", "h"), ("pathPrefixes", "/b")],
        );
        let resolution = resolve(
            [&a, &b]
                .iter()
                .map(|o| (Age::of(o, route(o).key), route(o)))
                .collect(),
        );
        assert_eq!(resolution.routes.len(), 2);
        assert!(resolution.conflicts.is_empty());
    }
}
