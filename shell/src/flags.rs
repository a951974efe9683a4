//! The flag groups every command line flattens (`#[command(flatten)]`), so
//! that a flag shared by several binaries is defined once: its name,
//! environment variable, default, help and what the binary makes of it.
//!
//! - [`LogArgs`]: `--log-format`, `--log-level`;
//! - [`AdminArgs`]: `--admin-listen`, with each binary's default port;
//! - [`TlsArgs`]: `--tls-cert`, `--tls-key` and `--ca`, each replacing the
//!   file of `--cert-dir` (the override logic, [`TlsArgs::files`]);
//! - [`ServerArgs`]: `--server` (the proxy servers to dial) and `--server-name`;
//! - [`FlowArgs`]: the flow control of tunnel connections;
//! - [`DeadPeerArgs`]: `--dead-peer-timeout`, the liveness of tunnel connections;
//! - [`DrainArgs`] and [`ShutdownDelayArgs`]: `--drain-timeout` and
//!   `--shutdown-delay`, what a binary does on SIGTERM (each binary words
//!   their help through a [`DrainHelp`] and [`ShutdownDelayHelp`] type).
//!
//! What differs between binaries is which side of a tunnel connection they
//! are on: a [`Side`] type ([`ServerSide`], [`AgentSide`], [`ClientSide`])
//! gives the words of their help (whose certificate, which port of the server).

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tunnel_proto::h2::{
    CONNECTION_WINDOW, DEFAULT_MAX_CONCURRENT_STREAMS, H2Settings, MAX_WINDOW_BUDGET,
};
use tunnel_proto::net::Liveness;
use tunnel_proto::tls::TlsFiles;

use crate::logging::{LogFormat, init_logging};
use crate::units::{ValueError, parse_bytes, parse_duration};

/// The side of a tunnel connection a binary is on: the words of its TLS
/// and `--server` flags.
pub trait Side {
    /// Whose certificate `--tls-cert` and `--tls-key` name.
    const HOLDER: &'static str;
    /// What `--ca` is for.
    const CA_HELP: &'static str;
    /// What `--dead-peer-timeout` declares dead.
    const DEAD_PEER_HELP: &'static str;
}

/// A side that dials the proxy servers (`--server`).
pub trait Dialer: Side {
    /// What `--server` is.
    const SERVERS_HELP: &'static str;
}

/// The proxy server: serves agents and clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerSide;

/// An agent: dials the servers' agent port.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentSide;

/// A client (sidecar, manager, tool): dials the servers' client port.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientSide;

impl Side for ServerSide {
    const HOLDER: &'static str = "Server";
    const CA_HELP: &'static str =
        "CA bundle that agent and client certificates must chain to; overrides --cert-dir";
    const DEAD_PEER_HELP: &'static str = "A tunnel peer that answers nothing for this long is declared dead, and so is an HTTP/1.1 client that acknowledges nothing of what is sent to it (one that only stops reading is waited for)";
}

impl Side for AgentSide {
    const HOLDER: &'static str = "Agent";
    const CA_HELP: &'static str =
        "CA bundle the server certificate must chain to; overrides --cert-dir";
    const DEAD_PEER_HELP: &'static str = "A server that answers nothing for this long is declared dead, and so is a destination that acknowledges nothing of what is sent to it (one that only stops reading is waited for)";
}

impl Side for ClientSide {
    const HOLDER: &'static str = "Client";
    const CA_HELP: &'static str = AgentSide::CA_HELP;
    const DEAD_PEER_HELP: &'static str =
        "A server that answers nothing for this long is declared dead";
}

impl Dialer for AgentSide {
    const SERVERS_HELP: &'static str = "Proxy server address(es), host:port; a DNS name that \
        resolves to several replicas gets a tunnel to each (repeatable or comma-separated)";
}

impl Dialer for ClientSide {
    const SERVERS_HELP: &'static str = "Proxy server client-port address(es), host:port \
        (repeatable or comma-separated; more than one for HA)";
}

/// `--log-format` and `--log-level`.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "TUNNEL_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Log filter (RUST_LOG overrides).
    #[arg(long, env = "TUNNEL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl LogArgs {
    /// Installs the logger these flags describe.
    pub fn init(&self) {
        init_logging(self.log_format, &self.log_level);
    }
}

