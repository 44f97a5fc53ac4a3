//! The embedded default model: `bitnet-tiny-tasks`, a 10M-parameter BitNet
//! b1.58 model trained with quantization-aware training on checkable tasks
//! (models/bitnet-tiny-tasks/MODEL_CARD.md), committed to the repository so
//! that `bitnet generate` works on a fresh clone with no download. The GGUF is
//! `bitnet convert --embedding-dtype bf16` of the committed HF folder.

use bitnet_models::{BitNetModel, LoadReport, ModelError, SharedBytes};

/// The GGUF bytes of the default model.
pub static DEFAULT_MODEL_GGUF: &[u8] = include_bytes!("../../../models/bitnet-tiny-tasks/bitnet-tiny-tasks.gguf");

pub fn load() -> Result<(BitNetModel, LoadReport), ModelError> {
    BitNetModel::from_gguf_bytes(SharedBytes::from_static(DEFAULT_MODEL_GGUF))
}
