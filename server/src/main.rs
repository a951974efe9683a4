use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = tunnel_server::cli::Cli::parse();
    match tunnel_server::cli::main(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tunnel-server: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
