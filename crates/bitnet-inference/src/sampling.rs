//! Token sampling: greedy, and seeded temperature / top-k / top-p.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::InferenceError;

/// How to pick the next token. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), InferenceError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(InferenceError::BadSampling(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InferenceError::BadSampling(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self::greedy()
    }
}

/// Index of the largest logit; the lowest index wins ties. NaNs are skipped.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// A sampler with its own seeded random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Result<Self, InferenceError> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// Picks a token from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.is_greedy() {
            return argmax(logits);
        }
        let probs = self.filtered_probabilities(logits);
        let total: f64 = probs.iter().map(|(_, p)| p).sum();
        let mut r = self.rng.random::<f64>() * total;
        for &(token, p) in &probs {
            if r < p {
                return token;
            }
            r -= p;
        }
        probs.last().map_or_else(|| argmax(logits), |&(t, _)| t)
    }

    /// `(token, unnormalised probability)` after temperature, top-k and top-p,
    /// most likely first.
    fn filtered_probabilities(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let t = f64::from(self.config.temperature);
        let mut items: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, f64::from(v) / t))
            .collect();
        items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.config.top_k > 0 {
            items.truncate(self.config.top_k);
        }
        let Some(&(_, max)) = items.first() else {
            return items;
        };
        for item in items.iter_mut() {
            item.1 = (item.1 - max).exp();
        }
        if self.config.top_p < 1.0 {
            let total: f64 = items.iter().map(|(_, p)| p).sum();
            let mut cumulative = 0.0;
            let mut keep = items.len();
            for (i, (_, p)) in items.iter().enumerate() {
                cumulative += p / total;
                if cumulative >= f64::from(self.config.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            items.truncate(keep);
        }
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingConfig { temperature, top_k, top_p, seed }).unwrap()
    }

    #[test]
    fn argmax_prefers_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = sampler(1.0, 1, 1.0, 9);
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities at T=1: e^2, e^1.9, e^0.1, e^-1 normalised -> about 0.49, 0.44, 0.07, 0.02.
        // top_p 0.9 keeps tokens 1 and 2 only.
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = sampler(1.0, 0, 0.9, 3);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert_eq!((seen[0], seen[3]), (0, 0), "{seen:?}");
        let ratio = seen[1] as f64 / seen[2] as f64;
        let expected = (0.1f64).exp(); // e^2 / e^1.9
        assert!((ratio - expected).abs() < 0.15, "ratio {ratio}, expected {expected}");
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = sampler(0.8, 20, 0.95, seed);
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn validates_parameters() {
        let bad = [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)];
        for (temperature, top_p) in bad {
            let cfg = SamplingConfig { temperature, top_k: 0, top_p, seed: 0 };
            assert!(matches!(Sampler::new(cfg), Err(InferenceError::BadSampling(_))));
        }
    }
}
