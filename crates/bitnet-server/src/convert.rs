//! `bitnet convert`: GGUF (I2_S, or llama.cpp's TQ2_0 / TQ1_0) <-> HF safetensors folders.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bitnet_models::config::SUPPORTED_ARCHITECTURES;
use bitnet_models::{hf, BitNetModel, FloatDType, TernaryGgufType};

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
    /// Type of the ternary projections in a GGUF output: i2s (bitnet.cpp's
    /// I2_S, as in the official 2B-4T file), or llama.cpp's tq2_0 / tq1_0
    /// with each tensor's exact scale in a `<proj>.scale` tensor; those need
    /// rows of a multiple of 256 values (2B-4T's are).
    #[arg(long, default_value = "i2s")]
    ternary: TernaryGgufType,
    /// Architecture name of a GGUF output (its metadata keys' prefix); upstream
    /// llama.cpp reads `bitnet`, bitnet.cpp `bitnet-b1.58`. By default the input's.
    #[arg(long)]
    arch: Option<String>,
    /// Name recorded in GGUF `general.name`.
    #[arg(long, default_value = "bitnet")]
    name: String,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let to = args.to.unwrap_or(if args.input.is_dir() { Format::Gguf } else { Format::Hf });
    if to == Format::Hf && (args.ternary != TernaryGgufType::I2S || args.arch.is_some()) {
        bail!("--ternary and --arch apply to a GGUF output; HF folders store packed uint8 weights");
    }
    if let Some(arch) = &args.arch {
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            bail!("--arch {arch:?} is not one of {SUPPORTED_ARCHITECTURES:?}");
        }
    }
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
            if let Some(arch) = args.arch {
                model.config.architecture = arch;
            }
            model
                .write_gguf_as(&args.output, &args.name, args.ternary)
                .with_context(|| format!("writing {}", args.output.display()))?;
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
