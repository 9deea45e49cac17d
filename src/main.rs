use clap::Parser;
use std::process::ExitCode;

/// Keeps freed tensor buffers in the process instead of returning them to the kernel: candle
/// allocates every intermediate fresh, and with glibc's defaults each large one is an mmap whose
/// pages fault in zeroed again on the next step (~25% of a single-threaded training step of the
/// shapes UNet). Costs resident memory up to the trim threshold after a peak.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    // candle asks for its thread count on every matmul; without RAYON_NUM_THREADS that re-reads
    // /proc/cpuinfo each time (~5% of a training step on the shapes UNet). Pin it once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle runs element-wise ops on a second pool of spinning threads beside rayon's (which
    // carries every GEMM and fused kernel); on few cores the two pools steal each other's
    // cores. Element-wise ops are memory-bound and mostly fused away, so they run on the
    // calling thread: a UNet call at 256x256 on 2 cores took 0.46 s instead of 0.58-0.72 s.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal; logs captured to files or by supervisors stay plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    dspo_server::cli::run(dspo_server::cli::Cli::parse())
}
