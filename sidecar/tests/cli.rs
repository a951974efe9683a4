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
        &["--server", "hub:8090", "--port", "15080=east"],
        "--proxy-listen",
    );
}

#[test]
fn an_invalid_destination_says_why() {
    fails_with(
        &["--server", "hub:8090", "--port", "15001=east:svc"],
        "HOST:PORT",
    );
}

#[test]
fn a_non_loopback_listener_needs_the_flag() {
    fails_with(
        &["--server", "hub:8090", "--proxy-listen", "0.0.0.0:15080"],
        "--allow-non-loopback",
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
