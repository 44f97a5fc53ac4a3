//! `cargo xtask gen-model`: deterministic synthetic models.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use bitnet_models::config::SUPPORTED_ARCHITECTURES;
use bitnet_models::hf;
use bitnet_models::synthetic::{self, Preset};
use bitnet_models::TernaryGgufType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Gguf,
    Hf,
}

#[derive(Debug, clap::Args)]
pub struct GenModelArgs {
    /// tiny, small or 2b4t (the real 2B-4T shapes).
    #[arg(long)]
    preset: Preset,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, value_enum, default_value = "gguf")]
    format: Format,
    /// Output .gguf file, or folder for --format hf.
    #[arg(long)]
    out: PathBuf,
    /// Ternary type of a GGUF output: i2s (bitnet.cpp's I2_S), or llama.cpp's
    /// tq2_0 / tq1_0 with the tensor scales in `<proj>.scale` tensors.
    #[arg(long, default_value = "i2s")]
    ternary: TernaryGgufType,
    /// Architecture name of a GGUF output (upstream llama.cpp reads `bitnet`).
    #[arg(long, default_value = "bitnet-b1.58")]
    arch: String,
}

pub fn run(args: GenModelArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    anyhow::ensure!(
        SUPPORTED_ARCHITECTURES.contains(&args.arch.as_str()),
        "--arch {:?} is not one of {SUPPORTED_ARCHITECTURES:?}",
        args.arch
    );
    anyhow::ensure!(
        args.format == Format::Gguf || (args.ternary == TernaryGgufType::I2S && args.arch == "bitnet-b1.58"),
        "--ternary and --arch apply to a GGUF output"
    );
    let mut model =
        synthetic::generate(args.preset, args.seed).with_context(|| format!("generating preset {}", args.preset))?;
    model.config.architecture = args.arch.clone();
    let name = format!("synthetic-{}-seed{}", args.preset, args.seed);
    match args.format {
        Format::Gguf => model.write_gguf_as(&args.out, &name, args.ternary)?,
        Format::Hf => {
            let report = hf::write_hf_dir(&model, &args.out)?;
            // Synthetic values are drawn on the bf16 grid: any rounding is a bug.
            anyhow::ensure!(report.rounded.is_empty(), "synthetic values were not exact in bf16: {:?}", report.rounded);
        }
    }
    eprintln!(
        "wrote {} ({}, {:.1} MB of weights) in {:.1} s",
        args.out.display(),
        args.preset,
        model.weight_bytes() as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
