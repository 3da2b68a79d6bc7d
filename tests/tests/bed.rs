//! The bed's own scripts say clearly what is wrong instead of failing somewhere later.

use std::process::Command;

use anyhow::ensure;
use blink_tests::bed::scripts_dir;

#[test]
fn a_taken_port_gets_one_clear_line_naming_it() {
    blink_tests::run("bed-port", |ctx| async move {
        // The bed's own Kafka holds this port inside the namespace already.
        let port = ctx
            .bed()
            .kafka_bootstrap
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .to_string();
        let dir = ctx.bed().run_dir.join("data").join(ctx.namespace());
        let out = Command::new(scripts_dir().join("kafka"))
            .args(["serve", &dir.display().to_string(), &port, "39999"])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "started on a taken port");
        ensure!(
            stderr.contains(&format!("port {port} (for kafka in"))
                && stderr.contains("already taken"),
            "unclear message: {stderr}"
        );
        Ok(())
    });
}

#[test]
fn the_bed_reports_itself_running() {
    blink_tests::run("bed-status", |_ctx| async move {
        let out = Command::new(scripts_dir().join("bed"))
            .arg("status")
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "bed status failed: {stdout}");
        ensure!(stdout.contains("Blink test bed running"), "{stdout}");
        Ok(())
    });
}
