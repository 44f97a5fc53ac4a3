//! The GGUF reader: parses and validates the header, metadata and tensor
//! infos of a GGUF v2/v3 file (mapped, or read into memory whole or in part),
//! and hands out tensor data as zero-copy [`SharedBytes`] slices, or, for a
//! tensor [`GgufFile::read_selected`] left on disk, read from the file.
//!
//! Every count and length read from the file is checked against the bytes
//! that remain before anything is allocated for it, so a corrupt or hostile
//! file produces a [`GgufError`], never a panic or a huge allocation.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use bitnet_device::{HugePageBuffer, MappedFile};

use super::error::GgufError;
use super::types::{checked_tensor_nbytes, n_elements, GgmlType, MAX_DIMS};
use super::value::{GgufValueType, MetadataValue};
use crate::bytes::SharedBytes;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The version the writer produces.
pub const GGUF_VERSION: u32 = 3;

/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// How deeply metadata arrays may nest. The format allows arrays of arrays;
/// the limit keeps the recursive parser's stack use bounded on hostile input.
pub const MAX_ARRAY_DEPTH: usize = 32;

/// Fewest bytes one metadata entry can take: key length, value type, a u8.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// Fewest bytes one tensor info can take: name length, n_dims, one
/// dimension, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Upper bound on elements reserved ahead of parsing an array, so that a
/// large declared count costs memory only as its elements actually parse.
const MAX_PREALLOCATED_ITEMS: usize = 1 << 16;

/// Where one tensor's data lives and how to interpret it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as in the file: ne0 (the contiguous one) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Exact size of the data, from [`tensor_nbytes`](super::tensor_nbytes).
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// The number of elements (the product of the dimensions).
    pub fn n_elements(&self) -> u64 {
        // The reader and the writer both reject shapes whose product
        // overflows, so the fallback is never taken for a validated info.
        n_elements(&self.dims).unwrap_or(u64::MAX)
    }
}

