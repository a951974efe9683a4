//! Who is calling: the identity in the caller's certificate, or — when the
//! caller sends a service-account token (`authorization: Bearer <token>` on
//! its `Connect` call) and the server runs with `--token-review` — the
//! service account that the Kubernetes `TokenReview` API says the token
//! belongs to.
//!
//! Results are cached per token (keyed by its SHA-256, never the token
//! itself) for a short time; failures of the API are never cached and fail
//! closed: the connection is refused as `unauthenticated`, with the reason.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tunnel_identity::spiffe::Identity;
use tunnel_proto::error::{ErrorCode, TunnelError};

/// Audience the sidecar's projected token is issued for (the injector's default).
pub const DEFAULT_TOKEN_AUDIENCE: &str = "cluster-tunnel";
/// How long a TokenReview result is reused.
pub const DEFAULT_TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);
/// Most cached results; expired ones are pruned when it fills.
const MAX_CACHE_ENTRIES: usize = 10_000;
/// Time the API gets to answer a TokenReview.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// TokenReview settings.
#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    /// Audiences a token must be issued for (any one of them).
    pub audiences: Vec<String>,
    /// How long a result is reused.
    pub cache_ttl: Duration,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        Self {
            audiences: vec![DEFAULT_TOKEN_AUDIENCE.to_owned()],
            cache_ttl: DEFAULT_TOKEN_CACHE_TTL,
        }
    }
}

/// What the API said about a token (cached for the TTL).
#[derive(Debug, Clone)]
enum Verdict {
    /// The token is this service account's.
    ServiceAccount(Identity),
    /// It is not, for this reason.
    Rejected(String),
}

/// Why a token names no workload; every kind refuses the connection as
/// `unauthenticated` ([`From<ReviewError> for TunnelError`]).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API's verdict: not a service account token for our audiences.
    #[error("{reason}")]
    Rejected {
        /// The API's reason, or ours.
        reason: String,
    },
    /// The API did not answer in time: refused without a verdict (fail closed).
    #[error(
        "cannot verify the service account token (TokenReview took longer than {after:?}); refusing (fail closed)"
    )]
    Timeout {
        /// How long it was given.
        after: Duration,
    },
    /// The API call failed: refused without a verdict (fail closed).
    #[error(
        "cannot verify the service account token (TokenReview failed: {source}); refusing (fail closed)"
    )]
    Api {
        /// The failure.
        #[source]
        source: kube::Error,
    },
}

impl ReviewError {
    /// Whether the token was refused because the API could not be asked
    /// (fail closed), not because of what it said.
    pub fn is_api_failure(&self) -> bool {
        matches!(self, ReviewError::Timeout { .. } | ReviewError::Api { .. })
    }
}

impl From<ReviewError> for TunnelError {
    fn from(err: ReviewError) -> Self {
        TunnelError::new(ErrorCode::Unauthenticated, err.to_string())
    }
}

impl Verdict {
    fn into_result(self, source: ReviewSource) -> Result<(Identity, ReviewSource), ReviewError> {
        match self {
            Verdict::ServiceAccount(id) => Ok((id, source)),
            Verdict::Rejected(reason) => Err(ReviewError::Rejected { reason }),
        }
    }
}

/// Validates tokens with the TokenReview API and caches the verdicts.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    config: TokenReviewConfig,
    cache: Mutex<HashMap<[u8; 32], (Instant, Verdict)>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How a token check ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewSource {
    /// Answered from the cache.
    Cache,
    /// Answered by the API.
    Api,
}

impl TokenReviewer {
    /// A reviewer calling the API through `client`.
    pub fn new(client: kube::Client, config: TokenReviewConfig) -> Self {
        Self {
            api: Api::all(client),
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The service account `token` belongs to, or why not.
    pub async fn authenticate(&self, token: &str) -> Result<(Identity, ReviewSource), ReviewError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        let cached = self.cache.lock().ok().and_then(|c| {
            c.get(&key)
                .filter(|(exp, _)| *exp > now)
                .map(|(_, v)| v.clone())
        });
        if let Some(verdict) = cached {
            return verdict.into_result(ReviewSource::Cache);
        }
        // An API failure is not a verdict: not cached, and the connection is refused.
        let verdict = self.review(token).await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_CACHE_ENTRIES {
                cache.retain(|_, (exp, _)| *exp > now);
                if cache.len() >= MAX_CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (now + self.config.cache_ttl, verdict.clone()));
        }
        verdict.into_result(ReviewSource::Api)
    }

