use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tunnel_sidecar::config::Cli::parse();
    let result = tunnel_proto::cli::runtime()
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
