//! One layer's decode attention on the CPU kernels, as `CpuBackend` runs it
//! for one token (2B-4T shapes: 20 query heads in groups of 4 per KV head,
//! head_dim 128, an f32 KV cache of 128, 512 and 2048 positions), on one
//! thread: microseconds per layer, best of 5, and the K+V bytes per second,
//! with 1, 2 and 4 query heads per kernel call (`dot_rows_heads_f32`,
//! `weighted_rows_heads_f32`).
//!
//! `cargo run --release -p bitnet-kernels --example attention_probe`
use std::hint::black_box;
use std::time::Instant;

use bitnet_kernels::cpu;

fn main() {
    let kernel = cpu::select_kernel().unwrap();
    let (heads, group, hd) = (20usize, 4usize, 128usize);
    let kv_dim = heads / group * hd;
    for ctx in [128usize, 512, 2048] {
        let keys: Vec<f32> = (0..ctx * kv_dim).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let values: Vec<f32> = (0..ctx * kv_dim).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
        let q: Vec<f32> = (0..heads * hd).map(|i| ((i * 31) % 101) as f32 / 101.0 - 0.5).collect();
        let mut out = vec![0f32; heads * hd];
        let mut scores = vec![0f32; group * ctx];
        let reps = (200_000 / ctx).max(10);
        let mut line = format!("ctx {ctx}:");
        // Query heads per call: 1 (one head at a time), 2 and 4 (heads of a KV group together).
        for per_call in [1usize, 2, 4] {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let start = Instant::now();
                for _ in 0..reps {
                    for first in (0..heads).step_by(per_call) {
                        let kvh = first / group;
                        let s = &mut scores[..per_call * ctx];
                        let qs = &q[first * hd..(first + per_call) * hd];
                        cpu::dot_rows_heads_f32(kernel, qs, per_call, &keys[kvh * hd..], kv_dim, 0.088, s).unwrap();
                        for head_scores in s.chunks_exact_mut(ctx) {
                            cpu::softmax_f32(kernel, head_scores).unwrap();
                        }
                        let o = &mut out[first * hd..(first + per_call) * hd];
                        cpu::weighted_rows_heads_f32(kernel, s, per_call, &values[kvh * hd..], kv_dim, o).unwrap();
                    }
                    black_box(&out);
                }
                best = best.min(start.elapsed().as_secs_f64() / reps as f64);
            }
            line += &format!(
                " {per_call} head(s) per call {:.1} us ({:.1} GB/s of K+V);",
                best * 1e6,
                (2 * ctx * kv_dim * 4) as f64 / best / 1e9
            );
        }
        println!("{line}");
    }
}
