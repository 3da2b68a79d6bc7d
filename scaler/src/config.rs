//! The scaler's configuration: flags, each with an environment variable. A bad value
//! exits with code 64 (`EX_USAGE`) and one line naming it.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

/// Exit code for bad configuration (sysexits' `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "blink-scaler",
    version,
    about = "Blink's control plane",
    args_override_self = true
)]
pub struct Config {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "BLINK_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,

    /// Address of the demand endpoint (activator reports; HTTP/1.1 and h2c).
    #[arg(long, env = "BLINK_DEMAND_ADDR", default_value = "0.0.0.0:9091")]
    pub demand_addr: SocketAddr,

    /// This pod's name: the first half of the Lease's holderIdentity.
    #[arg(long, env = "POD_NAME", default_value = "blink-scaler")]
    pub pod_name: String,

    /// The address activators reach this pod's demand endpoint at (pod IP).
    #[arg(long, env = "POD_IP", default_value = "127.0.0.1")]
    pub pod_ip: String,

    /// Blink's own namespace: the Lease, the activator Service and ServiceAccount.
    #[arg(long, env = "POD_NAMESPACE", default_value = "blink-system")]
    pub namespace: String,

    /// Only follow objects in this namespace (all namespaces when empty).
    #[arg(long, env = "BLINK_WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "BLINK_LEASE_NAME", default_value = "blink-scaler")]
    pub lease_name: String,

    /// How long a Lease holds without renewal.
    #[arg(long, env = "BLINK_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// Renew this long before the Lease would expire.
    #[arg(long, env = "BLINK_LEASE_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub lease_grace: Duration,

    /// The activators' Service (its EndpointSlices name the reporting activators).
    #[arg(
        long,
        env = "BLINK_ACTIVATOR_SERVICE",
        default_value = "blink-activator"
    )]
    pub activator_service: String,

    /// The ServiceAccount whose tokens may report demand.
    #[arg(
        long,
        env = "BLINK_ACTIVATOR_SERVICE_ACCOUNT",
        default_value = "blink-activator"
    )]
    pub activator_service_account: String,

    /// Namespace of that ServiceAccount (Blink's namespace when empty).
    #[arg(long, env = "BLINK_ACTIVATOR_NAMESPACE", default_value = "")]
    pub activator_namespace: String,

    /// The activators' proxy port: where Blink's slice sends a transparent Service's
    /// traffic while the function is at zero.
    #[arg(long, env = "BLINK_ACTIVATOR_PORT", default_value_t = 8080)]
    pub activator_port: u16,

    /// Bound on every read of a trigger's source.
    #[arg(long, env = "BLINK_TRIGGER_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub trigger_timeout: Duration,

    /// An activator silent this long keeps its last values (never read as silence).
    #[arg(long, env = "BLINK_DEMAND_STALE_AFTER", default_value = "3s", value_parser = parse_duration)]
    pub demand_stale_after: Duration,

    /// An activator silent this long is forgotten.
    #[arg(long, env = "BLINK_DEMAND_FORGET_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub demand_forget_after: Duration,

    /// Pods Unschedulable this long after a scale-up → `ScaleUpStalled`. After a
    /// scale-up the target's pods are looked at about every quarter of this (at least
    /// a second) until it has made as many as it should and every one is on a node
    /// (for at most 20 times this, longer while a stall is reported); a pod refused
    /// later without a scale-up is not looked for.
    #[arg(long, env = "BLINK_STALL_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub stall_after: Duration,

    /// How often a function's `/scale` is re-read even without a change seen (each
    /// function draws its own period between ¾ of this and this).
    #[arg(long, env = "BLINK_RESYNC", default_value = "60s", value_parser = parse_duration)]
    pub resync: Duration,

    /// Transparent mode: time given to kube-proxy after adding Blink's slice.
    #[arg(long, env = "BLINK_PARKING_SETTLE", default_value = "3s", value_parser = parse_duration)]
    pub parking_settle: Duration,

    /// Undos of a replica change by the same field manager before `Conflict`.
    #[arg(long, env = "BLINK_DRIFT_UNDO_LIMIT", default_value_t = 3)]
    pub drift_undo_limit: u32,

    /// Log format: `text` or `json`.
    #[arg(long, env = "BLINK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl Config {
    /// Parses flags and environment; on a bad value prints one line and exits 64.
    pub fn from_args() -> Self {
        match Self::try_parse() {
            Ok(config) => config.checked(),
            Err(e) if e.use_stderr() => {
                let first = e.to_string();
                let line = first.lines().next().unwrap_or("invalid configuration");
                eprintln!("blink-scaler: {}", line.trim_start_matches("error: "));
                std::process::exit(EXIT_USAGE);
            }
            Err(e) => {
                // --help and --version.
                let _ = e.print();
                std::process::exit(0);
            }
        }
    }

    fn checked(self) -> Self {
        if let Err(line) = self.validate() {
            eprintln!("blink-scaler: {line}");
            std::process::exit(EXIT_USAGE);
        }
        self
    }

    /// Checks that span flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_grace >= self.lease_duration {
            return Err(format!(
                "--lease-grace ({:?}) must be shorter than --lease-duration ({:?})",
                self.lease_grace, self.lease_duration
            ));
        }
        if self.demand_stale_after >= self.demand_forget_after {
            return Err("--demand-stale-after must be shorter than --demand-forget-after".into());
        }
        Ok(())
    }

    /// `<pod-name>@<ip>:<port>`: what activators read from the Lease to find the leader.
    pub fn identity(&self) -> String {
        format!(
            "{}@{}:{}",
            self.pod_name,
            self.pod_ip,
            self.demand_addr.port()
        )
    }

    pub fn activator_user(&self) -> String {
        let ns = if self.activator_namespace.is_empty() {
            &self.namespace
        } else {
            &self.activator_namespace
        };
        format!(
            "system:serviceaccount:{ns}:{}",
            self.activator_service_account
        )
    }
}

pub use blink_crds::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_user() {
        let config = Config::try_parse_from([
            "blink-scaler",
            "--pod-name",
            "s-0",
            "--pod-ip",
            "10.244.0.9",
            "--demand-addr",
            "0.0.0.0:7000",
            "--namespace",
            "blink",
        ])
        .expect("parses");
        assert_eq!(config.identity(), "s-0@10.244.0.9:7000");
        assert_eq!(
            config.activator_user(),
            "system:serviceaccount:blink:blink-activator"
        );
    }

    #[test]
    fn grace_must_be_shorter_than_duration() {
        let config = Config::try_parse_from([
            "blink-scaler",
            "--lease-duration",
            "5s",
            "--lease-grace",
            "5s",
        ])
        .expect("parses");
        assert!(
            config
                .validate()
                .expect_err("refused")
                .contains("--lease-grace")
        );
    }

    #[test]
    fn bad_duration_is_refused() {
        let err = Config::try_parse_from(["blink-scaler", "--lease-duration", "soon"])
            .expect_err("refused");
        assert!(err.to_string().contains("lease-duration"), "{err}");
    }
}
