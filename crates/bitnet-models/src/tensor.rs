//! The two kinds of weight a BitNet model holds: ternary projection matrices,
//! kept packed in I2_S, and float tensors (embedding, norms) kept in the dtype
//! of the file they came from.

use half::{bf16, f16};

use bitnet_quant::i2s;

use crate::bytes::SharedBytes;
use crate::error::ModelError;

/// Storage type of a float tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDType {
    F32,
    F16,
    BF16,
}

impl FloatDType {
    pub fn size_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
        }
    }
}

/// A row-major `[rows, cols]` float matrix (a vector is `[1, n]`) in its file dtype.
#[derive(Debug, Clone)]
pub struct FloatTensor {
    name: String,
    rows: usize,
    cols: usize,
    dtype: FloatDType,
    bytes: SharedBytes,
}

impl FloatTensor {
    /// Wraps little-endian bytes; the length must match exactly.
    pub fn new(
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        dtype: FloatDType,
        bytes: SharedBytes,
    ) -> Result<Self, ModelError> {
        let name = name.into();
        let expected = rows.checked_mul(cols).and_then(|n| n.checked_mul(dtype.size_bytes())).ok_or_else(|| {
            ModelError::BadShape {
                tensor: name.clone(),
                expected: "a size that fits in memory".into(),
                found: format!("[{rows}, {cols}]"),
            }
        })?;
        if bytes.len() != expected {
            return Err(ModelError::BadShape {
                tensor: name,
                expected: format!("{expected} bytes for [{rows}, {cols}] {}", dtype.name()),
                found: format!("{} bytes", bytes.len()),
            });
        }
        Ok(Self { name, rows, cols, dtype, bytes })
    }

    /// Encodes f32 values into `dtype` (rounding to nearest even).
    pub fn from_f32(
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        values: &[f32],
        dtype: FloatDType,
    ) -> Result<Self, ModelError> {
        let bytes: Vec<u8> = match dtype {
            FloatDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatDType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            FloatDType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        };
        Self::new(name, rows, cols, dtype, SharedBytes::from_vec(bytes))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn dtype(&self) -> FloatDType {
        self.dtype
    }
    pub fn bytes(&self) -> &SharedBytes {
        &self.bytes
    }

    /// Converts row `row` to f32 into `out` (`out.len() == cols`).
    ///
    /// # Panics
    /// If `row >= rows` or `out` has the wrong length: callers index with
    /// token ids already validated against the vocabulary.
    pub fn row_to_f32(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows && out.len() == self.cols, "row {row} of {}", self.name);
        let size = self.dtype.size_bytes();
        let start = row * self.cols * size;
        let src = &self.bytes[start..start + self.cols * size];
        decode_floats(self.dtype, src, out);
    }

    /// All values as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        decode_floats(self.dtype, &self.bytes, &mut out);
        out
    }

    /// All values as f32, or an error naming the first NaN or infinity
    /// (norm weights must be finite: one bad value poisons every token).
    pub fn to_finite_f32_vec(&self) -> Result<Vec<f32>, ModelError> {
        let values = self.to_f32_vec();
        match values.iter().position(|v| !v.is_finite()) {
            Some(idx) => Err(ModelError::InvalidData {
                tensor: self.name.clone(),
                detail: format!("element {idx} is {}", values[idx]),
            }),
            None => Ok(values),
        }
    }

    /// The same values in another dtype, plus the largest absolute change the
    /// conversion made (0 when lossless).
    pub fn converted(&self, dtype: FloatDType) -> Result<(Self, f32), ModelError> {
        let values = self.to_f32_vec();
        let converted = Self::from_f32(self.name.clone(), self.rows, self.cols, &values, dtype)?;
        let back = converted.to_f32_vec();
        let max_change =
            values.iter().zip(&back).map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() }).fold(0.0f32, f32::max);
        Ok((converted, max_change))
    }
}

