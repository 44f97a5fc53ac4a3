//! The reference forward pass: exactly the math of HF `modeling_bitnet.py`
//! (FORMATS.md), written for clarity, with a KV cache. Activations are f64
//! (see `ops`), so differences against another implementation measure that
//! implementation's rounding. Every faster path is checked against this one.

use bitnet_models::{BitNetConfig, BitNetModel, LayerWeights};

use crate::error::InferenceError;
use crate::ops;

/// Which positions' logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Logits for every input position (teacher forcing, cross-validation).
    All,
    /// Logits for the last input position only (generation).
    Last,
}

/// Keys and values of past positions, per layer, in f64.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer, `[positions, kv_dim]`.
    keys: Vec<Vec<f64>>,
    values: Vec<Vec<f64>>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(config: &BitNetConfig) -> Self {
        Self {
            keys: vec![Vec::new(); config.n_layers],
            values: vec![Vec::new(); config.n_layers],
            kv_dim: config.kv_dim(),
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the first `len` positions (all of them if `len` is larger).
    pub fn prefix(&self, len: usize) -> KvCache {
        let len = len.min(self.len);
        let copy = |layers: &[Vec<f64>]| layers.iter().map(|l| l[..len * self.kv_dim].to_vec()).collect();
        KvCache { keys: copy(&self.keys), values: copy(&self.values), kv_dim: self.kv_dim, len }
    }

    /// Drops every position from `len` on (e.g. to re-run a suffix).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        for layer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            layer.truncate(len * self.kv_dim);
        }
        self.len = len;
    }
}

/// The reference forward pass over a loaded model.
#[derive(Debug)]
pub struct ReferenceForward<'m> {
    model: &'m BitNetModel,
    inv_freq: Vec<f64>,
}

impl<'m> ReferenceForward<'m> {
    pub fn new(model: &'m BitNetModel) -> Self {
        let c = &model.config;
        Self { model, inv_freq: ops::rope_inv_freq(c.rope_theta, c.head_dim) }
    }

    pub fn model(&self) -> &BitNetModel {
        self.model
    }

