//! `Backend`: the batched-step interface every forward-pass implementation
//! offers (the reference, the CPU SIMD backend, the CUDA backend), so the
//! scheduler and the fallback engine can drive any of them.
//!
//! A backend owns a set of sequences, each with its own KV cache and
//! position. One [`Backend::step`] runs a batch in which every entry appends
//! some tokens to one sequence: a whole prompt or a chunk of it (prefill), or
//! the one token sampled last (decode). Prefill and decode entries may be
//! mixed in one batch.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bitnet_models::{BitNetConfig, BitNetModel};

use crate::error::InferenceError;
use crate::reference::{KvCache, LogitsMode, ReferenceForward};
use crate::sampling::SampleDraw;

/// Caller-chosen identifier of a sequence within one backend.
pub type SeqId = u64;

/// One entry of a batched step.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub seq: SeqId,
    /// New tokens, appended at positions `len(seq)..`.
    pub tokens: &'a [u32],
}

/// Errors of a backend. Request errors (bad tokens, overflow) are separate
/// from device failures, which the fallback engine reacts to.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum BackendError {
    #[error(transparent)]
    Request(#[from] InferenceError),
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already exists")]
    DuplicateSequence(SeqId),
    #[error("sequence {seq} appears twice in one step")]
    RepeatedInStep { seq: SeqId },
    #[error("sequence {seq} would reach {needed} positions, beyond the {reserved} reserved for it")]
    ReservationExceeded { seq: SeqId, needed: usize, reserved: usize },
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("device failure: {0}")]
    Device(String),
    #[error("a step of {entries} entries was given {wants} wants")]
    WantsMismatch { entries: usize, wants: usize },
    #[error("cannot copy {len} positions of sequence {src} into sequence {dst}: {reason}")]
    PrefixCopy { src: SeqId, dst: SeqId, len: usize, reason: String },
    #[error("this backend cannot {0}")]
    Unsupported(&'static str),
}

/// What the engine and server need to know about a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// `"reference"`, `"cpu"`, `"cuda"`.
    pub device: String,
    /// `"f64"`, `"f32"`, `"f16"`, `"bf16"`.
    pub precision: String,
    /// Weight format the kernels read, e.g. `"i2s"`.
    pub quantization: String,
    /// The CPU kernel or GPU in use, for logs.
    pub detail: String,
}

/// A batched forward-pass implementation.
pub trait Backend: Send {
    fn info(&self) -> BackendInfo;

    fn config(&self) -> &BitNetConfig;

    /// Registers a sequence and reserves KV space for `max_positions`.
    fn add_sequence(&mut self, seq: SeqId, max_positions: usize) -> Result<(), BackendError>;

    /// Frees a sequence; unknown ids are ignored (a cancelled request may be
    /// removed twice).
    fn remove_sequence(&mut self, seq: SeqId);

    /// Positions already processed for `seq`.
    fn sequence_len(&self, seq: SeqId) -> Option<usize>;

