//! GPU work: `cargo xtask gpu-smoke` (build here, bundle, run there) and
//! `cargo xtask bench --device gpu` (decode throughput per precision and
//! batch size, memory, bandwidth floor).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bitnet_device::{GpuProbe, Precision};
use bitnet_inference::{Backend, CudaBackend, CudaBackendConfig, StepInput};
use bitnet_models::BitNetModel;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct GpuSmokeArgs {
    /// Bundle folder (git-ignored; name it in the device call's `carry`).
    #[arg(long, default_value = "target/gpu-bundle")]
    bundle: PathBuf,
}

/// The script the bundle runs on the GPU machine.
const RUN_SH: &str = include_str!("gpu_run.sh");

/// Builds the CLI, xtask and the GPU test binaries in release mode, copies
/// them (stripped) into the bundle with `run.sh`, and prints the command.
pub fn smoke(args: GpuSmokeArgs) -> anyhow::Result<()> {
    let bin = args.bundle.join("bin");
    if args.bundle.exists() {
        std::fs::remove_dir_all(&args.bundle)?;
    }
    std::fs::create_dir_all(&bin)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Two builds: `--bin bitnet` would also narrow xtask to a `bitnet`
    // binary (it has none) and leave a stale xtask behind.
    for args in [["-p", "bitnet-server", "--bin", "bitnet"], ["-p", "xtask", "--bin", "xtask"]] {
        let status = std::process::Command::new(&cargo).args(["build", "--release", "--locked"]).args(args).status()?;
        anyhow::ensure!(status.success(), "cargo build {} failed", args.join(" "));
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("target"));
    for name in ["bitnet", "xtask"] {
        copy_stripped(&target.join("release").join(name), &bin.join(name))?;
    }
    // Test binaries: ask cargo for their paths.
    let tests: [(&str, &str, &str); 4] = [
        ("bitnet-kernels", "--test", "cuda"),
        ("bitnet-kernels", "--lib", ""),
        ("bitnet-inference", "--test", "cuda_backend"),
        ("bitnet-device", "--lib", ""),
    ];
    for (package, kind, name) in tests {
        let mut cmd = std::process::Command::new(&cargo);
        cmd.args(["test", "--release", "--locked", "--no-run", "--message-format=json", "-p", package]);
        if package != "bitnet-device" {
            cmd.args(["--features", "cuda"]);
        }
        cmd.arg(kind);
        if !name.is_empty() {
            cmd.arg(name);
        }
        let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
        anyhow::ensure!(out.status.success(), "cargo test --no-run -p {package} {kind} {name} failed");
        let mut found = false;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
                continue;
            }
            if msg["target"]["name"] != if name.is_empty() { package.replace('-', "_") } else { name.into() } {
                continue;
            }
            if let Some(exe) = msg["executable"].as_str() {
                let label =
                    if name.is_empty() { format!("test-{package}-lib") } else { format!("test-{package}-{name}") };
                copy_stripped(Path::new(exe), &bin.join(label))?;
                found = true;
            }
        }
        anyhow::ensure!(found, "no test executable for {package} {kind} {name}");
    }
    std::fs::write(args.bundle.join("run.sh"), RUN_SH)?;
    // The commit the bundle was built from (with "-dirty" for uncommitted changes).
    let git = |args: &[&str]| std::process::Command::new("git").args(args).output().ok().filter(|o| o.status.success());
    let commit = git(&["rev-parse", "--short", "HEAD"])
        .map_or("unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|o| !o.stdout.is_empty());
    std::fs::write(args.bundle.join("COMMIT"), format!("{commit}{}\n", if dirty { "-dirty" } else { "" }))?;
    let size: u64 = std::fs::read_dir(&bin)?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    println!("bundle: {} ({:.1} MiB)", args.bundle.display(), size as f64 / (1 << 20) as f64);
    println!("device command (carry [\"{}\"]):", args.bundle.display());
    println!("  bash {}/run.sh smoke   # GPU tests + generation on tiny/2b4t in fp32/fp16/bf16", args.bundle.display());
    println!("  bash {}/run.sh bench   # cargo xtask bench --device gpu + HF transformers bf16", args.bundle.display());
    println!("  bash {}/run.sh crossval  # GPU crossval scenarios + HF bf16 comparison", args.bundle.display());
    println!(
        "  bash {}/run.sh scenarios # the fallback scenario matrix with the real CUDA backend",
        args.bundle.display()
    );
    println!(
        "  bash {}/run.sh quick     # the GPU tests, then cargo xtask bench --device gpu --kernels",
        args.bundle.display()
    );
    println!("  bash {}/run.sh ab        # A/B benches (AB_VARIANTS='ENV=a|ENV=b')", args.bundle.display());
    println!(
        "  bash {}/run.sh profile   # Nsight Compute reports (kernels built with -lineinfo)",
        args.bundle.display()
    );
    println!("  bash {}/run.sh all       # smoke, crossval, scenarios, bench", args.bundle.display());
    Ok(())
}

