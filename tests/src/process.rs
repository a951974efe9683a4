//! The workspace's binaries as child processes: where they are, a child
//! killed on drop with its log, free ports for it to listen on, and a
//! server and agents started as a user would start them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{wait_listening, wait_ready};

/// The directory of the workspace's binaries for the current profile.
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    if deps.ends_with("deps") {
        deps.parent().expect("profile dir").to_owned()
    } else {
        deps.to_owned()
    }
}

/// The path of a workspace binary; panics with how to build it if missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace`; \
         `cargo test --workspace` and `cargo nextest run --workspace` build them)",
        path.display()
    );
    path
}

/// A child process killed on drop, its output in a log file.
pub struct Proc {
    /// Short name for messages.
    pub name: String,
    child: Child,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Proc {
    /// Spawns a workspace binary with `args` and `envs`, output into a log file.
    pub fn spawn(name: &str, binary: &str, args: &[String], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin(binary));
        cmd.args(args).envs(envs.iter().copied());
        Self::spawn_command(name, cmd)
    }

    /// Spawns `cmd` (e.g. a binary run through `ip netns exec`), output into
    /// a log file, killed on drop.
    pub fn spawn_command(name: &str, mut cmd: Command) -> Self {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("TUNNEL_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.into(),
            child,
            log,
            _log_dir: log_dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (e.g. "TERM", "KILL").
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits up to `deadline` for the process to exit; returns its status.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process now and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log -----\n{}\n----- end of {} log -----",
                self.name,
                self.logs(),
                self.name
            );
        }
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Addresses of a server process's three ports.
#[derive(Debug, Clone, Copy)]
pub struct ServerAddrs {
    /// Agent port.
    pub agent: SocketAddr,
    /// Client port.
    pub client: SocketAddr,
    /// Admin port.
    pub admin: SocketAddr,
}

impl ServerAddrs {
    /// Three free loopback ports.
    pub fn free() -> Self {
        Self {
            agent: free_addr(),
            client: free_addr(),
            admin: free_addr(),
        }
    }
}

/// A free loopback address for a process to listen on later.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_listen_port()))
}

/// A free loopback port below the kernel's ephemeral range, so that no
/// outgoing connection takes it before a child process binds it.
pub fn free_listen_port() -> u16 {
    port_of(&hold_listen_port())
}

/// `N` distinct free loopback ports, as [`free_listen_port`]: each stays
/// bound until all are picked, so that no two picks can be the same port
/// (the ports of one process's several listeners).
pub fn free_listen_ports<const N: usize>() -> [u16; N] {
    let held: [std::net::TcpListener; N] = std::array::from_fn(|_| hold_listen_port());
    held.each_ref().map(port_of)
}

fn port_of(listener: &std::net::TcpListener) -> u16 {
    listener.local_addr().unwrap().port()
}

/// A listener on a free loopback port below the kernel's ephemeral range
/// (on any free port if none is found there).
fn hold_listen_port() -> std::net::TcpListener {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let floor = 10_000u16.min(low.saturating_sub(1000));
    for _ in 0..1000 {
        let port = floor + rand::random::<u16>() % (low - floor);
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Starts the `tunnel-server` binary on `addrs` with the certificates in
/// `cert_dir`, plus `extra` flags, and waits until its ports listen.
pub async fn spawn_server(
    name: &str,
    cert_dir: &Path,
    addrs: &ServerAddrs,
    extra: &[&str],
) -> Proc {
    let mut args: Vec<String> = [
        "--agent-listen",
        &addrs.agent.to_string(),
        "--client-listen",
        &addrs.client.to_string(),
        "--admin-listen",
        &addrs.admin.to_string(),
        "--cert-dir",
        &cert_dir.display().to_string(),
        "--log-format",
        "text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Authorization off unless the test names a policy.
    if !extra.iter().any(|a| a.starts_with("--policy")) {
        args.push("--allow-all".into());
    }
    // Ready at once and stopped without delay unless the test says otherwise
    // (the rollout tests run with the defaults).
    for (flag, value) in [("--ready-wait", "0s"), ("--shutdown-delay", "0s")] {
        if !extra.iter().any(|a| a.starts_with(flag)) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let proc = Proc::spawn(name, "tunnel-server", &args, &[]);
    wait_listening(addrs.client, name).await;
    wait_listening(addrs.agent, name).await;
    wait_ready(addrs.admin, name).await;
    proc
}

/// Flags of a `tunnel-agent` for `cluster` dialing `server` (as a user
/// would write them), plus `extra`.
pub fn agent_args(
    cert_dir: &Path,
    cluster: &str,
    server: SocketAddr,
    admin: SocketAddr,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--server",
        &server.to_string(),
        "--server-name",
        "localhost",
        "--cluster",
        cluster,
        "--cert-dir",
        &cert_dir.display().to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--reconnect-base",
        "50ms",
        "--reconnect-max",
        "1s",
        "--log-format",
        "text",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts the `tunnel-agent` binary (allowed to dial loopback) without
/// waiting for its tunnel.
pub fn spawn_agent(
    name: &str,
    cert_dir: &Path,
    cluster: &str,
    server: SocketAddr,
    admin: SocketAddr,
) -> Proc {
    let args = agent_args(
        cert_dir,
        cluster,
        server,
        admin,
        &["--allow", "127.0.0.0/8"],
    );
    Proc::spawn(name, "tunnel-agent", &args, &[])
}

/// The arguments of a `tunnel-sidecar` process with the client certificate
/// `sidecar` from `cert_dir`, reaching `servers` (as `localhost`), its admin
/// port on `admin` and text logs; ports and the proxy are the caller's to add.
pub fn sidecar_args(cert_dir: &Path, servers: &[SocketAddr], admin: SocketAddr) -> Vec<String> {
    let mut args = Vec::new();
    for server in servers {
        args.extend(["--server".to_string(), server.to_string()]);
    }
    args.extend(
        [
            "--server-name",
            "localhost",
            "--cert-dir",
            &cert_dir.display().to_string(),
            "--client-name",
            "sidecar",
            "--admin-listen",
            &admin.to_string(),
            "--log-format",
            "text",
        ]
        .map(String::from),
    );
    args
}

impl Proc {
    /// Waits until the log holds at least `n` lines containing every one of
    /// `parts`; panics after `deadline`.
    pub async fn wait_log(&self, parts: &[&str], n: usize, deadline: Duration) {
        let count = || {
            self.logs()
                .lines()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .count()
        };
        let start = Instant::now();
        while count() < n {
            assert!(
                start.elapsed() < deadline,
                "{} did not log {n} line(s) containing {parts:?} within {deadline:?} (found {})",
                self.name,
                count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
