//! `cargo xtask logits`: teacher-forced logits and greedy continuations of the
//! reference forward pass over the committed prompt set, written as `.npy` and
//! JSON for comparison with independent implementations
//! (tools/hf_reference/compare.py).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bitnet_inference::{generate, GenerationConfig, LogitsMode, ReferenceBackend, ReferenceForward};
use bitnet_models::BitNetModel;
use serde_json::json;

use crate::npy;

#[derive(Debug, clap::Args)]
pub struct LogitsArgs {
    /// Model: .gguf file or HF folder.
    #[arg(long)]
    model: PathBuf,
    /// Prompt file, one prompt per line (`\n` escapes become newlines).
    #[arg(long, default_value = "tests/data/crossval_prompts.txt")]
    prompts: PathBuf,
    /// Positions per sequence (prompts are tokenized with BOS and cut to this length).
    #[arg(long, default_value_t = 64)]
    positions: usize,
    /// Greedy continuation length (0 to skip).
    #[arg(long, default_value_t = 32)]
    greedy: usize,
    /// Output folder: tokens.json, logits.npy [n_seq, positions, vocab], greedy.json.
    #[arg(long)]
    out: PathBuf,
}

/// Tokenizes each prompt line (with BOS) and cuts it to `positions` tokens.
pub fn prompt_tokens(model: &BitNetModel, prompts: &str, positions: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let mut sequences = Vec::new();
    for (line_no, line) in prompts.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let text = line.replace("\\n", "\n");
        let mut tokens = model.tokenizer.encode(&text, true)?;
        anyhow::ensure!(
            tokens.len() >= positions,
            "prompt line {} has {} tokens, fewer than the {positions} positions asked for",
            line_no + 1,
            tokens.len()
        );
        tokens.truncate(positions);
        sequences.push(tokens);
    }
    Ok(sequences)
}

pub fn run(args: LogitsArgs) -> anyhow::Result<()> {
    let (model, _) = BitNetModel::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let prompts =
        std::fs::read_to_string(&args.prompts).with_context(|| format!("reading {}", args.prompts.display()))?;
    let sequences = prompt_tokens(&model, &prompts, args.positions)?;
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("tokens.json"), json!({ "sequences": sequences }).to_string())?;
    let model = Arc::new(model);
    let forward = ReferenceForward::new(&model);
    let mut backend = ReferenceBackend::new(model.clone());
    let vocab = model.config.vocab_size;
    let mut all = Vec::with_capacity(sequences.len() * args.positions * vocab);
    let mut greedy = Vec::new();
    for (i, tokens) in sequences.iter().enumerate() {
        let logits = forward.forward(tokens, &mut forward.new_cache(), LogitsMode::All)?;
        all.extend_from_slice(&logits);
        if args.greedy > 0 {
            let out = generate(&mut backend, tokens, &GenerationConfig::greedy(args.greedy), |_| {})?;
            greedy.push(out.tokens);
        }
        eprintln!("sequence {}/{} done", i + 1, sequences.len());
    }
    npy::write_f32(&args.out.join("logits.npy"), &[sequences.len(), args.positions, vocab], &all)?;
    if args.greedy > 0 {
        std::fs::write(args.out.join("greedy.json"), json!({ "sequences": greedy }).to_string())?;
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
