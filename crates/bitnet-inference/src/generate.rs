//! Autoregressive generation on top of a forward pass.

use crate::error::InferenceError;
use crate::reference::{LogitsMode, ReferenceForward};
use crate::sampling::{Sampler, SamplingConfig};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Stop at the tokenizer's end-of-sequence / end-of-turn tokens.
    pub stop_at_eos: bool,
}

impl GenerationConfig {
    /// Greedy decoding of exactly `max_new_tokens` tokens (no early stop).
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, sampling: SamplingConfig::greedy(), stop_at_eos: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `max_new_tokens` were generated.
    Length,
    /// A stop token was generated (it is included in the output).
    Eos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
}

/// Generates after `prompt`, calling `on_token` for each new token as soon as
/// it is chosen. Checks the whole request fits the context before starting.
pub fn generate(
    forward: &ReferenceForward<'_>,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Result<GenerationOutput, InferenceError> {
    let mut sampler = Sampler::new(config.sampling.clone())?;
    let max = forward.config().max_position_embeddings;
    // The last generated token is never fed back, so the request needs
    // prompt + max_new_tokens - 1 positions.
    let needed = prompt.len() + config.max_new_tokens.saturating_sub(1);
    if needed > max {
        return Err(InferenceError::ContextOverflow { needed, max });
    }
    let mut cache = forward.new_cache();
    let mut tokens = Vec::with_capacity(config.max_new_tokens);
    if config.max_new_tokens == 0 {
        if prompt.is_empty() {
            return Err(InferenceError::EmptyPrompt);
        }
        return Ok(GenerationOutput { tokens, stop_reason: StopReason::Length });
    }
    let mut logits = forward.forward(prompt, &mut cache, LogitsMode::Last)?;
    loop {
        let token = sampler.sample(&logits);
        tokens.push(token);
        on_token(token);
        if config.stop_at_eos && forward.model().tokenizer.is_stop(token) {
            return Ok(GenerationOutput { tokens, stop_reason: StopReason::Eos });
        }
        if tokens.len() == config.max_new_tokens {
            return Ok(GenerationOutput { tokens, stop_reason: StopReason::Length });
        }
        logits = forward.forward(&[token], &mut cache, LogitsMode::Last)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::argmax;
    use bitnet_models::synthetic::{self, Preset};

    #[test]
    fn greedy_generation_equals_argmax_of_full_recomputation() {
        // Independent of the KV cache: recompute the whole sequence each step.
        let model = synthetic::generate(Preset::Tiny, 11).unwrap();
        let f = ReferenceForward::new(&model);
        let prompt = [1u32, 50, 60];
        let out = generate(&f, &prompt, &GenerationConfig::greedy(5), |_| {}).unwrap();
        let mut seq = prompt.to_vec();
        for _ in 0..5 {
            let logits = f.forward(&seq, &mut f.new_cache(), LogitsMode::Last).unwrap();
            seq.push(argmax(&logits));
        }
        assert_eq!(out.tokens, seq[3..]);
        assert_eq!(out.stop_reason, StopReason::Length);
    }

    #[test]
    fn rejects_requests_beyond_the_context() {
        let model = synthetic::generate(Preset::Tiny, 11).unwrap();
        let f = ReferenceForward::new(&model);
        let max = model.config.max_position_embeddings;
        let err = generate(&f, &[1, 2], &GenerationConfig::greedy(max), |_| {}).unwrap_err();
        assert_eq!(err, InferenceError::ContextOverflow { needed: max + 1, max });
    }
}
