//! `bitnet generate`: text generation on the fast CPU backend (or the
//! reference forward pass, for comparison).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bitnet_inference::{
    generate, Backend, CpuBackend, CpuBackendConfig, GenerationConfig, HeadPrecision, ReferenceBackend, SamplingConfig,
    StopReason,
};
use bitnet_models::tokenizer::{ChatMessage, ChatRole};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model file (.gguf) or HF folder; the embedded default model when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the model's chat format as one user turn.
    #[arg(long)]
    chat: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Forward pass: the fast CPU backend, or the slow exact reference.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendChoice,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Quantize the output head to int8 (faster decode, small accuracy cost: docs/perf/cpu.md).
    #[arg(long)]
    int8_head: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Cpu,
    Reference,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let model = Arc::new(crate::load_model(args.model.as_ref())?);
    let tokenizer = &model.tokenizer;
    let prompt_tokens = if args.chat {
        let text = tokenizer.chat_prompt(&[ChatMessage { role: ChatRole::User, content: args.prompt.clone() }])?;
        // The chat format already starts with the BOS token text.
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&args.prompt, tokenizer.add_bos())?
    };
    let config = GenerationConfig {
        max_new_tokens: args.max_tokens,
        sampling: SamplingConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_tokens: if args.ignore_eos {
            Vec::new()
        } else {
            [tokenizer.eos_id(), tokenizer.eot_id()].into_iter().flatten().collect()
        },
    };
    let mut backend: Box<dyn Backend> = match args.backend {
        BackendChoice::Cpu => Box::new(CpuBackend::new(
            model.clone(),
            &CpuBackendConfig {
                threads: args.threads,
                kernel: None,
                head: if args.int8_head { HeadPrecision::Int8 } else { HeadPrecision::Native },
            },
        )?),
        BackendChoice::Reference => Box::new(ReferenceBackend::new(model.clone())),
    };
    let info = backend.info();
    let mut stdout = std::io::stdout().lock();
    if !args.chat {
        write!(stdout, "{}", args.prompt)?;
    }
    // Print text as it is produced. A token may end inside a multi-byte
    // character, so only text that decodes cleanly is printed.
    let mut generated = Vec::new();
    let mut printed = 0usize;
    let start = Instant::now();
    let mut first_token_at = None;
    let out = generate(backend.as_mut(), &prompt_tokens, &config, |token| {
        first_token_at.get_or_insert_with(Instant::now);
        generated.push(token);
        if let Ok(text) = tokenizer.decode(&generated, true) {
            if !text.ends_with('\u{FFFD}') && text.len() > printed {
                let _ = write!(stdout, "{}", &text[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        }
    })
    .context("generation failed")?;
    let text = tokenizer.decode(&out.tokens, true)?;
    if text.len() > printed {
        write!(stdout, "{}", &text[printed.min(text.len())..])?;
    }
    writeln!(stdout)?;
    let elapsed = start.elapsed().as_secs_f64();
    let decode_s = first_token_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let reason = match out.stop_reason {
        StopReason::Stop => "end of sequence",
        StopReason::Length => "max tokens",
    };
    let decode_rate = if out.tokens.len() > 1 && decode_s > 0.0 {
        format!("{:.1} tok/s", (out.tokens.len() - 1) as f64 / decode_s)
    } else {
        "n/a".into()
    };
    eprintln!(
        "[{} prompt tokens, {} generated ({reason}), {:.2} s, decode {decode_rate}, device {} ({}, {})]",
        prompt_tokens.len(),
        out.tokens.len(),
        elapsed,
        info.device,
        info.precision,
        info.detail
    );
    Ok(())
}
