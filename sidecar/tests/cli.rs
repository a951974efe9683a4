//! The `tunnel-sidecar` binary as a user runs it: configuration mistakes stop
//! it at once with the flag or key named.

use std::process::Command;

fn sidecar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunnel-sidecar"))
}

fn fails_with(args: &[&str], needle: &str) {
    let out = sidecar().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in: {err}"
    );
}

#[test]
fn a_port_clash_names_both_flags() {
    fails_with(
        &["--server", "hub:8090", "--port", "17080=east"],
        "--proxy-listen",
    );
}

#[test]
fn an_invalid_destination_says_why() {
    fails_with(
        &["--server", "hub:8090", "--port", "17001=east:svc"],
        "HOST:PORT",
    );
}

#[test]
fn a_non_loopback_listener_needs_the_flag() {
    fails_with(
        &["--server", "hub:8090", "--proxy-listen", "0.0.0.0:17080"],
        "--allow-non-loopback",
    );
}

#[test]
fn a_proxy_beyond_loopback_must_not_dial_directly() {
    fails_with(
        &[
            "--server",
            "hub:8090",
            "--proxy-listen",
            "0.0.0.0:17080",
            "--allow-non-loopback",
        ],
        "--direct deny",
    );
}

#[test]
fn an_unknown_key_in_the_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, "servers = [\"hub:8090\"]\nproxy_port = 1\n").unwrap();
    fails_with(&["--config", path.to_str().unwrap()], "proxy_port");
}

#[test]
fn missing_certificates_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = sidecar()
        .args([
            "--server",
            "127.0.0.1:1",
            "--proxy-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--cert-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client-sidecar.pem"), "{err}");
}

#[test]
fn wait_ready_gives_up_with_a_message_when_nothing_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = sidecar()
        .args([
            "--admin-listen",
            &format!("127.0.0.1:{port}"),
            "wait-ready",
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not ready within"), "{err}");
}

#[test]
fn wait_ready_returns_once_readyz_answers_200() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Not ready twice, then ready.
    let server = std::thread::spawn(move || {
        for status in [
            "503 Service Unavailable",
            "503 Service Unavailable",
            "200 OK",
        ] {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = write!(s, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
        }
    });
    // The injected environment names 0.0.0.0; wait-ready asks loopback.
    let out = sidecar()
        .env("TUNNEL_ADMIN_LISTEN", format!("0.0.0.0:{}", addr.port()))
        .args(["wait-ready", "--timeout", "20s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.join().unwrap();
}
