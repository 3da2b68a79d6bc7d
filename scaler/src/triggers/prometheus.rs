//! The `prometheus` trigger: the value of an instant query, with KEDA's metadata.
//!
//! Metadata: `serverAddress` (`http://…`; or an `authenticationRef` parameter),
//! `query`, `threshold`, `activationThreshold` (default 0), `ignoreNullValues`
//! (default true: an empty result, an empty value or NaN/±Inf reads as 0; false: an
//! error), `namespace` (added as a query parameter, for Thanos' tenancy),
//! `queryParameters` and `customHeaders` (`k1=v1,k2=v2`), `timeout` (milliseconds:
//! this trigger's read timeout), and `authModes` with its parameters: `basic`
//! (`username`, `password`), `bearer` (`bearerToken`), `custom` (`customAuthHeader`,
//! `customAuthValue`).
//!
//! `GET {serverAddress}/api/v1/query?query=…` must answer 2xx with a vector of at
//! most one element or a scalar; more than one element is an error, as in KEDA (a
//! sum in the query makes it one).
//!
//! Refused, naming the key: `https` server addresses and `authModes: tls` (the
//! scaler's HTTP client speaks plain HTTP). `unsafeSsl` therefore has nothing to
//! relax and is accepted without effect.

use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use serde_json::Value;

use super::params::{Redacted, TriggerParams, redact_url};
use super::{Connections, Measurement, PullTrigger, TriggerError};

/// How the request authenticates.
#[derive(Clone, Debug, PartialEq)]
pub enum Auth {
    None,
    Basic {
        username: String,
        password: Redacted,
    },
    Bearer(Redacted),
    Custom {
        header: String,
        value: Redacted,
    },
}

/// A parsed `prometheus` trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct PrometheusConfig {
    /// The query URL: server address, `/api/v1/query` and every query parameter.
    pub url: reqwest::Url,
    pub query: String,
    pub threshold: f64,
    pub activation: f64,
    pub ignore_null_values: bool,
    /// Custom headers; values may be credentials.
    pub headers: Vec<(String, Redacted)>,
    pub auth: Auth,
    pub timeout: Option<Duration>,
}

impl PrometheusConfig {
    /// Parses KEDA's metadata (see the module docs). Pure.
    pub fn parse(params: &TriggerParams) -> Result<Self, TriggerError> {
        let invalid = |msg: &str| TriggerError::InvalidMetadata(msg.to_owned());
        let server = params.required("serverAddress")?;
        let mut url = reqwest::Url::parse(server)
            .map_err(|_| invalid("serverAddress is not a valid URL (http://host:9090)"))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(TriggerError::Unsupported(
                    "an https serverAddress is not supported: the scaler's HTTP client speaks \
                     plain HTTP"
                        .to_owned(),
                ));
            }
            _ => return Err(invalid("serverAddress must be an http:// URL")),
        }
        let query = params.required("query")?.to_owned();
        let threshold = params
            .f64_opt("threshold")?
            .ok_or_else(|| invalid("metadata.threshold is required"))?;
        if threshold <= 0.0 {
            return Err(invalid(
                "metadata.threshold must be greater than 0: it divides the metric",
            ));
        }
        let activation = params.f64_or("activationThreshold", 0.0)?;
        let ignore_null_values = params.bool_or("ignoreNullValues", true)?;
        // Parsed for its error message only: there is no TLS to relax.
        let _unsafe_ssl = params.bool_or("unsafeSsl", false)?;
        let timeout = match params.i64_or("timeout", 0)? {
            0 => None,
            ms if ms < 0 => return Err(invalid("metadata.timeout must be positive")),
            ms => Some(Duration::from_millis(ms.unsigned_abs())),
        };

        let path = format!("{}/api/v1/query", url.path().trim_end_matches('/'));
        url.set_path(&path);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("query", &query);
            if let Some(namespace) = params.get("namespace") {
                pairs.append_pair("namespace", namespace);
            }
            for (k, v) in key_values(params, "queryParameters")? {
                pairs.append_pair(&k, &v);
            }
        }
        let headers = key_values(params, "customHeaders")?
            .into_iter()
            .map(|(k, v)| (k, Redacted(v)))
            .collect();
        Ok(Self {
            url,
            query,
            threshold,
            activation,
            ignore_null_values,
            headers,
            auth: auth(params)?,
            timeout,
        })
    }

    /// The server address for messages (no credentials, no query).
    fn shown(&self) -> String {
        let mut u = self.url.clone();
        u.set_query(None);
        redact_url(u.as_str())
    }
}

