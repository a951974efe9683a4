//! `ManagedClusterAddOn` (`addon.open-cluster-management.io/v1alpha1`)
//! conditions, so that `kubectl get managedclusteraddon -A` shows each
//! cluster's state. They come from the server's live view (`ListClusters`:
//! the agents connected now), never from a guess:
//!
//! | agents connected | Available | Degraded | Progressing |
//! | --- | --- | --- | --- |
//! | all `replicas` | True | False | False |
//! | some | True | True (`AgentsMissing`) | False |
//! | none, work younger than [`PROGRESS_DEADLINE`] | False | False | True |
//! | none, older | False | True (`NoAgentConnected`) | False |
//! | server unreachable | Unknown | Unknown | False |

use kube::discovery::ApiResource;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};

/// Name of the addon (and of its `ManagedClusterAddOn` in each cluster's namespace).
pub const ADDON_NAME: &str = "cluster-tunnel";
/// Time agents get to connect after their work was created before the addon is Degraded.
pub const PROGRESS_DEADLINE: Duration = Duration::minutes(5);

/// `ManagedClusterAddOn`, for kube's dynamic API.
pub fn addon_resource() -> ApiResource {
    ApiResource {
        group: "addon.open-cluster-management.io".into(),
        version: "v1alpha1".into(),
        api_version: "addon.open-cluster-management.io/v1alpha1".into(),
        kind: "ManagedClusterAddOn".into(),
        plural: "managedclusteraddons".into(),
    }
}

/// One condition: type, status, reason, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddonCondition {
    /// `Available`, `Degraded` or `Progressing`.
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Details.
    pub message: String,
}

/// The conditions for a cluster whose server lists `agents` connected agents
/// (`None`: the server could not be asked), `replicas` wanted, whose work was
/// created at `work_created`.
pub fn conditions(
    agents: Option<usize>,
    replicas: i32,
    work_created: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Vec<AddonCondition> {
    let c = |type_, status, reason, message: String| AddonCondition {
        type_,
        status,
        reason,
        message,
    };
    let want = usize::try_from(replicas.max(1)).unwrap_or(1);
    let Some(n) = agents else {
        let msg = "the proxy server cannot be asked which agents are connected".to_string();
        return vec![
            c("Available", "Unknown", "ServerUnreachable", msg.clone()),
            c("Degraded", "Unknown", "ServerUnreachable", msg),
            c(
                "Progressing",
                "False",
                "Delivered",
                "the agent's ManifestWork is applied".into(),
            ),
        ];
    };
    let young = work_created.is_some_and(|t| now - t < PROGRESS_DEADLINE);
    let of = format!("{n} of {want} agents connected to the proxy server");
    if n >= want {
        vec![
            c("Available", "True", "AgentsConnected", of.clone()),
            c("Degraded", "False", "AgentsConnected", of),
            c(
                "Progressing",
                "False",
                "Delivered",
                "all agents are connected".into(),
            ),
        ]
    } else if n > 0 {
        vec![
            c("Available", "True", "AgentsConnected", of.clone()),
            c("Degraded", "True", "AgentsMissing", of),
            c(
                "Progressing",
                "False",
                "Delivered",
                "the agent's ManifestWork is applied".into(),
            ),
        ]
    } else if young {
        vec![
            c("Available", "False", "NoAgentConnected", of.clone()),
            c("Degraded", "False", "WaitingForAgents", of),
            c(
                "Progressing",
                "True",
                "WaitingForAgents",
                "the agents are starting".into(),
            ),
        ]
    } else {
        vec![
            c("Available", "False", "NoAgentConnected", of.clone()),
            c("Degraded", "True", "NoAgentConnected", of),
            c(
                "Progressing",
                "False",
                "Delivered",
                "the agent's ManifestWork is applied".into(),
            ),
        ]
    }
}

/// The status to apply: `conditions`, each keeping the `lastTransitionTime`
/// of `previous` (the current status' conditions) when its status did not change.
pub fn status_body(
    cluster: &str,
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
        "status": { "conditions": conditions },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(c: &[AddonCondition]) -> Vec<(&str, &str)> {
        c.iter().map(|c| (c.type_, c.status)).collect()
    }

    #[test]
    fn conditions_follow_the_connected_agents() {
        let now = OffsetDateTime::now_utc();
        let old = Some(now - Duration::hours(1));
        let new = Some(now - Duration::seconds(10));
        assert_eq!(
            statuses(&conditions(Some(2), 2, old, now)),
            [
                ("Available", "True"),
                ("Degraded", "False"),
                ("Progressing", "False")
            ]
        );
        assert_eq!(
            statuses(&conditions(Some(1), 2, old, now)),
            [
                ("Available", "True"),
                ("Degraded", "True"),
                ("Progressing", "False")
            ]
        );
        assert_eq!(
            statuses(&conditions(Some(0), 2, new, now)),
            [
                ("Available", "False"),
                ("Degraded", "False"),
                ("Progressing", "True")
            ]
        );
        assert_eq!(
            statuses(&conditions(Some(0), 2, old, now)),
            [
                ("Available", "False"),
                ("Degraded", "True"),
                ("Progressing", "False")
            ]
        );
        assert_eq!(
            statuses(&conditions(None, 2, old, now))[..2],
            [("Available", "Unknown"), ("Degraded", "Unknown")]
        );
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time() {
        let now = OffsetDateTime::now_utc();
        let previous = vec![
            json!({ "type": "Available", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z" }),
            json!({ "type": "Degraded", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z" }),
        ];
        let body = status_body("east", &conditions(Some(2), 2, None, now), &previous, now);
        let c = &body["status"]["conditions"];
        assert_eq!(c[0]["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert_ne!(c[1]["lastTransitionTime"], "2020-01-01T00:00:00Z");
    }
}
