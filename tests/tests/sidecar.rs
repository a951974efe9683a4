//! The sidecar end to end: the real `tunnel-sidecar` binary, configured by
//! flags as a user would, in front of an in-process server and agents for
//! `east` and `west`, used by real clients (curl, Python's standard library)
//! and by raw bytes where a test needs a client to misbehave.
//!
//! Each cluster's services listen on the cluster's own loopback address
//! (east 127.0.1.1, west 127.0.2.1) on the same ports, each agent may dial
//! only its own cluster's addresses and knows them by in-cluster names
//! (`hello.default.svc`, `echo.default.svc`, `kubernetes.default.svc`), as
//! cluster DNS would. The hello services answer `hello from <cluster>`, so
//! every answer says which cluster it came from.
//!
//! The hub's own Service `backend` in namespace `team` listens on 127.0.3.1
//! and answers `hello from hub`. The sidecar knows it by its short name and
//! by `backend.team` through `--host-alias` entries, standing in for the
//! pod's resolver and its search domains (`team.svc.cluster.local`, ...),
//! which the sidecar uses for direct connections in a real pod. No agent may
//! dial 127.0.3.1, so an answer from it came straight from the sidecar. The
//! sidecar never dials loopback addresses directly (they are the pod's own
//! ports), so every sidecar here allows that one with `--direct-allow-ip`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tunnel_agent::Agent;
use tunnel_agent::allowlist::Allowlist;
use tunnel_server::Server;
use tunnel_tests::*;

const CLUSTERS: [&str; 2] = ["east", "west"];
/// Agents' dial timeout unless a test needs a short one.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Every answer a test waits for arrives within this, or the test fails.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// The loopback address of the hub's own Service `backend.team`.
const HUB_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1));
/// The `--host-alias` entries that resolve the hub Service's names.
const HUB_ALIASES: &str = "backend=127.0.3.1,backend.team=127.0.3.1";
/// What the sidecars here may dial directly although it is loopback: the
/// stand-in for the hub's network, [`HUB_IP`].
const HUB_ALLOWED: &str = "127.0.3.1";

/// The loopback address standing for a cluster's network.
fn cluster_ip(cluster: &str) -> IpAddr {
    match cluster {
        "east" => IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1)),
        "west" => IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1)),
        other => panic!("no network for cluster {other}"),
    }
}

/// The ports of each cluster's services (the same in both clusters).
#[derive(Debug, Clone, Copy)]
struct Services {
    /// `hello.default.svc`, HTTP.
    http: u16,
    /// `hello.default.svc`, HTTPS with a certificate from the installation's CA.
    https: u16,
    /// `echo.default.svc`.
    echo: u16,
    /// The hub's `backend.team`, HTTP, on [`HUB_IP`].
    hub_http: u16,
    /// The hub's `backend.team`, HTTPS (certificate for `backend.team`).
    hub_https: u16,
}

