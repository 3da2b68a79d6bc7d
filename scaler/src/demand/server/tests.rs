use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::{Method, Request as HttpRequest};
use blink_crds::demand::FunctionKey;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;

use crate::demand::auth::{Review, ReviewError};
use crate::demand::{DemandConfig, FunctionDemandSum};
use crate::leader::{LeaderState, LeadershipControl};

const ACTIVATOR: &str = "system:serviceaccount:blink:blink-activator";

/// Tokens are usernames; "invalid" is not authenticated; "down" cannot be checked.
struct FakeReviewer {
    calls: AtomicUsize,
}

impl TokenReviewer for FakeReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Review, ReviewError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match token {
                "down" => Err(ReviewError::Api(
                    kube::Error::LinesCodecMaxLineLengthExceeded,
                )),
                "invalid" => Ok(Review::Unauthenticated { reason: None }),
                user => Ok(Review::Authenticated {
                    username: user.to_owned(),
                }),
            }
        })
    }
}

struct Fixture {
    state: ServerState,
    leadership: LeadershipControl,
    reviewer: Arc<FakeReviewer>,
}

fn fixture() -> Fixture {
    let (leadership, control) = Leadership::manual(LeaderState {
        is_leader: true,
        holder: Some("scaler-0@10.244.0.5:9090".into()),
        acquired_at: Some(std::time::Instant::now()),
        deadline: None,
    });
    let reviewer = Arc::new(FakeReviewer {
        calls: AtomicUsize::new(0),
    });
    let state = ServerState::new(
        Demand::new(DemandConfig::default()),
        leadership,
        reviewer.clone(),
        ACTIVATOR,
        DemandMetrics::register(&mut Registry::default()),
    );
    Fixture {
        state,
        leadership: control,
        reviewer,
    }
}

fn key(s: &str) -> FunctionKey {
    s.parse().expect("valid key")
}

fn request(path: &str, token: Option<&str>, body: impl Into<Body>) -> HttpRequest<Body> {
    let mut builder = HttpRequest::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    builder.body(body.into()).expect("request")
}

async fn send(state: &ServerState, request: HttpRequest<Body>) -> (StatusCode, HeaderMap, String) {
    let response = app(state.clone())
        .oneshot(request)
        .await
        .expect("infallible");
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).expect("utf-8"),
    )
}

const SNAPSHOT: &str = r#"{"activator":"act-1","session":"s1","seq":3,
  "functions":[{"key":"ns/f","inFlight":1.5,"queued":0.5,"requests":4,"heldMessages":0}]}"#;
const POKE: &str = r#"{"activator":"act-1","session":"s1","key":"ns/g"}"#;

