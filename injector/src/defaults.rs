//! Sidecar defaults from the `TunnelConfiguration` (`spec.sidecar`), so
//! that the hub's one configuration resource also says what an injected
//! sidecar looks like by default, and a change applies to the next pod
//! without restarting the injector.
//!
//! The flags stay the fallback: a field the configuration leaves out (or
//! the whole configuration, when it is absent or deleted) keeps the flag's
//! value; a field with an unusable value is ignored with a warning, so one
//! typo never stops injection. Annotations on a pod still override both.

use std::sync::Arc;

use futures_util::StreamExt as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;
use tokio::sync::watch;

use crate::annotations::parse_quantity;
use crate::inject::SidecarTemplate;

/// The `TunnelConfiguration` resource (`cluster-tunnel.io/v1alpha1`, cluster-scoped).
pub fn configuration_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cluster-tunnel.io", "v1alpha1", "TunnelConfiguration"),
        "tunnelconfigurations",
    )
}

/// `base` (from the flags) with `spec.sidecar` of a configuration laid over
/// it, and what was ignored and why.
pub fn overlay(base: &SidecarTemplate, sidecar: &Value) -> (SidecarTemplate, Vec<String>) {
    let mut t = base.clone();
    let mut ignored = Vec::new();
    let field = |name: &str| sidecar.get(name).filter(|v| !v.is_null());
    if let Some(v) = field("image") {
        match v.as_str().map(str::trim) {
            Some(image) if !image.is_empty() && !image.contains(char::is_whitespace) => {
                t.image = image.to_owned();
            }
            _ => ignored.push(format!("image {v}: not an image reference")),
        }
    }
    if let Some(v) = field("proxyPort") {
        match v.as_u64().map(u16::try_from) {
            // 0: no HTTP proxy (the chart's "off").
            Some(Ok(0)) => t.defaults.proxy_port = None,
            Some(Ok(port)) => t.defaults.proxy_port = Some(port),
            _ => ignored.push(format!(
                "proxyPort {v}: not a port (1-65535, or 0 for none)"
            )),
        }
    }
    if let Some(v) = field("logLevel") {
        match v.as_str().map(str::trim) {
            Some(level) if !level.is_empty() => t.defaults.log_level = level.to_owned(),
            _ => ignored.push(format!("logLevel {v}: not a log filter")),
        }
    }
    for (name, slot) in [
        ("cpuRequest", &mut t.defaults.resources.cpu_request),
        ("memoryRequest", &mut t.defaults.resources.memory_request),
    ] {
        let Some(v) = field(name) else { continue };
        match v.as_str().map(|q| (q, parse_quantity(q))) {
            Some((q, Ok(_))) => *slot = Some(q.to_owned()),
            Some((_, Err(e))) => ignored.push(format!("{name} {v}: {e}")),
            None => ignored.push(format!("{name} {v}: not a quantity")),
        }
    }
    (t, ignored)
}

/// Follows the configuration `name` and publishes the template to use:
/// `base` overlaid with its `spec.sidecar`, or `base` while it is absent.
/// Runs until `stop` turns true.
pub async fn follow(
    client: kube::Client,
    name: String,
    base: SidecarTemplate,
    templates: watch::Sender<Arc<SidecarTemplate>>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        () = follow_events(client, &name, &base, &templates) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

async fn follow_events(
    client: kube::Client,
    name: &str,
    base: &SidecarTemplate,
    templates: &watch::Sender<Arc<SidecarTemplate>>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &configuration_resource());
    let mut events = std::pin::pin!(kube::runtime::watcher::watch_object(api, name));
    let mut last_ignored = Vec::new();
    while let Some(event) = events.next().await {
        let template = match event {
            Ok(Some(config)) => {
                let (t, ignored) = overlay(base, &config.data["spec"]["sidecar"]);
                if ignored != last_ignored {
                    for why in &ignored {
                        tracing::warn!(configuration = %name, field = %why, "ignoring a sidecar default of the TunnelConfiguration; the flag's value stays");
                    }
                    last_ignored = ignored;
                }
                t
            }
            Ok(None) => base.clone(),
            Err(error) => {
                tracing::warn!(configuration = %name, %error, "watching the TunnelConfiguration; the last sidecar defaults stay");
                continue;
            }
        };
        let changed = templates.send_if_modified(|current| {
            let differs = current.image != template.image || current.defaults != template.defaults;
            if differs {
                *current = Arc::new(template.clone());
            }
            differs
        });
        if changed {
            tracing::info!(
                configuration = %name,
                image = %template.image,
                proxy_port = ?template.defaults.proxy_port,
                log_level = %template.defaults.log_level,
                "sidecar defaults changed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::inject::tests::template;

    #[test]
    fn the_configuration_s_sidecar_defaults_win_over_the_flags() {
        let base = template();
        let (t, ignored) = overlay(
            &base,
            &json!({ "image": "registry.example/tunnel-sidecar:9", "proxyPort": 18080, "logLevel": "debug", "cpuRequest": "50m", "memoryRequest": "64Mi" }),
        );
        assert!(ignored.is_empty(), "{ignored:?}");
        assert_eq!(t.image, "registry.example/tunnel-sidecar:9");
        assert_eq!(t.defaults.proxy_port, Some(18080));
        assert_eq!(t.defaults.log_level, "debug");
        assert_eq!(t.defaults.resources.cpu_request.as_deref(), Some("50m"));
        assert_eq!(t.defaults.resources.memory_request.as_deref(), Some("64Mi"));
        // What the configuration does not say keeps the flags' values.
        assert_eq!(t.servers, base.servers);
        assert_eq!(
            t.defaults.resources.memory_limit,
            base.defaults.resources.memory_limit
        );
    }

    #[test]
    fn proxy_port_zero_turns_the_proxy_off_and_absent_fields_keep_the_flags() {
        let base = template();
        let (t, ignored) = overlay(&base, &json!({ "proxyPort": 0 }));
        assert!(ignored.is_empty());
        assert_eq!(t.defaults.proxy_port, None);
        assert_eq!(t.image, base.image);
        let (t, _) = overlay(&base, &Value::Null);
        assert_eq!(t.defaults, base.defaults, "no sidecar section: the flags");
    }

    #[test]
    fn unusable_values_are_ignored_each_with_a_reason_and_the_rest_applies() {
        let base = template();
        let (t, ignored) = overlay(
            &base,
            &json!({ "image": "two words", "proxyPort": 70000, "cpuRequest": "lots", "logLevel": "warn" }),
        );
        assert_eq!(t.image, base.image);
        assert_eq!(t.defaults.proxy_port, base.defaults.proxy_port);
        assert_eq!(
            t.defaults.resources.cpu_request,
            base.defaults.resources.cpu_request
        );
        assert_eq!(t.defaults.log_level, "warn", "the good field applies");
        assert_eq!(ignored.len(), 3, "{ignored:?}");
        assert!(
            ignored.iter().any(|w| w.starts_with("proxyPort 70000")),
            "{ignored:?}"
        );
        assert!(
            ignored.iter().any(|w| w.starts_with("cpuRequest \"lots\"")),
            "{ignored:?}"
        );
    }
}
