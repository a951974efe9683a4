//! The generated protocol code is checked in, so a build needs no `protoc`.
//! This test regenerates it with pure-Rust tools (protox + tonic-prost-build)
//! and fails if a checked-in file differs. `UPDATE_GENERATED=1` rewrites them.

use std::path::Path;

/// Compares the freshly generated `generated` (a file name in `out`) with
/// the checked-in `checked_in` (under `src/gen`), or rewrites it.
fn compare(out: &Path, generated: &str, checked_in: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fresh = std::fs::read_to_string(out.join(generated)).unwrap();
    let checked_in_path = root.join("src/gen").join(checked_in);
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
    compare(out.path(), "clustertunnel.v1.rs", "clustertunnel.v1.rs");
}

/// The konnectivity protocol declares no package (its gRPC method is
/// `/ProxyService/Proxy`), so prost names the file `_.rs`. Only the client
/// is generated (the tests' konnectivity client); the server reads the
/// packets off its own HTTP/2 streams. Payloads are `Bytes`, so decoding a
/// DATA packet copies nothing.
#[test]
fn generated_konnectivity_code_matches_the_proto_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(
        [root.join("proto/konnectivity/client.proto")],
        [root.join("proto")],
    )
    .expect("proto/konnectivity/client.proto compiles");
    let out = tempfile::tempdir().expect("temp dir");
    tonic_prost_build::configure()
        .build_transport(false)
        .build_server(false)
        .bytes(".Data.data")
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("code generation");
    compare(out.path(), "_.rs", "konnectivity.rs");
}
