//! The `rabbitmq` trigger: a queue's length (or publish rate), with KEDA's metadata.
//!
//! - `host`: an AMQP URL (`amqp://user:pass@host:5672/vhost`) or the management API's
//!   (`http://user:pass@host:15672/vhost`, with an optional path prefix before the
//!   vhost); from `metadata`, an `authenticationRef` parameter or `hostFromEnv`.
//!   `username` / `password` parameters replace the URL's credentials.
//! - `protocol`: `auto` (the default: from the URL's scheme), `amqp` or `http`.
//! - `queueName`; `vhostName` replaces the URL's vhost.
//! - `mode`: `QueueLength` (the default) or `MessageRate` (management API only);
//!   `value` (default 20), `activationValue` (default 0). The legacy `queueLength`
//!   means `mode: QueueLength, value: <queueLength>` and excludes both.
//! - `excludeUnacknowledged` (management API only): count ready messages only.
//! - `timeout` (milliseconds, management API only): this trigger's read timeout.
//!
//! Over AMQP the length is a passive declare's message count (ready messages). Over
//! the management API it is `messages` (ready + unacknowledged) and the rate is
//! `message_stats.publish_details.rate`; in `MessageRate` mode the trigger is also
//! active while messages wait, as in KEDA.
//!
//! Refused, with a message naming the key: `useRegex` (the management API's regex
//! listing), TLS client certificates (`tls: enable`), `unsafeSsl: true`, and `https`
//! management URLs (the scaler's HTTP client speaks plain HTTP); `amqps` works, with
//! the system's trust roots.

use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Deserialize;

use super::params::{Redacted, TriggerParams, redact_url};
use super::{Connections, Measurement, PullTrigger, TriggerError};

/// KEDA's default `value`.
pub const DEFAULT_VALUE: f64 = 20.0;

/// What the trigger reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    QueueLength,
    MessageRate,
}

/// Where the trigger reads it.
#[derive(Clone, Debug, PartialEq)]
pub enum Endpoint {
    /// Passive declare over AMQP on the connection to `url`.
    Amqp { url: Redacted },
    /// `GET {base}/api/queues/{vhost}/{queue}` on the management API.
    Http {
        /// Scheme, host, port and path prefix, without credentials.
        base: String,
        /// Percent-encoded vhost (`%2F` for `/`).
        vhost: String,
        username: Option<Redacted>,
        password: Option<Redacted>,
    },
}

/// A parsed `rabbitmq` trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct RabbitMqConfig {
    pub endpoint: Endpoint,
    /// The host URL with its password hidden, for messages.
    pub shown: String,
    pub queue: String,
    pub mode: Mode,
    pub value: f64,
    pub activation: f64,
    pub exclude_unacknowledged: bool,
    pub timeout: Option<Duration>,
}