fn decode_floats(dtype: FloatDType, src: &[u8], out: &mut [f32]) {
    match dtype {
        FloatDType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        FloatDType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        FloatDType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
}

/// A ternary `[out_features, in_features]` projection in bitnet.cpp's I2_S
/// layout: 2-bit codes in 128-element blocks, plus one f32 scale per tensor.
/// `in_features` is a multiple of 128, so each row is whole blocks.
#[derive(Debug, Clone)]
pub struct TernaryMatrix {
    name: String,
    out_features: usize,
    in_features: usize,
    /// The `out * in / 4` code bytes (without the trailing scale block).
    codes: SharedBytes,
    scale: f32,
}

impl TernaryMatrix {
    /// Wraps an I2_S tensor exactly as stored in GGUF (`n/4` code bytes, then
    /// the f32 scale and padding). Checks the size, the scale, and that no
    /// code is the unused value 3.
    pub fn from_i2s(
        name: impl Into<String>,
        out_features: usize,
        in_features: usize,
        bytes: SharedBytes,
    ) -> Result<Self, ModelError> {
        let name = name.into();
        check_ternary_shape(&name, out_features, in_features)?;
        let n = out_features * in_features;
        let scale = i2s::i2s_scale(&bytes, n).map_err(|source| ModelError::Quant { tensor: name.clone(), source })?;
        let codes = bytes.slice(0..n / 4).ok_or_else(|| ModelError::BadShape {
            tensor: name.clone(),
            expected: format!("at least {} bytes", n / 4),
            found: format!("{} bytes", bytes.len()),
        })?;
        // One vectorised pass over the codes; the search for the first
        // code 3 only when there is one.
        if codes.iter().fold(0u8, |acc, &b| acc | (b & (b >> 1))) & 0x55 != 0 {
            let byte_idx = codes.iter().position(|&b| b & (b >> 1) & 0x55 != 0).unwrap_or(0);
            return Err(ModelError::InvalidData {
                tensor: name,
                detail: format!("I2_S code 3 (unused) in byte {byte_idx}"),
            });
        }
        Self::with_scale(name, out_features, in_features, codes, scale)
    }

    /// Encodes ternary values (row-major `[out, in]`, each -1, 0 or +1) to I2_S.
    pub fn from_ternary(
        name: impl Into<String>,
        out_features: usize,
        in_features: usize,
        values: &[i8],
        scale: f32,
    ) -> Result<Self, ModelError> {
        let name = name.into();
        check_ternary_shape(&name, out_features, in_features)?;
        if values.len() != out_features * in_features {
            return Err(ModelError::BadShape {
                tensor: name,
                expected: format!("{} values for [{out_features}, {in_features}]", out_features * in_features),
                found: format!("{} values", values.len()),
            });
        }
        let bytes =
            i2s::encode_i2s(values, scale).map_err(|source| ModelError::Quant { tensor: name.clone(), source })?;
        Self::from_i2s(name, out_features, in_features, SharedBytes::from_vec(bytes))
    }

    fn with_scale(
        name: String,
        out_features: usize,
        in_features: usize,
        codes: SharedBytes,
        scale: f32,
    ) -> Result<Self, ModelError> {
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(ModelError::InvalidData {
                tensor: name,
                detail: format!("weight scale {scale} is not a finite non-negative number"),
            });
        }
        Ok(Self { name, out_features, in_features, codes, scale })
    }

    /// The same codes with the scale multiplied by `factor` (llama.cpp's
    /// separate per-tensor `.scale` tensors fold in here).
    pub fn with_scale_factor(self, factor: f32) -> Result<Self, ModelError> {
        let scale = self.scale * factor;
        Self::with_scale(self.name, self.out_features, self.in_features, self.codes, scale)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    pub fn in_features(&self) -> usize {
        self.in_features
    }
    /// Per-tensor weight scale: W_real = ternary * scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// All code bytes, row after row (`in_features / 4` bytes per row).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The I2_S code bytes of one output row.
    pub fn row_codes(&self, row: usize) -> &[u8] {
        let row_bytes = self.in_features / 4;
        &self.codes[row * row_bytes..(row + 1) * row_bytes]
    }

    /// Decodes one output row to ternary values (`out.len() == in_features`).
    pub fn decode_row(&self, row: usize, out: &mut [i8]) {
        // Codes were validated at construction and rows are whole blocks, so
        // this cannot fail; an error here would be a bug in this type.
        i2s::decode_i2s_codes_into(self.row_codes(row), out).expect("validated I2_S row");
    }

    /// All ternary values, row-major `[out, in]`.
    pub fn to_ternary(&self) -> Vec<i8> {
        let mut out = vec![0i8; self.out_features * self.in_features];
        i2s::decode_i2s_codes_into(&self.codes, &mut out).expect("validated I2_S codes");
        out
    }

    /// The tensor as stored in GGUF: codes, f32 scale, zero padding to 32 bytes.
    pub fn to_i2s_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.codes.len() + 32);
        out.extend_from_slice(&self.codes);
        out.extend_from_slice(&self.scale.to_le_bytes());
        out.resize(self.codes.len() + 32, 0);
        out
    }
}

