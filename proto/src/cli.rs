//! Pieces every binary's command line shares: durations, logging, signals.

use std::time::Duration;

/// Parses durations such as `500ms`, `10s`, `2m`, `1h`, or bare seconds (`30`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?}: expected a number with a unit, e.g. 10s or 500ms")
    })?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("invalid duration {s:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses byte sizes such as `256KiB`, `16MiB`, `1GiB`, or bare bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with a unit, e.g. 256KiB"))?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {unit:?} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("invalid size {s:?}: out of range"))
}

fn parse_window(s: &str) -> Result<u32, String> {
    let v = parse_bytes(s)?;
    if !(1024..=u64::from(crate::h2::CONNECTION_WINDOW)).contains(&v) {
        return Err(format!(
            "invalid window {s:?}: must be between 1KiB and 2GiB - 1 byte"
        ));
    }
    Ok(v as u32)
}

/// Flow-control flags of tunnel connections (see [`crate::h2`]).
#[derive(Debug, Clone, clap::Args)]
pub struct FlowArgs {
    /// Receive window of a new stream (one proxied connection) on a tunnel
    /// connection; adapts between --min-stream-window and --max-stream-window.
    #[arg(long, env = "TUNNEL_STREAM_WINDOW", default_value = "256KiB", value_parser = parse_window)]
    pub stream_window: u32,
    /// Floor of the stream window when many streams share a connection's budget.
    #[arg(long, env = "TUNNEL_MIN_STREAM_WINDOW", default_value = "64KiB", value_parser = parse_window)]
    pub min_stream_window: u32,
    /// Ceiling of the stream window that the bandwidth-delay estimate may
    /// reach on a long fat link; also the most one stalled stream may hold.
    #[arg(long, env = "TUNNEL_MAX_STREAM_WINDOW", default_value = "16MiB", value_parser = parse_window)]
    pub max_stream_window: u32,
    /// What the open streams of one tunnel connection may hold together, at
    /// most: beyond it new streams are refused (resource_exhausted). At most 1536MiB.
    #[arg(long, env = "TUNNEL_WINDOW_BUDGET", default_value = "1GiB", value_parser = parse_bytes)]
    pub window_budget: u64,
    /// Streams the peer may open on one tunnel connection.
    #[arg(long, env = "TUNNEL_MAX_STREAMS_PER_CONNECTION", default_value_t = crate::h2::DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_streams_per_connection: u32,
}

impl FlowArgs {
    /// The HTTP/2 settings these flags give, with `liveness`.
    pub fn settings(
        &self,
        liveness: crate::net::Liveness,
    ) -> Result<crate::h2::H2Settings, String> {
        if self.min_stream_window > self.max_stream_window {
            return Err("--min-stream-window is larger than --max-stream-window".into());
        }
        if !(u64::from(self.max_stream_window)..=crate::h2::MAX_WINDOW_BUDGET)
            .contains(&self.window_budget)
        {
            return Err(format!(
                "--window-budget must be between --max-stream-window and {} bytes (1536MiB)",
                crate::h2::MAX_WINDOW_BUDGET
            ));
        }
        Ok(crate::h2::H2Settings {
            stream_window: self.stream_window,
            min_stream_window: self.min_stream_window,
            max_stream_window: self.max_stream_window,
            window_budget: self.window_budget,
            max_concurrent_streams: self.max_streams_per_connection,
            liveness,
            ..crate::h2::H2Settings::default()
        })
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    Json,
    /// Human-readable lines.
    Text,
}

/// Installs the global tracing subscriber. The filter comes from `RUST_LOG`
/// when set, else `level` (e.g. `info`, `debug`, `tunnel_server=debug`).
pub fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only on a terminal: a file or a log collector would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A default instance id: the host name plus a random suffix.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..6])
}

/// Environment variable that sets the number of runtime worker threads
/// (default: one per CPU).
pub const WORKER_THREADS_ENV: &str = "TUNNEL_WORKER_THREADS";

/// The tokio runtime of a binary: multi-threaded, with `TUNNEL_WORKER_THREADS`
/// worker threads when set (a positive number), else `default_threads`, else
/// one per CPU.
pub fn runtime(default_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    let threads = std::env::var(WORKER_THREADS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .or(default_threads);
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(
            parse_duration("ten")
                .unwrap_err()
                .contains("expected a number")
        );
        assert!(parse_duration("10y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("256KiB").unwrap(), 256 * 1024);
        assert_eq!(parse_bytes("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("16MB").unwrap_err().contains("unknown unit"));
        assert!(parse_window("512").unwrap_err().contains("between"));
    }

    #[test]
    fn flow_flags_refuse_a_budget_the_connection_window_cannot_hold() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            flow: FlowArgs,
        }
        let live = crate::net::Liveness::default();
        let ok = Cli::parse_from(["x"]).flow.settings(live).unwrap();
        assert_eq!(ok.window_budget, 1 << 30);
        let big = Cli::parse_from(["x", "--window-budget", "2GiB"]);
        assert!(
            big.flow
                .settings(live)
                .unwrap_err()
                .contains("--window-budget")
        );
        let inverted = Cli::parse_from([
            "x",
            "--min-stream-window",
            "1MiB",
            "--max-stream-window",
            "512KiB",
        ]);
        assert!(inverted.flow.settings(live).is_err());
    }
}