    /// Makes `dst`, a registered sequence with no positions yet, hold the
    /// first `len` positions of `src` (their keys and values copied), as if
    /// `dst` had run the same tokens: its next step continues at position
    /// `len` and gives the bits a step of `src`'s at that length would. `src`
    /// is unchanged. The prefix cache of [`crate::Engine`] rests on this. On
    /// error `dst` is unchanged. Backends that cannot copy say
    /// [`BackendError::Unsupported`] (the default).
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), BackendError> {
        let _ = (src, dst, len);
        Err(BackendError::Unsupported("copy a KV-cache prefix"))
    }

    /// Frees what `seq` reserved beyond the positions it holds: its
    /// reservation becomes its length, so it can be stepped no further (a
    /// finished sequence kept for [`Backend::copy_prefix`]). Backends that
    /// cannot say [`BackendError::Unsupported`] (the default).
    fn shrink_to_fit(&mut self, seq: SeqId) -> Result<(), BackendError> {
        let _ = seq;
        Err(BackendError::Unsupported("shrink a sequence's reservation"))
    }

    /// Runs one batched step and returns, for each input in order, the
    /// logits (`vocab` values) of its last new position. On error no
    /// sequence of the batch has advanced.
    fn step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError>;

    /// Like [`Backend::step`], but returns each entry's greedy next token
    /// (the first index of the largest logit) instead of its logits. A GPU
    /// backend samples on the device and reads back only the token ids.
    fn step_greedy(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<u32>, BackendError> {
        Ok(self.step(batch)?.iter().map(|logits| crate::sampling::argmax(logits)).collect())
    }

    /// One step in which each entry asks for what it will use: its logits
    /// (to sample from), or only its greedy token (greedy requests, and
    /// prefill chunks whose logits nobody reads). A GPU backend then reads
    /// back logits only for the entries that want them.
    fn step_select(&mut self, batch: &[StepInput<'_>], wants: &[StepWant]) -> Result<Vec<StepOutput>, BackendError> {
        check_wants(batch, wants)?;
        if wants.iter().all(|&w| w == StepWant::Greedy) {
            return Ok(self.step_greedy(batch)?.into_iter().map(StepOutput::Token).collect());
        }
        // Sampled entries draw on the rayon pool (a draw scans the vocabulary).
        use rayon::prelude::*;
        Ok(self
            .step(batch)?
            .into_par_iter()
            .zip(wants.par_iter())
            .map(|(logits, &want)| StepOutput::of(logits, want))
            .collect())
    }
}

/// What one entry of [`Backend::step_select`] needs back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepWant {
    /// The logits of its last new position.
    Logits,
    /// Only the greedy token (the first index of the largest logit).
    Greedy,
    /// Only the token this draw picks from the logits
    /// ([`SampleDraw::apply`]; a GPU backend may draw it on the device).
    Sample(SampleDraw),
}

/// One entry's result of [`Backend::step_select`].
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    Logits(Vec<f32>),
    Token(u32),
}

impl StepOutput {
    /// `logits` as `want` asks: kept, or reduced to the greedy token.
    pub fn of(logits: Vec<f32>, want: StepWant) -> Self {
        match want {
            StepWant::Logits => Self::Logits(logits),
            StepWant::Greedy => Self::Token(crate::sampling::argmax(&logits)),
            StepWant::Sample(draw) => Self::Token(draw.apply(&logits)),
        }
    }
}

/// One want per entry, or a clear error.
pub fn check_wants(batch: &[StepInput<'_>], wants: &[StepWant]) -> Result<(), BackendError> {
    if wants.len() != batch.len() {
        return Err(BackendError::WantsMismatch { entries: batch.len(), wants: wants.len() });
    }
    Ok(())
}

/// Checks a batch against the registered sequences before anything runs,
/// so a bad entry cannot leave half the batch advanced.
pub fn validate_step(
    batch: &[StepInput<'_>],
    config: &BitNetConfig,
    lookup: impl Fn(SeqId) -> Option<(usize, usize)>,
) -> Result<(), BackendError> {
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    for input in batch {
        if !seen.insert(input.seq) {
            return Err(BackendError::RepeatedInStep { seq: input.seq });
        }
        let (len, reserved) = lookup(input.seq).ok_or(BackendError::UnknownSequence(input.seq))?;
        if input.tokens.is_empty() {
            return Err(InferenceError::EmptyPrompt.into());
        }
        let needed = len + input.tokens.len();
        if needed > config.max_position_embeddings {
            return Err(InferenceError::ContextOverflow { needed, max: config.max_position_embeddings }.into());
        }
        if needed > reserved {
            return Err(BackendError::ReservationExceeded { seq: input.seq, needed, reserved });
        }
        for (i, &token) in input.tokens.iter().enumerate() {
            if token as usize >= config.vocab_size {
                return Err(InferenceError::TokenOutOfRange {
                    token,
                    position: len + i,
                    vocab_size: config.vocab_size,
                }
                .into());
            }
        }
    }
    Ok(())
}

/// Checks a [`Backend::copy_prefix`] before anything is copied: `src` holds
/// `src_len` positions, `dst` is `(len, reserved)` (`None`: unknown).
pub fn validate_prefix_copy(
    (src, src_len): (SeqId, Option<usize>),
    (dst, dst_state): (SeqId, Option<(usize, usize)>),
    len: usize,
) -> Result<(), BackendError> {
    let src_len = src_len.ok_or(BackendError::UnknownSequence(src))?;
    let (dst_len, reserved) = dst_state.ok_or(BackendError::UnknownSequence(dst))?;
    let reason = if src == dst {
        "a sequence cannot be copied into itself".to_owned()
    } else if dst_len != 0 {
        format!("sequence {dst} already holds {dst_len} positions")
    } else if len > src_len {
        format!("sequence {src} holds only {src_len}")
    } else if len > reserved {
        format!("sequence {dst} reserved only {reserved}")
    } else {
        return Ok(());
    };
    Err(BackendError::PrefixCopy { src, dst, len, reason })
}

/// The reference forward pass as a [`Backend`]: each sequence runs on its
/// own, one after another. Slow and exact; the yardstick for the others.
pub struct ReferenceBackend {
    model: Arc<BitNetModel>,
    sequences: HashMap<SeqId, (KvCache, usize)>,
}

impl ReferenceBackend {
    pub fn new(model: Arc<BitNetModel>) -> Self {
        Self { model, sequences: HashMap::new() }
    }
}

impl fmt::Debug for ReferenceBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReferenceBackend").field("sequences", &self.sequences.len()).finish()
    }
}

