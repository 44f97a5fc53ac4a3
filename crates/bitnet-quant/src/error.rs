//! The one error type of this crate: every way a buffer, shape or value can be rejected.

/// Why an encode, decode or quantization call rejected its input.
///
/// Every variant carries enough context (element index, expected and found
/// lengths, block number) to locate the fault in a tensor without re-running.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// A count that a layout requires to be a whole number of units is not.
    #[error("{what} is {value}, which is not a multiple of {multiple}")]
    NotMultiple { what: &'static str, value: usize, multiple: usize },

    /// A dimension that must be positive is zero.
    #[error("{what} must not be zero")]
    ZeroDimension { what: &'static str },

    /// A slice argument has the wrong number of elements.
    #[error("{what}: expected {expected} elements, found {found}")]
    LengthMismatch { what: &'static str, expected: usize, found: usize },

    /// An encoded buffer has the wrong size for the element count it claims to hold.
    #[error("{format} data: expected {expected} bytes, found {found}")]
    ByteLength { format: &'static str, expected: usize, found: usize },

    /// `rows * cols` does not fit in `usize`.
    #[error("shape [{rows}, {cols}] has more elements than fit in usize")]
    ShapeOverflow { rows: usize, cols: usize },

    /// An input that must be ternary holds another value.
    #[error("element {index} is {value}, which is not ternary (-1, 0 or +1)")]
    NotTernary { index: usize, value: i8 },

    /// A 2-bit field holds the code no writer produces (3 in every format here).
    #[error("{format}: element {index} has the unused 2-bit code {code}")]
    InvalidCode { format: &'static str, index: usize, code: u8 },

    /// A scale is NaN or infinite. Per-tensor scales report block 0.
    #[error("{format}: scale of block {block} is {value}, which is not finite")]
    NonFiniteScale { format: &'static str, block: usize, value: f32 },

    /// A finite f32 scale becomes infinite when rounded to the format's f16.
    #[error("{format}: scale of block {block} is {value}, which overflows f16")]
    ScaleOutOfRange { format: &'static str, block: usize, value: f32 },

    /// A float input (weights or activations) is NaN or infinite.
    #[error("{what}: element {index} is {value}, which is not finite")]
    NonFiniteValue { what: &'static str, index: usize, value: f32 },

    /// An input that needs at least one element has none.
    #[error("{what} is empty")]
    EmptyInput { what: &'static str },

    /// Blocks holding non-zero values do not share one scale, so the tensor
    /// cannot be expressed with a single per-tensor scale.
    #[error("blocks do not share one scale: block {block} has {other}, earlier non-zero blocks have {first}")]
    NonUniformScales { first: f32, other: f32, block: usize },

    /// The public fields of a `TernaryBlocks` disagree with each other.
    #[error("inconsistent ternary blocks: {n_values} values, {n_scales} scales, {block_elems} elements per block")]
    InconsistentBlocks { n_values: usize, n_scales: usize, block_elems: usize },
}
