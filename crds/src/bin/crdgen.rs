//! Prints Blink's CustomResourceDefinitions as one multi-document YAML stream.
//!
//! The committed copies are regenerated with
//! `cargo run -p blink-crds --bin crdgen > crds/blink.sh_crds.yaml` and copied to
//! `charts/blink/crds/blink.sh_crds.yaml`; a test fails while either differs.
#![forbid(unsafe_code)]

use std::{io::Write, process::ExitCode};

fn main() -> ExitCode {
    let yaml = match blink_crds::crds_yaml() {
        Ok(yaml) => yaml,
        Err(err) => {
            eprintln!("crdgen: cannot render the CRDs as YAML: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(err) = std::io::stdout().lock().write_all(yaml.as_bytes()) {
        eprintln!("crdgen: cannot write to stdout: {err}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
