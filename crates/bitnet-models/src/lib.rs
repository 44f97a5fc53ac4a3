//! Model files for bitnet-rs: GGUF (with bitnet.cpp's I2_S), HF safetensors in
//! the microsoft/bitnet-b1.58-2B-4T layout, the tokenizer, the model config, and
//! a deterministic synthetic model generator.
//!
//! ```
//! use bitnet_models::synthetic::{self, Preset};
//! use bitnet_models::{BitNetModel, SharedBytes};
//!
//! let model = synthetic::generate(Preset::Tiny, 42).unwrap();
//! let bytes = model.to_gguf_writer("tiny").unwrap().to_bytes().unwrap();
//! let (back, report) = BitNetModel::from_gguf_bytes(SharedBytes::from_vec(bytes)).unwrap();
//! assert_eq!(back.config, model.config);
//! assert!(report.unused_tensors.is_empty());
//! ```

pub mod bytes;
pub mod config;
mod error;
pub mod gguf;
pub mod hf;
mod model;
pub mod synthetic;
mod tensor;
pub mod tokenizer;

pub use bytes::SharedBytes;
pub use config::BitNetConfig;
pub use error::ModelError;
pub use model::{BitNetModel, LayerWeights, LoadReport, TernaryGgufType, PROJECTIONS};
pub use tensor::{FloatDType, FloatTensor, TernaryMatrix};
pub use tokenizer::Tokenizer;
