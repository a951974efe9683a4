//! The cluster-tunnel injector: a mutating admission webhook that adds the
//! sidecar to the hub pods that ask for it with one annotation, so that an
//! application reaches managed clusters with no change to its image, code or
//! manifests.
//!
//! # Modules
//!
//! - [`annotations`]: the `cluster-tunnel.io/` annotations, their defaults
//!   and their validation (invalid values refuse the pod, naming the
//!   annotation);
//! - [`inject`]: the decision about one pod and the JSON Patch that adds the
//!   sidecar, its volumes and the app's environment;
//! - [`live_config`]: the sidecar defaults of the live `TunnelConfiguration`
//!   (`spec.sidecar`) laid over the flags', followed without a restart;
//! - [`mesh`]: Istio's and Linkerd's containers already in a pod, where the
//!   sidecar goes among them, and every port the pod's containers hold;
//! - [`review`]: `AdmissionReview` in, `AdmissionReview` out (with the patch
//!   as the base64 string Kubernetes documents);
//! - [`server`]: the HTTPS server (warp over hyper-util over tokio-rustls);
//! - [`certs`]: the serving certificate, generated or read from files and
//!   reloaded;
//! - [`ca_bundle`]: the controller that keeps the webhook configuration's
//!   `caBundle` in step;
//! - [`metrics`]: Prometheus metrics on the admin port (`/healthz`,
//!   `/readyz`, `/metrics`);
//! - [`cli`]: the binary's flags and `main`.
//!
//! # What an injected pod looks like
//!
//! In **native** mode (the default, Kubernetes 1.29+), the sidecar
//! `cluster-tunnel-sidecar` is the first init container (after a service
//! mesh's own leading ones), with `restartPolicy: Always` and a startup probe
//! on its `/readyz` (an `exec` of `tunnel-sidecar probe readyz`, which asks
//! loopback: an `httpGet` to the pod's IP would be redirected by a mesh, and
//! Istio rewrites only the probes of containers its own injector saw): the
//! kubelet starts the other init containers and the app
//! only once the sidecar's listeners are bound (not once it reached a server,
//! so that pods start during a hub outage), stops it after the app, and a
//! Job's pod completes when its app containers do. In **legacy** mode (older clusters) it is the first app
//! container with a `postStart` hook that blocks until it is ready (the kubelet
//! starts containers in order and waits for each `postStart`); the hook is an
//! `exec` of `--legacy-wait-command`, because an `httpGet` hook is one request
//! that kills the container when the sidecar is not ready yet instead of
//! waiting. Legacy init containers run before the sidecar and get no proxy
//! settings; a Job's app must end the sidecar with `POST /shutdown` on its admin
//! port (the injector warns about this when it sees a Job's pod).
//!
//! The sidecar is configured through its `TUNNEL_*` environment variables:
//! servers and resources from the injector's flags, ports, proxy port, default
//! cluster, the clusters the pod names (`TUNNEL_KNOWN_CLUSTERS`) and log level
//! from the pod's annotations. Its admin port, per-cluster ports and HTTP
//! proxy listen on `127.0.0.1` (the admin port beyond it only with
//! `--sidecar-admin-bind`, for Prometheus). It mounts a projected service-account
//! token (audience `cluster-tunnel`) at `/var/run/secrets/cluster-tunnel/token`
//! for the workload identity, and its client certificate from a Secret in the
//! pod's namespace at `/etc/cluster-tunnel/tls` (`tls.crt`, `tls.key`,
//! `ca.crt`). It runs as a non-root user with a read-only root file system,
//! no capabilities and the runtime's seccomp profile (the restricted Pod
//! Security Standard).
//!
//! Every app container (and in native mode every other init container) gets
//! `HTTP_PROXY`, `HTTPS_PROXY`, `http_proxy`, `https_proxy` pointing at the
//! sidecar's proxy, `NO_PROXY`/`no_proxy` keeping hub traffic direct, and
//! `CLUSTER_TUNNEL_<CLUSTER>_ADDR` (first port of each cluster) and
//! `CLUSTER_TUNNEL_<CLUSTER>_<HOST>_<PORT>_ADDR` (every port) — except what the
//! container sets itself; each pair of proxy spellings counts as one.
//!
//! # Decisions
//!
//! - **Invalid annotation values refuse the pod** (`allowed: false`, code 400,
//!   a message naming the annotation): its author sees why at once, instead
//!   of a pod whose tunnel differs from what was written. Unknown
//!   `cluster-tunnel.io/` keys only produce admission warnings.
//! - **Our own trouble never refuses a pod** (it passes without the sidecar,
//!   with a warning) unless `--fail-closed`; a malformed review gets HTTP 400,
//!   and the configuration's `failurePolicy` decides.
//! - **Idempotent**: a pod with a container named `cluster-tunnel-sidecar` is
//!   left alone, so `reinvocationPolicy: IfNeeded` is safe — unless a
//!   container added since (by a mesh's injector, say) holds one of the
//!   sidecar's ports: then the pod is refused, as it is at first injection.
//! - **The environment the pod sets wins**: variables are only added. Values
//!   from `envFrom` cannot be seen by the webhook; since `env` overrides
//!   `envFrom`, a pod that sets proxy variables through `envFrom` should say
//!   `cluster-tunnel.io/set-proxy-env: "false"`.
//! - **Scope is the chart's**: a webhook's `objectSelector` sees labels, not
//!   annotations, so every pod creation in scope reaches the webhook. The
//!   chart limits it to labelled namespaces and excludes the injector's own
//!   (whose pods must start while the webhook is down); the label
//!   `cluster-tunnel.io/inject: "false"` opts a pod out in the selector, and
//!   the webhook honours it too.
//! - **Certificates**: generated in memory by default (the `caBundle` kept
//!   by [`ca_bundle`]), or files (reloaded) with the CA given, or files from
//!   cert-manager with the `caBundle` left to its CA injector.

