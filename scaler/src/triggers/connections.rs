//! The connections every pull trigger of one scaler process shares: one AMQP
//! connection per URL, one Kafka client per (cluster, consumer group, credentials), one
//! HTTP client, and the read timeout.
//!
//! Thousands of triggers may point at the same broker; each opening its own connection
//! would cost the broker more than the queue it watches. The pools hand out shared
//! handles and never hold a lock across an `.await`: a slow or dead broker delays only
//! the triggers that read it, and each of those is bounded by the read timeout.
//!
//! - AMQP: a connection is made once and shared by everyone who asks meanwhile (a
//!   shared future), replaced when lapin reports it no longer connected, and retried on
//!   the next read after a failure (each read is a poll, so retries follow the polling
//!   interval).
//! - Kafka: librdkafka reconnects by itself; its clients block, so they are used from
//!   `spawn_blocking` and dropped there too (a consumer's drop waits for its close).
//! - Entries unused for [`IDLE_EVICTION`] are dropped, so objects that went away do not
//!   keep connections open.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use lapin::{Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;

use super::TriggerError;
use super::params::redact_url;

/// The read timeout when none is configured: a source slower than this fails the
/// read, and the decision holds the count for that trigger.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A pooled connection unused for this long is closed.
pub const IDLE_EVICTION: Duration = Duration::from_secs(600);

/// How often the pools look for idle entries.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The shared connections of one scaler process. Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct Connections {
    inner: Arc<Inner>,
}

struct Inner {
    read_timeout: Duration,
    http: reqwest::Client,
    amqp: Mutex<Pool<AmqpConnecting>>,
    kafka: Mutex<Pool<Arc<BaseConsumer>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A Kafka consumer's drop waits for its close: do that off the runtime.
        let kafka = std::mem::take(&mut lock(&self.kafka).entries);
        if kafka.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(move || drop(kafka));
            }
            Err(_) => drop(kafka),
        }
    }
}

impl fmt::Debug for Connections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Pool keys hold credentials: show counts only.
        f.debug_struct("Connections")
            .field("read_timeout", &self.inner.read_timeout)
            .field("amqp", &lock(&self.inner.amqp).entries.len())
            .field("kafka", &lock(&self.inner.kafka).entries.len())
            .finish_non_exhaustive()
    }
}

impl Default for Connections {
    fn default() -> Self {
        Self::new(DEFAULT_READ_TIMEOUT)
    }
}

impl Connections {
    /// Connections whose reads give up after `read_timeout`.
    pub fn new(read_timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(read_timeout)
            // Prometheus and the management API sit behind proxies that close idle
            // connections; do not keep them much longer than a polling interval.
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            // Building fails only when the TLS backend cannot initialise, and this
            // client has none; the fallback is the same client with defaults.
            .unwrap_or_default();
        Self {
            inner: Arc::new(Inner {
                read_timeout,
                http,
                amqp: Mutex::new(Pool::default()),
                kafka: Mutex::new(Pool::default()),
            }),
        }
    }

    /// How long one read of a source may take.
    pub fn read_timeout(&self) -> Duration {
        self.inner.read_timeout
    }

    /// The shared HTTP client (no overall timeout: each request sets its own).
    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// The connection for `url`: the pooled one when it is still connected, else a new
    /// one, made once for every caller waiting meanwhile. Not bounded by itself beyond
    /// the connect timeout; callers bound their whole read.
    pub(crate) async fn amqp(&self, url: &str) -> Result<Arc<Connection>, TriggerError> {
        let connecting = {
            let mut pool = lock(&self.inner.amqp);
            let reusable = pool.get(url).filter(|c| match c.peek() {
                None => true, // still connecting: wait for it with the others
                Some(Ok(conn)) => conn.status().connected(),
                Some(Err(_)) => false,
            });
            match reusable {
                Some(c) => c,
                None => {
                    let fresh = connect_amqp(url.to_owned(), self.inner.read_timeout)
                        .boxed()
                        .shared();
                    pool.insert(url.to_owned(), fresh.clone());
                    fresh
                }
            }
        };
        connecting.await.map_err(|e| e.into_error(url))
    }

    /// The Kafka client for this configuration (bootstrap servers, group, security),
    /// created on first use. Creating one does no network I/O.
    pub(crate) fn kafka(
        &self,
        config: &BTreeMap<String, String>,
    ) -> Result<Arc<BaseConsumer>, TriggerError> {
        let key = kafka_key(config);
        if let Some(client) = lock(&self.inner.kafka).get(&key) {
            return Ok(client);
        }
        let mut client_config = ClientConfig::new();
        for (k, v) in config {
            client_config.set(k, v);
        }
        let client: BaseConsumer = client_config.create().map_err(|e| match e {
            // The config error's text repeats the value, which may be a password.
            rdkafka::error::KafkaError::ClientConfig(_, _, key, _) => {
                TriggerError::InvalidMetadata(format!("Kafka client setting {key} is invalid"))
            }
            other => TriggerError::InvalidMetadata(format!("creating the Kafka client: {other}")),
        })?;
        let client = Arc::new(client);
        let mut pool = lock(&self.inner.kafka);
        // Another trigger may have created one meanwhile; keep the first.
        Ok(match pool.get(&key) {
            Some(existing) => existing,
            None => {
                pool.insert(key, client.clone());
                client
            }
        })
    }
}