/// A listener on `addr` with an accept queue of 4096 rather than tokio's
/// 128 (the kernel caps it at `net.core.somaxconn`): the echo services take
/// bursts of 1,000 connections.
fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// One listener per address, all on the same port.
async fn listeners_on_one_port(ips: &[IpAddr]) -> (u16, Vec<TcpListener>) {
    for _ in 0..100 {
        let first = listen_on(SocketAddr::new(ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let mut all = vec![first];
        for ip in &ips[1..] {
            match listen_on(SocketAddr::new(*ip, port)) {
                Ok(l) => all.push(l),
                Err(_) => break,
            }
        }
        if all.len() == ips.len() {
            return (port, all);
        }
    }
    panic!("found no port free on all of {ips:?}");
}

/// A port on `ip` that nothing listens on.
fn closed_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A listener on `ip` whose accept queue is full: it never accepts and the
/// kernel drops further SYNs, so a dial neither connects nor is refused.
struct BlackHole {
    addr: SocketAddr,
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
}

async fn black_hole(ip: IpAddr) -> BlackHole {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip, 0)).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => queued.push(tcp),
            Ok(Err(e)) => panic!("filling the accept queue of {addr}: {e}"),
            Err(_) => {
                return BlackHole {
                    addr,
                    _listener: listener,
                    _queued: queued,
                };
            }
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// Certificates (with a client `sidecar`) and both clusters' services.
struct Clusters {
    pki: Pki,
    svc: Services,
}

impl Clusters {
    async fn new() -> Self {
        init();
        let pki = Pki::new(&CLUSTERS, &["sidecar"]);
        let ips = CLUSTERS.map(cluster_ip);
        let tls = pki.sample_tls(&[
            "hello.default.svc",
            "hello.default.svc.east.tunnel.internal",
            "hello.default.svc.west.tunnel.internal",
            "backend.team",
        ]);
        let (http, ls) = listeners_on_one_port(&ips).await;
        for (l, name) in ls.into_iter().zip(CLUSTERS) {
            spawn_http_hello(l, name);
        }
        let (https, ls) = listeners_on_one_port(&ips).await;
        for (l, name) in ls.into_iter().zip(CLUSTERS) {
            spawn_https_hello(l, name, tls.clone());
        }
        let (echo, ls) = listeners_on_one_port(&ips).await;
        ls.into_iter().for_each(spawn_echo);
        let hub = listen_on(SocketAddr::new(HUB_IP, 0)).unwrap();
        let hub_http = hub.local_addr().unwrap().port();
        spawn_http_hello(hub, "hub");
        let hub = listen_on(SocketAddr::new(HUB_IP, 0)).unwrap();
        let hub_https = hub.local_addr().unwrap().port();
        spawn_https_hello(hub, "hub", tls);
        Self {
            pki,
            svc: Services {
                http,
                https,
                echo,
                hub_http,
                hub_https,
            },
        }
    }

    /// The CA that signed the services' certificate.
    fn ca(&self) -> PathBuf {
        self.pki.path("ca.pem")
    }

    async fn server(
        &self,
        known_clusters: &[&str],
        dial_timeout: Duration,
        client_listen: SocketAddr,
    ) -> Server {
        let mut config = server_config(&self.pki);
        config.known_clusters = known_clusters.iter().map(|s| s.to_string()).collect();
        config.dial_timeout = dial_timeout;
        config.client_listen = client_listen;
        Server::start(config).await.expect("server starts")
    }

    /// An agent that may dial only its own cluster's network and knows its
    /// services by their in-cluster names.
    async fn agent(&self, cluster: &str, server: &Server, dial_timeout: Duration) -> Agent {
        let ip = cluster_ip(cluster);
        let mut config = agent_config(&self.pki, cluster, &[server.agent_addr]);
        let IpAddr::V4(v4) = ip else { unreachable!() };
        let [a, b, c, _] = v4.octets();
        config.allowlist = Allowlist::parse(&[format!("{a}.{b}.{c}.0/24")]).unwrap();
        config.host_aliases = [
            "hello.default.svc",
            "echo.default.svc",
            "kubernetes.default.svc",
        ]
        .into_iter()
        .map(|n| (n.to_string(), ip))
        .collect();
        config.dial_timeout = dial_timeout;
        start_agent_with(config, server).await
    }

    /// Starts the `tunnel-sidecar` binary against the server at `server`
    /// with a per-cluster port for each cluster's hello service, plus `extra`
    /// flags; does not wait for it.
    fn sidecar(&self, server: SocketAddr, extra: &[&str]) -> SidecarProc {
        let (proxy, admin) = (free_addr(), free_addr());
        let (east_port, west_port) = (free_port(), free_port());
        let mut args: Vec<String> = [
            "--server",
            &server.to_string(),
            "--server-name",
            "localhost",
            "--cert-dir",
            &self.pki.dir.path().display().to_string(),
            "--client-name",
            "sidecar",
            "--proxy-listen",
            &proxy.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--port",
            &format!("{east_port}=east:hello.default.svc:{}", self.svc.http),
            "--port",
            &format!("{west_port}=west:hello.default.svc:{}", self.svc.http),
            "--log-format",
            "text",
            "--direct-allow-ip",
            HUB_ALLOWED,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        SidecarProc {
            proc: Proc::spawn("tunnel-sidecar", "tunnel-sidecar", &args, &[]),
            proxy,
            admin,
            east_port,
            west_port,
        }
    }
}

/// Certificates, services, a server and both agents.
async fn hub(known_clusters: &[&str], dial_timeout: Duration) -> (Clusters, Server, Vec<Agent>) {
    let c = Clusters::new().await;
    let server = c
        .server(known_clusters, dial_timeout, "127.0.0.1:0".parse().unwrap())
        .await;
    let mut agents = Vec::new();
    for cluster in CLUSTERS {
        agents.push(c.agent(cluster, &server, dial_timeout).await);
    }
    (c, server, agents)
}

struct SidecarProc {
    proc: Proc,
    proxy: SocketAddr,
    admin: SocketAddr,
    east_port: u16,
    west_port: u16,
}

impl SidecarProc {
    /// Waits until the sidecar is ready, its proxy listens and it has
    /// reached the server (readiness alone does not wait for that).
    async fn ready(&self) {
        wait_ready(self.admin, "the sidecar").await;
        wait_listening(self.proxy, "the sidecar's proxy").await;
        let admin = self.admin;
        wait_until(
            "the sidecar reaches the server",
            Duration::from_secs(20),
            || async move {
                metric(
                    &fetch_metrics(admin).await,
                    "tunnel_sidecar_server_connected",
                ) == Some(1.0)
            },
        )
        .await;
    }

    /// The proxy URL, naming a default cluster as the user if given.
    fn url(&self, user: Option<&str>) -> String {
        match user {
            Some(u) => format!("http://{u}@{}", self.proxy),
            None => format!("http://{}", self.proxy),
        }
    }

    fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(deadline)
    }
}

// ---------------------------------------------------------------------------
// Real clients.

/// Proxy settings a test must not inherit from the environment.
const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

#[derive(Debug)]
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `program args` with only the proxy variables in `envs`.
async fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).kill_on_drop(true);
    for v in PROXY_VARS {
        cmd.env_remove(v);
    }
    cmd.envs(envs.iter().copied());
    let out = tokio::time::timeout(ANSWER_DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {ANSWER_DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the real curl with `args`.
async fn curl(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut all = vec!["--silent", "--show-error", "--max-time", "20"];
    all.extend_from_slice(args);
    run("curl", &all, envs).await
}

/// Checks that a command succeeded and printed a hello from `cluster`
/// (the first line of the service's answer); returns the answer.
fn expect_hello<'a>(out: &'a Output, cluster: &str, what: &str) -> &'a str {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert_eq!(
        out.stdout.lines().next(),
        Some(format!("hello from {cluster}").as_str()),
        "{what}: answered {:?}",
        out.stdout
    );
    &out.stdout
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 towards the proxy.

/// `Proxy-Authorization` naming `user` as a curl user-only proxy URL does.
fn proxy_auth(user: Option<&str>) -> String {
    match user {
        // base64("east:") and base64("west:")
        Some("east") => "Proxy-Authorization: Basic ZWFzdDo=\r\n".into(),
        Some("west") => "Proxy-Authorization: Basic d2VzdDo=\r\n".into(),
        Some(other) => panic!("no credential for {other}"),
        None => String::new(),
    }
}

/// An absolute-form GET of `url` (http://authority/path).
fn get(url: &str, user: Option<&str>) -> String {
    let authority = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .and_then(|r| r.split('/').next())
        .unwrap_or(url);
    format!(
        "GET {url} HTTP/1.1\r\nHost: {authority}\r\n{}\r\n",
        proxy_auth(user)
    )
}

/// A CONNECT to `authority`.
fn connect(authority: &str, user: Option<&str>) -> String {
    format!(
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{}\r\n",
        proxy_auth(user)
    )
}

#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one response to a request with method CONNECT (`connect`) or not:
/// the head byte by byte (so nothing after it is consumed), then a body of
/// Content-Length bytes, none for a successful CONNECT, else up to EOF.
async fn read_answer(tcp: &mut TcpStream, connect: bool) -> std::io::Result<Answer> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        if tcp.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "closed after {:?} instead of a response",
                    String::from_utf8_lossy(&head)
                ),
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut answer = Answer {
        status,
        head,
        body: String::new(),
    };
    let mut body = Vec::new();
    if let Some(len) = answer.header("content-length") {
        body.resize(len.parse().unwrap(), 0);
        tcp.read_exact(&mut body).await?;
    } else if !(connect && (200..300).contains(&status)) {
        tcp.read_to_end(&mut body).await?;
    }
    answer.body = String::from_utf8_lossy(&body).into_owned();
    Ok(answer)
}

