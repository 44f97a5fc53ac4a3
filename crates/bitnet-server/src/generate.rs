//! `bitnet generate`: text generation on the GPU (CUDA backend) or the fast
//! CPU backend (or the reference forward pass, for comparison).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bitnet_inference::{
    generate, Backend, CpuBackend, CpuBackendConfig, GenerationConfig, HeadPrecision, KvCachePrecision,
    ReferenceBackend, SamplingConfig, StopReason,
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
    /// Where to run: `auto` uses the GPU when one is usable and says why not
    /// otherwise; `gpu` insists (an error without one); `cpu` never tries.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// GPU precision: `auto` picks bf16, else fp16 (by compute capability).
    #[arg(long, value_enum, default_value = "auto")]
    precision: PrecisionChoice,
    /// Use the slow, exact f64 reference forward pass instead (for comparison).
    #[arg(long, value_enum, default_value = "fast")]
    backend: BackendChoice,
    /// CPU worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Quantize the output head to int8 (faster decode, small accuracy cost: docs/perf/cpu.md).
    #[arg(long)]
    int8_head: bool,
    /// Element type of the CPU backend's KV cache: f32, or f16 (half the memory and
    /// the bytes attention reads; small accuracy cost: docs/perf/cpu.md). The GPU's
    /// KV cache follows --precision.
    #[arg(long, default_value = "f32")]
    kv_cache: KvCachePrecision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The device chosen by `--device`.
    Fast,
    Reference,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    Gpu,
    Cpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionChoice {
    Auto,
    Fp32,
    Fp16,
    Bf16,
}

impl PrecisionChoice {
    // Only the CUDA build opens a GPU.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn request(self) -> bitnet_device::PrecisionRequest {
        use bitnet_device::{Precision, PrecisionRequest};
        match self {
            Self::Auto => PrecisionRequest::Auto,
            Self::Fp32 => PrecisionRequest::Exactly(Precision::Fp32),
            Self::Fp16 => PrecisionRequest::Exactly(Precision::Fp16),
            Self::Bf16 => PrecisionRequest::Exactly(Precision::Bf16),
        }
    }
}

/// The CUDA backend on the first usable GPU, or why there is none.
#[cfg(feature = "cuda")]
pub fn open_gpu(
    model: &Arc<bitnet_models::BitNetModel>,
    precision: PrecisionChoice,
    kv_slots: usize,
) -> Result<Box<dyn Backend>, String> {
    use bitnet_device::{probe_gpus, select_precision, GpuProbe};
    let gpus = match probe_gpus() {
        GpuProbe::Devices { gpus, .. } if !gpus.is_empty() => gpus,
        GpuProbe::Devices { .. } => return Err("no CUDA device found".into()),
        GpuProbe::NoDriver { reason } | GpuProbe::DriverError { reason } => return Err(reason),
        other => return Err(format!("{other:?}")),
    };
    let gpu = &gpus[0];
    let precision = select_precision(precision.request(), gpu.compute_capability).map_err(|e| e.to_string())?;
    if let Some(notice) = bitnet_inference::kernel_compile_notice(gpu.ordinal, gpu.compute_capability) {
        eprintln!("[{notice}]");
    }
    let config = bitnet_inference::CudaBackendConfig {
        ordinal: gpu.ordinal,
        precision,
        kv_slots,
        max_step_tokens: kv_slots.clamp(1, 512),
        ..Default::default()
    };
    bitnet_inference::CudaBackend::new(model.clone(), &config)
        .map(|b| Box::new(b) as Box<dyn Backend>)
        .map_err(|e| format!("{} ({:?}): {e}", gpu.name, precision))
}

#[cfg(not(feature = "cuda"))]
pub fn open_gpu(
    _model: &Arc<bitnet_models::BitNetModel>,
    _precision: PrecisionChoice,
    _kv_slots: usize,
) -> Result<Box<dyn Backend>, String> {
    Err("this binary was built without the `cuda` feature".into())
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
    let cpu = || -> anyhow::Result<Box<dyn Backend>> {
        Ok(Box::new(CpuBackend::new(
            model.clone(),
            &CpuBackendConfig {
                threads: args.threads,
                kernel: None,
                head: if args.int8_head { HeadPrecision::Int8 } else { HeadPrecision::Native },
                kv_cache: args.kv_cache,
            },
        )?))
    };
    if args.int8_head && args.device == DeviceChoice::Gpu {
        anyhow::bail!("--int8-head is a CPU option; the GPU head runs in the chosen --precision");
    }
    if args.kv_cache != KvCachePrecision::F32 && args.device == DeviceChoice::Gpu {
        anyhow::bail!("--kv-cache is a CPU option; the GPU's KV cache follows --precision");
    }
    let kv_slots = (prompt_tokens.len() + args.max_tokens).min(model.config.max_position_embeddings);
    let mut backend: Box<dyn Backend> = match (args.backend, args.device) {
        (BackendChoice::Reference, _) => Box::new(ReferenceBackend::new(model.clone())),
        (BackendChoice::Fast, DeviceChoice::Cpu) => cpu()?,
        (BackendChoice::Fast, DeviceChoice::Gpu) => {
            open_gpu(&model, args.precision, kv_slots).map_err(|e| anyhow::anyhow!("--device gpu: {e}"))?
        }
        (BackendChoice::Fast, DeviceChoice::Auto) if args.int8_head || args.kv_cache != KvCachePrecision::F32 => cpu()?,
        (BackendChoice::Fast, DeviceChoice::Auto) => match open_gpu(&model, args.precision, kv_slots) {
            Ok(b) => b,
            Err(reason) => {
                eprintln!("[GPU not used: {reason}; running on the CPU]");
                cpu()?
            }
        },
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
