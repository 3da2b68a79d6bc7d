//! The scaler's demand endpoint and leader election against the real API server:
//! tokens minted by TokenRequest and checked by TokenReview through the real router on
//! a real listener (h2c, as activators speak it), and two scalers competing for one
//! Lease with the test bed's short clocks (5 s lease, 2 s grace); and the activator
//! Service's EndpointSlices deciding how long a silent activator's report counts.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use blink_crds::demand::{FunctionKey, POKE_PATH, SNAPSHOT_PATH};
use blink_scaler::demand::auth::{Review, TokenReviewer, service_account_user};
use blink_scaler::demand::server::{self, ServerState};
use blink_scaler::demand::{
    Demand, DemandConfig, DemandMetrics, KubeTokenReviewer, watch_activators,
};
use blink_scaler::leader::{CancellationToken, Leadership, LeaseConfig};
use blink_tests::{TestContext, wait};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ObjectMeta, PostParams};
use tokio::task::JoinHandle;

const LEASE_DURATION: Duration = Duration::from_secs(5);
const LEASE_GRACE: Duration = Duration::from_secs(2);

async fn create_service_account(ctx: &TestContext, name: &str) -> anyhow::Result<()> {
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    ctx.api::<ServiceAccount>()
        .create(&PostParams::default(), &account)
        .await
        .with_context(|| format!("creating ServiceAccount {name}"))?;
    Ok(())
}

/// A token for the ServiceAccount by TokenRequest; no audiences means the API
/// server's own.
async fn token(ctx: &TestContext, account: &str, audiences: &[&str]) -> anyhow::Result<String> {
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        status: None,
    };
    let answer = ctx
        .api::<ServiceAccount>()
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {account} {audiences:?}"))?;
    Ok(answer.status.context("TokenRequest without status")?.token)
}

