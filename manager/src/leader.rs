//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's
//! leader election does it: the leader renews the Lease every
//! [`RETRY_PERIOD`]; another replica takes it over once it has not seen the
//! Lease change for [`LEASE_DURATION`]; every write carries the Lease's
//! `resourceVersion`, so of two replicas racing for it exactly one wins
//! (the other gets 409 Conflict).
//!
//! Two rules keep two leaders from acting at once:
//! - **Expiry is judged by local time.** A replica notes when *it* saw the
//!   Lease change (its monotonic clock), never compares its clock with the
//!   `renewTime` another replica wrote: clocks of two nodes may disagree by
//!   more than a lease.
//! - **Every attempt is bounded by the renew deadline.** A leader whose
//!   renewal does not succeed within [`RENEW_DEADLINE`] of the start of its
//!   last successful one steps down, even while a request hangs; the
//!   deadline is shorter than the lease, and a standby counts the lease from
//!   no earlier than that start, so the old leader has stopped before a
//!   standby can take over.
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

use crate::controller::Clock;

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
    /// Wall-clock time, for what we write into the Lease.
    clock: Clock,
    /// The Lease as last seen, and when (our monotonic time) it last changed.
    observed: std::sync::Mutex<Option<Observed>>,
    /// Set once [`lead`] stepped down: the Lease is not ours to release.
    stepped_down: std::sync::atomic::AtomicBool,
}