fn check_ternary_shape(name: &str, out_features: usize, in_features: usize) -> Result<(), ModelError> {
    let ok = out_features > 0
        && in_features > 0
        && in_features % 128 == 0
        && out_features.checked_mul(in_features).is_some();
    if ok {
        return Ok(());
    }
    Err(ModelError::BadShape {
        tensor: name.to_owned(),
        expected: "a non-empty [out, in] matrix with in a multiple of 128 (I2_S blocks)".into(),
        found: format!("[{out_features}, {in_features}]"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_tensor_decodes_each_dtype() {
        let values = [1.0f32, -2.5, 0.125, 3.0, -0.0, 65504.0];
        for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
            let t = FloatTensor::from_f32("x", 2, 3, &values, dtype).unwrap();
            let mut row = [0.0; 3];
            t.row_to_f32(1, &mut row);
            // 65504 is exact in f16 and f32; bf16 rounds it to 65536.
            let last = if dtype == FloatDType::BF16 { 65536.0 } else { 65504.0 };
            assert_eq!(row, [3.0, -0.0, last], "{dtype:?}");
        }
    }

    #[test]
    fn float_tensor_rejects_wrong_length() {
        let err = FloatTensor::new("emb", 2, 3, FloatDType::F16, SharedBytes::from_vec(vec![0; 11])).unwrap_err();
        assert!(err.to_string().contains("emb"), "{err}");
    }

    #[test]
    fn conversion_reports_loss() {
        let t = FloatTensor::from_f32("x", 1, 2, &[1.0, 1.0 + 1.0 / 1024.0], FloatDType::F32).unwrap();
        let (_, lossless) = t.converted(FloatDType::F16).unwrap();
        assert_eq!(lossless, 0.0);
        let (_, lossy) = t.converted(FloatDType::BF16).unwrap();
        assert_eq!(lossy, 1.0 / 1024.0);
    }

    #[test]
    fn ternary_matrix_round_trips_and_decodes_rows() {
        let values: Vec<i8> = (0..2 * 128).map(|i| [(-1i8), 0, 1][i % 3]).collect();
        let m = TernaryMatrix::from_ternary("w", 2, 128, &values, 1.5).unwrap();
        assert_eq!(m.to_ternary(), values);
        let mut row = vec![0i8; 128];
        m.decode_row(1, &mut row);
        assert_eq!(row, values[128..]);
        assert_eq!(m.scale(), 1.5);
        let again = TernaryMatrix::from_i2s("w", 2, 128, SharedBytes::from_vec(m.to_i2s_bytes())).unwrap();
        assert_eq!(again.to_ternary(), values);
    }

    #[test]
    fn ternary_matrix_rejects_code_three_and_bad_shapes() {
        let mut bytes = TernaryMatrix::from_ternary("w", 1, 128, &[0; 128], 1.0).unwrap().to_i2s_bytes();
        bytes[5] = 0b0000_0011;
        let err = TernaryMatrix::from_i2s("blk.0.attn_q.weight", 1, 128, SharedBytes::from_vec(bytes)).unwrap_err();
        assert!(err.to_string().contains("blk.0.attn_q.weight") && err.to_string().contains("byte 5"), "{err}");
        let err = TernaryMatrix::from_ternary("w", 1, 100, &[0; 100], 1.0).unwrap_err();
        assert!(err.to_string().contains("multiple of 128"), "{err}");
        let err = TernaryMatrix::from_ternary("w", 1, 128, &[0; 128], f32::NAN).unwrap_err();
        assert!(err.to_string().contains('w'), "{err}");
    }
}