impl RabbitMqConfig {
    /// Parses KEDA's metadata (see the module docs). Pure.
    pub fn parse(params: &TriggerParams) -> Result<Self, TriggerError> {
        let invalid = |msg: String| TriggerError::InvalidMetadata(msg);
        let host = params.required("host")?;
        let mut url = reqwest::Url::parse(host).map_err(|_| {
            // The URL may carry a password: describe it, do not repeat it.
            invalid("host is not a valid URL (amqp://…, amqps://… or http://…)".to_owned())
        })?;
        let protocol = match params.get("protocol").unwrap_or("auto") {
            "auto" => match url.scheme() {
                "amqp" | "amqps" => "amqp",
                "http" | "https" => "http",
                other => {
                    return Err(invalid(format!(
                        "cannot tell the protocol from host's URL scheme {other:?}; use amqp, \
                         amqps, http or set metadata.protocol"
                    )));
                }
            },
            p @ ("amqp" | "http") => p,
            other => {
                return Err(invalid(format!(
                    "metadata.protocol must be auto, amqp or http, not {other:?}"
                )));
            }
        };
        let http = protocol == "http";

        let queue = params.required("queueName")?.to_owned();
        if params.bool_or("useRegex", false)? {
            return Err(TriggerError::Unsupported(
                "metadata.useRegex is not supported: name one queue in queueName".to_owned(),
            ));
        }
        if params.bool_or("unsafeSsl", false)? {
            return Err(TriggerError::Unsupported(
                "metadata.unsafeSsl: true is not supported: Blink verifies the broker's \
                 certificate"
                    .to_owned(),
            ));
        }
        match params.get("tls") {
            None | Some("disable") => {}
            Some("enable") => {
                return Err(TriggerError::Unsupported(
                    "tls: enable (client certificates) is not supported; an amqps:// host \
                     uses TLS with the system's trust roots"
                        .to_owned(),
                ));
            }
            Some(_) => {
                return Err(invalid(
                    "parameter tls must be enable or disable".to_owned(),
                ));
            }
        }

        let (mode, value) = mode_and_value(params)?;
        let activation = params.f64_or("activationValue", 0.0)?;
        if mode == Mode::MessageRate && !http {
            return Err(invalid(
                "mode MessageRate needs the management API (an http host or protocol: http)"
                    .to_owned(),
            ));
        }
        let exclude_unacknowledged = params.bool_or("excludeUnacknowledged", false)?;
        if exclude_unacknowledged && !http {
            return Err(invalid(
                "metadata.excludeUnacknowledged needs the management API (protocol http)"
                    .to_owned(),
            ));
        }
        let timeout = match params.i64_or("timeout", 0)? {
            0 => None,
            ms if ms < 0 => return Err(invalid("metadata.timeout must be positive".to_owned())),
            _ if !http => {
                return Err(invalid(
                    "metadata.timeout applies to the management API only, as in KEDA".to_owned(),
                ));
            }
            ms => Some(Duration::from_millis(ms.unsigned_abs())),
        };

        match (params.get("username"), params.get("password")) {
            (Some(user), Some(pass)) => {
                url.set_username(user)
                    .and_then(|()| url.set_password(Some(pass)))
                    .map_err(|()| invalid("host cannot carry credentials".to_owned()))?;
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    "username and password must be given together".to_owned(),
                ));
            }
        }
        let vhost_name = params.get("vhostName");
        let shown;
        let endpoint = if http {
            if url.scheme() == "https" {
                return Err(TriggerError::Unsupported(
                    "an https management API URL is not supported (the scaler's HTTP client \
                     speaks plain HTTP); use http:// or an amqp(s):// host"
                        .to_owned(),
                ));
            }
            let (prefix, vhost) = split_management_path(url.path(), vhost_name);
            let username =
                (!url.username().is_empty()).then(|| Redacted(percent_decode(url.username())));
            let password = url.password().map(|p| Redacted(percent_decode(p)));
            let _ = url.set_username("");
            let _ = url.set_password(None);
            shown = format!("{} (vhost {vhost})", base_of(&url, &prefix));
            Endpoint::Http {
                base: base_of(&url, &prefix),
                vhost,
                username,
                password,
            }
        } else {
            if let Some(vhost) = vhost_name {
                url.set_path(&format!("/{}", percent_encode(vhost)));
            }
            shown = redact_url(url.as_str());
            Endpoint::Amqp {
                url: Redacted(url.to_string()),
            }
        };
        Ok(Self {
            endpoint,
            shown,
            queue,
            mode,
            value,
            activation,
            exclude_unacknowledged,
            timeout,
        })
    }
}

/// KEDA's rules for `mode`, `value` and the legacy `queueLength`.
fn mode_and_value(params: &TriggerParams) -> Result<(Mode, f64), TriggerError> {
    let invalid = |msg: &str| TriggerError::InvalidMetadata(msg.to_owned());
    let legacy = params.f64_opt("queueLength")?;
    let mode = params.get("mode");
    let value = params.f64_opt("value")?;
    let (mode, value) = match (legacy, mode, value) {
        (None, None, None) => (Mode::QueueLength, DEFAULT_VALUE),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(invalid(
                "metadata.queueLength is deprecated and cannot be combined with mode or value; \
                 use mode and value",
            ));
        }
        (Some(length), None, None) => (Mode::QueueLength, length),
        (None, None, Some(_)) => return Err(invalid("metadata.mode must be given with value")),
        (None, Some(mode), value) => {
            let mode = match mode {
                "QueueLength" => Mode::QueueLength,
                "MessageRate" => Mode::MessageRate,
                "DeliverGetRate" | "PublishedToDeliveredRatio" | "ExpectedQueueConsumptionTime" => {
                    return Err(TriggerError::Unsupported(format!(
                        "metadata.mode {mode} is not supported (QueueLength, MessageRate)"
                    )));
                }
                other => {
                    return Err(TriggerError::InvalidMetadata(format!(
                        "metadata.mode must be QueueLength or MessageRate, not {other:?}"
                    )));
                }
            };
            (
                mode,
                value.ok_or_else(|| invalid("metadata.value must be given with mode"))?,
            )
        }
    };
    if value <= 0.0 {
        return Err(invalid(
            "metadata.value (or queueLength) must be greater than 0: it divides the metric",
        ));
    }
    Ok((mode, value))
}

