//! The command line: every subcommand's arguments and what runs it. `src/main.rs` only sets
//! up the process (allocator, thread pools, logging) and hands the parsed command here.

pub mod bench;
pub mod bench_serve;
pub mod bench_train;
pub mod eval;
pub mod serve;
pub mod train;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "dspo-server",
    version,
    about = "Stable Diffusion serving and DSPO preference fine-tuning"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Compare the fused kernels with the composed form they replace (values and gradients):
    /// one JSON line per case, exit 1 if any exceeds its tolerance.
    CheckKernels {
        /// cpu or cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Storage types to check, comma-separated (f32, f16, bf16; the CPU kernel is f32 only)
        #[arg(long, default_value = "f32")]
        dtypes: String,
    },
    /// Time one optimiser step (synthetic latents) and report peak memory, as JSON.
    BenchTrain(bench_train::TrainBenchArgs),
    /// Win rate of model/adapter A over B on a prompt file (fixed seeds, external reward).
    Eval(eval::EvalArgs),
    /// VAE round trips of a dataset's last images, for checking an autoencoder with a scorer.
    Reconstruct(eval::ReconstructArgs),
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
    Bench(bench::BenchCommand),
    /// Write a random-weight pipeline in diffusers layout from real config files.
    MakeRandomModel(bench::MakeRandomModelArgs),
    /// Serve the HTTP API (see config/default.toml for every setting).
    Serve(serve::ServeArgs),
    /// Print the OpenAPI document (the committed openapi/openapi.json).
    Openapi,
    /// Images/s through the HTTP server at several concurrencies, batching off and on.
    BenchServe(bench_serve::BenchServeArgs),
}

/// Runs a parsed command; errors are printed, with exit code 2.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Conformance {
            suite,
            kinds,
            cases,
            device,
        } => run_conformance(&suite, &kinds, &cases, &device),
        Command::CheckKernels { device, dtypes } => run_check_kernels(&device, &dtypes),
        Command::BenchTrain(args) => bench_train::run(&args).map(|v| {
            println!("{v}");
            ExitCode::SUCCESS
        }),
        Command::Train { config, overrides } => {
            train::run_train(&config, &overrides).map(|_| ExitCode::SUCCESS)
        }
        Command::Eval(args) => eval::run_eval(&args).map(|v| {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }),
        Command::Reconstruct(args) => {
            eval::run_reconstruct(&args).map(|_| ExitCode::SUCCESS)
        }
        Command::Bench(cmd) => bench::run(&cmd).map(|_| ExitCode::SUCCESS),
        Command::MakeRandomModel(args) => {
            bench::run_make_random_model(&args).map(|_| ExitCode::SUCCESS)
        }
        Command::Serve(args) => serve::run_serve(&args).map(|_| ExitCode::SUCCESS),
        Command::Openapi => {
            serve::print_openapi();
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchServe(args) => {
            bench_serve::run(&args).map(|_| ExitCode::SUCCESS)
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

fn run_check_kernels(device: &str, dtypes: &str) -> anyhow::Result<ExitCode> {
    use crate::models::device::{parse_device, parse_dtype};
    let device = parse_device(device).map_err(anyhow::Error::msg)?;
    let mut failed = 0;
    for name in dtypes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let dtype = parse_dtype(name).map_err(anyhow::Error::msg)?;
        for row in crate::models::kernels::check::check_attention(&device, dtype)? {
            failed += usize::from(!row.passed());
            let mut line = serde_json::to_value(&row)?;
            line["passed"] = row.passed().into();
            println!("{line}");
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{failed} kernel check(s) failed");
        ExitCode::from(1)
    })
}

fn run_conformance(
    suite: &Path,
    kinds: &[String],
    cases: &[String],
    device: &str,
) -> anyhow::Result<ExitCode> {
    let device = crate::models::device::parse_device(device).map_err(anyhow::Error::msg)?;
    let mut runner = crate::conformance::Runner::new(suite, device);
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
