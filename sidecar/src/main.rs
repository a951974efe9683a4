use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tunnel_sidecar::config::Cli::parse();
    // One worker thread unless TUNNEL_WORKER_THREADS says otherwise: a sidecar
    // sits in every pod and must stay small; one thread also spares each
    // hop a cross-thread wake-up (lower latency).
    let result = tunnel_proto::cli::runtime(Some(1))
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(tunnel_sidecar::main(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tunnel-sidecar: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
