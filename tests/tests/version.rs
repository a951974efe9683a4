//! Versions agree: every binary's `--version` names the workspace's version and
//! the git revision it was built from, every crate takes the workspace's
//! version, and the charts' `appVersion` (the images' default tag) is it.

use std::process::Command;

use tunnel_tests::bin;

const VERSION: &str = env!("CARGO_PKG_VERSION");

use tunnel_tests::repo_root as root;

/// The revision a build from this checkout records: `TUNNEL_GIT_REVISION`
/// when set, else git's short HEAD, else `unknown` (no git, or a tarball).
fn expected_revision() -> String {
    if let Some(r) = std::env::var("TUNNEL_GIT_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
    {
        return r.trim().to_owned();
    }
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

#[test]
fn every_binary_prints_the_crate_version_and_the_git_revision() {
    let revision = expected_revision();
    for name in [
        "tunnel-server",
        "tunnel-agent",
        "tunnel-sidecar",
        "tunnel-injector",
        "tunnel-manager",
        "tunnel-local",
    ] {
        let out = Command::new(bin(name))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
        assert!(out.status.success(), "{name} --version failed");
        let printed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            printed.trim(),
            format!("{name} {VERSION} ({revision})"),
            "{name} --version (a binary built before the last commit prints the revision it was \
             built from: `cargo test --workspace` or `cargo build --bins` rebuilds it)"
        );
    }
}

#[test]
fn every_crate_takes_the_workspace_version() {
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members = workspace
        .split("members = [")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .expect("workspace members");
    let package = workspace
        .split("[workspace.package]")
        .nth(1)
        .expect("[workspace.package]");
    assert!(
        package.contains(&format!("version = \"{VERSION}\"")),
        "[workspace.package] version is not {VERSION}"
    );
    for member in members.split(',').map(|m| m.trim().trim_matches('"')) {
        if member.is_empty() {
            continue;
        }
        let manifest = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
        assert!(
            manifest
                .lines()
                .any(|l| l.trim() == "version.workspace = true"),
            "{member}/Cargo.toml does not take the workspace's version"
        );
    }
}

#[test]
fn the_charts_app_version_is_the_crates_version() {
    for chart in ["cluster-tunnel", "cluster-tunnel-agent"] {
        let text =
            std::fs::read_to_string(root().join("charts").join(chart).join("Chart.yaml")).unwrap();
        let app_version = text
            .lines()
            .find_map(|l| l.strip_prefix("appVersion:"))
            .unwrap_or_else(|| panic!("{chart}/Chart.yaml has no appVersion"))
            .trim()
            .trim_matches('"');
        assert_eq!(
            app_version, VERSION,
            "charts/{chart}/Chart.yaml appVersion (the images' default tag) is not the crates' version"
        );
    }
}
