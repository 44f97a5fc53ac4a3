//! The error type of the tokenizer module.

/// Everything that can go wrong while loading, building or using a [`super::Tokenizer`].
///
/// Each variant names the offending key, index or id so that a bad model file
/// can be diagnosed from the message alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    #[error("GGUF metadata key `{key}` is missing")]
    MissingKey { key: &'static str },

    #[error("GGUF metadata key `{key}` has the wrong type: expected {expected}")]
    WrongType { key: &'static str, expected: &'static str },

    #[error(
        "unsupported tokenizer model `{model}`: only byte-level BPE (GGUF `gpt2`, tokenizer.json `BPE`) \
         is supported; SentencePiece (`llama`) and other models are not"
    )]
    UnsupportedModel { model: String },

    #[error(
        "unsupported pre-tokenizer `{pre}`: supported are `llama-bpe`/`llama3` (LLaMA-3 split regex) \
         and `gpt2`/`default` (GPT-2 byte-level regex)"
    )]
    UnsupportedPreTokenizer { pre: String },

    #[error("the vocabulary is empty")]
    EmptyVocabulary,

    #[error("the vocabulary has {n_tokens} tokens, more than token ids (u32) can address")]
    VocabularyTooLarge { n_tokens: usize },

    #[error("token {id} `{token}` duplicates token {first_id}")]
    DuplicateToken { token: String, id: u32, first_id: u32 },

    #[error("token {id} is the empty string")]
    EmptyToken { id: u32 },

    #[error("token_type has {n_token_types} entries but there are {n_tokens} tokens")]
    TokenTypeLengthMismatch { n_tokens: usize, n_token_types: usize },

    #[error("token {id} has token type {value}; llama.cpp token types are 1 to 6")]
    InvalidTokenType { id: u32, value: i64 },

    #[error("merge {index} `{merge}` is invalid: {reason}")]
    BadMerge { index: usize, merge: String, reason: String },

    #[error("{role} token id {id} is out of range (vocabulary of {vocab_size} tokens)")]
    SpecialTokenOutOfRange { role: &'static str, id: u64, vocab_size: usize },

    #[error("token id {id} at position {position} is out of range (vocabulary of {vocab_size} tokens)")]
    TokenIdOutOfRange { id: u32, position: usize, vocab_size: usize },

    #[error("a BOS token was requested but this tokenizer defines none")]
    NoBosToken,

    #[error("the tokenizer has no `{token}` token, which {purpose} needs")]
    MissingSpecialToken { token: &'static str, purpose: &'static str },

    #[error("vocab size {requested} is too small: at least {minimum} are needed (256 bytes + 5 special tokens)")]
    VocabTooSmall { requested: usize, minimum: usize },

    #[error("invalid tokenizer.json: {reason}")]
    InvalidTokenizerJson { reason: String },

    #[error("invalid tokenizer_config.json: {reason}")]
    InvalidTokenizerConfig { reason: String },

    #[error("malformed JSON in {file}: {source}")]
    Json { file: &'static str, source: serde_json::Error },

    /// An error reported by the HF `tokenizers` library, which only gives a message.
    #[error("the tokenizers library failed while {context}: {message}")]
    Library { context: &'static str, message: String },
}

impl TokenizerError {
    pub(super) fn library(context: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Library { context, message: error.to_string() }
    }
}
