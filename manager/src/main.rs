use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tunnel_manager::cli::Cli::parse();
    let result = tunnel_proto::cli::runtime(Some(2))
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(tunnel_manager::cli::main(cli)));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tunnel-manager: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
