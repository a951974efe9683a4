use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = tunnel_agent::cli::Cli::parse();
    match tunnel_agent::cli::main(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tunnel-agent: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
