//! The demand protocol's messages, activator → scaler (JSON, camelCase), and the key
//! that names a function in them.
//!
//! - [`Snapshot`], every second per activator: the demand it saw per function. Only
//!   functions with a non-zero value appear; absence means zero from that activator,
//!   and an empty snapshot is silence. `seq` increases per snapshot; the scaler drops
//!   a snapshot older than the last it applied from the same `session`.
//! - [`Poke`], the moment a request is queued for a function with no ready endpoint:
//!   it counts as at least one queued request for that one key, and touches neither
//!   `seq` nor other keys.
//!
//! What the numbers mean (time-weighted averages, arrivals, current counts) is on each
//! field; how the scaler merges them is the scaler's business. The averages cross the
//! wire exactly: this crate turns on serde_json's `float_roundtrip`, so an `f64` parses
//! back to the bits the activator sent.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The path on the leader's demand endpoint (`holderIdentity`'s address) where an
/// activator `POST`s a [`Snapshot`] as JSON.
pub const SNAPSHOT_PATH: &str = "/v1/demand/snapshot";

/// The path on the leader's demand endpoint where an activator `POST`s a [`Poke`] as
/// JSON.
pub const POKE_PATH: &str = "/v1/demand/poke";

/// The header a scaler that does not hold the Lease names the holder in, on its `421`.
pub const LEADER_HEADER: &str = "blink-leader";

/// The demand endpoint's address in a Lease's `holderIdentity`,
/// `<pod-name>@<ip>:<port>` (IPv6 bracketed: `pod@[fd00::1]:9090`).
pub fn leader_address(holder_identity: &str) -> Option<std::net::SocketAddr> {
    holder_identity.rsplit_once('@')?.1.parse().ok()
}

/// One activator's demand over the last interval.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// The activator's pod name (matched to `targetRef.name` in the activator
    /// Service's EndpointSlices).
    pub activator: String,
    /// Random per activator start; a new session resets `seq`.
    pub session: String,
    /// Increases by one per snapshot within a session.
    pub seq: u64,
    /// Functions with non-zero demand.
    #[serde(default)]
    pub functions: Vec<FunctionDemand>,
}

/// One function's demand in a [`Snapshot`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDemand {
    /// The function (`namespace/name` of its ScaledObject).
    pub key: FunctionKey,
    /// Requests being forwarded to replicas, time-weighted average over the interval
    /// (so short, sparse requests are not read as zero).
    pub in_flight: f64,
    /// Requests held waiting for a replica, time-weighted average over the interval.
    pub queued: f64,
    /// Requests that arrived in the interval.
    pub requests: u64,
    /// Queue messages held by the activator now.
    pub held_messages: u64,
}

/// "A request is waiting for this function, which has no ready endpoint."
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Poke {
    /// The activator's pod name, as in [`Snapshot::activator`].
    pub activator: String,
    /// The activator's session, as in [`Snapshot::session`].
    pub session: String,
    /// The function a request is queued for.
    pub key: FunctionKey,
}

/// A function's name in the demand protocol: `namespace/name` of its ScaledObject.
///
/// Both parts are checked when a key is made or parsed, so a key in hand is always one
/// a ScaledObject can have: the namespace a DNS label (RFC 1123, at most 63
/// characters), the name a DNS subdomain (at most 253).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionKey {
    namespace: String,
    name: String,
}

/// Why a string is not a [`FunctionKey`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FunctionKeyError {
    /// No `/` between namespace and name.
    #[error("function key {0:?} is not `namespace/name`")]
    MissingSlash(String),
    /// More than one `/`.
    #[error("function key {0:?} has more than one `/`")]
    ExtraSlash(String),
    /// The namespace part is not a DNS label.
    #[error(
        "function key namespace {0:?} is not a DNS label (lowercase a-z, 0-9, '-', 1-63 characters)"
    )]
    BadNamespace(String),
    /// The name part is not a DNS subdomain.
    #[error(
        "function key name {0:?} is not a DNS subdomain (lowercase a-z, 0-9, '-', '.', 1-253 characters)"
    )]
    BadName(String),
}

