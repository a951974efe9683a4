//! What the container images set for every binary (`Dockerfile`), so that
//! the benchmark runs the tunnel's processes as the images do.

use crate::repo_root;

/// The environment variable the images set for glibc (see the Dockerfile).
pub const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES";

/// The values of `ENV name=value` lines of the `runtime` stage of
/// `dockerfile` (the stage every image is built from), in order.
pub fn runtime_env(dockerfile: &str, name: &str) -> Vec<String> {
    let mut in_runtime = false;
    let mut values = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        if let Some(from) = line.strip_prefix("FROM ") {
            in_runtime = from.trim_end().ends_with(" AS runtime");
            continue;
        }
        if in_runtime
            && let Some(value) = line
                .strip_prefix("ENV ")
                .and_then(|rest| rest.trim().strip_prefix(name))
                .and_then(|rest| rest.strip_prefix('='))
        {
            values.push(value.trim().to_owned());
        }
    }
    values
}

/// The `GLIBC_TUNABLES` the images run with (the repository's `Dockerfile`),
/// if any.
pub fn image_glibc_tunables() -> Option<String> {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).ok()?;
    runtime_env(&dockerfile, GLIBC_TUNABLES).pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_runtime_stage_counts() {
        let dockerfile = "FROM rust AS build\nENV X=build\nFROM debian AS runtime\nENV X=a\nENV XY=b\nFROM runtime AS tunnel-server\nENV X=server\n";
        assert_eq!(runtime_env(dockerfile, "X"), vec!["a".to_string()]);
        assert!(runtime_env(dockerfile, "Z").is_empty());
    }
}
