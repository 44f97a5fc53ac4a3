//! Deterministic synthetic BitNet models: random ternary weights with
//! realistic statistics, a real BPE tokenizer and complete metadata, in the
//! shapes of named presets (`tiny`, `small`, and the real `2b4t` shapes).
//!
//! Scales follow a trained model's regime rather than an initialisation's:
//! embedding entries have unit variance, so the residual stream is O(1) from
//! the first layer and each block adds a comparable amount (each projection's
//! scale keeps unit-RMS inputs at unit-RMS outputs); the final norm's weights
//! are about 4/sqrt(hidden), so logits spread over a few units like a trained
//! model's. (With a tiny embedding and logits near N(0, 1) a random model is
//! chaotic: one int8 rounding flip anywhere changes later tokens, which makes
//! every comparison between two correct implementations look noisy.)
//!
//! Every float (norms, scales, embedding) is drawn on the grid of values that
//! are exact in both bf16 and f16, so the same model written as GGUF (F16
//! embedding, F32 norms) and as an HF folder (bf16) holds identical numbers.

use std::fmt;
use std::str::FromStr;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{BitNetConfig, DEFAULT_ARCHITECTURE};
use crate::error::ModelError;
use crate::model::{BitNetModel, LayerWeights};
use crate::tensor::{FloatDType, FloatTensor, TernaryMatrix};
use crate::tokenizer::Tokenizer;

/// Named model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 2 layers, hidden 128: a few hundred KB, for unit tests and the CLI.
    Tiny,
    /// 4 layers, hidden 512, GQA 4:1 like 2B-4T: for accuracy comparisons.
    Small,
    /// The exact shapes of microsoft/bitnet-b1.58-2B-4T: for speed.
    B2B4T,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Tiny, Preset::Small, Preset::B2B4T];

    pub fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Small => "small",
            Self::B2B4T => "2b4t",
        }
    }

    pub fn config(self) -> BitNetConfig {
        let arch = DEFAULT_ARCHITECTURE.to_owned();
        match self {
            Self::Tiny => BitNetConfig {
                architecture: arch,
                vocab_size: 512,
                hidden_size: 128,
                intermediate_size: 384,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 32,
                max_position_embeddings: 512,
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-5,
            },
            Self::Small => BitNetConfig {
                architecture: arch,
                vocab_size: 4096,
                hidden_size: 512,
                intermediate_size: 1536,
                n_layers: 4,
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 64,
                max_position_embeddings: 1024,
                rope_theta: 500_000.0,
                rms_norm_eps: 1e-5,
            },
            Self::B2B4T => BitNetConfig::bitnet_2b4t(),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown preset {s:?}; expected one of tiny, small, 2b4t"))
    }
}

/// Rounds to the nearest value exact in both bf16 and f16: bf16 rounding,
/// with magnitudes below f16's smallest normal (2^-14) flushed to zero.
pub fn to_shared_grid(x: f32) -> f32 {
    let rounded = bf16::from_f32(x).to_f32();
    if rounded.abs() < f32::powi(2.0, -14) {
        0.0
    } else {
        rounded
    }
}

