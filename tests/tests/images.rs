//! The container images' settings that the benchmark's figures depend on:
//! both Dockerfiles give every binary the same glibc tunables, and the
//! benchmark reads them from there (`tunnel_tests::images`).

use tunnel_tests::images::{GLIBC_TUNABLES, image_glibc_tunables, runtime_env};
use tunnel_tests::repo_root;

#[test]
fn both_dockerfiles_run_every_binary_with_the_same_glibc_tunables() {
    let read = |name: &str| std::fs::read_to_string(repo_root().join(name)).unwrap();
    let prebuilt = runtime_env(&read("Dockerfile"), GLIBC_TUNABLES);
    let multi_stage = runtime_env(&read("Dockerfile.build"), GLIBC_TUNABLES);
    assert_eq!(prebuilt.len(), 1, "Dockerfile: {prebuilt:?}");
    assert_eq!(
        prebuilt, multi_stage,
        "Dockerfile and Dockerfile.build differ"
    );
    assert!(
        prebuilt[0].contains("glibc.cpu.x86_rep_movsb_threshold="),
        "the images keep memcpy off `rep movsb` for large copies: {prebuilt:?}"
    );
    assert_eq!(
        image_glibc_tunables().as_deref(),
        Some(prebuilt[0].as_str())
    );
}
