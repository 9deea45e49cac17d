use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "dspo-server",
    version,
    about = "Stable Diffusion serving and DSPO preference fine-tuning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a conformance suite: one line per case, then `N passed, M failed`.
    Conformance {
        /// Suite directory (with cases/ and models/)
        suite: PathBuf,
        /// Only run cases of these kinds (repeatable)
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Only run these cases (repeatable)
        #[arg(long = "case")]
        cases: Vec<String>,
        /// cpu or cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Time one optimiser step (synthetic latents) and report peak memory, as JSON.
    BenchTrain(dspo_server::training::bench::TrainBenchArgs),
    /// Win rate of model/adapter A over B on a prompt file (fixed seeds, external reward).
    Eval(dspo_server::eval::EvalArgs),
    /// VAE round trips of a dataset's last images, for checking an autoencoder with a scorer.
    Reconstruct(dspo_server::eval::ReconstructArgs),
    /// Train: preference pairs (DSPO, Diffusion-DPO, SFT, DSPO-E), or with `mode` a
    /// text-to-image model or its VAE from an image–caption parquet.
    Train {
        /// Training config (TOML or JSON); see config/train-example.toml
        #[arg(long)]
        config: PathBuf,
        /// Override a hyperparameter or path: --set max_steps=10 (repeatable)
        #[arg(long = "set")]
        overrides: Vec<String>,
    },
    /// Latency benchmarks (JSON lines; bench/cpu_txt2img.sh compares them with diffusers).
    #[command(subcommand)]
    Bench(dspo_server::bench::BenchCommand),
    /// Write a random-weight pipeline in diffusers layout from real config files.
    MakeRandomModel(dspo_server::bench::MakeRandomModelArgs),
    /// Serve the HTTP API (see config/default.toml for every setting).
    Serve(dspo_server::api::cli::ServeArgs),
    /// Print the OpenAPI document (the committed openapi/openapi.json).
    Openapi,
    /// Images/s through the HTTP server at several concurrencies, batching off and on.
    BenchServe(dspo_server::api::loadtest::BenchServeArgs),
}

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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Conformance {
            suite,
            kinds,
            cases,
            device,
        } => run_conformance(&suite, &kinds, &cases, &device),
        Command::BenchTrain(args) => dspo_server::training::bench::run(&args).map(|v| {
            println!("{v}");
            ExitCode::SUCCESS
        }),
        Command::Train { config, overrides } => {
            dspo_server::training::cli::run_train(&config, &overrides).map(|_| ExitCode::SUCCESS)
        }
        Command::Eval(args) => dspo_server::eval::run_eval(&args).map(|v| {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }),
        Command::Reconstruct(args) => {
            dspo_server::eval::run_reconstruct(&args).map(|_| ExitCode::SUCCESS)
        }
        Command::Bench(cmd) => dspo_server::bench::run(&cmd).map(|_| ExitCode::SUCCESS),
        Command::MakeRandomModel(args) => {
            dspo_server::bench::run_make_random_model(&args).map(|_| ExitCode::SUCCESS)
        }
        Command::Serve(args) => dspo_server::api::cli::run_serve(&args).map(|_| ExitCode::SUCCESS),
        Command::Openapi => {
            dspo_server::api::cli::print_openapi();
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchServe(args) => {
            dspo_server::api::loadtest::run(&args).map(|_| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_conformance(
    suite: &PathBuf,
    kinds: &[String],
    cases: &[String],
    device: &str,
) -> anyhow::Result<ExitCode> {
    let device = dspo_server::models::device::parse_device(device).map_err(anyhow::Error::msg)?;
    let mut runner = dspo_server::conformance::Runner::new(suite, device);
    let mut passed = 0;
    let mut failed = 0;
    for name in runner.case_names()? {
        if !cases.is_empty() && !cases.contains(&name) {
            continue;
        }
        if !kinds.is_empty() {
            let kind = runner.kind_of(&name).unwrap_or_default();
            if !kinds.contains(&kind) {
                continue;
            }
        }
        let r = runner.run_case(&name);
        println!("{}", r.line());
        if r.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
