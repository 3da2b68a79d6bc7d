//! Reading the bed's audit log: who wrote which `*/scale` and EndpointSlice, in
//! which order. The bed's policy records only those writes (level Metadata), one JSON
//! event per line. A line is written once its request has been answered: a change a
//! test sees by a read or a watch may be in the cluster before its writer's line is in
//! the file, so a test that counts lines waits for them to settle.

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub stage: String,
    pub verb: String,
    pub user: AuditUser,
    pub object_ref: Option<ObjectRef>,
    pub response_status: Option<ResponseStatus>,
    pub request_received_timestamp: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditUser {
    pub username: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    pub resource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    pub api_group: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ResponseStatus {
    pub code: Option<u16>,
}

impl AuditEvent {
    /// A completed write that the API server accepted (2xx).
    pub fn succeeded(&self) -> bool {
        self.stage == "ResponseComplete"
            && self
                .response_status
                .as_ref()
                .and_then(|s| s.code)
                .is_some_and(|c| (200..300).contains(&c))
    }

    fn is(&self, namespace: &str, resource: &str, subresource: Option<&str>) -> bool {
        self.object_ref.as_ref().is_some_and(|o| {
            o.namespace.as_deref() == Some(namespace)
                && o.resource.as_deref() == Some(resource)
                && o.subresource.as_deref() == subresource
        })
    }
}

/// Every completed event in the log.
pub fn read(path: &Path) -> anyhow::Result<Vec<AuditEvent>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // The API server may be writing the last line as it is read: only whole lines count.
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str::<AuditEvent>(line).context("parsing an audit event"))
        .filter(|e| e.as_ref().map_or(true, |e| e.stage == "ResponseComplete"))
        .collect()
}

/// Accepted writes of `resource`'s `/scale` (e.g. `deployments`) in `namespace`.
pub fn scale_writes(events: &[AuditEvent], namespace: &str, resource: &str) -> Vec<AuditEvent> {
    events
        .iter()
        .filter(|e| e.succeeded() && e.is(namespace, resource, Some("scale")))
        .cloned()
        .collect()
}

/// Accepted EndpointSlice writes in `namespace`.
pub fn endpoint_slice_writes(events: &[AuditEvent], namespace: &str) -> Vec<AuditEvent> {
    events
        .iter()
        .filter(|e| e.succeeded() && e.is(namespace, "endpointslices", None))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a","stage":"ResponseComplete","requestURI":"/apis/apps/v1/namespaces/t/deployments/web/scale","verb":"patch","user":{"username":"scaler-a","groups":["system:masters","system:authenticated"]},"sourceIPs":["127.0.0.1"],"objectRef":{"resource":"deployments","namespace":"t","name":"web","apiGroup":"apps","apiVersion":"v1","subresource":"scale"},"responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"2026-11-25T11:05:14.948959Z","stageTimestamp":"2026-11-25T11:05:14.958959Z"}"#;

    #[test]
    fn finds_scale_writes_by_namespace_and_resource() {
        let dir = std::env::temp_dir().join(format!("blink-audit-{}", crate::random_suffix()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.log");
        let refused = LINE.replace("\"code\":200", "\"code\":409");
        let other_ns = LINE.replace("\"namespace\":\"t\"", "\"namespace\":\"u\"");
        std::fs::write(&path, format!("{LINE}\n{refused}\n{other_ns}\n")).expect("write");
        let events = read(&path).expect("read");
        assert_eq!(events.len(), 3);
        let writes = scale_writes(&events, "t", "deployments");
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].user.username, "scaler-a");
        assert!(scale_writes(&events, "t", "statefulsets").is_empty());
        assert!(endpoint_slice_writes(&events, "t").is_empty());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