impl Backend for ReferenceBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            device: "reference".into(),
            precision: "f64".into(),
            quantization: "i2s".into(),
            detail: "scalar reference forward pass".into(),
        }
    }

    fn config(&self) -> &BitNetConfig {
        &self.model.config
    }

    fn add_sequence(&mut self, seq: SeqId, max_positions: usize) -> Result<(), BackendError> {
        if self.sequences.contains_key(&seq) {
            return Err(BackendError::DuplicateSequence(seq));
        }
        let max = self.config().max_position_embeddings;
        if max_positions > max {
            return Err(InferenceError::ContextOverflow { needed: max_positions, max }.into());
        }
        self.sequences.insert(seq, (KvCache::new(&self.model.config), max_positions));
        Ok(())
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.sequences.remove(&seq);
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.sequences.get(&seq).map(|(cache, _)| cache.len())
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, len: usize) -> Result<(), BackendError> {
        let dst_state = self.sequences.get(&dst).map(|(cache, reserved)| (cache.len(), *reserved));
        validate_prefix_copy((src, self.sequence_len(src)), (dst, dst_state), len)?;
        let prefix = self.sequences[&src].0.prefix(len);
        self.sequences.get_mut(&dst).expect("validated above").0 = prefix;
        Ok(())
    }

    fn shrink_to_fit(&mut self, seq: SeqId) -> Result<(), BackendError> {
        let (cache, reserved) = self.sequences.get_mut(&seq).ok_or(BackendError::UnknownSequence(seq))?;
        *reserved = cache.len();
        Ok(())
    }

    fn step(&mut self, batch: &[StepInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        validate_step(batch, &self.model.config, |seq| {
            self.sequences.get(&seq).map(|(cache, reserved)| (cache.len(), *reserved))
        })?;
        let forward = ReferenceForward::new(&self.model);
        let mut out = Vec::with_capacity(batch.len());
        for input in batch {
            let (cache, _) = self.sequences.get_mut(&input.seq).expect("validated above");
            out.push(forward.forward(input.tokens, cache, LogitsMode::Last)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::argmax;
    use bitnet_models::synthetic::{self, Preset};

    #[test]
    fn batched_steps_equal_independent_runs() {
        let model = Arc::new(synthetic::generate(Preset::Tiny, 9).unwrap());
        let mut backend = ReferenceBackend::new(model.clone());
        backend.add_sequence(1, 16).unwrap();
        backend.add_sequence(2, 16).unwrap();
        // Mixed batch: a 3-token prefill and a 2-token prefill, then decode + prefill chunk.
        let first =
            backend.step(&[StepInput { seq: 1, tokens: &[1, 2, 3] }, StepInput { seq: 2, tokens: &[4, 5] }]).unwrap();
        let second =
            backend.step(&[StepInput { seq: 2, tokens: &[6] }, StepInput { seq: 1, tokens: &[7, 8] }]).unwrap();
        let f = ReferenceForward::new(&model);
        let alone = |tokens: &[u32]| f.forward(tokens, &mut f.new_cache(), LogitsMode::Last).unwrap();
        assert_eq!(first[0], alone(&[1, 2, 3]));
        assert_eq!(first[1], alone(&[4, 5]));
        assert_eq!(second[0], alone(&[4, 5, 6]));
        assert_eq!(second[1], alone(&[1, 2, 3, 7, 8]));
        assert_eq!(backend.sequence_len(1), Some(5));
    }

    #[test]
    fn step_select_gives_logits_or_their_argmax() {
        let model = Arc::new(synthetic::generate(Preset::Tiny, 9).unwrap());
        let (mut plain, mut selecting) = (ReferenceBackend::new(model.clone()), ReferenceBackend::new(model));
        for backend in [&mut plain, &mut selecting] {
            backend.add_sequence(1, 8).unwrap();
            backend.add_sequence(2, 8).unwrap();
        }
        let batch = [StepInput { seq: 1, tokens: &[3, 4] }, StepInput { seq: 2, tokens: &[9] }];
        let logits = plain.step(&batch).unwrap();
        let mixed = selecting.step_select(&batch, &[StepWant::Logits, StepWant::Greedy]).unwrap();
        assert_eq!(mixed, vec![StepOutput::Logits(logits[0].clone()), StepOutput::Token(argmax(&logits[1]))]);

        let next = [StepInput { seq: 1, tokens: &[5] }, StepInput { seq: 2, tokens: &[6] }];
        let logits = plain.step(&next).unwrap();
        let greedy = selecting.step_select(&next, &[StepWant::Greedy; 2]).unwrap();
        assert_eq!(greedy, logits.iter().map(|l| StepOutput::Token(argmax(l))).collect::<Vec<_>>());
        // A draw gives the token its apply picks from the same logits.
        let draw = crate::SampleDraw { temperature: 0.9, top_k: 5, top_p: 0.8, u: 0.42 };
        let next = [StepInput { seq: 1, tokens: &[2] }];
        let logits = plain.step(&next).unwrap();
        let drawn = selecting.step_select(&next, &[StepWant::Sample(draw)]).unwrap();
        assert_eq!(drawn, vec![StepOutput::Token(draw.apply(&logits[0]))]);
        // A want per entry, or nothing runs.
        let err = selecting.step_select(&[StepInput { seq: 1, tokens: &[5] }], &[]).unwrap_err();
        assert!(matches!(err, BackendError::WantsMismatch { entries: 1, wants: 0 }), "{err}");
        assert_eq!(selecting.sequence_len(1), Some(4));
    }

    #[test]
    fn a_bad_entry_fails_the_batch_before_anything_runs() {
        let model = Arc::new(synthetic::generate(Preset::Tiny, 9).unwrap());
        let mut backend = ReferenceBackend::new(model.clone());
        backend.add_sequence(1, 4).unwrap();
        backend.add_sequence(2, 4).unwrap();
        let cases: Vec<(Vec<StepInput<'_>>, BackendError)> = vec![
            (
                vec![StepInput { seq: 1, tokens: &[1] }, StepInput { seq: 3, tokens: &[1] }],
                BackendError::UnknownSequence(3),
            ),
            (
                vec![StepInput { seq: 1, tokens: &[1] }, StepInput { seq: 1, tokens: &[1] }],
                BackendError::RepeatedInStep { seq: 1 },
            ),
            (
                vec![StepInput { seq: 1, tokens: &[1] }, StepInput { seq: 2, tokens: &[1, 2, 3, 4, 5] }],
                BackendError::ReservationExceeded { seq: 2, needed: 5, reserved: 4 },
            ),
            (
                vec![StepInput { seq: 1, tokens: &[1] }, StepInput { seq: 2, tokens: &[9999] }],
                InferenceError::TokenOutOfRange { token: 9999, position: 0, vocab_size: 512 }.into(),
            ),
            (vec![StepInput { seq: 2, tokens: &[] }], InferenceError::EmptyPrompt.into()),
        ];
        for (batch, expected) in cases {
            assert_eq!(backend.step(&batch).unwrap_err(), expected);
            assert_eq!((backend.sequence_len(1), backend.sequence_len(2)), (Some(0), Some(0)));
        }
        assert_eq!(backend.add_sequence(1, 4).unwrap_err(), BackendError::DuplicateSequence(1));
        backend.remove_sequence(1);
        backend.remove_sequence(1);
        assert_eq!(backend.sequence_len(1), None);
    }
}
