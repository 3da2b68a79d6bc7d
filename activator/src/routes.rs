//! Host (and path) → function, built from the routed ScaledObjects and their Services.
//! Pure: the table is rebuilt on every change of either and swapped in whole, so the
//! request path reads it without a lock.
//!
//! A function answers to:
//! - its `http` trigger's `hosts`, each with its `pathPrefixes` (longest prefix wins);
//! - its Service's names: `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`, and
//!   `svc` alone when no other routed Service in any namespace has that name (a short
//!   name two namespaces share is ambiguous, and answered as such);
//! - its Service's ClusterIP and port (`10.96.0.7:80`, and the bare IP for port 80),
//!   which is how requests arrive in transparent mode when clients use the IP.
//!
//! An object in `Conflict` (another, older one holds one of its claims) routes nothing;
//! its hosts and Service names that nobody else holds are answered `503` with why.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use blink_crds::routing::HttpRoute;

use crate::pool::Protocol;

/// What the activator needs of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Empty for the one unnamed port.
    pub name: String,
    pub port: u16,
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// h2c when the port says `appProtocol: kubernetes.io/h2c`, else HTTP/1.1.
    pub fn protocol(&self) -> Protocol {
        match self.app_protocol.as_deref() {
            Some("kubernetes.io/h2c") => Protocol::H2c,
            _ => Protocol::Http1,
        }
    }
}

/// Which port of `service` a route means: by name or number, or the only one.
pub fn service_port<'a>(
    route: &HttpRoute,
    service: &'a ServiceInfo,
) -> Result<&'a ServicePort, String> {
    match route.port.as_deref() {
        Some(wanted) => service
            .ports
            .iter()
            .find(|p| p.name == wanted || p.port.to_string() == wanted)
            .ok_or_else(|| format!("Service {} has no port {wanted:?}", route.service)),
        None => match service.ports.as_slice() {
            [only] => Ok(only),
            [] => Err(format!("Service {} has no ports", route.service)),
            _ => Err(format!(
                "Service {} has several ports; the http trigger's `port` must name one",
                route.service
            )),
        },
    }
}

/// A short name two namespaces share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ambiguous {
    pub namespaces: BTreeSet<String>,
}

/// Why a host routes nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    UnknownHost,
    /// The host is known, but no path prefix of it matches.
    NoPrefix,
    Ambiguous(Ambiguous),
    /// The host is one a `ScaledObject` in `Conflict` names, and no other object
    /// holds: why that object routes nothing.
    Conflicted(Arc<str>),
}

#[derive(Debug)]
enum Short<T> {
    One(T),
    Ambiguous(Ambiguous),
}

/// The routing table, generic over what a route leads to (the activator's
/// `Arc<Function>`; keys in tests).
#[derive(Debug)]
pub struct RouteTable<T> {
    /// Explicit hosts: prefixes, longest first.
    hosts: HostMap<Vec<(String, T)>>,
    /// Service names and ClusterIP forms.
    names: HostMap<T>,
    short: HostMap<Short<T>>,
    /// Hosts and Service names of objects in `Conflict` that no routed object holds:
    /// why they route nothing.
    conflicted: HostMap<Arc<str>>,
}

/// Every request looks up its host once or twice: a fast hash (seeded per process)
/// rather than SipHash. The keys come from the cluster's objects, not from clients.
type HostMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            hosts: HostMap::default(),
            names: HostMap::default(),
            short: HostMap::default(),
            conflicted: HostMap::default(),
        }
    }
}

