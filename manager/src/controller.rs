//! The scaffold every controller of the manager runs on: the resync and
//! retry delays, the error policy, and the run loop that stops on shutdown
//! and counts each reconciliation in the metrics.
//!
//! A controller module keeps what is its own: its `Context` (which
//! implements [`ControllerContext`]), its error type, its `reconcile`, and
//! the [`Controller`] it builds (what it watches). It hands the latter three
//! to [`run`]:
//!
//! ```ignore
//! let controller = Controller::new(api, watcher::Config::default());
//! controller::run(controller, reconcile, ctx, shutdown).await;
//! ```

use std::fmt::{Debug, Display};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt as _, TryFuture};
use kube::Resource;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::metrics::ManagerMetrics;

/// Periodic re-check of an object even when nothing was seen to change
/// (drift, renewals, the live view).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Delay before a failed reconciliation is retried.
pub const RETRY_DELAY: Duration = Duration::from_secs(15);

/// The clock (tests set it).
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// What the scaffold needs from a controller's context.
pub trait ControllerContext: Send + Sync + 'static {
    /// The controller's name: the `controller` label of its metrics and
    /// the `controller` field of its logs.
    const NAME: &'static str;
    /// Where reconciliations are counted.
    fn metrics(&self) -> &ManagerMetrics;
}

/// Logs a failed reconciliation and retries after [`RETRY_DELAY`].
pub fn error_policy<K, E, C>(object: Arc<K>, error: &E, _ctx: Arc<C>) -> Action
where
    K: Resource,
    K::DynamicType: Default,
    E: Display,
    C: ControllerContext,
{
    let object = ObjectRef::from_obj(&*object);
    tracing::warn!(controller = C::NAME, %object, %error, "reconciliation failed; retrying");
    Action::requeue(RETRY_DELAY)
}

/// Runs `controller` until `shutdown`: each object through `reconcile`,
/// failures through [`error_policy`], every result counted under
/// [`ControllerContext::NAME`].
pub async fn run<K, C, F, Fut>(
    controller: Controller<K>,
    reconcile: F,
    ctx: Arc<C>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    K: Clone + Resource + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Debug + Unpin,
    C: ControllerContext,
    F: FnMut(Arc<K>, Arc<C>) -> Fut,
    Fut: TryFuture<Ok = Action> + Send + 'static,
    Fut::Error: std::error::Error + Send + 'static,
{
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy::<K, Fut::Error, C>, ctx.clone())
        .for_each(|result| {
            ctx.metrics().observe(C::NAME, &result);
            std::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::ObjectMeta;

    use super::*;

    struct Ctx(ManagerMetrics);

    impl ControllerContext for Ctx {
        const NAME: &'static str = "test";
        fn metrics(&self) -> &ManagerMetrics {
            &self.0
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("the API server is away")]
    struct Away;

    #[test]
    fn a_failed_reconciliation_is_retried_after_the_retry_delay() {
        let ctx = Arc::new(Ctx(ManagerMetrics::default()));
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some("team-a".into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        assert_eq!(
            error_policy(Arc::new(ns), &Away, ctx),
            Action::requeue(Duration::from_secs(15))
        );
    }
}