/// KEDA's reading of a management URL's path: the last segment is the vhost (empty:
/// the default vhost `/`), the segments before it a path prefix. `vhost_name`
/// replaces the vhost. Returns (prefix, percent-encoded vhost).
fn split_management_path(path: &str, vhost_name: Option<&str>) -> (String, String) {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (prefix, last) = if path.ends_with('/') || segments.is_empty() {
        (segments.as_slice(), "")
    } else {
        (
            &segments[..segments.len() - 1],
            segments[segments.len() - 1],
        )
    };
    let prefix = prefix.iter().map(|s| format!("/{s}")).collect::<String>();
    let vhost = match vhost_name {
        Some(name) => percent_encode(name),
        None if last.is_empty() => "%2F".to_owned(),
        // Already percent-encoded in the URL.
        None => last.to_owned(),
    };
    (prefix, vhost)
}

/// `scheme://host:port/prefix` of a URL without credentials.
fn base_of(url: &reqwest::Url, prefix: &str) -> String {
    let mut base = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        base.push_str(&format!(":{port}"));
    }
    base.push_str(prefix);
    base
}

/// Percent-encodes everything but RFC 3986's unreserved characters (so `/` in a vhost
/// or queue name stays inside one path segment).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (URL userinfo comes encoded); invalid escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parts of a management API queue object the trigger reads.
#[derive(Debug, Default, Deserialize)]
struct QueueInfo {
    messages: Option<f64>,
    messages_ready: Option<f64>,
    #[serde(default)]
    message_stats: Option<MessageStats>,
}

#[derive(Debug, Default, Deserialize)]
struct MessageStats {
    publish_details: Option<Rate>,
}

#[derive(Debug, Default, Deserialize)]
struct Rate {
    rate: Option<f64>,
}

/// What one read saw: messages waiting (per `excludeUnacknowledged`) and the publish
/// rate (0 over AMQP, which has none).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueueStatus {
    pub messages: f64,
    pub publish_rate: f64,
}

/// The measurement for a read, in KEDA's terms. Pure.
pub fn measurement(config: &RabbitMqConfig, status: QueueStatus) -> Measurement {
    match config.mode {
        Mode::QueueLength => Measurement::new(status.messages, config.value, config.activation),
        Mode::MessageRate => Measurement::new(status.publish_rate, config.value, config.activation)
            .with_active(
                status.publish_rate > config.activation || status.messages > config.activation,
            ),
    }
}

/// Reads a management API answer. Pure.
fn parse_queue_info(
    body: &[u8],
    exclude_unacknowledged: bool,
    queue: &str,
) -> Result<QueueStatus, TriggerError> {
    let info: QueueInfo = serde_json::from_slice(body).map_err(|e| {
        TriggerError::Unreachable(format!(
            "the management API's answer for queue {queue} is not a queue object: {e}"
        ))
    })?;
    let messages = if exclude_unacknowledged {
        info.messages_ready
    } else {
        info.messages
    };
    // A queue's counts appear with its first statistics sample; reading 0 before that
    // could idle a function whose queue is full.
    let messages = messages.ok_or_else(|| {
        TriggerError::Unreachable(format!(
            "the management API has no message counts for queue {queue} yet"
        ))
    })?;
    let publish_rate = info
        .message_stats
        .and_then(|s| s.publish_details)
        .and_then(|d| d.rate)
        .unwrap_or(0.0);
    Ok(QueueStatus {
        messages,
        publish_rate,
    })
}

/// A built `rabbitmq` trigger.
#[derive(Debug)]
pub struct RabbitMqTrigger {
    config: RabbitMqConfig,
    connections: Connections,
}

