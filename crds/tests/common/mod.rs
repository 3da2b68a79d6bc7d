//! Shared by the integration tests: where the fixtures are, and reading YAML streams
//! and CRD schemas as plain JSON values.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

/// The shared directory (`/work/shared` on the bed): `BLINK_SHARED_DIR` if set, else
/// `../../shared` from this crate (`crds/` → repository root → its sibling `shared/`).
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("BLINK_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

/// KEDA v2.20.2's CRDs and documentation examples.
pub fn keda_dir() -> PathBuf {
    shared_dir().join("fixtures/keda-v2.20.2")
}

/// Every document of a YAML stream, as JSON values.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML document"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The documents of a KEDA fixture file.
pub fn keda_file(name: &str) -> Vec<Value> {
    let path = keda_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (set BLINK_SHARED_DIR?)",
            path.display()
        )
    });
    yaml_documents(&text)
}

/// Blink's CRDs as installed, as JSON values.
pub fn blink_crds() -> Vec<Value> {
    blink_crds::all_crds()
        .iter()
        .map(|crd| serde_json::to_value(crd).expect("CRD serializes"))
        .collect()
}

/// The CRD of `kind` among `crds`.
pub fn crd_of<'a>(crds: &'a [Value], kind: &str) -> &'a Value {
    crds.iter()
        .find(|crd| crd["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD of kind {kind}"))
}

/// The `openAPIV3Schema` of a CRD's only version.
pub fn schema_of(crd: &Value) -> &Value {
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1, "one version per CRD");
    &versions[0]["schema"]["openAPIV3Schema"]
}
