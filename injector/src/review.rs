//! One `AdmissionReview` in, one answer out: parsing, the decision, and the
//! response in the form Kubernetes documents.
//!
//! The response is built here rather than with kube-core's `AdmissionResponse`,
//! which serializes `patch` as an array of numbers (kube-rs issue #1781): the
//! API server expects a base64 string.
//!
//! A body that is not an `admission.k8s.io/v1` `AdmissionReview` with a
//! request is answered with HTTP 400 and a `text/plain` message saying what is
//! wrong; the API server then applies the webhook's `failurePolicy`. Every
//! review that parses gets HTTP 200 and an `AdmissionReview` with the request's
//! uid: `allowed: true` with or without a patch, or `allowed: false` with
//! code 400 and a message for an opted-in pod whose annotations are invalid.
//! Trouble of the injector's own (a pod it cannot read) lets the pod through
//! without the sidecar, with a warning, unless `fail_closed` is set.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::StatusCode;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::inject::{Outcome, SidecarTemplate, plan};
use crate::metrics::{InjectionResult, InjectorMetrics};

/// The API version this webhook speaks (and the one configured in
/// `admissionReviewVersions`).
pub const ADMISSION_V1: &str = "admission.k8s.io/v1";
/// The older version with the same shape, answered in kind.
pub const ADMISSION_V1BETA1: &str = "admission.k8s.io/v1beta1";
/// Content type of JSON answers.
pub const JSON: &str = "application/json";
/// Content type of error answers.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// An HTTP answer to one review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
}

impl Reply {
    fn bad_request(message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            content_type: TEXT,
            body: format!("{message}\n").into_bytes(),
        }
    }
}

/// Handles admission reviews for pods.
#[derive(Debug)]
pub struct Reviewer {
    template: watch::Receiver<Arc<SidecarTemplate>>,
    fail_closed: bool,
    metrics: InjectorMetrics,
}

/// The `response` of an `AdmissionReview`, as Kubernetes documents it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// Base64 of the JSON Patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// A `metav1.Status` of a denial.
#[derive(Debug, Serialize)]
struct Status {
    status: &'static str,
    code: u16,
    reason: &'static str,
    message: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut<'a> {
    api_version: &'a str,
    kind: &'static str,
    response: Response,
}

impl Response {
    fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            status: None,
            patch_type: None,
            patch: None,
            warnings: Vec::new(),
        }
    }

    fn deny(uid: &str, code: StatusCode, message: String) -> Self {
        Self {
            allowed: false,
            status: Some(Status {
                status: "Failure",
                code: code.as_u16(),
                reason: match code {
                    StatusCode::BAD_REQUEST => "BadRequest",
                    _ => "InternalError",
                },
                message,
            }),
            ..Self::allow(uid)
        }
    }
}

impl Reviewer {
    /// A reviewer that injects the current `template` (it may change while
    /// the reviewer runs); with `fail_closed`, pods it cannot handle are
    /// denied instead of let through without the sidecar.
    pub fn new(
        template: watch::Receiver<Arc<SidecarTemplate>>,
        fail_closed: bool,
        metrics: InjectorMetrics,
    ) -> Self {
        Self {
            template,
            fail_closed,
            metrics,
        }
    }

    /// Answers one request body.
    pub fn review(&self, body: &[u8]) -> Reply {
        let (api_version, request) = match parse(body) {
            Ok(parsed) => parsed,
            Err(message) => {
                self.metrics.injection(InjectionResult::Error);
                tracing::warn!(%message, "malformed admission review");
                return Reply::bad_request(message);
            }
        };
        let (result, response) = self.decide(&request);
        self.metrics.injection(result);
        let out = ReviewOut {
            api_version: &api_version,
            kind: "AdmissionReview",
            response,
        };
        Reply {
            status: StatusCode::OK,
            content_type: JSON,
            body: serde_json::to_vec(&out).expect("the response serializes"),
        }
    }

