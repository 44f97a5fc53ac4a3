//! `cargo xtask bench`: end-to-end CPU speed on a model file (by default the
//! synthetic `2b4t` preset, whose shapes are the real 2B-4T model's): prompt
//! and generation throughput, the memory-bandwidth floor measured in the same
//! run, peak resident memory, as a table and JSON.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bitnet_device::HugePageBuffer;
use bitnet_inference::{argmax, Backend, CpuBackend, CpuBackendConfig, HeadPrecision, KvCachePrecision, StepInput};
use bitnet_kernels::cpu::{self, CpuKernel};
use bitnet_models::{BitNetConfig, BitNetModel};
use rayon::prelude::*;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model file; by default the synthetic 2b4t preset, generated to
    /// target/bench/2b4t.gguf on first use (in a child process, so its memory
    /// does not count here).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Use the int8 output head (quantized once at load) instead of the file's f16 head.
    #[arg(long)]
    int8_head: bool,
    /// Element type of the KV cache (f16 halves the bytes attention reads).
    #[arg(long, default_value = "f32")]
    kv_cache: KvCachePrecision,
    /// After the main run: this many (bandwidth, decode) pairs measured back
    /// to back, each decode segment judged against the bandwidth measured
    /// just before it (on a shared machine the bandwidth moves between runs).
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Decode steps per pair.
    #[arg(long, default_value_t = 16)]
    pair_steps: usize,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Time the phases of the prefill step and of the decode steps (norms and other serial work,
    /// each product, attention, head) and print ms per token for each.
    #[arg(long)]
    phases: bool,
    /// `gpu`: the CUDA backend, per precision and batch size (see --batches).
    #[arg(long, value_enum, default_value = "cpu")]
    device: BenchDevice,
    #[command(flatten)]
    gpu: crate::gpu::GpuBenchArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchDevice {
    Cpu,
    Gpu,
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Read bandwidth in bytes/s, summing `buf` (far larger than the caches) on
/// the same threads as the forward pass: the best of `passes` passes of a
/// plain summing loop (as the compiler builds it, STREAM-like), of the SIMD
/// summing kernel that prefetches as the decode kernels do, and of the same
/// kernel reading two streams per thread (as the AVX-512 decode kernels do:
/// on the session-14 dev box one stream per thread fell short of the memory),
/// each over the same values in 4 KiB pages and in 2 MiB pages (the model's
/// weights are read into 2 MiB pages since session 15; a buffer's page size
/// and physical layout moved the loops by up to a fifth on that box): the
/// floor takes the fastest loop over either buffer.
#[derive(Debug, Clone, Copy)]
struct Bandwidth {
    plain: f64,
    simd: f64,
    simd_pair: f64,
}

impl Bandwidth {
    /// The floor's bandwidth: the fastest loop.
    fn best(self) -> f64 {
        self.plain.max(self.simd).max(self.simd_pair)
    }
}

fn read_bandwidth(
    pool: &rayon::ThreadPool,
    kernel: CpuKernel,
    buffers: &BandwidthBuffers,
    passes: usize,
) -> anyhow::Result<Bandwidth> {
    let mut best = Bandwidth { plain: 0.0, simd: 0.0, simd_pair: 0.0 };
    for _ in 0..passes {
        for buf in [&buffers.small[..], buffers.huge()] {
            best = best_of(best, read_pass(pool, kernel, buf)?);
        }
    }
    Ok(best)
}

fn best_of(a: Bandwidth, b: Bandwidth) -> Bandwidth {
    Bandwidth { plain: a.plain.max(b.plain), simd: a.simd.max(b.simd), simd_pair: a.simd_pair.max(b.simd_pair) }
}

/// One pass of each loop over `buf`, in bytes/s.
fn read_pass(pool: &rayon::ThreadPool, kernel: CpuKernel, buf: &[u64]) -> anyhow::Result<Bandwidth> {
    let bytes = std::mem::size_of_val(buf) as f64;
    let start = Instant::now();
    let sum: u64 = pool.install(|| {
        buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b))).reduce(|| 0, u64::wrapping_add)
    });
    let plain = bytes / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let simd_sum: u64 = pool.install(|| {
        buf.par_chunks(1 << 16).map(|c| cpu::sum_u64(kernel, c)).try_reduce(|| 0, |a, b| Ok(a.wrapping_add(b)))
    })?;
    let simd = bytes / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let pair_sum: u64 = pool.install(|| {
        buf.par_chunks(1 << 17)
            .map(|c| {
                let (a, b) = c.split_at(c.len() / 2);
                cpu::sum_u64_pair(kernel, a, b)
            })
            .try_reduce(|| 0, |a, b| Ok(a.wrapping_add(b)))
    })?;
    let simd_pair = bytes / start.elapsed().as_secs_f64();
    anyhow::ensure!(
        sum == simd_sum && sum == pair_sum,
        "the bandwidth loops disagree on the sum ({sum}, {simd_sum}, {pair_sum})"
    );
    Ok(Bandwidth { plain, simd, simd_pair })
}

