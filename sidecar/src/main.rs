fn main() -> std::process::ExitCode {
    // One worker thread unless TUNNEL_WORKER_THREADS says otherwise: a sidecar
    // sits in every pod and must stay small; one thread also spares each
    // hop a cross-thread wake-up (lower latency).
    tunnel_shell::run(
        tunnel_shell::WorkerThreads::Count(1),
        tunnel_sidecar::cli::main,
    )
}
