//! The `tunnel-injector` command line. Every flag also reads the environment
//! variable shown in `--help`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tunnel_api::sidecar::{DEFAULT_ADMIN_PORT, DEFAULT_PROXY_PORT, parse_host_port};
use tunnel_shell::flags::{AdminArgs, LogArgs, ShutdownDelayArgs, ShutdownDelayHelp};
use tunnel_shell::units::parse_duration;

use crate::annotations::{Defaults, Mode, Resources, parse_quantity};
use crate::certs::{CertFiles, service_dns_names};
use crate::inject::{BASE_NO_PROXY, SidecarTemplate};
use crate::{CaBundleSync, CertSource, Injector, InjectorConfig};

/// Shortest lifetime Kubernetes accepts for a projected token.
const MIN_TOKEN_EXPIRATION: Duration = Duration::from_secs(600);

/// The cluster-tunnel injector: a mutating admission webhook that adds the
/// sidecar to pods annotated `cluster-tunnel.io/inject: "true"`.
#[derive(Debug, Parser)]
#[command(name = "tunnel-injector", version = tunnel_proto::version::VERSION)]
pub struct Cli {
    /// Address of the webhook (HTTPS).
    #[arg(long, env = "TUNNEL_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// The admin port.
    #[command(flatten)]
    pub admin: AdminArgs<8094>,
    /// Serving certificate chain (PEM); without it a certificate is generated at start.
    #[arg(long, env = "TUNNEL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Serving private key (PEM).
    #[arg(long, env = "TUNNEL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA of the provided certificate, published in the caBundle.
    #[arg(long, env = "TUNNEL_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// cert-manager (or another tool) provides the certificate files and
    /// injects the caBundle: only serve the files.
    #[arg(
        long,
        env = "TUNNEL_CERT_MANAGER",
        requires = "tls_cert",
        conflicts_with = "tls_ca"
    )]
    pub cert_manager: bool,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "TUNNEL_CERT_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub cert_reload_interval: Duration,
    /// Name of the injector's Service (names of the generated certificate).
    #[arg(long, env = "TUNNEL_SERVICE_NAME", default_value = "tunnel-injector")]
    pub service_name: String,
    /// Namespace of the injector's Service.
    #[arg(long, env = "TUNNEL_NAMESPACE", default_value = "cluster-tunnel")]
    pub namespace: String,
    /// MutatingWebhookConfiguration whose caBundle the injector keeps.
    #[arg(
        long,
        env = "TUNNEL_WEBHOOK_CONFIG_NAME",
        default_value = "cluster-tunnel-injector"
    )]
    pub webhook_config_name: String,
    /// Interval of the caBundle re-check.
    #[arg(long, env = "TUNNEL_CA_BUNDLE_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub ca_bundle_resync: Duration,
    /// Most CAs kept in the caBundle with a generated certificate (one per
    /// replica, plus the previous pod's during a rolling update).
    #[arg(long, env = "TUNNEL_CA_BUNDLE_KEEP", default_value_t = crate::ca_bundle::DEFAULT_KEEP)]
    pub ca_bundle_keep: usize,
    /// How long the injector stays up, not ready, on SIGTERM.
    #[command(flatten)]
    pub shutdown: ShutdownDelayArgs<InjectorShutdown>,
    /// Deny pods the injector cannot handle (our own failure) instead of
    /// letting them through without the sidecar.
    #[arg(long, env = "TUNNEL_FAIL_CLOSED")]
    pub fail_closed: bool,

    /// The sidecar image.
    #[arg(long, env = "TUNNEL_SIDECAR_IMAGE")]
    pub sidecar_image: String,

    /// Follow this TunnelConfiguration: its `spec.sidecar` (image, proxy
    /// port, log level, CPU and memory requests) overrides these flags'
    /// defaults, and changes apply to the next pod without a restart.
    #[arg(long, env = "TUNNEL_CONFIG_NAME")]
    pub config_name: Option<String>,
    /// The sidecar's imagePullPolicy (Kubernetes' default when not given).
    #[arg(long, env = "TUNNEL_SIDECAR_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub sidecar_image_pull_policy: Option<String>,
    /// Proxy server client-port address(es) for the sidecar, host:port
    /// (repeatable or comma-separated).
    #[arg(
        long = "server",
        env = "TUNNEL_SERVERS",
        value_delimiter = ',',
        required = true
    )]
    pub servers: Vec<String>,
    /// Name the server certificate must carry (the sidecar's --server-name).
    #[arg(long, env = "TUNNEL_SIDECAR_SERVER_NAME")]
    pub sidecar_server_name: Option<String>,
    /// Secret (in each pod's namespace) with the sidecar's client certificate:
    /// tls.crt, tls.key, ca.crt.
    #[arg(
        long,
        env = "TUNNEL_SIDECAR_CERT_SECRET",
        default_value = tunnel_api::pod::SIDECAR_SECRET
    )]
    pub sidecar_cert_secret: String,
    /// Audience of the sidecar's projected service-account token.
    #[arg(long, env = "TUNNEL_TOKEN_AUDIENCE", default_value = "cluster-tunnel")]
    pub token_audience: String,
    /// Lifetime of that token (at least 10m; the kubelet renews it at 80%).
    #[arg(long, env = "TUNNEL_TOKEN_EXPIRATION", default_value = "1h", value_parser = parse_duration)]
    pub token_expiration: Duration,
    /// The sidecar's admin port (probes, metrics, POST /shutdown).
    #[arg(long, env = "TUNNEL_SIDECAR_ADMIN_PORT", default_value_t = DEFAULT_ADMIN_PORT)]
    pub sidecar_admin_port: u16,
    /// Address the sidecar's admin port binds to: loopback, where its exec
    /// probes ask; 0.0.0.0 (or ::) to let Prometheus scrape its /metrics
    /// from the pod's IP (POST /shutdown still takes loopback only).
    #[arg(long, env = "TUNNEL_SIDECAR_ADMIN_BIND", default_value = "127.0.0.1")]
    pub sidecar_admin_bind: IpAddr,
    /// The sidecar's exec probes: this command (split on spaces, no shell)
    /// plus readyz (startup probe) or healthz (liveness probe), run in its
    /// container.
    #[arg(
        long,
        env = "TUNNEL_SIDECAR_PROBE_COMMAND",
        default_value = "tunnel-sidecar probe"
    )]
    pub sidecar_probe_command: String,
    /// Default port of the sidecar's HTTP proxy, or "off".
    #[arg(long, env = "TUNNEL_SIDECAR_PROXY_PORT", default_value_t = DEFAULT_PROXY_PORT.to_string())]
    pub sidecar_proxy_port: String,
    /// Whether app containers get HTTP_PROXY and friends by default.
    #[arg(long, env = "TUNNEL_SET_PROXY_ENV", default_value_t = true, action = clap::ArgAction::Set)]
    pub set_proxy_env: bool,
    /// Default injection mode: native (Kubernetes 1.29+) or legacy.
    #[arg(
        long,
        env = "TUNNEL_DEFAULT_MODE",
        value_enum,
        default_value = "native"
    )]
    pub default_mode: Mode,
    /// Default log filter of the sidecar.
    #[arg(long, env = "TUNNEL_SIDECAR_LOG_LEVEL", default_value = "info")]
    pub sidecar_log_level: String,
    /// Default CPU request of the sidecar.
    #[arg(long, env = "TUNNEL_SIDECAR_CPU_REQUEST", default_value = "10m")]
    pub sidecar_cpu_request: String,
    /// Default memory request of the sidecar.
    #[arg(long, env = "TUNNEL_SIDECAR_MEMORY_REQUEST", default_value = "32Mi")]
    pub sidecar_memory_request: String,
    /// Default CPU limit of the sidecar (none when not given).
    #[arg(long, env = "TUNNEL_SIDECAR_CPU_LIMIT")]
    pub sidecar_cpu_limit: Option<String>,
    /// Default memory limit of the sidecar (none when not given).
    #[arg(long, env = "TUNNEL_SIDECAR_MEMORY_LIMIT")]
    pub sidecar_memory_limit: Option<String>,
    /// User and group id the sidecar runs as.
    #[arg(long, env = "TUNNEL_SIDECAR_RUN_AS_USER", default_value_t = 65532)]
    pub sidecar_run_as_user: i64,
    /// Time the sidecar gets to become ready before the kubelet restarts it.
    #[arg(long, env = "TUNNEL_SIDECAR_STARTUP_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub sidecar_startup_timeout: Duration,
    /// Legacy mode's postStart command, run in the sidecar's container; it
    /// must block until the sidecar is ready (split on spaces, no shell).
    #[arg(
        long,
        env = "TUNNEL_LEGACY_WAIT_COMMAND",
        default_value = "tunnel-sidecar wait-ready"
    )]
    pub legacy_wait_command: String,
    /// Host of the hub's kube-apiserver, added to NO_PROXY.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    pub apiserver_host: Option<String>,
    /// More NO_PROXY entries for the app containers (repeatable or comma-separated).
    #[arg(long = "no-proxy", env = "TUNNEL_NO_PROXY", value_delimiter = ',')]
    pub no_proxy: Vec<String>,

    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

