//! `GgufError`: everything that can go wrong reading, validating or writing a
//! GGUF file, each variant carrying what is wrong and where.

use std::io;
use std::path::PathBuf;
use std::str::Utf8Error;

use bitnet_device::mmap::MapError;

use super::types::GgmlType;
use super::value::GgufValueType;

/// An error reading, validating or writing GGUF.
///
/// Reader errors name the byte offset in the file and the metadata key or
/// tensor they concern. Errors from [`GgufFile::open`](super::GgufFile::open)
/// are wrapped in [`GgufError::InFile`]; [`GgufError::innermost`] unwraps it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or memory-mapped.
    #[error(transparent)]
    Map(#[from] MapError),

    /// The file, or a tensor's data left on disk by
    /// [`GgufFile::read_selected`](super::GgufFile::read_selected), could not
    /// be read into memory.
    #[error("cannot read {} into memory: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A parse or validation error in the named file.
    #[error("{}: {inner}", path.display())]
    InFile { path: PathBuf, inner: Box<GgufError> },

    /// Writing the named file failed.
    #[error("cannot write {}: {source}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Writing to a stream failed.
    #[error("cannot write GGUF: {source}")]
    Write {
        #[source]
        source: io::Error,
    },

    #[error("not a GGUF file: magic at byte 0 is {}, expected \"GGUF\"", escape(.found))]
    BadMagic { found: [u8; 4] },

    #[error("unsupported GGUF version {version} at byte 4 (supported: 2 and 3){}", version_hint(*.version))]
    UnsupportedVersion { version: u32 },

    /// A fixed-size field runs past the end of the file.
    #[error(
        "file truncated: {what} of {context} needs {needed} bytes at byte {offset}, \
         but the file ends at byte {file_size}"
    )]
    Truncated { what: &'static str, context: String, offset: u64, needed: u64, file_size: u64 },

    /// A declared length or count cannot fit in the rest of the file.
    #[error(
        "{what} of {context} at byte {offset} is {count}, but each item takes at least \
         {min_item_bytes} bytes and only {available} bytes remain in the file"
    )]
    LengthExceedsFile {
        what: &'static str,
        context: String,
        offset: u64,
        count: u64,
        min_item_bytes: u64,
        available: u64,
    },

    #[error("invalid UTF-8 in {what} of {context} at byte {offset}: {source}")]
    InvalidUtf8 {
        what: &'static str,
        context: String,
        offset: u64,
        #[source]
        source: Utf8Error,
    },

    #[error("metadata key `{key}`: unknown value type {type_id} at byte {offset}")]
    UnknownValueType { key: String, type_id: u32, offset: u64 },

    #[error("metadata key `{key}`: invalid bool byte {byte} at byte {offset} (expected 0 or 1)")]
    InvalidBool { key: String, byte: u8, offset: u64 },

    #[error("metadata key `{key}`: arrays nested more than {max_depth} levels deep{}", at_offset(.offset))]
    NestingTooDeep { key: String, max_depth: usize, offset: Option<u64> },

    #[error("metadata key `{key}`: array of {expected:?} holds a {found:?} at index {index}")]
    MixedArray { key: String, expected: GgufValueType, found: GgufValueType, index: usize },

    #[error("duplicate metadata key `{key}`{}", at_offset(.offset))]
    DuplicateKey { key: String, offset: Option<u64> },

    #[error("invalid alignment {alignment} (general.alignment): must be a power of two that fits in u32")]
    InvalidAlignment { alignment: u64 },

    #[error("missing metadata key `{key}`")]
    MissingKey { key: String },

    #[error("metadata key `{key}` has type {found:?}, expected {expected}")]
    WrongType { key: String, expected: &'static str, found: GgufValueType },

    #[error("metadata key `{key}` is {value}, expected {expected}")]
    ValueOutOfRange { key: String, value: String, expected: &'static str },

    #[error("tensor `{tensor}`: unknown ggml type id {type_id} at byte {offset}")]
    UnknownGgmlType { tensor: String, type_id: u32, offset: u64 },

    #[error("tensor `{tensor}`: {n_dims} dimensions{}, expected 1 to 4", at_offset(.offset))]
    BadDimCount { tensor: String, n_dims: u64, offset: Option<u64> },

    #[error("tensor `{tensor}`: dimension {index} of shape {dims:?} is zero")]
    ZeroDimension { tensor: String, dims: Vec<u64>, index: usize },

    #[error("tensor `{tensor}`: shape {dims:?} of type {ggml_type} is too large (its element count exceeds i64 or its byte size overflows)")]
    ShapeOverflow { tensor: String, dims: Vec<u64>, ggml_type: GgmlType },

    #[error("tensor `{tensor}`: shape {dims:?} does not fit type {ggml_type}: {}", block_rule(*.ggml_type))]
    ShapeNotBlockMultiple { tensor: String, dims: Vec<u64>, ggml_type: GgmlType },

    #[error("tensor `{tensor}`: data offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor { tensor: String, offset: u64, alignment: u64 },

    #[error(
        "tensor `{tensor}`: its {n_bytes} bytes at data offset {offset} (file byte {}) \
         run past the end of the file at byte {file_size}",
        u128::from(*.data_offset) + u128::from(*.offset)
    )]
    TensorOutOfRange { tensor: String, offset: u64, n_bytes: u64, data_offset: u64, file_size: u64 },

    #[error(
        "tensors `{first}` (data offset {first_offset}, {first_n_bytes} bytes) and \
         `{second}` (data offset {second_offset}) overlap"
    )]
    OverlappingTensors { first: String, first_offset: u64, first_n_bytes: u64, second: String, second_offset: u64 },

    #[error("duplicate tensor name `{tensor}`{}", at_offset(.offset))]
    DuplicateTensor { tensor: String, offset: Option<u64> },

    #[error("no tensor named `{tensor}`")]
    TensorNotFound { tensor: String },

    #[error("tensor `{tensor}` of type {ggml_type} and shape {dims:?} needs {expected} bytes of data, got {found}")]
    TensorDataSize { tensor: String, ggml_type: GgmlType, dims: Vec<u64>, expected: u64, found: u64 },

    #[error("cannot write {}: the path has no file name", path.display())]
    NoFileName { path: PathBuf },
}

impl GgufError {
    /// The error itself, or for [`GgufError::InFile`] the error it wraps.
    pub fn innermost(&self) -> &GgufError {
        match self {
            Self::InFile { inner, .. } => inner.innermost(),
            other => other,
        }
    }
}

fn at_offset(offset: &Option<u64>) -> String {
    match offset {
        Some(offset) => format!(" at byte {offset}"),
        None => String::new(),
    }
}

fn escape(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

fn version_hint(version: u32) -> &'static str {
    if version == 1 {
        "; version 1 used 32-bit counts and is obsolete, re-convert the model"
    } else if matches!(version.swap_bytes(), 2 | 3) {
        "; this looks like a big-endian GGUF, which is not supported"
    } else {
        ""
    }
}

fn block_rule(ty: GgmlType) -> String {
    if ty == GgmlType::I2_S {
        format!("its element count must be a multiple of {}", ty.block_elems())
    } else {
        format!("its first dimension (ne0) must be a multiple of {}", ty.block_elems())
    }
}
