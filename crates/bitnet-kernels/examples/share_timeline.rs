//! Where a decode product's time goes when it runs on many threads: the
//! per-thread timeline of each call.
//!
//! Builds the I2_S projections of the 2B-4T preset's 30 layers (522 MB of
//! codes, more than any last-level cache) and runs decode tokens over them
//! as the CPU backend does: per layer q|k|v, o, gate|up and down, the pool's
//! threads held as a team for the token. Each token is run three ways, in
//! turn:
//!
//! - `real`: the shipped `gemm_i2s_i8_par` (one share per thread, runs
//!   claimed at run time: `cpu::rows`), timed per call on the caller;
//! - `probe`: one `team::broadcast` per call, thread `i` running the serial
//!   kernel over the `i`-th of `n` equal row ranges, stamping when it starts
//!   and ends;
//! - `sum`: the same, with `cpu::sum_u64` over the same bytes instead of the
//!   kernel (what reading them alone costs each thread).
//!
//! For each kind of call it prints medians over the calls of: the call's
//! wall time, the latest thread's start (after the publish), the median and
//! slowest thread's run, the latest end, and each thread's read rate.
//! Session 33 on the H200 host's 16 vCPUs (docs/perf/cpu.md): the slowest
//! of 16 threads reading equal shares took 1.4-1.6x the median, with the
//! summing loop as with the kernel.
//!
//! `cargo run --release -p bitnet-kernels --example share_timeline [tokens] [threads...]`
use std::hint::black_box;
use std::time::Instant;

use bitnet_kernels::cpu::team::{self, Team};
use bitnet_kernels::cpu::{self, CpuKernel, I2sMatrixRef};

#[path = "../benches/data.rs"]
mod data;
use data::{activations, i2s_codes};

