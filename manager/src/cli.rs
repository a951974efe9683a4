//! The `tunnel-manager` binary: `crdgen`, `run` (the controllers) and `health`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_proto::client::{ClientOptions, TunnelClient};
use tunnel_proto::h2::H2Settings;
use tunnel_shell::flags::{AdminArgs, ClientSide, LogArgs, ServerArgs, TlsArgs};
use tunnel_shell::units::parse_duration;

use crate::addons;
use crate::config_watch;
use crate::health::{self, ProbeOptions};
use crate::leader::{self, LeaseLock};
use crate::live_view::{self, LiveView};
use crate::namespaces;
use crate::server_certificate::{self, ServerCertificate};
use crate::server_objects;
use crate::signer::{self, Leaf, Signer};
use crate::status::StatusBoard;
use tunnel_api::configuration::TunnelConfiguration;
use tunnel_identity::spiffe::DEFAULT_TRUST_DOMAIN;

/// cluster-tunnel's hub control plane.
#[derive(Debug, Parser)]
#[command(name = "tunnel-manager", version = tunnel_proto::version::VERSION, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions (YAML) generated from the Rust types.
    Crdgen,
    /// Run the controllers: certificates (the server's, and the sidecars' in
    /// every injection-enabled namespace), and with --open-cluster-management
    /// the addon: an agent ManifestWork and status per ManagedClusterAddOn,
    /// and the agents' certificate requests signed.
    Run(RunArgs),
    /// Remove the addon from every cluster (works, finalizers, agents) before
    /// the manager goes: the hub chart's pre-delete hook.
    Uninstall(UninstallArgs),
    /// Apply the CRDs of this version (server-side): the chart's pre-upgrade
    /// hook, since Helm installs its `crds/` only once.
    ApplyCrds,
    /// Print a short-lived token with which one cluster's `tunnel-agent join`
    /// gets its agent certificate (no open-cluster-management needed).
    JoinToken(JoinTokenArgs),
    /// For every cluster: agent installed, available, a probe through the tunnel, its latency.
    Health(HealthArgs),
}

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Namespace of the manager (Secrets, Services).
    #[arg(long, env = "TUNNEL_NAMESPACE", default_value = "cluster-tunnel")]
    pub namespace: String,
    /// Name of the TunnelConfiguration to follow.
    #[arg(long, env = "TUNNEL_CONFIG_NAME", default_value = tunnel_api::configuration::DEFAULT_NAME)]
    pub config_name: String,
    /// The servers' client port, for the live view of connected agents.
    #[command(flatten)]
    pub servers: ServerArgs<ClientSide>,
    /// Base name of the server Services (`<name>`, `<name>-agents`, `<name>-headless`): put in the server certificate.
    #[arg(
        long,
        env = "TUNNEL_SERVER_SERVICE",
        default_value = "cluster-tunnel-server"
    )]
    pub server_service: String,
    /// Secret to keep the server certificate in.
    #[arg(
        long,
        env = "TUNNEL_SERVER_TLS_SECRET",
        default_value = "cluster-tunnel-server-tls"
    )]
    pub server_tls_secret: String,
    /// Trust domain of the identities.
    #[arg(long, env = "TUNNEL_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Name of the installation (the Helm release): prefix of the hub's
    /// objects and their `app.kubernetes.io/instance` label.
    #[arg(long, env = "TUNNEL_INSTANCE", default_value = "cluster-tunnel")]
    pub instance: String,
    /// Leave the servers' Deployment, Services, PodDisruptionBudget, RBAC and
    /// the webhook configuration alone (by default they are kept as the
    /// TunnelConfiguration says).
    #[arg(long, env = "TUNNEL_NO_HUB_OBJECTS")]
    pub no_hub_objects: bool,
    /// Run without leader election (when only ever one manager runs).
    #[arg(long, env = "TUNNEL_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// The leader Lease in --namespace; by default `<instance>-manager`.
    #[arg(long, env = "TUNNEL_LEASE_NAME")]
    pub lease_name: Option<String>,
    /// This replica's identity in the Lease (the pod's name; by default the host name).
    #[arg(long, env = "TUNNEL_POD_NAME", default_value_t = default_identity())]
    pub identity: String,
    /// Be an open-cluster-management addon: an agent ManifestWork and status
    /// per ManagedClusterAddOn, and OCM's agent certificate requests signed.
    #[arg(long, env = "TUNNEL_OPEN_CLUSTER_MANAGEMENT")]
    pub open_cluster_management: bool,
    /// Sign the certificate requests of agents joining with a join token
    /// (`tunnel-manager join-token`, `tunnel-agent join`), without OCM.
    #[arg(long, env = "TUNNEL_JOIN")]
    pub join: bool,
    /// Label key of namespaces whose pods get the sidecar (value `enabled`):
    /// each gets the sidecar certificate Secret.
    #[arg(
        long,
        env = "TUNNEL_NAMESPACE_LABEL",
        default_value = tunnel_api::labels::NAMESPACE_INJECTION
    )]
    pub namespace_label: String,
    /// Name of the sidecar certificate Secret in each labelled namespace (the injector's `--sidecar-cert-secret`).
    #[arg(
        long,
        env = "TUNNEL_SIDECAR_CERT_SECRET",
        default_value = tunnel_api::pod::SIDECAR_SECRET
    )]
    pub sidecar_cert_secret: String,
    /// Also keep a client certificate (`client/<name>`) in the Secret of this
    /// name in --namespace: the chart's `helm test` probes through the tunnel with it.
    #[arg(long, env = "TUNNEL_TEST_CLIENT_SECRET")]
    pub test_client_secret: Option<String>,
    /// Do not issue sidecar certificates into labelled namespaces (the administrator provides the Secrets).
    #[arg(long, env = "TUNNEL_NO_SIDECAR_CERTS")]
    pub no_sidecar_certs: bool,
    /// Do not look for opted-in pods running without the sidecar in labelled
    /// namespaces (the `tunnel_manager_pods_without_sidecar` metric and its warning).
    #[arg(long, env = "TUNNEL_NO_POD_REPORT")]
    pub no_pod_report: bool,
    /// How often the server is asked which agents are connected.
    #[arg(long, env = "TUNNEL_LIVE_VIEW_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub live_view_interval: Duration,
    /// The admin port.
    #[command(flatten)]
    pub admin: AdminArgs<8095>,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Flags of `uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Namespace of the manager (where older versions kept agent Secrets).
    #[arg(long, env = "TUNNEL_NAMESPACE", default_value = "cluster-tunnel")]
    pub namespace: String,
    /// Only clean up what older versions left (finalizers on ManagedClusters,
    /// agent key Secrets on the hub): the chart's post-upgrade hook.
    #[arg(long)]
    pub legacy_only: bool,
    /// Time the manager gets to remove each cluster's agent before it is done here.
    #[arg(long, env = "TUNNEL_UNINSTALL_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub wait: Duration,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Flags of `join-token`.
#[derive(Debug, Args)]
pub struct JoinTokenArgs {
    /// The cluster that joins (its agent's identity).
    #[arg(long)]
    pub cluster: String,
    /// Namespace of the manager (the join service accounts live there).
    #[arg(long, env = "TUNNEL_NAMESPACE", default_value = "cluster-tunnel")]
    pub namespace: String,
    /// Time the token is valid.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub duration: Duration,
    /// The chart's join ClusterRole (`<release>-join`).
    #[arg(long, default_value = "cluster-tunnel-join")]
    pub join_role: String,
}

/// Flags of `health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// A server's client port.
    #[arg(
        long = "server",
        env = "TUNNEL_SERVERS",
        value_delimiter = ',',
        default_value = "127.0.0.1:18090"
    )]
    pub servers: Vec<String>,
    /// Name the server certificate carries; by default the address's host.
    #[arg(long, env = "TUNNEL_SERVER_NAME", default_value = "localhost")]
    pub server_name: String,
    /// Directory with `client-<name>.pem`, `client-<name>-key.pem`, `ca.pem`.
    #[arg(
        long,
        env = "TUNNEL_CERT_DIR",
        default_value = "/tmp/cluster-tunnel-local"
    )]
    pub cert_dir: PathBuf,
    /// Which client certificate in --cert-dir.
    #[arg(long, env = "TUNNEL_CLIENT_NAME", default_value = "sidecar")]
    pub client_name: String,
    /// Files that override those in --cert-dir (a certificate with its key).
    #[command(flatten)]
    pub tls: TlsArgs<ClientSide>,
    /// Host probed in each cluster.
    #[arg(long, default_value = "kubernetes.default.svc")]
    pub probe_host: String,
    /// Port probed in each cluster.
    #[arg(long, default_value_t = 443)]
    pub probe_port: u16,
    /// Also `GET /healthz` over TLS (for a kube-apiserver); otherwise a TCP connect.
    #[arg(long)]
    pub healthz: bool,
    /// Time allowed for each probe.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Look up which clusters have the addon enabled and whether OCM shows it
    /// available (ManagedClusterAddOns on the hub, via the kubeconfig).
    #[arg(long)]
    pub kubernetes: bool,
    /// Also list opted-in pods running without the sidecar (via the kubeconfig);
    /// the command fails while there are any.
    #[arg(long)]
    pub pods: bool,
    /// Label key of injection-enabled namespaces (value `enabled`), for --pods.
    #[arg(
        long,
        env = "TUNNEL_NAMESPACE_LABEL",
        default_value = tunnel_api::labels::NAMESPACE_INJECTION
    )]
    pub namespace_label: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Fail unless at least this many clusters answered the probe (`helm
    /// test` proves a connection with 1; by default a hub without clusters passes).
    #[arg(long, default_value_t = 0)]
    pub min_healthy: usize,
}