fn copy_stripped(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    // Debug info is most of a test binary; strip it when `strip` exists.
    let _ = std::process::Command::new("strip").arg(to).status();
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct GpuBenchArgs {
    /// Batch sizes (sequences decoding together).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub batches: Vec<usize>,
    /// Precisions to run.
    #[arg(long, value_delimiter = ',', default_value = "fp32,fp16,bf16")]
    pub precisions: Vec<String>,
    /// Disable CUDA graphs (for an A/B comparison).
    #[arg(long)]
    pub no_graphs: bool,
    /// Also time each kernel alone at the 2B-4T shapes (graph of 20 launches).
    #[arg(long)]
    pub kernels: bool,
    /// Rows (tokens) of each pass the kernels alone are timed at.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub kernel_rows: Vec<usize>,
}

fn parse_precision(s: &str) -> anyhow::Result<Precision> {
    Ok(match s {
        "fp32" => Precision::Fp32,
        "fp16" => Precision::Fp16,
        "bf16" => Precision::Bf16,
        other => anyhow::bail!("unknown precision {other:?} (fp32, fp16, bf16)"),
    })
}

/// Device-to-device copy bandwidth (bytes read + written per second), the
/// best of 20 copies of 1 GiB timed with CUDA events.
fn copy_bandwidth(gpu: &bitnet_kernels::cuda::GpuContext) -> anyhow::Result<f64> {
    const BYTES: usize = 1 << 30;
    let a = gpu.alloc("bandwidth src", BYTES)?;
    let b = gpu.alloc("bandwidth dst", BYTES)?;
    gpu.copy(b.all(), a.all())?;
    let mut best = f64::MAX;
    for _ in 0..20 {
        let ms = gpu.time_ms(|| gpu.copy(b.all(), a.all()))?;
        best = best.min(f64::from(ms));
    }
    Ok(2.0 * BYTES as f64 / (best / 1e3))
}

/// `cargo xtask bench --device gpu`.
pub fn bench(
    model_path: &Path,
    prompt_tokens: usize,
    gen_tokens: usize,
    args: &GpuBenchArgs,
    json_out: Option<&Path>,
) -> anyhow::Result<()> {
    let gpus = match bitnet_device::probe_gpus() {
        GpuProbe::Devices { gpus, .. } if !gpus.is_empty() => gpus,
        other => anyhow::bail!("bench --device gpu needs a CUDA GPU: {other:?}"),
    };
    let (model, _) = BitNetModel::load(model_path).with_context(|| format!("loading {}", model_path.display()))?;
    let model = Arc::new(model);
    let c = model.config.clone();
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let positions = prompt_tokens + gen_tokens;
    anyhow::ensure!(positions <= c.max_position_embeddings, "prompt + generation exceed the context");
    let ternary: usize = model.layers.iter().flat_map(|l| l.projections()).map(|m| m.codes().len()).sum();
    let mut rows = Vec::new();
    let mut bandwidth = None;
    for p in &args.precisions {
        let precision = parse_precision(p)?;
        let config = CudaBackendConfig {
            precision,
            kv_slots: max_batch * positions,
            max_step_tokens: 1024,
            max_step_entries: max_batch.max(1),
            cuda_graphs: !args.no_graphs,
            ..Default::default()
        };
        // Free memory before and after creating the backend. A small probe
        // backend holds the context meanwhile, so the context's own memory
        // is not counted.
        let probe = CudaBackend::new(
            model.clone(),
            &CudaBackendConfig { kv_slots: 1, max_step_tokens: 1, max_step_entries: 1, ..config.clone() },
        )?;
        if bandwidth.is_none() {
            bandwidth = Some(copy_bandwidth(probe.gpu())?);
        }
        let (free_before, total) = probe.gpu().mem_info()?;
        let setup = Instant::now();
        let mut backend = CudaBackend::new(model.clone(), &config)?;
        let setup_s = setup.elapsed().as_secs_f64();
        let (free_after, _) = backend.gpu().mem_info()?;
        let used = free_before.saturating_sub(free_after);
        let head_dt = match precision {
            Precision::Fp32 => bitnet_kernels::cuda::GpuDType::F32,
            Precision::Fp16 => bitnet_kernels::cuda::GpuDType::F16,
            Precision::Bf16 => bitnet_kernels::cuda::GpuDType::BF16,
        };
        let head_chunks = backend.gpu().head_chunks(head_dt, c.vocab_size, c.hidden_size);
        eprintln!(
            "bench gpu {p}: head {:?} (cuBLAS calls of {} entries, small calls of {:?}), PDL {}",
            backend.gpu().head_impl(),
            head_chunks.0,
            head_chunks.1,
            backend.gpu().pdl_enabled()
        );
        eprintln!(
            "bench gpu {p}: {:?}, free memory fell by {:.3} GB (of {:.1} GB)",
            backend.memory(),
            used as f64 / 1e9,
            total as f64 / 1e9
        );
        for &batch in &args.batches {
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|b| (0..prompt_tokens).map(|i| ((i * 7919 + b * 104_729 + 13) % c.vocab_size) as u32).collect())
                .collect();
            for b in 0..batch {
                backend.add_sequence(b as u64, positions)?;
            }
            let start = Instant::now();
            let inputs: Vec<StepInput> =
                prompts.iter().enumerate().map(|(b, p)| StepInput { seq: b as u64, tokens: p }).collect();
            let mut next = backend.step_greedy(&inputs)?;
            let prefill_s = start.elapsed().as_secs_f64();
            // Decode: the first step of each batch size captures its graph;
            // warm up with it, then time the rest.
            let step = |backend: &mut CudaBackend, next: &mut Vec<u32>| -> anyhow::Result<()> {
                let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                let inputs: Vec<StepInput> =
                    toks.iter().enumerate().map(|(b, t)| StepInput { seq: b as u64, tokens: t }).collect();
                *next = backend.step_greedy(&inputs)?;
                Ok(())
            };
            step(&mut backend, &mut next)?;
            step(&mut backend, &mut next)?;
            let timed = gen_tokens.saturating_sub(3).max(1);
            let start = Instant::now();
            for _ in 0..timed {
                step(&mut backend, &mut next)?;
            }
            let decode_s = start.elapsed().as_secs_f64();
            // One more step, eager and timed kernel by kernel.
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let inputs: Vec<StepInput> =
                toks.iter().enumerate().map(|(b, t)| StepInput { seq: b as u64, tokens: t }).collect();
            let profile = backend.profile_step(&inputs)?;
            let kernel_ms: f64 = profile.iter().map(|p| p.1).sum();
            let top: Vec<String> = profile.iter().take(6).map(|(n, ms, k)| format!("{n} {ms:.3} ms/{k}")).collect();
            eprintln!("    kernels (eager step, {kernel_ms:.3} ms): {}", top.join(", "));
            if let Some(trace) = backend.fused_trace()? {
                let stages: Vec<String> = ["qkv", "attention", "o", "gate/up", "down"]
                    .iter()
                    .zip(trace)
                    .map(|(name, (cta0, norm, slowest, release))| {
                        format!("{name} {cta0:.2}/{norm:.2}/{slowest:.2}/{release:.2}")
                    })
                    .collect();
                eprintln!(
                    "    fused stages, us per layer (CTA 0 / its norm / slowest CTA / barrier release): {}",
                    stages.join(", ")
                );
            }
            for b in 0..batch {
                backend.remove_sequence(b as u64);
            }
            let _ = &probe;
            let step_ms = decode_s * 1e3 / timed as f64;
            let tok_s = (batch * timed) as f64 / decode_s;
            let head_bytes = c.vocab_size
                * c.hidden_size
                * match precision {
                    Precision::Fp32 => 4,
                    _ => 2,
                };
            let elem = if precision == Precision::Fp32 { 4 } else { 2 };
            // KV read by one decode step: every sequence's cache at the mean position.
            let kv_read = batch * (prompt_tokens + gen_tokens / 2) * 2 * c.n_layers * c.kv_dim() * elem;
            let bytes = ternary + head_bytes + kv_read;
            let bw = bandwidth.unwrap_or(f64::NAN);
            let floor_ms = bytes as f64 / bw * 1e3;
            eprintln!("  batch {batch:>3}: prefill {:.0} tok/s, decode {tok_s:.1} tok/s ({step_ms:.3} ms/step, floor {floor_ms:.3} ms = {:.0}%)", (batch * prompt_tokens) as f64 / prefill_s, 100.0 * floor_ms / step_ms);
            rows.push(json!({
                "precision": p, "batch": batch, "prefill_tok_per_s": (batch * prompt_tokens) as f64 / prefill_s,
                "decode_tok_per_s": tok_s, "ms_per_step": step_ms, "bytes_per_step": bytes,
                "floor_ms_per_step": floor_ms, "fraction_of_floor": floor_ms / step_ms,
                "gpu_memory_used_bytes": used, "allocated": {
                    "weights": backend.memory().weights, "kv_cache": backend.memory().kv_cache, "workspace": backend.memory().workspace,
                },
                "kv_slots": config.kv_slots, "setup_seconds": setup_s, "cuda_graphs": !args.no_graphs,
                "head": format!("{:?}", backend.gpu().head_impl()), "head_chunk": head_chunks.0, "head_small_chunk": head_chunks.1,
                "pdl": backend.gpu().pdl_enabled(),
                "kernel_ms_eager_step": kernel_ms,
                "kernels": profile.iter().map(|(n, ms, k)| json!({"kernel": n, "ms": ms, "launches": k})).collect::<Vec<_>>(),
            }));
        }
    }
    let kernels = if args.kernels {
        eprintln!("bench gpu: kernels alone (20 launches in one graph, median of 5):");
        kernel_bench(&args.kernel_rows)?
    } else {
        json!(null)
    };
    let ratios = throughput_vs_fp32(&rows);
    let report = json!({
        "commit": crate::crossval::git_commit(),
        "throughput_vs_fp32": ratios.iter().map(|(p, b, r)| json!({"precision": p, "batch": b, "ratio": r})).collect::<Vec<_>>(),
        "kernels_alone": kernels,
        "model": model_path, "gpu": gpus[0].name, "compute_capability": gpus[0].compute_capability,
        "host": bitnet_device::CpuInfo::probe().to_string(),
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "copy_bandwidth_gb_per_s": bandwidth.map(|b| b / 1e9),
        "rows": rows,
    });
    println!(
        "bench --device gpu: {} on {} (copy bandwidth {:.0} GB/s), prompt {prompt_tokens}, generate {gen_tokens}",
        model_path.display(),
        gpus[0].name,
        bandwidth.unwrap_or(0.0) / 1e9
    );
    println!(
        "| precision | batch | decode tok/s | ms/step | floor ms | % of floor | prefill tok/s | GPU memory (GB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in report["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {:.1} | {:.3} | {:.3} | {:.0}% | {:.0} | {:.2} |",
            r["precision"].as_str().unwrap_or(""),
            r["batch"],
            f("decode_tok_per_s"),
            f("ms_per_step"),
            f("floor_ms_per_step"),
            100.0 * f("fraction_of_floor"),
            f("prefill_tok_per_s"),
            f("gpu_memory_used_bytes") / 1e9
        );
    }
    if !ratios.is_empty() {
        println!("decode throughput against fp32 at the same batch:");
        for (p, b, r) in &ratios {
            println!("  {p} batch {b}: {r:.2}x");
        }
    }
    if let Some(out) = json_out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// (precision, batch, decode tok/s / fp32's at that batch) for every
