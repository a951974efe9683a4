//! The addon's health Lease, as open-cluster-management reads it: a
//! `coordination.k8s.io/v1` Lease named after the addon (`--addon-lease`)
//! in the agent's install namespace, renewed every [`RENEW_INTERVAL`] while
//! the agent holds a tunnel to at least one server (its `/readyz`). OCM's
//! registration agent sets the `ManagedClusterAddOn`'s `Available` from it:
//! true while it is renewed, false once it has not been for five lease
//! durations, unknown while it does not exist. An agent without a tunnel
//! stops renewing, so `AVAILABLE` follows the tunnels, not the pod.
//!
//! Every replica renews the same Lease; a conflict (another replica renewed
//! it first) is fine and retried at the next tick.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How often the Lease is renewed (OCM's addon lease duration).
pub const RENEW_INTERVAL: Duration = Duration::from_secs(60);
/// The Lease's duration, in seconds (OCM waits five of them).
pub const LEASE_DURATION_SECONDS: i32 = 60;

/// What one renewal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The Lease did not exist and was created.
    Created,
    /// The Lease's renew time was moved to now.
    Renewed,
    /// The agent has no tunnel: the Lease is left to expire.
    NotConnected,
}

/// Renews (or creates) the Lease `name` if `connected`.
pub async fn renew_once(
    api: &Api<Lease>,
    name: &str,
    holder: &str,
    connected: bool,
    now: k8s_openapi::jiff::Timestamp,
) -> Result<Renewal, kube::Error> {
    if !connected {
        return Ok(Renewal::NotConnected);
    }
    let spec = |mut s: LeaseSpec| {
        s.holder_identity = Some(holder.to_owned());
        s.lease_duration_seconds = Some(LEASE_DURATION_SECONDS);
        s.renew_time = Some(MicroTime(now));
        s
    };
    match api.get_opt(name).await? {
        Some(mut lease) => {
            lease.spec = Some(spec(lease.spec.take().unwrap_or_default()));
            api.replace(name, &PostParams::default(), &lease).await?;
            Ok(Renewal::Renewed)
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(LeaseSpec {
                    acquire_time: Some(MicroTime(now)),
                    ..LeaseSpec::default()
                })),
            };
            api.create(&PostParams::default(), &lease).await?;
            Ok(Renewal::Created)
        }
    }
}

/// Whether the agent at `admin` says it is ready (holds a tunnel): `GET /readyz` answers 200.
pub async fn agent_ready(admin: SocketAddr) -> bool {
    let mut addr = admin;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let check = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 16];
        let n = s.read(&mut head).await.ok()?;
        Some(head[..n].starts_with(b"HTTP/1.1 200") || head[..n].starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Renews the Lease every `interval` while `admin` says the agent is ready,
/// until the task is dropped.
pub async fn run(
    api: Api<Lease>,
    name: String,
    holder: String,
    admin: SocketAddr,
    interval: Duration,
) {
    let mut last = None;
    loop {
        let connected = agent_ready(admin).await;
        let now = k8s_openapi::jiff::Timestamp::now();
        match renew_once(&api, &name, &holder, connected, now).await {
            Ok(r) => {
                if last != Some(r) {
                    tracing::info!(lease = %name, result = ?r, "addon health lease");
                }
                last = Some(r);
            }
            Err(error) => {
                tracing::warn!(lease = %name, %error, "cannot renew the addon health lease")
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    //! The Lease against kube's mocked API server (`tower_test`): one
    //! scenario per request sequence, each under a timeout.

    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;

    const LEASE: &str =
        "/apis/coordination.k8s.io/v1/namespaces/cluster-tunnel-agent/leases/cluster-tunnel";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/cluster-tunnel-agent/leases";

    /// Serves `expected` (method, path, status, answer; `None`: echo the body) in order.
    fn serve(
        mut handle: mock::Handle<Request<Body>, Response<Body>>,
        expected: Vec<(Method, &'static str, u16, Option<Value>)>,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        tokio::spawn(async move {
            let mut bodies = Vec::new();
            for (method, path, status, answer) in expected {
                let (req, send) = handle.next_request().await.expect("a request");
                assert_eq!((req.method(), req.uri().path()), (&method, path));
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let answer = answer.unwrap_or_else(|| body.clone());
                send.send_response(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
                bodies.push(body);
            }
            bodies
        })
    }

    fn lease_api() -> (Api<Lease>, mock::Handle<Request<Body>, Response<Body>>) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        (Api::namespaced(client, "cluster-tunnel-agent"), handle)
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_connected_agent_creates_the_lease_then_renews_it() {
        let now: k8s_openapi::jiff::Timestamp = "2026-11-30T12:00:00Z".parse().unwrap();
        let not_found = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404 });
        let (api, handle) = lease_api();
        let server = serve(
            handle,
            vec![
                (Method::GET, LEASE, 404, Some(not_found)),
                (Method::POST, LEASES, 201, None),
            ],
        );
        let r = tokio::time::timeout(T, renew_once(&api, "cluster-tunnel", "agent-1", true, now))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r, Renewal::Created);
        let b = tokio::time::timeout(T, server).await.unwrap().unwrap();
        assert_eq!(b[1]["metadata"]["name"], "cluster-tunnel");
        assert_eq!(b[1]["spec"]["renewTime"], "2026-11-30T12:00:00.000000Z");
        assert_eq!(b[1]["spec"]["leaseDurationSeconds"], 60);

        // A minute later: the same Lease, renewed, with the version read.
        let later: k8s_openapi::jiff::Timestamp = "2026-11-30T12:01:00Z".parse().unwrap();
        let existing = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": "cluster-tunnel", "namespace": "cluster-tunnel-agent", "resourceVersion": "42" },
            "spec": { "holderIdentity": "agent-2", "leaseDurationSeconds": 60, "renewTime": "2026-11-30T12:00:00.000000Z" },
        });
        let (api, handle) = lease_api();
        let server = serve(
            handle,
            vec![
                (Method::GET, LEASE, 200, Some(existing)),
                (Method::PUT, LEASE, 200, None),
            ],
        );
        let r = tokio::time::timeout(
            T,
            renew_once(&api, "cluster-tunnel", "agent-1", true, later),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(r, Renewal::Renewed);
        let b = tokio::time::timeout(T, server).await.unwrap().unwrap();
        assert_eq!(b[1]["metadata"]["resourceVersion"], "42");
        assert_eq!(b[1]["spec"]["renewTime"], "2026-11-30T12:01:00.000000Z");
        assert_eq!(b[1]["spec"]["holderIdentity"], "agent-1");
    }

    #[tokio::test]
    async fn an_agent_without_a_tunnel_leaves_the_lease_to_expire() {
        let (api, handle) = lease_api();
        // Not one request: an unexpected one would never be answered.
        let server = serve(handle, vec![]);
        let now = k8s_openapi::jiff::Timestamp::now();
        let r = tokio::time::timeout(T, renew_once(&api, "cluster-tunnel", "agent-1", false, now))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r, Renewal::NotConnected);
        tokio::time::timeout(T, server).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn readiness_is_read_from_the_admin_port() {
        use tokio::net::TcpListener;
        async fn answering(status: &'static [u8]) -> SocketAddr {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let mut buf = [0u8; 256];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(status).await;
                }
            });
            addr
        }
        let ready = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let unready =
            answering(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        assert!(agent_ready(ready).await);
        assert!(!agent_ready(unready).await);
        // Nothing listening: not ready.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!agent_ready(closed).await);
    }
}
