//! The `TunnelConfiguration`'s status, written by one board: several loops
//! (the server certificate, the hub's objects) report their condition here
//! and the board applies the whole condition list with `Ready` derived from
//! the others. One writer matters: the list is atomic for server-side
//! apply, so two writers would each drop the other's conditions.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource as _, ResourceExt as _};
use tokio::sync::Mutex;

use crate::metrics::ManagerMetrics;
use crate::signer::FIELD_MANAGER;
use tunnel_api::configuration::{TunnelConfiguration, TunnelConfigurationStatus};

/// The conditions a configuration gets, and where they are written.
pub struct StatusBoard {
    api: Api<TunnelConfiguration>,
    metrics: ManagerMetrics,
    required: Vec<&'static str>,
    last: Mutex<Option<TunnelConfigurationStatus>>,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl StatusBoard {
    /// A board for configurations in `api`; `Ready` is true when every
    /// condition in `required` is.
    pub fn new(
        api: Api<TunnelConfiguration>,
        required: Vec<&'static str>,
        metrics: ManagerMetrics,
    ) -> Self {
        Self {
            api,
            metrics,
            required,
            last: Mutex::new(None),
        }
    }

    /// Sets one condition of `config` and writes the status. A failed write
    /// is logged; the next report writes everything again.
    pub async fn set(
        &self,
        config: &TunnelConfiguration,
        type_: &str,
        ok: bool,
        reason: &str,
        message: String,
    ) {
        let mut last = self.last.lock().await;
        let mut status = last
            .take()
            .or_else(|| config.status.clone())
            .unwrap_or_default();
        let generation = config.metadata.generation;
        let now = now_rfc3339();
        status.set(type_, ok, reason, message, generation, &now);
        self.metrics.condition(type_, ok);
        let not_ready: Vec<&str> = self
            .required
            .iter()
            .copied()
            .filter(|t| {
                !status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == *t && c.status == "True")
            })
            .collect();
        let ready = not_ready.is_empty();
        let message = if ready {
            String::new()
        } else {
            format!("not yet: {}", not_ready.join(", "))
        };
        status.set(
            "Ready",
            ready,
            if ready { "Ready" } else { "NotReady" },
            message,
            generation,
            &now,
        );
        self.metrics.condition("Ready", ready);
        let body = serde_json::json!({
            "apiVersion": TunnelConfiguration::api_version(&()),
            "kind": TunnelConfiguration::kind(&()),
            "status": status,
        });
        if let Err(error) = self
            .api
            .patch_status(
                &config.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
        {
            tracing::warn!(%error, "cannot update the TunnelConfiguration status");
        }
        *last = Some(status);
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