/// `--admin-listen`, by default on every address at `PORT` (each binary
/// has its own, so that they can share a host).
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs<const PORT: u16> {
    /// Address of the admin port (/healthz, /readyz, /metrics).
    #[arg(long, env = "TUNNEL_ADMIN_LISTEN", default_value = Self::DEFAULT_LISTEN)]
    pub admin_listen: SocketAddr,
}

impl<const PORT: u16> AdminArgs<PORT> {
    // The default is text made at compile time: clap's `default_value_t`
    // keeps the text it makes in a static, which generic code shares
    // between every PORT (the first binary's port would be everyone's).
    const LISTEN: ([u8; 13], usize) = listen_on_every_address(PORT);
    const LISTEN_BYTES: &'static [u8] = &Self::LISTEN.0;
    /// `0.0.0.0:<PORT>`.
    pub const DEFAULT_LISTEN: &'static str =
        match std::str::from_utf8(Self::LISTEN_BYTES.split_at(Self::LISTEN.1).0) {
            Ok(text) => text,
            Err(_) => panic!("an address is ASCII"),
        };
}

/// `0.0.0.0:<port>` as ASCII in a fixed buffer, and its length.
const fn listen_on_every_address(port: u16) -> ([u8; 13], usize) {
    const PREFIX: usize = "0.0.0.0:".len();
    let mut text = *b"0.0.0.0:00000";
    let mut digits = [0u8; 5];
    let (mut count, mut rest) = (0, port);
    loop {
        digits[count] = b'0' + (rest % 10) as u8;
        count += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut i = 0;
    while i < count {
        text[PREFIX + i] = digits[count - 1 - i];
        i += 1;
    }
    (text, PREFIX + count)
}

/// `--tls-cert`, `--tls-key` and `--ca`: files that replace those of the
/// binary's `--cert-dir` (whose names each binary knows).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs<S: Side> {
    // The certificate chain.
    #[arg(
        long,
        env = "TUNNEL_TLS_CERT",
        help = format!("{} certificate chain (PEM); overrides the one in --cert-dir", S::HOLDER)
    )]
    pub tls_cert: Option<PathBuf>,
    // The private key.
    #[arg(
        long,
        env = "TUNNEL_TLS_KEY",
        help = format!("{} private key (PEM); overrides the one in --cert-dir", S::HOLDER)
    )]
    pub tls_key: Option<PathBuf>,
    // The CA bundle peers must chain to.
    #[arg(long, env = "TUNNEL_CA", help = S::CA_HELP)]
    pub ca: Option<PathBuf>,
    #[arg(skip)]
    side: PhantomData<S>,
}

impl<S: Side> TlsArgs<S> {
    /// Flags with these values (as a configuration file gives them).
    pub fn new(tls_cert: Option<PathBuf>, tls_key: Option<PathBuf>, ca: Option<PathBuf>) -> Self {
        Self {
            tls_cert,
            tls_key,
            ca,
            side: PhantomData,
        }
    }

    /// Each flag that was not given taken from `fallback`.
    pub fn or(&self, fallback: Self) -> Self {
        Self::new(
            self.tls_cert.clone().or(fallback.tls_cert),
            self.tls_key.clone().or(fallback.tls_key),
            self.ca.clone().or(fallback.ca),
        )
    }

    /// The files of the identity `name` in `dir` (`<name>.pem`,
    /// `<name>-key.pem` and `ca.pem`, as `tunnel-server certs` writes
    /// them), each replaced by the file its flag names.
    pub fn files(&self, dir: &Path, name: &str) -> TlsFiles {
        let mut files = TlsFiles::in_dir(dir, name);
        if let Some(cert) = &self.tls_cert {
            files.cert = cert.clone();
        }
        if let Some(key) = &self.tls_key {
            files.key = key.clone();
        }
        if let Some(ca) = &self.ca {
            files.ca = ca.clone();
        }
        files
    }
}

/// `--server` and `--server-name`: the proxy servers a binary dials.
/// `--server` is required unless `REQUIRED` is false (for a binary that
/// may read the servers from a configuration file instead).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs<S: Dialer, const REQUIRED: bool = true> {
    // The servers' addresses, `host:port`.
    #[arg(
        long = "server",
        env = "TUNNEL_SERVERS",
        value_delimiter = ',',
        required = REQUIRED,
        help = S::SERVERS_HELP
    )]
    pub servers: Vec<String>,
    /// The name the server certificate must carry (default: each address's host).
    #[arg(long, env = "TUNNEL_SERVER_NAME")]
    pub server_name: Option<String>,
    #[arg(skip)]
    side: PhantomData<S>,
}

