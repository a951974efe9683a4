//! The `tunnel-server` binary as a user runs it.

use std::process::Command;

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunnel-server"))
}

#[test]
fn certs_writes_a_ca_and_every_requested_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let out = server()
        .args(["certs", "--dir"])
        .arg(dir.path())
        .args(["--cluster", "east", "--cluster", "west", "--client", "app"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca-key.pem",
        "server.pem",
        "server-key.pem",
        "agent-east.pem",
        "agent-east-key.pem",
        "agent-west.pem",
        "agent-west-key.pem",
        "client-app.pem",
        "client-app-key.pem",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    // A second run adds a cluster with the same CA.
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let out = server()
        .args(["certs", "--dir"])
        .arg(dir.path())
        .args(["--cluster", "north"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
    assert!(dir.path().join("agent-north.pem").exists());
}

#[test]
fn an_invalid_cluster_name_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = server()
        .args(["certs", "--dir"])
        .arg(dir.path())
        .args(["--cluster", "East_1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("East_1"), "{err}");
}

#[test]
fn missing_certificates_stop_the_server_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = server()
        .arg("--cert-dir")
        .arg(dir.path())
        .args([
            "--client-listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.pem"), "{err}");
}

#[test]
fn a_bad_duration_names_the_flag() {
    let out = server().args(["--dial-timeout", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dial-timeout"), "{err}");
}
