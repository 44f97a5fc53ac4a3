//! Page-locked host memory that device-to-host copies of logits land in.
//!
//! The driver copies pageable memory through its own small staging buffers;
//! on the H200 machine's host that moved a row of 128256 f32 logits (513
//! KB) in about 0.1-0.2 ms, which a sampled request paid every token
//! (docs/perf/server-loadtest.md, session 24). [`GpuContext::read`] copies
//! reads of at least [`PINNED_MIN_BYTES`] through one buffer of this kind,
//! in pieces of at most [`PINNED_MAX_BYTES`].
//!
//! [`GpuContext::read`]: super::GpuContext::read

use std::sync::Arc;

use cudarc::driver::{result as cu, CudaContext, DriverError};

/// Reads from this size go through the page-locked buffer.
pub const PINNED_MIN_BYTES: usize = 64 << 10;

/// The buffer grows to the largest read, up to this; longer reads go
/// through it in pieces.
pub const PINNED_MAX_BYTES: usize = 32 << 20;

/// One page-locked host allocation (`cuMemHostAlloc`), freed on drop.
pub(crate) struct PinnedBuffer {
    /// Keeps the context that owns the allocation alive until it is freed.
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain host memory owned by this value alone (no
// other handle to `ptr` exists), so moving it to another thread is sound;
// GpuContext only touches it under a mutex.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocates `len` (> 0) page-locked bytes in `ctx`.
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: `ctx` is current on this thread (bound above) and `len` is
        // non-zero; flags 0 ask for plain page-locked memory. The pointer is
        // checked below before use and freed only in Drop.
        let ptr = unsafe { cu::malloc_host(len, 0) }? as *mut u8;
        if ptr.is_null() {
            return Err(DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        }
        Ok(Self { ctx: ctx.clone(), ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first `n` (<= len) bytes.
    pub(crate) fn bytes_mut(&mut self, n: usize) -> &mut [u8] {
        let n = n.min(self.len);
        // SAFETY: `ptr` points to `len` bytes allocated by cuMemHostAlloc,
        // owned by this value and alive until Drop; `n <= len`; the `&mut
        // self` borrow makes this the only reference while it lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // cuMemFreeHost may synchronise the whole context (see context_wide).
            let _wide = super::context_wide();
            // SAFETY: `ptr` came from cu::malloc_host in `new`, is not null,
            // and is freed exactly once, here; no slice of it outlives `self`.
            let _ = unsafe { cu::free_host(self.ptr as *mut std::ffi::c_void) };
        }
    }
}
