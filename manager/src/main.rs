fn main() -> std::process::ExitCode {
    // Controllers wait on the API server most of the time: two threads are plenty.
    tunnel_shell::run(
        tunnel_shell::WorkerThreads::Count(2),
        tunnel_manager::cli::main,
    )
}
