//! Where agents dial the hub, from the configuration's entrypoint: a fixed
//! host name, or the address the LoadBalancer Service got, verified by the
//! Service's in-cluster name.

use k8s_openapi::api::core::v1::Service;
use kube::api::Api;

use tunnel_api::configuration::{EntrypointType, TunnelConfiguration};

use super::{Context, ReconcileError};
use crate::agent_work::HubAddress;

impl Context {
    /// The address agents dial and the name they verify: the configured
    /// host name, or the LoadBalancer Service's ingress address.
    pub(super) async fn hub_address(
        &self,
        config: &TunnelConfiguration,
    ) -> Result<HubAddress, ReconcileError> {
        let entry = &config.spec.server.entrypoint;
        match entry.kind {
            EntrypointType::Hostname => {
                let h = entry
                    .hostname
                    .as_ref()
                    .ok_or(ReconcileError::BadConfiguration(
                        "type Hostname needs hostname",
                    ))?;
                Ok(HubAddress {
                    host: h.value.clone(),
                    port: h.port,
                    server_name: h.value.clone(),
                })
            }
            EntrypointType::LoadBalancerService => {
                let lb = entry.load_balancer_service.as_ref().ok_or(
                    ReconcileError::BadConfiguration(
                        "type LoadBalancerService needs loadBalancerService",
                    ),
                )?;
                let services: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
                let svc = services
                    .get(&lb.name)
                    .await
                    .map_err(ReconcileError::api(format!("get Service {}", lb.name)))?;
                let mut hub = load_balancer_address(&svc)
                    .ok_or_else(|| ReconcileError::NoEntrypoint(lb.name.clone()))?;
                hub.server_name = format!("{}.{}.svc", lb.name, self.namespace);
                Ok(hub)
            }
        }
    }
}

/// The first ingress address of a LoadBalancer Service and its `agent` port.
pub fn load_balancer_address(svc: &Service) -> Option<HubAddress> {
    let ingress = svc
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?;
    let host = ingress.hostname.clone().or_else(|| ingress.ip.clone())?;
    let ports = svc.spec.as_ref()?.ports.as_ref()?;
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("agent"))
        .or_else(|| ports.first())?
        .port;
    Some(HubAddress {
        server_name: host.clone(),
        host,
        port: u16::try_from(port).ok()?,
    })
}