/// Sends `request` on `tcp` and reads the answer.
async fn ask_on(tcp: &mut TcpStream, request: &[u8]) -> Answer {
    let connect = request.starts_with(b"CONNECT ");
    let run = async {
        tcp.write_all(request).await?;
        read_answer(tcp, connect).await
    };
    let shown = String::from_utf8_lossy(&request[..request.len().min(200)]).into_owned();
    tokio::time::timeout(ANSWER_DEADLINE, run)
        .await
        .unwrap_or_else(|_| panic!("no answer to {shown:?} within {ANSWER_DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("asking {shown:?}: {e}"))
}

/// Sends `request` on a new connection to `proxy` and reads the answer.
async fn ask(proxy: SocketAddr, request: impl AsRef<[u8]>) -> Answer {
    let mut tcp = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    ask_on(&mut tcp, request.as_ref()).await
}

// ---------------------------------------------------------------------------
// The tests.

/// curl reaches each cluster's service through a per-cluster port, through
/// `http_proxy` (absolute-form requests), through `https_proxy` (CONNECT,
/// TLS end to end to the destination), and with a default cluster named by
/// the proxy URL's user; the destination sees its own in-cluster name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_the_right_cluster_by_port_and_through_the_proxy() {
    let (c, server, _agents) = hub(&[], DIAL_TIMEOUT).await;
    let tls_port = free_port();
    let tls_mapping = format!("{tls_port}=west:hello.default.svc:{}", c.svc.https);
    let sc = c.sidecar(server.client_addr, &["--port", &tls_mapping]);
    sc.ready().await;
    let (http, https) = (c.svc.http, c.svc.https);
    let ca = c.ca().display().to_string();
    let proxy = sc.url(None);

    // TLS passes through a per-cluster port untouched: curl verifies the
    // service's own certificate for its in-cluster name.
    let url = format!("https://hello.default.svc:{tls_port}/");
    let resolve = format!("hello.default.svc:{tls_port}:127.0.0.1");
    let out = curl(&["--cacert", &ca, "--resolve", &resolve, &url], &[]).await;
    let body = expect_hello(&out, "west", &format!("TLS through port {tls_port}"));
    assert!(body.contains("scheme: https\n"), "{body}");

    // Per-cluster ports: plain TCP to 127.0.0.1:<port>.
    for (cluster, port) in [("east", sc.east_port), ("west", sc.west_port)] {
        let out = curl(&[&format!("http://127.0.0.1:{port}/by-port")], &[]).await;
        let body = expect_hello(&out, cluster, &format!("{cluster}'s per-cluster port"));
        assert!(body.contains("target: /by-port\n"), "{body}");
    }

    for cluster in CLUSTERS {
        // http_proxy: curl sends GET http://... to the proxy, which forwards
        // it in origin-form with the in-cluster Host.
        let url = format!("http://hello.default.svc.{cluster}.tunnel.internal:{http}/a/b?c=d");
        let out = curl(&[&url], &[("http_proxy", &proxy)]).await;
        let body = expect_hello(&out, cluster, &format!("http_proxy={proxy} curl {url}"));
        assert!(body.contains("scheme: http\n"), "{body}");
        assert!(body.contains("target: /a/b?c=d\n"), "{body}");
        assert!(
            body.contains(&format!("host: hello.default.svc:{http}\n")),
            "the destination sees its in-cluster name: {body}"
        );

        // https_proxy: CONNECT, then TLS between curl and the service,
        // verified against the installation's CA.
        let url = format!("https://hello.default.svc.{cluster}.tunnel.internal:{https}/secure");
        let out = curl(&["--cacert", &ca, &url], &[("https_proxy", &proxy)]).await;
        let body = expect_hello(&out, cluster, &format!("https_proxy={proxy} curl {url}"));
        assert!(body.contains("scheme: https\n"), "{body}");
    }

    // The proxy user names the default cluster: unqualified in-cluster names.
    for cluster in CLUSTERS {
        let proxy = sc.url(Some(cluster));
        let url = format!("http://hello.default.svc:{http}/");
        let out = curl(&["-x", &proxy, &url], &[]).await;
        let body = expect_hello(&out, cluster, &format!("curl -x {proxy} {url}"));
        assert!(
            body.contains("proxy-authorization: absent\n"),
            "the proxy credential stays with the proxy: {body}"
        );
        let url = format!("https://hello.default.svc:{https}/");
        let out = curl(&["--cacert", &ca, "-x", &proxy, &url], &[]).await;
        expect_hello(&out, cluster, &format!("curl -x {proxy} {url}"));
    }

    // Request bodies go through intact, with a length and chunked, large
    // enough that curl asks for 100-continue.
    let upload = tempfile::NamedTempFile::new().unwrap();
    let payload: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(upload.path(), &payload).unwrap();
    let want = format!(
        "body-bytes: {}\nbody-sha256: {}\n",
        payload.len(),
        hex(&sha2::Sha256::digest(&payload))
    );
    let data = format!("@{}", upload.path().display());
    let url = format!("http://hello.default.svc.west.tunnel.internal:{http}/upload");
    for framing in [None, Some("Transfer-Encoding: chunked")] {
        let mut args = vec!["-x", &proxy, "--data-binary", &data, &url];
        if let Some(h) = framing {
            args.extend(["-H", h]);
        }
        let out = curl(&args, &[]).await;
        let body = expect_hello(&out, "west", &format!("POST {url} ({framing:?})"));
        assert!(body.contains("method: POST\n"), "{body}");
        assert!(body.contains(&want), "{framing:?}: {body}");
    }

    // CONNECT carries bytes the client sent right behind the request.
    let mut tcp = TcpStream::connect(sc.proxy).await.unwrap();
    let authority = format!("echo.default.svc.east.tunnel.internal:{}", c.svc.echo);
    let early = format!("{}early bytes", connect(&authority, None));
    let a = ask_on(&mut tcp, early.as_bytes()).await;
    assert_eq!(a.status, 200, "{a:?}");
    let mut echoed = [0u8; 11];
    tokio::time::timeout(ANSWER_DEADLINE, tcp.read_exact(&mut echoed))
        .await
        .expect("the early bytes come back")
        .unwrap();
    assert_eq!(&echoed, b"early bytes");
    drop(tcp);

    // One curl, one kept-alive proxy connection, two clusters in turn.
    let urls = CLUSTERS.map(|c| format!("http://hello.default.svc.{c}.tunnel.internal:{http}/"));
    let out = curl(
        &["-x", &proxy, "-v", &urls[0], &urls[1]],
        &[("http_proxy", &proxy)],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let hellos: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("hello from"))
        .collect();
    assert_eq!(hellos, ["hello from east", "hello from west"], "{out:?}");
    assert!(
        out.stderr.contains("Re-using existing connection"),
        "curl kept its proxy connection between the two requests: {}",
        out.stderr
    );

    // Every tunnel opened for a request or a CONNECT has been closed.
    let state = server.state().clone();
    wait_until(
        "the server holds no proxied connection",
        Duration::from_secs(20),
        || {
            let open = state.open_connections();
            async move { open == 0 }
        },
    )
    .await;
}

/// Python's standard library (urllib), configured only by the proxy
/// environment variables, reaches the right cluster over http and https,
/// by qualified name and by a default cluster in the proxy URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_urllib_reaches_the_right_cluster_through_the_proxy_variables() {
    const SCRIPT: &str = r#"
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
for url in sys.argv[2:]:
    with urllib.request.urlopen(url, context=ctx, timeout=20) as resp:
        sys.stdout.write(resp.read().decode())
    sys.stdout.write("----\n")
"#;
    let (c, server, _agents) = hub(&[], DIAL_TIMEOUT).await;
    let sc = c.sidecar(server.client_addr, &[]);
    sc.ready().await;
    let (http, https) = (c.svc.http, c.svc.https);
    let ca = c.ca().display().to_string();

    let python = |urls: Vec<String>, http_proxy: String, https_proxy: String| {
        let ca = ca.clone();
        async move {
            let mut args = vec!["-c", SCRIPT, &ca];
            args.extend(urls.iter().map(String::as_str));
            let out = run(
                "python3",
                &args,
                &[("http_proxy", &http_proxy), ("https_proxy", &https_proxy)],
            )
            .await;
            assert!(out.status.success(), "python3 urllib {urls:?}: {out:?}");
            out.stdout
                .split("----\n")
                .filter(|s| !s.is_empty())
                .map(|s| s.lines().next().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        }
    };

    // Qualified names; the proxy URL names no cluster.
    let urls = vec![
        format!("http://hello.default.svc.east.tunnel.internal:{http}/"),
        format!("http://hello.default.svc.west.tunnel.internal:{http}/"),
        format!("https://hello.default.svc.east.tunnel.internal:{https}/"),
        format!("https://hello.default.svc.west.tunnel.internal:{https}/"),
    ];
    let got = python(urls, sc.url(None), sc.url(None)).await;
    assert_eq!(
        got,
        [
            "hello from east",
            "hello from west",
            "hello from east",
            "hello from west"
        ]
    );

    // Unqualified names, the cluster in the proxy URL: urllib sends
    // Proxy-Authorization only for a user with a password, so `east:x@`.
    let urls = vec![
        format!("http://hello.default.svc:{http}/"),
        format!("https://hello.default.svc:{https}/"),
    ];
    let with_user = |u: &str| format!("http://{u}:x@{}", sc.proxy);
    let got = python(urls, with_user("east"), with_user("west")).await;
    assert_eq!(got, ["hello from east", "hello from west"]);
}

/// Every error the proxy can answer, from a real malformed or refused
/// request: the status an HTTP client can act on, and for the errors the
/// sidecar itself decides, the typed code in `x-tunnel-error` and as the
/// first word of the body. Absolute-form requests and CONNECT agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_error_has_its_status_and_code() {
    // `south` is known to the server but has no agent.
    let (c, server, _agents) = hub(&["south"], Duration::from_secs(1)).await;
    let sc = c.sidecar(
        server.client_addr,
        &["--max-header-bytes", "4096", "--max-headers", "20"],
    );
    sc.ready().await;
    let http = c.svc.http;
    let hole = black_hole(cluster_ip("east")).await;
    let closed = closed_port(cluster_ip("east"));

    // Failures to open the tunnel.
    let cases = [
        (
            "an address outside the agent's allowlist (east's network, asked of west)",
            format!("{}:{http}", cluster_ip("east")),
            Some("west"),
            403,
            "destination_not_allowed",
        ),
        (
            "a cluster the server does not know",
            format!("hello.default.svc.nowhere.tunnel.internal:{http}"),
            None,
            404,
            "unknown_cluster",
        ),
        (
            "a port nothing listens on",
            format!("hello.default.svc.east.tunnel.internal:{closed}"),
            None,
            502,
            "destination_refused",
        ),
        (
            "a cluster without an agent",
            format!("hello.default.svc.south.tunnel.internal:{http}"),
            None,
            503,
            "no_agent",
        ),
        (
            "a destination that never answers the dial",
            hole.addr.to_string(),
            Some("east"),
            504,
            "dial_timeout",
        ),
        (
            "a hub address nothing listens on, dialed directly",
            format!("{HUB_IP}:{}", closed_port(HUB_IP)),
            None,
            502,
            "destination_refused",
        ),
    ];
    for (what, authority, user, status, code) in &cases {
        for request in [
            get(&format!("http://{authority}/"), *user),
            connect(authority, *user),
        ] {
            let a = ask(sc.proxy, &request).await;
            let line = request.lines().next().unwrap();
            assert_eq!(a.status, *status, "{what}: {line} answered {a:?}");
            assert_eq!(a.header("x-tunnel-error"), Some(*code), "{what}: {a:?}");
            assert!(
                a.body.starts_with(&format!("{code}: ")),
                "{what}: the body starts with the code: {a:?}"
            );
        }
    }

    // CONNECT without a port goes to 443 (nothing listens there: refused,
    // and the message names the port).
    let a = ask(
        sc.proxy,
        connect("hello.default.svc.east.tunnel.internal", None),
    )
    .await;
    assert_eq!(a.status, 502, "{a:?}");
    assert!(a.body.contains("hello.default.svc:443"), "{a:?}");

    // What the proxy refuses before any tunnel: (what, request, status, code, in body).
    let big = format!(
        "GET http://hello.default.svc.east.tunnel.internal:{http}/ HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(8000)
    );
    let many = format!(
        "GET http://hello.default.svc.east.tunnel.internal:{http}/ HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..30)
            .map(|i| format!("X-Header-{i}: {i}\r\n"))
            .collect::<String>()
    );
    let refused: [(&str, String, u16, Option<&str>, &str); 9] = [
        (
            "a garbage request line",
            "GARBAGE\r\n\r\n".into(),
            400,
            None,
            "",
        ),
        (
            "a qualified name whose cluster part is no cluster name",
            get(
                "http://hello.default.svc.Bad_Cluster.tunnel.internal/",
                None,
            ),
            400,
            Some("bad_request"),
            "Bad_Cluster",
        ),
        (
            "a CONNECT to a proxy user that is no cluster name",
            format!(
                "CONNECT backend:443 HTTP/1.1\r\nHost: backend:443\r\nProxy-Authorization: Basic {}\r\n\r\n",
                "Tm90X0FfQ2x1c3Rlcjo=" // base64("Not_A_Cluster:")
            ),
            400,
            Some("bad_request"),
            "Not_A_Cluster",
        ),
        (
            "an origin-form request (not a proxy request)",
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            400,
            Some("bad_request"),
            "absolute-form",
        ),
        (
            "https:// as an absolute-form request",
            get("https://hello.default.svc.east.tunnel.internal/", None),
            400,
            Some("bad_request"),
            "CONNECT",
        ),
        (
            "a proxy credential that is not Basic",
            format!(
                "GET http://hello.default.svc:{http}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer abc\r\n\r\n"
            ),
            400,
            Some("bad_request"),
            "Basic",
        ),
        (
            "TRACE (not proxied)",
            format!(
                "TRACE http://hello.default.svc.east.tunnel.internal:{http}/ HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
            405,
            Some("method_not_allowed"),
            "TRACE",
        ),
        ("a head beyond --max-header-bytes", big, 431, None, ""),
        ("more headers than --max-headers", many, 431, None, ""),
    ];
    for (what, request, status, code, in_body) in &refused {
        let a = ask(sc.proxy, request).await;
        assert_eq!(a.status, *status, "{what}: {a:?}");
        if let Some(code) = code {
            assert_eq!(a.header("x-tunnel-error"), Some(*code), "{what}: {a:?}");
            assert!(a.body.starts_with(&format!("{code}: ")), "{what}: {a:?}");
        }
        assert!(a.body.contains(in_body), "{what}: {a:?}");
        if *status == 405 {
            let allow = a.header("allow").unwrap_or_default();
            assert!(
                allow.contains("CONNECT") && allow.contains("GET"),
                "{what}: {a:?}"
            );
        }
    }

    // An error the sidecar decides keeps the connection: the next request
    // on it is answered.
    let mut tcp = TcpStream::connect(sc.proxy).await.unwrap();
    let bad = get(
        "http://hello.default.svc.Bad_Cluster.tunnel.internal/",
        None,
    );
    let a = ask_on(&mut tcp, bad.as_bytes()).await;
    assert_eq!(a.status, 400);
    let url = format!("http://hello.default.svc.east.tunnel.internal:{http}/");
    let a = ask_on(&mut tcp, get(&url, None).as_bytes()).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.starts_with("hello from east\n"), "{a:?}");

    // What curl users see: the status of a forwarded request, and the
    // proxy's answer to curl's CONNECT.
    let url = format!("http://hello.default.svc.south.tunnel.internal:{http}/");
    let out = curl(
        &[
            "-x",
            &sc.url(None),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ],
        &[],
    )
    .await;
    assert_eq!(out.stdout, "503", "{out:?}");
    let url = format!(
        "https://hello.default.svc.nowhere.tunnel.internal:{}/",
        c.svc.https
    );
    let out = curl(
        &[
            "-x",
            &sc.url(None),
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            &url,
        ],
        &[],
    )
    .await;
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(out.stdout, "404", "{out:?}");

    // The sidecar counts what it answered, by kind and code.
    let metrics = fetch_metrics(sc.admin).await;
    for (kind, code, at_least) in [
        ("http", "no_agent", 2.0),
        ("connect", "no_agent", 1.0),
        ("http", "dial_timeout", 1.0),
        ("connect", "unknown_cluster", 2.0),
        ("http", "method_not_allowed", 1.0),
        ("http", "ok", 1.0),
        ("direct", "destination_refused", 2.0),
    ] {
        let series = format!("tunnel_sidecar_requests_total{{kind=\"{kind}\",code=\"{code}\"}}");
        let n = metric(&metrics, &series).unwrap_or(0.0);
        assert!(
            n >= at_least,
            "{series} is {n}, want at least {at_least}\n{metrics}"
        );
    }
}

