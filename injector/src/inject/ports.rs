//! Port conflicts: every port the sidecar listens on must be free of the
//! pod's other containers (declared, or reserved by a mesh's proxy), when
//! the sidecar is added and again when the pod comes back with it.

use k8s_openapi::api::core::v1::{Container, PodSpec};

use tunnel_api::annotations;
use tunnel_api::pod::SIDECAR_CONTAINER;

use super::Refusal;
use crate::annotations::{ADMIN_PORT_FLAG, ListeningPort};
use crate::mesh;

/// Refuses the pod when a port the sidecar listens on is held by another
/// of its containers (declared, or reserved by a mesh's proxy).
pub(super) fn check_ports(
    listening: &[ListeningPort],
    spec: &PodSpec,
    when: &str,
) -> Result<(), Refusal> {
    let held = mesh::held_ports(spec, SIDECAR_CONTAINER);
    for &ListeningPort { port, chosen_by } in listening {
        if let Some(h) = held.iter().find(|h| h.port == port) {
            let change = if chosen_by == annotations::PORTS || chosen_by == annotations::PROXY_PORT
            {
                format!("choose another with {chosen_by}")
            } else {
                format!("the injector's {chosen_by} must change")
            };
            return Err(Refusal::Conflict(format!(
                "port {port}, which the cluster-tunnel sidecar listens on ({chosen_by}), is held by {} that {when}; {change}",
                h.holder
            )));
        }
    }
    Ok(())
}

/// The ports an injected sidecar listens on, read back from its
/// environment (its defaults where a variable is absent).
pub(super) fn injected_ports(sidecar: &Container) -> Vec<ListeningPort> {
    use tunnel_api::sidecar::{DEFAULT_ADMIN_PORT, DEFAULT_PROXY_PORT, PortMapping};
    let var = |name: &str| {
        sidecar
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    };
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
    };
    let mut out = Vec::new();
    match var("TUNNEL_ADMIN_LISTEN").map(port_of) {
        Some(Some(p)) => out.push(ListeningPort::new(p, ADMIN_PORT_FLAG)),
        Some(None) => {}
        None => out.push(ListeningPort::new(DEFAULT_ADMIN_PORT, ADMIN_PORT_FLAG)),
    }
    match var("TUNNEL_PROXY_LISTEN") {
        Some("off") => {}
        Some(addr) => {
            out.extend(port_of(addr).map(|p| ListeningPort::new(p, annotations::PROXY_PORT)))
        }
        None => out.push(ListeningPort::new(
            DEFAULT_PROXY_PORT,
            annotations::PROXY_PORT,
        )),
    }
    for spec in var("TUNNEL_PORTS").unwrap_or("").split(',') {
        if let Ok(m) = spec.trim().parse::<PortMapping>() {
            out.push(ListeningPort::new(m.port, annotations::PORTS));
        }
    }
    out
}