/// A parsed and validated GGUF file.
///
/// Construction checks everything a consumer relies on: the header, every
/// metadata value, every tensor's type and shape, alignment, and that each
/// tensor's data lies inside the file without overlapping another's.
pub struct GgufFile {
    /// The file's bytes; for a file read in part ([`GgufFile::read_selected`])
    /// the unread tensors' ranges hold zeros and are never handed out.
    bytes: SharedBytes,
    /// For a file read in part: where to read the other tensors from.
    unread: Option<Unread>,
    path: Option<PathBuf>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// The tensors [`GgufFile::read_selected`] left on disk, and the open file
/// their data is read from when asked for.
struct Unread {
    file: Mutex<std::fs::File>,
    /// By index into [`GgufFile::tensors`]: true where the data was not read.
    tensors: Vec<bool>,
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`. Parse errors are wrapped in
    /// [`GgufError::InFile`] so that their message names the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let mapped = MappedFile::open(path)?;
        let mut file = Self::from_bytes(SharedBytes::from_mapped(mapped))
            .map_err(|inner| GgufError::InFile { path: path.to_owned(), inner: Box::new(inner) })?;
        file.path = Some(path.to_owned());
        Ok(file)
    }

    /// Reads the whole file at `path` into memory in 2 MiB pages
    /// ([`HugePageBuffer`]) and parses it: what [`crate::BitNetModel::load`]
    /// uses, so decode streams the weights from memory laid out the same way
    /// on every run. A mapping's pages are wherever the page cache holds the
    /// file, which depends on how it was read before: on the dev box the same
    /// 2b4t file decoded at 51-52 ms/token mapped against 45.7-46.2 ms from a
    /// fresh copy (docs/perf/cpu.md, session 15). The file is first mapped and
    /// parsed, so a malformed one fails before anything is allocated for its
    /// data; the mapping is dropped before the read (peak RSS stays the file's
    /// size, not twice it).
    pub fn read(path: &Path) -> Result<Self, GgufError> {
        Self::read_selected(path, |_| true)
    }

    /// [`GgufFile::read`] of the header and of the tensors `keep` accepts;
    /// the data of the others stays on disk, and [`GgufFile::tensor_data`]
    /// reads it from the file (into a fresh buffer) each time it is asked
    /// for. For data a consumer converts once and drops (norms copied to
    /// f32, TQ2_0 blocks repacked to I2_S), this keeps it out of the
    /// resident buffer, whose unread ranges are never touched and so take no
    /// memory.
    pub fn read_selected(path: &Path, keep: impl Fn(&GgufTensorInfo) -> bool) -> Result<Self, GgufError> {
        let mapped = Self::open(path)?;
        let len = mapped.bytes.len();
        let read_error = |source| GgufError::Read { path: path.to_owned(), source };
        let kept: Vec<bool> = mapped.tensors.iter().map(&keep).collect();
        // The header, then each kept tensor's data, by absolute ranges (all
        // inside the file: the parse checked them), merged where they touch.
        let all = kept.iter().all(|&k| k);
        // A file kept whole is read whole, padding and trailing bytes too.
        let header = if all { 0..len } else { 0..usize::try_from(mapped.data_offset).unwrap_or(len).min(len) };
        let mut ranges = Vec::with_capacity(mapped.tensors.len() + 1);
        ranges.push(header);
        for (info, _) in mapped.tensors.iter().zip(&kept).filter(|(_, &k)| k && !all) {
            ranges.push(mapped.range_of(info)?);
        }
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<std::ops::Range<usize>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let tensors = mapped.tensors.clone();
        drop(mapped);

        let mut buffer = HugePageBuffer::zeroed(len).map_err(read_error)?;
        let mut file = std::fs::File::open(path).map_err(read_error)?;
        let bytes = buffer.as_bytes_mut();
        for r in merged {
            file.seek(SeekFrom::Start(r.start as u64)).map_err(read_error)?;
            file.read_exact(&mut bytes[r]).map_err(read_error)?;
        }
        // The file must not have grown or shrunk since it was parsed.
        if file.metadata().map_err(read_error)?.len() != len as u64 {
            return Err(read_error(std::io::Error::other("the file changed size while it was read")));
        }
        let mut parsed = Self::from_bytes(SharedBytes::from_huge_pages(buffer))
            .map_err(|inner| GgufError::InFile { path: path.to_owned(), inner: Box::new(inner) })?;
        // The ranges read were those of the first parse: the header read
        // now must describe the same tensors.
        if parsed.tensors != tensors {
            return Err(read_error(std::io::Error::other("the file changed while it was read")));
        }
        parsed.path = Some(path.to_owned());
        if !all {
            let tensors = kept.iter().map(|&k| !k).collect();
            parsed.unread = Some(Unread { file: Mutex::new(file), tensors });
        }
        Ok(parsed)
    }

    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: SharedBytes) -> Result<Self, GgufError> {
        let header = Parser::new(&bytes).parse()?;
        Ok(Self {
            bytes,
            unread: None,
            path: None,
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            key_index: header.key_index,
            tensors: header.tensors,
            tensor_index: header.tensor_index,
        })
    }

    /// The path the file was opened from, `None` for [`GgufFile::from_bytes`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data: `general.alignment`, else 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the data section: the end of the tensor infos rounded
    /// up to the alignment. Tensor offsets are relative to it.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn file_size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The whole file, when all of it is in memory (`None` for a file
    /// [`GgufFile::read_selected`] read in part).
    pub fn bytes(&self) -> Option<&SharedBytes> {
        self.unread.is_none().then_some(&self.bytes)
    }

    /// All metadata entries, in file order.
    pub fn metadata(&self) -> &[(String, MetadataValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        let &index = self.key_index.get(key)?;
        self.metadata.get(index).map(|(_, value)| value)
    }

    fn require(&self, key: &str) -> Result<&MetadataValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { key: key.to_owned() })
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let value = self.require(key)?;
        value.as_str().ok_or_else(|| wrong_type(key, "string", value))
    }

    /// A non-negative integer value of any integer type.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let value = self.require(key)?;
        if let Some(v) = value.as_u64() {
            return Ok(v);
        }
        if value.as_i64().is_some() {
            return Err(GgufError::ValueOutOfRange {
                key: key.to_owned(),
                value: value.to_string(),
                expected: "a non-negative integer",
            });
        }
        Err(wrong_type(key, "an unsigned integer", value))
    }

    /// An integer value of any integer type that fits in i64.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        let value = self.require(key)?;
        if let Some(v) = value.as_i64() {
            return Ok(v);
        }
        if value.as_u64().is_some() {
            return Err(GgufError::ValueOutOfRange {
                key: key.to_owned(),
                value: value.to_string(),
                expected: "an integer that fits in i64",
            });
        }
        Err(wrong_type(key, "an integer", value))
    }

    /// A float value: f32, or f64 narrowed to f32. Integers are refused, since
    /// a hyperparameter stored with the wrong type usually means a wrong key.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let value = self.require(key)?;
        match *value {
            MetadataValue::F32(v) => Ok(v),
            MetadataValue::F64(v) => Ok(v as f32),
            _ => Err(wrong_type(key, "f32", value)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        let value = self.require(key)?;
        value.as_bool().ok_or_else(|| wrong_type(key, "bool", value))
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        let &index = self.tensor_index.get(name)?;
        self.tensors.get(index)
    }

    /// The exact `n_bytes` of a tensor's data, without copying.
    pub fn tensor_bytes(&self, name: &str) -> Result<SharedBytes, GgufError> {
        let info = self.tensor_info(name).ok_or_else(|| GgufError::TensorNotFound { tensor: name.to_owned() })?;
        self.tensor_data(info)
    }

    /// The data of `info`, which must describe a tensor of this file: a
    /// slice of the file's bytes, or for a tensor
    /// [`GgufFile::read_selected`] left on disk, its data read from the file.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Result<SharedBytes, GgufError> {
        let range = self.range_of(info)?;
        if let Some(unread) = &self.unread {
            let index = self.tensor_index.get(&info.name).copied();
            if index.is_some_and(|i| unread.tensors[i]) {
                let read_error = |source: std::io::Error| GgufError::Read {
                    path: self.path.clone().unwrap_or_default(),
                    source: std::io::Error::new(source.kind(), format!("tensor `{}`: {source}", info.name)),
                };
                // The range lies inside the file as parsed; a file cut
                // short since fails the read, never the allocation.
                let mut data = vec![0u8; range.len()];
                let mut file = unread.file.lock().unwrap_or_else(PoisonError::into_inner);
                file.seek(SeekFrom::Start(range.start as u64)).map_err(read_error)?;
                file.read_exact(&mut data).map_err(read_error)?;
                return Ok(SharedBytes::from_vec(data));
            }
        }
        let out_of_range = || self.out_of_range(info);
        self.bytes.slice(range).ok_or_else(out_of_range)
    }

    /// The absolute byte range of `info`'s data, checked against the file.
    fn range_of(&self, info: &GgufTensorInfo) -> Result<std::ops::Range<usize>, GgufError> {
        data_range(self.data_offset, info.offset, info.n_bytes, self.bytes.len()).ok_or_else(|| self.out_of_range(info))
    }

    fn out_of_range(&self, info: &GgufTensorInfo) -> GgufError {
        GgufError::TensorOutOfRange {
            tensor: info.name.clone(),
            offset: info.offset,
            n_bytes: info.n_bytes,
            data_offset: self.data_offset,
            file_size: self.file_size(),
        }
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("file_size", &self.file_size())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &MetadataValue) -> GgufError {
    GgufError::WrongType { key: key.to_owned(), expected, found: found.value_type() }
}

/// The absolute byte range of a tensor's data, `None` if it overflows or
/// does not end inside a file of `file_size` bytes.
fn data_range(data_offset: u64, offset: u64, n_bytes: u64, file_size: usize) -> Option<std::ops::Range<usize>> {
    let start = data_offset.checked_add(offset)?;
    let end = start.checked_add(n_bytes)?;
    if end > file_size as u64 {
        return None;
    }
    Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
}

/// Rounds `offset` up to a multiple of `alignment` (a power of two).
pub(crate) fn align_up(offset: u64, alignment: u64) -> Option<u64> {
    let mask = alignment.checked_sub(1)?;
    offset.checked_add(mask).map(|v| v & !mask)
}

/// Everything [`Parser::parse`] extracts.
struct ParsedHeader {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetadataValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// What the parser is reading, for error messages.
enum Location {
    Header,
    MetadataEntry { index: u64 },
    MetadataValue { key: String },
    TensorInfo { index: u64, name: Option<String> },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header => write!(f, "the GGUF header"),
            Self::MetadataEntry { index } => write!(f, "metadata entry #{index}"),
            Self::MetadataValue { key } => write!(f, "metadata key `{key}`"),
            Self::TensorInfo { index, name: None } => write!(f, "tensor info #{index}"),
            Self::TensorInfo { index, name: Some(name) } => write!(f, "tensor info #{index} (`{name}`)"),
        }
    }
}

/// A cursor over the file that knows where it is, for error messages.
struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    location: Location,
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0, location: Location::Header }
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn context(&self) -> String {
        self.location.to_string()
    }

    fn current_key(&self) -> String {
        match &self.location {
            Location::MetadataValue { key } => key.clone(),
            other => other.to_string(),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let Some(taken) = self.bytes.get(self.pos..).and_then(|rest| rest.get(..n)) else {
            return Err(GgufError::Truncated {
                what,
                context: self.context(),
                offset: self.offset(),
                needed: n as u64,
                file_size: self.bytes.len() as u64,
            });
        };
        self.pos += n;
        Ok(taken)
    }

    fn take_array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        let Some((head, _)) = rest.split_first_chunk::<N>() else {
            return Err(GgufError::Truncated {
                what,
                context: self.context(),
                offset: self.offset(),
                needed: N as u64,
                file_size: self.bytes.len() as u64,
            });
        };
        self.pos += N;
        Ok(*head)
    }

    fn read_u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.take_array(what).map(u32::from_le_bytes)
    }

    fn read_u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.take_array(what).map(u64::from_le_bytes)
    }

    /// Reads a u64 count of items that each take at least `min_item_bytes`,
    /// and checks that many could fit in the rest of the file.
    fn read_count(&mut self, what: &'static str, min_item_bytes: u64) -> Result<usize, GgufError> {
        let offset = self.offset();
        let count = self.read_u64(what)?;
        let available = self.remaining() as u64;
        let fits = count.checked_mul(min_item_bytes).is_some_and(|bytes| bytes <= available);
        match usize::try_from(count) {
            Ok(count) if fits => Ok(count),
            _ => Err(GgufError::LengthExceedsFile {
                what,
                context: self.context(),
                offset,
                count,
                min_item_bytes,
                available,
            }),
        }
    }

    fn read_string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.read_count(what, 1)?;
        let offset = self.offset();
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(source) => Err(GgufError::InvalidUtf8 { what, context: self.context(), offset, source }),
        }
    }

    fn parse(mut self) -> Result<ParsedHeader, GgufError> {
        let magic: [u8; 4] = self.take_array("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = self.read_u32("version")?;
        // Version 2 differs from 3 only in that 3 may be big-endian; both use
        // u64 counts. Version 1 used u32 counts and is not supported.
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let n_tensors_offset = self.offset();
        let n_tensors = self.read_u64("tensor count")?;
        let n_kv = self.read_count("metadata entry count", MIN_KV_BYTES)?;
        let available = self.remaining() as u64;
        if n_tensors.checked_mul(MIN_TENSOR_INFO_BYTES).is_none_or(|bytes| bytes > available) {
            return Err(GgufError::LengthExceedsFile {
                what: "tensor count",
                context: self.context(),
                offset: n_tensors_offset,
                count: n_tensors,
                min_item_bytes: MIN_TENSOR_INFO_BYTES,
                available,
            });
        }

        let mut metadata = Vec::with_capacity(n_kv);
        let mut key_index = HashMap::with_capacity(n_kv);
        for index in 0..n_kv as u64 {
            self.location = Location::MetadataEntry { index };
            let entry_offset = self.offset();
            let key = self.read_string("key")?;
            if key_index.contains_key(&key) {
                return Err(GgufError::DuplicateKey { key, offset: Some(entry_offset) });
            }
            self.location = Location::MetadataValue { key: key.clone() };
            let type_offset = self.offset();
            let type_id = self.read_u32("value type")?;
            let value_type = GgufValueType::from_u32(type_id).ok_or_else(|| GgufError::UnknownValueType {
                key: key.clone(),
                type_id,
                offset: type_offset,
            })?;
            let value = self.read_value(value_type, 0)?;
            key_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment_value = key_index.get(ALIGNMENT_KEY).and_then(|&i| metadata.get(i)).map(|(_, value)| value);
        let alignment = match alignment_value {
            None => DEFAULT_ALIGNMENT,
            Some(&MetadataValue::U32(v)) if v.is_power_of_two() => u64::from(v),
            Some(&MetadataValue::U32(v)) => return Err(GgufError::InvalidAlignment { alignment: u64::from(v) }),
            Some(other) => {
                return Err(GgufError::WrongType {
                    key: ALIGNMENT_KEY.to_owned(),
                    expected: "u32",
                    found: other.value_type(),
                })
            }
        };

        // n_tensors was checked against the file size above.
        let n_tensors = n_tensors as usize;
        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for index in 0..n_tensors as u64 {
            let info_offset = self.offset();
            let info = self.read_tensor_info(index, alignment)?;
            if tensor_index.contains_key(&info.name) {
                return Err(GgufError::DuplicateTensor { tensor: info.name, offset: Some(info_offset) });
            }
            tensor_index.insert(info.name.clone(), tensors.len());
            tensors.push(info);
        }

        // Header offsets fit in u64 and alignment is at most 2^31, so this
        // cannot overflow; the fallback is the file size, which every tensor
        // range check below then fails against.
        let file_size = self.bytes.len() as u64;
        let data_offset = align_up(self.offset(), alignment).unwrap_or(file_size);
        check_tensor_ranges(&tensors, data_offset, file_size)?;

        Ok(ParsedHeader { version, alignment, data_offset, metadata, key_index, tensors, tensor_index })
    }

    fn read_value(&mut self, value_type: GgufValueType, depth: usize) -> Result<MetadataValue, GgufError> {
        Ok(match value_type {
            GgufValueType::U8 => MetadataValue::U8(u8::from_le_bytes(self.take_array("u8 value")?)),
            GgufValueType::I8 => MetadataValue::I8(i8::from_le_bytes(self.take_array("i8 value")?)),
            GgufValueType::U16 => MetadataValue::U16(u16::from_le_bytes(self.take_array("u16 value")?)),
            GgufValueType::I16 => MetadataValue::I16(i16::from_le_bytes(self.take_array("i16 value")?)),
            GgufValueType::U32 => MetadataValue::U32(u32::from_le_bytes(self.take_array("u32 value")?)),
            GgufValueType::I32 => MetadataValue::I32(i32::from_le_bytes(self.take_array("i32 value")?)),
            GgufValueType::F32 => MetadataValue::F32(f32::from_le_bytes(self.take_array("f32 value")?)),
            GgufValueType::U64 => MetadataValue::U64(u64::from_le_bytes(self.take_array("u64 value")?)),
            GgufValueType::I64 => MetadataValue::I64(i64::from_le_bytes(self.take_array("i64 value")?)),
            GgufValueType::F64 => MetadataValue::F64(f64::from_le_bytes(self.take_array("f64 value")?)),
            GgufValueType::Bool => {
                let offset = self.offset();
                let [byte] = self.take_array("bool value")?;
                match byte {
                    0 => MetadataValue::Bool(false),
                    1 => MetadataValue::Bool(true),
                    _ => return Err(GgufError::InvalidBool { key: self.current_key(), byte, offset }),
                }
            }
            GgufValueType::String => MetadataValue::String(self.read_string("string value")?),
            GgufValueType::Array => self.read_array(depth)?,
        })
    }

    fn read_array(&mut self, depth: usize) -> Result<MetadataValue, GgufError> {
        let type_offset = self.offset();
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                key: self.current_key(),
                max_depth: MAX_ARRAY_DEPTH,
                offset: Some(type_offset),
            });
        }
        let type_id = self.read_u32("array element type")?;
        let element_type = GgufValueType::from_u32(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: self.current_key(),
            type_id,
            offset: type_offset,
        })?;
        let count = self.read_count("array length", min_encoded_size(element_type))?;
        let mut values = Vec::with_capacity(count.min(MAX_PREALLOCATED_ITEMS));
        for _ in 0..count {
            values.push(self.read_value(element_type, depth + 1)?);
        }
        Ok(MetadataValue::Array(element_type, values))
    }

    fn read_tensor_info(&mut self, index: u64, alignment: u64) -> Result<GgufTensorInfo, GgufError> {
        self.location = Location::TensorInfo { index, name: None };
        let name = self.read_string("tensor name")?;
        self.location = Location::TensorInfo { index, name: Some(name.clone()) };
        let n_dims_offset = self.offset();
        let n_dims = self.read_u32("dimension count")?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufError::BadDimCount {
                tensor: name,
                n_dims: u64::from(n_dims),
                offset: Some(n_dims_offset),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.read_u64("dimension")?);
        }
        let type_offset = self.offset();
        let type_id = self.read_u32("ggml type")?;
        let offset = self.read_u64("data offset")?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::UnknownGgmlType { tensor: name, type_id, offset: type_offset });
        };
        let n_bytes = checked_tensor_nbytes(&name, &dims, ggml_type)?;
        if offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor { tensor: name, offset, alignment });
        }
        Ok(GgufTensorInfo { name, dims, ggml_type, offset, n_bytes })
    }
}

/// Fewest bytes one value of `value_type` takes in the file.
fn min_encoded_size(value_type: GgufValueType) -> u64 {
    match value_type.scalar_size() {
        Some(size) => size as u64,
        // A string is at least its u64 length; an array its u32 element
        // type and u64 count.
        None if value_type == GgufValueType::String => 8,
        None => 4 + 8,
    }
}

/// Checks that every tensor's data lies inside the file and that no two
/// tensors share bytes.
fn check_tensor_ranges(tensors: &[GgufTensorInfo], data_offset: u64, file_size: u64) -> Result<(), GgufError> {
    for info in tensors {
        let end = data_offset.checked_add(info.offset).and_then(|start| start.checked_add(info.n_bytes));
        if end.is_none_or(|end| end > file_size) {
            return Err(GgufError::TensorOutOfRange {
                tensor: info.name.clone(),
                offset: info.offset,
                n_bytes: info.n_bytes,
                data_offset,
                file_size,
            });
        }
    }
    let mut by_offset: Vec<&GgufTensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|info| info.offset);
    for pair in by_offset.windows(2) {
        let [first, second] = pair else { continue };
        // In range of the file, so offset + n_bytes does not overflow.
        if first.offset + first.n_bytes > second.offset {
            return Err(GgufError::OverlappingTensors {
                first: first.name.clone(),
                first_offset: first.offset,
                first_n_bytes: first.n_bytes,
                second: second.name.clone(),
                second_offset: second.offset,
            });
        }
    }
    Ok(())
}
