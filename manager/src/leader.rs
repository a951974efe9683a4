//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's
//! leader election does it: the leader renews the Lease every
//! [`RETRY_PERIOD`]; another replica takes it over once it has not been
//! renewed for [`LEASE_DURATION`]; every write carries the Lease's
//! `resourceVersion`, so of two replicas racing for it exactly one wins
//! (the other gets 409 Conflict). A leader that cannot renew for
//! [`RENEW_DEADLINE`] (shorter than the lease duration) steps down before
//! anybody else may take over, so two leaders never write at once.
//!
//! The manager runs its controllers only while it leads; on losing the
//! Lease the process exits (and restarts as a follower), and on SIGTERM it
//! releases the Lease so that the next replica takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::addons::Clock;

/// A Lease not renewed this long may be taken over.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// A leader that could not renew for this long steps down.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Time between attempts to acquire or renew.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Who holds the Lease after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We do.
    Leading,
    /// Someone else does (or won the race just now).
    Following {
        /// Their identity, as the Lease says.
        holder: String,
    },
}

/// The Lease of one group of replicas, seen from one of them.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    clock: Clock,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// A time as the Lease carries it (microseconds; a time jiff cannot hold
/// becomes now).
fn to_micro_time(t: OffsetDateTime) -> MicroTime {
    let micros = t.unix_timestamp_nanos() / 1000 * 1000;
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_nanosecond(micros)
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now()),
    )
}

fn renewed_at(lease: &Lease) -> Option<OffsetDateTime> {
    let spec = lease.spec.as_ref()?;
    let t = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    OffsetDateTime::from_unix_timestamp_nanos(t.0.as_nanosecond()).ok()
}

impl LeaseLock {
    /// The Lease `name` in `api`'s namespace, for the replica `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, clock: Clock) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            clock,
        }
    }

    fn lease(&self, acquired: MicroTime, now: OffsetDateTime, transitions: i32) -> Lease {
        Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: i32::try_from(LEASE_DURATION.as_secs()).ok(),
                acquire_time: Some(acquired),
                renew_time: Some(to_micro_time(now)),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// One attempt: create the Lease, renew ours, or take over an expired
    /// one. A lost race is [`Attempt::Following`], not an error.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let now = (self.clock)();
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let created = self
                .api
                .create(
                    &PostParams::default(),
                    &self.lease(to_micro_time(now), now, 0),
                )
                .await;
            return won(created, "another replica");
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, Duration::from_secs);
        let expired = renewed_at(&current).is_none_or(|t| now - t > duration);
        let transitions = spec.lease_transitions.unwrap_or(0);
        let mut next = if holder == self.identity {
            let acquired = spec
                .acquire_time
                .clone()
                .unwrap_or_else(|| to_micro_time(now));
            self.lease(acquired, now, transitions)
        } else if holder.is_empty() || expired {
            tracing::info!(lease = %self.name, previous = %holder, "taking over the leader lease");
            self.lease(to_micro_time(now), now, transitions + 1)
        } else {
            return Ok(Attempt::Following { holder });
        };
        next.metadata.resource_version = current.metadata.resource_version.clone();
        let replaced = self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await;
        won(replaced, &holder)
    }

    /// Gives the Lease up if we hold it, so that another replica takes
    /// over without waiting for it to expire.
    pub async fn release(&self) {
        let Ok(Some(current)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        let mut next = current.clone();
        if let Some(s) = next.spec.as_mut() {
            s.holder_identity = None;
            s.lease_duration_seconds = Some(1);
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "leader lease released"),
            Err(error) => {
                tracing::warn!(lease = %self.name, %error, "cannot release the leader lease")
            }
        }
    }
}

/// A write's result: ours, or a race lost to `other`.
fn won(result: Result<Lease, kube::Error>, other: &str) -> Result<Attempt, kube::Error> {
    match result {
        Ok(_) => Ok(Attempt::Leading),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following {
            holder: other.to_owned(),
        }),
        Err(e) => Err(e),
    }
}

/// Why leading ended.
#[derive(Debug, thiserror::Error)]
#[error("lost the leader lease {lease}: {reason}")]
pub struct LostLease {
    /// The Lease.
    pub lease: String,
    /// What happened.
    pub reason: String,
}

