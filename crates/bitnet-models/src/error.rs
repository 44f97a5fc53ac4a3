//! `ModelError`: everything that can go wrong turning files into a model.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::gguf::GgufError;
use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("tensor `{tensor}`: {source}")]
    Quant {
        tensor: String,
        #[source]
        source: bitnet_quant::QuantError,
    },
    #[error("missing tensor `{name}`")]
    MissingTensor { name: String },
    #[error("tensor `{tensor}` has the wrong shape: expected {expected}, found {found}")]
    BadShape { tensor: String, expected: String, found: String },
    #[error("tensor `{tensor}` has type {found}; expected {expected}")]
    UnsupportedType { tensor: String, found: String, expected: &'static str },
    #[error("tensor `{tensor}`: {detail}")]
    InvalidData { tensor: String, detail: String },
    #[error("tensor `{tensor}` is not supported: {reason}")]
    UnsupportedTensor { tensor: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Safetensors { path: PathBuf, detail: String },
    #[error("{path}: not a GGUF file or an HF model folder (expected a .gguf file or a folder with config.json)")]
    UnknownFormat { path: PathBuf },
}
