//! Kernel throughput at BitNet b1.58 2B-4T shapes, in weight bytes read per
//! second, next to a STREAM-like read of a 512 MiB array so the numbers can
//! be compared with the machine's memory bandwidth.
//!
//! `cargo bench -p bitnet-kernels -- --warm-up-time 1 --measurement-time 3`
//! (add a filter such as `i2s_gemv` to run one group). Parallel variants use
//! the global rayon pool (all cores unless `RAYON_NUM_THREADS` says otherwise).
//!
//! Groups:
//! - `read_bandwidth`: sum of a 512 MiB `u64` array, one thread and all threads.
//! - `i2s_gemv`: one matrix (q/o 2560x2560, gate/up 6912x2560, down 2560x6912),
//!   every available kernel. These fit in L2/L3 after the first pass, so they
//!   measure the kernel, not DRAM.
//! - `i2s_gemv_dram`: 16 gate-sized matrices (70 MiB, more than any L3 here)
//!   per iteration, as decode streams the layers from memory.
//! - `i2s_prefill`: 64 tokens through 2560x2560 as one GEMM vs 64 GEMVs.
//! - `f16_head_gemv`: the tied output head, 128256x2560 f16 (626 MiB).
//! - `i8_head_gemv`: the same head quantized to int8 (313 MiB), int8 activations.

use std::hint::black_box;

use bitnet_kernels::cpu::{self, CpuKernel, FloatMatrixRef, I2sMatrixRef, I8MatrixRef};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use rayon::prelude::*;

const HIDDEN: usize = 2560;
const INTERMEDIATE: usize = 6912;
const VOCAB: usize = 128_256;

#[path = "data.rs"]
mod data;
use data::{activations, bytes, i2s_codes};

fn read_bandwidth(c: &mut Criterion) {
    const LEN: usize = 512 * 1024 * 1024 / 8;
    let data: Vec<u64> = (0..LEN as u64).collect();
    let mut group = c.benchmark_group("read_bandwidth");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((LEN * 8) as u64));
    group.bench_function("sum_u64_512MiB/1thread", |b| b.iter(|| sum_u64(black_box(&data))));
    group.bench_function("sum_u64_512MiB/par", |b| {
        b.iter(|| black_box(&data).par_chunks(1 << 16).map(sum_u64).reduce(|| 0, u64::wrapping_add))
    });
    // The benchmarks' floor loop: the SIMD sum that prefetches like the decode kernels.
    let best = cpu::select_kernel().unwrap();
    group.bench_function(BenchmarkId::new("simd_sum_512MiB/1thread", best), |b| {
        b.iter(|| cpu::sum_u64(best, black_box(&data)).unwrap())
    });
    group.bench_function(BenchmarkId::new("simd_sum_512MiB/par", best), |b| {
        b.iter(|| {
            black_box(&data).par_chunks(1 << 16).map(|c| cpu::sum_u64(best, c).unwrap()).reduce(|| 0, u64::wrapping_add)
        })
    });
    group.finish();
}

/// Eight independent accumulators so the loop is bound by loads, not by an add chain.
fn sum_u64(data: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let (chunks, tail) = data.as_chunks::<8>();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.wrapping_add(v);
        }
    }
    acc.iter().chain(tail).fold(0, |s, &v| s.wrapping_add(v))
}

fn i2s_gemv(c: &mut Criterion) {
    let mut group = c.benchmark_group("i2s_gemv");
    for (name, rows, k) in [
        ("q_o_2560x2560", HIDDEN, HIDDEN),
        ("gate_up_6912x2560", INTERMEDIATE, HIDDEN),
        ("down_2560x6912", HIDDEN, INTERMEDIATE),
    ] {
        let codes = i2s_codes(rows, k, 1);
        let w = I2sMatrixRef::new(&codes, rows, k).unwrap();
        let q = activations(k, 2);
        let mut out = vec![0i32; rows];
        group.throughput(Throughput::Bytes(codes.len() as u64));
        for kernel in CpuKernel::all_available() {
            group.bench_function(BenchmarkId::new(format!("{name}/1thread"), kernel), |b| {
                b.iter(|| cpu::gemv_i2s_i8(kernel, w, black_box(&q), &mut out).unwrap())
            });
        }
        let best = cpu::select_kernel().unwrap();
        group.bench_function(BenchmarkId::new(format!("{name}/par"), best), |b| {
            b.iter(|| cpu::gemv_i2s_i8_par(best, w, black_box(&q), &mut out).unwrap())
        });
    }
    group.finish();
}

fn i2s_gemv_dram(c: &mut Criterion) {
    const N_MATRICES: usize = 16;
    let (rows, k) = (INTERMEDIATE, HIDDEN);
    let matrices: Vec<Vec<u8>> = (0..N_MATRICES).map(|i| i2s_codes(rows, k, 10 + i as u64)).collect();
    let q = activations(k, 3);
    let mut out = vec![0i32; rows];
    let mut group = c.benchmark_group("i2s_gemv_dram");
    group.sample_size(20);
    group.throughput(Throughput::Bytes((N_MATRICES * rows * k / 4) as u64));
    let best = cpu::select_kernel().unwrap();
    let mut kernels = vec![best];
    kernels.extend(CpuKernel::all_available().into_iter().filter(|&kernel| kernel == CpuKernel::Avx2));
    for kernel in kernels {
        for par in [false, true] {
            let id = BenchmarkId::new(format!("16x6912x2560/{}", if par { "par" } else { "1thread" }), kernel);
            group.bench_function(id, |b| {
                b.iter(|| {
                    for codes in &matrices {
                        let w = I2sMatrixRef::new(codes, rows, k).unwrap();
                        if par {
                            cpu::gemv_i2s_i8_par(kernel, w, black_box(&q), &mut out).unwrap();
                        } else {
                            cpu::gemv_i2s_i8(kernel, w, black_box(&q), &mut out).unwrap();
                        }
                    }
                })
            });
        }
    }
    group.finish();
}

