//! What the manager writes into a `ManagedClusterAddOn`'s status, so that
//! `kubectl get managedclusteraddon -A` shows each cluster's state and OCM's
//! agents know how to register and watch the addon:
//!
//! - `registrations`: the signer [`SIGNER_NAME`] and the agent's user, so
//!   that OCM's registration agent makes the agent's key in the managed
//!   cluster and sends a certificate request (see [`crate::csr`]);
//! - `namespace`: the install namespace (the registration Secret and the
//!   health Lease live there);
//! - `healthCheck.mode: Lease`: OCM's registration agent sets `Available`
//!   from the Lease the agent renews while it holds a tunnel to a server.
//!   The manager never writes `Available` (two writers made it flap), nor
//!   `Progressing`, which OCM's addon manager derives from the work;
//! - `ManifestApplied`: whether the agent's work is delivered;
//! - `Degraded`, from the servers' live view (`ListClusters`):
//!
//! | agents connected | Degraded |
//! | --- | --- |
//! | all `replicas` | False (`AgentsConnected`) |
//! | some | True (`AgentsMissing`) |
//! | none, work younger than [`PROGRESS_DEADLINE`] | False (`WaitingForAgents`) |
//! | none, older | True (`NoAgentConnected`) |
//! | server unreachable | Unknown (`ServerUnreachable`) |
//!
//! Conditions form a map keyed by type, so server-side apply merges them:
//! the manager's field manager owns only the types it writes.

use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

use tunnel_api::ocm::{ADDON_NAME, SIGNER_NAME, agent_user};

/// Time agents get to connect after their work was created before the addon is Degraded.
pub const PROGRESS_DEADLINE: Duration = Duration::minutes(5);

/// One condition: type, status, reason, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddonCondition {
    /// `Degraded` or `ManifestApplied`.
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Details.
    pub message: String,
}

fn c(
    type_: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
) -> AddonCondition {
    AddonCondition {
        type_,
        status,
        reason,
        message,
    }
}

/// `Degraded` for a cluster whose servers list `agents` connected agents
/// (`None`: the servers could not be asked), `replicas` wanted, whose work
/// was created at `work_created`.
pub fn degraded(
    agents: Option<usize>,
    replicas: i32,
    work_created: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> AddonCondition {
    let want = usize::try_from(replicas.max(1)).unwrap_or(1);
    let Some(n) = agents else {
        return c(
            "Degraded",
            "Unknown",
            "ServerUnreachable",
            "the proxy server cannot be asked which agents are connected".into(),
        );
    };
    let young = work_created.is_some_and(|t| now - t < PROGRESS_DEADLINE);
    let of = format!("{n} of {want} agents connected to the proxy server");
    if n >= want {
        c("Degraded", "False", "AgentsConnected", of)
    } else if n > 0 {
        c("Degraded", "True", "AgentsMissing", of)
    } else if young {
        c("Degraded", "False", "WaitingForAgents", of)
    } else {
        c("Degraded", "True", "NoAgentConnected", of)
    }
}

/// `ManifestApplied`: the work is delivered, or why not.
pub fn manifest_applied(result: Result<(), (&'static str, String)>) -> AddonCondition {
    match result {
        Ok(()) => c(
            "ManifestApplied",
            "True",
            "AddonManifestApplied",
            "the agent's ManifestWork is applied".into(),
        ),
        Err((reason, message)) => c("ManifestApplied", "False", reason, message),
    }
}

/// The status to apply for the addon in `cluster`: registration, install
/// namespace, health check mode and `conds`, each keeping the
/// `lastTransitionTime` of `previous` (the current conditions) when its
/// status did not change.
pub fn status_body(
    cluster: &str,
    install_namespace: &str,
    conds: &[AddonCondition],
    previous: &[Value],
    now: OffsetDateTime,
) -> Value {
    let stamp = now
        .replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let conditions: Vec<Value> = conds
        .iter()
        .map(|c| {
            let since = previous
                .iter()
                .find(|p| p["type"] == c.type_ && p["status"] == c.status)
                .and_then(|p| p["lastTransitionTime"].as_str().map(str::to_owned))
                .unwrap_or_else(|| stamp.clone());
            json!({
                "type": c.type_,
                "status": c.status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": since,
            })
        })
        .collect();
    json!({
        "apiVersion": "addon.open-cluster-management.io/v1alpha1",
        "kind": "ManagedClusterAddOn",
        "metadata": { "name": ADDON_NAME, "namespace": cluster },
        "status": {
            "namespace": install_namespace,
            "healthCheck": { "mode": "Lease" },
            "registrations": [{ "signerName": SIGNER_NAME, "subject": { "user": agent_user(cluster) } }],
            "conditions": conditions,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degraded_follows_the_connected_agents() {
        let now = OffsetDateTime::now_utc();
        let old = Some(now - Duration::hours(1));
        let new = Some(now - Duration::seconds(10));
        let s = |c: AddonCondition| (c.status, c.reason);
        assert_eq!(
            s(degraded(Some(2), 2, old, now)),
            ("False", "AgentsConnected")
        );
        assert_eq!(s(degraded(Some(1), 2, old, now)), ("True", "AgentsMissing"));
        assert_eq!(
            s(degraded(Some(0), 2, new, now)),
            ("False", "WaitingForAgents")
        );
        assert_eq!(
            s(degraded(Some(0), 2, old, now)),
            ("True", "NoAgentConnected")
        );
        assert_eq!(
            s(degraded(None, 2, old, now)),
            ("Unknown", "ServerUnreachable")
        );
    }

    #[test]
    fn the_status_registers_the_agent_with_our_signer_and_leaves_available_to_the_lease() {
        let now = OffsetDateTime::now_utc();
        let previous = vec![
            json!({ "type": "ManifestApplied", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z" }),
            json!({ "type": "Degraded", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z" }),
        ];
        let conds = [manifest_applied(Ok(())), degraded(Some(2), 2, None, now)];
        let body = status_body("east", "cluster-tunnel-agent", &conds, &previous, now);
        let st = &body["status"];
        assert_eq!(
            st["registrations"][0]["signerName"],
            "cluster-tunnel.io/agent"
        );
        assert_eq!(
            st["registrations"][0]["subject"],
            json!({ "user": "system:open-cluster-management:cluster:east:addon:cluster-tunnel:agent:tunnel-agent" })
        );
        assert_eq!(st["namespace"], "cluster-tunnel-agent");
        assert_eq!(st["healthCheck"]["mode"], "Lease");
        let types: Vec<&str> = st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["ManifestApplied", "Degraded"]);
        // An unchanged condition keeps its transition time, a changed one gets now.
        assert_eq!(
            st["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_ne!(
            st["conditions"][1]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
    }
}