impl RabbitMqTrigger {
    pub fn new(params: &TriggerParams, connections: &Connections) -> Result<Self, TriggerError> {
        Ok(Self {
            config: RabbitMqConfig::parse(params)?,
            connections: connections.clone(),
        })
    }

    pub fn config(&self) -> &RabbitMqConfig {
        &self.config
    }

    async fn read(&self) -> Result<QueueStatus, TriggerError> {
        match &self.config.endpoint {
            Endpoint::Amqp { url } => self.read_amqp(&url.0).await,
            Endpoint::Http {
                base,
                vhost,
                username,
                password,
            } => {
                let url = format!(
                    "{base}/api/queues/{vhost}/{}",
                    percent_encode(&self.config.queue)
                );
                let mut request = self.connections.http().get(url);
                if let Some(user) = username {
                    request = request.basic_auth(&user.0, password.as_ref().map(|p| &p.0));
                }
                let response = request.send().await.map_err(|e| self.http_error(e))?;
                let status = response.status();
                let body = response.bytes().await.map_err(|e| self.http_error(e))?;
                if !status.is_success() {
                    let text = String::from_utf8_lossy(&body);
                    let text: String = text.chars().take(200).collect();
                    return Err(TriggerError::Unreachable(format!(
                        "RabbitMQ management API at {} answered {status} for queue {}: {text}",
                        self.config.shown, self.config.queue
                    )));
                }
                parse_queue_info(
                    &body,
                    self.config.exclude_unacknowledged,
                    &self.config.queue,
                )
            }
        }
    }

    async fn read_amqp(&self, url: &str) -> Result<QueueStatus, TriggerError> {
        let conn = self.connections.amqp(url).await?;
        let unreachable = |what: &str, e: lapin::Error| {
            TriggerError::Unreachable(format!(
                "RabbitMQ at {}: {what} queue {}: {e}",
                self.config.shown, self.config.queue
            ))
        };
        // A channel per read: a passive declare of a missing queue closes its channel.
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| unreachable("opening a channel for", e))?;
        let declared = channel
            .queue_declare(
                self.config.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let queue = declared.map_err(|e| unreachable("declaring (passive)", e))?;
        if channel.status().connected() {
            let _ = channel.close(200, "done".into()).await;
        }
        Ok(QueueStatus {
            messages: f64::from(queue.message_count()),
            publish_rate: 0.0,
        })
    }

    fn http_error(&self, e: reqwest::Error) -> TriggerError {
        // `without_url`: the request URL is built from the host, keep it out.
        let e = e.without_url();
        let msg = format!(
            "RabbitMQ management API at {}: {}",
            self.config.shown,
            super::error_chain(&e)
        );
        if e.is_timeout() {
            TriggerError::Timeout(msg)
        } else {
            TriggerError::Unreachable(msg)
        }
    }
}

