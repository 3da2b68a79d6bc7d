//! The activator's flags (each also an environment variable). A bad flag exits with
//! status 64 and one line saying which.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use blink_crds::{duration::parse_duration, routing};
use clap::Parser;

/// Blink's activator: holds HTTP requests for functions at zero, wakes the scaler at
/// once, and proxies to ready replicas.
#[derive(Debug, Clone, Parser)]
#[command(name = "blink-activator", version, args_override_self = true)]
pub struct Config {
    /// Where clients connect (HTTP/1.1 and h2c).
    #[arg(long, env = "BLINK_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Metrics, /healthz and /readyz.
    #[arg(long, env = "BLINK_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    pub admin_addr: SocketAddr,

    /// This pod's name: the `activator` of every demand report.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: String,

    /// Blink's namespace (the scaler's Lease and the activator Service).
    #[arg(long, env = "BLINK_NAMESPACE", default_value = "blink-system")]
    pub namespace: String,

    /// Follow functions in this namespace only (default: every namespace).
    #[arg(long, env = "BLINK_WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,

    /// The scaler's Lease, in Blink's namespace.
    #[arg(long, env = "BLINK_SCALER_LEASE", default_value = "blink-scaler")]
    pub scaler_lease: String,

    /// The activator Service, in Blink's namespace: its ready endpoints count the
    /// activators that share each function's containerConcurrency.
    #[arg(
        long,
        env = "BLINK_ACTIVATOR_SERVICE",
        default_value = "blink-activator"
    )]
    pub activator_service: String,

    /// The projected ServiceAccount token with audience `blink-scaler`.
    #[arg(long, env = "BLINK_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// How often demand snapshots go to the scaler (pokes go at once).
    #[arg(long, env = "BLINK_STATS_INTERVAL", default_value = "1s", value_parser = parse_limit)]
    pub stats_interval: Duration,

    /// How long a request may wait for a replica (a function's `waitTimeout`
    /// overrides it): then 504.
    #[arg(long, env = "BLINK_WAIT_TIMEOUT", default_value = "60s", value_parser = parse_limit)]
    pub wait_timeout: Duration,

    /// How long a replica has, once it has the whole request, to begin its answer (a
    /// function's `responseTimeout` overrides it): then 504.
    #[arg(long, env = "BLINK_RESPONSE_TIMEOUT", default_value = "300s", value_parser = parse_limit)]
    pub response_timeout: Duration,

    /// How long a client may pause while sending a request body that is being
    /// forwarded, until the replica's answer begins: then 408, and the replica's slot
    /// is freed (a stalled upload would hold it for as long as the client kept its
    /// connection). A replica's whole answer that came before is passed on instead.
    #[arg(long, env = "BLINK_BODY_TIMEOUT", default_value = "60s", value_parser = parse_limit)]
    pub body_timeout: Duration,

    /// Requests held per function (a function's `queueLimit` overrides it): then 503.
    #[arg(long, env = "BLINK_QUEUE_LIMIT", default_value_t = 10_000, value_parser = parse_count)]
    pub queue_limit: usize,

    /// Body bytes held per function (see the hold module for how a request counts).
    #[arg(long, env = "BLINK_QUEUE_BYTES", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_bytes: u64,

    /// Client connections open at once: more are answered 503.
    #[arg(long, env = "BLINK_MAX_CONNECTIONS", default_value_t = 50_000, value_parser = parse_count)]
    pub max_connections: usize,

    /// Connections per replica at most (HTTP/1.1); more requests wait for one.
    #[arg(long, env = "BLINK_MAX_UPSTREAM_CONNECTIONS", default_value_t = 1000, value_parser = parse_count)]
    pub max_upstream_connections: usize,

    /// A client must send a request head within this time; an HTTP/1.1 connection
    /// with no exchange open and none begun or ended for this long is closed (checked
    /// once per this period, so it goes after between one and two of them).
    #[arg(long, env = "BLINK_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_limit)]
    pub header_timeout: Duration,

    /// Largest request head accepted: then 431.
    #[arg(long, env = "BLINK_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,

    /// A replica must accept a connection within this time.
    #[arg(long, env = "BLINK_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_limit)]
    pub connect_timeout: Duration,

    /// Listen backlog (capped by the kernel's somaxconn).
    #[arg(long, env = "BLINK_BACKLOG", default_value_t = 65_535)]
    pub backlog: u32,

    /// On SIGTERM: how long in-flight and held requests have before what is still
    /// held is answered 503.
    #[arg(long, env = "BLINK_DRAIN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub drain_grace: Duration,

    /// `json` for JSON logs.
    #[arg(long, env = "BLINK_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Threads serving requests (like nginx's `worker_processes`); default: one per
    /// CPU the process may use.
    #[arg(long, env = "BLINK_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
}

