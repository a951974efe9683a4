use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tunnel_server::cli::Cli::parse();
    let result = tunnel_proto::cli::runtime(None)
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(tunnel_server::cli::main(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tunnel-server: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
