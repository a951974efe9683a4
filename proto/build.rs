//! Records the git revision the binaries are built from (`TUNNEL_GIT_REVISION`
//! for the compiler), for their `--version`: the variable of that name when set
//! (a build from a tarball, an image build without `.git`), else `git rev-parse`,
//! else `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TUNNEL_GIT_REVISION");
    let revision = std::env::var("TUNNEL_GIT_REVISION")
        .ok()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TUNNEL_GIT_REVISION={revision}");
}

/// The short hash of HEAD, and the files whose change means HEAD moved.
fn git_revision() -> Option<String> {
    let revision = git(&["rev-parse", "--short=12", "HEAD"])?;
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        // HEAD changes on a checkout of another branch, its reflog on every
        // commit, reset or checkout: either one re-runs this script.
        for file in ["HEAD", "logs/HEAD"] {
            let path = Path::new(&dir).join(file);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(revision)
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(std::env::var_os("CARGO_MANIFEST_DIR")?)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}