/// A client that sends half a request line and stops, or nothing at all, is
/// cut off after `--header-timeout` (and not before); the proxy serves
/// others meanwhile, and a CONNECT tunnel quiet for longer than the timeout
/// stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_silent_client_is_cut_off_after_the_header_timeout() {
    let (c, server, _agents) = hub(&[], DIAL_TIMEOUT).await;
    let sc = c.sidecar(server.client_addr, &["--header-timeout", "1s"]);
    sc.ready().await;
    let stall = |what: &'static str, first: &'static [u8]| async move {
        let mut tcp = TcpStream::connect(sc.proxy).await.unwrap();
        tcp.write_all(first).await.unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        let read = async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(15), read)
            .await
            .unwrap_or_else(|_| panic!("{what}: the connection was still open after 15 s"));
        let took = started.elapsed();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{what}: answered {answer:?}"
        );
        assert!(
            took >= Duration::from_millis(500),
            "{what}: cut off after {took:?}, before the 1 s header timeout"
        );
    };
    let url = format!(
        "http://hello.default.svc.west.tunnel.internal:{}/",
        c.svc.http
    );
    let echo = format!("echo.default.svc.east.tunnel.internal:{}", c.svc.echo);
    let meanwhile = async {
        let a = ask(sc.proxy, get(&url, None)).await;
        assert_eq!(a.status, 200, "{a:?}");
        // The timeout is for request heads: an established CONNECT tunnel
        // may stay quiet for longer.
        let mut tcp = TcpStream::connect(sc.proxy).await.unwrap();
        let a = ask_on(&mut tcp, connect(&echo, None).as_bytes()).await;
        assert_eq!(a.status, 200, "{a:?}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        tcp.write_all(b"still here").await.unwrap();
        let mut back = [0u8; 10];
        tokio::time::timeout(ANSWER_DEADLINE, tcp.read_exact(&mut back))
            .await
            .expect("an idle CONNECT tunnel still echoes")
            .expect("an idle CONNECT tunnel is still open");
        assert_eq!(&back, b"still here");
    };
    tokio::join!(
        stall("half a request line", b"GET http://hello.default.svc.ea"),
        stall("a silent client", b""),
        meanwhile,
    );
}