/// non-fp32 row with an fp32 row of the same batch in `rows`.
fn throughput_vs_fp32(rows: &[serde_json::Value]) -> Vec<(String, u64, f64)> {
    let tok_s = |r: &serde_json::Value| r["decode_tok_per_s"].as_f64().filter(|v| v.is_finite() && *v > 0.0);
    let fp32 = |batch: u64| {
        rows.iter().find(|r| r["precision"] == "fp32" && r["batch"].as_u64() == Some(batch)).and_then(tok_s)
    };
    rows.iter()
        .filter(|r| r["precision"] != "fp32")
        .filter_map(|r| {
            let batch = r["batch"].as_u64()?;
            Some((r["precision"].as_str()?.to_string(), batch, tok_s(r)? / fp32(batch)?))
        })
        .collect()
}

/// Per-kernel times at the 2B-4T shapes: each kernel launched 20 times in one
/// CUDA graph, the graph timed with events (median of 5), on random data.
/// Separates a kernel's own time from launch gaps, which an eager profile
/// (events around each launch) includes.
pub fn kernel_bench(rows_list: &[usize]) -> anyhow::Result<serde_json::Value> {
    use bitnet_kernels::cuda::{GpuContext, GpuDType, HeadImpl, SampleRow, TernaryActs};
    let gpu = GpuContext::open(0, None)?;
    let (h, inter, vocab, heads, kv_heads, hd) = (2560usize, 6912usize, 128_256usize, 20usize, 5usize, 128usize);
    let kv_dim = kv_heads * hd;
    let max_rows = rows_list.iter().copied().max().unwrap_or(1);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    };
    // Valid I2_S codes only (0..=2 in every field): clear bit 1 of a field whose bits are 11.
    let codes = |bytes: Vec<u8>| -> Vec<u8> { bytes.into_iter().map(|b| b & !((b & (b >> 1) & 0x55) << 1)).collect() };
    let f32s = |n: usize, scale: f32, random: &mut dyn FnMut(usize) -> Vec<u8>| -> Vec<u8> {
        random(n).iter().flat_map(|&b| ((f32::from(b) - 127.5) * scale).to_le_bytes()).collect()
    };
    // bf16 values below 2 in magnitude (exponent bit 7 clear): no NaN or infinity.
    let bf16s = |bytes: Vec<u8>| -> Vec<u8> {
        bytes.into_iter().enumerate().map(|(i, b)| if i % 2 == 1 { b & 0xBF } else { b }).collect()
    };
    let w_qkv = gpu.upload("qkv", &codes(random((h + 2 * kv_dim) * h / 4)))?;
    let w_o = gpu.upload("o", &codes(random(h * h / 4)))?;
    let w_gate = gpu.upload("gate", &codes(random(inter * h / 4)))?;
    let w_up = gpu.upload("up", &codes(random(inter * h / 4)))?;
    let w_down = gpu.upload("down", &codes(random(h * inter / 4)))?;
    let head_bf16 = gpu.upload("head bf16", &bf16s(random(vocab * h * 2)))?;
    let head_f32 = gpu.upload("head f32", &f32s(vocab * h, 1e-3, &mut random))?;
    let x = gpu.upload("x", &f32s(max_rows * inter, 0.01, &mut random))?;
    let norm_w = gpu.upload("norm", &f32s(inter, 0.01, &mut random))?;
    let q8 = gpu.upload("q8", &random(max_rows * inter))?;
    let scale = gpu.upload("scale", &(0..max_rows).flat_map(|_| 50f32.to_le_bytes()).collect::<Vec<u8>>())?;
    let qsum = gpu.alloc("qsum", max_rows * 4)?;
    let out = gpu.alloc("out", max_rows * inter * 4)?;
    let qkv = gpu.upload("qkv out", &f32s(max_rows * (h + 2 * kv_dim), 0.01, &mut random))?;
    let slots = max_rows * 256;
    let kc = gpu.upload("k cache", &bf16s(random(slots * kv_dim * 2)))?;
    let vc = gpu.upload("v cache", &bf16s(random(slots * kv_dim * 2)))?;
    let cos = gpu.upload("cos", &f32s(4096 * hd / 2, 0.007, &mut random))?;
    let pos: Vec<u8> = (0..max_rows).flat_map(|_| 255i32.to_le_bytes()).collect();
    let base: Vec<u8> = (0..max_rows).flat_map(|r| (r as i32 * 256).to_le_bytes()).collect();
    let (pos, base) = (gpu.upload("pos", &pos)?, gpu.upload("base", &base)?);
    let q = gpu.alloc("q", max_rows * h * 4)?;
    let attn = gpu.alloc("attn", max_rows * h * 4)?;
    let scratch = gpu.alloc("scratch", 4096usize.max(max_rows) * heads * (hd + 2) * 4)?;
    let flags = gpu.alloc("flags", 4)?;
    // hi + lo rows for max_rows entries, rounded up to whole cuBLAS chunks.
    let head_in = gpu.upload("head in", &bf16s(random(2 * max_rows.max(64) * h * 2)))?;
    let logits = gpu.alloc("logits", 2 * max_rows * vocab * 4)?;
    // Room for the hi/lo products of cuBLAS chunks of up to 64 entries.
    let head_scratch = gpu.alloc("head scratch", 2 * 64 * vocab * 4)?;
    let row_ids: Vec<u8> = (0..max_rows).flat_map(|r| (r as i32).to_le_bytes()).collect();
    let row_ids = gpu.upload("rows", &row_ids)?;
    let tokens_out = gpu.alloc("tokens", max_rows * 4)?;

    // Logits for the sampling kernel: rows of uniform values in [-1, 1]
    // (flat: top-p nuclei of most of the vocabulary), in [-12, 12] (nuclei
    // of thousands), and those with every 1000th raised by 20 (peaked:
    // nuclei among the 129 raised tokens).
    let uniform = |spread: f32, bytes: Vec<u8>| -> Vec<u8> {
        bytes
            .chunks_exact(4)
            .flat_map(|b| {
                let u = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32 / u32::MAX as f32;
                ((2.0 * u - 1.0) * spread).to_le_bytes()
            })
            .collect()
    };
    let sample_flat = gpu.upload("flat logits", &uniform(1.0, random(max_rows * vocab * 4)))?;
    let spread = uniform(12.0, random(max_rows * vocab * 4));
    let sample_spread = gpu.upload("spread logits", &spread)?;
    let peaked: Vec<u8> = spread
        .chunks_exact(4)
        .enumerate()
        .flat_map(|(i, b)| {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (if i % 1000 == 0 { v + 20.0 } else { v }).to_le_bytes()
        })
        .collect();
    let sample_peaked = gpu.upload("peaked logits", &peaked)?;
    let sample_workspace = gpu.alloc("sampling workspace", GpuContext::sample_workspace_bytes(max_rows, vocab))?;
    // Kernels launched eagerly (sample_rows copies its parameters from the
    // host, which a graph capture would not take): the median of five runs
    // of 20 calls.
    let time_eager = |f: &dyn Fn() -> Result<(), bitnet_kernels::cuda::CudaError>| -> anyhow::Result<f64> {
        const REPS: usize = 20;
        f()?;
        gpu.synchronize()?;
        let mut samples = Vec::new();
        for _ in 0..5 {
            samples.push(f64::from(gpu.time_ms(|| (0..REPS).try_for_each(|_| f()))?));
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[2] * 1e3 / REPS as f64)
    };
    let time = |f: &dyn Fn() -> Result<(), bitnet_kernels::cuda::CudaError>| -> anyhow::Result<f64> {
        const REPS: usize = 20;
        f()?;
        gpu.synchronize()?;
        let capturing = gpu.begin_capture()?;
        let captured = (0..REPS).try_for_each(|_| f());
        let graph = gpu.end_capture(capturing);
        captured?;
        let graph = graph?;
        gpu.launch_graph(&graph)?;
        let mut samples = Vec::new();
        for _ in 0..5 {
            samples.push(f64::from(gpu.time_ms(|| gpu.launch_graph(&graph))?));
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[2] * 1e3 / REPS as f64)
    };
    let mut rows = Vec::new();
    for &n in rows_list {
        let acts_h = TernaryActs { q: q8.all(), scale: scale.all(), qsum: qsum.all(), n_tok: n };
        let mut add = |name: &str, bytes: usize, us: f64| {
            eprintln!("  n {n:>3} {name:<22} {us:>8.2} us  {:>7.0} GB/s", bytes as f64 / us / 1e3);
            rows.push(json!({"rows": n, "kernel": name, "us": us, "bytes": bytes}));
        };
        add(
            "rmsnorm_quant 2560",
            n * h * 5,
            time(&|| gpu.rmsnorm_quant(x.all(), norm_w.all(), 1e-5, n, h, &acts_h, flags.all()))?,
        );
        add(
            "rmsnorm_quant 6912",
            n * inter * 5,
            time(&|| gpu.rmsnorm_quant(x.all(), norm_w.all(), 1e-5, n, inter, &acts_h, flags.all()))?,
        );
        let qkv_rows = h + 2 * kv_dim;
        add(
            "ternary qkv 3840x2560",
            qkv_rows * h / 4,
            time(&|| {
                gpu.ternary_store(w_qkv.all(), qkv_rows, h, [1.0; 3], [h, h + kv_dim], &acts_h, out.all(), qkv_rows)
            })?,
        );
        add("ternary o 2560x2560", h * h / 4, time(&|| gpu.ternary_add(w_o.all(), h, h, 1.0, &acts_h, out.all(), h))?);
        add(
            "ternary gate+up 2x6912",
            2 * inter * h / 4,
            time(&|| gpu.ternary_gate_up(w_gate.all(), w_up.all(), inter, h, [1.0, 1.0], &acts_h, out.all(), inter))?,
        );
        add(
            "ternary down 2560x6912",
            h * inter / 4,
            time(&|| gpu.ternary_add(w_down.all(), h, inter, 1.0, &acts_h, out.all(), h))?,
        );
        add(
            "rope_kv bf16",
            n * (h + 2 * kv_dim) * 4,
            time(&|| {
                gpu.rope_kv(
                    GpuDType::BF16,
                    qkv.all(),
                    cos.all(),
                    cos.all(),
                    4096,
                    pos.all(),
                    base.all(),
                    n,
                    q.all(),
                    kc.all(),
                    vc.all(),
                    slots,
                    (heads, kv_heads, hd),
                )
            })?,
        );
        add(
            "attention bf16 (256 pos)",
            n * 256 * kv_dim * 2 * 2,
            time(&|| {
                gpu.attention(
                    GpuDType::BF16,
                    q.all(),
                    kc.all(),
                    vc.all(),
                    slots,
                    pos.all(),
                    base.all(),
                    n,
                    256,
                    attn.all(),
                    (heads, kv_heads, hd),
                    scratch.all(),
                    flags.all(),
                )
            })?,
        );
        add(
            "final_norm bf16",
            n * h * 8,
            time(&|| {
                gpu.final_norm(GpuDType::BF16, x.all(), n, row_ids.all(), n, norm_w.all(), 1e-5, h, head_in.all())
            })?,
        );
        // The head on each implementation (cuBLAS only when it loaded).
        for imp in [HeadImpl::Kernels, HeadImpl::Cublas] {
            if gpu.set_head_impl(imp) != imp {
                eprintln!("  (no cuBLAS head: {})", gpu.cublas_note());
                continue;
            }
            let tag = if imp == HeadImpl::Cublas { " cuBLAS" } else { "" };
            add(
                &format!("head bf16{tag}"),
                vocab * h * 2,
                time(&|| {
                    gpu.head(
                        GpuDType::BF16,
                        head_bf16.all(),
                        vocab,
                        h,
                        head_in.all(),
                        n,
                        logits.all(),
                        head_scratch.all(),
                    )
                })?,
            );
            add(
                &format!("head f32{tag}"),
                vocab * h * 4,
                time(&|| {
                    gpu.head(GpuDType::F32, head_f32.all(), vocab, h, x.all(), n, logits.all(), head_scratch.all())
                })?,
            );
        }
        add(
            "argmax (one CTA a row)",
            n * vocab * 4,
            time(&|| gpu.argmax(logits.all(), vocab, n, tokens_out.all(), flags.all(), None))?,
        );
        if n <= bitnet_kernels::cuda::ARGMAX_SPLIT_MAX_ROWS {
            let argmax_scratch = gpu.alloc("argmax scratch", GpuContext::argmax_scratch_bytes(n, vocab))?;
            add(
                "argmax (rows split over CTAs)",
                n * vocab * 4,
                time(&|| {
                    gpu.argmax(logits.all(), vocab, n, tokens_out.all(), flags.all(), Some(argmax_scratch.all()))
                })?,
            );
        }
        for (what, sample_logits) in [("flat", &sample_flat), ("spread", &sample_spread), ("peaked", &sample_peaked)] {
            let settings = [
                ("T 0.8", SampleRow { temperature: 0.8, top_k: 0, top_p: 1.0, u: 0.5 }),
                ("k 40 p 0.95", SampleRow { temperature: 0.8, top_k: 40, top_p: 0.95, u: 0.5 }),
                ("p 0.95", SampleRow { temperature: 0.8, top_k: 0, top_p: 0.95, u: 0.5 }),
            ];
            for (name, draw) in settings {
                let draws = vec![draw; n];
                add(
                    &format!("sample {name} {what}"),
                    n * vocab * 4,
                    time_eager(&|| {
                        gpu.sample_rows(sample_logits.all(), vocab, &draws, sample_workspace.all(), tokens_out.all())
                    })?,
                );
            }
        }
    }
    Ok(json!(rows))
}