/// Acquires the Lease and keeps renewing it; `leading` says whether we
/// lead. Returns when leadership is lost (never while it holds).
pub async fn lead(lock: &LeaseLock, leading: &watch::Sender<bool>) -> LostLease {
    let mut last_renewal: Option<tokio::time::Instant> = None;
    let mut last_holder = String::new();
    loop {
        let attempt = lock.try_acquire_or_renew().await;
        let is_leader = last_renewal.is_some();
        match attempt {
            Ok(Attempt::Leading) => {
                if !is_leader {
                    tracing::info!(lease = %lock.name, identity = %lock.identity, "became the leader");
                    leading.send_replace(true);
                }
                last_renewal = Some(tokio::time::Instant::now());
            }
            Ok(Attempt::Following { holder }) => {
                if is_leader {
                    leading.send_replace(false);
                    return LostLease {
                        lease: lock.name.clone(),
                        reason: format!("{holder} holds it now"),
                    };
                }
                if holder != last_holder {
                    tracing::info!(lease = %lock.name, leader = %holder, "following the leader");
                    last_holder = holder;
                }
            }
            Err(error) => {
                tracing::warn!(lease = %lock.name, %error, "cannot acquire or renew the leader lease");
                if let Some(at) = last_renewal
                    && at.elapsed() >= RENEW_DEADLINE
                {
                    leading.send_replace(false);
                    return LostLease {
                        lease: lock.name.clone(),
                        reason: format!("not renewed for {RENEW_DEADLINE:?}: {error}"),
                    };
                }
            }
        }
        tokio::time::sleep(RETRY_PERIOD).await;
    }
}

#[cfg(test)]
mod tests {
    //! One scenario per expected request sequence against kube's mocked API
    //! server; the clock is the test's.

    use std::sync::Arc;

    use http::Method;
    use serde_json::{Value, json};

    use super::*;
    use crate::mock_api::{self, Reply, finish, not_found, serve, status_reply};

    const LEASE: &str =
        "/apis/coordination.k8s.io/v1/namespaces/cluster-tunnel/leases/cluster-tunnel-manager";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/cluster-tunnel/leases";

