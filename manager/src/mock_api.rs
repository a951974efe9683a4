//! Test support: kube's mocked API server (`tower_test`) answering an exact
//! sequence of expected requests, so that each controller scenario names
//! the requests it expects, in order; any other request fails the test.
//! And the `TunnelConfiguration` the scenarios read.

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;
use tunnel_api::configuration::{DEFAULT_NAME, TunnelConfiguration, TunnelConfigurationSpec};

/// The configuration `cluster-tunnel` with a host name entrypoint
/// (`hub.example.com:443`), whose certificates live `validity_days`.
pub fn configuration(validity_days: u32) -> std::sync::Arc<TunnelConfiguration> {
    let spec: TunnelConfigurationSpec = serde_json::from_value(json!({
        "server": { "image": "s:1", "entrypoint": { "type": "Hostname", "hostname": { "value": "hub.example.com", "port": 443 } } },
        "agent": { "image": "agent:1" },
        "signer": { "certificateValidityDays": validity_days },
    }))
    .expect("a valid configuration");
    std::sync::Arc::new(TunnelConfiguration::new(DEFAULT_NAME, spec))
}

/// Time a scenario's requests get.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the mocked API server answers to one expected request.
pub enum Reply {
    /// This status and body.
    With(u16, Value),
    /// 200 with the request's own body (what an apply returns), plus
    /// `creationTimestamp` when given.
    Echo(Option<&'static str>),
    /// 200 with the request's own body and these top-level fields (e.g. a
    /// `status`) set.
    EchoWith(Value),
}

/// A 404 `Status`.
pub fn not_found() -> Reply {
    status_reply(404, "NotFound")
}

/// The `Status` a successful delete answers.
pub fn deleted() -> Reply {
    Reply::With(
        200,
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200 }),
    )
}

/// A failure `Status` with this code and reason.
pub fn status_reply(code: u16, reason: &str) -> Reply {
    Reply::With(
        code,
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason }),
    )
}

/// The mocked server's handle.
pub type ApiHandle = mock::Handle<Request<Body>, Response<Body>>;
/// The mocked server's task: its handle back, and the request bodies.
pub type Served = tokio::task::JoinHandle<(ApiHandle, Vec<Value>)>;

/// A client talking to a new mocked API server.
pub fn client() -> (kube::Client, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// Serves `expected` in order (method, path, reply) and returns the
/// request bodies; any other request fails the test.
pub fn serve(mut handle: ApiHandle, expected: Vec<(Method, &'static str, Reply)>) -> Served {
    tokio::spawn(async move {
        let mut bodies = Vec::new();
        for (method, path, reply) in expected {
            let (request, send) = handle.next_request().await.expect("a request");
            assert_eq!(
                (request.method(), request.uri().path()),
                (&method, path),
                "unexpected request {} {}",
                request.method(),
                request.uri()
            );
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, answer) = match reply {
                Reply::With(status, v) => (status, v),
                Reply::Echo(created) => {
                    let mut v = body.clone();
                    if let Some(t) = created {
                        v["metadata"]["creationTimestamp"] = json!(t);
                    }
                    (200, v)
                }
                Reply::EchoWith(extra) => {
                    let mut v = body.clone();
                    for (k, x) in extra.as_object().expect("fields to set").iter() {
                        v[k] = x.clone();
                    }
                    (200, v)
                }
            };
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
            bodies.push(body);
        }
        (handle, bodies)
    })
}

/// Waits for every expected request; the handle and the request bodies.
pub async fn finish(server: Served) -> (ApiHandle, Vec<Value>) {
    tokio::time::timeout(TIMEOUT, server)
        .await
        .expect("every expected request was made")
        .unwrap()
}
