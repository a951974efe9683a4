//! What every binary's `--version` prints: the crate version and the git
//! revision it was built from (`build.rs`: `TUNNEL_GIT_REVISION` when set at
//! build time, else `git rev-parse HEAD`, else `unknown`).

/// The git revision the binaries were built from (12 hex digits), or what
/// `TUNNEL_GIT_REVISION` said at build time, or `unknown`.
pub const GIT_REVISION: &str = env!("TUNNEL_GIT_REVISION");

/// `<crate version> (<git revision>)`, e.g. `0.1.0 (d193418a1b2c)`; every
/// crate of the workspace shares the version.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("TUNNEL_GIT_REVISION"),
    ")"
);