/// The bandwidth buffers: the same 1 GiB of distinct values on the heap (4
/// KiB pages) and in a [`HugePageBuffer`] (2 MiB pages where granted).
struct BandwidthBuffers {
    small: Vec<u64>,
    huge: HugePageBuffer,
}

impl BandwidthBuffers {
    fn new() -> anyhow::Result<Self> {
        let small: Vec<u64> = (0..(1usize << 30) / 8).map(|i| i as u64).collect();
        let mut huge = HugePageBuffer::zeroed(1 << 30)?;
        huge.as_bytes_mut().copy_from_slice(bytemuck::cast_slice(&small));
        Ok(Self { small, huge })
    }

    fn huge(&self) -> &[u64] {
        bytemuck::cast_slice(self.huge.as_bytes())
    }
}

/// Median of a non-empty list.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ensure_default_model(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    eprintln!("bench: generating the 2b4t preset to {} (once)...", path.display());
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["gen-model", "--preset", "2b4t", "--seed", "42", "--format", "gguf", "--out"])
        .arg(path)
        .status()?;
    anyhow::ensure!(status.success(), "gen-model failed");
    Ok(())
}

/// Weight bytes a decode step must read: every ternary matrix, the norms, and the
/// head as the backend holds it (`head_bytes`: the file's tensor, or the int8
/// copy and its scales).
fn bytes_per_token(model: &BitNetModel, head_bytes: usize) -> u64 {
    let ternary: usize = model.layers.iter().flat_map(|l| l.projections()).map(|m| m.codes().len()).sum();
    let norms: usize = model.layers.iter().flat_map(|l| l.norms()).map(|(_, v)| v.len() * 4).sum();
    (ternary + norms + head_bytes + model.output_norm.len() * 4) as u64
}