fn parse_window(s: &str) -> Result<u32, ValueError> {
    let v = parse_bytes(s)?;
    if !(1024..=u64::from(CONNECTION_WINDOW)).contains(&v) {
        return Err(ValueError::OutOfRange {
            kind: "window",
            value: s.to_owned(),
            range: "must be between 1KiB and 2GiB - 1 byte",
        });
    }
    Ok(v as u32)
}

/// Flow-control flags that contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The floor is above the ceiling.
    #[error("--min-stream-window is larger than --max-stream-window")]
    InvertedWindows,
    /// The budget cannot hold one full stream, or exceeds what a connection's window can.
    #[error(
        "--window-budget must be between --max-stream-window and {MAX_WINDOW_BUDGET} bytes (1536MiB)"
    )]
    Budget,
}

/// Flow-control flags of tunnel connections (see [`tunnel_proto::h2`]).
#[derive(Debug, Clone, clap::Args)]
pub struct FlowArgs {
    /// Receive window of a new stream (one proxied connection) on a tunnel
    /// connection; adapts between --min-stream-window and --max-stream-window.
    #[arg(long, env = "TUNNEL_STREAM_WINDOW", default_value = "256KiB", value_parser = parse_window)]
    pub stream_window: u32,
    /// Floor of the stream window when many streams share a connection's budget.
    #[arg(long, env = "TUNNEL_MIN_STREAM_WINDOW", default_value = "64KiB", value_parser = parse_window)]
    pub min_stream_window: u32,
    /// Ceiling of the stream window that the bandwidth-delay estimate may
    /// reach on a long fat link; also the most one stalled stream may hold.
    #[arg(long, env = "TUNNEL_MAX_STREAM_WINDOW", default_value = "16MiB", value_parser = parse_window)]
    pub max_stream_window: u32,
    /// What the open streams of one tunnel connection may hold together, at
    /// most: beyond it new streams are refused (resource_exhausted). At most 1536MiB.
    #[arg(long, env = "TUNNEL_WINDOW_BUDGET", default_value = "1GiB", value_parser = parse_bytes)]
    pub window_budget: u64,
    /// Streams the peer may open on one tunnel connection.
    #[arg(long, env = "TUNNEL_MAX_STREAMS_PER_CONNECTION", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_streams_per_connection: u32,
}

impl FlowArgs {
    /// The HTTP/2 settings these flags give, with `liveness`.
    pub fn settings(&self, liveness: Liveness) -> Result<H2Settings, FlowError> {
        if self.min_stream_window > self.max_stream_window {
            return Err(FlowError::InvertedWindows);
        }
        if !(u64::from(self.max_stream_window)..=MAX_WINDOW_BUDGET).contains(&self.window_budget) {
            return Err(FlowError::Budget);
        }
        Ok(H2Settings {
            stream_window: self.stream_window,
            min_stream_window: self.min_stream_window,
            max_stream_window: self.max_stream_window,
            window_budget: self.window_budget,
            max_concurrent_streams: self.max_streams_per_connection,
            liveness,
            ..H2Settings::default()
        })
    }
}

/// `--dead-peer-timeout`: how long a tunnel connection may answer nothing
/// before its peer is declared dead.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadPeerArgs<S: Side> {
    // The timeout.
    #[arg(
        long,
        env = "TUNNEL_DEAD_PEER_TIMEOUT",
        default_value = "20s",
        value_parser = parse_duration,
        help = S::DEAD_PEER_HELP
    )]
    pub dead_peer_timeout: Duration,
    #[arg(skip)]
    side: PhantomData<S>,
}

impl<S: Side> DeadPeerArgs<S> {
    /// The keepalive pings these flags give.
    pub fn liveness(&self) -> Liveness {
        Liveness::from_timeout(self.dead_peer_timeout)
    }
}

/// The help of a binary's `--drain-timeout`: what SIGTERM waits for.
pub trait DrainHelp {
    /// What `--drain-timeout` waits for.
    const DRAIN_TIMEOUT_HELP: &'static str = "Time open connections get to finish after SIGTERM";
}

/// The help of a binary's `--shutdown-delay`: what it does before it stops.
pub trait ShutdownDelayHelp {
    /// What the binary does during `--shutdown-delay`.
    const SHUTDOWN_DELAY_HELP: &'static str;
}

