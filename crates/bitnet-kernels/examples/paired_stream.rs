//! Streaming efficiency of the decode kernels against a plain summing loop,
//! measured in alternation so that each ratio compares runs a few
//! milliseconds apart (on a shared machine the bandwidth moves between
//! runs). Prints the median of each kernel's GB/s over the summing loop's:
//! the f16 head GEMV (626 MiB), 16 gate-sized I2_S GEMVs as 16 parallel
//! calls (as decode makes them) and as one call over the same bytes.
//!
//! `cargo run --release -p bitnet-kernels --example paired_stream [rounds]`

use std::hint::black_box;
use std::time::Instant;

use bitnet_kernels::cpu::{self, FloatMatrixRef, I2sMatrixRef};
use half::f16;

#[path = "../benches/data.rs"]
mod data;
use data::{activations, bytes, i2s_codes, plain_sum};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(15);
    let kernel = cpu::select_kernel().expect("a CPU kernel");
    let (vocab, hidden, inter) = (128_256usize, 2560usize, 6912usize);
    // The tied head (626 MiB of f16) and 16 gate-sized I2_S matrices (70 MiB).
    let head: Vec<u8> = bytes(vocab * hidden, 6)
        .into_iter()
        .flat_map(|b| f16::from_f32((f32::from(b) - 128.0) / 1024.0).to_le_bytes())
        .collect();
    let w = FloatMatrixRef::<f16>::from_le_bytes(&head, vocab, hidden).expect("head");
    let x: Vec<f32> = (0..hidden).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let mut logits = vec![0f32; vocab];
    let mats: Vec<Vec<u8>> = (0..16).map(|i| i2s_codes(inter, hidden, 10 + i)).collect();
    let tall: Vec<u8> = mats.concat();
    let mut out_tall = vec![0i32; 16 * inter];
    let q: Vec<i8> = activations(hidden, 3);
    let mut out = vec![0i32; inter];
    let sum_buf: Vec<u64> = (0..(512usize << 20) / 8).map(|i| i as u64).collect();

    let gbps = |bytes: usize, f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    let (mut r_head, mut r_i2s, mut sums, mut r_tall) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // On the threads of one pool, entered once, as `CpuBackend::step` runs
    // a whole forward step inside `pool.install`.
    let pool = rayon::ThreadPoolBuilder::new().build().expect("a thread pool");
    for round in 0..rounds {
        let (s, h, i, t) = pool.install(|| {
            let s = gbps(sum_buf.len() * 8, &mut || _ = black_box(plain_sum(&sum_buf)));
            let h = gbps(head.len(), &mut || cpu::gemv_f16_f32_par(kernel, w, black_box(&x), &mut logits).unwrap());
            let i = gbps(16 * inter * hidden / 4, &mut || {
                for m in &mats {
                    let wm = I2sMatrixRef::new(m, inter, hidden).unwrap();
                    cpu::gemv_i2s_i8_par(kernel, wm, black_box(&q), &mut out).unwrap();
                }
            });
            let t = gbps(tall.len(), &mut || {
                let wm = I2sMatrixRef::new(&tall, 16 * inter, hidden).unwrap();
                cpu::gemv_i2s_i8_par(kernel, wm, black_box(&q), &mut out_tall).unwrap();
            });
            (s, h, i, t)
        });
        if round > 0 {
            r_tall.push(t / s);
            sums.push(s);
            r_head.push(h / s);
            r_i2s.push(i / s);
        }
        println!(
            "round {round}: sum {s:.1} GB/s, f16 head {h:.1} GB/s ({:.0}%), i2s {i:.1} GB/s ({:.0}%)",
            100.0 * h / s,
            100.0 * i / s
        );
    }
    println!(
        "{kernel:?}: median over {} rounds: summing loop {:.1} GB/s, f16 head {:.0}%, i2s {:.0}% (16 calls), {:.0}% (one call over the same bytes) of it",
        sums.len(),
        median(sums.clone()),
        100.0 * median(r_head),
        100.0 * median(r_i2s),
        100.0 * median(r_tall)
    );
}
