//! ggml tensor types as they appear in GGUF tensor infos, and the byte size of
//! a tensor of a given type and shape.

use std::fmt;

use super::error::GgufError;

/// The most dimensions a GGUF tensor may have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// A ggml tensor type, with its on-disk id.
///
/// Ids follow upstream ggml, except [`GgmlType::I2_S`] (36), which is
/// bitnet.cpp's ternary type; upstream ggml has retired that id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    TQ1_0,
    TQ2_0,
    I2_S,
}

/// Elements per block of the k-quants and the llama.cpp ternary types.
const QK_K: usize = 256;

/// Elements per packing block of I2_S (x86 layout, which is the file layout).
const QK_I2_S: usize = 128;

/// Bytes of the trailer after the packed I2_S weights: one f32 scale padded
/// to 32 bytes.
const I2_S_TRAILER_BYTES: u64 = 32;

impl GgmlType {
    /// Every type, in id order.
    pub const ALL: [GgmlType; 23] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q8_1,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F64,
        Self::BF16,
        Self::TQ1_0,
        Self::TQ2_0,
        Self::I2_S,
    ];

    /// The on-disk type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::I8 => 24,
            Self::I16 => 25,
            Self::I32 => 26,
            Self::I64 => 27,
            Self::F64 => 28,
            Self::BF16 => 30,
            Self::TQ1_0 => 34,
            Self::TQ2_0 => 35,
            Self::I2_S => 36,
        }
    }

    /// The type with on-disk id `id`, `None` for ids this reader does not know
    /// (including the upstream types it does not support, such as IQ2_XXS).
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|ty| ty.id() == id)
    }

    /// The name gguf-py uses for the type: "F32", "Q8_0", "I2_S", ...
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
            Self::I8 => "I8",
            Self::I16 => "I16",
            Self::I32 => "I32",
            Self::I64 => "I64",
            Self::F64 => "F64",
            Self::BF16 => "BF16",
            Self::TQ1_0 => "TQ1_0",
            Self::TQ2_0 => "TQ2_0",
            Self::I2_S => "I2_S",
        }
    }

    /// The type named `name` (as [`GgmlType::name`] spells it, any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|ty| ty.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block. For I2_S this is the 128-element packing block; its
    /// tensors additionally carry a 32-byte scale trailer (see [`tensor_nbytes`]).
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::I8 | Self::I16 | Self::I32 | Self::I64 | Self::F64 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K | Self::TQ1_0 | Self::TQ2_0 => {
                QK_K
            }
            Self::I2_S => QK_I2_S,
        }
    }

    /// Bytes per block (for I2_S, per 128-element packing block, without the
    /// per-tensor scale trailer).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::F32 | Self::I32 => 4,
            Self::F64 | Self::I64 => 8,
            // ggml-common.h: f16 scale (and f16 min / sum) then the quants.
            Self::Q4_0 => 2 + 16,
            Self::Q4_1 => 4 + 16,
            Self::Q5_0 => 2 + 4 + 16,
            Self::Q5_1 => 4 + 4 + 16,
            Self::Q8_0 => 2 + 32,
            Self::Q8_1 => 4 + 32,
            Self::Q2_K => 16 + 64 + 4,
            Self::Q3_K => 32 + 64 + 12 + 2,
            Self::Q4_K => 4 + 12 + 128,
            Self::Q5_K => 4 + 12 + 32 + 128,
            Self::Q6_K => 128 + 64 + 16 + 2,
            Self::Q8_K => 4 + 256 + 32,
            Self::TQ1_0 => 48 + 4 + 2,
            Self::TQ2_0 => 64 + 2,
            Self::I2_S => QK_I2_S / 4,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The product of `dims` (the element count), `None` on overflow of `u64`.
