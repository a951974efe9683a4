//! Who a peer of the tunnel is, and the certificates that say so.
//!
//! # Modules
//!
//! - [`spiffe`]: the identities (`spiffe://<td>/agent/<cluster>`,
//!   `.../client/<name>`, `.../ns/<ns>/sa/<sa>`, `.../server`), parsed from
//!   and written into certificates, and the rules for cluster and client names;
//! - [`pki`]: the one set of certificate parameters (CA, leaf, serial,
//!   backdating) that every issuer uses: the standalone certificate command,
//!   the manager's signer and the injector's webhook certificate;
//! - [`cert_dir`]: a standalone installation's certificates, written as PEM
//!   files into one directory (the library behind `tunnel-server certs`).
//!
//! Loading certificates into TLS configurations is `tunnel_proto::tls`'s job.

pub mod cert_dir;
pub mod pki;
pub mod spiffe;

pub use spiffe::{Identity, IdentityError};