/// The help of the injector's shutdown flags.
#[derive(Debug, Clone, Copy)]
pub struct InjectorShutdown;

impl ShutdownDelayHelp for InjectorShutdown {
    const SHUTDOWN_DELAY_HELP: &'static str = "On SIGTERM, time to keep answering reviews while \
        not ready, before stopping: the API server keeps calling a replica until the endpoint \
        removal reaches it, so a rollout loses no review";
}

fn quantity(flag: &str, value: &str) -> anyhow::Result<f64> {
    parse_quantity(value).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

impl Cli {
    /// The configuration these flags describe, validated.
    pub fn to_config(&self) -> anyhow::Result<InjectorConfig> {
        anyhow::ensure!(
            !self.sidecar_image.trim().is_empty(),
            "--sidecar-image: must not be empty"
        );
        for s in &self.servers {
            parse_host_port(s).map_err(|e| anyhow::anyhow!("--server: {e}"))?;
        }
        let proxy_port = match self.sidecar_proxy_port.as_str() {
            "off" => None,
            p => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                anyhow::anyhow!("--sidecar-proxy-port: {p:?} is not a port (1-65535) or off")
            })?),
        };
        anyhow::ensure!(
            proxy_port != Some(self.sidecar_admin_port),
            "--sidecar-proxy-port and --sidecar-admin-port are both {}",
            self.sidecar_admin_port
        );
        for (flag, request, limit) in [
            (
                "--sidecar-cpu-request",
                &self.sidecar_cpu_request,
                &self.sidecar_cpu_limit,
            ),
            (
                "--sidecar-memory-request",
                &self.sidecar_memory_request,
                &self.sidecar_memory_limit,
            ),
        ] {
            let r = quantity(flag, request)?;
            if let Some(limit) = limit {
                let l = quantity(&flag.replace("request", "limit"), limit)?;
                anyhow::ensure!(r <= l, "{flag}: {request} is more than the limit {limit}");
            }
        }
        anyhow::ensure!(
            self.token_expiration >= MIN_TOKEN_EXPIRATION,
            "--token-expiration: Kubernetes needs at least 10m"
        );
        let legacy_wait_command: Vec<String> = self
            .legacy_wait_command
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        anyhow::ensure!(
            !legacy_wait_command.is_empty(),
            "--legacy-wait-command: must not be empty"
        );
        let probe_command: Vec<String> = self
            .sidecar_probe_command
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        anyhow::ensure!(
            !probe_command.is_empty(),
            "--sidecar-probe-command: must not be empty"
        );
        anyhow::ensure!(self.ca_bundle_keep >= 1, "--ca-bundle-keep: at least 1");

        let mut no_proxy: Vec<String> = BASE_NO_PROXY.iter().map(|s| (*s).to_owned()).collect();
        for entry in self
            .apiserver_host
            .iter()
            .chain(&self.no_proxy)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            if !no_proxy.iter().any(|e| e == entry) {
                no_proxy.push(entry.to_owned());
            }
        }

        let certs = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => CertSource::Files(CertFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: self.tls_ca.clone(),
            }),
            _ => CertSource::Generated {
                dns_names: service_dns_names(&self.service_name, &self.namespace),
            },
        };
        let ca_bundle_sync = (!self.cert_manager).then(|| CaBundleSync {
            webhook_config_name: self.webhook_config_name.clone(),
            resync: self.ca_bundle_resync,
            keep: self.ca_bundle_keep,
        });
        if let (CertSource::Files(files), Some(_)) = (&certs, &ca_bundle_sync) {
            anyhow::ensure!(
                files.ca.is_some(),
                "--tls-cert without --tls-ca: pass the CA to publish in the caBundle, or --cert-manager when another tool injects it"
            );
        }

        let template = SidecarTemplate {
            image: self.sidecar_image.trim().to_owned(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            servers: self.servers.clone(),
            server_name: self.sidecar_server_name.clone(),
            cert_secret: self.sidecar_cert_secret.clone(),
            token_audience: self.token_audience.clone(),
            token_expiration_seconds: i64::try_from(self.token_expiration.as_secs())
                .unwrap_or(i64::MAX),
            admin_port: self.sidecar_admin_port,
            admin_bind: self.sidecar_admin_bind.to_string(),
            probe_command,
            run_as_user: self.sidecar_run_as_user,
            startup_timeout: self.sidecar_startup_timeout,
            legacy_wait_command,
            no_proxy,
            defaults: Defaults {
                proxy_port,
                set_proxy_env: self.set_proxy_env,
                resources: Resources {
                    cpu_request: Some(self.sidecar_cpu_request.clone()),
                    memory_request: Some(self.sidecar_memory_request.clone()),
                    cpu_limit: self.sidecar_cpu_limit.clone(),
                    memory_limit: self.sidecar_memory_limit.clone(),
                },
                log_level: self.sidecar_log_level.clone(),
                mode: self.default_mode,
            },
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        Ok(InjectorConfig {
            listen: self.listen,
            admin_listen: self.admin.admin_listen,
            certs,
            cert_reload_interval: self.cert_reload_interval.max(Duration::from_millis(100)),
            ca_bundle_sync,
            template,
            fail_closed: self.fail_closed,
            config_name: self.config_name.clone(),
        })
    }
}

