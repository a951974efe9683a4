//! The cluster-tunnel manager: the hub's control plane for a fleet.
//!
//! # Modules
//!
//! - [`crd`]: the `TunnelConfiguration` resource and its generated CRD;
//! - [`signer`]: the signer CA kept in a Secret (generated if absent) and
//!   the certificates it issues, renewed when a fifth of their lifetime is left;
//! - [`agent_work`]: the `ManifestWork` that delivers an agent to a managed cluster;
//! - [`addon`]: `ManagedClusterAddOn` conditions from the server's live view;
//! - [`clusters`]: the kube-runtime controller over `ManagedCluster`s;
//! - [`namespaces`]: the controller that keeps the sidecars' certificate
//!   Secret in every injection-enabled namespace;
//! - [`coverage`]: opted-in pods admitted without the sidecar, reported
//!   (metric, log, `health --pods`);
//! - [`health`]: the `health` command (a table or JSON, probes through the tunnel);
//! - [`hub`]: the servers' Deployment, Services, PodDisruptionBudget and RBAC
//!   and the injector's webhook configuration, kept as the configuration says;
//! - [`status`]: the configuration's conditions, written in one place;
//! - [`leader`]: leader election over a Lease, so that several managers can run;
//! - [`metrics`]: reconciliations and conditions on the admin port;
//! - [`cli`]: the binary's commands and flags.

pub mod addon;
pub mod agent_work;
pub mod cli;
pub mod clusters;
pub mod coverage;
pub mod crd;
pub mod health;
pub mod hub;
pub mod leader;
pub mod metrics;
#[cfg(test)]
mod mock_api;
pub mod namespaces;
pub mod signer;
pub mod status;
