use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = tunnel_sidecar::config::Cli::parse();
    match tunnel_sidecar::main(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tunnel-sidecar: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