/// A Lease as seen, and when it was first seen so.
struct Observed {
    record: String,
    at: tokio::time::Instant,
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

impl LeaseLock {
    /// The Lease `name` in `api`'s namespace, for the replica `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, clock: Clock) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            clock,
            observed: std::sync::Mutex::new(None),
            stepped_down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Notes the Lease as read now; returns how long it has been unchanged
    /// as far as this replica has seen (zero when it just changed or is new
    /// to us).
    fn observe(&self, lease: &Lease) -> Duration {
        let record = format!(
            "{:?}|{}",
            lease.metadata.resource_version,
            serde_json::to_string(&lease.spec).unwrap_or_default()
        );
        let now = tokio::time::Instant::now();
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match &*observed {
            Some(o) if o.record == record => now.saturating_duration_since(o.at),
            _ => {
                *observed = Some(Observed { record, at: now });
                Duration::ZERO
            }
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
        // Not renewed for a lease duration, as this replica has seen it.
        let expired = self.observe(&current) > duration;
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
    /// over without waiting for it to expire; within [`RETRY_PERIOD`], and
    /// not at all once [`lead`] has stepped down (the Lease may be another's).
    pub async fn release(&self) {
        if self.stepped_down.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if tokio::time::timeout(RETRY_PERIOD, self.release_now())
            .await
            .is_err()
        {
            tracing::warn!(lease = %self.name, "the API did not answer in time; the leader lease expires on its own");
        }
    }

    async fn release_now(&self) {
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
#[derive(Debug, Clone, thiserror::Error)]
#[error("lost the leader lease {lease}: {reason}")]
pub struct LostLease {
    /// The Lease.
    pub lease: String,
    /// What happened.
    pub reason: String,
}

/// Acquires the Lease and keeps renewing it; `leading` says whether we
/// lead. Returns when leadership is lost (never while it holds): the Lease
/// went to another replica, or it was not renewed within [`RENEW_DEADLINE`]
/// of the start of the last successful renewal.
pub async fn lead(lock: &LeaseLock, leading: &watch::Sender<bool>) -> LostLease {
    let lost = LostLease {
        lease: lock.name.clone(),
        reason: String::new(),
    };
    let step_down = |reason: String| {
        lock.stepped_down
            .store(true, std::sync::atomic::Ordering::Release);
        leading.send_replace(false);
        LostLease {
            reason,
            ..lost.clone()
        }
    };
    // When the last successful renewal started: a standby counts the lease
    // from no earlier than this.
    let mut last_renewal: Option<tokio::time::Instant> = None;
    let mut last_holder = String::new();
    loop {
        let started = tokio::time::Instant::now();
        // A leader has what is left of its renew deadline; a follower as long.
        let budget = last_renewal.map_or(RENEW_DEADLINE, |at| {
            RENEW_DEADLINE.saturating_sub(started.saturating_duration_since(at))
        });
        let attempt = match tokio::time::timeout(budget, lock.try_acquire_or_renew()).await {
            Ok(Ok(attempt)) => Ok(attempt),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer from the API within {budget:?}")),
        };
        let is_leader = last_renewal.is_some();
        match attempt {
            Ok(Attempt::Leading) => {
                if !is_leader {
                    tracing::info!(lease = %lock.name, identity = %lock.identity, "became the leader");
                    leading.send_replace(true);
                }
                last_renewal = Some(started);
            }
            Ok(Attempt::Following { holder }) => {
                if is_leader {
                    return step_down(format!("{holder} holds it now"));
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
                    return step_down(format!("not renewed for {RENEW_DEADLINE:?}: {error}"));
                }
            }
        }
        // The next attempt never starts past the renew deadline.
        let pause = match last_renewal {
            Some(at) => RETRY_PERIOD.min(RENEW_DEADLINE.saturating_sub(at.elapsed())),
            None => RETRY_PERIOD,
        };
        tokio::time::sleep(pause).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_lease_unchanged_for_its_duration_get_follow_get_then_replace_with_its_version_and_lead()
     {
        let (lock, handle) = lock("manager-a");
        // Its renewTime says it expired long ago by our clock: that alone
        // is no reason, the other replica's clock is not ours.
        let stale = held_by("manager-b", 600);
        let server = serve(
            handle,
            vec![
                (Method::GET, LEASE, Reply::With(200, stale.clone())),
                (Method::GET, LEASE, Reply::With(200, stale.clone())),
                (Method::GET, LEASE, Reply::With(200, stale)),
                (Method::PUT, LEASE, Reply::Echo(None)),
            ],
        );
        assert!(
            matches!(attempt(&lock).await.unwrap(), Attempt::Following { .. }),
            "first seen now: not expired"
        );
        tokio::time::advance(LEASE_DURATION).await;
        assert!(
            matches!(attempt(&lock).await.unwrap(), Attempt::Following { .. }),
            "unchanged for exactly the lease duration: not yet"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(attempt(&lock).await.unwrap(), Attempt::Leading);
        let (_, bodies) = finish(server).await;
        assert_eq!(
            bodies[3]["metadata"]["resourceVersion"], "41",
            "optimistic concurrency"
        );
        assert_eq!(bodies[3]["spec"]["holderIdentity"], "manager-a");
        assert_eq!(bodies[3]["spec"]["leaseTransitions"], 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_changes_is_never_taken_over_get_follow_again() {
        let (lock, handle) = lock("manager-a");
        let mut renewed = held_by("manager-b", 600);
        let server = serve(
            handle,
            vec![
                (Method::GET, LEASE, Reply::With(200, renewed.clone())),
                (Method::GET, LEASE, {
                    renewed["metadata"]["resourceVersion"] = json!("42");
                    Reply::With(200, renewed.clone())
                }),
                (Method::GET, LEASE, Reply::With(200, renewed)),
            ],
        );
        assert!(matches!(
            attempt(&lock).await.unwrap(),
            Attempt::Following { .. }
        ));
        tokio::time::advance(LEASE_DURATION).await;
        // Renewed meanwhile (whatever its clock wrote): counted from now.
        assert!(matches!(
            attempt(&lock).await.unwrap(),
            Attempt::Following { .. }
        ));
        tokio::time::advance(LEASE_DURATION - Duration::from_secs(1)).await;
        assert!(matches!(
            attempt(&lock).await.unwrap(),
            Attempt::Following { .. }
        ));
        finish(server).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_takeover_race_lost_get_follow_get_then_conflict_and_follow() {
        let (lock, handle) = lock("manager-a");
        let server = serve(
            handle,
            vec![
                (
                    Method::GET,
                    LEASE,
                    Reply::With(200, held_by("manager-b", 60)),
                ),
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
        tokio::time::advance(LEASE_DURATION + Duration::from_secs(1)).await;
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

    /// One Lease in a store shared by the replicas' mocked API servers.
    #[derive(Default)]
    struct Store {
        lease: Option<Value>,
        version: u64,
        last_write: Option<tokio::time::Instant>,
    }

    /// Serves GET, POST and PUT of the Lease from `store` (with
    /// resourceVersion checks), until `hang`: then requests are read and
    /// never answered, as by an API server that stopped responding.
    fn serve_store(
        mut handle: mock_api::ApiHandle,
        store: Arc<std::sync::Mutex<Store>>,
        hang: Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut unanswered = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                if hang.load(std::sync::atomic::Ordering::SeqCst) {
                    unanswered.push(send);
                    continue;
                }
                let method = request.method().clone();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let status_body = |code: u16, reason: &str| json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code });
                let (status, answer) = {
                    let mut st = store.lock().unwrap();
                    let current = st
                        .lease
                        .as_ref()
                        .map(|l| l["metadata"]["resourceVersion"].clone());
                    if method == Method::GET {
                        match &st.lease {
                            Some(l) => (200, l.clone()),
                            None => (404, status_body(404, "NotFound")),
                        }
                    } else if (method == Method::POST && current.is_some())
                        || (method == Method::PUT
                            && current != Some(body["metadata"]["resourceVersion"].clone()))
                    {
                        (409, status_body(409, "Conflict"))
                    } else {
                        st.version += 1;
                        let mut lease = body;
                        lease["metadata"]["resourceVersion"] = json!(st.version.to_string());
                        st.lease = Some(lease.clone());
                        st.last_write = Some(tokio::time::Instant::now());
                        (200, lease)
                    }
                };
                send.send_response(
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(
                            serde_json::to_vec(&answer).unwrap(),
                        ))
                        .unwrap(),
                );
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_hung_api_server_the_old_leader_steps_down_before_a_standby_takes_over() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let store = Arc::new(std::sync::Mutex::new(Store::default()));
        let hang_a = Arc::new(AtomicBool::new(false));
        let replica = |identity: &str, hang: Arc<AtomicBool>, clock: Clock| {
            let (client, handle) = mock_api::client();
            let api = serve_store(handle, store.clone(), hang);
            let lock = LeaseLock::new(
                Api::namespaced(client, "cluster-tunnel"),
                "cluster-tunnel-manager",
                identity,
                clock,
            );
            (lock, api)
        };
        let (lock_a, _api_a) = replica("manager-a", hang_a.clone(), Arc::new(now));
        // The standby's wall clock is an hour ahead: judged by renewTime, the
        // leader's Lease would look expired from the start.
        let (lock_b, _api_b) = replica(
            "manager-b",
            Arc::new(AtomicBool::new(false)),
            Arc::new(|| now() + time::Duration::hours(1)),
        );
        let (tx_a, mut rx_a) = watch::channel(false);
        let (tx_b, mut rx_b) = watch::channel(false);
        let a = tokio::spawn(async move {
            let lost = lead(&lock_a, &tx_a).await;
            (lost, tokio::time::Instant::now())
        });
        tokio::time::timeout(Duration::from_secs(30), rx_a.wait_for(|l| *l))
            .await
            .expect("manager-a leads")
            .unwrap();
        let b = tokio::spawn(async move { lead(&lock_b, &tx_b).await });
        tokio::time::sleep(LEASE_DURATION * 2).await;
        assert!(*rx_a.borrow(), "manager-a still leads while it renews");
        assert!(
            !*rx_b.borrow(),
            "manager-b follows while the Lease changes, whatever its clock says"
        );

        // manager-a's API server stops answering (mid-renewal, or before the next).
        hang_a.store(true, Ordering::SeqCst);
        let b_took_over = tokio::time::timeout(Duration::from_secs(120), rx_b.wait_for(|l| *l))
            .await
            .expect("manager-b takes over in the end")
            .map(|_| tokio::time::Instant::now())
            .unwrap();
        assert!(
            a.is_finished(),
            "manager-a must have stepped down before manager-b leads"
        );
        let (lost, a_stepped_down) = a.await.unwrap();
        assert!(lost.to_string().contains("not renewed"), "{lost}");
        assert!(!*rx_a.borrow(), "manager-a no longer leads");
        // manager-a's last write is the one before manager-b's takeover.
        let store = store.lock().unwrap();
        let holder = store.lease.as_ref().unwrap()["spec"]["holderIdentity"].clone();
        assert_eq!(holder, "manager-b");
        drop(store);
        println!(
            "manager-a stepped down {:?} before manager-b took over",
            b_took_over - a_stepped_down
        );
        assert!(
            b_took_over - a_stepped_down >= LEASE_DURATION - RENEW_DEADLINE - RETRY_PERIOD,
            "a margin of at least the lease duration minus the renew deadline (less one retry period)"
        );
        b.abort();
    }
}
