//! The activator's Prometheus metrics. Label sets are bounded: `namespace`, `name`,
//! `code`, `kind` — never per pod, per replica or per request. The request path
//! touches only handles cached per function ([`FunctionMetrics`]), never a label
//! lookup.

use std::{sync::Mutex, time::Duration};

use blink_crds::FunctionKey;
use http::StatusCode;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub namespace: String,
    pub name: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// How many buckets a request's duration and wait have: the highest, 100 µs·2²³ ≈
/// 839 s, is above the default wait (60 s) and response (300 s) timeouts, so that long
/// cold starts and slow answers have a quantile, not only `+Inf`.
const LATENCY_BUCKETS: u16 = 24;

fn latency_histogram() -> Histogram {
    // 100 µs … ~14 min.
    Histogram::new(exponential_buckets(1e-4, 2.0, LATENCY_BUCKETS))
}

#[derive(Debug)]
pub struct Metrics {
    requests: Family<CodeLabels, Counter>,
    request_duration: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    queue_wait: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<FunctionLabels, Gauge>,
    queued: Family<FunctionLabels, Gauge>,
    upstream_connections: Family<FunctionLabels, Gauge>,
    proxy_errors: Family<KindLabels, Counter>,
    /// Client connections open now.
    pub connections: Gauge,
    /// Connections answered 503 at once because the global bound was reached.
    pub connections_refused: Counter,
    pub pokes_sent: Counter,
    /// From the request that made a poke (its head read) to the scaler's answer.
    pub poke_latency: Histogram,
    /// From a function's first ready endpoint after zero (as the activator learns it)
    /// to its first held request's connection to that replica.
    pub ready_to_forward: Histogram,
    pub snapshots: Family<KindLabels, Counter>,
}

fn fine_histogram() -> Histogram {
    // 10 µs … ~5 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 20))
}