/// A bound on a count: at least one (zero would refuse everything it bounds).
fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err(format!("{text:?} must be at least 1")),
        Ok(count) => Ok(count),
        Err(_) => Err(format!("{text:?} is not a count")),
    }
}

/// A time limit or period: more than zero (zero would fail every request, or spin),
/// and at most a year (further, a deadline computed from it could overflow).
fn parse_limit(text: &str) -> Result<Duration, String> {
    let limit = parse_duration(text)?;
    if limit.is_zero() {
        return Err(format!("{text:?} must be more than zero"));
    }
    if limit > Duration::from_secs(routing::MAX_TIMEOUT_SECONDS) {
        return Err(format!(
            "{text:?} must be at most {}s (a year)",
            routing::MAX_TIMEOUT_SECONDS
        ));
    }
    Ok(limit)
}

/// The read buffer of a client connection: hyper's smallest, and where it starts.
pub const READ_BUFFER: usize = 8192;

/// The most of a request's body the activator may have taken in while the request is
/// held (its body is otherwise left with the client, unread). Over HTTP/1.1, what the
/// last read brought past the head: hyper's read buffer starts at [`READ_BUFFER`] and
/// grows after full reads up to `max_header_bytes` (the largest head it takes). Over
/// h2c, each stream's flow-control window, set to this: at least 64 KiB, as a client
/// may send HTTP/2's initial window (65,535 bytes) before it learns a smaller one.
pub fn read_ahead(max_header_bytes: usize) -> usize {
    max_header_bytes.max(64 * 1024)
}

impl Config {
    /// Parses the command line; a bad flag exits 64 with one line.
    pub fn from_args() -> Self {
        match Self::try_parse() {
            Ok(config) => config,
            Err(e) if e.use_stderr() => {
                let first = e.to_string();
                let line = first.lines().next().unwrap_or("bad arguments");
                eprintln!("blink-activator: {line}");
                std::process::exit(64);
            }
            Err(e) => {
                let _ = e.print();
                std::process::exit(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config =
            Config::try_parse_from(["blink-activator", "--pod-name", "a-0"]).expect("parse");
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.stats_interval, Duration::from_secs(1));
        assert!(Config::try_parse_from(["blink-activator"]).is_err());
        assert_eq!(config.worker_threads, None);
    }

    #[test]
    fn worker_threads_are_at_least_one() {
        let parse = |threads: &str| {
            Config::try_parse_from([
                "blink-activator",
                "--pod-name",
                "a-0",
                "--worker-threads",
                threads,
            ])
        };
        assert_eq!(parse("1").expect("one").worker_threads, Some(1));
        assert!(parse("0").is_err());
    }

    /// The command line with `flag value` after the pod's name.
    fn parse_with(flag: &str, value: &str) -> Result<Config, clap::Error> {
        Config::try_parse_from(["blink-activator", "--pod-name", "a-0", flag, value])
    }

    #[test]
    fn bounds_are_at_least_one() {
        for flag in [
            "--queue-limit",
            "--queue-bytes",
            "--max-connections",
            "--max-upstream-connections",
        ] {
            assert!(parse_with(flag, "1").is_ok(), "{flag}");
            for bad in ["0", "many"] {
                let error = parse_with(flag, bad).expect_err(bad).to_string();
                assert!(error.contains(flag), "{flag} {bad}: {error}");
            }
        }
    }

    #[test]
    fn limits_are_more_than_zero_and_at_most_a_year() {
        for flag in [
            "--stats-interval",
            "--wait-timeout",
            "--response-timeout",
            "--header-timeout",
            "--connect-timeout",
            "--body-timeout",
        ] {
            assert!(parse_with(flag, "250ms").is_ok(), "{flag}");
            assert!(parse_with(flag, "8760h").is_ok(), "{flag} a year");
            for bad in ["0", "0s", "8761h", "10000000000000000000"] {
                let error = parse_with(flag, bad).expect_err(bad).to_string();
                assert!(error.contains(flag), "{flag} {bad}: {error}");
            }
        }
    }
}
