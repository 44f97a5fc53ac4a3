//! `bitnet inspect`: a model file's metadata, tensors and validation result.

use std::path::PathBuf;

use anyhow::Context;
use bitnet_models::gguf::GgufFile;
use bitnet_models::BitNetModel;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A .gguf file or an HF model folder.
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Print every metadata entry in full (long arrays are summarised otherwise).
    #[arg(long)]
    all: bool,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    if args.path.is_dir() {
        return inspect_model_only(&args);
    }
    let file = GgufFile::open(&args.path).with_context(|| format!("reading {}", args.path.display()))?;
    let validation = BitNetModel::from_gguf(&file);
    if args.json {
        let metadata: serde_json::Map<String, serde_json::Value> =
            file.metadata().iter().map(|(k, v)| (k.clone(), json!(v.to_string()))).collect();
        let tensors: Vec<_> = file
            .tensors()
            .iter()
            .map(|t| json!({"name": t.name, "type": t.ggml_type.name(), "dims": t.dims, "offset": t.offset, "bytes": t.n_bytes}))
            .collect();
        let validation = match &validation {
            Ok((_, report)) => json!({"ok": true, "unused_tensors": report.unused_tensors, "notes": report.notes}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        };
        let out = json!({
            "path": args.path,
            "format": "gguf",
            "version": file.version(),
            "file_size": file.file_size(),
            "alignment": file.alignment(),
            "metadata": metadata,
            "tensors": tensors,
            "validation": validation,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{}: GGUF v{}, {} bytes, alignment {}",
            args.path.display(),
            file.version(),
            file.file_size(),
            file.alignment()
        );
        println!("\nmetadata ({} entries):", file.metadata().len());
        for (key, value) in file.metadata() {
            let text = value.to_string();
            let shown = if args.all || text.len() <= 100 {
                text
            } else {
                format!("{}...", text.chars().take(100).collect::<String>())
            };
            println!("  {key} = {shown}");
        }
        println!("\ntensors ({}):", file.tensors().len());
        println!("  {:<32} {:<6} {:<18} {:>12} {:>12}", "name", "type", "dims", "offset", "bytes");
        for t in file.tensors() {
            println!(
                "  {:<32} {:<6} {:<18} {:>12} {:>12}",
                t.name,
                t.ggml_type.name(),
                format!("{:?}", t.dims),
                t.offset,
                t.n_bytes
            );
        }
        println!();
        match &validation {
            Ok((model, report)) => {
                print_model_summary(model);
                for name in &report.unused_tensors {
                    println!("  unused tensor: {name}");
                }
                for note in &report.notes {
                    println!("  note: {note}");
                }
                println!("validation: OK");
            }
            Err(e) => println!("validation: FAILED: {e}"),
        }
    }
    if let Err(e) = validation {
        return Err(anyhow::Error::new(e).context("the file is not a valid BitNet b1.58 model"));
    }
    Ok(())
}

fn print_model_summary(model: &BitNetModel) {
    let c = &model.config;
    println!(
        "model: {} layers, hidden {}, intermediate {}, heads {} (kv {}, head_dim {}), vocab {}, context {}, rope theta {}, eps {}",
        c.n_layers, c.hidden_size, c.intermediate_size, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps
    );
    println!(
        "tokenizer: {} tokens, bos {:?}, eos {:?}, eot {:?}; weights {:.1} MB, head {}",
        model.tokenizer.vocab_size(),
        model.tokenizer.bos_id(),
        model.tokenizer.eos_id(),
        model.tokenizer.eot_id(),
        model.weight_bytes() as f64 / 1e6,
        if model.output.is_some() { "untied" } else { "tied to the embedding" }
    );
}

fn inspect_model_only(args: &InspectArgs) -> anyhow::Result<()> {
    let (model, report) = BitNetModel::load(&args.path).with_context(|| format!("loading {}", args.path.display()))?;
    if args.json {
        let c = &model.config;
        let out = json!({
            "path": args.path,
            "format": "hf",
            "config": {
                "n_layers": c.n_layers, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
                "max_position_embeddings": c.max_position_embeddings, "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
            },
            "validation": {"ok": true, "unused_tensors": report.unused_tensors, "notes": report.notes},
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{}: HF folder", args.path.display());
    print_model_summary(&model);
    for name in &report.unused_tensors {
        println!("  unused tensor: {name}");
    }
    for note in &report.notes {
        println!("  note: {note}");
    }
    println!("validation: OK");
    Ok(())
}