/// A generator stream per tensor, so tensors are independent of generation order.
fn tensor_rng(seed: u64, name: &str) -> ChaCha8Rng {
    // FNV-1a of the name, mixed with the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ h.rotate_left(17))
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller; u1 in (0, 1] keeps the log finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn norm_vector(seed: u64, name: &str, len: usize, center: f32) -> Vec<f32> {
    let mut rng = tensor_rng(seed, name);
    (0..len).map(|_| to_shared_grid(center * rng.random_range(0.8f32..1.2))).collect()
}

/// Ternary weights with P(0) = 1/3, P(+-1) = 1/3 each, and a scale that keeps
/// the output variance near the input variance for unit-RMS inputs.
fn ternary_matrix(seed: u64, name: &str, out_features: usize, in_features: usize) -> Result<TernaryMatrix, ModelError> {
    let mut rng = tensor_rng(seed, name);
    let n = out_features * in_features;
    let mut values = Vec::with_capacity(n);
    // Draw 40 trits from each 64-bit word (3^40 < 2^64), discarding the rare
    // word beyond the largest multiple of 3^40 so every trit is uniform.
    const TRITS: usize = 40;
    const POW: u64 = 12_157_665_459_056_928_801; // 3^40
    let limit = u64::MAX - u64::MAX % POW;
    while values.len() < n {
        let mut word = rng.random::<u64>();
        if word >= limit {
            continue;
        }
        for _ in 0..TRITS.min(n - values.len()) {
            values.push((word % 3) as i8 - 1);
            word /= 3;
        }
    }
    let base = (1.5 / in_features as f64).sqrt() as f32; // 1 / sqrt(2K/3)
    let scale = to_shared_grid(base * rng.random_range(0.8f32..1.2));
    TernaryMatrix::from_ternary(name, out_features, in_features, &values, scale)
}

/// Builds the synthetic model of `preset` for `seed`.
pub fn generate(preset: Preset, seed: u64) -> Result<BitNetModel, ModelError> {
    generate_with_config(preset.config(), seed)
}

/// Builds a synthetic model of any valid config.
pub fn generate_with_config(config: BitNetConfig, seed: u64) -> Result<BitNetModel, ModelError> {
    config.validate()?;
    let tokenizer = Tokenizer::synthetic(config.vocab_size)?;
    let (h, i, kv, v) = (config.hidden_size, config.intermediate_size, config.kv_dim(), config.vocab_size);

    let mut rng = tensor_rng(seed, "token_embd.weight");
    let embedding: Vec<f32> = (0..v * h).map(|_| to_shared_grid(standard_normal(&mut rng))).collect();
    let embedding = FloatTensor::from_f32("token_embd.weight", v, h, &embedding, FloatDType::F16)?;

    let mut layers = Vec::with_capacity(config.n_layers);
    for idx in 0..config.n_layers {
        let name = |short: &str| format!("blk.{idx}.{short}.weight");
        layers.push(LayerWeights {
            attn_norm: norm_vector(seed, &name("attn_norm"), h, 1.0),
            attn_q: ternary_matrix(seed, &name("attn_q"), h, h)?,
            attn_k: ternary_matrix(seed, &name("attn_k"), kv, h)?,
            attn_v: ternary_matrix(seed, &name("attn_v"), kv, h)?,
            attn_output: ternary_matrix(seed, &name("attn_output"), h, h)?,
            attn_sub_norm: norm_vector(seed, &name("attn_sub_norm"), h, 1.0),
            ffn_norm: norm_vector(seed, &name("ffn_norm"), h, 1.0),
            ffn_gate: ternary_matrix(seed, &name("ffn_gate"), i, h)?,
            ffn_up: ternary_matrix(seed, &name("ffn_up"), i, h)?,
            ffn_down: ternary_matrix(seed, &name("ffn_down"), h, i)?,
            ffn_sub_norm: norm_vector(seed, &name("ffn_sub_norm"), i, 1.0),
        });
    }
    Ok(BitNetModel {
        output_norm: norm_vector(seed, "output_norm.weight", h, 4.0 / (h as f32).sqrt()),
        config,
        tokenizer,
        embedding,
        output: None,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_named() {
        for preset in Preset::ALL {
            preset.config().validate().unwrap();
            assert_eq!(preset.name().parse::<Preset>().unwrap(), preset);
        }
        assert!("huge".parse::<Preset>().is_err());
        let real = Preset::B2B4T.config();
        assert_eq!((real.hidden_size, real.intermediate_size, real.n_layers), (2560, 6912, 30));
    }

    #[test]
    fn shared_grid_values_are_exact_in_bf16_and_f16() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..10_000 {
            let x = to_shared_grid(standard_normal(&mut rng) * 10f32.powi(rng.random_range(-6..4)));
            assert_eq!(bf16::from_f32(x).to_f32(), x);
            assert_eq!(half::f16::from_f32(x).to_f32(), x);
        }
    }

    #[test]
    fn generation_is_deterministic_and_seed_dependent() {
        let a = generate(Preset::Tiny, 7).unwrap();
        let b = generate(Preset::Tiny, 7).unwrap();
        let c = generate(Preset::Tiny, 8).unwrap();
        assert_eq!(a.layers[1].ffn_down.to_ternary(), b.layers[1].ffn_down.to_ternary());
        assert_eq!(a.embedding.to_f32_vec(), b.embedding.to_f32_vec());
        assert_ne!(a.layers[1].ffn_down.to_ternary(), c.layers[1].ffn_down.to_ternary());
    }

    #[test]
    fn ternary_statistics_are_realistic() {
        let m = ternary_matrix(3, "x", 256, 1024).unwrap();
        let values = m.to_ternary();
        let n = values.len() as f64;
        for t in [-1i8, 0, 1] {
            let frac = values.iter().filter(|&&v| v == t).count() as f64 / n;
            assert!((frac - 1.0 / 3.0).abs() < 0.01, "P({t}) = {frac}");
        }
        let base = (1.5f32 / 1024.0).sqrt();
        assert!(m.scale() > 0.75 * base && m.scale() < 1.25 * base, "{}", m.scale());
    }
}