pub mod annotations;
pub mod ca_bundle;
pub mod certs;
pub mod cli;
pub mod inject;
pub mod live_config;
pub mod mesh;
pub mod metrics;
pub mod review;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tunnel_shell::process::{ListenError, listen};

use crate::ca_bundle::BundlePolicy;
use crate::certs::{CertFiles, ServingCert};
use crate::inject::SidecarTemplate;
use crate::metrics::InjectorMetrics;
use crate::review::Reviewer;

/// Where the serving certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// Generated at start for these DNS names, with a CA of its own.
    Generated {
        /// The Service's names ([`certs::service_dns_names`]).
        dns_names: Vec<String>,
    },
    /// Read from files, and re-read when they change.
    Files(CertFiles),
}

/// Keeping the webhook configuration's `caBundle` in step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaBundleSync {
    /// Name of the `MutatingWebhookConfiguration`.
    pub webhook_config_name: String,
    /// Interval of the periodic re-check.
    pub resync: Duration,
    /// Most CAs kept in a bundle with a generated certificate.
    pub keep: usize,
}

/// Everything the injector needs to run.
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    /// Address of the webhook (HTTPS).
    pub listen: SocketAddr,
    /// Address of the admin port (HTTP).
    pub admin_listen: SocketAddr,
    /// The serving certificate.
    pub certs: CertSource,
    /// How often certificate files are checked for changes.
    pub cert_reload_interval: Duration,
    /// `caBundle` sync; `None` when someone else (cert-manager) keeps it.
    pub ca_bundle_sync: Option<CaBundleSync>,
    /// The sidecar to inject.
    pub template: SidecarTemplate,
    /// Deny pods the injector cannot handle instead of letting them through.
    pub fail_closed: bool,
    /// The `TunnelConfiguration` whose `spec.sidecar` overrides the
    /// template's defaults; `None`: the flags alone.
    pub config_name: Option<String>,
}

/// Why an injector could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The serving certificate could not be generated.
    #[error("cannot generate the webhook's certificate: {0}")]
    Generate(#[source] rcgen::Error),
    /// The generated certificate does not load (a bug, not a setting).
    #[error("generated certificate: {0}")]
    Generated(#[source] certs::CertError),
    /// The certificate files do not load.
    #[error(transparent)]
    Files(#[from] certs::CertError),
    /// The caBundle is to be kept, but the CA of the files is not known.
    #[error(
        "keeping the caBundle needs the CA of the provided certificate (--tls-ca); \
         with cert-manager, pass --cert-manager instead"
    )]
    NoCa,
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tunnel_proto::tls::TlsError),
    /// A port (`webhook`, `admin`) could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Keeping the caBundle or following a configuration, without a client.
    #[error("{0} needs a Kubernetes client")]
    NoClient(&'static str),
}

