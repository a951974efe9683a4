//! A standalone policy file (`--policy-file`): read and compiled at start,
//! then watched for changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Policy, PolicyError, parse_policy_text};

/// Reads and compiles a policy file; its rules are named `<file name>/<rule>`.
pub fn load_policy_file(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    parse_policy_text(&file_source_name(path), &text)
}

fn file_source_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Result of one reload, for the metric.
pub type ReloadResult = Result<(), PolicyError>;

/// Watches a policy file: every `interval` its contents are compared with
/// what was last loaded; a change is compiled and published on `tx`. A file
/// that fails to read, parse or compile is logged with the field at fault,
/// and the policy in force stays. Runs until `tx` has no receivers left.
pub async fn watch_policy_file(
    path: PathBuf,
    interval: Duration,
    tx: watch::Sender<Arc<Policy>>,
    on_reload: impl Fn(&ReloadResult) + Send + 'static,
) {
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tx.is_closed() {
            return;
        }
        let now = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(err) => {
                if last.is_some() {
                    tracing::error!(path = %path.display(), %err, "cannot read policy file; the previous policy stays in force");
                    on_reload(&Err(PolicyError::Read {
                        path: path.clone(),
                        reason: err.to_string(),
                    }));
                    last = None;
                }
                continue;
            }
        };
        if last.as_deref() == Some(&now[..]) {
            continue;
        }
        last = Some(now.clone());
        let result = String::from_utf8(now)
            .map_err(|_| PolicyError::Parse {
                source_name: file_source_name(&path),
                reason: "not UTF-8 text".into(),
            })
            .and_then(|text| parse_policy_text(&file_source_name(&path), &text));
        match result {
            Ok(policy) => {
                tracing::info!(path = %path.display(), rules = policy.len(), "policy reloaded");
                tx.send_replace(Arc::new(policy));
                on_reload(&Ok(()));
            }
            Err(err) => {
                tracing::error!(path = %path.display(), %err, "policy file rejected; the previous policy stays in force");
                on_reload(&Err(err));
            }
        }
    }
}
