//! `cargo xtask gen-model`: deterministic synthetic models.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use bitnet_models::hf;
use bitnet_models::synthetic::{self, Preset};

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
}

pub fn run(args: GenModelArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let model =
        synthetic::generate(args.preset, args.seed).with_context(|| format!("generating preset {}", args.preset))?;
    let name = format!("synthetic-{}-seed{}", args.preset, args.seed);
    match args.format {
        Format::Gguf => model.write_gguf(&args.out, &name)?,
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