impl<T: Clone> RouteTable<T> {
    /// The table for `routes` (already settled: no two claim the same thing), each
    /// with its Service when known and what it leads to.
    pub fn build<'a>(
        routes: impl IntoIterator<Item = (&'a HttpRoute, Option<&'a ServiceInfo>, T)>,
    ) -> Self {
        let mut table = Self::default();
        let mut short_names: HashMap<String, Vec<(String, T)>> = HashMap::new();
        for (route, service, target) in routes {
            for host in &route.hosts {
                let prefixes = table.hosts.entry(host.clone()).or_default();
                for prefix in &route.path_prefixes {
                    prefixes.push((prefix.clone(), target.clone()));
                }
            }
            for name in route.service_names() {
                table.names.insert(name, target.clone());
            }
            short_names
                .entry(route.service.clone())
                .or_default()
                .push((route.key.namespace().to_owned(), target.clone()));
            if let Some(service) = service
                && let Some(ip) = service.cluster_ip
                && let Ok(port) = service_port(route, service)
            {
                let ip = match ip {
                    IpAddr::V4(v4) => v4.to_string(),
                    IpAddr::V6(v6) => format!("[{v6}]"),
                };
                table
                    .names
                    .insert(format!("{ip}:{}", port.port), target.clone());
                if port.port == 80 {
                    table.names.insert(ip, target.clone());
                }
            }
        }
        for prefixes in table.hosts.values_mut() {
            prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        }
        for (name, mut owners) in short_names {
            let entry = if owners.len() == 1 {
                let (_, target) = owners.remove(0);
                Short::One(target)
            } else {
                Short::Ambiguous(Ambiguous {
                    namespaces: owners.into_iter().map(|(ns, _)| ns).collect(),
                })
            };
            table.short.insert(name, entry);
        }
        table
    }

    /// The hosts and Service names of `conflicted` routes (objects in `Conflict`, each
    /// with why) that no routed object holds: a request for one is answered with the
    /// reason, not as for a host nobody names.
    pub fn with_conflicted<'a>(
        mut self,
        conflicted: impl IntoIterator<Item = (&'a HttpRoute, &'a str)>,
    ) -> Self {
        for (route, reason) in conflicted {
            let reason: Arc<str> = format!("{} is in Conflict: {reason}", route.key).into();
            for host in route.hosts.iter().cloned().chain(route.service_names()) {
                if !self.hosts.contains_key(&host) && !self.names.contains_key(&host) {
                    self.conflicted.insert(host, reason.clone());
                }
            }
        }
        self
    }

    /// Where a request for `host` (as sent: any case, maybe with a port) and `path`
    /// goes.
    pub fn lookup(&self, host: &str, path: &str) -> Result<&T, Miss> {
        let lowered;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = host.to_ascii_lowercase();
            lowered.as_str()
        } else {
            host
        };
        // A Service's own names first, with or without a port (`resolve` left no
        // routed object listing another's Service name in `hosts`, so the order
        // matters only for ClusterIPs). The ClusterIP form keeps its port (bare for
        // port 80). The name as sent is tried before its bare form is made, which
        // costs a scan of it.
        if let Some(target) = self.names.get(host) {
            return Ok(target);
        }
        let bare = blink_crds::routing::bare_host(host);
        if bare.len() != host.len()
            && !is_ip_literal(bare)
            && let Some(target) = self.names.get(bare)
        {
            return Ok(target);
        }
        if let Some(prefixes) = self.hosts.get(bare) {
            return prefixes
                .iter()
                .find(|(prefix, _)| path_has_prefix(path, prefix))
                .map(|(_, target)| target)
                .ok_or(Miss::NoPrefix);
        }
        match self.short.get(bare) {
            Some(Short::One(target)) => Ok(target),
            Some(Short::Ambiguous(a)) => Err(Miss::Ambiguous(a.clone())),
            None => Err(self
                .conflicted
                .get(bare)
                .map_or(Miss::UnknownHost, |reason| Miss::Conflicted(reason.clone()))),
        }
    }
}

/// An IP address as a host: a ClusterIP is routed with its port only.
fn is_ip_literal(host: &str) -> bool {
    host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok()
}

/// `/api` matches `/api`, `/api/x` and `/api?q`, not `/apix`; `/` and `/api/` match
/// everything under them.
fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?']),
    }
}

#[cfg(test)]
mod tests {
    use blink_crds::FunctionKey;

    use super::*;

    fn route(ns: &str, name: &str, hosts: &[&str], prefixes: &[&str], service: &str) -> HttpRoute {
        HttpRoute {
            key: FunctionKey::new(ns, name).expect("key"),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            path_prefixes: if prefixes.is_empty() {
                vec!["/".to_owned()]
            } else {
                prefixes.iter().map(|p| (*p).to_owned()).collect()
            },
            service: service.to_owned(),
            port: None,
            container_concurrency: None,
            wait_timeout: None,
            queue_limit: None,
            response_timeout: None,
        }
    }

    fn service(ip: &str, port: u16) -> ServiceInfo {
        ServiceInfo {
            cluster_ip: ip.parse().ok(),
            ports: vec![ServicePort {
                name: "http".to_owned(),
                port,
                app_protocol: None,
            }],
        }
    }

    fn table(routes: &[(HttpRoute, Option<ServiceInfo>)]) -> RouteTable<String> {
        RouteTable::build(
            routes
                .iter()
                .map(|(r, s)| (r, s.as_ref(), r.key.to_string())),
        )
    }

    #[test]
    fn a_conflicted_objects_own_names_say_why_they_route_nothing() {
        let held = route("a", "old", &["shared.example"], &[], "old");
        let late = route("a", "late", &["shared.example", "own.example"], &[], "late");
        let t = table(&[(held, None)]).with_conflicted([(
            &late,
            "host shared.example path / is already routed to a/old, which is older",
        )]);
        assert_eq!(
            t.lookup("shared.example", "/"),
            Ok(&"a/old".to_owned()),
            "the holder keeps it"
        );
        let why = "a/late is in Conflict: host shared.example path / is already routed to a/old, which is older";
        for host in [
            "own.example",
            "Own.Example:8080",
            "late.a",
            "late.a.svc.cluster.local",
        ] {
            assert_eq!(
                t.lookup(host, "/"),
                Err(Miss::Conflicted(why.into())),
                "{host}"
            );
        }
        assert_eq!(t.lookup("nobody.example", "/"), Err(Miss::UnknownHost));
    }

