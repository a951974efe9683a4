//! The status condition every resource of ours reports (`metav1.Condition`'s
//! fields), and the one rule for its `lastTransitionTime`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A condition, as in `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type, in CamelCase.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Last time the status changed (RFC 3339).
    pub last_transition_time: String,
    /// Machine-readable reason, in CamelCase.
    pub reason: String,
    /// Human-readable details.
    #[serde(default)]
    pub message: String,
    /// The generation this condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The `lastTransitionTime` of condition `type_` about to be set to
/// `status`: the current one's while its status stays the same, else `now`.
pub fn transition_time<'a>(
    current: impl IntoIterator<Item = &'a Condition>,
    type_: &str,
    status: &str,
    now: &str,
) -> String {
    current
        .into_iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(status: &str, since: &str) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: status.into(),
            last_transition_time: since.into(),
            reason: "Checked".into(),
            message: String::new(),
            observed_generation: None,
        }
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let current = [ready("True", "2026-11-30T12:00:00Z")];
        let now = "2026-11-30T13:00:00Z";
        assert_eq!(
            transition_time(&current, "Ready", "True", now),
            "2026-11-30T12:00:00Z"
        );
        assert_eq!(transition_time(&current, "Ready", "False", now), now);
        assert_eq!(transition_time(&current, "Accepted", "True", now), now);
        assert_eq!(transition_time([], "Ready", "True", now), now);
    }
}