/// Runs a command.
pub async fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crdgen => {
            print!("{}", tunnel_api::configuration::crd_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Health(args) => {
            let (out, all_healthy) = health_command(&args).await?;
            print!("{out}");
            Ok(if all_healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Run(args) => {
            args.log.init();
            run(args).await.map(|()| ExitCode::SUCCESS)
        }
        Command::ApplyCrds => {
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes client")?;
            for name in crate::crds::apply_crds(&client).await? {
                println!("{name} applied");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::JoinToken(args) => {
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes client")?;
            let token = crate::join::join_token(
                &client,
                &args.namespace,
                &args.cluster,
                &args.join_role,
                args.duration,
            )
            .await?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall(args) => {
            args.log.init();
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes client")?;
            if args.legacy_only {
                let legacy = crate::uninstall::remove_legacy(&client, &args.namespace).await?;
                tracing::info!(?legacy, "what older versions left is cleaned up");
            } else {
                let removed =
                    crate::uninstall::uninstall(&client, &args.namespace, args.wait).await?;
                tracing::info!(
                    by_manager = ?removed.by_manager,
                    forced = ?removed.forced,
                    legacy = ?removed.legacy,
                    "addon removed from every cluster"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The `health` command's output and whether every cluster was healthy.
pub async fn health_command(args: &HealthArgs) -> anyhow::Result<(String, bool)> {
    // A certificate from elsewhere comes with its key, not with one of --cert-dir.
    if args.tls.tls_cert.is_some() != args.tls.tls_key.is_some() {
        anyhow::bail!("--tls-cert and --tls-key go together");
    }
    let files = args
        .tls
        .files(&args.cert_dir, &format!("client-{}", args.client_name));
    let tls = tunnel_proto::tls::ClientTls::client(files).context("client TLS")?;
    let client = TunnelClient::new(ClientOptions {
        servers: args.servers.clone(),
        server_name: Some(args.server_name.clone()),
        tls,
        h2: H2Settings::default(),
        connect_timeout: args.timeout,
        open_timeout: args.timeout,
        token_file: None,
    });
    let installed = if args.kubernetes {
        Some(installed_clusters().await?)
    } else {
        None
    };
    let opts = ProbeOptions {
        host: args.probe_host.clone(),
        port: args.probe_port,
        healthz: args.healthz,
        timeout: args.timeout,
    };
    let rows = health::check(&client, installed.as_ref(), &opts)
        .await
        .map_err(|e| anyhow::anyhow!("cannot list clusters from {:?}: {e}", args.servers))?;
    let mut all = rows.iter().all(|r| r.healthy)
        && rows.iter().filter(|r| r.healthy).count() >= args.min_healthy;
    let uninjected = if args.pods {
        let kube = kube::Client::try_default()
            .await
            .context("--pods needs the hub's kubeconfig")?;
        let found = crate::coverage::scan(&kube, &args.namespace_label)
            .await
            .context("cannot list pods in labelled namespaces")?;
        all &= found.is_empty();
        Some(found)
    } else {
        None
    };
    let out = match (args.json, &uninjected) {
        (true, None) => format!("{}\n", serde_json::to_string_pretty(&rows)?),
        (true, Some(pods)) => format!(
            "{}\n",
            serde_json::to_string_pretty(
                &serde_json::json!({ "clusters": rows, "podsWithoutSidecar": pods })
            )?
        ),
        (false, None) => health::table(&rows),
        (false, Some(pods)) => {
            format!("{}\n{}", health::table(&rows), crate::coverage::table(pods))
        }
    };
    Ok((out, all))
}

/// Clusters the addon is enabled in (a `ManagedClusterAddOn` on the hub)
/// and its `Available` condition there (`None`: unknown or not set yet).
async fn installed_clusters() -> anyhow::Result<BTreeMap<String, Option<bool>>> {
    let client = kube::Client::try_default().await.context("kubeconfig")?;
    let addons: Api<tunnel_api::ocm::ManagedClusterAddOn> = Api::all(client);
    let list = addons
        .list(
            &ListParams::default()
                .fields(&format!("metadata.name={}", tunnel_api::ocm::ADDON_NAME)),
        )
        .await
        .context("list ManagedClusterAddOns")?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|a| {
            let available = health::addon_available(&a);
            Some((a.metadata.namespace?, available))
        })
        .collect())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("Kubernetes client")?;
    // Cancelled on SIGTERM; a part that starts waiting later still sees it.
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tunnel_shell::process::termination_signal().await;
            shutdown.cancel();
        });
    }
    let ready = Arc::new(AtomicBool::new(false));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::ManagerMetrics::register(&mut registry);
    let registry = Arc::new(registry);
    let (listener, _) = tunnel_shell::process::listen("admin", args.admin.admin_listen).await?;
    let ready_check = ready.clone();
    let admin = tunnel_shell::admin::AdminServer::new(
        registry,
        Arc::new(move || ready_check.load(Ordering::Acquire)),
    );
    tokio::spawn(admin.serve(listener, shutdown.clone()));

    if args.no_leader_election {
        metrics.leader.set(1);
        return controllers(args, client, shutdown, ready, metrics).await;
    }
    let lease = args
        .lease_name
        .clone()
        .unwrap_or_else(|| format!("{}-manager", args.instance));
    let lock = Arc::new(LeaseLock::new(
        Api::namespaced(client.clone(), &args.namespace),
        &lease,
        &args.identity,
        Arc::new(time::OffsetDateTime::now_utc),
    ));
    let (leading_tx, mut leading_rx) = watch::channel(false);
    let elector = {
        let lock = lock.clone();
        tokio::spawn(async move { leader::lead(&lock, &leading_tx).await })
    };
    // A follower is ready: it stands by, and a rollout must be able to pass it.
    ready.store(true, Ordering::Release);
    tracing::info!(%lease, identity = %args.identity, "waiting to lead");
    tokio::select! {
        _ = leading_rx.wait_for(|l| *l) => {}
        () = shutdown.cancelled() => return Ok(()),
    }
    metrics.leader.set(1);
    let result = tokio::select! {
        r = controllers(args, client, shutdown, ready, metrics.clone()) => r,
        lost = elector => Err(match lost {
            Ok(lost) => anyhow::Error::new(lost),
            Err(e) => anyhow::anyhow!("leader election failed: {e}"),
        }),
    };
    metrics.leader.set(0);
    lock.release().await;
    result
}

/// Hostname, or a fixed name when there is none.
fn default_identity() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "tunnel-manager".into())
}

/// The controllers, while this manager leads.
async fn controllers(
    args: RunArgs,
    client: kube::Client,
    shutdown: CancellationToken,
    ready: Arc<AtomicBool>,
    metrics: crate::metrics::ManagerMetrics,
) -> anyhow::Result<()> {
    // The configuration, followed.
    let (config_tx, config_rx) = watch::channel(None::<Arc<TunnelConfiguration>>);
    let configs: Api<TunnelConfiguration> = Api::all(client.clone());
    let name = args.config_name.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move { config_watch::follow(configs, &name, config_tx, stop).await });
    let mut wait = config_rx.clone();
    // The follower stops on shutdown too: a stop before any configuration
    // was seen is a stop, not a failed watch.
    let config = tokio::select! {
        seen = wait.wait_for(Option::is_some) => seen
            .context("configuration watch ended")?
            .clone()
            .expect("waited for Some"),
        () = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(name = %args.config_name, "configuration found");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let now = time::OffsetDateTime::now_utc;
    let signer = Arc::new(
        signer::ensure_signer(
            &secrets,
            &config.spec.signer.secret_name,
            &args.trust_domain,
            now(),
        )
        .await?,
    );

    // The configuration's conditions, written in one place.
    let mut required = vec!["SignerReady", server_certificate::CONDITION];
    if !args.no_hub_objects {
        required.push(server_objects::CONDITION);
    }
    let board = Arc::new(StatusBoard::new(
        Api::all(client.clone()),
        required,
        metrics.clone(),
    ));
    board
        .set(
            &config,
            "SignerReady",
            true,
            "Loaded",
            format!(
                "the signer CA in Secret {} is loaded",
                config.spec.signer.secret_name
            ),
        )
        .await;

    // The hub's objects, kept as the configuration says.
    if !args.no_hub_objects {
        let ctx = Arc::new(server_objects::Context {
            client: client.clone(),
            names: server_objects::ServerObjectNames {
                instance: args.instance.clone(),
                namespace: args.namespace.clone(),
                trust_domain: args.trust_domain.clone(),
            },
            status: board.clone(),
            metrics: metrics.clone(),
        });
        let stop = shutdown.clone().cancelled_owned();
        let config_name = args.config_name.clone();
        tokio::spawn(async move {
            server_objects::run(ctx, &config_name, stop).await;
        });
    }

    // The server certificate (and the helm test's client certificate), kept current.
    let names = server_names(&args.server_service, &args.namespace, &config);
    let keeper = ServerCertificate {
        secrets: secrets.clone(),
        secret_name: args.server_tls_secret.clone(),
        names,
        test_client: args.test_client_secret.clone(),
        signer: signer.clone(),
        trust_domain: args.trust_domain.clone(),
        config: config_rx.clone(),
        status: board.clone(),
        clock: Arc::new(now),
    };
    tokio::spawn(keeper.run(shutdown.clone()));

    // The live view: agents per cluster, from the server, with our own client certificate.
    let (live_tx, live_rx) = watch::channel::<LiveView>(None);
    let validity = time::Duration::days(i64::from(config.spec.signer.certificate_validity_days));
    let client_tls = manager_client_tls(&signer, &args.trust_domain, validity)?;
    let tunnel = TunnelClient::new(ClientOptions {
        servers: args.servers.servers.clone(),
        server_name: args.servers.server_name.clone(),
        tls: client_tls.into(),
        h2: H2Settings::default(),
        connect_timeout: Duration::from_secs(10),
        open_timeout: Duration::from_secs(10),
        token_file: None,
    });
    tokio::spawn(live_view::run(
        tunnel,
        live_tx,
        args.live_view_interval,
        shutdown.clone(),
    ));
    ready.store(true, Ordering::Release);

    // Opted-in pods admitted without the sidecar.
    if !args.no_pod_report {
        tokio::spawn(crate::coverage::run(
            client.clone(),
            args.namespace_label.clone(),
            metrics.clone(),
            crate::coverage::SCAN_INTERVAL,
            shutdown.clone().cancelled_owned(),
        ));
    }

    // The sidecars' certificate in every injection-enabled namespace.
    if args.no_sidecar_certs {
        tracing::info!("sidecar certificates are not issued (--no-sidecar-certs)");
    } else {
        let ctx = Arc::new(namespaces::Context {
            client: client.clone(),
            label: args.namespace_label.clone(),
            secret_name: args.sidecar_cert_secret.clone(),
            trust_domain: args.trust_domain.clone(),
            signer: signer.clone(),
            config: config_rx.clone(),
            config_name: args.config_name.clone(),
            clock: Arc::new(time::OffsetDateTime::now_utc),
            metrics: metrics.clone(),
        });
        tokio::spawn(namespaces::run(ctx, shutdown.clone().cancelled_owned()));
    }

    // Agents' certificate requests: OCM's registration agents, and joins.
    if args.open_cluster_management || args.join {
        let csr = Arc::new(crate::csr::Context {
            client: client.clone(),
            signer: signer.clone(),
            trust_domain: args.trust_domain.clone(),
            config: config_rx.clone(),
            config_name: args.config_name.clone(),
            clock: Arc::new(time::OffsetDateTime::now_utc),
            metrics: metrics.clone(),
            join_namespace: args.join.then(|| args.namespace.clone()),
            addons: args.open_cluster_management,
        });
        tokio::spawn(crate::csr::run(csr, shutdown.clone().cancelled_owned()));
    }
    if args.open_cluster_management {
        let ctx = Arc::new(addons::Context {
            client,
            namespace: args.namespace.clone(),
            config: config_rx,
            config_name: args.config_name.clone(),
            live: live_rx,
            signer,
            clock: Arc::new(time::OffsetDateTime::now_utc),
            metrics: metrics.clone(),
        });
        addons::run(ctx, shutdown.cancelled_owned()).await;
    } else {
        shutdown.cancelled().await;
    }
    Ok(())
}

/// Names in the server certificate: the Services' in-cluster names and a
/// fixed entrypoint host name.
pub fn server_names(service: &str, namespace: &str, config: &TunnelConfiguration) -> Vec<String> {
    let mut names = Vec::new();
    for svc in [
        service.to_string(),
        format!("{service}-agents"),
        format!("{service}-headless"),
    ] {
        names.push(format!("{svc}.{namespace}.svc"));
        names.push(format!("{svc}.{namespace}.svc.cluster.local"));
    }
    if let Some(h) = &config.spec.server.entrypoint.hostname {
        names.push(h.value.clone());
    }
    names
}

/// A client certificate for the manager itself (`client/tunnel-manager`),
/// in memory only (the root file system is read-only). It lives as long as
/// the server certificate would; the process re-issues it when restarted.
fn manager_client_tls(
    signer: &Signer,
    trust_domain: &str,
    validity: time::Duration,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let issued = signer.issue(
        &Leaf::Client {
            name: "tunnel-manager".into(),
        },
        trust_domain,
        time::OffsetDateTime::now_utc(),
        validity,
    )?;
    let chain = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())?];
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(
        signer.ca.cert_pem.as_bytes(),
    )?)?;
    let mut config = rustls::ClientConfig::builder_with_provider(tunnel_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![tunnel_proto::tls::ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}