    fn decide(&self, req: &AdmissionRequest<DynamicObject>) -> (InjectionResult, Response) {
        let namespace = req.namespace.as_deref().unwrap_or("");
        let is_pod = req.kind.group.is_empty()
            && req.kind.kind == "Pod"
            && req.resource.resource == "pods"
            && req.sub_resource.as_deref().unwrap_or("").is_empty();
        if !is_pod || !matches!(req.operation, Operation::Create) {
            tracing::debug!(
                uid = %req.uid, kind = %req.kind.kind, operation = ?req.operation,
                "not a pod creation; allowed unchanged"
            );
            return (InjectionResult::Skipped, Response::allow(&req.uid));
        }
        let pod = match req
            .object
            .as_ref()
            .ok_or_else(|| "the review has no object".to_owned())
            .and_then(|o| {
                serde_json::to_value(o)
                    .and_then(serde_json::from_value::<Pod>)
                    .map_err(|e| format!("cannot read the pod: {e}"))
            }) {
            Ok(pod) => pod,
            Err(reason) => return self.own_trouble(req, namespace, reason),
        };
        let name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
        let template = self.template.borrow().clone();
        match plan(&pod, &template) {
            Ok(Outcome::Skipped(why)) => {
                tracing::debug!(%namespace, pod = %name, why, "not injected");
                (InjectionResult::Skipped, Response::allow(&req.uid))
            }
            Ok(Outcome::AlreadyInjected) => {
                tracing::info!(%namespace, pod = %name, "already has the sidecar");
                (InjectionResult::AlreadyInjected, Response::allow(&req.uid))
            }
            Ok(Outcome::Injected { patch, warnings }) => match serde_json::to_vec(&patch) {
                Ok(bytes) => {
                    tracing::info!(
                        %namespace, pod = %name, operations = patch.0.len(), dry_run = req.dry_run,
                        "sidecar injected"
                    );
                    let mut response = Response::allow(&req.uid);
                    response.patch_type = Some("JSONPatch");
                    response.patch = Some(BASE64.encode(bytes));
                    response.warnings = warnings;
                    (InjectionResult::Injected, response)
                }
                Err(e) => self.own_trouble(req, namespace, format!("cannot encode the patch: {e}")),
            },
            Err(refusal) => {
                let message = format!("cluster-tunnel sidecar injection: {refusal}");
                tracing::info!(%namespace, pod = %name, %message, "pod refused");
                (
                    InjectionResult::Refused,
                    Response::deny(&req.uid, StatusCode::BAD_REQUEST, message),
                )
            }
        }
    }

    /// A failure of the injector's own: the pod passes without the sidecar
    /// (and its creator is warned), or with `fail_closed` it is denied.
    fn own_trouble(
        &self,
        req: &AdmissionRequest<DynamicObject>,
        namespace: &str,
        reason: String,
    ) -> (InjectionResult, Response) {
        tracing::error!(uid = %req.uid, %namespace, %reason, fail_closed = self.fail_closed, "cannot handle the pod");
        let response = if self.fail_closed {
            Response::deny(
                &req.uid,
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cluster-tunnel sidecar injection failed: {reason}"),
            )
        } else {
            let mut r = Response::allow(&req.uid);
            r.warnings = vec![format!("cluster-tunnel: sidecar not injected: {reason}")];
            r
        };
        (InjectionResult::Error, response)
    }
}