/// A pool of handles by key, with the last time each was handed out.
struct Pool<T> {
    entries: HashMap<String, (T, Instant)>,
    last_sweep: Option<Instant>,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            last_sweep: None,
        }
    }
}

impl<T: Clone + Send + 'static> Pool<T> {
    fn get(&mut self, key: &str) -> Option<T> {
        self.sweep();
        let (value, used) = self.entries.get_mut(key)?;
        *used = Instant::now();
        Some(value.clone())
    }

    fn insert(&mut self, key: String, value: T) {
        self.entries.insert(key, (value, Instant::now()));
    }

    /// Drops entries idle for [`IDLE_EVICTION`], at most once per [`SWEEP_EVERY`].
    /// Handles in use elsewhere live on until their last user drops them.
    fn sweep(&mut self) {
        let now = Instant::now();
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        let idle: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, (_, used))| now.duration_since(*used) >= IDLE_EVICTION)
            .map(|(k, _)| k.clone())
            .collect();
        let evicted: Vec<T> = idle
            .iter()
            .filter_map(|k| self.entries.remove(k).map(|(v, _)| v))
            .collect();
        if evicted.is_empty() {
            return;
        }
        // A Kafka consumer's drop blocks until it is closed: drop off the runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(move || drop(evicted));
            }
            Err(_) => drop(evicted),
        }
    }
}

/// A connection attempt shared by everyone waiting for it.
type AmqpConnecting = Shared<BoxFuture<'static, Result<Arc<Connection>, ConnectError>>>;

/// Why connecting failed; `Clone` so a shared attempt can give it to every waiter.
#[derive(Clone, Debug)]
enum ConnectError {
    Timeout(Duration),
    Failed(String),
}

impl ConnectError {
    fn into_error(self, url: &str) -> TriggerError {
        let shown = redact_url(url);
        match self {
            Self::Timeout(after) => TriggerError::Timeout(format!(
                "connecting to RabbitMQ at {shown}: no answer within {after:?}"
            )),
            Self::Failed(why) => {
                TriggerError::Unreachable(format!("connecting to RabbitMQ at {shown}: {why}"))
            }
        }
    }
}

async fn connect_amqp(url: String, timeout: Duration) -> Result<Arc<Connection>, ConnectError> {
    let properties = ConnectionProperties::default().with_connection_name("blink-scaler".into());
    match tokio::time::timeout(timeout, Connection::connect(&url, properties)).await {
        Ok(Ok(conn)) => Ok(Arc::new(conn)),
        // lapin's errors describe the socket or the broker's reply, never the URI.
        Ok(Err(e)) => Err(ConnectError::Failed(e.to_string())),
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

/// The pool key of a Kafka configuration: every setting, in order.
fn kafka_key(config: &BTreeMap<String, String>) -> String {
    config
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Locks a pool. A panic while the lock was held cannot leave a pool half-updated
/// (each update is one insert or remove), so a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_and_evicts_idle_entries() {
        let mut pool: Pool<u32> = Pool::default();
        pool.insert("a".into(), 1);
        pool.insert("b".into(), 2);
        assert_eq!(pool.get("a"), Some(1));
        assert_eq!(pool.get("c"), None);
        // Age `b` past the eviction time and allow a sweep.
        let long_ago = Instant::now()
            .checked_sub(IDLE_EVICTION + Duration::from_secs(1))
            .expect("the monotonic clock runs long enough");
        if let Some(entry) = pool.entries.get_mut("b") {
            entry.1 = long_ago;
        }
        pool.last_sweep = None;
        assert_eq!(pool.get("b"), None, "evicted");
        assert_eq!(pool.get("a"), Some(1), "recently used stays");
    }

    #[test]
    fn debug_never_shows_pool_keys() {
        let conns = Connections::default();
        let _ = conns.kafka(
            &[
                ("bootstrap.servers".to_owned(), "127.0.0.1:1".to_owned()),
                ("sasl.password".to_owned(), "hunter2".to_owned()),
            ]
            .into(),
        );
        let shown = format!("{conns:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(conns.read_timeout(), DEFAULT_READ_TIMEOUT);
    }

    #[test]
    fn bad_kafka_setting_names_the_key_only() {
        let conns = Connections::default();
        let Err(err) = conns.kafka(&[("no.such.setting".to_owned(), "hunter2".to_owned())].into())
        else {
            panic!("an unknown setting is refused");
        };
        let msg = err.to_string();
        assert!(
            msg.contains("no.such.setting") && !msg.contains("hunter2"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn dead_amqp_url_fails_fast_and_is_retried() {
        // Port 1 on loopback refuses connections.
        let conns = Connections::new(Duration::from_secs(2));
        let url = "amqp://guest:hunter2@127.0.0.1:1/%2f";
        for _ in 0..2 {
            let err = conns.amqp(url).await.expect_err("refused");
            let msg = err.to_string();
            assert!(matches!(err, TriggerError::Unreachable(_)), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }
}