/// 1,000 CONNECTs open at the same time, half to each cluster's echo
/// service, each carrying its own payload back intact; afterwards the
/// sidecar holds none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connects_complete() {
    const N: usize = 1000;
    const LEN: usize = 16 * 1024;
    // Per connection: our end, the agent's dial and the echo's end here,
    // plus the sidecar's end in the child (which inherits the limit).
    ensure_fd_limit(8 * N as u64);
    let (c, server, _agents) = hub(&[], DIAL_TIMEOUT).await;
    let sc = c.sidecar(server.client_addr, &[]);
    sc.ready().await;
    let echo = c.svc.echo;

    // Open all of them first.
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..N {
        let proxy = sc.proxy;
        opening.spawn(async move {
            let cluster = CLUSTERS[i % 2];
            let mut tcp = TcpStream::connect(proxy).await?;
            let req = connect(
                &format!("echo.default.svc.{cluster}.tunnel.internal:{echo}"),
                None,
            );
            tcp.write_all(req.as_bytes()).await?;
            let a = read_answer(&mut tcp, true).await?;
            if a.status != 200 {
                return Err(std::io::Error::other(format!("CONNECT {i}: {a:?}")));
            }
            Ok::<_, std::io::Error>((i, tcp))
        });
    }
    let mut open = Vec::with_capacity(N);
    let all_open = async {
        while let Some(res) = opening.join_next().await {
            open.push(res.unwrap().expect("a CONNECT"));
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all_open)
        .await
        .unwrap_or_else(|_| panic!("{N} CONNECTs did not all open within 120 s"));
    assert_eq!(open.len(), N);
    let series = "tunnel_sidecar_open_connections";
    wait_until(
        &format!("the sidecar relays {N} connections at once"),
        Duration::from_secs(30),
        || async move { metric(&fetch_metrics(sc.admin).await, series) == Some(N as f64) },
    )
    .await;

    // Then send a distinct payload through each, all at once.
    let mut echoing = tokio::task::JoinSet::new();
    for (i, tcp) in open {
        echoing.spawn(async move { (i, exchange(tcp, LEN, i as u64).await) });
    }
    let all_echoed = async {
        let mut done = 0;
        while let Some(res) = echoing.join_next().await {
            let (i, got) = res.unwrap();
            let got = got.unwrap_or_else(|e| panic!("connection {i}: {e}"));
            assert_eq!(got.received, LEN, "connection {i}: echo length");
            assert_eq!(
                got.received_hash, got.sent_hash,
                "connection {i}: echo data"
            );
            done += 1;
        }
        done
    };
    let done = tokio::time::timeout(Duration::from_secs(120), all_echoed)
        .await
        .unwrap_or_else(|_| panic!("{N} echoes did not all complete within 120 s"));
    assert_eq!(done, N);
    wait_until(
        "the sidecar has closed every relayed connection",
        Duration::from_secs(30),
        || async move { metric(&fetch_metrics(sc.admin).await, series) == Some(0.0) },
    )
    .await;
    let metrics = fetch_metrics(sc.admin).await;
    assert_eq!(
        metric(
            &metrics,
            "tunnel_sidecar_requests_total{kind=\"connect\",code=\"ok\"}"
        ),
        Some(N as f64),
        "{metrics}"
    );
}

