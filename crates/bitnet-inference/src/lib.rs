//! BitNet b1.58 inference: the reference forward pass (the yardstick every
//! faster path is checked against), sampling, and generation.
//!
//! ```
//! use bitnet_inference::{generate, GenerationConfig, ReferenceForward};
//! use bitnet_models::synthetic::{self, Preset};
//!
//! let model = synthetic::generate(Preset::Tiny, 1).unwrap();
//! let forward = ReferenceForward::new(&model);
//! let prompt = model.tokenizer.encode("Hello", true).unwrap();
//! let out = generate(&forward, &prompt, &GenerationConfig::greedy(4), |_| {}).unwrap();
//! assert_eq!(out.tokens.len(), 4);
//! ```

pub mod backend;
mod error;
mod generate;
pub mod ops;
mod reference;
pub mod sampling;

pub use backend::{Backend, BackendError, BackendInfo, ReferenceBackend, SeqId, StepInput};
pub use error::InferenceError;
pub use generate::{generate, GenerationConfig, GenerationOutput, StopReason};
pub use reference::{KvCache, LogitsMode, ReferenceForward};
pub use sampling::{argmax, Sampler, SamplingConfig};