/// An HTTP/2 prior-knowledge client connection, as an activator opens one.
async fn h2c(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn post(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: String,
) -> anyhow::Result<(StatusCode, String)> {
    let mut request = Request::post(format!("http://{addr}{path}"))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn snapshot(activator: &str, seq: u64, key: &str) -> String {
    serde_json::json!({
        "activator": activator, "session": "s1", "seq": seq,
        "functions": [{"key": key, "inFlight": 2.0, "queued": 1.0, "requests": 3, "heldMessages": 0}]
    })
    .to_string()
}

#[test]
fn token_review_admits_only_the_activator_service_account() {
    blink_tests::run("demand-auth", |ctx| async move {
        let ns = ctx.namespace().to_owned();
        create_service_account(&ctx, "blink-activator").await?;
        create_service_account(&ctx, "other").await?;
        let activator = token(&ctx, "blink-activator", &["blink-scaler"]).await?;
        let other = token(&ctx, "other", &["blink-scaler"]).await?;
        let default_audience = token(&ctx, "blink-activator", &[]).await?;

        // The reviewer alone: the audience decides, the username is the account's.
        let reviewer = KubeTokenReviewer::new(ctx.client());
        let cases = [
            (
                &activator,
                Some(service_account_user(&ns, "blink-activator")),
            ),
            (&other, Some(service_account_user(&ns, "other"))),
            (&default_audience, None),
        ];
        for (token, user) in cases {
            let review = reviewer.review(token).await?;
            match (&review, &user) {
                (Review::Authenticated { username }, Some(user)) => ensure!(username == user),
                (Review::Unauthenticated { .. }, None) => {}
                _ => anyhow::bail!("expected {user:?}, reviewed {review:?}"),
            }
        }

        // Through the real router on a real listener.
        let demand = Demand::new(DemandConfig::default());
        let metrics = DemandMetrics::default();
        let state = ServerState::new(
            demand.clone(),
            Leadership::always(Instant::now()),
            Arc::new(reviewer),
            service_account_user(&ns, "blink-activator"),
            metrics.clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(server::serve(
            listener,
            server::app(state),
            shutdown.clone(),
        ));
        let mut sender = h2c(addr).await?;
        let key = format!("{ns}/hello");
        let cases = [
            (Some(activator.as_str()), 1, StatusCode::NO_CONTENT),
            (Some(other.as_str()), 2, StatusCode::FORBIDDEN),
            (Some(default_audience.as_str()), 3, StatusCode::UNAUTHORIZED),
            (None, 4, StatusCode::UNAUTHORIZED),
            (Some("not-a-token"), 5, StatusCode::UNAUTHORIZED),
            // Cached now: the same answer again.
            (Some(activator.as_str()), 6, StatusCode::NO_CONTENT),
        ];
        for (token, seq, expected) in cases {
            let body = snapshot("blink-activator-0", seq, &key);
            let (status, text) = post(&mut sender, addr, SNAPSHOT_PATH, token, body).await?;
            ensure!(
                status == expected,
                "seq {seq}: expected {expected}, got {status} {text}"
            );
        }
        let poke =
            serde_json::json!({"activator": "blink-activator-0", "session": "s1", "key": key});
        let (status, text) = post(
            &mut sender,
            addr,
            POKE_PATH,
            Some(&activator),
            poke.to_string(),
        )
        .await?;
        ensure!(status == StatusCode::NO_CONTENT, "poke: {status} {text}");

        let sum = demand.aggregate(&key.parse::<FunctionKey>()?, Instant::now());
        ensure!(sum.active && sum.held_work && sum.requests == 3, "{sum:?}");
        use blink_scaler::demand::metrics::ReportResult;
        ensure!(metrics.reports(ReportResult::Accepted) == 3);
        ensure!(metrics.reports(ReportResult::RefusedAuth) == 4);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), serving).await??;
        Ok(())
    });
}

struct Scaler {
    identity: String,
    leadership: Leadership,
    task: JoinHandle<()>,
    shutdown: CancellationToken,
}

fn start(ctx: &TestContext, pod: &str, port: u16) -> Scaler {
    let identity =
        blink_scaler::leader::holder_identity(pod, SocketAddr::from(([10, 244, 0, 10], port)));
    let shutdown = CancellationToken::new();
    let (leadership, task) = Leadership::start(
        ctx.client(),
        LeaseConfig {
            namespace: ctx.namespace().to_owned(),
            name: "blink-scaler".into(),
            identity: identity.clone(),
            duration: LEASE_DURATION,
            grace: LEASE_GRACE,
        },
        shutdown.clone(),
    );
    Scaler {
        identity,
        leadership,
        task,
        shutdown,
    }
}

async fn lease_holder(ctx: &TestContext) -> anyhow::Result<Option<String>> {
    let lease = ctx.api::<Lease>().get("blink-scaler").await?;
    Ok(lease.spec.and_then(|s| s.holder_identity))
}

/// Starts two scalers on one Lease and waits until exactly one leads; returns
/// (leader, follower) once the follower knows who leads and the Lease says so.
async fn elect(ctx: &TestContext) -> anyhow::Result<(Scaler, Scaler)> {
    let a = start(ctx, "scaler-a", 9090);
    let b = start(ctx, "scaler-b", 9091);
    let both = std::sync::atomic::AtomicBool::new(false);
    let a_leads = wait::until(Duration::from_secs(15), "exactly one leader", || async {
        let (a_leads, b_leads) = (
            a.leadership.state().is_leader,
            b.leadership.state().is_leader,
        );
        if a_leads && b_leads {
            both.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok((a_leads != b_leads).then_some(a_leads))
    })
    .await?;
    ensure!(!both.into_inner(), "both scalers led at once");
    let (leader, follower) = if a_leads { (a, b) } else { (b, a) };
    wait::until_eq(
        Duration::from_secs(5),
        "the follower sees the leader",
        Some(leader.identity.clone()),
        || async { Ok(follower.leadership.state().holder) },
    )
    .await?;
    ensure!(lease_holder(ctx).await? == Some(leader.identity.clone()));
    ensure!(leader.leadership.can_write(Instant::now()));
    ensure!(!follower.leadership.can_write(Instant::now()));
    Ok((leader, follower))
}

/// Waits until `scaler` leads, with room for a loaded machine: how soon is checked
/// against the old leader's terms, not the clock.
async fn takes_over(ctx: &TestContext, scaler: &Scaler) -> anyhow::Result<()> {
    wait::until(
        LEASE_DURATION * 4,
        "the other scaler takes over",
        || async { Ok(scaler.leadership.state().is_leader.then_some(())) },
    )
    .await?;
    ensure!(lease_holder(ctx).await? == Some(scaler.identity.clone()));
    Ok(())
}

#[test]
fn a_released_lease_is_taken_over_at_once() {
    blink_tests::run("demand-lease-release", |ctx| async move {
        let (leader, follower) = elect(&ctx).await?;
        // The old term's local deadline is the Lease's expiry − grace/2: taken before
        // that expiry, the Lease was not waited out.
        let expiry = leader
            .leadership
            .state()
            .deadline
            .context("the leader has a deadline")?
            + LEASE_GRACE / 2;
        leader.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), leader.task).await??;
        ensure!(!leader.leadership.can_write(Instant::now()));
        takes_over(&ctx, &follower).await?;
        let acquired = follower
            .leadership
            .state()
            .acquired_at
            .context("the new leader has an acquisition time")?;
        ensure!(
            acquired < expiry,
            "taken over at {acquired:?}, after the released Lease would have expired ({expiry:?})"
        );
        // Still the only leader some renewals later.
        tokio::time::sleep(LEASE_DURATION).await;
        ensure!(follower.leadership.can_write(Instant::now()));
        ensure!(lease_holder(&ctx).await? == Some(follower.identity.clone()));
        follower.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), follower.task).await??;
        ensure!(lease_holder(&ctx).await?.is_none(), "released on shutdown");
        Ok(())
    });
}

