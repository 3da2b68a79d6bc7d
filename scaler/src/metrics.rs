//! The scaler's Prometheus metrics. Label sets are bounded: `namespace`, `name`,
//! `trigger` and `direction` — never per pod or per request.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub namespace: String,
    pub name: String,
    pub trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    pub namespace: String,
    pub name: String,
    /// `up` or `down`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// Writes: `scale`, `status`, `finalizer`, `slice`, `generated`. Reads: `scale`,
    /// `pods` (the look for pods the scheduler cannot place).
    pub kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub api_writes: Family<ApiLabels, Counter>,
    pub api_reads: Family<ApiLabels, Counter>,
    pub first_decisions: Counter,
    pub desired_replicas: Family<FunctionLabels, Gauge>,
    pub current_replicas: Family<FunctionLabels, Gauge>,
    pub trigger_value: Family<TriggerLabels, Gauge<f64, AtomicU64>>,
    pub trigger_errors: Family<TriggerLabels, Counter>,
    pub decision_duration: Histogram,
    pub scale_actions: Family<ScaleLabels, Counter>,
    pub cold_starts: Family<FunctionLabels, Counter>,
    pub poke_to_patch: Histogram,
    pub poke_to_patch_sent: Histogram,
    pub functions: Gauge,
}

impl Metrics {
    /// Registers every metric under `blink_scaler_`.
    pub fn register(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("blink_scaler");
        let metrics = Self {
            api_writes: Family::default(),
            api_reads: Family::default(),
            first_decisions: Counter::default(),
            desired_replicas: Family::default(),
            current_replicas: Family::default(),
            trigger_value: Family::default(),
            trigger_errors: Family::default(),
            // 10 µs … ~80 ms: a decision is pure arithmetic.
            decision_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-5, 2.0, 14),
            ),
            scale_actions: Family::default(),
            cold_starts: Family::default(),
            // 100 µs … ~1.6 s: a poke should reach the API server in milliseconds.
            poke_to_patch: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 15),
            ),
            // 10 µs … ~80 ms: Blink's own part, before the API server answers.
            poke_to_patch_sent: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-5, 2.0, 14),
            ),
            functions: Gauge::default(),
        };
        registry.register(
            "desired_replicas",
            "Replicas the decision asks for",
            metrics.desired_replicas.clone(),
        );
        registry.register(
            "current_replicas",
            "Replicas the target's /scale reports",
            metrics.current_replicas.clone(),
        );
        registry.register(
            "trigger_value",
            "The last metric value a trigger reported",
            metrics.trigger_value.clone(),
        );
        registry.register(
            "trigger_errors",
            "Failed trigger reads",
            metrics.trigger_errors.clone(),
        );
        registry.register_with_unit(
            "decision_duration",
            "Time to decide one function's replica count",
            prometheus_client::registry::Unit::Seconds,
            metrics.decision_duration.clone(),
        );
        registry.register(
            "scale_actions",
            "PATCHes of /scale, by direction",
            metrics.scale_actions.clone(),
        );
        registry.register(
            "cold_starts",
            "Scale-ups from zero",
            metrics.cold_starts.clone(),
        );
        registry.register_with_unit(
            "poke_to_patch",
            "From a poke's arrival to the /scale PATCH it caused",
            prometheus_client::registry::Unit::Seconds,
            metrics.poke_to_patch.clone(),
        );
        registry.register(
            "api_writes",
            "Writes to the API server, by kind",
            metrics.api_writes.clone(),
        );
        registry.register(
            "api_reads",
            "Reads by the functions' workers: GETs of /scale (kind=scale) and LISTs of pods (kind=pods; each with a GET of /scale)",
            metrics.api_reads.clone(),
        );
        registry.register(
            "first_decisions",
            "Functions that made their first decision since start (a full pass when equal to functions)",
            metrics.first_decisions.clone(),
        );
        registry.register_with_unit(
            "poke_to_patch_sent",
            "From a poke's arrival to the /scale PATCH it caused being sent",
            prometheus_client::registry::Unit::Seconds,
            metrics.poke_to_patch_sent.clone(),
        );
        registry.register(
            "functions",
            "ScaledObjects this scaler follows",
            metrics.functions.clone(),
        );
        metrics
    }

    pub fn wrote(&self, kind: &'static str) {
        self.api_writes.get_or_create(&ApiLabels { kind }).inc();
    }

    pub fn read(&self, kind: &'static str) {
        self.api_reads.get_or_create(&ApiLabels { kind }).inc();
    }

    /// Drops every series of a function that is gone, so label sets stay bounded by
    /// the functions that exist.
    pub fn forget(&self, namespace: &str, name: &str, triggers: &[String]) {
        let f = FunctionLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.desired_replicas.remove(&f);
        self.current_replicas.remove(&f);
        self.cold_starts.remove(&f);
        for direction in ["up", "down"] {
            self.scale_actions.remove(&ScaleLabels {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                direction,
            });
        }
        for trigger in triggers {
            let t = TriggerLabels {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                trigger: trigger.clone(),
            };
            self.trigger_value.remove(&t);
            self.trigger_errors.remove(&t);
        }
    }
}