    pub fn config(&self) -> &BitNetConfig {
        &self.model.config
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.model.config)
    }

    /// Runs `tokens` at positions `cache.len()..`, appending them to `cache`.
    /// Returns logits, `[n, vocab]` flattened, for the positions `mode` asks for
    /// (computed in f64, returned as f32).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, mode: LogitsMode) -> Result<Vec<f32>, InferenceError> {
        self.forward_traced(tokens, cache, mode, |_, _| {})
    }

    /// Like [`Self::forward`], calling `trace(layer, hidden)` with the residual
    /// stream (`[n, hidden]`, f64) after each block, for divergence hunting.
    pub fn forward_traced(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        mode: LogitsMode,
        mut trace: impl FnMut(usize, &[f64]),
    ) -> Result<Vec<f32>, InferenceError> {
        let c = &self.model.config;
        if tokens.is_empty() {
            return Err(InferenceError::EmptyPrompt);
        }
        let start = cache.len;
        if start + tokens.len() > c.max_position_embeddings {
            return Err(InferenceError::ContextOverflow {
                needed: start + tokens.len(),
                max: c.max_position_embeddings,
            });
        }
        for (position, &token) in tokens.iter().enumerate() {
            if token as usize >= c.vocab_size {
                return Err(InferenceError::TokenOutOfRange {
                    token,
                    position: start + position,
                    vocab_size: c.vocab_size,
                });
            }
        }
        let (n, h) = (tokens.len(), c.hidden_size);
        let mut x = vec![0f64; n * h];
        let mut row = vec![0f32; h];
        for (t, &token) in tokens.iter().enumerate() {
            self.model.embedding.row_to_f32(token as usize, &mut row);
            for (xv, rv) in x[t * h..(t + 1) * h].iter_mut().zip(&row) {
                *xv = f64::from(*rv);
            }
        }
        for (idx, layer) in self.model.layers.iter().enumerate() {
            self.block(layer, idx, &mut x, n, cache);
            trace(idx, &x);
        }
        cache.len += n;

        let rows: Vec<usize> = match mode {
            LogitsMode::All => (0..n).collect(),
            LogitsMode::Last => vec![n - 1],
        };
        let head = self.model.head();
        let mut logits = vec![0f32; rows.len() * c.vocab_size];
        let mut normed = vec![0f64; h];
        let mut head_row = vec![0f32; h];
        let mut head_row64 = vec![0f64; h];
        let normed_rows: Vec<Vec<f64>> = rows
            .iter()
            .map(|&t| {
                ops::rms_norm(&x[t * h..(t + 1) * h], &self.model.output_norm, c.rms_norm_eps, &mut normed);
                normed.clone()
            })
            .collect();
        for v in 0..c.vocab_size {
            head.row_to_f32(v, &mut head_row);
            for (a, b) in head_row64.iter_mut().zip(&head_row) {
                *a = f64::from(*b);
            }
            for (r, normed) in normed_rows.iter().enumerate() {
                logits[r * c.vocab_size + v] = ops::dot(normed, &head_row64) as f32;
            }
        }
        Ok(logits)
    }

    /// One transformer block over `n` new positions, updating `x` in place.
    fn block(&self, layer: &LayerWeights, idx: usize, x: &mut [f64], n: usize, cache: &mut KvCache) {
        let c = &self.model.config;
        let (h, kv_dim, hd, inter) = (c.hidden_size, c.kv_dim(), c.head_dim, c.intermediate_size);
        let eps = c.rms_norm_eps;
        let start = cache.len;

        // Attention.
        let mut normed = vec![0f64; n * h];
        for t in 0..n {
            ops::rms_norm(&x[t * h..(t + 1) * h], &layer.attn_norm, eps, &mut normed[t * h..(t + 1) * h]);
        }
        let mut q = vec![0f64; n * h];
        let mut k = vec![0f64; n * kv_dim];
        let mut v = vec![0f64; n * kv_dim];
        ops::bitlinear(&normed, n, &layer.attn_q, &mut q);
        ops::bitlinear(&normed, n, &layer.attn_k, &mut k);
        ops::bitlinear(&normed, n, &layer.attn_v, &mut v);
        for t in 0..n {
            ops::rope(&mut q[t * h..(t + 1) * h], hd, start + t, &self.inv_freq);
            ops::rope(&mut k[t * kv_dim..(t + 1) * kv_dim], hd, start + t, &self.inv_freq);
        }
        cache.keys[idx].extend_from_slice(&k);
        cache.values[idx].extend_from_slice(&v);
        let (keys, values) = (&cache.keys[idx], &cache.values[idx]);

        let scale = 1.0 / (hd as f64).sqrt();
        let group = c.group_size();
        let mut attn = vec![0f64; n * h];
        for t in 0..n {
            let visible = start + t + 1; // causal: positions 0..=start+t
            let mut scores = vec![0f64; visible];
            for head in 0..c.n_heads {
                let kv_head = head / group;
                let qh = &q[t * h + head * hd..t * h + (head + 1) * hd];
                for (p, score) in scores.iter_mut().enumerate() {
                    let kh = &keys[p * kv_dim + kv_head * hd..p * kv_dim + (kv_head + 1) * hd];
                    *score = ops::dot(qh, kh) * scale;
                }
                ops::softmax(&mut scores);
                let out = &mut attn[t * h + head * hd..t * h + (head + 1) * hd];
                for (d, o) in out.iter_mut().enumerate() {
                    *o = scores.iter().enumerate().map(|(p, w)| w * values[p * kv_dim + kv_head * hd + d]).sum();
                }
            }
        }
        // Sub-norm over the concatenated heads, before o_proj.
        for t in 0..n {
            ops::rms_norm(&attn[t * h..(t + 1) * h], &layer.attn_sub_norm, eps, &mut normed[t * h..(t + 1) * h]);
        }
        let mut o = vec![0f64; n * h];
        ops::bitlinear(&normed, n, &layer.attn_output, &mut o);
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += ov;
        }

        // Feed-forward.
        for t in 0..n {
            ops::rms_norm(&x[t * h..(t + 1) * h], &layer.ffn_norm, eps, &mut normed[t * h..(t + 1) * h]);
        }
        let mut gate = vec![0f64; n * inter];
        let mut up = vec![0f64; n * inter];
        ops::bitlinear(&normed, n, &layer.ffn_gate, &mut gate);
        ops::bitlinear(&normed, n, &layer.ffn_up, &mut up);
        let mut act = vec![0f64; n * inter];
        ops::relu2_mul(&gate, &up, &mut act);
        let mut act_normed = vec![0f64; n * inter];
        for t in 0..n {
            ops::rms_norm(
                &act[t * inter..(t + 1) * inter],
                &layer.ffn_sub_norm,
                eps,
                &mut act_normed[t * inter..(t + 1) * inter],
            );
        }
        let mut down = vec![0f64; n * h];
        ops::bitlinear(&act_normed, n, &layer.ffn_down, &mut down);
        for (xv, dv) in x.iter_mut().zip(&down) {
            *xv += dv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_models::synthetic::{self, Preset};

    #[test]
    fn incremental_decoding_matches_full_prefill() {
        let model = synthetic::generate(Preset::Tiny, 3).unwrap();
        let f = ReferenceForward::new(&model);
        let tokens: Vec<u32> = vec![1, 17, 300, 42, 7, 99];
        let mut full_cache = f.new_cache();
        let full = f.forward(&tokens, &mut full_cache, LogitsMode::All).unwrap();
        let mut cache = f.new_cache();
        let vocab = model.config.vocab_size;
        let mut prefix = f.forward(&tokens[..3], &mut cache, LogitsMode::All).unwrap();
        for &t in &tokens[3..] {
            prefix.extend(f.forward(&[t], &mut cache, LogitsMode::Last).unwrap());
        }
        assert_eq!(cache.len(), tokens.len());
        for (a, b) in full.iter().zip(&prefix) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
        assert_eq!(full.len(), tokens.len() * vocab);
    }

    #[test]
    fn causality_later_tokens_do_not_change_earlier_logits() {
        let model = synthetic::generate(Preset::Tiny, 4).unwrap();
        let f = ReferenceForward::new(&model);
        let a = f.forward(&[5, 6, 7], &mut f.new_cache(), LogitsMode::All).unwrap();
        let b = f.forward(&[5, 6, 8], &mut f.new_cache(), LogitsMode::All).unwrap();
        let v = model.config.vocab_size;
        assert_eq!(a[..2 * v], b[..2 * v]);
        assert_ne!(a[2 * v..], b[2 * v..]);
    }

    #[test]
    fn rejects_bad_inputs() {
        let model = synthetic::generate(Preset::Tiny, 5).unwrap();
        let f = ReferenceForward::new(&model);
        let mut cache = f.new_cache();
        assert_eq!(f.forward(&[], &mut cache, LogitsMode::Last), Err(InferenceError::EmptyPrompt));
        assert!(matches!(
            f.forward(&[1, 512], &mut cache, LogitsMode::Last),
            Err(InferenceError::TokenOutOfRange { token: 512, position: 1, .. })
        ));
        let long = vec![1u32; model.config.max_position_embeddings + 1];
        assert!(matches!(f.forward(&long, &mut cache, LogitsMode::Last), Err(InferenceError::ContextOverflow { .. })));
        assert!(cache.is_empty(), "failed calls must not touch the cache");
    }

    #[test]
    fn truncating_the_cache_replays_identically() {
        let model = synthetic::generate(Preset::Tiny, 6).unwrap();
        let f = ReferenceForward::new(&model);
        let mut cache = f.new_cache();
        f.forward(&[1, 2, 3], &mut cache, LogitsMode::Last).unwrap();
        let first = f.forward(&[4], &mut cache, LogitsMode::Last).unwrap();
        cache.truncate(3);
        let again = f.forward(&[4], &mut cache, LogitsMode::Last).unwrap();
        assert_eq!(first, again);
    }
}
