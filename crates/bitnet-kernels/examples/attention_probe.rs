//! One layer's decode attention on the CPU kernels, as `CpuBackend` runs it
//! for one token (2B-4T shapes: 20 query heads in groups of 4 per KV head,
//! head_dim 128, an f32 KV cache of 128, 512 and 2048 positions), on one
//! thread: microseconds per layer, best of 5, and the K+V bytes per second.
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
        let mut scores = vec![0f32; ctx];
        let reps = (200_000 / ctx).max(10);
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..reps {
                for h in 0..heads {
                    let kvh = h / group;
                    cpu::dot_rows_f32(kernel, &q[h * hd..(h + 1) * hd], &keys[kvh * hd..], kv_dim, 0.088, &mut scores)
                        .unwrap();
                    cpu::softmax_f32(kernel, &mut scores).unwrap();
                    cpu::weighted_rows_f32(
                        kernel,
                        &scores,
                        &values[kvh * hd..],
                        kv_dim,
                        &mut out[h * hd..(h + 1) * hd],
                    )
                    .unwrap();
                }
                black_box(&out);
            }
            best = best.min(start.elapsed().as_secs_f64() / reps as f64);
        }
        println!(
            "ctx {ctx}: {:.1} us per layer ({:.1} GB/s of K+V)",
            best * 1e6,
            (2 * ctx * kv_dim * 4) as f64 / best / 1e9
        );
    }
}