impl FunctionKey {
    /// The key of the ScaledObject `name` in `namespace`.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Result<Self, FunctionKeyError> {
        let (namespace, name) = (namespace.into(), name.into());
        if !is_dns_label(&namespace) {
            return Err(FunctionKeyError::BadNamespace(namespace));
        }
        if !is_dns_subdomain(&name) {
            return Err(FunctionKeyError::BadName(name));
        }
        Ok(Self { namespace, name })
    }

    /// The ScaledObject's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The ScaledObject's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// RFC 1123 label: what Kubernetes accepts as a namespace.
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && is_label_part(s)
}

/// RFC 1123 subdomain: what Kubernetes accepts as most object names.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label_part)
}

/// Non-empty, lowercase alphanumerics and `-`, alphanumeric at both ends. Length
/// limits differ between labels and subdomains, so they are checked by the callers.
fn is_label_part(s: &str) -> bool {
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = s.as_bytes();
    bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|c| alnum(c) || *c == b'-')
}

impl fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for FunctionKey {
    type Err = FunctionKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((namespace, name)) = s.split_once('/') else {
            return Err(FunctionKeyError::MissingSlash(s.to_owned()));
        };
        if name.contains('/') {
            return Err(FunctionKeyError::ExtraSlash(s.to_owned()));
        }
        Self::new(namespace, name)
    }
}

