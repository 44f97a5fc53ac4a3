//! cuBLAS for the output head (the one dense GEMM of a step).
//!
//! libcublas is opened at run time like libcuda; a machine without it (or a
//! handle that cannot be made) keeps the head on our own kernels, and
//! [`super::GpuContext::head_impl`] says which one runs. The handle works on
//! the context's stream with a workspace of its own, so its calls can be
//! captured in CUDA graphs (cuBLAS allocates nothing while capturing then).

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::sys;

use super::{CudaError, DevBuf};

/// Workspace handed to cuBLAS (NVIDIA recommends 32 MiB on Hopper).
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

pub(crate) struct Blas {
    handle: bsys::cublasHandle_t,
    // Kept alive for the handle; dropped after it (fields drop in order).
    _workspace: DevBuf,
}

// SAFETY: the handle is only used through `&GpuContext` methods that bind
// the context first; cuBLAS handles may be used from any thread as long as
// calls on one handle do not overlap, which the context's single stream and
// `&self` launch path (one step at a time per backend) guarantee.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // cublasDestroy synchronises the whole context (see context_wide).
        let _wide = super::context_wide();
        // SAFETY: the handle was created by `Blas::new` and is destroyed once.
        let _ = unsafe { blas::destroy_handle(self.handle) };
    }
}

fn blas_err(call: &'static str) -> impl FnOnce(blas::CublasError) -> CudaError {
    move |e| CudaError::Driver { call, message: format!("{e:?}") }
}

impl Blas {
    /// A handle on `stream` using `workspace`, or why there is none.
    pub(crate) fn new(stream: sys::CUstream, workspace: DevBuf) -> Result<Self, String> {
        // SAFETY: only tries to dlopen libcublas and reports whether that worked.
        if !unsafe { bsys::is_culib_present() } {
            return Err("libcublas not found".into());
        }
        let handle = {
            let _wide = super::context_wide();
            blas::create_handle().map_err(|e| format!("cublasCreate: {e:?}"))?
        };
        let me = Self { handle, _workspace: workspace };
        // SAFETY: `handle` is live; `stream` belongs to the current context.
        unsafe { blas::set_stream(handle, stream as _) }.map_err(|e| format!("cublasSetStream: {e:?}"))?;
        // SAFETY: the workspace is a live allocation of its length, kept as
        // long as the handle (see the field).
        unsafe { bsys::cublasSetWorkspace_v2(handle, me._workspace.ptr as *mut c_void, me._workspace.len()).result() }
            .map_err(|e| format!("cublasSetWorkspace: {e:?}"))?;
        // Plain FP32 arithmetic for f32 GEMMs (no TF32 tensor ops).
        // SAFETY: `handle` is live.
        unsafe { bsys::cublasSetMathMode(handle, bsys::cublasMath_t::CUBLAS_DEFAULT_MATH).result() }
            .map_err(|e| format!("cublasSetMathMode: {e:?}"))?;
        Ok(me)
    }

    /// Column-major `C[m, n] = A^T B` with `A` `[k, m]` (a row-major `[m, k]`
    /// matrix), `B` `[k, n]`, f32 `C`, f32 accumulation. `dt` is the type of
    /// A and B. The caller has checked every pointer's range.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_tn(
        &self,
        dt: bsys::cudaDataType,
        a: u64,
        b: u64,
        c: u64,
        m: i32,
        n: i32,
        k: i32,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: `a` holds m*k, `b` k*n elements of `dt` and `c` m*n f32
        // (checked by the caller in `GpuContext::head`); alpha and beta are
        // host f32 values (the default host pointer mode) read during the call.
        unsafe {
            blas::gemm_ex(
                self.handle,
                bsys::cublasOperation_t::CUBLAS_OP_T,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast(),
                a as *const c_void,
                dt,
                k,
                b as *const c_void,
                dt,
                k,
                (&beta as *const f32).cast(),
                c as *mut c_void,
                bsys::cudaDataType::CUDA_R_32F,
                m,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err("cublasGemmEx"))
    }
}
