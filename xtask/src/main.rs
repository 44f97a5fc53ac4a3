//! `cargo xtask`: the project's automation, in Rust so it runs wherever cargo does.

mod bench;
mod crossval;
mod eval;
mod gen_model;
mod gpu;
mod loadtest;
mod logits;
mod npy;
mod scenario;
mod tidy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a deterministic synthetic model (GGUF I2_S or HF folder).
    GenModel(gen_model::GenModelArgs),
    /// Held-out exact-match accuracy of the task model, per backend (and against HF).
    Eval(eval::EvalArgs),
    /// End-to-end speed on the 2b4t preset (or --model): CPU tok/s, bandwidth floor, peak RSS;
    /// with --device gpu, decode tok/s per precision and batch size, and GPU memory.
    Bench(bench::BenchArgs),
    /// Compare every backend with the reference forward pass; fails below thresholds.
    Crossval(crossval::CrossvalArgs),
    /// Reference-forward logits and greedy continuations over the prompt set (.npy + JSON).
    Logits(logits::LogitsArgs),
    /// Load-test a `bitnet serve` (started here from target/release/bitnet unless --url is given).
    Loadtest(loadtest::LoadtestArgs),
    /// Build the GPU tests and the CLI here, bundle them, print the device command.
    GpuSmoke(gpu::GpuSmokeArgs),
    /// Compile the CUDA kernels here (NVRTC) into a GPU bundle's PTX cache, per BITNET_CUDA_DEFINES variant.
    Ptx(gpu::PtxArgs),
    /// GPU fallback scenarios through the HTTP server (fault plans; outputs vs a CPU-only run).
    Test(scenario::TestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::GenModel(args) => gen_model::run(args),
        Command::Crossval(args) => crossval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Loadtest(args) => loadtest::run(args),
        Command::GpuSmoke(args) => gpu::smoke(args),
        Command::Ptx(args) => gpu::ptx(args),
        Command::Test(args) => scenario::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