/// A cluster whose agent connects after the sidecar started is reachable
/// without a restart: by a qualified name at once, and by its bare name
/// (its kube-apiserver) too, even where the proxy user names another
/// default cluster: the list is refreshed every hour only, but a single
/// label no resolver knows makes the sidecar ask the server at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_joins_later_is_reachable_by_name() {
    let c = Clusters::new().await;
    let server = c
        .server(&[], DIAL_TIMEOUT, "127.0.0.1:0".parse().unwrap())
        .await;
    let _east = c.agent("east", &server, DIAL_TIMEOUT).await;
    let sc = c.sidecar(server.client_addr, &["--cluster-refresh", "1h"]);
    sc.ready().await;
    let http = c.svc.http;
    let qualified = format!("http://hello.default.svc.west.tunnel.internal:{http}/");

    // Before west's agent: the server does not know west.
    let out = curl(
        &["-x", &sc.url(None), "-w", "\n%{http_code}", &qualified],
        &[],
    )
    .await;
    assert!(out.stdout.ends_with("\n404"), "{out:?}");
    assert!(out.stdout.starts_with("unknown_cluster: "), "{out:?}");

    let _west = c.agent("west", &server, DIAL_TIMEOUT).await;
    let out = curl(&["-x", &sc.url(None), &qualified], &[]).await;
    expect_hello(
        &out,
        "west",
        &format!("curl -x {} {qualified}", sc.url(None)),
    );

    // West's kube-apiserver (kubernetes.default.svc in west; here the hello
    // service) by the bare cluster name, through CONNECT (curl -p).
    let bare = format!("http://west:{http}/");
    for user in [None, Some("east")] {
        let proxy = sc.url(user);
        let out = curl(&["-p", "-x", &proxy, &bare], &[]).await;
        let body = expect_hello(&out, "west", &format!("curl -p -x {proxy} {bare}"));
        assert!(body.contains(&format!("host: west:{http}\n")), "{body}");
    }
    // The bare name without a port: the apiserver's port, 443 (nothing
    // listens there in this test, and the refusal names it).
    let a = ask(sc.proxy, connect("west", Some("east"))).await;
    assert_eq!(a.status, 502, "{a:?}");
    assert!(a.body.contains("kubernetes.default.svc:443"), "{a:?}");
}

/// `POST /shutdown` on the admin port ends the sidecar with status 0, as
/// does SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_shutdown_ends_the_sidecar_with_status_0() {
    let (c, server, _agents) = hub(&[], DIAL_TIMEOUT).await;
    let mut sc = c.sidecar(server.client_addr, &[]);
    sc.ready().await;
    // In use when asked to stop.
    let out = curl(&[&format!("http://127.0.0.1:{}/", sc.east_port)], &[]).await;
    expect_hello(&out, "east", "the per-cluster port");

    let a = ask(
        sc.admin,
        "POST /shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let status = tokio::task::block_in_place(|| sc.wait_exit(Duration::from_secs(15)))
        .expect("the sidecar exits within 15 s of POST /shutdown");
    assert!(status.success(), "exit status {status}\n{}", sc.proc.logs());
    assert!(
        TcpStream::connect(sc.proxy).await.is_err(),
        "the proxy port is closed"
    );

    // SIGTERM, as Kubernetes stops a container, ends it with 0 too.
    let mut sc = c.sidecar(server.client_addr, &[]);
    sc.ready().await;
    sc.proc.signal("TERM");
    let status = tokio::task::block_in_place(|| sc.wait_exit(Duration::from_secs(15)))
        .expect("the sidecar exits within 15 s of SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", sc.proc.logs());
}

/// Runs `tunnel-sidecar probe readyz` against the sidecar at `admin`, as the
/// kubelet's exec probe does; returns what it printed.
async fn probe_readyz(admin: SocketAddr) -> String {
    let binary = bin("tunnel-sidecar");
    let out = run(
        binary.to_str().unwrap(),
        &["--admin-listen", &admin.to_string(), "probe", "readyz"],
        &[],
    )
    .await;
    assert!(out.status.success(), "tunnel-sidecar probe readyz: {out:?}");
    out.stdout
}

