//! Autoregressive generation on top of any [`Backend`].

use crate::backend::{Backend, BackendError, SeqId, StepInput, StepOutput, StepWant};
use crate::error::InferenceError;
use crate::sampling::{Sampler, SamplingConfig};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation stops after any of these tokens (it is included in the output).
    pub stop_tokens: Vec<u32>,
}

impl GenerationConfig {
    /// Greedy decoding of exactly `max_new_tokens` tokens (no early stop).
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, sampling: SamplingConfig::greedy(), stop_tokens: Vec::new() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `max_new_tokens` were generated.
    Length,
    /// A stop token was generated.
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
}

/// Sequence id used for one-off generations on a backend.
const GENERATE_SEQ: SeqId = u64::MAX;

/// Generates after `prompt` on `backend`, calling `on_token` for each new
/// token as soon as it is chosen. Checks the whole request fits the context
/// before starting, and frees the sequence afterwards (also on error).
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Result<GenerationOutput, BackendError> {
    let mut sampler = Sampler::new(config.sampling.clone())?;
    if prompt.is_empty() {
        return Err(InferenceError::EmptyPrompt.into());
    }
    let max = backend.config().max_position_embeddings;
    // The last generated token is never fed back, so the request needs
    // prompt + max_new_tokens - 1 positions.
    let needed = prompt.len() + config.max_new_tokens.saturating_sub(1);
    if needed > max {
        return Err(InferenceError::ContextOverflow { needed, max }.into());
    }
    let mut tokens = Vec::with_capacity(config.max_new_tokens);
    if config.max_new_tokens == 0 {
        return Ok(GenerationOutput { tokens, stop_reason: StopReason::Length });
    }
    backend.add_sequence(GENERATE_SEQ, needed)?;
    // Each token comes from `step_select`: the greedy token, or the draw of
    // the sampler's next random number (on a GPU both are made on the
    // device and only the token id is read back).
    let greedy = sampler.config().is_greedy();
    let mut next = |backend: &mut dyn Backend, tokens: &[u32]| -> Result<u32, BackendError> {
        let input = [StepInput { seq: GENERATE_SEQ, tokens }];
        let want = if greedy { StepWant::Greedy } else { StepWant::Sample(sampler.next_draw()) };
        match backend.step_select(&input, &[want])?.into_iter().next() {
            Some(StepOutput::Token(token)) => Ok(token),
            Some(StepOutput::Logits(_)) => Err(BackendError::Device("the backend returned logits, not a token".into())),
            None => Err(BackendError::Device("the backend returned no token".into())),
        }
    };
    let result: Result<StopReason, BackendError> = (|| {
        let mut token = next(backend, prompt)?;
        loop {
            tokens.push(token);
            on_token(token);
            if config.stop_tokens.contains(&token) {
                return Ok(StopReason::Stop);
            }
            if tokens.len() == config.max_new_tokens {
                return Ok(StopReason::Length);
            }
            token = next(backend, &[token])?;
        }
    })();
    backend.remove_sequence(GENERATE_SEQ);
    Ok(GenerationOutput { stop_reason: result?, tokens })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::ReferenceBackend;
    use crate::reference::{LogitsMode, ReferenceForward};
    use crate::sampling::argmax;
    use bitnet_models::synthetic::{self, Preset};

    #[test]
    fn greedy_generation_equals_argmax_of_full_recomputation() {
        // Independent of the KV cache: recompute the whole sequence each step.
        let model = Arc::new(synthetic::generate(Preset::Tiny, 11).unwrap());
        let mut backend = ReferenceBackend::new(model.clone());
        let prompt = [1u32, 50, 60];
        let out = generate(&mut backend, &prompt, &GenerationConfig::greedy(5), |_| {}).unwrap();
        let f = ReferenceForward::new(&model);
        let mut seq = prompt.to_vec();
        for _ in 0..5 {
            let logits = f.forward(&seq, &mut f.new_cache(), LogitsMode::Last).unwrap();
            seq.push(argmax(&logits));
        }
        assert_eq!(out.tokens, seq[3..]);
        assert_eq!(out.stop_reason, StopReason::Length);
        assert_eq!(backend.sequence_len(GENERATE_SEQ), None, "sequence freed");
    }

    #[test]
    fn stops_at_a_stop_token() {
        let model = Arc::new(synthetic::generate(Preset::Tiny, 11).unwrap());
        let mut backend = ReferenceBackend::new(model);
        let free = generate(&mut backend, &[1, 50, 60], &GenerationConfig::greedy(6), |_| {}).unwrap();
        let config = GenerationConfig { stop_tokens: vec![free.tokens[2]], ..GenerationConfig::greedy(6) };
        let stopped = generate(&mut backend, &[1, 50, 60], &config, |_| {}).unwrap();
        let first = free.tokens.iter().position(|&t| t == free.tokens[2]).unwrap();
        assert_eq!(stopped.tokens, free.tokens[..=first]);
        assert_eq!(stopped.stop_reason, StopReason::Stop);
    }

    #[test]
    fn rejects_requests_beyond_the_context() {
        let model = Arc::new(synthetic::generate(Preset::Tiny, 11).unwrap());
        let max = model.config.max_position_embeddings;
        let mut backend = ReferenceBackend::new(model);
        let err = generate(&mut backend, &[1, 2], &GenerationConfig::greedy(max), |_| {}).unwrap_err();
        assert_eq!(err, InferenceError::ContextOverflow { needed: max + 1, max }.into());
    }
}
