use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tunnel_agent::cli::Cli::parse();
    // One worker thread unless TUNNEL_WORKER_THREADS says otherwise: an agent
    // carries one cluster's connections (one core moves over 5 Gbit/s through
    // TLS), and one thread spares each hop a cross-thread wake-up.
    let result = tunnel_proto::cli::runtime(Some(1))
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(tunnel_agent::cli::main(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tunnel-agent: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
