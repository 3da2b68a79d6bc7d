//! Who may report demand: the activators' ServiceAccount, proven by a projected token
//! with audience [`AUDIENCE`] and checked by TokenReview.
//!
//! - [`TokenReviewer`] asks whether a token is valid and whose it is; the
//!   [`KubeTokenReviewer`] asks the API server (`audiences: ["blink-scaler"]`, so a
//!   token meant for the API server itself, or any other audience, is refused).
//! - [`Authenticator`] turns a review into a [`Verdict`] for one allowed user, and
//!   caches reviews with moka so a steady stream of reports costs no API call: a
//!   positive review for at most the token's remaining lifetime (its `exp`, read from
//!   the JWT payload without verifying it — the review did that) and never more than
//!   [`MAX_CACHE`]; a negative one for [`NEGATIVE_CACHE`]; a failed review not at all.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, ObjectMeta, PostParams};
use moka::Expiry;
use moka::future::Cache;

/// The audience activators' tokens are minted for, and reviews ask about.
pub const AUDIENCE: &str = "blink-scaler";
/// The longest a positive review is trusted without asking again.
pub const MAX_CACHE: Duration = Duration::from_secs(5 * 60);
/// How long a positive review of a token without `exp` is trusted.
pub const NO_EXPIRY_CACHE: Duration = Duration::from_secs(60);
/// How long a negative review is remembered: long enough that a misconfigured
/// activator's reports do not each cost a TokenReview, short enough not to matter.
pub const NEGATIVE_CACHE: Duration = Duration::from_secs(5);
/// Longer bearer tokens are refused without a review (projected tokens are ~1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The Kubernetes username of a ServiceAccount.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// What a review said about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Review {
    /// Valid for the audience; belongs to `username`.
    Authenticated { username: String },
    /// Not valid (expired, wrong audience, unknown issuer, ...).
    Unauthenticated { reason: Option<String> },
}

/// A review could not be made (the API server did not answer, or refused the review).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("TokenReview failed: {0}")]
    Api(#[source] kube::Error),
}

/// Checks bearer tokens.
pub trait TokenReviewer: Send + Sync + 'static {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Review, ReviewError>>;
}

/// Reviews tokens with the API server's TokenReview for [`AUDIENCE`]. Needs RBAC
/// `create` on `tokenreviews` (e.g. the `system:auth-delegator` ClusterRole).
#[derive(Clone)]
pub struct KubeTokenReviewer {
    api: Api<TokenReview>,
    audience: String,
}

impl std::fmt::Debug for KubeTokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
            audience: AUDIENCE.to_owned(),
        }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Review, ReviewError>> {
        Box::pin(async move {
            let request = TokenReview {
                metadata: ObjectMeta::default(),
                spec: TokenReviewSpec {
                    token: Some(token.to_owned()),
                    audiences: Some(vec![self.audience.clone()]),
                },
                status: None,
            };
            let answer = self
                .api
                .create(&PostParams::default(), &request)
                .await
                .map_err(ReviewError::Api)?;
            Ok(review_of(answer.status.unwrap_or_default(), &self.audience))
        })
    }
}

/// Reads a TokenReview's status. An authenticated answer must name the audience asked
/// for: an authenticator that ignores audiences would otherwise pass any token.
fn review_of(
    status: k8s_openapi::api::authentication::v1::TokenReviewStatus,
    audience: &str,
) -> Review {
    let audience_ok = status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience));
    let username = status.user.and_then(|u| u.username);
    match (status.authenticated, audience_ok, username) {
        (Some(true), true, Some(username)) => Review::Authenticated { username },
        (Some(true), false, _) => Review::Unauthenticated {
            reason: Some(format!("token not valid for audience {audience}")),
        },
        (Some(true), true, None) => Review::Unauthenticated {
            reason: Some("review names no user".to_owned()),
        },
        _ => Review::Unauthenticated {
            reason: status.error,
        },
    }
}

/// What to do with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No valid token (401).
    Unauthenticated,
    /// A valid token of another user (403).
    Forbidden {
        user: String,
    },
    /// The token could not be checked now (503).
    Unavailable,
}

#[derive(Clone, Debug)]
struct Cached {
    review: Review,
    ttl: Duration,
}

struct TtlFromValue;

