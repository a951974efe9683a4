fn main() -> std::process::ExitCode {
    // A webhook answers a few requests a second: two threads are plenty.
    tunnel_shell::run(
        tunnel_shell::WorkerThreads::Count(2),
        tunnel_injector::cli::main,
    )
}