impl Metrics {
    /// Registers every metric under `blink_activator_`.
    pub fn register(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("blink_activator");
        let metrics = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            queue_wait: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            queued: Family::default(),
            upstream_connections: Family::default(),
            proxy_errors: Family::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            pokes_sent: Counter::default(),
            poke_latency: fine_histogram(),
            ready_to_forward: fine_histogram(),
            snapshots: Family::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by function and HTTP status code",
            metrics.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response head, by function",
            metrics.request_duration.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time a request waited for a replica (the cold start, at zero), by function",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "in_flight",
            "Requests being forwarded now, by function",
            metrics.in_flight.clone(),
        );
        registry.register(
            "queued",
            "Requests waiting for a replica now, by function",
            metrics.queued.clone(),
        );
        registry.register(
            "upstream_connections",
            "Connections to a function's replicas open now, by function",
            metrics.upstream_connections.clone(),
        );
        registry.register(
            "proxy_errors",
            "Failures on the way to a replica, by kind (connect, stale_connection, upstream, response_timeout, client_body, upgrade)",
            metrics.proxy_errors.clone(),
        );
        registry.register(
            "connections",
            "Client connections open now",
            metrics.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections answered 503 because the connection bound was reached",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "pokes_sent",
            "Pokes sent to the scaler",
            metrics.pokes_sent.clone(),
        );
        registry.register(
            "poke_seconds",
            "From the request that made a poke to the scaler's answer",
            metrics.poke_latency.clone(),
        );
        registry.register(
            "ready_to_forward_seconds",
            "From a function's first ready endpoint after zero to its first held request's connection",
            metrics.ready_to_forward.clone(),
        );
        registry.register(
            "snapshots",
            "Demand snapshots, by outcome (sent, refused, failed)",
            metrics.snapshots.clone(),
        );
        metrics
    }

    pub fn proxy_error(&self, kind: &'static str) {
        self.proxy_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// The handles one function's requests update.
    pub fn function(&self, key: &FunctionKey) -> FunctionMetrics {
        let labels = FunctionLabels {
            namespace: key.namespace().to_owned(),
            name: key.name().to_owned(),
        };
        FunctionMetrics {
            codes: Mutex::new(Codes::default()),
            requests: self.requests.clone(),
            request_duration: self.request_duration.get_or_create(&labels).clone(),
            queue_wait: self.queue_wait.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            queued: self.queued.get_or_create(&labels).clone(),
            upstream_connections: self.upstream_connections.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// A function is no longer routed: its series go, and answers to its requests
    /// still on their way make none again.
    pub fn forget(&self, function: &FunctionMetrics) {
        let labels = &function.labels;
        self.request_duration.remove(labels);
        self.queue_wait.remove(labels);
        self.in_flight.remove(labels);
        self.queued.remove(labels);
        self.upstream_connections.remove(labels);
        let mut codes = function.codes.lock().unwrap_or_else(|e| e.into_inner());
        codes.forgotten = true;
        for (code, _) in &codes.counters {
            self.requests.remove(&CodeLabels {
                namespace: labels.namespace.clone(),
                name: labels.name.clone(),
                code: *code,
            });
        }
    }
}

/// One function's metric handles.
#[derive(Debug)]
pub struct FunctionMetrics {
    labels: FunctionLabels,
    codes: Mutex<Codes>,
    requests: Family<CodeLabels, Counter>,
    request_duration: Histogram,
    queue_wait: Histogram,
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub upstream_connections: Gauge,
}

/// The codes a function answered so far (a handful), each with its counter.
#[derive(Debug, Default)]
struct Codes {
    counters: Vec<(u16, Counter)>,
    /// The function is gone: no series is made for it any more.
    forgotten: bool,
}

impl FunctionMetrics {
    pub fn answered(&self, status: StatusCode, elapsed: Duration) {
        self.request_duration.observe(elapsed.as_secs_f64());
        let code = status.as_u16();
        let mut codes = self.codes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, counter)) = codes.counters.iter().find(|(c, _)| *c == code) {
            counter.inc();
            return;
        }
        if codes.forgotten {
            return;
        }
        let counter = self
            .requests
            .get_or_create(&CodeLabels {
                namespace: self.labels.namespace.clone(),
                name: self.labels.name.clone(),
                code,
            })
            .clone();
        counter.inc();
        codes.counters.push((code, counter));
    }

    pub fn waited(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_function_leaves_no_series() {
        let mut prometheus = Registry::default();
        let metrics = Metrics::register(&mut prometheus);
        let key: FunctionKey = "apps/gone".parse().expect("key");
        let function = metrics.function(&key);
        function.answered(StatusCode::OK, Duration::from_millis(3));
        function.answered(StatusCode::GATEWAY_TIMEOUT, Duration::from_secs(90));
        function.waited(Duration::from_secs(70));
        let text = |prometheus: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, prometheus).expect("encoded");
            text
        };
        let before = text(&prometheus);
        assert!(before.contains("code=\"504\""), "{before}");
        // A 70 s wait lands in a bucket of its own, not only in +Inf.
        let bucket_over_a_minute = before.lines().any(|line| {
            line.starts_with("blink_activator_queue_wait_seconds_bucket")
                && line.contains("name=\"gone\"")
                && !line.contains("+Inf")
                && line.ends_with(" 1")
                && line
                    .split("le=\"")
                    .nth(1)
                    .and_then(|le| le.split('"').next())
                    .and_then(|le| le.parse::<f64>().ok())
                    .is_some_and(|le| (70.0..200.0).contains(&le))
        });
        assert!(bucket_over_a_minute, "{before}");
        metrics.forget(&function);
        // A request still on its way, answered after: no series comes back.
        function.answered(StatusCode::SERVICE_UNAVAILABLE, Duration::from_millis(1));
        let after = text(&prometheus);
        assert!(!after.contains("name=\"gone\""), "{after}");
    }
}
