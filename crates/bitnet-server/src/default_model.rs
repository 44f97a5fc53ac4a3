//! The embedded default model: a tiny model committed to the repository so
//! that `bitnet generate` works on a fresh clone with no download.
//! Reproduce it with `cargo xtask gen-model --preset tiny --seed 42 --format gguf
//! --out crates/bitnet-server/assets/default.gguf`.

use bitnet_models::{BitNetModel, LoadReport, ModelError, SharedBytes};

/// The GGUF bytes of the default model.
pub static DEFAULT_MODEL_GGUF: &[u8] = include_bytes!("../assets/default.gguf");

pub fn load() -> Result<(BitNetModel, LoadReport), ModelError> {
    BitNetModel::from_gguf_bytes(SharedBytes::from_static(DEFAULT_MODEL_GGUF))
}
