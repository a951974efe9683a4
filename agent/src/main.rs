fn main() -> std::process::ExitCode {
    // One worker thread unless TUNNEL_WORKER_THREADS says otherwise: an agent
    // carries one cluster's connections (one core moves over 5 Gbit/s through
    // TLS), and one thread spares each hop a cross-thread wake-up.
    tunnel_shell::run(
        tunnel_shell::WorkerThreads::Count(1),
        tunnel_agent::cli::main,
    )
}