/// A sidecar started while no tunnel server can be reached — a pod created
/// during a hub outage — is ready as soon as its listeners are bound, says
/// `tunnel_sidecar_server_connected 0` (and `server: not connected` in its
/// readiness probe's output), answers connections for the clusters with a
/// typed error (and closes its per-cluster ports' ones), still reaches the
/// hub directly by a dotted name, and carries cluster traffic once the
/// server is up, without a restart.
///
/// A bare name is never dialed directly before the server's cluster list
/// is known: here the hub has a Service named `east`, like a cluster, and
/// while no list was ever fetched `east` gets `tunnel_broken` saying why,
/// instead of the hub Service taking east's kube-API traffic; a name the
/// pod names as a cluster (`--known-cluster`, from the injector) goes to
/// the tunnel at once. With the list, `east` is the cluster and `backend`
/// the hub's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_without_a_server_is_ready_and_recovers_when_it_comes() {
    let c = Clusters::new().await;
    let server_addr = free_addr();
    // A hub Service named like the cluster east, beside backend.
    let aliases = format!("{HUB_ALIASES},east={HUB_IP}");
    let sc = c.sidecar(server_addr, &["--host-alias", &aliases]);
    let known = c.sidecar(
        server_addr,
        &["--host-alias", &aliases, "--known-cluster", "east"],
    );
    wait_ready(sc.admin, "the sidecar, with no server anywhere").await;
    wait_ready(known.admin, "the sidecar with --known-cluster").await;
    let (status, _) = http_get(sc.admin, "/healthz").await.unwrap();
    assert_eq!(status, 200, "alive without a server");
    sc.proc
        .wait_log(
            &["cannot connect to tunnel server"],
            1,
            Duration::from_secs(20),
        )
        .await;
    let connected = "tunnel_sidecar_server_connected";
    assert_eq!(
        metric(&fetch_metrics(sc.admin).await, connected),
        Some(0.0),
        "no server reached yet"
    );
    assert_eq!(
        probe_readyz(sc.admin).await,
        "ready; server: not connected\n"
    );

    // Cluster traffic meanwhile: a typed error, over both proxy forms.
    let http = c.svc.http;
    let hub_http = c.svc.hub_http;
    let east = format!("hello.default.svc.east.tunnel.internal:{http}");
    for request in [get(&format!("http://{east}/"), None), connect(&east, None)] {
        let a = ask(sc.proxy, &request).await;
        let line = request.lines().next().unwrap();
        assert_eq!(a.status, 502, "{line}: {a:?}");
        assert_eq!(a.header("x-tunnel-error"), Some("tunnel_broken"), "{a:?}");
        assert!(a.body.starts_with("tunnel_broken: "), "{a:?}");
    }
    // A bare name, cluster or hub Service, cannot be told without the list:
    // refused, not dialed (the hub Service `east` would answer).
    for name in ["east", "backend"] {
        let authority = format!("{name}:{hub_http}");
        for request in [
            get(&format!("http://{authority}/"), None),
            connect(&authority, None),
        ] {
            let a = ask(sc.proxy, &request).await;
            let line = request.lines().next().unwrap();
            assert_eq!(a.status, 502, "{line}: {a:?}");
            assert_eq!(a.header("x-tunnel-error"), Some("tunnel_broken"), "{a:?}");
            assert!(
                a.body.contains(&format!("whether \"{name}\" is a cluster")),
                "{line}: {a:?}"
            );
        }
    }
    // A cluster the pod names is a cluster from the start: the tunnel's
    // own error, not the unknown name's.
    let a = ask(known.proxy, get(&format!("http://east:{hub_http}/"), None)).await;
    assert_eq!(a.header("x-tunnel-error"), Some("tunnel_broken"), "{a:?}");
    assert!(!a.body.contains("is a cluster"), "{a:?}");
    // A per-cluster port's connection is closed, without a byte.
    let mut tcp = TcpStream::connect(("127.0.0.1", sc.east_port))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(ANSWER_DEADLINE, tcp.read(&mut buf))
        .await
        .expect("the per-cluster port closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The hub is reached directly by a dotted name, outage or not.
    let a = ask(
        sc.proxy,
        get(&format!("http://backend.team:{hub_http}/"), None),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.starts_with("hello from hub\n"), "{a:?}");

    // The server comes: the same sidecar carries cluster traffic.
    let server = c.server(&[], DIAL_TIMEOUT, server_addr).await;
    let _east = c.agent("east", &server, DIAL_TIMEOUT).await;
    wait_until(
        "the sidecar says it reaches the server",
        Duration::from_secs(20),
        || async move { metric(&fetch_metrics(sc.admin).await, connected) == Some(1.0) },
    )
    .await;
    assert_eq!(probe_readyz(sc.admin).await, "ready; server: connected\n");
    let out = curl(&[&format!("http://127.0.0.1:{}/", sc.east_port)], &[]).await;
    expect_hello(&out, "east", "the per-cluster port, once the server is up");
    let out = curl(&["-x", &sc.url(None), &format!("http://{east}/")], &[]).await;
    expect_hello(&out, "east", "the proxy, once the server is up");
    // With the list: east is the cluster (its kube-apiserver, here the hello
    // service), backend the hub's Service.
    let out = curl(&["-x", &sc.url(None), &format!("http://east:{http}/")], &[]).await;
    expect_hello(
        &out,
        "east",
        "the bare cluster name, once the list is known",
    );
    let out = curl(
        &["-x", &sc.url(None), &format!("http://backend:{hub_http}/")],
        &[],
    )
    .await;
    expect_hello(
        &out,
        "hub",
        "a hub Service's short name, once the list is known",
    );
    let metrics = fetch_metrics(sc.admin).await;
    for (kind, code) in [
        ("http", "tunnel_broken"),
        ("connect", "tunnel_broken"),
        ("port", "tunnel_broken"),
        ("direct", "ok"),
    ] {
        let series = format!("tunnel_sidecar_requests_total{{kind=\"{kind}\",code=\"{code}\"}}");
        assert!(
            metric(&metrics, &series).unwrap_or(0.0) >= 1.0,
            "{series}\n{metrics}"
        );
    }
}

