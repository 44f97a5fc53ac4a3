//! Hand assembly of GGUF bytes, for files the writer would refuse to make.

use crate::gguf::{GgufError, GgufFile};
use crate::SharedBytes;

/// Little-endian byte sink.
#[derive(Debug, Default, Clone)]
pub(super) struct Raw(pub(super) Vec<u8>);

impl Raw {
    pub(super) fn new() -> Self {
        Self::default()
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub(super) fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }

    pub(super) fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub(super) fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// A GGUF string: u64 length, then the bytes (which need not be UTF-8).
    pub(super) fn str(&mut self, s: impl AsRef<[u8]>) -> &mut Self {
        let s = s.as_ref();
        self.u64(s.len() as u64).bytes(s)
    }

    pub(super) fn pad_to(&mut self, alignment: usize) -> &mut Self {
        while self.0.len() % alignment != 0 {
            self.0.push(0);
        }
        self
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// GGUF value type tags.
pub(super) const T_U8: u32 = 0;
pub(super) const T_U32: u32 = 4;
pub(super) const T_F32: u32 = 6;
pub(super) const T_BOOL: u32 = 7;
pub(super) const T_STRING: u32 = 8;
pub(super) const T_ARRAY: u32 = 9;
pub(super) const T_U64: u32 = 10;

/// ggml type ids.
pub(super) const G_F32: u32 = 0;
pub(super) const G_Q8_0: u32 = 8;
pub(super) const G_I2_S: u32 = 36;

/// One metadata entry: key, type tag, and the already-encoded value.
pub(super) fn kv(key: impl AsRef<[u8]>, type_id: u32, value: &[u8]) -> Vec<u8> {
    let mut raw = Raw::new();
    raw.str(key).u32(type_id).bytes(value);
    raw.take()
}

pub(super) fn kv_u32(key: &str, v: u32) -> Vec<u8> {
    kv(key, T_U32, &v.to_le_bytes())
}

pub(super) fn kv_str(key: &str, s: &str) -> Vec<u8> {
    let mut value = Raw::new();
    value.str(s);
    kv(key, T_STRING, &value.0)
}

/// One tensor info.
pub(super) fn info(name: impl AsRef<[u8]>, dims: &[u64], type_id: u32, offset: u64) -> Vec<u8> {
    let mut raw = Raw::new();
    raw.str(name).u32(dims.len() as u32);
    for &d in dims {
        raw.u64(d);
    }
    raw.u32(type_id).u64(offset);
    raw.take()
}

/// Where the parts of a file assembled by [`assemble`] start.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// Start of each metadata entry.
    pub(super) kv_offsets: Vec<usize>,
    /// Start of each tensor info.
    pub(super) info_offsets: Vec<usize>,
    pub(super) data_offset: usize,
}

/// A version-3 file with the given entries and infos, padded to 32, then `data`.
pub(super) fn assemble(kvs: &[Vec<u8>], infos: &[Vec<u8>], data: &[u8]) -> (Vec<u8>, Layout) {
    assemble_with(3, kvs.len() as u64, infos.len() as u64, kvs, infos, data)
}

pub(super) fn assemble_with(
    version: u32,
    n_kv: u64,
    n_tensors: u64,
    kvs: &[Vec<u8>],
    infos: &[Vec<u8>],
    data: &[u8],
) -> (Vec<u8>, Layout) {
    let mut raw = Raw::new();
    raw.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
    let mut kv_offsets = Vec::new();
    for kv in kvs {
        kv_offsets.push(raw.len());
        raw.bytes(kv);
    }
    let mut info_offsets = Vec::new();
    for info in infos {
        info_offsets.push(raw.len());
        raw.bytes(info);
    }
    raw.pad_to(32);
    let data_offset = raw.len();
    raw.bytes(data);
    let layout = Layout { kv_offsets, info_offsets, data_offset };
    (raw.take(), layout)
}

pub(super) fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(SharedBytes::from_vec(bytes))
}

/// Parses `bytes`, expecting an error; returns it with its message.
pub(super) fn parse_err(bytes: Vec<u8>) -> (GgufError, String) {
    match parse(bytes) {
        Ok(file) => panic!("expected a parse error, got {file:?}"),
        Err(err) => {
            let msg = err.to_string();
            (err, msg)
        }
    }
}

/// Asserts that parsing fails with an error matching the pattern whose
/// message contains every needle.
macro_rules! check_err {
    ($bytes:expr, $pattern:pat $(if $guard:expr)?, [$($needle:expr),* $(,)?]) => {{
        let (err, msg) = $crate::gguf::tests::builder::parse_err($bytes);
        assert!(matches!(err, $pattern $(if $guard)?), "unexpected error variant: {err:?}");
        $(
            assert!(msg.contains(&*$needle), "message {msg:?} lacks {:?}", $needle);
        )*
        err
    }};
}
pub(super) use check_err;
