//! The live configuration: sidecar defaults from the `TunnelConfiguration`
//! (`spec.sidecar`), followed as it changes, so that the hub's one
//! configuration resource also says what an injected sidecar looks like by
//! default, and a change applies to the next pod without restarting the
//! injector.
//!
//! The flags stay the fallback: a field the configuration leaves out (or
//! the whole configuration, when it is absent or deleted) keeps the flag's
//! value; a field with an unusable value is ignored with a warning, so one
//! typo never stops injection. Annotations on a pod still override both.

use std::sync::Arc;

use futures_util::StreamExt as _;
use kube::api::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_api::configuration::{SidecarDefaults, TunnelConfiguration};

use crate::annotations::parse_quantity;
use crate::inject::SidecarTemplate;

/// `base` (from the flags) with `spec.sidecar` of a configuration laid over
/// it, and what was ignored and why.
pub fn overlay(
    base: &SidecarTemplate,
    sidecar: &SidecarDefaults,
) -> (SidecarTemplate, Vec<String>) {
    let mut t = base.clone();
    let mut ignored = Vec::new();
    if let Some(v) = &sidecar.image {
        match v.trim() {
            image if !image.is_empty() && !image.contains(char::is_whitespace) => {
                t.image = image.to_owned();
            }
            _ => ignored.push(format!("image {v:?}: not an image reference")),
        }
    }
    match sidecar.proxy_port {
        // 0: no HTTP proxy (the chart's "off").
        Some(0) => t.defaults.proxy_port = None,
        Some(port) => t.defaults.proxy_port = Some(port),
        None => {}
    }
    if let Some(v) = &sidecar.log_level {
        match v.trim() {
            "" => ignored.push(format!("logLevel {v:?}: not a log filter")),
            level => t.defaults.log_level = level.to_owned(),
        }
    }
    for (name, value, slot) in [
        (
            "cpuRequest",
            &sidecar.cpu_request,
            &mut t.defaults.resources.cpu_request,
        ),
        (
            "memoryRequest",
            &sidecar.memory_request,
            &mut t.defaults.resources.memory_request,
        ),
    ] {
        let Some(q) = value else { continue };
        match parse_quantity(q) {
            Ok(_) => *slot = Some(q.clone()),
            Err(e) => ignored.push(format!("{name} {q:?}: {e}")),
        }
    }
    (t, ignored)
}

/// Follows the configuration `name` and publishes the template to use:
/// `base` overlaid with its `spec.sidecar`, or `base` while it is absent.
/// Runs until `stop` is cancelled.
pub async fn follow(
    client: kube::Client,
    name: String,
    base: SidecarTemplate,
    templates: watch::Sender<Arc<SidecarTemplate>>,
    stop: CancellationToken,
) {
    tokio::select! {
        () = follow_events(client, &name, &base, &templates) => {}
        () = stop.cancelled() => {}
    }
}

async fn follow_events(
    client: kube::Client,
    name: &str,
    base: &SidecarTemplate,
    templates: &watch::Sender<Arc<SidecarTemplate>>,
) {
    let api: Api<TunnelConfiguration> = Api::all(client);
    let mut events = std::pin::pin!(kube::runtime::watcher::watch_object(api, name));
    let mut last_ignored = Vec::new();
    while let Some(event) = events.next().await {
        let template = match event {
            Ok(Some(config)) => {
                let (t, ignored) = overlay(base, &config.spec.sidecar);
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
    use super::*;
    use crate::inject::tests::template;

    #[test]
    fn the_configuration_s_sidecar_defaults_win_over_the_flags() {
        let base = template();
        let (t, ignored) = overlay(
            &base,
            &SidecarDefaults {
                image: Some("registry.example/tunnel-sidecar:9".into()),
                proxy_port: Some(18080),
                log_level: Some("debug".into()),
                cpu_request: Some("50m".into()),
                memory_request: Some("64Mi".into()),
            },
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
        let only_port = SidecarDefaults {
            proxy_port: Some(0),
            ..SidecarDefaults::default()
        };
        let (t, ignored) = overlay(&base, &only_port);
        assert!(ignored.is_empty());
        assert_eq!(t.defaults.proxy_port, None);
        assert_eq!(t.image, base.image);
        let (t, _) = overlay(&base, &SidecarDefaults::default());
        assert_eq!(t.defaults, base.defaults, "no sidecar section: the flags");
    }

    #[test]
    fn unusable_values_are_ignored_each_with_a_reason_and_the_rest_applies() {
        // A port out of range never gets here: the CRD's schema refuses it
        // and the type cannot hold it.
        let base = template();
        let (t, ignored) = overlay(
            &base,
            &SidecarDefaults {
                image: Some("two words".into()),
                cpu_request: Some("lots".into()),
                log_level: Some("warn".into()),
                ..SidecarDefaults::default()
            },
        );
        assert_eq!(t.image, base.image);
        assert_eq!(
            t.defaults.resources.cpu_request,
            base.defaults.resources.cpu_request
        );
        assert_eq!(t.defaults.log_level, "warn", "the good field applies");
        assert_eq!(ignored.len(), 2, "{ignored:?}");
        assert!(
            ignored.iter().any(|w| w.starts_with("image \"two words\"")),
            "{ignored:?}"
        );
        assert!(
            ignored.iter().any(|w| w.starts_with("cpuRequest \"lots\"")),
            "{ignored:?}"
        );
    }

    #[test]
    fn a_configuration_with_a_sidecar_section_reads_as_the_chart_writes_it() {
        let config: TunnelConfiguration = serde_json::from_value(serde_json::json!({
            "apiVersion": "cluster-tunnel.io/v1alpha1",
            "kind": "TunnelConfiguration",
            "metadata": { "name": "cluster-tunnel" },
            "spec": {
                "server": { "image": "s:1", "entrypoint": { "type": "Hostname", "hostname": { "value": "hub.example.com" } } },
                "agent": { "image": "a:1" },
                "sidecar": { "proxyPort": 0, "cpuRequest": "20m" },
            },
        }))
        .unwrap();
        let (t, ignored) = overlay(&template(), &config.spec.sidecar);
        assert!(ignored.is_empty(), "{ignored:?}");
        assert_eq!(t.defaults.proxy_port, None);
        assert_eq!(t.defaults.resources.cpu_request.as_deref(), Some("20m"));
    }
}