    #[test]
    fn a_service_name_reaches_its_service_with_or_without_a_port() {
        // shop/web's Service is `web` in `shop`.
        let t = table(&[
            (route("b", "x", &["x.example"], &[], "x"), None),
            (route("shop", "web", &[], &[], "web"), None),
        ]);
        for host in [
            "web.shop",
            "web.shop:80",
            "WEB.shop.:8080",
            "web.shop.svc:80",
        ] {
            assert_eq!(t.lookup(host, "/"), Ok(&"shop/web".to_owned()), "{host}");
        }
        assert_eq!(t.lookup("x.example:8080", "/"), Ok(&"b/x".to_owned()));
    }

    #[test]
    fn lookups() {
        let t = table(&[
            (
                route("a", "api", &["example.com"], &["/api", "/api/v2"], "api"),
                Some(service("10.96.0.7", 80)),
            ),
            (
                route("a", "web", &["example.com"], &["/"], "web"),
                Some(service("10.96.0.8", 8080)),
            ),
            (route("a", "dup", &[], &[], "same"), None),
            (route("b", "dup", &[], &[], "same"), None),
        ]);
        let cases: &[(&str, &str, Result<&str, Miss>)] = &[
            ("example.com", "/api/v2/x", Ok("a/api")),
            ("Example.COM:8080", "/api", Ok("a/api")),
            ("example.com", "/api?x=1", Ok("a/api")),
            ("example.com", "/apix", Ok("a/web")),
            ("example.com", "/", Ok("a/web")),
            ("api.a", "/anything", Ok("a/api")),
            ("api.a.svc", "/", Ok("a/api")),
            ("api.a.svc.cluster.local:80", "/", Ok("a/api")),
            ("api", "/", Ok("a/api")),
            ("10.96.0.7:80", "/", Ok("a/api")),
            ("10.96.0.7", "/", Ok("a/api")),
            ("10.96.0.8:8080", "/", Ok("a/web")),
            ("10.96.0.8", "/", Err(Miss::UnknownHost)),
            ("10.96.0.7:9999", "/", Err(Miss::UnknownHost)),
            // A fully qualified name's trailing dot.
            ("example.com.", "/api", Ok("a/api")),
            ("example.com.:8080", "/", Ok("a/web")),
            ("api.a.svc.cluster.local.", "/", Ok("a/api")),
            ("api.", "/", Ok("a/api")),
            ("same.b", "/", Ok("b/dup")),
            ("nobody.example", "/", Err(Miss::UnknownHost)),
        ];
        for (host, path, expected) in cases {
            let got = t.lookup(host, path).map(String::as_str);
            assert_eq!(got, expected.clone(), "{host}{path}");
        }
        match t.lookup("same", "/") {
            Err(Miss::Ambiguous(a)) => {
                assert_eq!(a.namespaces.into_iter().collect::<Vec<_>>(), ["a", "b"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_host_without_a_matching_prefix_is_named_so() {
        let t = table(&[(route("a", "api", &["h"], &["/api"], "api"), None)]);
        assert_eq!(t.lookup("h", "/other"), Err(Miss::NoPrefix));
    }

    #[test]
    fn ports_by_name_number_or_the_only_one() {
        let svc = ServiceInfo {
            cluster_ip: None,
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    port: 80,
                    app_protocol: None,
                },
                ServicePort {
                    name: "grpc".into(),
                    port: 9000,
                    app_protocol: Some("kubernetes.io/h2c".into()),
                },
            ],
        };
        let mut r = route("a", "f", &[], &[], "f");
        assert!(service_port(&r, &svc).is_err_and(|e| e.contains("several ports")));
        r.port = Some("grpc".into());
        assert_eq!(
            service_port(&r, &svc).map(|p| p.protocol()),
            Ok(Protocol::H2c)
        );
        r.port = Some("80".into());
        assert_eq!(
            service_port(&r, &svc).map(|p| p.protocol()),
            Ok(Protocol::Http1)
        );
        r.port = Some("nope".into());
        assert!(service_port(&r, &svc).is_err_and(|e| e.contains("no port \"nope\"")));
    }

    #[test]
    fn prefixes() {
        for (path, prefix, matches) in [
            ("/api", "/api", true),
            ("/api/x", "/api", true),
            ("/apix", "/api", false),
            ("/api?x", "/api", true),
            ("/x", "/", true),
            ("/api/x", "/api/", true),
            ("/ap", "/api", false),
        ] {
            assert_eq!(path_has_prefix(path, prefix), matches, "{path} {prefix}");
        }
    }
}