/// KEDA's `k1=v1,k2=v2` maps (`customHeaders`, `queryParameters`).
fn key_values(params: &TriggerParams, key: &str) -> Result<Vec<(String, String)>, TriggerError> {
    let Some(raw) = params.get(key) else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(TriggerError::InvalidMetadata(format!(
                "metadata.{key} must be a list like k1=v1,k2=v2"
            ))),
        })
        .collect()
}

/// `authModes` and its parameters.
fn auth(params: &TriggerParams) -> Result<Auth, TriggerError> {
    let modes: Vec<&str> = params
        .get("authModes")
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    let missing = |mode: &str, what: &str| {
        TriggerError::InvalidMetadata(format!("authModes {mode} needs the parameter {what}"))
    };
    let mut chosen = Vec::new();
    for mode in &modes {
        chosen.push(match *mode {
            "basic" => Auth::Basic {
                username: params
                    .get("username")
                    .ok_or_else(|| missing("basic", "username"))?
                    .to_owned(),
                password: Redacted(params.get("password").unwrap_or("").to_owned()),
            },
            "bearer" => Auth::Bearer(Redacted(
                params
                    .get("bearerToken")
                    .ok_or_else(|| missing("bearer", "bearerToken"))?
                    .to_owned(),
            )),
            "custom" => Auth::Custom {
                header: params
                    .get("customAuthHeader")
                    .ok_or_else(|| missing("custom", "customAuthHeader"))?
                    .to_owned(),
                value: Redacted(
                    params
                        .get("customAuthValue")
                        .ok_or_else(|| missing("custom", "customAuthValue"))?
                        .to_owned(),
                ),
            },
            "tls" => {
                return Err(TriggerError::Unsupported(
                    "authModes tls is not supported: the scaler's HTTP client speaks plain HTTP"
                        .to_owned(),
                ));
            }
            other => {
                return Err(TriggerError::InvalidMetadata(format!(
                    "authModes must list basic, bearer, custom or tls, not {other:?}"
                )));
            }
        });
    }
    match chosen.len() {
        0 => Ok(Auth::None),
        1 => Ok(chosen.remove(0)),
        _ => Err(TriggerError::InvalidMetadata(
            "authModes may name one of basic, bearer and custom".to_owned(),
        )),
    }
}

/// Reads an instant query's answer, by KEDA's rules (see the module docs). Pure.
pub fn parse_answer(body: &[u8], ignore_null_values: bool) -> Result<f64, TriggerError> {
    let bad = |msg: String| TriggerError::Unreachable(format!("Prometheus answered {msg}"));
    let answer: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("something that is not JSON: {e}")))?;
    if answer.get("status").and_then(Value::as_str) != Some("success") {
        let error = answer
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        return Err(bad(format!("an error: {error}")));
    }
    let data = answer
        .get("data")
        .ok_or_else(|| bad("no data".to_owned()))?;
    let result = data
        .get("result")
        .ok_or_else(|| bad("no result".to_owned()))?;
    let null = |what: &str| {
        if ignore_null_values {
            Ok(0.0)
        } else {
            Err(bad(format!(
                "{what} (set ignoreNullValues: true to read it as 0)"
            )))
        }
    };
    let sample = match data.get("resultType").and_then(Value::as_str) {
        Some("scalar") => result,
        Some("vector") => {
            let elements = result
                .as_array()
                .ok_or_else(|| bad("a vector that is not an array".to_owned()))?;
            match elements.as_slice() {
                [] => return null("an empty result"),
                [one] => one.get("value").unwrap_or(&Value::Null),
                many => {
                    return Err(bad(format!(
                        "{} elements; the query must return one (aggregate it, e.g. sum(…))",
                        many.len()
                    )));
                }
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "a {other}; the query must return an instant vector or a scalar"
            )));
        }
        None => return Err(bad("no resultType".to_owned())),
    };
    // A sample is `[timestamp, "value"]`.
    let value = match sample.as_array().map(Vec::as_slice) {
        None | Some([]) => return null("an empty value"),
        Some([_, value, ..]) => value,
        Some([_]) => return Err(bad("a sample without a value".to_owned())),
    };
    let value = match value {
        Value::String(s) => s
            .parse::<f64>()
            .map_err(|_| bad(format!("a value that is not a number: {s:?}")))?,
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::Null => return null("a null value"),
        _ => return Err(bad("a value that is not a number".to_owned())),
    };
    if !value.is_finite() {
        return null(&format!("{value}"));
    }
    Ok(value)
}

