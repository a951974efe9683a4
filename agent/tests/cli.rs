//! The `tunnel-agent` binary as a user runs it.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunnel-agent"))
}

#[test]
fn a_bad_allow_rule_names_the_rule() {
    let out = agent()
        .args([
            "--server",
            "hub:8091",
            "--cluster",
            "east",
            "--allow",
            "10.0.0.0/33",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allow") && err.contains("10.0.0.0/33"),
        "{err}"
    );
}

#[test]
fn the_server_address_is_required() {
    let out = agent().args(["--cluster", "east"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server"));
}

#[test]
fn missing_certificates_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args(["--server", "127.0.0.1:1", "--cluster", "east", "--cert-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent-east"), "{err}");
}

#[test]
fn a_proxy_url_the_agent_cannot_use_names_the_variable() {
    let out = agent()
        .args(["--server", "hub.example.com:443", "--cluster", "east"])
        .env_remove("HTTPS_PROXY")
        .env("https_proxy", "https://proxy.example.com:3128")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("https_proxy=\"https://proxy.example.com:3128\"") && err.contains("http://"),
        "{err}"
    );
}
