//! Service meshes already in the pod, and every port the pod's other
//! containers hold, so that the sidecar's ports never clash with them.
//!
//! Istio's and Linkerd's injectors add containers whose proxies listen on
//! ports they rarely declare: Istio's `istio-proxy` declares only 15090 but
//! listens on 15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021 and
//! 15053 (the ports Istio's "Application Requirements" reserve); Linkerd's
//! `linkerd-proxy` declares 4143 and 4191 but also listens on 4140 and 4190
//! (the `LINKERD2_PROXY_*_LISTEN_ADDR` variables it is given). A container
//! is told to be a mesh's by its name, which both injectors fix.
//!
//! The sidecar goes after a mesh's leading containers (its init containers
//! and a proxy placed first), so that the sidecar's own connections start
//! once the mesh's traffic rules are in place; mesh containers get none of
//! the app's proxy variables (Istio's Go agent would send its own control
//! traffic through them).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Ports Istio's sidecar holds in a pod (istio.io, "Ports used by Istio").
pub const ISTIO_PORTS: [u16; 10] = [
    15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090,
];
/// Ports Linkerd's proxy holds in a pod: outbound, inbound, control, admin.
pub const LINKERD_PORTS: [u16; 4] = [4140, 4143, 4190, 4191];

/// A service mesh whose injector may have changed the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mesh {
    /// Istio (`istio-init`, `istio-validation`, `istio-proxy`).
    Istio,
    /// Linkerd (`linkerd-init`, `linkerd-network-validator`, `linkerd-proxy`).
    Linkerd,
}

impl Mesh {
    /// The mesh a container belongs to, by the name its injector gives it.
    pub fn of(container: &Container) -> Option<Mesh> {
        match container.name.as_str() {
            "istio-proxy" | "istio-init" | "istio-validation" => Some(Mesh::Istio),
            "linkerd-proxy" | "linkerd-init" | "linkerd-network-validator" => Some(Mesh::Linkerd),
            _ => None,
        }
    }

    /// Whether `container` is the mesh's proxy (the one that listens).
    pub fn is_proxy(container: &Container) -> bool {
        matches!(container.name.as_str(), "istio-proxy" | "linkerd-proxy")
    }

    /// Its name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Mesh::Istio => "Istio",
            Mesh::Linkerd => "Linkerd",
        }
    }

    /// The ports its proxy holds whether or not they are declared.
    pub fn reserved_ports(self) -> &'static [u16] {
        match self {
            Mesh::Istio => &ISTIO_PORTS,
            Mesh::Linkerd => &LINKERD_PORTS,
        }
    }
}

/// A port some other container of the pod holds, and who holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeldPort {
    /// The port.
    pub port: u16,
    /// Who holds it, for the refusal message.
    pub holder: String,
}

/// Where the sidecar goes in a container list: after the leading run of
/// mesh containers (its init containers, a proxy it placed first).
pub fn insert_index(containers: &[Container]) -> usize {
    containers
        .iter()
        .take_while(|c| Mesh::of(c).is_some())
        .count()
}

