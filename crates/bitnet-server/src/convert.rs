//! `bitnet convert`: GGUF (I2_S) <-> HF safetensors folders.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bitnet_models::{hf, BitNetModel, FloatDType};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Gguf,
    Hf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EmbeddingDType {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Input: a .gguf file or an HF folder.
    #[arg(long)]
    input: PathBuf,
    /// Output: a .gguf file or a folder.
    #[arg(long)]
    output: PathBuf,
    /// Output format; by default GGUF for an HF input and HF for a GGUF input.
    #[arg(long, value_enum)]
    to: Option<Format>,
    /// Embedding dtype in a GGUF output (bitnet.cpp writes F16).
    #[arg(long, value_enum, default_value = "f16")]
    embedding_dtype: EmbeddingDType,
    /// Name recorded in GGUF `general.name`.
    #[arg(long, default_value = "bitnet")]
    name: String,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let to = args.to.unwrap_or(if args.input.is_dir() { Format::Gguf } else { Format::Hf });
    if args.output.exists() && args.output.canonicalize().ok() == args.input.canonicalize().ok() {
        bail!("the output {} is the input; write to a new path", args.output.display());
    }
    let (mut model, report) =
        BitNetModel::load(&args.input).with_context(|| format!("loading {}", args.input.display()))?;
    for name in &report.unused_tensors {
        eprintln!("warning: tensor `{name}` is not used and will not be converted");
    }
    match to {
        Format::Gguf => {
            let dtype = match args.embedding_dtype {
                EmbeddingDType::F32 => FloatDType::F32,
                EmbeddingDType::F16 => FloatDType::F16,
                EmbeddingDType::Bf16 => FloatDType::BF16,
            };
            let (embedding, loss) = model.embedding.converted(dtype)?;
            if loss > 0.0 {
                eprintln!("note: embedding rounded to {}: largest change {loss:e}", dtype.name());
            }
            model.embedding = embedding;
            model.write_gguf(&args.output, &args.name).with_context(|| format!("writing {}", args.output.display()))?;
        }
        Format::Hf => {
            let report =
                hf::write_hf_dir(&model, &args.output).with_context(|| format!("writing {}", args.output.display()))?;
            for (tensor, loss) in &report.rounded {
                eprintln!("note: {tensor} rounded to bf16: largest change {loss:e}");
            }
        }
    }
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