fn i2s_prefill(c: &mut Criterion) {
    const N_TOKENS: usize = 64;
    let (rows, k) = (HIDDEN, HIDDEN);
    let codes = i2s_codes(rows, k, 4);
    let w = I2sMatrixRef::new(&codes, rows, k).unwrap();
    let q = activations(N_TOKENS * k, 5);
    let mut out = vec![0i32; N_TOKENS * rows];
    let best = cpu::select_kernel().unwrap();
    let mut group = c.benchmark_group("i2s_prefill");
    group.sample_size(20);
    // Throughput in multiply-adds (weights x tokens), so GEMM and GEMVs compare directly.
    group.throughput(Throughput::Elements((rows * k * N_TOKENS) as u64));
    group.bench_function(BenchmarkId::new("64tok_2560x2560/gemm", best), |b| {
        b.iter(|| cpu::gemm_i2s_i8(best, w, black_box(&q), N_TOKENS, &mut out).unwrap())
    });
    group.bench_function(BenchmarkId::new("64tok_2560x2560/64_gemv", best), |b| {
        b.iter(|| {
            for (token_q, token_out) in q.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
                cpu::gemv_i2s_i8(best, w, black_box(token_q), token_out).unwrap();
            }
        })
    });
    group.bench_function(BenchmarkId::new("64tok_2560x2560/gemm_par", best), |b| {
        b.iter(|| cpu::gemm_i2s_i8_par(best, w, black_box(&q), N_TOKENS, &mut out).unwrap())
    });
    group.finish();
}

fn f16_head(c: &mut Criterion) {
    let (rows, k) = (VOCAB, HIDDEN);
    // Small finite f16 values: the bench measures reads, not special cases.
    let weights: Vec<u8> = bytes(rows * k, 6)
        .into_iter()
        .flat_map(|b| f16::from_f32((f32::from(b) - 128.0) / 1024.0).to_le_bytes())
        .collect();
    let w = FloatMatrixRef::<f16>::from_le_bytes(&weights, rows, k).unwrap();
    let x: Vec<f32> = (0..k).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let mut out = vec![0f32; rows];
    let mut group = c.benchmark_group("f16_head_gemv");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(weights.len() as u64));
    for kernel in CpuKernel::all_available().into_iter().filter(|&kernel| kernel != CpuKernel::Scalar) {
        group.bench_function(BenchmarkId::new("128256x2560/1thread", kernel), |b| {
            b.iter(|| cpu::gemv_f16_f32(kernel, w, black_box(&x), &mut out).unwrap())
        });
        group.bench_function(BenchmarkId::new("128256x2560/par", kernel), |b| {
            b.iter(|| cpu::gemv_f16_f32_par(kernel, w, black_box(&x), &mut out).unwrap())
        });
    }
    group.finish();
}

fn i8_head(c: &mut Criterion) {
    let (rows, k) = (VOCAB, HIDDEN);
    let weights = activations(rows * k, 7);
    let w = I8MatrixRef::new(&weights, rows, k).unwrap();
    let q = activations(k, 8);
    let mut out = vec![0i32; rows];
    let mut group = c.benchmark_group("i8_head_gemv");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(weights.len() as u64));
    for kernel in CpuKernel::all_available().into_iter().filter(|&kernel| kernel != CpuKernel::Scalar) {
        group.bench_function(BenchmarkId::new("128256x2560/1thread", kernel), |b| {
            b.iter(|| cpu::gemv_i8_i8(kernel, w, black_box(&q), &mut out).unwrap())
        });
        group.bench_function(BenchmarkId::new("128256x2560/par", kernel), |b| {
            b.iter(|| cpu::gemv_i8_i8_par(kernel, w, black_box(&q), &mut out).unwrap())
        });
    }
    group.finish();
}

/// The head for a decode batch of 8 sequences: 8 GEMVs (the matrix read 8
/// times) against one batched GEMM (read once, reused from cache).
fn head_batch(c: &mut Criterion) {
    const N: usize = 8;
    let (rows, k) = (VOCAB, HIDDEN);
    let weights: Vec<u8> = bytes(rows * k, 9)
        .into_iter()
        .flat_map(|b| f16::from_f32((f32::from(b) - 128.0) / 1024.0).to_le_bytes())
        .collect();
    let w = FloatMatrixRef::<f16>::from_le_bytes(&weights, rows, k).unwrap();
    let x: Vec<f32> = (0..N * k).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let mut out = vec![0f32; N * rows];
    let best = cpu::select_kernel().unwrap();
    let mut group = c.benchmark_group("f16_head_batch8");
    group.sample_size(10);
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function(BenchmarkId::new("128256x2560/8_gemv_par", best), |b| {
        b.iter(|| {
            for (t, o) in out.chunks_exact_mut(rows).enumerate() {
                cpu::gemv_f16_f32_par(best, w, black_box(&x[t * k..(t + 1) * k]), o).unwrap();
            }
        })
    });
    group.bench_function(BenchmarkId::new("128256x2560/gemm_par", best), |b| {
        b.iter(|| cpu::gemm_f16_f32_par(best, w, black_box(&x), N, &mut out).unwrap())
    });
    group.finish();
}

criterion_group!(benches, read_bandwidth, i2s_gemv, i2s_gemv_dram, i2s_prefill, f16_head, i8_head, head_batch);
criterion_main!(benches);