/// (name, matrices as (rows, k)) of one layer, in call order.
const CALLS: [(&str, &[(usize, usize)]); 4] = [
    ("q|k|v", &[(2560, 2560), (640, 2560), (640, 2560)]),
    ("o", &[(2560, 2560)]),
    ("gate|up", &[(6912, 2560), (6912, 2560)]),
    ("down", &[(2560, 6912)]),
];
const LAYERS: usize = 30;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One call's measurements (microseconds).
#[derive(Default, Clone, Copy)]
struct Call {
    wall: f64,
    last_start: f64,
    median_run: f64,
    max_run: f64,
    last_end: f64,
    /// GB/s of the median thread.
    thread_gbps: f64,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let mut thread_counts: Vec<usize> = args.filter_map(|a| a.parse().ok()).collect();
    if thread_counts.is_empty() {
        thread_counts.push(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    let kernel = cpu::select_kernel().expect("a CPU kernel");
    println!("kernel {}, {tokens} tokens per mode, threads {thread_counts:?}", kernel.name());
    // Every layer's matrices, each call's group in one buffer (as concatenated rows).
    let layers: Vec<Vec<Vec<u8>>> = (0..LAYERS)
        .map(|l| {
            CALLS
                .iter()
                .enumerate()
                .map(|(c, (_, mats))| {
                    let k = mats[0].1;
                    let rows: usize = mats.iter().map(|m| m.0).sum();
                    i2s_codes(rows, k, (l * 8 + c + 1) as u64)
                })
                .collect()
        })
        .collect();
    let total_bytes: usize = layers.iter().flatten().map(Vec::len).sum();
    println!("{:.0} MB of codes", total_bytes as f64 / 1e6);
    let q2560 = activations(2560, 3);
    let q6912 = activations(6912, 5);
    let mut out = vec![0i32; 13824];
    // The `sum` mode's words: as many bytes per call as the codes, elsewhere in memory.
    let words: Vec<Vec<Vec<u64>>> = layers
        .iter()
        .map(|l| {
            l.iter()
                .map(|c| c.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8"))).collect())
                .collect()
        })
        .collect();

    for &threads in &thread_counts {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        // [mode][call kind] -> calls
        let mut results: Vec<Vec<Vec<Call>>> = vec![vec![Vec::new(); CALLS.len()]; 3];
        pool.install(|| {
            for token in 0..tokens + 2 {
                for (mode, mode_results) in results.iter_mut().enumerate() {
                    let _team = Team::start();
                    for (layer, layer_words) in layers.iter().zip(&words) {
                        for (c, (_, mats)) in CALLS.iter().enumerate() {
                            let k = mats[0].1;
                            let codes = &layer[c];
                            let call_words = &layer_words[c];
                            let q = if k == 2560 { &q2560 } else { &q6912 };
                            let rows: usize = mats.iter().map(|m| m.0).sum();
                            let call = run_call(mode, kernel, codes, call_words, rows, k, q, &mut out[..rows]);
                            if token >= 2 {
                                mode_results[c].push(call);
                            }
                        }
                    }
                }
            }
        });
        println!("\n{threads} threads (us per call, medians over {} calls of each kind)", tokens * LAYERS);
        println!(
            "{:<8} {:<6} {:>8} {:>10} {:>10} {:>9} {:>9} {:>12}",
            "call", "mode", "wall", "last start", "median run", "max run", "last end", "thread GB/s"
        );
        for (c, (name, _)) in CALLS.iter().enumerate() {
            for (mode, mode_name) in ["real", "probe", "sum"].iter().enumerate() {
                let calls = &results[mode][c];
                let pick = |f: fn(&Call) -> f64| median(&mut calls.iter().map(f).collect::<Vec<_>>());
                if mode == 0 {
                    println!("{:<8} {:<6} {:>8.1}", name, mode_name, pick(|c| c.wall));
                } else {
                    println!(
                        "{:<8} {:<6} {:>8.1} {:>10.1} {:>10.1} {:>9.1} {:>9.1} {:>12.1}",
                        name,
                        mode_name,
                        pick(|c| c.wall),
                        pick(|c| c.last_start),
                        pick(|c| c.median_run),
                        pick(|c| c.max_run),
                        pick(|c| c.last_end),
                        pick(|c| c.thread_gbps)
                    );
                }
            }
        }
        let per_token: f64 =
            (0..CALLS.len()).map(|c| results[0][c].iter().map(|c| c.wall).sum::<f64>() / tokens as f64).sum();
        println!(
            "real: {:.2} ms of products per token, {:.1} GB/s",
            per_token / 1e3,
            total_bytes as f64 / per_token / 1e3
        );
    }
}

/// Runs one call in `mode` (0 real, 1 probe, 2 sum) and measures it.
#[allow(clippy::too_many_arguments)]
fn run_call(
    mode: usize,
    kernel: CpuKernel,
    codes: &[u8],
    words: &[u64],
    rows: usize,
    k: usize,
    q: &[i8],
    out: &mut [i32],
) -> Call {
    let row_bytes = k / 4;
    if mode == 0 {
        let start = Instant::now();
        let w = I2sMatrixRef::new(codes, rows, k).expect("matrix");
        cpu::gemm_i2s_i8_par(kernel, w, black_box(q), 1, out).expect("product");
        return Call { wall: start.elapsed().as_secs_f64() * 1e6, ..Call::default() };
    }
    let n = rayon::current_num_threads();
    let cut = |i: usize| (rows * i / n / 16 * 16).min(rows);
    let outs: Vec<std::sync::Mutex<&mut [i32]>> = {
        let mut rest = out;
        (0..n)
            .map(|i| {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(cut(i + 1) - cut(i));
                rest = tail;
                std::sync::Mutex::new(mine)
            })
            .collect()
    };
    let t0 = Instant::now();
    let stamps = team::broadcast(|i, _| {
        let started = t0.elapsed().as_secs_f64() * 1e6;
        let (a, b) = (cut(i), cut(i + 1));
        let mine = &codes[a * row_bytes..b * row_bytes];
        if mode == 1 {
            let w = I2sMatrixRef::new(mine, b - a, k).expect("rows");
            let mut o = outs[i].lock().expect("own output");
            cpu::gemv_i2s_i8(kernel, w, q, &mut o).expect("product");
        } else {
            black_box(cpu::sum_u64(kernel, &words[a * row_bytes / 8..b * row_bytes / 8]).expect("sum"));
        }
        (started, t0.elapsed().as_secs_f64() * 1e6, (b - a) * row_bytes)
    });
    let wall = t0.elapsed().as_secs_f64() * 1e6;
    let mut runs: Vec<f64> = stamps.iter().map(|s| s.1 - s.0).collect();
    let mut gbps: Vec<f64> = stamps.iter().map(|s| s.2 as f64 / (s.1 - s.0) / 1e3).collect();
    Call {
        wall,
        last_start: stamps.iter().map(|s| s.0).fold(0.0, f64::max),
        median_run: median(&mut runs),
        max_run: runs.iter().copied().fold(0.0, f64::max),
        last_end: stamps.iter().map(|s| s.1).fold(0.0, f64::max),
        thread_gbps: median(&mut gbps),
    }
}
