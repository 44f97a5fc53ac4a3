//! The one error type of this crate: every bad length, shape or kernel request is a `KernelError`, never a panic.

/// Why a kernel call was refused. Nothing is written to the output on error,
/// except where a function's documentation says otherwise.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A buffer has the wrong length for the shape it was given with.
    #[error("{what}: expected length {expected}, found {found}")]
    LengthMismatch { what: &'static str, expected: usize, found: usize },

    /// A dimension must be a multiple of some block size.
    #[error("{what} = {value} is not a multiple of {multiple}")]
    NotMultiple { what: &'static str, value: usize, multiple: usize },

    /// A dimension is zero where the operation has no meaning for it.
    #[error("{what} must be non-zero")]
    ZeroDimension { what: &'static str },

    /// A dimension is too large for the kernel's exact arithmetic, or a
    /// product of dimensions overflows `usize`.
    #[error("{what} = {value} exceeds the maximum {max}")]
    DimensionTooLarge { what: &'static str, value: usize, max: usize },

    /// An input value is NaN or infinite where the result would be garbage.
    #[error("{what}: non-finite value {value} at index {index}")]
    NonFiniteValue { what: &'static str, index: usize, value: f32 },

    /// The requested kernel cannot run on this CPU (or this build's architecture).
    #[error("CPU kernel `{kernel}` is not available on this CPU")]
    KernelUnavailable { kernel: &'static str },

    /// `BITNET_CPU_KERNEL` (or a name passed to `CpuKernel::from_name`) names no kernel.
    #[error("unknown CPU kernel name `{name}` (expected one of: {expected})")]
    UnknownKernel { name: String, expected: &'static str },
}
