//! The cluster-tunnel manager: the hub's control plane for a fleet.
//!
//! # Modules
//!
//! - [`controller`]: the scaffold every controller runs on (resync and
//!   retry delays, error policy, the run loop and its metrics);
//! - [`config_watch`]: the `TunnelConfiguration` followed onto a channel
//!   every other part reads;
//! - [`crds`]: applies the CRDs generated from `tunnel_api`'s types;
//! - [`signer`]: the signer CA kept in a Secret (generated if absent) and
//!   the certificates it issues, renewed when a fifth of their lifetime is left;
//! - [`addons`]: the controller over `ManagedClusterAddOn`s: the agent's
//!   work per cluster, removed with a finalizer;
//! - [`addon_status`]: registration, health check mode and conditions of
//!   each `ManagedClusterAddOn`;
//! - [`agent_work`]: the `ManifestWork` that delivers an agent (no key in it);
//! - [`deployment_config`]: an `AddOnDeploymentConfig` applied to the agent;
//! - [`csr`]: approves and signs the agents' certificate requests;
//! - [`uninstall`]: the `uninstall` command (Helm's pre-delete hook);
//! - [`join`]: the `join-token` command (joining without OCM);
//! - [`namespaces`]: the controller that keeps the sidecars' certificate
//!   Secret in every injection-enabled namespace;
//! - [`coverage`]: opted-in pods admitted without the sidecar, reported
//!   (metric, log, `health --pods`);
//! - [`health`]: the `health` command (a table or JSON, probes through the tunnel);
//! - [`server_certificate`]: the servers' certificate (and the helm
//!   test's), kept current, reported as `ServerCertificateReady`;
//! - [`live_view`]: agents per cluster, polled from the servers, published
//!   on change;
//! - [`server_objects`]: the servers' Deployment, Services, PodDisruptionBudget and RBAC
//!   and the injector's webhook configuration, kept as the configuration says;
//! - [`status`]: the configuration's conditions, written in one place;
//! - [`leader`]: leader election over a Lease, so that several managers can run;
//! - [`metrics`]: reconciliations and conditions on the admin port;
//! - [`cli`]: the binary's commands and flags.
//! - `mock_api` (tests only): kube's API server mocked with `tower_test`,
//!   answering each expected request of a scenario in turn.

pub mod addon_status;
pub mod addons;
pub mod agent_work;
pub mod cli;
pub mod config_watch;
pub mod controller;
pub mod coverage;
pub mod crds;
pub mod csr;
pub mod deployment_config;
pub mod health;
pub mod join;
pub mod leader;
pub mod live_view;
pub mod metrics;
#[cfg(test)]
mod mock_api;
pub mod namespaces;
pub mod server_certificate;
pub mod server_objects;
pub mod signer;
pub mod status;
pub mod uninstall;