    async fn review(&self, token: &str) -> Result<Verdict, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(self.config.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let answer = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.api.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| ReviewError::Timeout {
            after: REVIEW_TIMEOUT,
        })?
        .map_err(|source| ReviewError::Api { source })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(Verdict::Rejected(format!(
                "token rejected by TokenReview: {}",
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "not authenticated".into())
            )));
        }
        // The API checks audiences itself; an answer without ours is not trusted.
        if let Some(auds) = &status.audiences
            && !auds.iter().any(|a| self.config.audiences.contains(a))
        {
            return Ok(Verdict::Rejected(format!(
                "token is for audiences {auds:?}, not {:?}",
                self.config.audiences
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        Ok(service_account(&username))
    }
}

fn unauthenticated(reason: String) -> TunnelError {
    TunnelError::new(ErrorCode::Unauthenticated, reason)
}

/// `system:serviceaccount:<ns>:<name>` as a workload identity.
fn service_account(username: &str) -> Verdict {
    let parsed = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(ns, sa)| tunnel_identity::spiffe::parse_workload(&format!("{ns}/{sa}")).ok());
    match parsed {
        Some(id) => Verdict::ServiceAccount(id),
        None => Verdict::Rejected(format!("token of {username:?} is not a service account's")),
    }
}

/// The bearer token of a call (`authorization: Bearer <token>`), if it sent one.
pub fn bearer_token(metadata: &http::HeaderMap) -> Result<Option<String>, TunnelError> {
    bearer_token_in(metadata, http::header::AUTHORIZATION)
}

/// The bearer token of an HTTP proxy request (`Proxy-Authorization: Bearer
/// <token>`), if it sent one.
pub fn proxy_bearer_token(headers: &http::HeaderMap) -> Result<Option<String>, TunnelError> {
    bearer_token_in(headers, http::header::PROXY_AUTHORIZATION)
}

fn bearer_token_in(
    headers: &http::HeaderMap,
    name: http::header::HeaderName,
) -> Result<Option<String>, TunnelError> {
    let Some(value) = headers.get(&name) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| unauthenticated(format!("the {name} header is not visible ASCII")))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim().to_owned()))
        }
        _ => Err(unauthenticated(format!(
            "the {name} header must be \"Bearer <token>\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;
    use tower_test::mock;

    const TIMEOUT: Duration = Duration::from_secs(5);

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn reviewer() -> (TokenReviewer, Handle) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        (
            TokenReviewer::new(client, TokenReviewConfig::default()),
            handle,
        )
    }

    /// Answers one TokenReview: checks what was asked, replies `status` (HTTP `code`).
    async fn answer(handle: &mut Handle, expect_token: &str, code: u16, status: serde_json::Value) {
        answer_within(TIMEOUT, handle, expect_token, code, status).await;
    }

    async fn answer_within(
        within: Duration,
        handle: &mut Handle,
        expect_token: &str,
        code: u16,
        status: serde_json::Value,
    ) {
        let (req, send) = tokio::time::timeout(within, handle.next_request())
            .await
            .expect("a TokenReview within the timeout")
            .expect("a request");
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(
            req.uri().path(),
            "/apis/authentication.k8s.io/v1/tokenreviews"
        );
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(sent["spec"]["token"], expect_token);
        assert_eq!(
            sent["spec"]["audiences"],
            serde_json::json!(["cluster-tunnel"])
        );
        let reply = if code == 201 {
            serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {}, "spec": sent["spec"], "status": status,
            })
        } else {
            status
        };
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
    }

    fn ok_status(user: &str) -> serde_json::Value {
        serde_json::json!({
            "authenticated": true,
            "user": { "username": user, "uid": "1" },
            "audiences": ["cluster-tunnel"],
        })
    }

    #[tokio::test]
    async fn valid_token_is_its_service_account() {
        let (r, mut h) = reviewer();
        let api = tokio::spawn(async move {
            answer(
                &mut h,
                "good",
                201,
                ok_status("system:serviceaccount:team-a:payments"),
            )
            .await;
        });
        let (id, src) = r.authenticate("good").await.unwrap();
        assert_eq!(id.to_string(), "ns/team-a/sa/payments");
        assert_eq!(src, ReviewSource::Api);
        api.await.unwrap();
    }

    #[tokio::test]
    async fn wrong_audience_is_unauthenticated() {
        let (r, mut h) = reviewer();
        let api = tokio::spawn(async move {
            answer(&mut h, "aud", 201, serde_json::json!({
                "authenticated": false,
                "error": "[invalid bearer token, token audiences [\"https://kubernetes.default.svc\"] is invalid for the target audiences [\"cluster-tunnel\"]]",
            })).await;
            // An API that says yes for another audience is not believed either.
            answer(
                &mut h,
                "aud2",
                201,
                serde_json::json!({
                    "authenticated": true,
                    "user": { "username": "system:serviceaccount:a:b" },
                    "audiences": ["https://kubernetes.default.svc"],
                }),
            )
            .await;
        });
        let err = TunnelError::from(r.authenticate("aud").await.unwrap_err());
        assert_eq!(err.code, ErrorCode::Unauthenticated);
        assert!(
            err.message.contains("invalid for the target audiences"),
            "{err}"
        );
        let err = TunnelError::from(r.authenticate("aud2").await.unwrap_err());
        assert_eq!(err.code, ErrorCode::Unauthenticated);
        assert!(err.message.contains("not [\"cluster-tunnel\"]"), "{err}");
        api.await.unwrap();
    }

    #[tokio::test]
    async fn expired_token_is_unauthenticated() {
        let (r, mut h) = reviewer();
        let api = tokio::spawn(async move {
            answer(&mut h, "old", 201, serde_json::json!({
                "authenticated": false,
                "error": "[invalid bearer token, square/go-jose/jwt: validation failed, token is expired (exp)]",
            })).await;
        });
        let err = r.authenticate("old").await.unwrap_err();
        assert!(
            matches!(&err, ReviewError::Rejected { reason } if reason.contains("token is expired")),
            "{err}"
        );
        assert!(!err.is_api_failure());
        assert_eq!(TunnelError::from(err).code, ErrorCode::Unauthenticated);
        api.await.unwrap();
    }

    #[tokio::test]
    async fn a_user_that_is_no_service_account_is_refused() {
        let (r, mut h) = reviewer();
        let api = tokio::spawn(async move {
            answer(&mut h, "node", 201, ok_status("system:node:worker-1")).await;
        });
        let err = r.authenticate("node").await.unwrap_err();
        assert!(err.to_string().contains("not a service account"), "{err}");
        api.await.unwrap();
    }

    #[tokio::test]
    async fn api_failure_fails_closed_and_is_not_cached() {
        let (r, mut h) = reviewer();
        let api = tokio::spawn(async move {
            answer(&mut h, "t", 500, serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500,
            })).await;
            answer(&mut h, "t", 201, ok_status("system:serviceaccount:a:b")).await;
        });
        let err = r.authenticate("t").await.unwrap_err();
        assert!(matches!(err, ReviewError::Api { .. }), "{err}");
        assert!(err.is_api_failure());
        let err = TunnelError::from(err);
        assert_eq!(err.code, ErrorCode::Unauthenticated);
        assert!(err.message.contains("fail closed"), "{err}");
        assert!(err.message.contains("etcdserver"), "{err}");
        // The next call asks again and succeeds.
        assert!(r.authenticate("t").await.is_ok());
        api.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn results_are_cached_until_the_ttl_passes() {
        let (r, mut h) = reviewer();
        // Time is paused: the mock's deadline must outlast the advances below.
        let day = Duration::from_secs(86_400);
        let api = tokio::spawn(async move {
            answer_within(
                day,
                &mut h,
                "c",
                201,
                ok_status("system:serviceaccount:a:b"),
            )
            .await;
            answer_within(
                day,
                &mut h,
                "bad",
                201,
                serde_json::json!({"authenticated": false, "error": "nope"}),
            )
            .await;
            // After the TTL: asked again.
            answer_within(
                day,
                &mut h,
                "c",
                201,
                ok_status("system:serviceaccount:a:b"),
            )
            .await;
            h
        });
        assert_eq!(r.authenticate("c").await.unwrap().1, ReviewSource::Api);
        assert!(r.authenticate("bad").await.is_err());
        tokio::time::advance(DEFAULT_TOKEN_CACHE_TTL - Duration::from_secs(1)).await;
        assert_eq!(r.authenticate("c").await.unwrap().1, ReviewSource::Cache);
        // A rejected token stays rejected from the cache, without a call.
        assert!(
            r.authenticate("bad")
                .await
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(r.authenticate("c").await.unwrap().1, ReviewSource::Api);
        let mut h = api.await.unwrap();
        // No further request was made.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), h.next_request())
                .await
                .is_err()
        );
    }

    #[test]
    fn bearer_tokens_are_read_from_metadata() {
        let mut m = http::HeaderMap::new();
        assert_eq!(bearer_token(&m).unwrap(), None);
        m.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&m).unwrap().as_deref(), Some("abc"));
        m.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(
            bearer_token(&m).unwrap_err().code,
            ErrorCode::Unauthenticated
        );
    }
}
