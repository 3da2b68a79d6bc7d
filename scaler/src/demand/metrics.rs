//! The demand endpoint's metrics: `blink_scaler_demand_reports_total{result}`, one
//! count per snapshot or poke received, by what became of it. The label takes five
//! values, whatever the clients send.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// What became of a report.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReportResult {
    /// Applied.
    Accepted,
    /// No valid token, another user's token, or the token could not be checked.
    RefusedAuth,
    /// Sent to a scaler that does not hold the Lease (answered 421).
    RefusedNotLeader,
    /// A snapshot not newer than the last applied from its session.
    Stale,
    /// Malformed, too large, or with impossible values.
    Invalid,
}

impl ReportResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::RefusedAuth => "refused_auth",
            Self::RefusedNotLeader => "refused_not_leader",
            Self::Stale => "stale",
            Self::Invalid => "invalid",
        }
    }
}

impl EncodeLabelValue for ReportResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportLabels {
    result: ReportResult,
}

/// Counters the demand server updates; clones share them.
#[derive(Clone, Debug, Default)]
pub struct DemandMetrics {
    reports: Family<ReportLabels, Counter>,
}

impl DemandMetrics {
    /// Registers the metrics in `registry` and returns the handle that updates them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "blink_scaler_demand_reports",
            "Demand reports (snapshots and pokes) received, by result",
            metrics.reports.clone(),
        );
        metrics
    }

    /// Counts one report.
    pub fn report(&self, result: ReportResult) {
        self.reports.get_or_create(&ReportLabels { result }).inc();
    }

    /// Reports counted with `result` so far.
    pub fn reports(&self, result: ReportResult) -> u64 {
        self.reports.get_or_create(&ReportLabels { result }).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_the_documented_name_and_labels() {
        let mut registry = Registry::default();
        let metrics = DemandMetrics::register(&mut registry);
        metrics.report(ReportResult::Accepted);
        metrics.report(ReportResult::Accepted);
        metrics.report(ReportResult::RefusedNotLeader);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains(r#"blink_scaler_demand_reports_total{result="accepted"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"blink_scaler_demand_reports_total{result="refused_not_leader"} 1"#),
            "{text}"
        );
        assert_eq!(metrics.reports(ReportResult::Accepted), 2);
    }
}
