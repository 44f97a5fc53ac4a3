//! `InferenceError`: bad requests to a forward pass or a generation.

#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum InferenceError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} at position {position} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, position: usize, vocab_size: usize },
    #[error("{needed} positions exceed the context length of {max}")]
    ContextOverflow { needed: usize, max: usize },
    #[error("invalid sampling parameter: {0}")]
    BadSampling(String),
}