impl Expiry<String, Cached> for TtlFromValue {
    fn expire_after_create(
        &self,
        _token: &String,
        value: &Cached,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Checks tokens against one allowed user, with a cache of reviews.
pub struct Authenticator {
    reviewer: Arc<dyn TokenReviewer>,
    allowed_user: String,
    cache: Cache<String, Cached>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("allowed_user", &self.allowed_user)
            .field("cached", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Allows only `allowed_user` (see [`service_account_user`]).
    pub fn new(reviewer: Arc<dyn TokenReviewer>, allowed_user: impl Into<String>) -> Self {
        Self {
            reviewer,
            allowed_user: allowed_user.into(),
            cache: Cache::builder()
                .max_capacity(4096)
                .expire_after(TtlFromValue)
                .build(),
        }
    }

    /// The user reports must come from.
    pub fn allowed_user(&self) -> &str {
        &self.allowed_user
    }

    /// The verdict on a request with this `Authorization` header value (if any).
    pub async fn check(&self, authorization: Option<&str>) -> Verdict {
        match authorization.and_then(bearer_token) {
            Some(token) => self.verdict(token).await,
            None => Verdict::Unauthenticated,
        }
    }

    /// The verdict on a bearer token.
    pub async fn verdict(&self, token: &str) -> Verdict {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Verdict::Unauthenticated;
        }
        let reviewer = Arc::clone(&self.reviewer);
        // Concurrent requests with one token share one review; an error is not cached.
        let cached = self
            .cache
            .try_get_with(token.to_owned(), async move {
                let review = reviewer.review(token).await?;
                let ttl = cache_ttl(&review, token_expiry(token), SystemTime::now());
                Ok::<_, ReviewError>(Cached { review, ttl })
            })
            .await;
        match cached {
            Ok(Cached {
                review: Review::Authenticated { username },
                ..
            }) if username == self.allowed_user => Verdict::Allowed,
            Ok(Cached {
                review: Review::Authenticated { username },
                ..
            }) => Verdict::Forbidden { user: username },
            Ok(Cached {
                review: Review::Unauthenticated { reason },
                ..
            }) => {
                tracing::debug!(?reason, "demand report with an invalid token");
                Verdict::Unauthenticated
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check a demand report's token");
                Verdict::Unavailable
            }
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// How long to trust a review: a positive one until the token expires, at most
/// [`MAX_CACHE`] (or [`NO_EXPIRY_CACHE`] without `exp`); a negative one
/// [`NEGATIVE_CACHE`].
pub fn cache_ttl(review: &Review, expires: Option<SystemTime>, now: SystemTime) -> Duration {
    match review {
        Review::Unauthenticated { .. } => NEGATIVE_CACHE,
        Review::Authenticated { .. } => match expires {
            Some(expires) => expires
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                .min(MAX_CACHE),
            None => NO_EXPIRY_CACHE,
        },
    }
}

/// The `exp` claim of a JWT, read without verifying the signature.
pub fn token_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = base64url_decode(payload)?;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<serde_json::Number>,
    }
    let claims: Claims = serde_json::from_slice(&payload).ok()?;
    let exp = claims.exp?;
    let secs = exp
        .as_u64()
        .or_else(|| exp.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Base64url (RFC 4648 §5), padding optional: what JWT segments use.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    // A single leftover character (6 bits) cannot end a valid encoding.
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn b64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            b64(br#"{"alg":"RS256"}"#),
            b64(payload.as_bytes())
        )
    }

    #[test]
    fn base64url_decodes_every_length() {
        for input in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0xfb, 0xff, 0xfe],
        ] {
            assert_eq!(
                base64url_decode(&b64(input)).as_deref(),
                Some(input),
                "{input:?}"
            );
        }
        assert_eq!(base64url_decode("Zm9vYg=="), Some(b"foob".to_vec()));
        assert_eq!(
            base64url_decode("Zm9v+"),
            None,
            "standard alphabet is not base64url"
        );
        assert_eq!(base64url_decode("Z"), None);
    }

    #[test]
    fn expiry_is_read_from_the_payload() {
        let at = |secs| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        let cases: &[(&str, Option<SystemTime>)] = &[
            (
                &jwt(r#"{"exp":1764460000,"aud":["blink-scaler"]}"#),
                at(1_764_460_000),
            ),
            (&jwt(r#"{"exp":1764460000.5}"#), at(1_764_460_000)),
            (&jwt(r#"{"sub":"x"}"#), None),
            (&jwt(r#"{"exp":"soon"}"#), None),
            (&jwt("not json"), None),
            ("only.two", None),
            ("a.b.c.d", None),
            ("", None),
        ];
        for (token, expected) in cases {
            assert_eq!(token_expiry(token), *expected, "{token}");
        }
    }

    #[test]
    fn cache_lifetime_never_outlives_the_token() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ok = Review::Authenticated {
            username: "u".into(),
        };
        let bad = Review::Unauthenticated { reason: None };
        let secs = Duration::from_secs;
        let cases = [
            (&ok, Some(now + secs(30)), secs(30)),
            (&ok, Some(now + secs(3600)), MAX_CACHE),
            (&ok, Some(now - secs(1)), Duration::ZERO),
            (&ok, None, NO_EXPIRY_CACHE),
            (&bad, Some(now + secs(3600)), NEGATIVE_CACHE),
            (&bad, None, NEGATIVE_CACHE),
        ];
        for (review, expires, expected) in cases {
            assert_eq!(
                cache_ttl(review, expires, now),
                expected,
                "{review:?} {expires:?}"
            );
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_required() {
        let cases = [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("abc", None),
        ];
        for (header, expected) in cases {
            assert_eq!(bearer_token(header), expected, "{header:?}");
        }
    }

    #[test]
    fn review_status_is_read_strictly() {
        use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
        let status =
            |authenticated, audiences: Option<Vec<&str>>, user: Option<&str>| TokenReviewStatus {
                authenticated,
                audiences: audiences.map(|a| a.into_iter().map(String::from).collect()),
                user: user.map(|u| UserInfo {
                    username: Some(u.into()),
                    ..UserInfo::default()
                }),
                error: None,
            };
        let sa = "system:serviceaccount:blink:activator";
        let ok = Review::Authenticated {
            username: sa.into(),
        };
        let cases = [
            (status(Some(true), Some(vec![AUDIENCE]), Some(sa)), true),
            (
                status(Some(true), Some(vec!["other", AUDIENCE]), Some(sa)),
                true,
            ),
            (status(Some(true), None, Some(sa)), false),
            (
                status(
                    Some(true),
                    Some(vec!["https://kubernetes.default.svc"]),
                    Some(sa),
                ),
                false,
            ),
            (status(Some(true), Some(vec![AUDIENCE]), None), false),
            (status(Some(false), Some(vec![AUDIENCE]), Some(sa)), false),
            (status(None, None, None), false),
        ];
        for (status, authenticated) in cases {
            let review = review_of(status.clone(), AUDIENCE);
            assert_eq!(review == ok, authenticated, "{status:?} → {review:?}");
        }
    }

    /// Answers from a table and counts reviews.
    struct Table {
        calls: AtomicUsize,
    }

    impl TokenReviewer for Table {
        fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Review, ReviewError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match token {
                    "down" => Err(ReviewError::Api(
                        kube::Error::LinesCodecMaxLineLengthExceeded,
                    )),
                    "bad" => Ok(Review::Unauthenticated { reason: None }),
                    user => Ok(Review::Authenticated {
                        username: user.to_owned(),
                    }),
                }
            })
        }
    }

    #[tokio::test]
    async fn verdicts_and_caching() {
        let table = Arc::new(Table {
            calls: AtomicUsize::new(0),
        });
        let auth = Authenticator::new(table.clone(), "activator");
        let cases = [
            (None, Verdict::Unauthenticated, 0),
            (Some("Basic x"), Verdict::Unauthenticated, 0),
            (Some("Bearer activator"), Verdict::Allowed, 1),
            (Some("Bearer activator"), Verdict::Allowed, 0),
            (
                Some("Bearer other"),
                Verdict::Forbidden {
                    user: "other".into(),
                },
                1,
            ),
            (Some("Bearer bad"), Verdict::Unauthenticated, 1),
            (Some("Bearer bad"), Verdict::Unauthenticated, 0),
            (Some("Bearer down"), Verdict::Unavailable, 1),
            // Failures are not cached: the next request asks again.
            (Some("Bearer down"), Verdict::Unavailable, 1),
        ];
        for (header, expected, reviews) in cases {
            let before = table.calls.load(Ordering::SeqCst);
            assert_eq!(auth.check(header).await, expected, "{header:?}");
            assert_eq!(
                table.calls.load(Ordering::SeqCst) - before,
                reviews,
                "{header:?}"
            );
        }
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(auth.verdict(&long).await, Verdict::Unauthenticated);
    }
}