/// The proxy is no way into the pod's own ports or the cloud's metadata
/// service: the sidecar's admin port (its `POST /shutdown`) by loopback
/// address, by `localhost`, by an IPv4-mapped address or by `0.0.0.0`, and
/// `169.254.169.254`, get 403 `destination_not_allowed` saying why, over
/// both proxy forms, and the sidecar keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_does_not_dial_the_pod_s_own_ports_or_the_metadata_service() {
    let (c, server, _agents) = hub(&[], DIAL_TIMEOUT).await;
    let mut sc = c.sidecar(server.client_addr, &[]);
    sc.ready().await;
    let port = sc.admin.port();
    for authority in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("0.0.0.0:{port}"),
        "169.254.169.254:80".to_owned(),
    ] {
        let shutdown = format!(
            "POST http://{authority}/shutdown HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\n\r\n"
        );
        for request in [shutdown, connect(&authority, None)] {
            let a = ask(sc.proxy, &request).await;
            let line = request.lines().next().unwrap();
            assert_eq!(a.status, 403, "{line}: {a:?}");
            assert_eq!(
                a.header("x-tunnel-error"),
                Some("destination_not_allowed"),
                "{line}: {a:?}"
            );
            assert!(a.body.contains("--direct-allow-ip"), "{line}: {a:?}");
        }
    }
    assert!(
        tokio::task::block_in_place(|| sc.wait_exit(Duration::from_millis(500))).is_none(),
        "the sidecar is still running"
    );
    let (status, _) = http_get(sc.admin, "/readyz").await.unwrap();
    assert_eq!(status, 200);
}

/// One process, configured only by `HTTP_PROXY` and `HTTPS_PROXY` (Python's
/// urllib, no `NO_PROXY`), reaches the hub's own Service by its short name,
/// by IP address and by `name.namespace` (over http and https), and each
/// cluster's service by its tunnel name, in the same run: names in no
/// cluster are dialed directly by the sidecar, with the client's own `Host`,
/// and counted as `kind="direct"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_reaches_hub_services_and_clusters_through_the_same_proxy() {
    const SCRIPT: &str = r#"
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
for url in sys.argv[2:]:
    with urllib.request.urlopen(url, context=ctx, timeout=20) as resp:
        sys.stdout.write(resp.read().decode())
    sys.stdout.write("----\n")
"#;
    let (c, server, _agents) = hub(&[], DIAL_TIMEOUT).await;
    let sc = c.sidecar(server.client_addr, &["--host-alias", HUB_ALIASES]);
    sc.ready().await;
    let (http, https, hub_http, hub_https) =
        (c.svc.http, c.svc.https, c.svc.hub_http, c.svc.hub_https);
    let ca = c.ca().display().to_string();
    let urls = [
        format!("http://backend:{hub_http}/short"),
        format!("http://{HUB_IP}:{hub_http}/by-ip"),
        format!("http://backend.team:{hub_http}/by-namespace"),
        format!("https://backend.team:{hub_https}/tls"),
        format!("http://hello.default.svc.east.tunnel.internal:{http}/"),
        format!("https://hello.default.svc.west.tunnel.internal:{https}/"),
    ];
    let mut args = vec!["-c", SCRIPT, &ca];
    args.extend(urls.iter().map(String::as_str));
    let proxy = sc.url(None);
    let out = run(
        "python3",
        &args,
        &[("HTTP_PROXY", &proxy), ("HTTPS_PROXY", &proxy)],
    )
    .await;
    assert!(out.status.success(), "python3 urllib {urls:?}: {out:?}");
    let answers: Vec<&str> = out
        .stdout
        .split("----\n")
        .filter(|s| !s.is_empty())
        .collect();
    let firsts: Vec<&str> = answers
        .iter()
        .map(|a| a.lines().next().unwrap_or_default())
        .collect();
    assert_eq!(
        firsts,
        [
            "hello from hub",
            "hello from hub",
            "hello from hub",
            "hello from hub",
            "hello from east",
            "hello from west",
        ],
        "{out:?}"
    );
    // The hub Service saw the names the app used.
    for (answer, host) in answers.iter().zip([
        format!("backend:{hub_http}"),
        format!("{HUB_IP}:{hub_http}"),
        format!("backend.team:{hub_http}"),
        format!("backend.team:{hub_https}"),
    ]) {
        assert!(answer.contains(&format!("host: {host}\n")), "{answer}");
    }
    // Each went through the sidecar, the hub's directly.
    let metrics = fetch_metrics(sc.admin).await;
    for (kind, n) in [("direct", 4.0), ("http", 1.0), ("connect", 1.0)] {
        let series = format!("tunnel_sidecar_requests_total{{kind=\"{kind}\",code=\"ok\"}}");
        assert_eq!(metric(&metrics, &series), Some(n), "{series}\n{metrics}");
    }
    wait_until(
        "the sidecar has closed the direct CONNECT",
        Duration::from_secs(20),
        || async move {
            metric(
                &fetch_metrics(sc.admin).await,
                "tunnel_sidecar_open_direct_connections",
            ) == Some(0.0)
        },
    )
    .await;
}

/// `--direct deny` (the annotation `cluster-tunnel.io/direct: deny`) refuses
/// what is in no cluster with 403 `destination_not_allowed` and says how to
/// name a cluster; cluster names still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_deny_refuses_names_in_no_cluster() {
    let (c, server, _agents) = hub(&[], DIAL_TIMEOUT).await;
    let sc = c.sidecar(
        server.client_addr,
        &["--host-alias", HUB_ALIASES, "--direct", "deny"],
    );
    sc.ready().await;
    let hub_addr = format!("backend.team:{}", c.svc.hub_http);
    for request in [
        get(&format!("http://{hub_addr}/"), None),
        connect(&hub_addr, None),
        get(&format!("http://{HUB_IP}:{}/", c.svc.hub_http), None),
    ] {
        let a = ask(sc.proxy, &request).await;
        let line = request.lines().next().unwrap();
        assert_eq!(a.status, 403, "{line}: {a:?}");
        assert_eq!(
            a.header("x-tunnel-error"),
            Some("destination_not_allowed"),
            "{a:?}"
        );
        assert!(a.body.contains("--direct deny"), "{a:?}");
        assert!(a.body.contains(".tunnel.internal"), "{a:?}");
    }
    let url = format!(
        "http://hello.default.svc.east.tunnel.internal:{}/",
        c.svc.http
    );
    let out = curl(&["-x", &sc.url(None), &url], &[]).await;
    expect_hello(&out, "east", "a cluster name with --direct deny");
    let metrics = fetch_metrics(sc.admin).await;
    let series = "tunnel_sidecar_requests_total{kind=\"direct\",code=\"destination_not_allowed\"}";
    assert_eq!(metric(&metrics, series), Some(3.0), "{metrics}");
}