    /// A `MicroTime`: RFC 3339 in UTC with six fractional digits.
    fn micro_time(t: OffsetDateTime) -> String {
        const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        t.to_offset(time::UtcOffset::UTC)
            .format(FORMAT)
            .unwrap_or_default()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn lock(identity: &str) -> (LeaseLock, mock_api::ApiHandle) {
        let (client, handle) = mock_api::client();
        let api = Api::namespaced(client, "cluster-tunnel");
        let lock = LeaseLock::new(api, "cluster-tunnel-manager", identity, Arc::new(now));
        (lock, handle)
    }

    fn held_by(holder: &str, renewed_secs_ago: i64) -> Value {
        let renewed = micro_time(now() - time::Duration::seconds(renewed_secs_ago));
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": "cluster-tunnel-manager", "namespace": "cluster-tunnel", "resourceVersion": "41" },
            "spec": { "holderIdentity": holder, "leaseDurationSeconds": 15, "acquireTime": renewed, "renewTime": renewed, "leaseTransitions": 3 },
        })
    }

    async fn attempt(lock: &LeaseLock) -> Result<Attempt, kube::Error> {
        tokio::time::timeout(mock_api::TIMEOUT, lock.try_acquire_or_renew())
            .await
            .expect("an attempt in time")
    }

    #[tokio::test]
    async fn no_lease_yet_get_then_create_and_lead() {
        let (lock, handle) = lock("manager-a");
        let server = serve(
            handle,
            vec![
                (Method::GET, LEASE, not_found()),
                (Method::POST, LEASES, Reply::Echo(None)),
            ],
        );
        assert_eq!(attempt(&lock).await.unwrap(), Attempt::Leading);
        let (_, bodies) = finish(server).await;
        let spec = &bodies[1]["spec"];
        assert_eq!(spec["holderIdentity"], "manager-a");
        assert_eq!(spec["leaseDurationSeconds"], 15);
        assert_eq!(spec["leaseTransitions"], 0);
    }

    #[tokio::test]
    async fn a_fresh_lease_of_another_replica_get_and_follow() {
        let (lock, handle) = lock("manager-a");
        let server = serve(
            handle,
            vec![(
                Method::GET,
                LEASE,
                Reply::With(200, held_by("manager-b", 5)),
            )],
        );
        assert_eq!(
            attempt(&lock).await.unwrap(),
            Attempt::Following {
                holder: "manager-b".into()
            }
        );
        finish(server).await;
    }

    #[tokio::test]
    async fn an_expired_lease_get_then_replace_with_its_version_and_lead() {
        let (lock, handle) = lock("manager-a");
        let server = serve(
            handle,
            vec![
                (
                    Method::GET,
                    LEASE,
                    Reply::With(200, held_by("manager-b", 16)),
                ),
                (Method::PUT, LEASE, Reply::Echo(None)),
            ],
        );
        assert_eq!(attempt(&lock).await.unwrap(), Attempt::Leading);
        let (_, bodies) = finish(server).await;
        assert_eq!(
            bodies[1]["metadata"]["resourceVersion"], "41",
            "optimistic concurrency"
        );
        assert_eq!(bodies[1]["spec"]["holderIdentity"], "manager-a");
        assert_eq!(bodies[1]["spec"]["leaseTransitions"], 4);
    }

    #[tokio::test]
    async fn our_own_lease_get_then_renew_keeping_the_acquire_time() {
        let (lock, handle) = lock("manager-a");
        let server = serve(
            handle,
            vec![
                (
                    Method::GET,
                    LEASE,
                    Reply::With(200, held_by("manager-a", 2)),
                ),
                (Method::PUT, LEASE, Reply::Echo(None)),
            ],
        );
        assert_eq!(attempt(&lock).await.unwrap(), Attempt::Leading);
        let (_, bodies) = finish(server).await;
        let spec = &bodies[1]["spec"];
        assert_eq!(spec["renewTime"], micro_time(now()));
        assert_eq!(
            spec["acquireTime"],
            micro_time(now() - time::Duration::seconds(2))
        );
        assert_eq!(spec["leaseTransitions"], 3, "a renewal is no transition");
    }

    #[tokio::test]
    async fn a_takeover_race_lost_get_then_conflict_and_follow() {
        let (lock, handle) = lock("manager-a");
        let server = serve(
            handle,
            vec![
                (
                    Method::GET,
                    LEASE,
                    Reply::With(200, held_by("manager-b", 60)),
                ),
                (Method::PUT, LEASE, status_reply(409, "Conflict")),
            ],
        );
        assert!(matches!(
            attempt(&lock).await.unwrap(),
            Attempt::Following { .. }
        ));
        finish(server).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_steps_down_within_the_renew_deadline() {
        let (lock, mut handle) = lock("manager-a");
        let (tx, rx) = watch::channel(false);
        let api = tokio::spawn(async move {
            // Created, then every request fails.
            let mut n = 0;
            while let Some((request, send)) = handle.next_request().await {
                n += 1;
                let (status, body) = match (n, request.method().clone()) {
                    (1, Method::GET) => (
                        404,
                        json!({ "kind": "Status", "code": 404, "reason": "NotFound" }),
                    ),
                    (2, Method::POST) => (201, held_by("manager-a", 0)),
                    _ => (
                        500,
                        json!({ "kind": "Status", "code": 500, "reason": "InternalError", "message": "etcd is down" }),
                    ),
                };
                send.send_response(
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                );
            }
        });
        let started = tokio::time::Instant::now();
        let lost = tokio::time::timeout(Duration::from_secs(60), lead(&lock, &tx))
            .await
            .expect("steps down");
        assert!(!*rx.borrow(), "no longer leading");
        assert!(lost.to_string().contains("not renewed"), "{lost}");
        let took = started.elapsed();
        assert!(
            took >= RENEW_DEADLINE && took < LEASE_DURATION,
            "stepped down after {took:?}: before anybody else may take over"
        );
        api.abort();
    }
}
