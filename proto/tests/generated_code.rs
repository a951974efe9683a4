//! The generated protocol code is checked in, so a build needs no `protoc`.
//! This test regenerates it with pure-Rust tools (protox + tonic-prost-build)
//! and fails if the checked-in file differs. `UPDATE_GENERATED=1` rewrites it.

use std::path::Path;

#[test]
fn generated_code_matches_the_proto_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile([root.join("proto/tunnel.proto")], [root.join("proto")])
        .expect("proto/tunnel.proto compiles");
    let out = tempfile::tempdir().expect("temp dir");
    tonic_prost_build::configure()
        .build_transport(false)
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("code generation");
    let fresh = std::fs::read_to_string(out.path().join("clustertunnel.v1.rs")).unwrap();
    let checked_in_path = root.join("src/gen/clustertunnel.v1.rs");
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&checked_in_path, &fresh).unwrap();
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        fresh == checked_in,
        "{} is stale: run `UPDATE_GENERATED=1 cargo test -p tunnel-proto --test generated_code`",
        checked_in_path.display()
    );
}