/// A running injector.
#[derive(Debug)]
pub struct Injector {
    /// The webhook's address.
    pub webhook_addr: SocketAddr,
    /// The admin port's address.
    pub admin_addr: SocketAddr,
    generated_ca: Option<String>,
    draining: Arc<AtomicBool>,
    /// Stops the webhook, the admin port and the controllers; cancelled too
    /// when the injector is dropped.
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Injector {
    /// Prepares the certificate, binds both ports and starts serving; with
    /// `ca_bundle_sync`, `client` talks to the API server.
    pub async fn start(
        config: InjectorConfig,
        client: Option<kube::Client>,
    ) -> Result<Self, StartError> {
        let mut registry = Registry::default();
        let metrics = InjectorMetrics::register(&mut registry);
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        // The certificate, and what the caBundle must hold when we keep it.
        let (serving, policy, generated_ca, files) = match &config.certs {
            CertSource::Generated { dns_names } => {
                let generated = certs::generate(dns_names).map_err(StartError::Generate)?;
                let key = certs::certified_key(
                    generated.cert_pem.as_bytes(),
                    generated.key_pem.as_bytes(),
                )
                .map_err(StartError::Generated)?;
                tracing::info!(names = ?dns_names, "generated a serving certificate and its CA");
                let policy = config
                    .ca_bundle_sync
                    .as_ref()
                    .map(|s| BundlePolicy::Include {
                        ours: generated.ca_pem.clone().into_bytes(),
                        keep: s.keep,
                    });
                (ServingCert::new(key), policy, Some(generated.ca_pem), None)
            }
            CertSource::Files(files) => {
                let loaded = files.load()?;
                let policy = match (&config.ca_bundle_sync, &loaded.ca_pem) {
                    (None, _) => None,
                    (Some(_), Some(ca)) => Some(BundlePolicy::Exact(ca.clone())),
                    (Some(_), None) => return Err(StartError::NoCa),
                };
                (
                    ServingCert::new(loaded.key),
                    policy,
                    None,
                    Some((files.clone(), loaded.digest)),
                )
            }
        };
        let tls = certs::server_config(serving.clone())?;

        let (listener, webhook_addr) = listen("webhook", config.listen).await?;
        let (admin_listener, admin_addr) = listen("admin", config.admin_listen).await?;

        let synced = Arc::new(AtomicBool::new(config.ca_bundle_sync.is_none()));
        let mut policy_tx = None;
        if let (Some(sync), Some(policy)) = (&config.ca_bundle_sync, policy) {
            let client = client
                .clone()
                .ok_or(StartError::NoClient("keeping the caBundle"))?;
            let (tx, policy_rx) = watch::channel(policy);
            policy_tx = Some(tx);
            tasks.push(tokio::spawn(ca_bundle::run(
                client,
                sync.webhook_config_name.clone(),
                (policy_rx, metrics.clone(), synced.clone()),
                sync.resync,
                stop.clone().cancelled_owned(),
            )));
        }
        if let Some((files, digest)) = files {
            tasks.push(tokio::spawn(certs::watch_files(
                files,
                digest,
                serving,
                policy_tx,
                config.cert_reload_interval,
                metrics.clone(),
                stop.clone(),
            )));
        }

        let (templates_tx, templates) = watch::channel(Arc::new(config.template.clone()));
        if let Some(name) = &config.config_name {
            let client = client
                .clone()
                .ok_or(StartError::NoClient("following the TunnelConfiguration"))?;
            tasks.push(tokio::spawn(live_config::follow(
                client,
                name.clone(),
                config.template.clone(),
                templates_tx,
                stop.clone(),
            )));
        }
        let reviewer = Arc::new(Reviewer::new(templates, config.fail_closed, metrics));
        tasks.push(tokio::spawn(server::serve(
            listener,
            tls,
            reviewer,
            stop.clone(),
        )));

        let (ready, draining) = (synced.clone(), Arc::new(AtomicBool::new(false)));
        let not_draining = draining.clone();
        let admin = tunnel_shell::admin::AdminServer::new(
            Arc::new(registry),
            Arc::new(move || {
                ready.load(Ordering::Acquire) && !not_draining.load(Ordering::Acquire)
            }),
        );
        let admin_stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(error) = admin.serve(admin_listener, admin_stop).await {
                tracing::error!(%error, "admin server failed");
            }
        }));
        tracing::info!(%webhook_addr, %admin_addr, version = %config.template.version, "tunnel injector started");
        Ok(Self {
            webhook_addr,
            admin_addr,
            generated_ca,
            draining,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            tasks,
        })
    }

    /// The generated CA (PEM), when the certificate was generated.
    pub fn generated_ca_pem(&self) -> Option<&str> {
        self.generated_ca.as_deref()
    }

    /// Starts draining: `/readyz` answers 503, so that the Service's
    /// endpoints drop this replica, while the webhook keeps answering
    /// reviews the API server still sends here.
    pub fn drain(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            tracing::info!("draining: not ready any more; reviews are still answered");
        }
    }

    /// Stops accepting, lets open requests finish, stops the controller.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        tracing::info!("tunnel injector stopped");
    }
}