/// Parses a body into the review's API version and its request, or says
/// what is wrong with it.
fn parse(body: &[u8]) -> Result<(String, AdmissionRequest<DynamicObject>), String> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("malformed AdmissionReview: not JSON: {e}"))?;
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    let kind = value.get("kind").and_then(|v| v.as_str());
    match (api_version, kind) {
        (Some(ADMISSION_V1 | ADMISSION_V1BETA1), Some("AdmissionReview")) => {}
        _ => {
            return Err(format!(
                "malformed AdmissionReview: expected apiVersion {ADMISSION_V1} and kind AdmissionReview, got apiVersion {} and kind {}",
                api_version.map_or("(none)".to_owned(), |v| format!("{v:?}")),
                kind.map_or("(none)".to_owned(), |v| format!("{v:?}")),
            ));
        }
    }
    let api_version = api_version.unwrap_or(ADMISSION_V1).to_owned();
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(value).map_err(|e| format!("malformed AdmissionReview: {e}"))?;
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| "malformed AdmissionReview: no request".to_owned())?;
    if request.uid.is_empty() {
        return Err("malformed AdmissionReview: request.uid is empty".into());
    }
    Ok((api_version, request))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::inject::tests::template;

    fn reviewer(fail_closed: bool) -> Reviewer {
        let (_, templates) = watch::channel(Arc::new(template()));
        Reviewer::new(templates, fail_closed, InjectorMetrics::default())
    }

    fn review_of(object: Value) -> Value {
        json!({
            "apiVersion": ADMISSION_V1,
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "team",
                "operation": "CREATE",
                "userInfo": { "username": "admin" },
                "object": object,
                "oldObject": null,
                "dryRun": false,
            }
        })
    }

    fn answer(r: &Reviewer, review: &Value) -> Value {
        let reply = r.review(&serde_json::to_vec(review).unwrap());
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.content_type, JSON);
        serde_json::from_slice(&reply.body).unwrap()
    }

    fn opted_in_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "app", "annotations": { "cluster-tunnel.io/inject": "true" } },
            "spec": { "containers": [{ "name": "app", "image": "app:1" }] },
        })
    }

    #[test]
    fn the_patch_is_a_base64_string() {
        let out = answer(&reviewer(false), &review_of(opted_in_pod()));
        assert_eq!(out["apiVersion"], ADMISSION_V1);
        assert_eq!(out["kind"], "AdmissionReview");
        let response = &out["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = response["patch"].as_str().expect("patch is a string");
        let decoded = BASE64.decode(patch).unwrap();
        let ops: json_patch::Patch = serde_json::from_slice(&decoded).unwrap();
        assert!(!ops.0.is_empty());
    }

    #[test]
    fn v1beta1_is_answered_in_kind() {
        let mut review = review_of(opted_in_pod());
        review["apiVersion"] = json!(ADMISSION_V1BETA1);
        assert_eq!(
            answer(&reviewer(false), &review)["apiVersion"],
            ADMISSION_V1BETA1
        );
    }

    #[test]
    fn other_kinds_and_operations_pass_unchanged() {
        let r = reviewer(false);
        let mut review = review_of(
            json!({ "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "d" } }),
        );
        review["request"]["kind"] =
            json!({ "group": "apps", "version": "v1", "kind": "Deployment" });
        review["request"]["resource"] =
            json!({ "group": "apps", "version": "v1", "resource": "deployments" });
        let out = answer(&r, &review);
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"].get("patch").is_none());

        let mut review = review_of(opted_in_pod());
        review["request"]["operation"] = json!("UPDATE");
        let out = answer(&r, &review);
        assert!(out["response"].get("patch").is_none());

        let mut review = review_of(opted_in_pod());
        review["request"]["subResource"] = json!("ephemeralcontainers");
        assert!(answer(&r, &review)["response"].get("patch").is_none());
    }

    #[test]
    fn an_unreadable_pod_passes_with_a_warning_unless_fail_closed() {
        let broken = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "x" }, "spec": { "containers": "nope" } });
        let out = answer(&reviewer(false), &review_of(broken.clone()));
        assert_eq!(out["response"]["allowed"], true);
        assert!(out["response"].get("patch").is_none());
        let warning = out["response"]["warnings"][0].as_str().unwrap();
        assert!(warning.contains("sidecar not injected"), "{warning}");

        let out = answer(&reviewer(true), &review_of(broken));
        assert_eq!(out["response"]["allowed"], false);
        assert_eq!(out["response"]["status"]["code"], 500);
    }

    #[test]
    fn invalid_annotations_are_denied_with_code_400() {
        let mut pod = opted_in_pod();
        pod["metadata"]["annotations"]["cluster-tunnel.io/proxy-port"] = json!("eighty");
        let out = answer(&reviewer(false), &review_of(pod));
        let response = &out["response"];
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        assert_eq!(response["status"]["reason"], "BadRequest");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("cluster-tunnel.io/proxy-port"),
            "{message}"
        );
    }

    #[test]
    fn malformed_reviews_say_what_is_wrong() {
        let r = reviewer(false);
        for (body, why) in [
            (&b"{not json"[..], "not JSON"),
            (br#"{"apiVersion":"v1","kind":"Pod"}"#, "expected apiVersion admission.k8s.io/v1"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "no request"),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"1"}}"#,
                "missing field",
            ),
        ] {
            let reply = r.review(body);
            assert_eq!(reply.status, StatusCode::BAD_REQUEST);
            assert_eq!(reply.content_type, TEXT);
            let text = String::from_utf8(reply.body).unwrap();
            assert!(text.starts_with("malformed AdmissionReview"), "{text}");
            assert!(text.contains(why), "{text}");
        }
    }
}