/// Every port held by the containers of `spec` other than the one named
/// `skip`: declared `containerPort`s, and for a mesh's proxy the mesh's
/// reserved ports, its probes' ports and the ports of its `*_LISTEN_ADDR`
/// variables (Linkerd's, when its ports were moved).
pub fn held_ports(spec: &PodSpec, skip: &str) -> Vec<HeldPort> {
    let mut held = BTreeSet::new();
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name != skip);
    for c in containers {
        let mesh = Mesh::of(c);
        let holder = match mesh {
            Some(m) => format!("container {:?} ({}'s)", c.name, m.name()),
            None => format!("container {:?}", c.name),
        };
        let mut add = |port: u16| {
            held.insert(HeldPort {
                port,
                holder: holder.clone(),
            });
        };
        for declared in c.ports.iter().flatten() {
            if let Ok(p) = u16::try_from(declared.container_port) {
                add(p);
            }
        }
        let Some(mesh) = mesh.filter(|_| Mesh::is_proxy(c)) else {
            continue;
        };
        mesh.reserved_ports().iter().copied().for_each(&mut add);
        for probe in [&c.startup_probe, &c.readiness_probe, &c.liveness_probe]
            .into_iter()
            .flatten()
        {
            if let Some(p) = probe_port(probe) {
                add(p);
            }
        }
        for var in c.env.iter().flatten() {
            if !(var.name.ends_with("_LISTEN_ADDR") || var.name.ends_with("_LISTEN_ADDRS")) {
                continue;
            }
            for addr in var.value.iter().flat_map(|v| v.split(',')) {
                if let Some(p) = addr
                    .trim()
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse().ok())
                {
                    add(p);
                }
            }
        }
    }
    // One holder per port, the first by name: enough for a message.
    let mut out: Vec<HeldPort> = Vec::new();
    for h in held {
        if out.last().is_none_or(|l| l.port != h.port) {
            out.push(h);
        }
    }
    out
}

fn probe_port(probe: &Probe) -> Option<u16> {
    let port = probe
        .http_get
        .as_ref()
        .map(|h| &h.port)
        .or(probe.tcp_socket.as_ref().map(|t| &t.port))?;
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    fn ports(held: &[HeldPort]) -> Vec<u16> {
        held.iter().map(|h| h.port).collect()
    }

    #[test]
    fn an_istio_proxy_holds_every_reserved_port_not_only_the_declared_one() {
        let s = spec(json!({
            "initContainers": [{ "name": "istio-init" }],
            "containers": [
                { "name": "app", "ports": [{ "containerPort": 8080 }] },
                { "name": "istio-proxy", "ports": [{ "containerPort": 15090 }],
                  "readinessProbe": { "httpGet": { "path": "/healthz/ready", "port": 15021 } } },
            ],
        }));
        let held = held_ports(&s, "cluster-tunnel-sidecar");
        let mut want: Vec<u16> = ISTIO_PORTS.to_vec();
        want.push(8080);
        want.sort_unstable();
        assert_eq!(ports(&held), want);
        let p15001 = held.iter().find(|h| h.port == 15001).unwrap();
        assert!(p15001.holder.contains("Istio"), "{p15001:?}");
    }

    #[test]
    fn a_linkerd_proxy_with_moved_ports_holds_them_too() {
        let s = spec(json!({
            "containers": [
                { "name": "linkerd-proxy",
                  "env": [
                    { "name": "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDRS", "value": "127.0.0.1:5140,[::1]:5140" },
                    { "name": "LINKERD2_PROXY_ADMIN_LISTEN_ADDR", "value": "0.0.0.0:5191" },
                  ] },
                { "name": "app" },
            ],
        }));
        let held = ports(&held_ports(&s, "cluster-tunnel-sidecar"));
        for p in LINKERD_PORTS.iter().chain(&[5140, 5191]) {
            assert!(held.contains(p), "{p} in {held:?}");
        }
    }

    #[test]
    fn the_sidecar_goes_after_the_leading_mesh_containers() {
        let list = |names: &[&str]| -> Vec<Container> {
            names
                .iter()
                .map(|n| Container {
                    name: (*n).into(),
                    ..Default::default()
                })
                .collect()
        };
        assert_eq!(insert_index(&list(&["migrate"])), 0);
        assert_eq!(insert_index(&list(&["istio-init", "migrate"])), 1);
        assert_eq!(
            insert_index(&list(&["istio-init", "istio-proxy", "migrate"])),
            2
        );
        assert_eq!(insert_index(&list(&["linkerd-proxy", "app"])), 1);
        // A proxy Istio appends after the app stays after it.
        assert_eq!(insert_index(&list(&["app", "istio-proxy"])), 0);
    }
}
