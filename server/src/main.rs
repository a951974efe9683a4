fn main() -> std::process::ExitCode {
    tunnel_shell::run(
        tunnel_shell::WorkerThreads::PerCpu,
        tunnel_server::cli::main,
    )
}
