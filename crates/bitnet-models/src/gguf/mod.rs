//! GGUF v3: reader (memory-mapped, fully validated) and writer, including
//! bitnet.cpp's I2_S tensor type (id 36).
//!
//! ```
//! use bitnet_models::gguf::{GgmlType, GgufFile, GgufWriter, MetadataValue};
//! use bitnet_models::SharedBytes;
//!
//! let mut writer = GgufWriter::new();
//! writer.add_metadata("general.architecture", MetadataValue::String("bitnet-b1.58".into()))?;
//! writer.add_tensor("output_norm.weight", vec![4], GgmlType::F32, vec![0u8; 16])?;
//! let file = GgufFile::from_bytes(SharedBytes::from_vec(writer.to_bytes()?))?;
//! assert_eq!(file.architecture()?, "bitnet-b1.58");
//! assert_eq!(file.tensor_bytes("output_norm.weight")?.len(), 16);
//! # Ok::<(), bitnet_models::gguf::GgufError>(())
//! ```

pub mod error;
pub mod reader;
pub mod types;
pub mod value;
pub mod writer;

#[cfg(test)]
mod tests;

pub use error::GgufError;
pub use reader::{
    GgufFile, GgufTensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_ARRAY_DEPTH,
};
pub use types::{n_elements, tensor_nbytes, GgmlType, MAX_DIMS};
pub use value::{GgufValueType, MetadataValue};
pub use writer::{GgufWriter, TensorData};
