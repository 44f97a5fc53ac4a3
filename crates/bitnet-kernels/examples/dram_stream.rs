//! Decode GEMVs over weights far larger than the caches, against a summing
//! loop in the same process: each round sums a 1 GiB buffer on the pool's
//! threads, then runs the f16 head GEMV (128256 x 2560, 657 MB) and 272
//! gate-sized I2_S GEMVs (6912 x 2560) over 1.2 GB of distinct codes, as
//! decode calls them, and prints each one's GB/s and share of the loop's.
//! Unlike `paired_stream` (70 MB of I2_S matrices, re-read every round),
//! nothing here can stay in a large last-level cache between two uses.
//!
//! `cargo run --release -p bitnet-kernels --example dram_stream [rounds]`
use std::hint::black_box;
use std::time::Instant;

use bitnet_kernels::cpu::{self, FloatMatrixRef, I2sMatrixRef};
use half::f16;

#[path = "../benches/data.rs"]
mod data;
use data::{activations, bytes, plain_sum};

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let (rows, hidden, nm) = (6912usize, 2560usize, 272usize);
    let kernel = cpu::select_kernel().expect("a CPU kernel");
    let mb = rows * hidden / 4;
    let all: Vec<u8> = bytes(nm * mb, 7).into_iter().map(|b| (b & 0b1010_1010) >> 1).collect();
    let q: Vec<i8> = activations(hidden, 3);
    let mut out = vec![0i32; rows];
    let sum_buf: Vec<u64> = (0..(1024usize << 20) / 8).map(|i| i as u64).collect();
    let head: Vec<u8> = vec![0x3c; 128_256 * hidden * 2];
    let hw = FloatMatrixRef::<f16>::from_le_bytes(&head, 128_256, hidden).expect("head");
    let x: Vec<f32> = (0..hidden).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let mut logits = vec![0f32; 128_256];
    let gbps = |bytes: usize, f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    let pool = rayon::ThreadPoolBuilder::new().build().expect("a thread pool");
    for round in 0..rounds {
        let v = pool.install(|| {
            let s = gbps(sum_buf.len() * 8, &mut || _ = black_box(plain_sum(&sum_buf)));
            let h = gbps(head.len(), &mut || cpu::gemv_f16_f32_par(kernel, hw, black_box(&x), &mut logits).unwrap());
            let i = gbps(nm * mb, &mut || {
                for i in 0..nm {
                    let wm = I2sMatrixRef::new(&all[i * mb..(i + 1) * mb], rows, hidden).unwrap();
                    cpu::gemv_i2s_i8_par(kernel, wm, black_box(&q), &mut out).unwrap();
                }
            });
            [s, h, i]
        });
        if round > 0 {
            println!(
                "sum {:.1} head {:.1} {:.0}% i2s {:.1} {:.0}%",
                v[0],
                v[1],
                100.0 * v[1] / v[0],
                v[2],
                100.0 * v[2] / v[0]
            );
        }
    }
}
