//! A test client speaking the demand protocol (what an activator sends the scaler):
//! snapshots and pokes with a ServiceAccount token, to the address the Lease names.

use std::net::SocketAddr;

use anyhow::Context as _;
use blink_crds::{FunctionDemand, FunctionKey, Poke, Snapshot};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::api::{Api, PostParams};

use crate::TestContext;

/// A token for ServiceAccount `name` of the test namespace (created if missing), with
/// `audience` (`Some("blink-scaler")` for the demand protocol; `None` for the API
/// server's default audience).
pub async fn service_account_token(
    ctx: &TestContext,
    name: &str,
    audience: Option<&str>,
) -> anyhow::Result<String> {
    let accounts: Api<ServiceAccount> = ctx.api();
    if accounts.get_opt(name).await?.is_none() {
        let account = ServiceAccount {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        accounts.create(&PostParams::default(), &account).await?;
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]).unwrap_or_default(),
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let response = accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .context("TokenRequest")?;
    response
        .status
        .map(|s| s.token)
        .context("TokenRequest without a token")
}

#[derive(Debug)]
pub struct DemandClient {
    http: reqwest::Client,
    pub addr: SocketAddr,
    token: Option<String>,
    pub activator: String,
    pub session: String,
    seq: u64,
}

impl DemandClient {
    pub fn new(addr: SocketAddr, token: Option<String>, activator: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            addr,
            token,
            activator: activator.to_owned(),
            session: crate::random_suffix(),
            seq: 0,
        }
    }

    /// Sends one snapshot; returns the HTTP status.
    pub async fn snapshot(&mut self, functions: Vec<FunctionDemand>) -> anyhow::Result<u16> {
        self.seq += 1;
        let body = Snapshot {
            activator: self.activator.clone(),
            session: self.session.clone(),
            seq: self.seq,
            functions,
        };
        self.post(blink_crds::demand::SNAPSHOT_PATH, &body).await
    }

    pub async fn poke(&self, key: &FunctionKey) -> anyhow::Result<u16> {
        let body = Poke {
            activator: self.activator.clone(),
            session: self.session.clone(),
            key: key.clone(),
        };
        self.post(blink_crds::demand::POKE_PATH, &body).await
    }

    async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> anyhow::Result<u16> {
        let mut request = self
            .http
            .post(format!("http://{}{path}", self.addr))
            .json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        Ok(request.send().await?.status().as_u16())
    }
}

/// Demand of one function: `concurrency` in flight, `requests` arrivals.
pub fn demand(key: &FunctionKey, in_flight: f64, requests: u64) -> FunctionDemand {
    FunctionDemand {
        key: key.clone(),
        in_flight,
        queued: 0.0,
        requests,
        held_messages: 0,
    }
}
