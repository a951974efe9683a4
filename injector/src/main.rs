use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tunnel_injector::cli::Cli::parse();
    // A webhook answers a few requests a second: two threads are plenty.
    let result = tunnel_proto::cli::runtime(Some(2))
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(tunnel_injector::cli::main(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tunnel-injector: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
