//! `bitnet`: the command-line program of bitnet-rs.
//!
//! Exit status: 0 on success, 1 when the command failed (the error chain is
//! printed), 2 for usage errors (from clap).

mod convert;
mod default_model;
mod generate;
mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bitnet", version, about = "BitNet b1.58 inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(generate::GenerateArgs),
    /// Show a model file's metadata and tensors, and validate it.
    Inspect(inspect::InspectArgs),
    /// Convert between GGUF (I2_S) and HF safetensors folders.
    Convert(convert::ConvertArgs),
    /// Serve the OpenAI-compatible HTTP API (continuous batching).
    Serve(bitnet_server::server::ServeArgs),
    /// Print CPU and GPU capabilities.
    Devices {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Devices { json } => devices(json),
        Command::Serve(args) => bitnet_server::server::run(args, load_model),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut shown = err.to_string();
            eprintln!("error: {shown}");
            for cause in err.chain().skip(1) {
                // Some library errors repeat their source in their own message.
                let text = cause.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {text}");
                }
                shown = text;
            }
            ExitCode::from(1)
        }
    }
}

fn devices(json: bool) -> anyhow::Result<()> {
    let cpu = bitnet_device::CpuInfo::probe();
    let probe = bitnet_device::probe_gpus();
    if json {
        let value = serde_json::json!({
            "cpu": bitnet_server::server::devices::cpu_json(&cpu),
            "cuda": probe.to_string(),
            "gpus": bitnet_server::server::devices::gpus_json(&probe),
            "gpu_backend": bitnet_server::server::devices::gpu_backend_json(&probe),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("cpu: {cpu}");
        if let Some(total) = cpu.total_memory_bytes {
            println!("memory: {:.1} GiB total", total as f64 / (1u64 << 30) as f64);
        }
        println!("cuda: {probe}");
        for g in probe.gpus() {
            let caps = g.capabilities();
            println!(
                "gpu {}: {}, compute capability {}.{}, {:.1} GiB total / {:.1} GiB free, fp16 {}, bf16 {}, tensor cores {}",
                g.ordinal,
                g.name,
                g.compute_capability.0,
                g.compute_capability.1,
                g.total_memory_bytes as f64 / (1u64 << 30) as f64,
                g.free_memory_bytes as f64 / (1u64 << 30) as f64,
                caps.fp16,
                caps.bf16,
                caps.tensor_cores
            );
        }
        for line in bitnet_server::server::devices::gpu_backend_lines(&probe) {
            println!("{line}");
        }
    }
    Ok(())
}

/// Loads `--model PATH`, or the embedded default model when it is absent.
pub(crate) fn load_model(path: Option<&PathBuf>) -> anyhow::Result<bitnet_models::BitNetModel> {
    use anyhow::Context;
    let (model, report) = match path {
        Some(path) => {
            bitnet_models::BitNetModel::load(path).with_context(|| format!("loading model {}", path.display()))?
        }
        None => default_model::load().context("loading the embedded default model")?,
    };
    for name in &report.unused_tensors {
        eprintln!("warning: tensor `{name}` in the model file is not used");
    }
    Ok(model)
}
