//! The GGUF writer: collects metadata and tensors, validates them as they are
//! added (with the same rules as the reader), and writes a GGUF v3 file laid
//! out the way llama.cpp and gguf-py lay it out.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::GgufError;
use super::reader::{align_up, GgufFile, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_ARRAY_DEPTH};
use super::types::{checked_tensor_nbytes, GgmlType};
use super::value::MetadataValue;
use crate::bytes::SharedBytes;

/// Tensor data handed to [`GgufWriter::add_tensor`]: owned bytes, or a
/// zero-copy [`SharedBytes`] view (for example a tensor of a mapped file).
#[derive(Debug, Clone)]
pub struct TensorData(SharedBytes);

impl From<Vec<u8>> for TensorData {
    fn from(bytes: Vec<u8>) -> Self {
        Self(SharedBytes::from_vec(bytes))
    }
}

impl From<&[u8]> for TensorData {
    fn from(bytes: &[u8]) -> Self {
        Self(SharedBytes::from_vec(bytes.to_vec()))
    }
}

impl From<SharedBytes> for TensorData {
    fn from(bytes: SharedBytes) -> Self {
        Self(bytes)
    }
}

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: SharedBytes,
}

/// Builds a GGUF v3 file.
///
/// Metadata entries and tensors are written in the order they were added.
/// Tensor data is placed back to back, each padded with zeros to the
/// alignment (the last one too), as llama.cpp's writer does.
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor>,
    tensor_names: HashSet<String>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty file with the default alignment of 32.
    pub fn new() -> Self {
        Self {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            tensor_names: HashSet::new(),
        }
    }

    /// A writer holding all of `file`'s metadata (alignment included) and
    /// tensors, in file order. Tensor data is shared, not copied.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, GgufError> {
        let mut writer = Self::new();
        for (key, value) in file.metadata() {
            writer.add_metadata(key.clone(), value.clone())?;
        }
        for info in file.tensors() {
            let data = file.tensor_data(info)?;
            writer.add_tensor(info.name.clone(), info.dims.clone(), info.ggml_type, data)?;
        }
        Ok(writer)
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Sets the tensor data alignment, which must be a power of two that fits
    /// in u32. Any alignment other than 32 is recorded as `general.alignment`
    /// (at the end of the metadata, or in place if the key is already set).
    /// Tensor offsets are computed when writing, so this may come at any time.
    pub fn set_alignment(&mut self, alignment: u64) -> Result<(), GgufError> {
        let alignment_u32 = checked_alignment(alignment)?;
        self.alignment = alignment;
        let existing = self.metadata.iter_mut().find(|(key, _)| key == ALIGNMENT_KEY);
        match existing {
            Some((_, value)) => *value = MetadataValue::U32(alignment_u32),
            None if alignment != DEFAULT_ALIGNMENT => {
                self.keys.insert(ALIGNMENT_KEY.to_owned());
                self.metadata.push((ALIGNMENT_KEY.to_owned(), MetadataValue::U32(alignment_u32)));
            }
            None => {}
        }
        Ok(())
    }

    /// Adds a metadata entry. Keys must be unique; array elements must all
    /// have the array's element type; `general.alignment` must be a u32 power
    /// of two and also sets the alignment.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: MetadataValue) -> Result<(), GgufError> {
        let key = key.into();
        if self.keys.contains(&key) {
            return Err(GgufError::DuplicateKey { key, offset: None });
        }
        check_value(&key, &value, 0)?;
        if key == ALIGNMENT_KEY {
            let MetadataValue::U32(alignment) = value else {
                return Err(GgufError::WrongType { key, expected: "u32", found: value.value_type() });
            };
            let alignment = u64::from(alignment);
            checked_alignment(alignment)?;
            self.alignment = alignment;
        }
        self.keys.insert(key.clone());
        self.metadata.push((key, value));
        Ok(())
    }

    /// Adds a tensor. The shape must be valid for `ggml_type` (1 to 4 non-zero
    /// dimensions, ne0 first; block multiples) and `data` exactly
    /// [`tensor_nbytes`](super::tensor_nbytes) long; names must be unique.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dims: Vec<u64>,
        ggml_type: GgmlType,
        data: impl Into<TensorData>,
    ) -> Result<(), GgufError> {
        let name = name.into();
        let TensorData(data) = data.into();
        if self.tensor_names.contains(&name) {
            return Err(GgufError::DuplicateTensor { tensor: name, offset: None });
        }
        let n_bytes = checked_tensor_nbytes(&name, &dims, ggml_type)?;
        if data.len() as u64 != n_bytes {
            return Err(GgufError::TensorDataSize {
                tensor: name,
                ggml_type,
                dims,
                expected: n_bytes,
                found: data.len() as u64,
            });
        }
        self.tensor_names.insert(name.clone());
        self.tensors.push(PendingTensor { name, dims, ggml_type, data });
        Ok(())
    }

    /// Writes the file to `w`.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<(), GgufError> {
        let layout = self.layout()?;
        self.write_io(&layout, &mut w).and_then(|()| w.flush()).map_err(|source| GgufError::Write { source })
    }

    /// Writes the file to `path` atomically: into a temporary file in the
    /// same directory, synced, then renamed over `path`, so that a crash or
    /// error never leaves a half-written model behind.
    pub fn write_to_path(&self, path: &Path) -> Result<(), GgufError> {
        let Some(file_name) = path.file_name() else {
            return Err(GgufError::NoFileName { path: path.to_owned() });
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(file_name);
        temp_name.push(format!(".{}.{}.tmp", std::process::id(), TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
        let temp_path = dir.join(temp_name);
        let layout = self.layout()?;
        let result = self.write_temp(&layout, &temp_path).and_then(|()| fs::rename(&temp_path, path));
        if let Err(source) = result {
            // Best effort: the temporary file may not exist if creating it
            // was what failed, and the original error is the one to report.
            let _ = fs::remove_file(&temp_path);
            return Err(GgufError::WriteFile { path: path.to_owned(), source });
        }
        Ok(())
    }

    fn write_temp(&self, layout: &Layout, temp_path: &Path) -> io::Result<()> {
        let file = OpenOptions::new().write(true).create_new(true).open(temp_path)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        self.write_io(layout, &mut w)?;
        let file: File = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let layout = self.layout()?;
        let header = self.header_bytes(&layout);
        let total = (header.len() as u64).saturating_add(layout.data_size);
        let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        out.extend_from_slice(&header);
        self.write_data(&mut out).map_err(|source| GgufError::Write { source })?;
        Ok(out)
    }

    /// Places each tensor's data after the previous one's, aligned.
    fn layout(&self) -> Result<Layout, GgufError> {
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut data_size = 0u64;
        for tensor in &self.tensors {
            offsets.push(data_size);
            let end = data_size.checked_add(tensor.data.len() as u64).and_then(|end| align_up(end, self.alignment));
            let Some(end) = end else {
                return Err(GgufError::ShapeOverflow {
                    tensor: tensor.name.clone(),
                    dims: tensor.dims.clone(),
                    ggml_type: tensor.ggml_type,
                });
            };
            data_size = end;
        }
        Ok(Layout { offsets, data_size })
    }

    fn write_io(&self, layout: &Layout, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.header_bytes(layout))?;
        self.write_data(w)
    }

    /// Magic, version, counts, metadata and tensor infos, padded to the
    /// alignment: everything before the data section.
    fn header_bytes(&self, layout: &Layout) -> Vec<u8> {
        let mut buf = Vec::new();
        buf.extend_from_slice(&GGUF_MAGIC);
        buf.extend_from_slice(&GGUF_VERSION.to_le_bytes());
        put_u64(&mut buf, self.tensors.len() as u64);
        put_u64(&mut buf, self.metadata.len() as u64);
        for (key, value) in &self.metadata {
            put_str(&mut buf, key);
            buf.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
            put_value(&mut buf, value);
        }
        for (tensor, &offset) in self.tensors.iter().zip(&layout.offsets) {
            put_str(&mut buf, &tensor.name);
            buf.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
            for &dim in &tensor.dims {
                put_u64(&mut buf, dim);
            }
            buf.extend_from_slice(&tensor.ggml_type.id().to_le_bytes());
            put_u64(&mut buf, offset);
        }
        let padding = padding_len(buf.len() as u64, self.alignment);
        buf.resize(buf.len() + padding, 0);
        buf
    }

    fn write_data(&self, w: &mut impl Write) -> io::Result<()> {
        let mut written = 0u64;
        for tensor in &self.tensors {
            w.write_all(&tensor.data)?;
            written += tensor.data.len() as u64;
            let padding = padding_len(written, self.alignment);
            write_zeros(w, padding)?;
            written += padding as u64;
        }
        Ok(())
    }
}

impl fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufWriter")
            .field("alignment", &self.alignment)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

/// Where the tensors go: offsets relative to the data section, and the
/// section's size including the padding after the last tensor.
struct Layout {
    offsets: Vec<u64>,
    data_size: u64,
}

/// The alignment as u32 if it is a power of two that fits.
fn checked_alignment(alignment: u64) -> Result<u32, GgufError> {
    match u32::try_from(alignment) {
        Ok(a) if a.is_power_of_two() => Ok(a),
        _ => Err(GgufError::InvalidAlignment { alignment }),
    }
}

/// Checks that arrays are homogeneous and not nested deeper than the reader
/// accepts.
fn check_value(key: &str, value: &MetadataValue, depth: usize) -> Result<(), GgufError> {
    let MetadataValue::Array(element_type, values) = value else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep { key: key.to_owned(), max_depth: MAX_ARRAY_DEPTH, offset: None });
    }
    for (index, element) in values.iter().enumerate() {
        if element.value_type() != *element_type {
            return Err(GgufError::MixedArray {
                key: key.to_owned(),
                expected: *element_type,
                found: element.value_type(),
                index,
            });
        }
        check_value(key, element, depth + 1)?;
    }
    Ok(())
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_u64(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

/// Encodes a value without its type tag (arrays carry their element type).
fn put_value(buf: &mut Vec<u8>, value: &MetadataValue) {
    match value {
        MetadataValue::U8(v) => buf.push(*v),
        MetadataValue::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => buf.push(u8::from(*v)),
        MetadataValue::String(s) => put_str(buf, s),
        MetadataValue::Array(element_type, values) => {
            buf.extend_from_slice(&(*element_type as u32).to_le_bytes());
            put_u64(buf, values.len() as u64);
            for element in values {
                put_value(buf, element);
            }
        }
        MetadataValue::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
    }
}

/// Zero bytes needed after `len` bytes to reach a multiple of `alignment`.
fn padding_len(len: u64, alignment: u64) -> usize {
    ((alignment - len % alignment) % alignment) as usize
}

fn write_zeros(w: &mut impl Write, mut n: usize) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while n > 0 {
        let chunk = n.min(ZEROS.len());
        w.write_all(&ZEROS[..chunk])?;
        n -= chunk;
    }
    Ok(())
}