impl Serialize for FunctionKey {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FunctionKey {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        // Borrow when the format allows (JSON without escapes), so a snapshot of
        // thousands of keys does not allocate a temporary string per key.
        let s = <std::borrow::Cow<'de, str>>::deserialize(de)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn leader_addresses() {
        for (identity, expected) in [
            ("scaler-0@10.244.0.5:9090", Some("10.244.0.5:9090")),
            ("scaler@0@10.244.0.5:9090", Some("10.244.0.5:9090")),
            ("pod@[fd00::1]:9090", Some("[fd00::1]:9090")),
            ("pod", None),
            ("pod@nowhere", None),
        ] {
            let expected = expected.map(|e| e.parse().expect("addr"));
            assert_eq!(super::leader_address(identity), expected, "{identity}");
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn key(s: &str) -> FunctionKey {
        s.parse().expect("valid key")
    }

    #[test]
    fn snapshot_json_is_camel_case() {
        let snapshot = Snapshot {
            activator: "blink-activator-7d9f-x2".into(),
            session: "3f2a9c".into(),
            seq: 42,
            functions: vec![FunctionDemand {
                key: key("default/hello"),
                in_flight: 2.5,
                queued: 0.25,
                requests: 17,
                held_messages: 3,
            }],
        };
        let json = serde_json::json!({
            "activator": "blink-activator-7d9f-x2",
            "session": "3f2a9c",
            "seq": 42,
            "functions": [{"key": "default/hello", "inFlight": 2.5, "queued": 0.25,
                           "requests": 17, "heldMessages": 3}]
        });
        assert_eq!(serde_json::to_value(&snapshot).expect("serializes"), json);
        let back: Snapshot = serde_json::from_value(json).expect("parses");
        assert_eq!(back, snapshot);
    }

    #[test]
    fn averages_cross_the_wire_exactly() {
        // Found by the property test below: without serde_json's `float_roundtrip`
        // this value came back one ULP off (…655015 instead of …655018).
        let queued = 245_933.295_316_550_18_f64;
        let demand = FunctionDemand {
            key: key("a/a"),
            in_flight: 0.0,
            queued,
            requests: 0,
            held_messages: 0,
        };
        let text = serde_json::to_string(&demand).expect("serializes");
        let back: FunctionDemand = serde_json::from_str(&text).expect("parses");
        assert_eq!(back.queued.to_bits(), queued.to_bits());
    }

    #[test]
    fn empty_snapshot_is_silence_and_functions_may_be_omitted() {
        let s: Snapshot =
            serde_json::from_str(r#"{"activator":"a","session":"s","seq":1}"#).expect("parses");
        assert!(s.functions.is_empty());
        let text = serde_json::to_string(&s).expect("serializes");
        assert_eq!(
            text,
            r#"{"activator":"a","session":"s","seq":1,"functions":[]}"#
        );
    }

    #[test]
    fn poke_round_trips() {
        let poke = Poke {
            activator: "a".into(),
            session: "s".into(),
            key: key("team-a/orders.v2"),
        };
        let text = serde_json::to_string(&poke).expect("serializes");
        assert_eq!(
            text,
            r#"{"activator":"a","session":"s","key":"team-a/orders.v2"}"#
        );
        assert_eq!(serde_json::from_str::<Poke>(&text).expect("parses"), poke);
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        let cases = [
            ("hello", FunctionKeyError::MissingSlash("hello".into())),
            ("a/b/c", FunctionKeyError::ExtraSlash("a/b/c".into())),
            ("/hello", FunctionKeyError::BadNamespace(String::new())),
            ("default/", FunctionKeyError::BadName(String::new())),
            (
                "Default/hello",
                FunctionKeyError::BadNamespace("Default".into()),
            ),
            ("default/-hello", FunctionKeyError::BadName("-hello".into())),
            ("default/a..b", FunctionKeyError::BadName("a..b".into())),
            (
                "default/hello_world",
                FunctionKeyError::BadName("hello_world".into()),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<FunctionKey>(), Err(expected), "{input}");
        }
        let long_ns = "a".repeat(64);
        assert!(matches!(
            FunctionKey::new(long_ns, "x"),
            Err(FunctionKeyError::BadNamespace(_))
        ));
        assert!(FunctionKey::new("a".repeat(63), "x".repeat(253)).is_ok());
        assert!(FunctionKey::new("a", "x".repeat(254)).is_err());
    }

    #[test]
    fn error_message_names_the_problem() {
        let err = "hello".parse::<FunctionKey>().expect_err("no slash");
        assert_eq!(
            err.to_string(),
            r#"function key "hello" is not `namespace/name`"#
        );
    }

    #[test]
    fn bad_key_in_json_is_a_parse_error() {
        let err = serde_json::from_str::<Poke>(r#"{"activator":"a","session":"s","key":"nope"}"#)
            .expect_err("bad key");
        assert!(err.to_string().contains("is not `namespace/name`"), "{err}");
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    fn arb_key() -> impl Strategy<Value = FunctionKey> {
        (label(), proptest::collection::vec(label(), 1..4)).prop_map(|(ns, parts)| {
            FunctionKey::new(ns, parts.join(".")).expect("generated keys are valid")
        })
    }

    /// Time-weighted averages as an activator computes them: non-negative, finite.
    fn average() -> impl Strategy<Value = f64> {
        0.0..1.0e6f64
    }

    fn arb_demand() -> impl Strategy<Value = FunctionDemand> {
        (arb_key(), average(), average(), any::<u64>(), any::<u64>()).prop_map(
            |(key, in_flight, queued, requests, held_messages)| FunctionDemand {
                key,
                in_flight,
                queued,
                requests,
                held_messages,
            },
        )
    }

    proptest! {
        #[test]
        fn snapshot_round_trips(
            activator in "[a-z0-9-]{1,40}",
            session in "[a-f0-9]{1,32}",
            seq in any::<u64>(),
            functions in proptest::collection::vec(arb_demand(), 0..20),
        ) {
            let snapshot = Snapshot { activator, session, seq, functions };
            let text = serde_json::to_string(&snapshot).expect("serializes");
            let back: Snapshot = serde_json::from_str(&text).expect("parses");
            prop_assert_eq!(back, snapshot);
        }

        #[test]
        fn poke_round_trips_any_key(key in arb_key(), activator in "[a-z0-9-]{1,40}") {
            let poke = Poke { activator, session: "s".into(), key };
            let text = serde_json::to_string(&poke).expect("serializes");
            prop_assert_eq!(serde_json::from_str::<Poke>(&text).expect("parses"), poke);
        }

        #[test]
        fn key_display_parses_back(key in arb_key()) {
            prop_assert_eq!(key.to_string().parse::<FunctionKey>(), Ok(key));
        }
    }
}