/// Runs the command line: the binary's whole `main`.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    cli.log.init();
    let config = cli.to_config()?;
    let shutdown_delay = cli.shutdown.shutdown_delay;
    let client = if config.ca_bundle_sync.is_some() || config.config_name.is_some() {
        Some(kube::Client::try_default().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the Kubernetes API (needed to keep the caBundle, or for --config-name; \
                 pass --cert-manager and leave out --config-name otherwise): {e}"
            )
        })?)
    } else {
        None
    };
    let injector = Injector::start(config, client).await?;
    tunnel_shell::process::termination_signal().await;
    injector.drain();
    tokio::time::sleep(shutdown_delay).await;
    injector.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(
            [
                "tunnel-injector",
                "--sidecar-image",
                "sidecar:1",
                "--server",
                "hub:8090",
            ]
            .into_iter()
            .chain(args.iter().copied()),
        )
    }

    #[test]
    fn defaults_generate_a_certificate_and_keep_the_ca_bundle() {
        let c = cli(&["--apiserver-host", "10.96.0.1"])
            .unwrap()
            .to_config()
            .unwrap();
        assert_eq!(
            c.certs,
            CertSource::Generated {
                dns_names: service_dns_names("tunnel-injector", "cluster-tunnel")
            }
        );
        let sync = c.ca_bundle_sync.unwrap();
        assert_eq!(sync.webhook_config_name, "cluster-tunnel-injector");
        assert_eq!(
            c.template.no_proxy,
            [
                "localhost",
                "127.0.0.1",
                "::1",
                ".svc",
                ".cluster.local",
                "10.96.0.1"
            ]
        );
        assert_eq!(c.template.defaults.proxy_port, Some(17080));
        assert_eq!(c.template.defaults.mode, Mode::Native);
        assert_eq!(c.template.token_expiration_seconds, 3600);
        assert_eq!(
            c.template.legacy_wait_command,
            ["tunnel-sidecar", "wait-ready"]
        );
        // The admin port stays on loopback, where the exec probes ask.
        assert_eq!(c.template.admin_bind, "127.0.0.1");
        assert_eq!(c.template.probe_command, ["tunnel-sidecar", "probe"]);
    }

    #[test]
    fn cert_manager_serves_files_and_leaves_the_bundle_alone() {
        let c = cli(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--cert-manager",
        ])
        .unwrap()
        .to_config()
        .unwrap();
        assert!(matches!(c.certs, CertSource::Files(_)));
        assert!(c.ca_bundle_sync.is_none());
        let err = cli(&["--tls-cert", "c.pem", "--tls-key", "k.pem"])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        assert!(
            cli(&["--cert-manager"]).is_err(),
            "--cert-manager needs files"
        );
        assert!(
            cli(&["--tls-cert", "c.pem"]).is_err(),
            "a cert needs its key"
        );
    }

    #[test]
    fn bad_flags_are_named() {
        for (args, flag) in [
            (
                &["--sidecar-cpu-request", "lots"][..],
                "--sidecar-cpu-request",
            ),
            (
                &[
                    "--sidecar-memory-request",
                    "1Gi",
                    "--sidecar-memory-limit",
                    "64Mi",
                ],
                "--sidecar-memory-request",
            ),
            (&["--token-expiration", "5m"], "--token-expiration"),
            (&["--sidecar-proxy-port", "17090"], "--sidecar-proxy-port"),
            (&["--server", "nohost"], "--server"),
        ] {
            let err = cli(args).unwrap().to_config().unwrap_err();
            assert!(err.to_string().contains(flag), "{args:?}: {err}");
        }
        let err = Cli::try_parse_from(["tunnel-injector", "--server", "hub:8090"]).unwrap_err();
        assert!(err.to_string().contains("--sidecar-image"), "{err}");
    }
}
