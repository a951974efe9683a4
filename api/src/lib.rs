//! The Kubernetes API of cluster-tunnel and the names its components agree on.
//!
//! One crate, so that the server, the manager, the injector and the sidecar
//! read the same types and names instead of restating them.
//!
//! # Modules
//!
//! - [`condition`] (feature `crd`): the status condition of our resources
//!   and when its `lastTransitionTime` moves;
//! - [`configuration`] (feature `crd`): the `TunnelConfiguration` resource,
//!   how the hub side is installed and what every agent looks like;
//! - [`policy`] (feature `crd`): the `TunnelPolicy` resource, who may reach what;
//! - [`ocm`] (feature `crd`): the open-cluster-management resources the
//!   manager and the server read and write (`ManagedCluster`,
//!   `ManagedClusterAddOn`, `AddOnDeploymentConfig`), with only the fields
//!   they use, and the names OCM derives from them;
//! - [`annotations`]: the pod annotations that opt a pod in and tune its sidecar;
//! - [`labels`]: the labels components set and select on;
//! - [`names`]: names that say which cluster they are in
//!   (`<host>.<cluster>.<suffix>`), read alike by every entry;
//! - [`pod`]: names inside pods (the sidecar container, volumes, mount paths,
//!   the sidecars' Secret) and the containers' security context;
//! - [`sidecar`]: the sidecar's default ports, its loopback port mappings and
//!   its policy for destinations outside the clusters.
//!
//! The CRD YAML in the chart is generated from these types
//! (`tunnel-manager crdgen`, `tunnel-server crd`); a test checks the chart's
//! copies against them.

pub mod annotations;
#[cfg(feature = "crd")]
pub mod condition;
#[cfg(feature = "crd")]
pub mod configuration;
pub mod labels;
pub mod names;
#[cfg(feature = "crd")]
pub mod ocm;
pub mod pod;
#[cfg(feature = "crd")]
pub mod policy;
pub mod sidecar;
