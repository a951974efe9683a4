//! The services the workloads run against (sink, echo, flood, ...) and the
//! paths to them: direct, the relay floors, and the tunnel's processes
//! ([`System`]) started fresh for each path.

use super::*;

// ---------------------------------------------------------------- services

/// Reads to EOF, then answers with one byte: proves every byte arrived.
pub(crate) async fn start_sink() -> SocketAddr {
    serve(|mut tcp| async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        let _ = tcp.write_all(b"k").await;
        let _ = tcp.shutdown().await;
    })
    .await
}

/// Writes one byte at once, then waits for EOF (first-byte latency).
pub(crate) async fn start_hello() -> SocketAddr {
    serve(|mut tcp| async move {
        let _ = tcp.set_nodelay(true);
        if tcp.write_all(b"h").await.is_err() {
            return;
        }
        let mut buf = [0u8; 64];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// Echoes, with TCP_NODELAY (round-trip latency).
pub(crate) async fn start_fast_echo() -> SocketAddr {
    serve(|mut tcp| async move {
        let _ = tcp.set_nodelay(true);
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// Writes without end (a stalled reader's source).
pub(crate) async fn start_flood() -> SocketAddr {
    serve(|mut tcp| async move {
        let buf = vec![7u8; 256 * 1024];
        while tcp.write_all(&buf).await.is_ok() {}
    })
    .await
}

/// Writes for [`WAN_SECS`] or [`WAN_MAX_BYTES`], then FIN (downloads).
pub(crate) async fn start_source() -> SocketAddr {
    serve(|mut tcp| async move {
        let buf = vec![0x3cu8; 256 * 1024];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < WAN_SECS && sent < WAN_MAX_BYTES {
            let n = buf.len().min((WAN_MAX_BYTES - sent) as usize);
            if tcp.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n as u64;
        }
        let _ = tcp.shutdown().await;
        let mut b = [0u8; 1];
        let _ = tcp.read(&mut b).await;
    })
    .await
}

pub(crate) async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(handler(tcp));
        }
    });
    addr
}

// ---------------------------------------------------------------- paths

pub(crate) struct Services {
    pub(crate) sink: SocketAddr,
    pub(crate) hello: SocketAddr,
    pub(crate) echo: SocketAddr,
    pub(crate) flood: SocketAddr,
    pub(crate) source: SocketAddr,
    pub(crate) stall: StallDestinations,
}

impl Services {
    /// In the order of [`Path_`]'s fields (the sidecar's ports).
    pub(crate) fn all(&self) -> [SocketAddr; 7] {
        [
            self.sink,
            self.hello,
            self.echo,
            self.flood,
            self.source,
            self.stall.never_reads,
            self.stall.floods,
        ]
    }
}

/// How the app reaches one service on a path.
#[derive(Clone, Copy)]
pub(crate) enum Endpoint {
    /// A plain TCP connect (direct, a forwarding port, a sidecar port).
    Tcp(SocketAddr),
    /// HTTP CONNECT through the sidecar's proxy to 127.0.0.1:port in the
    /// cluster named by the proxy user.
    Connect { proxy: SocketAddr, port: u16 },
}

impl Endpoint {
    pub(crate) async fn connect(self) -> TcpStream {
        self.try_connect(SocketBuffers::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A new connection whose socket has `buffers`.
    pub(crate) async fn try_connect(self, buffers: SocketBuffers) -> Result<TcpStream, String> {
        match self {
            Endpoint::Tcp(addr) => {
                let tcp = buffers
                    .connect(addr)
                    .await
                    .map_err(|e| format!("connect to {addr}: {e}"))?;
                tcp.set_nodelay(true).unwrap();
                Ok(tcp)
            }
            Endpoint::Connect { proxy, port } => {
                let mut tcp = buffers
                    .connect(proxy)
                    .await
                    .map_err(|e| format!("connect to the proxy {proxy}: {e}"))?;
                tcp.set_nodelay(true).unwrap();
                // The proxy user names the cluster.
                connect_on(&mut tcp, "bench", "127.0.0.1", port).await?;
                Ok(tcp)
            }
        }
    }
}

/// How to reach each service on one path.
pub(crate) struct Path_ {
    pub(crate) sink: Endpoint,
    pub(crate) hello: Endpoint,
    pub(crate) echo: Endpoint,
    pub(crate) flood: Endpoint,
    pub(crate) source: Endpoint,
    pub(crate) never_reads: Endpoint,
    pub(crate) floods: Endpoint,
}

impl Path_ {
    /// One endpoint per service, in the order of [`Services::all`].
    pub(crate) fn from_endpoints(e: [Endpoint; 7]) -> Self {
        let [sink, hello, echo, flood, source, never_reads, floods] = e;
        Self {
            sink,
            hello,
            echo,
            flood,
            source,
            never_reads,
            floods,
        }
    }
}

pub(crate) fn direct_path(s: &Services) -> Path_ {
    Path_::from_endpoints(s.all().map(Endpoint::Tcp))
}

/// Three [`relay_floor`] processes (`role` `relay` or `relay-async`)
/// chained in front of every service.
pub(crate) async fn relay_floor_path(
    s: &Services,
    role: &str,
    dir: &Path,
) -> (Path_, Vec<RoleProc>) {
    let mut procs = Vec::new();
    let mut ends = s.all();
    for hop in ["relay-agent", "relay-server", "relay-sidecar"] {
        let listens = free_listen_ports().map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        let args: Vec<String> = listens
            .iter()
            .zip(ends)
            .map(|(l, u)| format!("{l}={u}"))
            .collect();
        let proc = RoleProc::spawn_as(role, hop, &args, dir);
        for l in listens {
            wait_listening(l, "a relay-floor process").await;
        }
        procs.push(proc);
        ends = listens;
    }
    (Path_::from_endpoints(ends.map(Endpoint::Tcp)), procs)
}

pub(crate) async fn tunnel_path(
    s: &Services,
    client: Arc<tunnel_proto::client::TunnelClient>,
) -> Path_ {
    let mut eps = Vec::new();
    for a in s.all() {
        let target = Target::new("bench", "127.0.0.1", a.port());
        eps.push(Endpoint::Tcp(forward_port(client.clone(), target).await));
    }
    Path_::from_endpoints(eps.try_into().ok().expect("seven endpoints"))
}

/// A server process on free loopback ports, ready.
pub(crate) struct ServerProc {
    pub(crate) proc: RoleProc,
    pub(crate) client_addr: SocketAddr,
    pub(crate) agent_addr: SocketAddr,
}

impl ServerProc {
    pub(crate) async fn start(pki: &Pki) -> Self {
        let dir = pki.dir.path();
        let [agent_port, client_port, admin_port] = free_listen_ports();
        let s = |v: &str| v.to_string();
        let proc = RoleProc::spawn(
            "server",
            &[
                s("--agent-listen"),
                format!("127.0.0.1:{agent_port}"),
                s("--client-listen"),
                format!("127.0.0.1:{client_port}"),
                s("--admin-listen"),
                format!("127.0.0.1:{admin_port}"),
                s("--cert-dir"),
                dir.display().to_string(),
                s("--allow-all"),
                // Ready before its agent connects: the bench starts it first.
                s("--ready-wait=0s"),
                // The scale load is one identity's: 10,000 connections plus the
                // probes measured beside them.
                s("--max-connections-per-identity"),
                (2 * SCALE_CONNS).to_string(),
            ],
            dir,
        );
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        wait_until(
            "the server is ready",
            Duration::from_secs(20),
            || async move { matches!(http_get(admin, "/readyz").await, Ok((200, _))) },
        )
        .await;
        Self {
            proc,
            client_addr: format!("127.0.0.1:{client_port}").parse().unwrap(),
            agent_addr: format!("127.0.0.1:{agent_port}").parse().unwrap(),
        }
    }
}

/// The tunnel's processes for one path, started fresh so that memory freed by
/// an earlier path cannot hide this one's growth.
pub(crate) struct System {
    pub(crate) server: RoleProc,
    pub(crate) agent: RoleProc,
    pub(crate) sidecar: Option<RoleProc>,
    pub(crate) client_addr: SocketAddr,
    /// Sidecar ports, one per service in the order of [`Services::all`]; and its proxy.
    pub(crate) sidecar_ports: Option<([u16; 7], SocketAddr)>,
    /// The emulated WAN on the agent's path to the server, if any.
    pub(crate) _relay: Option<tunnel_tests::wan::WanRelay>,
}

impl System {
    pub(crate) async fn start(pki: &Pki, services: Option<&Services>) -> Self {
        Self::start_with(pki, services, None, None).await
    }

    /// With `wan`, the agent dials the server through an emulated link; with
    /// `socket_buffer`, the agent and the sidecar cap the kernel buffers of
    /// their app and destination sockets (`--socket-buffer`).
    pub(crate) async fn start_with(
        pki: &Pki,
        services: Option<&Services>,
        wan: Option<tunnel_tests::wan::Link>,
        socket_buffer: Option<&str>,
    ) -> Self {
        let buffer_args: Vec<String> = socket_buffer
            .map(|b| vec!["--socket-buffer".to_string(), b.to_string()])
            .unwrap_or_default();
        let dir = pki.dir.path();
        let server = ServerProc::start(pki).await;
        let relay = match wan {
            Some(link) => Some(
                tunnel_tests::wan::WanRelay::start(server.agent_addr, link)
                    .await
                    .expect("WAN relay"),
            ),
            None => None,
        };
        let agent_dials = relay.as_ref().map(|r| r.addr).unwrap_or(server.agent_addr);
        let agent_admin = free_port();
        let s = |v: &str| v.to_string();
        let agent = RoleProc::spawn(
            "agent",
            &[
                s("--server"),
                agent_dials.to_string(),
                s("--server-name"),
                s("localhost"),
                s("--cluster"),
                s("bench"),
                s("--cert-dir"),
                dir.display().to_string(),
                s("--allow"),
                s("127.0.0.0/8"),
                s("--admin-listen"),
                format!("127.0.0.1:{agent_admin}"),
            ]
            .into_iter()
            .chain(buffer_args.iter().cloned())
            .collect::<Vec<_>>(),
            dir,
        );
        let agent_admin: SocketAddr = format!("127.0.0.1:{agent_admin}").parse().unwrap();
        wait_until(
            "the agent's tunnel is up",
            Duration::from_secs(20),
            || async move { matches!(http_get(agent_admin, "/readyz").await, Ok((200, _))) },
        )
        .await;
        let client_addr = server.client_addr;
        // The agent is ready once its tunnel is up, which can be a round trip
        // before the server lists it: wait for the server.
        let lister = client(pki, "bench", client_addr);
        if let Err(e) = wait_agents(&lister, 1).await {
            panic!("{e}");
        }
        let (sidecar, sidecar_ports) = match services {
            None => (None, None),
            Some(sv) => {
                let [ports @ .., proxy, sc_admin] = free_listen_ports::<9>();
                let mut args = vec![
                    s("--server"),
                    client_addr.to_string(),
                    s("--server-name"),
                    s("localhost"),
                    s("--cert-dir"),
                    dir.display().to_string(),
                    s("--client-name"),
                    s("bench"),
                    s("--proxy-listen"),
                    format!("127.0.0.1:{proxy}"),
                    s("--admin-listen"),
                    format!("127.0.0.1:{sc_admin}"),
                ];
                args.extend(buffer_args.iter().cloned());
                for (p, svc) in ports.iter().zip(sv.all()) {
                    args.push(s("--port"));
                    args.push(format!("{p}=bench:127.0.0.1:{}", svc.port()));
                }
                let proc = RoleProc::spawn("sidecar", &args, dir);
                let sc_admin: SocketAddr = format!("127.0.0.1:{sc_admin}").parse().unwrap();
                // Ready means listening; measure once it also reaches the server.
                wait_until(
                    "the sidecar reaches the server",
                    Duration::from_secs(20),
                    || async move {
                        // The admin port may not listen yet: not ready, not a failure.
                        match http_get(sc_admin, "/metrics").await {
                            Ok((200, body)) => {
                                metric(&body, "tunnel_sidecar_server_connected") == Some(1.0)
                            }
                            _ => false,
                        }
                    },
                )
                .await;
                (
                    Some(proc),
                    Some((ports, format!("127.0.0.1:{proxy}").parse().unwrap())),
                )
            }
        };
        Self {
            server: server.proc,
            agent,
            sidecar,
            client_addr,
            sidecar_ports,
            _relay: relay,
        }
    }

    pub(crate) fn procs(&self) -> Vec<&RoleProc> {
        let mut v = vec![&self.server, &self.agent];
        if let Some(s) = &self.sidecar {
            v.push(s);
        }
        v
    }

    pub(crate) fn port_path(&self) -> Path_ {
        let (p, _) = self.sidecar_ports.expect("sidecar");
        Path_::from_endpoints(p.map(|port| Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], port)))))
    }

    pub(crate) fn connect_path(&self, s: &Services) -> Path_ {
        let (_, proxy) = self.sidecar_ports.expect("sidecar");
        Path_::from_endpoints(s.all().map(|a| Endpoint::Connect {
            proxy,
            port: a.port(),
        }))
    }
}