/// Bytes of KV cache a decode step's attention reads (the keys and values,
/// `elem` bytes each, of every layer over its context), averaged over steps whose contexts
/// (positions, the new one included) run from `first` to `last`.
fn kv_bytes_per_step(c: &BitNetConfig, elem: usize, first: usize, last: usize) -> f64 {
    (2 * c.n_layers * c.kv_dim() * elem) as f64 * (first + last) as f64 / 2.0
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Workspace crates build at opt-level 0 in the dev profile: a bench of
    // that build measures the debug kernels (about 50x slower), never ours.
    anyhow::ensure!(
        !cfg!(debug_assertions),
        "bench: this xtask is an unoptimized (debug) build, whose timings mean nothing; run `cargo xtask bench` \
         (the alias builds with --release) or `cargo run --release -p xtask -- bench`"
    );
    let path = match &args.model {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from("target/bench/2b4t.gguf");
            ensure_default_model(&p)?;
            p
        }
    };
    if args.device == BenchDevice::Gpu {
        return crate::gpu::bench(&path, args.prompt_tokens, args.gen_tokens, &args.gpu, args.json.as_deref());
    }
    let file_size = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
    let load_start = Instant::now();
    let (model, _) = BitNetModel::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let load_s = load_start.elapsed().as_secs_f64();
    let model = Arc::new(model);
    let c = model.config.clone();
    let head = if args.int8_head { HeadPrecision::Int8 } else { HeadPrecision::Native };
    let backend_start = Instant::now();
    let mut backend = CpuBackend::new(
        model.clone(),
        &CpuBackendConfig { threads: args.threads, kernel: None, head, kv_cache: args.kv_cache },
    )?;
    let backend_s = backend_start.elapsed().as_secs_f64();
    let threads = backend.threads();

    // A deterministic prompt of valid ids.
    let prompt: Vec<u32> = (0..args.prompt_tokens).map(|i| ((i * 7919 + 13) % c.vocab_size) as u32).collect();
    let positions = args.prompt_tokens + args.gen_tokens;
    anyhow::ensure!(positions <= c.max_position_embeddings, "prompt + generation exceed the context");
    backend.add_sequence(0, positions)?;
    if args.phases {
        backend.time_phases();
    }
    let start = Instant::now();
    let logits = backend.step(&[StepInput { seq: 0, tokens: &prompt }])?.remove(0);
    let prefill_s = start.elapsed().as_secs_f64();
    let prefill_phases = backend.take_phase_times();
    let mut token = argmax(&logits);
    if args.phases {
        backend.time_phases();
    }
    let start = Instant::now();
    for _ in 1..args.gen_tokens {
        let logits = backend.step(&[StepInput { seq: 0, tokens: &[token] }])?.remove(0);
        token = argmax(&logits);
    }
    let decode_s = start.elapsed().as_secs_f64();
    let phases = backend.take_phase_times();
    let decode_steps = args.gen_tokens.saturating_sub(1).max(1);
    let ms_per_token = decode_s * 1e3 / decode_steps as f64;
    // Peak memory first: the bandwidth buffer below must not count.
    let peak_rss = peak_rss_bytes();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let buf = BandwidthBuffers::new()?;
    let kernel = backend.kernel();
    let measured = read_bandwidth(&pool, kernel, &buf, 5)?;
    let bandwidth = measured.best();
    let head_bytes = backend.head_bytes();
    let weight_bytes = bytes_per_token(&model, head_bytes);
    // Decode step i (1-based) attends over prompt + i positions.
    let kv_bytes_read =
        kv_bytes_per_step(&c, args.kv_cache.bytes(), args.prompt_tokens + 1, args.prompt_tokens + decode_steps);
    let bytes = weight_bytes as f64 + kv_bytes_read;
    let floor_ms = bytes / bandwidth * 1e3;
    // Paired measurements: a second sequence decodes in segments, each right
    // after a bandwidth measurement (best of 3 passes).
    let mut pairs = Vec::new();
    if args.pairs > 0 && args.pair_steps > 0 {
        let pair_positions = args.prompt_tokens + args.pairs * args.pair_steps + 1;
        anyhow::ensure!(pair_positions <= c.max_position_embeddings, "the paired run exceeds the context");
        backend.add_sequence(1, pair_positions)?;
        let logits = backend.step(&[StepInput { seq: 1, tokens: &prompt }])?.remove(0);
        let mut token = argmax(&logits);
        for pair in 0..args.pairs {
            let bw = read_bandwidth(&pool, kernel, &buf, 3)?.best();
            let first_context = args.prompt_tokens + pair * args.pair_steps + 1;
            let kv = kv_bytes_per_step(&c, args.kv_cache.bytes(), first_context, first_context + args.pair_steps - 1);
            let start = Instant::now();
            for _ in 0..args.pair_steps {
                let logits = backend.step(&[StepInput { seq: 1, tokens: &[token] }])?.remove(0);
                token = argmax(&logits);
            }
            let ms = start.elapsed().as_secs_f64() * 1e3 / args.pair_steps as f64;
            let floor = (weight_bytes as f64 + kv) / bw * 1e3;
            pairs.push((bw, ms, floor / ms));
        }
        backend.remove_sequence(1);
    }
    let paired_fraction = (!pairs.is_empty()).then(|| median(pairs.iter().map(|p| p.2).collect()));
    let kv_bytes = (2 * c.n_layers * positions * c.kv_dim() * args.kv_cache.bytes()) as u64;
    let cpu = bitnet_device::CpuInfo::probe();
    let info = backend.info();
    let report = json!({
        "commit": crate::crossval::git_commit(),
        "model": path, "file_size_bytes": file_size, "load_seconds": load_s,
        "backend_setup_seconds": backend_s, "int8_head": args.int8_head, "head_bytes": head_bytes, "kv_cache": args.kv_cache.name(),
        "machine": cpu.to_string(), "backend": info.detail, "threads": threads,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
        "prompt_tok_per_s": args.prompt_tokens as f64 / prefill_s,
        "gen_tok_per_s": decode_steps as f64 / decode_s,
        "ms_per_token": ms_per_token,
        "bytes_per_token": bytes,
        "weight_bytes_per_token": weight_bytes,
        "kv_cache_bytes_read_per_token": kv_bytes_read,
        "read_bandwidth_gb_per_s": bandwidth / 1e9,
        "read_bandwidth_buffers": "the same 1 GiB in 4 KiB pages (heap) and in 2 MiB pages (HugePageBuffer); each loop the faster of the two",
        "read_bandwidth_plain_loop_gb_per_s": measured.plain / 1e9,
        "read_bandwidth_simd_loop_gb_per_s": measured.simd / 1e9,
        "read_bandwidth_simd_two_stream_loop_gb_per_s": measured.simd_pair / 1e9,
        "floor_ms_per_token": floor_ms,
        "fraction_of_floor": floor_ms / ms_per_token,
        "peak_rss_bytes": peak_rss,
        "kv_cache_bytes": kv_bytes,
        "rss_over_file_plus_kv": peak_rss.map(|r| r as f64 / (file_size + kv_bytes) as f64),
        "bandwidth_buffer_bytes": 1u64 << 30,
        "pairs": pairs.iter().map(|&(bw, ms, f)| json!({
            "read_bandwidth_gb_per_s": bw / 1e9, "ms_per_token": ms, "fraction_of_floor": f,
        })).collect::<Vec<_>>(),
        "pair_steps": args.pair_steps,
        "paired_fraction_of_floor_median": paired_fraction,
        "prefill_phases_ms": prefill_phases.as_ref().map(|p| {
            p.phases().iter().map(|(name, d)| (name.to_string(), json!(d.as_secs_f64() * 1e3)))
                .collect::<serde_json::Map<_, _>>()
        }),
        "decode_phases_ms_per_token": phases.as_ref().map(|p| {
            p.phases().iter().map(|(name, d)| (name.to_string(), json!(d.as_secs_f64() * 1e3 / p.steps.max(1) as f64)))
                .collect::<serde_json::Map<_, _>>()
        }),
    });
    let gb = |b: u64| b as f64 / 1e9;
    println!("bench: {} ({}), {} threads, {}", path.display(), info.detail, threads, cpu);
    println!("| metric | value |\n|---|---:|");
    println!("| prompt ({} tokens) | {:.1} tok/s |", args.prompt_tokens, args.prompt_tokens as f64 / prefill_s);
    println!(
        "| generation ({} tokens) | {:.2} tok/s ({ms_per_token:.1} ms/token) |",
        args.gen_tokens,
        decode_steps as f64 / decode_s
    );
    println!(
        "| bytes read per token | {:.3} GB (weights {:.3} GB, of which head {:.3} GB; KV cache {:.3} GB on average) |",
        bytes / 1e9,
        gb(weight_bytes),
        gb(head_bytes as u64),
        kv_bytes_read / 1e9
    );
    if args.int8_head {
        println!("| int8 head quantization (once, at load) | {backend_s:.2} s |");
    }
    println!(
        "| read bandwidth (same run, {threads} threads; the fastest of three loops, 4 KiB and 2 MiB pages) | {:.1} GB/s (plain loop {:.1}, SIMD loop {:.1}, two-stream SIMD loop {:.1}) |",
        bandwidth / 1e9,
        measured.plain / 1e9,
        measured.simd / 1e9,
        measured.simd_pair / 1e9
    );
    println!("| bandwidth floor | {floor_ms:.1} ms/token |");
    println!("| fraction of floor reached | {:.0}% |", 100.0 * floor_ms / ms_per_token);
    if let Some(f) = paired_fraction {
        let lo = pairs.iter().map(|p| p.2).fold(f64::INFINITY, f64::min);
        let hi = pairs.iter().map(|p| p.2).fold(0.0, f64::max);
        let bw_lo = pairs.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) / 1e9;
        let bw_hi = pairs.iter().map(|p| p.0).fold(0.0, f64::max) / 1e9;
        println!(
            "| paired: {} x ({} tokens after a bandwidth pass), fraction of floor | median {:.0}% (range {:.0}-{:.0}%; bandwidth {bw_lo:.1}-{bw_hi:.1} GB/s) |",
            pairs.len(),
            args.pair_steps,
            100.0 * f,
            100.0 * lo,
            100.0 * hi
        );
    }
    if let Some(r) = peak_rss {
        println!("| peak RSS | {:.2} GB ({:.2}x file + KV cache) |", gb(r), r as f64 / (file_size + kv_bytes) as f64);
    }
    println!("| model file / KV cache | {:.2} GB / {:.3} GB |", gb(file_size), gb(kv_bytes));
    if let Some(p) = &prefill_phases {
        println!(
            "\n| prefill phase ({} tokens, one step) | ms | share of the phases |\n|---|---:|---:|",
            args.prompt_tokens
        );
        for (name, d) in p.phases() {
            let share = d.as_secs_f64() / p.total().as_secs_f64().max(f64::MIN_POSITIVE);
            println!("| {name} | {:.1} | {:.1}% |", d.as_secs_f64() * 1e3, 100.0 * share);
        }
        println!("| all phases | {:.1} | of {:.1} ms measured |", p.total().as_secs_f64() * 1e3, prefill_s * 1e3);
    }
    if let Some(p) = &phases {
        let steps = p.steps.max(1) as f64;
        println!("\n| decode phase ({} steps) | ms/token | share of the phases |\n|---|---:|---:|", p.steps);
        for (name, d) in p.phases() {
            let share = d.as_secs_f64() / p.total().as_secs_f64().max(f64::MIN_POSITIVE);
            println!("| {name} | {:.3} | {:.1}% |", d.as_secs_f64() * 1e3 / steps, 100.0 * share);
        }
        println!(
            "| all phases (the step less its checks and allocations) | {:.3} | of {ms_per_token:.3} ms/token measured |",
            p.total().as_secs_f64() * 1e3 / steps
        );
    }
    if let Some(out) = &args.json {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
