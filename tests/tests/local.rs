//! `tunnel-local`, the one-command local system, end to end: the real
//! binary, started as the README says (with non-default ports so that it
//! does not clash with anything on this machine), runs every command it
//! prints as a shell would, and stops cleanly on SIGTERM.
//!
//! One test only: tunnel-local binds fixed addresses for its sample services
//! (127.0.1.1 and 127.0.2.1, ports 8080, 8443 and 7007), so two instances
//! cannot run at once.

use std::time::Duration;

use tunnel_tests::*;

/// Proxy settings the printed commands must not inherit from the environment.
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

/// What a printed command must answer.
#[derive(Debug, PartialEq)]
enum Expect {
    /// The sample service of this cluster.
    Hello(&'static str),
    /// The sidecar's metrics.
    Metrics,
    /// A hub address (the server's `/healthz`) the proxy dials directly.
    Direct,
}

/// Reads what a command of the guide must answer from the command and its
/// comment.
fn expectation(command: &str, comment: &str) -> Expect {
    for cluster in ["east", "west"] {
        if comment.contains(&format!("hello from {cluster}"))
            || command.contains(&format!(".{cluster}.tunnel.internal"))
            || command.contains(&format!("{cluster}@"))
        {
            return Expect::Hello(cluster);
        }
    }
    if command.contains("/metrics") {
        return Expect::Metrics;
    }
    if comment.contains("dialed directly") && command.contains("/healthz") {
        return Expect::Direct;
    }
    panic!("the guide prints {command:?} ({comment:?}); this test does not know what it answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_local_answers_every_command_it_prints_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (east_port, west_port) = (free_port(), free_port());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tunnel-local"));
    cmd.args([
        "--dir",
        &dir.path().display().to_string(),
        "--proxy-listen",
        &free_addr().to_string(),
        "--east-port",
        &east_port.to_string(),
        "--west-port",
        &west_port.to_string(),
        "--sidecar-admin-listen",
        &free_addr().to_string(),
        "--server-client-listen",
        &free_addr().to_string(),
        "--server-agent-listen",
        &free_addr().to_string(),
        "--server-admin-listen",
        &free_addr().to_string(),
    ]);
    let mut local = Proc::spawn_command("tunnel-local", cmd);
    local
        .wait_log(&["Stop with Ctrl-C"], 1, Duration::from_secs(60))
        .await;

    // The commands after "Try:", up to the blank line; `# ...` is a comment.
    let guide = local.logs();
    let commands: Vec<(String, String)> = guide
        .lines()
        .skip_while(|l| l.trim() != "Try:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let (command, comment) = l.split_once(" # ").unwrap_or((l, ""));
            (command.trim().to_owned(), comment.trim().to_owned())
        })
        .collect();
    assert!(
        commands.len() >= 5,
        "the guide prints a per-cluster port, http_proxy and https_proxy example for each way in:\n{guide}"
    );
    let mut seen = Vec::new();
    for (command, comment) in &commands {
        let want = expectation(command, comment);
        let mut sh = tokio::process::Command::new("sh");
        sh.arg("-c").arg(command).kill_on_drop(true);
        for v in PROXY_VARS {
            sh.env_remove(v);
        }
        let out = tokio::time::timeout(Duration::from_secs(30), sh.output())
            .await
            .unwrap_or_else(|_| panic!("{command}: no answer within 30 s"))
            .unwrap_or_else(|e| panic!("{command}: cannot run sh: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{command}: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        match &want {
            Expect::Hello(cluster) => assert!(
                stdout.starts_with(&format!("hello from {cluster} ")),
                "{command}: answered {stdout:?}"
            ),
            Expect::Metrics => assert!(
                stdout.contains("tunnel_sidecar_requests_total"),
                "{command}: answered {stdout:?}"
            ),
            Expect::Direct => assert_eq!(stdout, "ok\n", "{command}"),
        }
        seen.push(want);
    }
    for want in [
        Expect::Hello("east"),
        Expect::Hello("west"),
        Expect::Metrics,
        Expect::Direct,
    ] {
        assert!(
            seen.contains(&want),
            "no printed command shows {want:?}:\n{guide}"
        );
    }
    let proxied = commands
        .iter()
        .filter(|(c, _)| c.contains("http_proxy=") || c.contains("https_proxy="))
        .count();
    assert!(
        proxied >= 2,
        "the guide shows http_proxy and https_proxy:\n{guide}"
    );

    local.signal("TERM");
    let status = tokio::task::block_in_place(|| local.wait_exit(Duration::from_secs(15)))
        .expect("tunnel-local exits within 15 s of SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", local.logs());
    // The sidecar and the agents stop first: nothing is left open, so the
    // server's drain ends at once rather than at its deadline.
    assert!(
        !local.logs().contains("drain deadline passed"),
        "tunnel-local's server, with nothing open, waits for its drain deadline:\n{}",
        local.logs()
    );
    assert!(
        local.logs().contains("stopped"),
        "tunnel-local says it stopped:\n{}",
        local.logs()
    );
}
