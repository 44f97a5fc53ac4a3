//! Host sampling over a 128256-token vocabulary (BitNet b1.58 2B-4T's), per
//! drawn token: what every sampled request pays each step on top of the
//! forward pass, on the CPU and on the GPU alike.
//!
//! `cargo bench -p bitnet-inference --bench sampling -- --warm-up-time 1 --measurement-time 3`
//!
//! Two rows of logits: `peaked` (normal noise with sd 2.5 plus eight tokens
//! 10-17 above it, so top-p 0.95 keeps a handful, like a trained model's
//! step) and `flat` (sd 1 only: the nucleus is most of the vocabulary).
//! `full_sort` is the sampler before session 24, which scaled and sorted the
//! whole vocabulary for every token, written out here as the baseline.

use std::hint::black_box;

use bitnet_inference::sampling::kept_by_full_sort;
use bitnet_inference::{argmax, Sampler, SamplingConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 128_256;

fn logits(peaked: bool) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let sd = if peaked { 2.5 } else { 1.0 };
    let mut out: Vec<f32> = (0..VOCAB)
        .map(|_| {
            // Box-Muller: one normal value per pair of uniforms.
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            (sd * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    if peaked {
        for k in 0..8 {
            out[(k * 15_013 + 101) % VOCAB] += 10.0 + k as f32;
        }
    }
    out
}

/// The sampler before session 24: every finite logit scaled and sorted
/// ([`kept_by_full_sort`]), then the draw.
fn full_sort(config: &SamplingConfig, logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let items = kept_by_full_sort(config, logits);
    let total: f64 = items.iter().map(|(_, p)| p).sum();
    let mut r = rng.random::<f64>() * total;
    for &(token, p) in &items {
        if r < p {
            return token;
        }
        r -= p;
    }
    items.last().map_or(0, |&(t, _)| t)
}

fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sample_128256");
    group.sample_size(20);
    for (name, row) in [("peaked", logits(true)), ("flat", logits(false))] {
        group.bench_function(BenchmarkId::new("argmax", name), |b| b.iter(|| argmax(black_box(&row))));
        for (label, top_k, top_p) in [
            ("temperature", 0usize, 1.0f32),
            ("top_k40", 40, 1.0),
            ("top_k40_top_p0.95", 40, 0.95),
            ("top_p0.95", 0, 0.95),
        ] {
            let config = SamplingConfig { temperature: 0.8, top_k, top_p, seed: 1 };
            let mut sampler = Sampler::new(config.clone()).unwrap();
            group.bench_function(BenchmarkId::new(label, name), |b| b.iter(|| sampler.sample(black_box(&row))));
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            group.bench_function(BenchmarkId::new(format!("{label}_full_sort"), name), |b| {
                b.iter(|| full_sort(&config, black_box(&row), &mut rng))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, sampling);
criterion_main!(benches);