/// An empty shape has one element, as in ggml.
pub fn n_elements(dims: &[u64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Bytes of a tensor of type `ty` and shape `dims` (ne0, the contiguous
/// dimension, first).
///
/// `None` when the arithmetic overflows or the shape does not fit the type's
/// blocks: for block types `ne0` must be a multiple of
/// [`GgmlType::block_elems`]; for I2_S, which packs the whole tensor as one
/// flat run of 128-element blocks followed by a 32-byte scale trailer, the
/// element count must be a multiple of 128 and the size is `n / 4 + 32`.
pub fn tensor_nbytes(ty: GgmlType, dims: &[u64]) -> Option<u64> {
    let n = n_elements(dims)?;
    let block_elems = u64::try_from(ty.block_elems()).ok()?;
    let block_bytes = u64::try_from(ty.block_bytes()).ok()?;
    if ty == GgmlType::I2_S {
        if n % block_elems != 0 {
            return None;
        }
        return (n / block_elems).checked_mul(block_bytes)?.checked_add(I2_S_TRAILER_BYTES);
    }
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % block_elems != 0 {
        return None;
    }
    (n / block_elems).checked_mul(block_bytes)
}

/// Validates a tensor's shape for `ty` and returns its byte size: 1 to 4
/// dimensions, none zero, an element count that fits ggml's `i64`, and a
/// shape that fits the type's blocks. Shared by the reader and the writer so
/// the writer never produces a file the reader rejects.
pub(crate) fn checked_tensor_nbytes(tensor: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    if dims.is_empty() || dims.len() > MAX_DIMS {
        return Err(GgufError::BadDimCount { tensor: tensor.to_owned(), n_dims: dims.len() as u64, offset: None });
    }
    if let Some(index) = dims.iter().position(|&d| d == 0) {
        return Err(GgufError::ZeroDimension { tensor: tensor.to_owned(), dims: dims.to_vec(), index });
    }
    let overflow = || GgufError::ShapeOverflow { tensor: tensor.to_owned(), dims: dims.to_vec(), ggml_type: ty };
    let n = n_elements(dims).ok_or_else(overflow)?;
    if i64::try_from(n).is_err() {
        return Err(overflow());
    }
    let block_elems = ty.block_elems() as u64;
    let fits_blocks = if ty == GgmlType::I2_S { n % block_elems == 0 } else { dims[0] % block_elems == 0 };
    if !fits_blocks {
        return Err(GgufError::ShapeNotBlockMultiple { tensor: tensor.to_owned(), dims: dims.to_vec(), ggml_type: ty });
    }
    tensor_nbytes(ty, dims).ok_or_else(overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
            assert_eq!(GgmlType::from_name(ty.name()), Some(ty));
            assert_eq!(GgmlType::from_name(&ty.name().to_lowercase()), Some(ty), "names match case-insensitively");
            assert_eq!(ty.to_string(), ty.name());
        }
        let ids: Vec<u32> = GgmlType::ALL.iter().map(|t| t.id()).collect();
        assert_eq!(ids, [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 30, 34, 35, 36]);
        for unknown in [4, 5, 16, 23, 29, 31, 33, 37, 39, u32::MAX] {
            assert_eq!(GgmlType::from_id(unknown), None, "id {unknown}");
        }
        assert_eq!(GgmlType::from_name("IQ2_XXS"), None);
    }

    fn check_nbytes(ty: GgmlType, dims: &[u64], expected: Option<u64>) {
        assert_eq!(tensor_nbytes(ty, dims), expected, "{ty} {dims:?}");
    }

    #[test]
    fn known_sizes() {
        check_nbytes(GgmlType::F32, &[2560], Some(10240));
        check_nbytes(GgmlType::F16, &[2560, 128256], Some(656_670_720));
        check_nbytes(GgmlType::BF16, &[3, 5], Some(30));
        check_nbytes(GgmlType::Q8_0, &[64, 3], Some(2 * 3 * 34));
        check_nbytes(GgmlType::Q4_K, &[512, 2], Some(4 * 144));
        check_nbytes(GgmlType::Q6_K, &[256], Some(210));
        check_nbytes(GgmlType::Q8_K, &[256], Some(292));
        check_nbytes(GgmlType::Q3_K, &[256], Some(110));
        check_nbytes(GgmlType::Q5_K, &[256], Some(176));
        check_nbytes(GgmlType::Q2_K, &[256], Some(84));
        check_nbytes(GgmlType::TQ2_0, &[256, 4], Some(4 * 66));
        check_nbytes(GgmlType::TQ1_0, &[256], Some(54));
        // The official 2B-4T file: per layer q, k, v, o, gate, up, down.
        let layer: u64 =
            [[2560u64, 2560], [2560, 640], [2560, 640], [2560, 2560], [2560, 6912], [2560, 6912], [6912, 2560]]
                .iter()
                .map(|dims| tensor_nbytes(GgmlType::I2_S, dims).unwrap())
                .sum();
        assert_eq!(layer, 17_367_264);
        check_nbytes(GgmlType::I2_S, &[128], Some(64));
        // I2_S packs the whole tensor flat: only the element count matters.
        check_nbytes(GgmlType::I2_S, &[64, 2], Some(64));
    }

    #[test]
    fn misfit_and_overflow_are_none() {
        check_nbytes(GgmlType::Q8_0, &[33, 2], None);
        check_nbytes(GgmlType::Q4_K, &[128], None);
        check_nbytes(GgmlType::I2_S, &[100], None);
        check_nbytes(GgmlType::I2_S, &[64, 3], None);
        check_nbytes(GgmlType::F32, &[u64::MAX, 2], None);
        check_nbytes(GgmlType::F64, &[1 << 62], None);
        check_nbytes(GgmlType::I2_S, &[u64::MAX - 127], Some(1 << 62));
        check_nbytes(GgmlType::I8, &[u64::MAX], Some(u64::MAX));
    }
}
