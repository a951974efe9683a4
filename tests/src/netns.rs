//! Network namespaces joined to this one by a veth pair with a /30: a host
//! whose network this side cannot route into except through that link.
//! Used by the network tests and by `tunnel-local --netns`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

/// A network namespace with a veth link to this one. Removed on drop.
#[derive(Debug)]
pub struct NetNs {
    /// The namespace's name.
    pub name: String,
    /// The veth end in this (the hub's) namespace.
    pub hub_if: String,
    /// The hub side's address.
    pub hub_ip: Ipv4Addr,
    /// The namespace side's address.
    pub cluster_ip: Ipv4Addr,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {program}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "`{program} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl NetNs {
    /// Creates namespace `name` with a veth pair (`cth<tag>` here, `ctn<tag>`
    /// inside; `tag` at most 11 characters), `hub_ip`/30 on this side and the
    /// next address inside, and brings the links and the namespace's loopback up.
    pub fn create_with(name: &str, tag: &str, hub_ip: Ipv4Addr) -> anyhow::Result<Self> {
        let cluster_ip = Ipv4Addr::from(u32::from(hub_ip) + 1);
        let ns = Self {
            name: name.to_owned(),
            hub_if: format!("cth{tag}"),
            hub_ip,
            cluster_ip,
        };
        run("ip", &["netns", "add", &ns.name])?;
        // From here on, Drop cleans up whatever was made.
        let cluster_if = format!("ctn{tag}");
        run(
            "ip",
            &[
                "link",
                "add",
                &ns.hub_if,
                "type",
                "veth",
                "peer",
                "name",
                &cluster_if,
            ],
        )?;
        run("ip", &["link", "set", &cluster_if, "netns", &ns.name])?;
        run(
            "ip",
            &["addr", "add", &format!("{hub_ip}/30"), "dev", &ns.hub_if],
        )?;
        run("ip", &["link", "set", &ns.hub_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        inside(&[
            "addr",
            "add",
            &format!("{cluster_ip}/30"),
            "dev",
            &cluster_if,
        ])?;
        inside(&["link", "set", &cluster_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The veth end inside the namespace.
    fn cluster_if(&self) -> String {
        format!(
            "ctn{}",
            self.hub_if.strip_prefix("cth").unwrap_or(&self.hub_if)
        )
    }

    /// Gives the hub side one more address: `ip`/32 on its veth end, routed
    /// from inside the namespace over the link (so several hub replicas can
    /// listen on one port, as behind one DNS name). Goes with the veth pair.
    pub fn add_hub_address(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        run(
            "ip",
            &["addr", "add", &format!("{ip}/32"), "dev", &self.hub_if],
        )?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "ip",
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &self.cluster_if(),
                "src",
                &self.cluster_ip.to_string(),
            ],
        )
    }

    /// The namespace's host vanishes for this side: its veth end goes down,
    /// so that nothing in it answers any more, not even with a reset.
    pub fn vanish(&self) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "ip",
                "link",
                "set",
                &self.cluster_if(),
                "down",
            ],
        )
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.hub_if])
            .output();
    }
}

/// The `/etc/hosts` of commands run in a namespace: `ip netns exec`
/// bind-mounts `/etc/netns/<name>/hosts` over `/etc/hosts` for the command it
/// runs. Create it before starting the command; removed on drop.
#[derive(Debug)]
pub struct NsHosts {
    dir: PathBuf,
    made_parent: bool,
}

impl NsHosts {
    /// Writes `content` as the hosts file of namespace `ns`.
    pub fn create(ns: &NetNs, content: &str) -> anyhow::Result<Self> {
        let parent = PathBuf::from("/etc/netns");
        let made_parent = !parent.exists();
        let dir = parent.join(&ns.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let hosts = Self { dir, made_parent };
        hosts.write(content)?;
        Ok(hosts)
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    /// Rewrites the file in place. A running command sees the file it was
    /// given through a bind mount of this inode, so the file is overwritten,
    /// never replaced; written over its start and then cut to length, it is
    /// never empty while a reader looks (when only lines are appended, every
    /// read sees the old or the new content).
    pub fn write(&self, content: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let path = self.path();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        file.write_all(content.as_bytes())?;
        file.set_len(content.len() as u64)?;
        Ok(())
    }
}

impl Drop for NsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.made_parent {
            // Only if empty: another namespace may have made its own since.
            let _ = std::fs::remove_dir("/etc/netns");
        }
    }
}

/// Whether this process runs as root (namespaces need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// An echo server in Python, one connection at a time, passing on the FIN;
/// a connection reset by its client is just closed.
pub const ECHO_PY: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    try:
        while True:
            data = c.recv(65536)
            if not data:
                break
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
    except OSError as e:
        print("connection ended:", e, flush=True)
    c.close()
"#;

/// The real Python interpreter (not a version manager's shim), so that the
/// process killed on drop is the server itself.
pub fn python3() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs the destination inside the namespace; install it");
    assert!(out.status.success(), "python3 -c failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl NetNs {
    /// A Python echo server on the namespace's own `127.0.0.1:port` (see [`ECHO_PY`]).
    pub fn echo_command(&self, port: u16) -> Command {
        let mut cmd = self.command(python3());
        cmd.args(["-c", ECHO_PY, &port.to_string()]);
        cmd
    }
}

impl NetNs {
    /// A namespace with a unique name and random addresses in 10.231.0.0/16,
    /// for tests; panics with the command's output if it cannot be made.
    pub fn create() -> Self {
        let tag: u32 = rand::random::<u32>() & 0xff_ffff;
        let (third, fourth) = (rand::random::<u8>(), rand::random::<u8>() & 0xfc);
        NetNs::create_with(
            &format!("ct-{}-{tag:06x}", std::process::id()),
            &format!("{tag:06x}"),
            std::net::Ipv4Addr::new(10, 231, third, fourth + 1),
        )
        .expect("network namespace")
    }
}