impl PullTrigger for RabbitMqTrigger {
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, TriggerError>> {
        async move {
            let timeout = self
                .config
                .timeout
                .unwrap_or_else(|| self.connections.read_timeout());
            let status = tokio::time::timeout(timeout, self.read())
                .await
                .map_err(|_| {
                    TriggerError::Timeout(format!(
                        "RabbitMQ at {}: no answer for queue {} within {timeout:?}",
                        self.config.shown, self.config.queue
                    ))
                })??;
            Ok(measurement(&self.config, status))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn params(pairs: &[(&str, &str)]) -> TriggerParams {
        TriggerParams::from_metadata(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<RabbitMqConfig, TriggerError> {
        RabbitMqConfig::parse(&params(pairs))
    }

    const AMQP: (&str, &str) = ("host", "amqp://guest:hunter2@rabbit:5672/%2f");
    const HTTP: (&str, &str) = ("host", "http://guest:hunter2@rabbit:15672/");
    const QUEUE: (&str, &str) = ("queueName", "orders");

    #[test]
    fn defaults_are_keda_s() {
        let c = parse(&[AMQP, QUEUE]).expect("valid");
        assert_eq!(c.mode, Mode::QueueLength);
        assert_eq!(c.value, DEFAULT_VALUE);
        assert_eq!(c.activation, 0.0);
        assert_eq!(c.queue, "orders");
        assert_eq!(c.timeout, None);
        assert!(matches!(c.endpoint, Endpoint::Amqp { .. }));
        assert!(!c.shown.contains("hunter2"), "{}", c.shown);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn mode_value_and_legacy_queue_length() {
        let ok = |pairs: &[(&str, &str)]| {
            let c = parse(pairs).expect("valid");
            (c.mode, c.value)
        };
        assert_eq!(
            ok(&[AMQP, QUEUE, ("queueLength", "7")]),
            (Mode::QueueLength, 7.0)
        );
        assert_eq!(
            ok(&[AMQP, QUEUE, ("mode", "QueueLength"), ("value", "2.5")]),
            (Mode::QueueLength, 2.5)
        );
        assert_eq!(
            ok(&[HTTP, QUEUE, ("mode", "MessageRate"), ("value", "100")]),
            (Mode::MessageRate, 100.0)
        );
        for (pairs, key) in [
            (
                vec![AMQP, QUEUE, ("queueLength", "7"), ("mode", "QueueLength")],
                "queueLength",
            ),
            (
                vec![AMQP, QUEUE, ("queueLength", "7"), ("value", "3")],
                "queueLength",
            ),
            (vec![AMQP, QUEUE, ("mode", "QueueLength")], "value"),
            (vec![AMQP, QUEUE, ("value", "3")], "mode"),
            (vec![AMQP, QUEUE, ("mode", "Bogus"), ("value", "3")], "mode"),
            (
                vec![AMQP, QUEUE, ("mode", "QueueLength"), ("value", "0")],
                "value",
            ),
            (
                vec![AMQP, QUEUE, ("mode", "QueueLength"), ("value", "x")],
                "value",
            ),
            (vec![AMQP, QUEUE, ("queueLength", "many")], "queueLength"),
            (
                vec![AMQP, QUEUE, ("activationValue", "one")],
                "activationValue",
            ),
            (
                vec![AMQP, QUEUE, ("mode", "MessageRate"), ("value", "3")],
                "MessageRate",
            ),
            (
                vec![AMQP, QUEUE, ("excludeUnacknowledged", "true")],
                "excludeUnacknowledged",
            ),
            (vec![AMQP, QUEUE, ("timeout", "500")], "timeout"),
            (vec![HTTP, QUEUE, ("timeout", "-5")], "timeout"),
            (vec![AMQP, QUEUE, ("protocol", "stomp")], "protocol"),
            (vec![("host", "ftp://rabbit"), QUEUE], "protocol"),
            (vec![AMQP], "queueName"),
            (vec![QUEUE], "host"),
            (vec![AMQP, QUEUE, ("username", "u")], "password"),
        ] {
            let err = parse(&pairs).expect_err(key);
            assert!(
                matches!(err, TriggerError::InvalidMetadata(_)),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{key}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        for (pairs, key) in [
            (vec![HTTP, QUEUE, ("useRegex", "true")], "useRegex"),
            (vec![AMQP, QUEUE, ("unsafeSsl", "true")], "unsafeSsl"),
            (vec![("host", "https://rabbit:15671/"), QUEUE], "https"),
            (vec![AMQP, QUEUE, ("tls", "enable")], "tls"),
            (
                vec![HTTP, QUEUE, ("mode", "DeliverGetRate"), ("value", "1")],
                "DeliverGetRate",
            ),
        ] {
            let err = parse(&pairs).expect_err(key);
            assert!(
                matches!(err, TriggerError::Unsupported(_)),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        let bad_url = parse(&[("host", "::hunter2::"), QUEUE]).expect_err("not a URL");
        assert!(!bad_url.to_string().contains("hunter2"));
    }

    #[test]
    fn protocol_follows_the_scheme_unless_given() {
        let c = parse(&[("host", "amqps://u:p@rabbit/vh"), QUEUE]).expect("valid");
        assert!(matches!(c.endpoint, Endpoint::Amqp { .. }));
        let c = parse(&[HTTP, QUEUE]).expect("valid");
        assert!(matches!(c.endpoint, Endpoint::Http { .. }));
        let c = parse(&[HTTP, QUEUE, ("protocol", "http")]).expect("valid");
        assert!(matches!(c.endpoint, Endpoint::Http { .. }));
    }

    #[test]
    fn management_urls_split_into_prefix_and_vhost() {
        for (path, vhost_name, want) in [
            ("/", None, ("", "%2F")),
            ("", None, ("", "%2F")),
            ("/myvhost", None, ("", "myvhost")),
            ("/%2F", None, ("", "%2F")),
            ("/rabbit/myvhost", None, ("/rabbit", "myvhost")),
            ("/rabbit/", None, ("/rabbit", "%2F")),
            ("/myvhost", Some("other/vh"), ("", "other%2Fvh")),
            ("/", Some("/"), ("", "%2F")),
        ] {
            let (prefix, vhost) = split_management_path(path, vhost_name);
            assert_eq!(
                (prefix.as_str(), vhost.as_str()),
                want,
                "{path:?} {vhost_name:?}"
            );
        }
    }

    #[test]
    fn http_endpoint_keeps_credentials_out_of_the_base() {
        let c = parse(&[
            ("host", "http://us%40er:p%3Ass@rabbit:15672/prefix/vh"),
            QUEUE,
        ])
        .expect("valid");
        let Endpoint::Http {
            base,
            vhost,
            username,
            password,
        } = &c.endpoint
        else {
            panic!("http endpoint expected");
        };
        assert_eq!(base, "http://rabbit:15672/prefix");
        assert_eq!(vhost, "vh");
        assert_eq!(username.as_ref().map(|u| u.0.as_str()), Some("us@er"));
        assert_eq!(password.as_ref().map(|p| p.0.as_str()), Some("p:ss"));
        assert!(
            !c.shown.contains("p:ss") && !c.shown.contains("p%3Ass"),
            "{}",
            c.shown
        );
    }

    #[test]
    fn credentials_and_vhost_overrides_apply_to_amqp_urls() {
        let with_auth = TriggerParams::new(
            [AMQP, QUEUE, ("vhostName", "jobs/x")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            [("username", "svc"), ("password", "s3cret")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            BTreeMap::new(),
        );
        let c = RabbitMqConfig::parse(&with_auth).expect("valid");
        let Endpoint::Amqp { url } = &c.endpoint else {
            panic!("amqp endpoint expected");
        };
        assert_eq!(url.0, "amqp://svc:s3cret@rabbit:5672/jobs%2Fx");
        assert_eq!(c.shown, "amqp://svc:***@rabbit:5672/jobs%2Fx");
    }

    #[test]
    fn measurement_follows_mode() {
        let mut c = parse(&[HTTP, QUEUE, ("mode", "MessageRate"), ("value", "10")]).expect("ok");
        let status = |messages, publish_rate| QueueStatus {
            messages,
            publish_rate,
        };
        let m = measurement(&c, status(5.0, 0.0));
        assert_eq!((m.value, m.target), (0.0, 10.0));
        assert!(m.active, "messages waiting keep MessageRate active");
        assert!(!measurement(&c, status(0.0, 0.0)).active);
        assert!(measurement(&c, status(0.0, 2.0)).active);
        c.mode = Mode::QueueLength;
        let m = measurement(&c, status(5.0, 3.0));
        assert_eq!((m.value, m.target, m.active), (5.0, 10.0, true));
        c.activation = 5.0;
        assert!(!measurement(&c, status(5.0, 3.0)).active);
    }

    #[test]
    fn management_answers() {
        let body = br#"{"messages": 12, "messages_ready": 10, "messages_unacknowledged": 2,
            "message_stats": {"publish_details": {"rate": 4.5}}}"#;
        let all = parse_queue_info(body, false, "q").expect("valid");
        assert_eq!((all.messages, all.publish_rate), (12.0, 4.5));
        let ready = parse_queue_info(body, true, "q").expect("valid");
        assert_eq!(ready.messages, 10.0);
        let no_stats = parse_queue_info(br#"{"messages": 3}"#, false, "q").expect("valid");
        assert_eq!(no_stats.publish_rate, 0.0);
        assert!(
            parse_queue_info(br#"{"name": "q"}"#, false, "q").is_err(),
            "counts not yet"
        );
        assert!(parse_queue_info(b"<html>", false, "q").is_err());
    }

    #[test]
    fn percent_coding_round_trips() {
        assert_eq!(percent_encode("a/b c~"), "a%2Fb%20c~");
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