/// `--drain-timeout`: time open connections get to finish after SIGTERM.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs<H: DrainHelp> {
    // The timeout.
    #[arg(
        long,
        env = "TUNNEL_DRAIN_TIMEOUT",
        default_value = "30s",
        value_parser = parse_duration,
        help = H::DRAIN_TIMEOUT_HELP
    )]
    pub drain_timeout: Duration,
    #[arg(skip)]
    help: PhantomData<H>,
}

/// `--shutdown-delay`: on SIGTERM, time a binary keeps serving while not
/// ready, so that endpoints stop sending it work before it stops.
#[derive(Debug, Clone, clap::Args)]
pub struct ShutdownDelayArgs<H: ShutdownDelayHelp> {
    // The delay.
    #[arg(
        long,
        env = "TUNNEL_SHUTDOWN_DELAY",
        default_value = "5s",
        value_parser = parse_duration,
        help = H::SHUTDOWN_DELAY_HELP
    )]
    pub shutdown_delay: Duration,
    #[arg(skip)]
    help: PhantomData<H>,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    /// A command line of one binary's groups, as a component flattens them.
    #[derive(Debug, Parser)]
    struct AgentCli {
        #[command(flatten)]
        servers: ServerArgs<AgentSide>,
        #[command(flatten)]
        tls: TlsArgs<AgentSide>,
        #[command(flatten)]
        admin: AdminArgs<8093>,
        #[command(flatten)]
        log: LogArgs,
    }

    #[derive(Debug, Parser)]
    struct ServerCli {
        #[command(flatten)]
        tls: TlsArgs<ServerSide>,
        #[command(flatten)]
        flow: FlowArgs,
    }

    /// `(flag, env, default, help)` of every flag of `cmd`, in order.
    fn flags(cmd: &clap::Command) -> Vec<(String, String, String, String)> {
        cmd.get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .map(|a| {
                (
                    format!("--{}", a.get_long().unwrap_or_default()),
                    a.get_env()
                        .map(|e| e.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    a.get_default_values()
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(","),
                    a.get_help().map(|h| h.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn the_groups_define_the_flags_binaries_have_always_had() {
        let owned = flags(&AgentCli::command());
        let got: Vec<(&str, &str, &str, &str)> = owned
            .iter()
            .map(|(f, e, d, h)| (f.as_str(), e.as_str(), d.as_str(), h.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "--server",
                    "TUNNEL_SERVERS",
                    "",
                    "Proxy server address(es), host:port; a DNS name that resolves to several \
                     replicas gets a tunnel to each (repeatable or comma-separated)"
                ),
                (
                    "--server-name",
                    "TUNNEL_SERVER_NAME",
                    "",
                    "The name the server certificate must carry (default: each address's host)"
                ),
                (
                    "--tls-cert",
                    "TUNNEL_TLS_CERT",
                    "",
                    "Agent certificate chain (PEM); overrides the one in --cert-dir"
                ),
                (
                    "--tls-key",
                    "TUNNEL_TLS_KEY",
                    "",
                    "Agent private key (PEM); overrides the one in --cert-dir"
                ),
                (
                    "--ca",
                    "TUNNEL_CA",
                    "",
                    "CA bundle the server certificate must chain to; overrides --cert-dir"
                ),
                (
                    "--admin-listen",
                    "TUNNEL_ADMIN_LISTEN",
                    "0.0.0.0:8093",
                    "Address of the admin port (/healthz, /readyz, /metrics)"
                ),
                ("--log-format", "TUNNEL_LOG_FORMAT", "json", "Log format"),
                (
                    "--log-level",
                    "TUNNEL_LOG_LEVEL",
                    "info",
                    "Log filter (RUST_LOG overrides)"
                ),
            ]
        );
        let server = flags(&ServerCli::command());
        assert_eq!(
            server[0].3,
            "Server certificate chain (PEM); overrides the one in --cert-dir"
        );
        assert_eq!(
            server[2].3,
            "CA bundle that agent and client certificates must chain to; overrides --cert-dir"
        );
    }

    #[test]
    fn every_binary_keeps_its_own_admin_port() {
        #[derive(Debug, Parser)]
        struct Both {
            #[command(flatten)]
            agent: AgentCli,
        }
        #[derive(Debug, Parser)]
        struct Manager {
            #[command(flatten)]
            admin: AdminArgs<8095>,
        }
        let listen = |cmd: clap::Command| {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == "admin_listen")
                .expect("--admin-listen")
                .clone();
            arg.get_default_values()[0].to_string_lossy().into_owned()
        };
        // In one process, as in the tests that read every binary's flags.
        assert_eq!(listen(Both::command()), "0.0.0.0:8093");
        assert_eq!(listen(Manager::command()), "0.0.0.0:8095");
        assert_eq!(AdminArgs::<0>::DEFAULT_LISTEN, "0.0.0.0:0");
        assert_eq!(AdminArgs::<65535>::DEFAULT_LISTEN, "0.0.0.0:65535");
        let manager = Manager::try_parse_from(["m"]).unwrap();
        assert_eq!(manager.admin.admin_listen, "0.0.0.0:8095".parse().unwrap());
    }

    #[test]
    fn a_dialer_needs_a_server_and_takes_a_comma_separated_list() {
        let err = AgentCli::try_parse_from(["agent"]).unwrap_err();
        assert!(err.to_string().contains("--server"), "{err}");
        let cli =
            AgentCli::try_parse_from(["agent", "--server", "a:1,b:2", "--server", "c:3"]).unwrap();
        assert_eq!(cli.servers.servers, ["a:1", "b:2", "c:3"]);
        assert_eq!(cli.admin.admin_listen, "0.0.0.0:8093".parse().unwrap());
        assert_eq!(cli.log.log_format, LogFormat::Json);
    }

    #[test]
    fn each_tls_flag_replaces_only_its_own_file_of_the_cert_dir() {
        let dir = Path::new("/certs");
        let cli = AgentCli::try_parse_from(["agent", "--server", "hub:8091"]).unwrap();
        let files = cli.tls.files(dir, "agent-east");
        assert_eq!(files.cert, Path::new("/certs/agent-east.pem"));
        assert_eq!(files.key, Path::new("/certs/agent-east-key.pem"));
        assert_eq!(files.ca, Path::new("/certs/ca.pem"));

        let cli =
            AgentCli::try_parse_from(["agent", "--server", "h:1", "--tls-cert", "/m/tls.crt"])
                .unwrap();
        let files = cli.tls.files(dir, "agent-east");
        assert_eq!(files.cert, Path::new("/m/tls.crt"));
        assert_eq!(files.key, Path::new("/certs/agent-east-key.pem"));
        assert_eq!(files.ca, Path::new("/certs/ca.pem"));

        let cli = AgentCli::try_parse_from([
            "agent",
            "--server",
            "h:1",
            "--tls-key",
            "/m/tls.key",
            "--ca",
            "/m/ca.crt",
        ])
        .unwrap();
        let files = cli.tls.files(dir, "agent-east");
        assert_eq!(files.cert, Path::new("/certs/agent-east.pem"));
        assert_eq!(files.key, Path::new("/m/tls.key"));
        assert_eq!(files.ca, Path::new("/m/ca.crt"));
    }

    #[test]
    fn flags_win_over_a_configuration_file() {
        let flags = TlsArgs::<ClientSide>::new(Some("flag.pem".into()), None, None);
        let file = TlsArgs::new(Some("file.pem".into()), Some("file-key.pem".into()), None);
        let files = flags.or(file).files(Path::new("d"), "client-sidecar");
        assert_eq!(files.cert, Path::new("flag.pem"));
        assert_eq!(files.key, Path::new("file-key.pem"));
        assert_eq!(files.ca, Path::new("d/ca.pem"));
    }

    #[test]
    fn flow_flags_refuse_a_budget_the_connection_window_cannot_hold() {
        let live = Liveness::default();
        let ok = ServerCli::parse_from(["x"]).flow.settings(live).unwrap();
        assert_eq!(ok.window_budget, 1 << 30);
        let big = ServerCli::parse_from(["x", "--window-budget", "2GiB"]);
        assert_eq!(big.flow.settings(live).unwrap_err(), FlowError::Budget);
        assert!(
            FlowError::Budget.to_string().contains("--window-budget"),
            "names the flag"
        );
        let inverted = ServerCli::parse_from([
            "x",
            "--min-stream-window",
            "1MiB",
            "--max-stream-window",
            "512KiB",
        ]);
        assert_eq!(
            inverted.flow.settings(live).unwrap_err(),
            FlowError::InvertedWindows
        );
        let err = ServerCli::try_parse_from(["x", "--stream-window", "512"]).unwrap_err();
        assert!(err.to_string().contains("between 1KiB"), "{err}");
    }
}