#[tokio::test]
async fn answers_by_token_leadership_and_body() {
    let not_json = "{not json";
    let negative = r#"{"activator":"a","session":"s","seq":1,
      "functions":[{"key":"ns/f","inFlight":-1,"queued":0,"requests":0,"heldMessages":0}]}"#;
    let bad_key = r#"{"activator":"a","session":"s","seq":1,
      "functions":[{"key":"nope","inFlight":1,"queued":0,"requests":0,"heldMessages":0}]}"#;
    let no_activator = r#"{"activator":"","session":"s","seq":1}"#;
    // (path, token, body, status, a word the body must contain)
    let cases: &[(&str, Option<&str>, &str, StatusCode, &str)] = &[
        (
            SNAPSHOT_PATH,
            Some(ACTIVATOR),
            SNAPSHOT,
            StatusCode::NO_CONTENT,
            "",
        ),
        (POKE_PATH, Some(ACTIVATOR), POKE, StatusCode::NO_CONTENT, ""),
        (
            SNAPSHOT_PATH,
            None,
            SNAPSHOT,
            StatusCode::UNAUTHORIZED,
            "bearer token",
        ),
        (
            SNAPSHOT_PATH,
            Some("invalid"),
            SNAPSHOT,
            StatusCode::UNAUTHORIZED,
            "blink-scaler",
        ),
        (
            POKE_PATH,
            Some("system:serviceaccount:blink:other"),
            POKE,
            StatusCode::FORBIDDEN,
            "may not report",
        ),
        (
            SNAPSHOT_PATH,
            Some("down"),
            SNAPSHOT,
            StatusCode::SERVICE_UNAVAILABLE,
            "retry",
        ),
        (
            SNAPSHOT_PATH,
            Some(ACTIVATOR),
            not_json,
            StatusCode::BAD_REQUEST,
            "invalid snapshot",
        ),
        (
            SNAPSHOT_PATH,
            Some(ACTIVATOR),
            negative,
            StatusCode::BAD_REQUEST,
            "non-negative",
        ),
        (
            SNAPSHOT_PATH,
            Some(ACTIVATOR),
            bad_key,
            StatusCode::BAD_REQUEST,
            "namespace/name",
        ),
        (
            SNAPSHOT_PATH,
            Some(ACTIVATOR),
            no_activator,
            StatusCode::BAD_REQUEST,
            "activator",
        ),
        (
            POKE_PATH,
            Some(ACTIVATOR),
            "{}",
            StatusCode::BAD_REQUEST,
            "invalid poke",
        ),
    ];
    for (path, token, body, status, word) in cases {
        let f = fixture();
        let (got, headers, text) = send(&f.state, request(path, *token, body.to_string())).await;
        assert_eq!(got, *status, "{path} {token:?} {body}: {text}");
        assert!(
            text.contains(word),
            "{path} {token:?}: {text:?} lacks {word:?}"
        );
        if got == StatusCode::UNAUTHORIZED {
            assert_eq!(
                headers.get(header::WWW_AUTHENTICATE).map(|v| v.as_bytes()),
                Some(&b"Bearer"[..])
            );
        }
        if !got.is_success() {
            assert!(text.starts_with(r#"{"error":"#), "{text}");
        }
    }
}

#[tokio::test]
async fn accepted_reports_reach_the_demand_and_the_metrics() {
    let f = fixture();
    let (status, _, _) = send(&f.state, request(SNAPSHOT_PATH, Some(ACTIVATOR), SNAPSHOT)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let now = std::time::Instant::now();
    assert_eq!(
        f.state.demand.aggregate(&key("ns/f"), now),
        FunctionDemandSum {
            concurrency: 2.0,
            requests: 4,
            held_messages: 0,
            active: true,
            held_work: true,
        }
    );
    // The same seq again is stale: received, not applied.
    let (status, _, text) = send(&f.state, request(SNAPSHOT_PATH, Some(ACTIVATOR), SNAPSHOT)).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, r#"{"lastSeq":3,"stale":true}"#)
    );
    let waker = f.state.demand.waker(&key("ns/g"));
    let (status, _, _) = send(&f.state, request(POKE_PATH, Some(ACTIVATOR), POKE)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(f.state.demand.aggregate(&key("ns/g"), now).held_work);
    tokio::time::timeout(std::time::Duration::from_secs(5), waker.notified())
        .await
        .expect("the poke woke ns/g");
    let _ = send(&f.state, request(POKE_PATH, None, POKE)).await;
    let _ = send(&f.state, request(POKE_PATH, Some(ACTIVATOR), "[")).await;
    let metrics = &f.state.metrics;
    assert_eq!(metrics.reports(ReportResult::Accepted), 2);
    assert_eq!(metrics.reports(ReportResult::Stale), 1);
    assert_eq!(metrics.reports(ReportResult::RefusedAuth), 1);
    assert_eq!(metrics.reports(ReportResult::Invalid), 1);
}

#[tokio::test]
async fn a_follower_names_the_leader() {
    let f = fixture();
    let holder = "scaler-1@10.244.0.7:9090";
    f.leadership.set(LeaderState::follower(Some(holder.into())));
    let (status, headers, text) = send(&f.state, request(POKE_PATH, Some(ACTIVATOR), POKE)).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(
        headers.get(&LEADER_HEADER).map(|v| v.as_bytes()),
        Some(holder.as_bytes())
    );
    assert_eq!(text, format!(r#"{{"leader":"{holder}"}}"#));
    assert_eq!(f.state.metrics.reports(ReportResult::RefusedNotLeader), 1);
    assert!(
        !f.state
            .demand
            .aggregate(&key("ns/g"), std::time::Instant::now())
            .held_work
    );

    f.leadership.set(LeaderState::follower(None));
    let (status, headers, text) = send(&f.state, request(POKE_PATH, Some(ACTIVATOR), POKE)).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert!(headers.get(&LEADER_HEADER).is_none());
    assert_eq!(text, r#"{"leader":null}"#);
    // Authentication comes first: a follower does not tell strangers who leads.
    let (status, _, _) = send(&f.state, request(POKE_PATH, None, POKE)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bodies_are_bounded_and_refused_requests_are_not_read() {
    let f = fixture();
    let big = format!(
        r#"{{"activator":"a","session":"s","seq":1,"pad":"{}"}}"#,
        "x".repeat(BODY_LIMIT)
    );
    let (status, _, _) = send(
        &f.state,
        request(SNAPSHOT_PATH, Some(ACTIVATOR), big.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(f.state.metrics.reports(ReportResult::Invalid), 1);
    let (status, _, _) = send(&f.state, request(SNAPSHOT_PATH, Some("invalid"), big)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Other paths and methods are not the endpoint's.
    let (status, _, _) = send(&f.state, request("/v1/other", Some(ACTIVATOR), "{}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let get = HttpRequest::builder()
        .uri(SNAPSHOT_PATH)
        .header(header::AUTHORIZATION, format!("Bearer {ACTIVATOR}"))
        .body(Body::empty())
        .expect("request");
    let (status, _, _) = send(&f.state, get).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn token_reviews_are_cached() {
    let f = fixture();
    for seq in 1..=5 {
        let body = format!(r#"{{"activator":"a","session":"s","seq":{seq}}}"#);
        let (status, _, _) = send(&f.state, request(SNAPSHOT_PATH, Some(ACTIVATOR), body)).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    assert_eq!(f.reviewer.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn serves_h2c_and_http1_on_one_listener() {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let f = fixture();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, app(f.state.clone()), shutdown.clone()));

    // HTTP/2 with prior knowledge, as activators speak it.
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    for (seq, path) in [(1, SNAPSHOT_PATH), (2, SNAPSHOT_PATH), (0, POKE_PATH)] {
        let body = if path == POKE_PATH {
            POKE.to_owned()
        } else {
            format!(
                r#"{{"activator":"a","session":"s","seq":{seq},"functions":[{{"key":"ns/f","inFlight":1,"queued":0,"requests":1,"heldMessages":0}}]}}"#
            )
        };
        let mut request = request(path, Some(ACTIVATOR), body);
        *request.uri_mut() = format!("http://{addr}{path}").parse().expect("uri");
        let response = sender.send_request(request).await.expect("h2 response");
        assert_eq!(response.version(), axum::http::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::NO_CONTENT, "{path}");
    }
    assert!(
        f.state
            .demand
            .aggregate(&key("ns/f"), std::time::Instant::now())
            .active
    );

    // HTTP/1.1 on the same port.
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    tokio::spawn(connection);
    let mut request = request(POKE_PATH, None, POKE);
    request.headers_mut().insert(
        header::HOST,
        HeaderValue::from_str(&addr.to_string()).expect("host"),
    );
    let response = sender.send_request(request).await.expect("h1 response");
    assert_eq!(response.version(), axum::http::Version::HTTP_11);
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // Shutdown closes the open connections and returns.
    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("server stops after shutdown")
        .expect("server task");
}