/// A built `prometheus` trigger.
#[derive(Debug)]
pub struct PrometheusTrigger {
    config: PrometheusConfig,
    connections: Connections,
}

impl PrometheusTrigger {
    pub fn new(params: &TriggerParams, connections: &Connections) -> Result<Self, TriggerError> {
        Ok(Self {
            config: PrometheusConfig::parse(params)?,
            connections: connections.clone(),
        })
    }

    pub fn config(&self) -> &PrometheusConfig {
        &self.config
    }

    async fn read(&self, timeout: Duration) -> Result<f64, TriggerError> {
        let c = &self.config;
        let mut request = self.connections.http().get(c.url.clone()).timeout(timeout);
        for (name, value) in &c.headers {
            request = request.header(name.as_str(), value.0.as_str());
        }
        request = match &c.auth {
            Auth::None => request,
            Auth::Basic { username, password } => request.basic_auth(username, Some(&password.0)),
            Auth::Bearer(token) => request.bearer_auth(&token.0),
            Auth::Custom { header, value } => request.header(header.as_str(), value.0.as_str()),
        };
        let response = request.send().await.map_err(|e| self.http_error(e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.http_error(e))?;
        if !status.is_success() {
            return Err(TriggerError::Unreachable(format!(
                "Prometheus at {} answered {status} for query {:?}",
                c.shown(),
                c.query
            )));
        }
        parse_answer(&body, c.ignore_null_values)
    }

    fn http_error(&self, e: reqwest::Error) -> TriggerError {
        let timeout = e.is_timeout();
        // The request URL repeats the query string: name the server instead.
        let msg = format!(
            "Prometheus at {}: {}",
            self.config.shown(),
            super::error_chain(&e.without_url())
        );
        if timeout {
            TriggerError::Timeout(msg)
        } else {
            TriggerError::Unreachable(msg)
        }
    }
}

impl PullTrigger for PrometheusTrigger {
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, TriggerError>> {
        async move {
            let timeout = self
                .config
                .timeout
                .unwrap_or_else(|| self.connections.read_timeout());
            // The request's own timeout covers the body too; this one also bounds a
            // connection that never completes.
            let value = tokio::time::timeout(timeout, self.read(timeout))
                .await
                .map_err(|_| {
                    TriggerError::Timeout(format!(
                        "Prometheus at {}: no answer within {timeout:?}",
                        self.config.shown()
                    ))
                })??;
            Ok(Measurement::new(
                value,
                self.config.threshold,
                self.config.activation,
            ))
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

    const BASE: [(&str, &str); 3] = [
        ("serverAddress", "http://prom:9090"),
        ("query", "sum(rate(http_requests_total{app=\"x\"}[1m]))"),
        ("threshold", "100"),
    ];

    fn parse(extra: &[(&str, &str)]) -> Result<PrometheusConfig, TriggerError> {
        let mut pairs = BASE.to_vec();
        pairs.extend_from_slice(extra);
        PrometheusConfig::parse(&params(&pairs))
    }

    #[test]
    fn defaults_and_url() {
        let c = parse(&[]).expect("valid");
        assert_eq!(c.threshold, 100.0);
        assert_eq!(c.activation, 0.0);
        assert!(c.ignore_null_values);
        assert_eq!(c.auth, Auth::None);
        assert_eq!(c.timeout, None);
        assert_eq!(c.url.path(), "/api/v1/query");
        let pairs: Vec<(String, String)> = c.url.query_pairs().into_owned().collect();
        assert_eq!(pairs, vec![("query".to_owned(), BASE[1].1.to_owned())]);
    }

    #[test]
    fn settings_parse() {
        let c = PrometheusConfig::parse(&TriggerParams::new(
            [
                ("serverAddress", "http://thanos:10902/prefix/"),
                ("query", "up"),
                ("threshold", "2.5"),
                ("activationThreshold", "1"),
                ("ignoreNullValues", "false"),
                ("namespace", "team-a"),
                ("queryParameters", "dedup=true, partial_response=false"),
                ("customHeaders", "X-Scope-OrgID=tenant,X-Other=1"),
                ("authModes", "bearer"),
                ("timeout", "1500"),
                ("unsafeSsl", "true"),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
            [("bearerToken", "hunter2")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            BTreeMap::new(),
        ))
        .expect("valid");
        assert_eq!((c.threshold, c.activation), (2.5, 1.0));
        assert!(!c.ignore_null_values);
        assert_eq!(c.url.path(), "/prefix/api/v1/query");
        let pairs: Vec<(String, String)> = c.url.query_pairs().into_owned().collect();
        let want: Vec<(String, String)> = [
            ("query", "up"),
            ("namespace", "team-a"),
            ("dedup", "true"),
            ("partial_response", "false"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(pairs, want);
        assert_eq!(c.headers.len(), 2);
        assert_eq!(c.headers[0].0, "X-Scope-OrgID");
        assert_eq!(c.auth, Auth::Bearer(Redacted("hunter2".into())));
        assert_eq!(c.timeout, Some(Duration::from_millis(1500)));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn bad_metadata_names_the_key() {
        for (extra, key) in [
            (vec![("threshold", "lots")], "threshold"),
            (vec![("threshold", "0")], "threshold"),
            (vec![("activationThreshold", "x")], "activationThreshold"),
            (vec![("ignoreNullValues", "maybe")], "ignoreNullValues"),
            (vec![("customHeaders", "novalue")], "customHeaders"),
            (vec![("queryParameters", "=v")], "queryParameters"),
            (vec![("timeout", "-1")], "timeout"),
            (vec![("authModes", "basic")], "username"),
            (vec![("authModes", "bearer")], "bearerToken"),
            (vec![("authModes", "digest")], "authModes"),
            (vec![("serverAddress", "ftp://prom")], "serverAddress"),
        ] {
            let err = parse(&extra).expect_err(key);
            assert!(
                matches!(err, TriggerError::InvalidMetadata(_)),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        let err = PrometheusConfig::parse(&params(&[("query", "up"), ("threshold", "1")]))
            .expect_err("no server");
        assert!(err.to_string().contains("serverAddress"));
        for (extra, key) in [
            (vec![("serverAddress", "https://prom")], "https"),
            (vec![("authModes", "tls")], "tls"),
        ] {
            let err = parse(&extra).expect_err(key);
            assert!(
                matches!(err, TriggerError::Unsupported(_)),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn answers_table() {
        let vector = |values: &str| {
            format!(
                r#"{{"status":"success","data":{{"resultType":"vector","result":[{values}]}}}}"#
            )
        };
        let one = |v: &str| {
            vector(&format!(
                r#"{{"metric":{{}},"value":[1700000000.1,"{v}"]}}"#
            ))
        };
        // (body, ignoreNullValues, expected value or None for an error)
        let table: Vec<(String, bool, Option<f64>)> = vec![
            (one("42.5"), true, Some(42.5)),
            (one("0"), false, Some(0.0)),
            (vector(""), true, Some(0.0)),
            (vector(""), false, None),
            (one("NaN"), true, Some(0.0)),
            (one("NaN"), false, None),
            (one("+Inf"), true, Some(0.0)),
            (one("+Inf"), false, None),
            (one("many"), true, None),
            (
                vector(r#"{"metric":{},"value":[1,"1"]},{"metric":{},"value":[1,"2"]}"#),
                true,
                None,
            ),
            (vector(r#"{"metric":{},"value":[]}"#), true, Some(0.0)),
            (vector(r#"{"metric":{},"value":[]}"#), false, None),
            (vector(r#"{"metric":{},"value":[1]}"#), true, None),
            (
                r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"7"]}}"#
                    .to_owned(),
                false,
                Some(7.0),
            ),
            (
                r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#.to_owned(),
                true,
                None,
            ),
            (
                r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#.to_owned(),
                true,
                None,
            ),
            ("not json".to_owned(), true, None),
        ];
        for (body, ignore, want) in table {
            let got = parse_answer(body.as_bytes(), ignore);
            match want {
                Some(v) => assert_eq!(got.ok(), Some(v), "{body} ignore={ignore}"),
                None => assert!(got.is_err(), "{body} ignore={ignore}: {got:?}"),
            }
        }
        let err = parse_answer(
            vector(r#"{"metric":{},"value":[1,"1"]},{"metric":{},"value":[1,"2"]}"#).as_bytes(),
            true,
        )
        .expect_err("two elements");
        assert!(err.to_string().contains("2 elements"), "{err}");
    }
}
