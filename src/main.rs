use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dspo-server", version, about = "Stable Diffusion serving and DSPO preference fine-tuning")]
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
}

fn parse_device(s: &str) -> anyhow::Result<candle_core::Device> {
    match s {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s.starts_with("cuda") => {
            let ord = s.strip_prefix("cuda:").map(|n| n.parse()).transpose()?.unwrap_or(0);
            Ok(candle_core::Device::new_cuda(ord)?)
        }
        o => anyhow::bail!("unknown device '{o}' (cpu or cuda:N)"),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Conformance { suite, kinds, cases, device } => run_conformance(&suite, &kinds, &cases, &device),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_conformance(suite: &PathBuf, kinds: &[String], cases: &[String], device: &str) -> anyhow::Result<ExitCode> {
    let device = parse_device(device)?;
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
    Ok(if failed == 0 && passed > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