#[test]
fn a_crashed_leader_is_replaced_after_its_deadline() {
    blink_tests::run("demand-lease-crash", |ctx| async move {
        let (leader, follower) = elect(&ctx).await?;
        // A crash: no release, no more renewals.
        leader.task.abort();
        let _ = leader.task.await;
        takes_over(&ctx, &follower).await?;
        let (old, new) = (leader.leadership.state(), follower.leadership.state());
        let deadline = old.deadline.context("the old leader had a deadline")?;
        let acquired = new
            .acquired_at
            .context("the new leader has an acquisition time")?;
        ensure!(
            deadline < acquired,
            "the old leader could write until {deadline:?}, the new one took over at {acquired:?}"
        );
        ensure!(
            old.is_leader,
            "nothing told the aborted one; only its deadline stops it"
        );
        ensure!(!leader.leadership.can_write(Instant::now()));
        follower.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), follower.task).await??;
        Ok(())
    });
}

#[test]
fn a_silent_activator_counts_until_its_pod_leaves_the_endpoints() {
    blink_tests::run("demand-pods", |ctx| async move {
        let ns = ctx.namespace().to_owned();
        let stale_after = Duration::from_millis(300);
        let demand = Demand::new(DemandConfig {
            stale_after,
            forget_after: Duration::from_secs(120),
        });
        let slice = |pods: &[&str]| -> anyhow::Result<EndpointSlice> {
            let endpoints: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    serde_json::json!({
                        "addresses": [format!("10.244.250.{}", i + 1)],
                        "conditions": {"ready": true},
                        "targetRef": {"kind": "Pod", "name": pod, "namespace": ns}
                    })
                })
                .collect();
            Ok(serde_json::from_value(serde_json::json!({
                "metadata": {"name": "blink-activator-1", "labels": {
                    "kubernetes.io/service-name": "blink-activator",
                    "endpointslice.kubernetes.io/managed-by": "blink-tests"}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
            }))?)
        };
        let slices = ctx.api::<EndpointSlice>();
        slices
            .create(&PostParams::default(), &slice(&["act-0", "act-1"])?)
            .await?;
        let (addresses, ready) = tokio::sync::watch::channel(Vec::new());
        let watching = tokio::spawn(watch_activators(
            ctx.client(),
            ns.clone(),
            "blink-activator".into(),
            demand.clone(),
            addresses,
        ));
        let both: HashSet<String> = ["act-0".into(), "act-1".into()].into();
        wait::until_eq(
            Duration::from_secs(10),
            "the activator pods",
            both,
            || async { Ok(demand.activator_pods()) },
        )
        .await?;
        // The same watch gives transparent mode the ready addresses.
        ensure!(
            *ready.borrow() == ["10.244.250.1", "10.244.250.2"],
            "ready addresses: {:?}",
            ready.borrow()
        );

        let key: FunctionKey = format!("{ns}/hello").parse()?;
        for activator in ["act-0", "act-1"] {
            let body = snapshot(activator, 1, &key.to_string());
            demand.apply_snapshot(serde_json::from_str(&body)?, Instant::now());
        }
        // Silent past the stale threshold, both pods still in the endpoints: kept.
        tokio::time::sleep(stale_after * 3).await;
        ensure!(demand.aggregate(&key, Instant::now()).requests == 6);

        // act-0's pod leaves: its last report stops counting.
        let mut current = slices.get("blink-activator-1").await?;
        current.endpoints = slice(&["act-1"])?.endpoints;
        slices
            .replace("blink-activator-1", &PostParams::default(), &current)
            .await?;
        wait::until_eq(
            Duration::from_secs(10),
            "act-0's report dropped",
            3,
            || async { Ok(demand.aggregate(&key, Instant::now()).requests) },
        )
        .await?;
        ensure!(
            *ready.borrow() == ["10.244.250.1"],
            "ready addresses after act-0 left: {:?}",
            ready.borrow()
        );
        watching.abort();
        Ok(())
    });
}
