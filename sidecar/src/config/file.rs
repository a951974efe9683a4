//! The configuration file (TOML): the same settings as the flags, in
//! snake_case, unknown keys refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// The configuration file: the same settings as the flags, snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See `--server`.
    #[serde(default)]
    pub servers: Vec<String>,
    /// See `--server-name`.
    pub server_name: Option<String>,
    /// See `--cert-dir`.
    pub cert_dir: Option<PathBuf>,
    /// See `--client-name`.
    pub client_name: Option<String>,
    /// See `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// See `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// See `--ca`.
    pub ca: Option<PathBuf>,
    /// See `--token-file`.
    pub token_file: Option<PathBuf>,
    /// See `--port`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// See `--proxy-listen`.
    pub proxy_listen: Option<String>,
    /// See `--direct` ("allow" or "deny").
    pub direct: Option<String>,
    /// See `--host-alias`.
    #[serde(default)]
    pub host_aliases: Vec<String>,
    /// See `--direct-allow-ip`.
    #[serde(default)]
    pub direct_allow_ips: Vec<String>,
    /// See `--known-cluster`.
    #[serde(default)]
    pub known_clusters: Vec<String>,
    /// See `--admin-listen`.
    pub admin_listen: Option<String>,
    /// See `--bind-address`.
    pub bind_address: Option<String>,
    /// See `--allow-non-loopback`.
    pub allow_non_loopback: Option<bool>,
    /// See `--default-cluster`.
    pub default_cluster: Option<String>,
    /// See `--cluster-suffix`.
    pub cluster_suffix: Option<String>,
    /// See `--apiserver-host`.
    pub apiserver_host: Option<String>,
    /// See `--cluster-refresh`.
    pub cluster_refresh: Option<String>,
    /// See `--header-timeout`.
    pub header_timeout: Option<String>,
    /// See `--max-header-bytes`.
    pub max_header_bytes: Option<usize>,
    /// See `--max-headers`.
    pub max_headers: Option<usize>,
    /// See `--open-timeout`.
    pub open_timeout: Option<String>,
    /// See `--dead-peer-timeout`.
    pub dead_peer_timeout: Option<String>,
    /// See `--socket-buffer` (e.g. "256KiB", or "0").
    pub socket_buffer: Option<String>,
    /// See `--log-format` ("json" or "text").
    pub log_format: Option<String>,
    /// See `--log-level`.
    pub log_level: Option<String>,
}

impl FileConfig {
    /// Reads and parses a file; unknown keys are errors.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}