#[derive(Debug, clap::Args)]
pub struct PtxArgs {
    /// Cache folder to fill: the bundle's by default, where its run.sh points
    /// BITNET_PTX_CACHE (run after `cargo xtask gpu-smoke`, which empties the
    /// bundle).
    #[arg(long, default_value = "target/gpu-bundle/ptx-cache")]
    out: PathBuf,
    /// Compute capability of the GPU that will load the PTX, MAJOR.MINOR.
    #[arg(long, default_value = "9.0")]
    arch: String,
    /// One variant's BITNET_CUDA_DEFINES (e.g. `FUSED_SUBTRACE=1`), exactly as
    /// the run will set it: the cache key follows their order. Repeat for
    /// several variants; none: the default build.
    #[arg(long)]
    defines: Vec<String>,
    /// Compile with -lineinfo, as runs with BITNET_CUDA_LINEINFO=1 do.
    #[arg(long)]
    lineinfo: bool,
}

/// Compiles the kernels with this machine's NVRTC for each variant and
/// writes them where the GPU machine's runs of the same variants look for
/// them, so those runs skip NVRTC (a minute or more of device time each).
pub fn ptx(args: PtxArgs) -> anyhow::Result<()> {
    use bitnet_kernels::cuda::ptx;
    let (major, minor) = args
        .arch
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--arch {}: expected MAJOR.MINOR, e.g. 9.0", args.arch))?;
    anyhow::ensure!(
        ptx::nvrtc_present(),
        "libnvrtc not found: install it (python3 -m pip install --target DIR nvidia-cuda-nvrtc-cu12) and put \
         DIR/nvidia/cuda_nvrtc/lib on LD_LIBRARY_PATH"
    );
    let variants = if args.defines.is_empty() { vec![String::new()] } else { args.defines };
    for defines in &variants {
        let start = std::time::Instant::now();
        let path = ptx::precompile(&args.out, (major, minor), defines, args.lineinfo)?;
        println!(
            "{} ({}{}; {:.1} s)",
            path.display(),
            if defines.is_empty() { "default build" } else { defines },
            if args.lineinfo { ", -lineinfo" } else { "" },
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_ratios_pair_each_precision_with_fp32_of_the_same_batch() {
        let row = |p: &str, b: u64, t: f64| json!({"precision": p, "batch": b, "decode_tok_per_s": t});
        let rows = [
            row("fp32", 1, 400.0),
            row("fp32", 32, 7000.0),
            row("bf16", 1, 520.0),
            row("bf16", 32, 10500.0),
            row("fp16", 8, 3000.0), // no fp32 row at batch 8: left out
        ];
        let r = throughput_vs_fp32(&rows);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0.as_str(), r[0].1), ("bf16", 1));
        assert!((r[0].2 - 1.3).abs() < 1e-12);
        assert_eq!((r[1].0.as_str(), r[1].1), ("bf16", 32));
        assert!((r[1].2 - 1.5).abs() < 1e-12);
    }
}
