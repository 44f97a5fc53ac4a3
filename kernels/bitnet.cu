// BitNet b1.58 CUDA kernels.
//
// Self-contained: no CUDA headers, so NVRTC compiles this file anywhere
// (f16/bf16 conversions and tensor-core instructions are inline PTX).
// Requires sm_80 or newer (mma.sync m16n8k32 int8, m16n8k16 bf16).
//
// Precision: the embedding and head weights, q and the KV cache are held in
// the step precision T (f32, f16 or bf16); attention reads them in T. The
// head multiplies T weights by the activation split into two T parts
// (hi = T(x), lo = T(x - hi)) on tensor cores, so the activation keeps ~16
// mantissa bits. Reductions, norms, softmax, relu^2, the residual stream,
// the attention output and every accumulation are f32 (the norms' sums of
// squares f64, as on the CPU). Ternary projections take int8 activations,
// quantised per token exactly as the reference does (round half to even),
// and accumulate in int32: exact.
//
// I2_S weights stay in the file's layout: a row of K weights is K/4 bytes in
// blocks of 32 bytes / 128 weights; byte j of a block holds weights j, 32+j,
// 64+j, 96+j in bits 7:6, 5:4, 3:2, 1:0 as codes 0,1,2 = -1,0,+1.

typedef unsigned short u16;
typedef unsigned char u8;
typedef signed char i8;

// ---------------------------------------------------------------------------
// Element types

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    // Saturate instead of producing infinity: f16 activations never hold Inf.
    f = fminf(fmaxf(f, -65504.0f), 65504.0f);
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((unsigned)h) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Tensor-core products D = A B + D, m16n8k16, f32 accumulation.
__device__ __forceinline__ void mma_f16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                        unsigned b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// MMA: the type has a tensor-core product (mma m16n8k16) used by the
// attention kernels; cvt rounds f32 to T (f16 saturating), f32 widens.
struct F32 {
    typedef float T;
    static constexpr bool MMA = false;
    static __device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
    static __device__ __forceinline__ float round(float v) { return v; }
    // Four consecutive values from a 16-byte aligned address.
    static __device__ __forceinline__ float4 load4(const float* p, size_t i) { return __ldg((const float4*)(p + i)); }
};

struct F16 {
    typedef u16 T;
    static constexpr bool MMA = true;
    // Largest finite value: q * scale beyond it cannot be split into f16.
    static constexpr float MAXV = 65504.0f;
    static __device__ __forceinline__ u16 cvt(float v) { return f32_to_f16(v); }
    static __device__ __forceinline__ float f32(u16 h) { return f16_to_f32(h); }
    static __device__ __forceinline__ void mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned b0, unsigned b1) {
        mma_f16(c, a0, a1, a2, a3, b0, b1);
    }
    static __device__ __forceinline__ float load(const u16* p, size_t i) { return f16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(u16* p, size_t i, float v) { p[i] = f32_to_f16(v); }
    static __device__ __forceinline__ float round(float v) { return f16_to_f32(f32_to_f16(v)); }
    // Four consecutive values from an 8-byte aligned address.
    static __device__ __forceinline__ float4 load4(const u16* p, size_t i) {
        uint2 u = __ldg((const uint2*)(p + i));
        return make_float4(f16_to_f32((u16)(u.x & 0xffffu)), f16_to_f32((u16)(u.x >> 16)), f16_to_f32((u16)(u.y & 0xffffu)),
                           f16_to_f32((u16)(u.y >> 16)));
    }
};

struct BF16 {
    typedef u16 T;
    static constexpr bool MMA = true;
    static constexpr float MAXV = 3.0e38f;
    static __device__ __forceinline__ u16 cvt(float v) { return f32_to_bf16(v); }
    static __device__ __forceinline__ float f32(u16 h) { return bf16_to_f32(h); }
    static __device__ __forceinline__ void mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned b0, unsigned b1) {
        mma_bf16(c, a0, a1, a2, a3, b0, b1);
    }
    static __device__ __forceinline__ float load(const u16* p, size_t i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(u16* p, size_t i, float v) { p[i] = f32_to_bf16(v); }
    static __device__ __forceinline__ float round(float v) { return bf16_to_f32(f32_to_bf16(v)); }
    // Four consecutive values from an 8-byte aligned address.
    static __device__ __forceinline__ float4 load4(const u16* p, size_t i) {
        uint2 u = __ldg((const uint2*)(p + i));
        return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                           __uint_as_float(u.y & 0xffff0000u));
    }
};

// ---------------------------------------------------------------------------
// Block reductions (blockDim.x a multiple of 32, at most 1024)

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_sum_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ int warp_sum_i(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Each reduction uses its own shared slot array so consecutive calls need
// only the barriers inside.
__device__ double block_sum_d(double v, double* slots) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int i = 0; i < nw; i++) r += slots[i];  // fixed order: deterministic
    __syncthreads();
    return r;
}
__device__ float block_sum_f(float v, float* slots) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_f(v);
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    float r = 0.0f;
    for (int i = 0; i < nw; i++) r += slots[i];
    __syncthreads();
    return r;
}
__device__ float block_max_f(float v, float* slots) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max_f(v);
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    float r = slots[0];
    for (int i = 1; i < nw; i++) r = fmaxf(r, slots[i]);
    __syncthreads();
    return r;
}
__device__ int block_sum_i(int v, int* slots) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_i(v);
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    int r = 0;
    for (int i = 0; i < nw; i++) r += slots[i];
    __syncthreads();
    return r;
}

// Error flags, read back by the host with the step's results.
#define FLAG_NONFINITE 1

// ---------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+; the host sets the launch attribute).
// pdl_trigger lets the next kernel of the stream start launching (its blocks
// become resident and run up to their pdl_wait); pdl_wait blocks until every
// earlier kernel has completed and its memory is visible. Every kernel calls
// pdl_wait before it touches memory an earlier kernel writes or reads, so
// the order of the stream is kept; only weights (never written during a
// step) may be touched before it. Without the attribute, or before sm_90,
// both are no-ops.

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_begin() {
    pdl_trigger();
    pdl_wait();
}

// Starts fetching [p, p + len) into L2 (weights: safe before pdl_wait), by
// threads tid of nt.
__device__ __forceinline__ void prefetch_l2(const u8* p, size_t len, int tid, int nt) {
    for (size_t off = (size_t)tid * 128; off < len; off += (size_t)nt * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off));
}

// Loads of data other CTAs of the same (persistent) kernel write: from L2,
// never through the non-coherent or L1 paths. Volatile so no load moves
// across a grid barrier.
__device__ __forceinline__ float ldcg_f(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// ldcg_f of the float OFF bytes past p if `in`, else 0, without a branch,
// so a group of them shares one address register and the compiler keeps
// them together (with a branch or an address of its own per load, ptxas
// placed each load's uses right behind it: one round trip per load).
template <int OFF>
__device__ __forceinline__ float ldcg_f_if(const float* p, bool in) {
    float v;
    asm volatile(
        "{\n\t.reg .pred q;\n\tsetp.ne.u32 q, %2, 0;\n\tmov.f32 %0, 0f00000000;\n\t@q ld.global.cg.f32 %0, [%1+%3];\n\t}"
        : "=f"(v)
        : "l"(p), "r"((unsigned)in), "n"(OFF));
    return v;
}

// A float activation: plainly, or (CG) from L2 as above.
template <bool CG>
__device__ __forceinline__ float ld_act(const float* p) {
    return CG ? ldcg_f(p) : *p;
}

// Eight int8 activations (8-byte aligned): through the read-only path, or
// (FUSED) plainly, as they may sit in shared memory.
template <bool FUSED>
__device__ __forceinline__ uint2 ld_act8(const i8* p) {
    return FUSED ? *(const uint2*)p : __ldg((const uint2*)p);
}

// ---------------------------------------------------------------------------
// Precision conversion: out[i] = (To) in[i]

template <class From, class To>
__device__ void convert_impl(const typename From::T* in, typename To::T* out, size_t n) {
    pdl_begin();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride) To::store(out, i, From::load(in, i));
}

#define CONVERT(NAME, FROM, TO)                                                                        \
    extern "C" __global__ void NAME(const FROM::T* in, TO::T* out, unsigned long long n) {            \
        convert_impl<FROM, TO>(in, out, (size_t)n);                                                    \
    }
CONVERT(convert_f32_f32, F32, F32)
CONVERT(convert_f32_f16, F32, F16)
CONVERT(convert_f32_bf16, F32, BF16)
CONVERT(convert_f16_f32, F16, F32)
CONVERT(convert_f16_f16, F16, F16)
CONVERT(convert_f16_bf16, F16, BF16)
CONVERT(convert_bf16_f32, BF16, F32)
CONVERT(convert_bf16_f16, BF16, F16)
CONVERT(convert_bf16_bf16, BF16, BF16)

// ---------------------------------------------------------------------------
// Embedding gather: x[r, :] = emb[tokens[r], :] (f32 residual stream).
// grid (rows), block any.

template <class P>
__device__ void embed_impl(const typename P::T* emb, const int* tokens, float* x, int hidden) {
    pdl_begin();
    int r = blockIdx.x;
    size_t src = (size_t)tokens[r] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(size_t)r * hidden + i] = P::load(emb, src + i);
}

#define EMBED(NAME, P)                                                                                 \
    extern "C" __global__ void NAME(const P::T* emb, const int* tokens, float* x, int hidden) {       \
        embed_impl<P>(emb, tokens, x, hidden);                                                         \
    }
EMBED(embed_f32, F32)
EMBED(embed_f16, F16)
EMBED(embed_bf16, BF16)

// ---------------------------------------------------------------------------
// The norms' per-element arithmetic without conversion instructions, which
// sm_90 issues at 16 per clock and SM (an eighth of f32 arithmetic): a norm
// of 2560 values in both CTAs of an SM took three conversions a value for
// x * inv in f64 and two (rint, float to int) for the quantisation.
// NORM_CVT 0 (a developer build) restores those conversions.
#ifndef NORM_CVT
#define NORM_CVT 1
#endif

// clamp(rint(t), -128, 127) as an int: clamping first to the integer bounds
// gives the same result (rounding is monotonic), and adding 1.5 * 2^23 to a
// value of [-128, 127] leaves it in [2^23, 2^24), whose spacing is 1, so the
// f32 addition rounds it to the nearest integer, ties to even, as rint does;
// its bits less those of 1.5 * 2^23 are that integer. NaN clamps to -128,
// as before (fmaxf returns the other operand).
__device__ __forceinline__ int quant_i8(float t) {
#if NORM_CVT
    float c = fminf(fmaxf(t, -128.0f), 127.0f);
    return __float_as_int(__fadd_rn(c, 12582912.0f)) - 0x4B400000;
#else
    return (int)fminf(fmaxf(rintf(t), -128.0f), 127.0f);
#endif
}

// An f64 factor held as ih + il (ih = (float)inv, il = (float)(inv - ih)).
struct InvF64 {
    double d;
    float hi, lo;
};
__device__ __forceinline__ InvF64 inv_split(double inv) {
    InvF64 r;
    r.d = inv;
    r.hi = (float)inv;
    r.lo = (float)(inv - (double)r.hi);
    return r;
}

// (float)((double)x * inv), the CPU's normalisation, in f32 arithmetic: x *
// ih exactly as ph + pl (pl by FMA), plus x * il, rounded once. The sum is
// within about 2^-48 of x * inv, so the result differs from the f64 form's
// only where x * inv lies that close to the midpoint of two floats.
__device__ __forceinline__ float mul_inv(float x, const InvF64& inv) {
#if NORM_CVT
    float ph = __fmul_rn(x, inv.hi);
    float pl = __fmaf_rn(x, inv.hi, -ph);
    return __fadd_rn(ph, __fmaf_rn(x, inv.lo, pl));
#else
    return (float)((double)x * inv.d);
#endif
}

// NORM_2PASS 1: v = (x * w) * inv instead of the CPU's (x * inv) * w (each
// a correctly rounded f32 step of the same real value; they can differ in
// the last bit). Then max |v| = mul_inv(max |x w|, inv) exactly (mul_inv
// is odd and monotonic in x), found in the pass that sums the squares: one
// pass and one CTA reduction fewer. NORM_2PASS 0 (a developer build) keeps
// the three passes of the CPU's order.
#ifndef NORM_2PASS
#define NORM_2PASS 1
#endif

// max(a, b), NaN if either is (a non-finite x w must reach the check).
__device__ __forceinline__ float fmax_nan(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// ---------------------------------------------------------------------------
// RMSNorm, then per-token int8 quantisation (BitLinear's input).
//
// v = (x * w) * inv (NORM_2PASS; the CPU: (x * inv) * w) with inv = 1 /
// sqrt(mean(x^2) + eps) in f64, as the CPU (the product by mul_inv);
// s = (1 / max(max|v|, 1e-5)) * 127; q = clamp(rint(v * s), -128, 127)
// (quant_i8).
// Writes q [rows, width], scale[r] = s and qsum[r] = sum q (the I2_S code
// offset: codes are t + 1). Input f32 in every precision: the values go
// straight to int8, and rounding them to f16/bf16 first would only move
// int8 rounding boundaries. grid (rows), block 256.

// Rows up to 256 * RQ_CACHE values are held in registers (one read of x);
// longer rows are read three times.
#define RQ_CACHE 32

// One row, by a whole block (the thread mapping fixes the order of the
// sums). Rows up to blockDim.x * CACHE values are read once into registers,
// longer ones three times (same results). Thread 0 writes *scale and *qsum.
// Calls pdl_wait() before it reads x (w may be read earlier).
template <int CACHE>
__device__ void norm_quant_row(const float* x, const float* w, float eps, int width, i8* q, float* scale, int* qsum,
                               int* flags, double* dslots, float* fslots, int* islots) {
    bool cached = CACHE > 0 && width <= (int)blockDim.x * CACHE;
    float xv[CACHE > 0 ? CACHE : 1], wv[CACHE > 0 ? CACHE : 1];
    double ss = 0.0;
    float mxw = 0.0f;  // NORM_2PASS: max |x w| (NaN or inf if any x w is)
    if (cached) {
        // The norm weights (never written during a step) are loaded before
        // waiting for the previous kernel, not after the first reduction.
#pragma unroll
        for (int j = 0; j < CACHE; j++) {
            int i = threadIdx.x + j * blockDim.x;
            wv[j] = i < width ? __ldg(w + i) : 0.0f;
        }
        pdl_wait();
#pragma unroll
        for (int j = 0; j < CACHE; j++) {
            int i = threadIdx.x + j * blockDim.x;
            xv[j] = i < width ? x[i] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < CACHE; j++) {
            ss += (double)xv[j] * (double)xv[j];
            if (NORM_2PASS) mxw = fmax_nan(mxw, fabsf(__fmul_rn(xv[j], wv[j])));
        }
    } else {
        pdl_wait();
        for (int i = threadIdx.x; i < width; i += blockDim.x) {
            float xi = x[i];
            double v = (double)xi;
            ss += v * v;
            if (NORM_2PASS) mxw = fmax_nan(mxw, fabsf(__fmul_rn(xi, w[i])));
        }
    }
    ss = block_sum_d(ss, dslots);
    InvF64 inv = inv_split(1.0 / sqrt(ss / (double)width + (double)eps));
    float amax = 0.0f;
    if (NORM_2PASS) {
        amax = block_max_f(isfinite(mxw) ? mxw : __int_as_float(0x7f800000), fslots);
        amax = mul_inv(amax, inv);  // = max |v|; inf or NaN if any v is not finite
    } else {
        bool finite = true;
        if (cached) {
#pragma unroll
            for (int j = 0; j < CACHE; j++) {
                int i = threadIdx.x + j * blockDim.x;
                if (i < width) {
                    xv[j] = __fmul_rn(mul_inv(xv[j], inv), wv[j]);
                    finite = finite && isfinite(xv[j]);
                    amax = fmaxf(amax, fabsf(xv[j]));
                }
            }
        } else {
            for (int i = threadIdx.x; i < width; i += blockDim.x) {
                float v = __fmul_rn(mul_inv(x[i], inv), w[i]);
                finite = finite && isfinite(v);
                amax = fmaxf(amax, fabsf(v));
            }
        }
        amax = block_max_f(finite ? amax : __int_as_float(0x7f800000), fslots);
    }
    if (!isfinite(amax)) {
        if (threadIdx.x == 0) atomicOr(flags, FLAG_NONFINITE);
        amax = 1.0f;
    }
    float s = __fmul_rn(__fdiv_rn(1.0f, fmaxf(amax, 1e-5f)), 127.0f);
    int sum = 0;
    if (cached) {
#pragma unroll
        for (int j = 0; j < CACHE; j++) {
            int i = threadIdx.x + j * blockDim.x;
            if (i < width) {
                float v = NORM_2PASS ? mul_inv(__fmul_rn(xv[j], wv[j]), inv) : xv[j];
                int qi = quant_i8(__fmul_rn(v, s));
                q[i] = (i8)qi;
                sum += qi;
            }
        }
    } else {
        for (int i = threadIdx.x; i < width; i += blockDim.x) {
            float v = NORM_2PASS ? mul_inv(__fmul_rn(x[i], w[i]), inv) : __fmul_rn(mul_inv(x[i], inv), w[i]);
            int qi = quant_i8(__fmul_rn(v, s));
            q[i] = (i8)qi;
            sum += qi;
        }
    }
    sum = block_sum_i(sum, islots);
    if (threadIdx.x == 0) {
        *scale = s;
        *qsum = sum;
    }
}

extern "C" __global__ void __launch_bounds__(256) rmsnorm_quant_f32(const float* x, const float* w, float eps,
                                                                    int width, i8* q, float* scale, int* qsum,
                                                                    int* flags) {
    __shared__ double dslots[32];
    __shared__ float fslots[32];
    __shared__ int islots[32];
    pdl_trigger();  // norm_quant_row waits (pdl_wait) once it has the norm weights
    int r = blockIdx.x;
    size_t base = (size_t)r * width;
    norm_quant_row<RQ_CACHE>(x + base, w, eps, width, q + base, scale + r, qsum + r, flags, dslots, fslots, islots);
}

// Final norm before the head: v = rmsnorm(x[rows[e], :]) in f32, written as
// out[e, :] = T(v) for f32 and, for f16/bf16, as two rows: out[2e, :] = hi =
// T(v) and out[2e + 1, :] = lo = T(v - hi) (the head adds both products).
// grid (entries), block 256.
template <class P>
__device__ void final_norm_impl(const float* x, const int* rows, int entries, const float* w, float eps, int width,
                                typename P::T* out, bool split) {
    __shared__ double dslots[32];
    pdl_begin();
    int e = blockIdx.x;
    size_t base = (size_t)rows[e] * width;
    double ss = 0.0;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        double v = (double)x[base + i];
        ss += v * v;
    }
    ss = block_sum_d(ss, dslots);
    double inv = 1.0 / sqrt(ss / (double)width + (double)eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = (float)((double)x[base + i] * inv) * w[i];
        if (split) {
            P::store(out, (size_t)(2 * e) * width + i, v);
            P::store(out, (size_t)(2 * e + 1) * width + i, v - P::round(v));
        } else {
            P::store(out, (size_t)e * width + i, v);
        }
    }
}

#define FINAL_NORM(NAME, P, SPLIT)                                                                     \
    extern "C" __global__ void NAME(const float* x, const int* rows, int entries, const float* w, float eps, \
                                    int width, P::T* out) {                                            \
        final_norm_impl<P>(x, rows, entries, w, eps, width, out, SPLIT);                               \
    }
FINAL_NORM(final_norm_f32, F32, false)
FINAL_NORM(final_norm_f16, F16, true)
FINAL_NORM(final_norm_bf16, BF16, true)

// ---------------------------------------------------------------------------
// Ternary (I2_S) x int8 matrix product on tensor cores (mma m16n8k32 s8).
//
// out[t, n] = (sum_k code[n, k] * q[t, k] - qsum[t]) * (w_scale(n) / s[t])
//
// A = weight codes (16 rows per warp), B = activations (8 tokens per mma).
// The k order inside one mma is permuted identically for A and B (the dot
// product does not care): lane (g, t) takes bytes 8t..8t+7 of a 32-byte
// block row, i.e. weights {8t..8t+3} and {8t+4..8t+7} at one 2-bit shift, and
// the activations at the same positions. Shift 6-2c selects sub-block c.
//
// CTA: 8 warps = TILES row tiles of 16 x KSPLIT warps splitting K (modes 0
// and 1: 1 x 8; gate/up: 2 x 4); the partial sums are added in shared memory
// in a fixed order (deterministic). Each warp loads the weights of up to
// MM_PREFETCH blocks before multiplying, so many loads are in flight.
// grid (ceil(rows / (16 * TILES)) or rows / 16 for gate/up, ceil(tokens / 32)).
//
// Modes: 0 store f32, 1 add into f32 (the residual stream),
//        2 gate/up: tiles 0 .. TILES/2 - 1 = gate rows, the others the up
//          rows of the same indices (2 x 4 in the kernels; 4 x 2, 32 rows
//          per CTA, in the fused decode kernel);
//          out = relu(gate)^2 * up in f32 (never overflows).
// Products use __fmul_rn so no FMA contraction changes their rounding: the
// results equal the CPU's bit for bit.

// FUSED_SUBTRACE 1 (a developer build): with BITNET_CUDA_FUSED_TRACE=1 the
// fused kernel's CTA 0 also records clock64() at 12 points of each stage of
// every layer (after the trace's 19 entries per layer: 60 per layer, then
// the start and end as globaltimer / clock64 pairs), which
// BITNET_CUDA_FUSED_TRACE_DUMP writes out (docs/perf/tools/fused_subtrace.py
// reads them). The points of a projection stage: 0 start, 1 weight prefetch
// issued, 2 norm rows loaded and squared, 3 sum of squares reduced, 4 absmax
// reduced, 5 quantised and summed, 6 norm done, 7 thread 0's warp done with
// its products, 8 partial sums in shared memory, 9 outputs written, 10 next
// norm weights staged, 11 barrier left; the attention stage records 0, 10
// and 11, and for its first unit in CTA 0: 1 q (and k, v) rotated, 2 q
// built for the tensor cores, 3 thread 0's warp done with its positions, 4
// the unit's warps merged (tensor cores), 5 the unit's part written, 6
// after the fence, 7 after the completion counter, 8 after the combine (a
// unit that combines). Off (the default), SUBT compiles to nothing.
#ifndef FUSED_SUBTRACE
#define FUSED_SUBTRACE 0
#endif
#ifndef FUSED_SUBTRACE_LAST
#define FUSED_SUBTRACE_LAST 0
#endif
// FUSED_UNITTRACE 1 (with FUSED_SUBTRACE 1): every tensor-core attention
// unit u < FUSED_UT_UNITS of the first quarters of the CTAs records its own
// 12 entries per layer after the sub-stage clocks (layer-major): clock64 at
// its points 0-8 (0 its start, the rest as above), globaltimer at its start
// (9) and end (10, bit 63 set if it combined), and its CTA | covers << 16 |
// writer << 17 (11) (docs/perf/tools/fused_unittrace.py reads them).
#ifndef FUSED_UNITTRACE
#define FUSED_UNITTRACE 0
#endif
#define FUSED_UT_UNITS 128
#if FUSED_SUBTRACE
#define SUBT(P, i) do { if ((P) && threadIdx.x == 0) (P)[i] = clock64(); } while (0)
#else
#define SUBT(P, i) do { } while (0)
#endif
#define MM_WARPS 8
#define MM_TOKENS 32
#define MM_PREFETCH 4

__device__ __forceinline__ void mma_s8(int* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                       unsigned b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Rows of weights unit `bx` of a ternary product multiplies (its first row
// and count; MODE 2 takes as many rows of w1).
template <int MODE, int TILES>
__device__ __forceinline__ void ternary_unit_rows(int bx, int n_rows, int* first, int* count) {
    // MODE 2: TILES / 2 row tiles of each of the two matrices.
    const int rows = MODE == 2 ? TILES / 2 * 16 : TILES * 16;
    *first = bx * rows;
    *count = min(rows, n_rows - *first);
}

// Starts pulling the weight rows of unit bx (contiguous, never written)
// into L2, by threads tid of nt.
template <int MODE, int TILES>
__device__ __forceinline__ void ternary_unit_prefetch(int bx, const u8* w0, const u8* w1, int n_rows, int k, int tid,
                                                      int nt) {
    size_t row_bytes = (size_t)(k >> 2);
    int first, nr;
    ternary_unit_rows<MODE, TILES>(bx, n_rows, &first, &nr);
    if (nr <= 0) return;
    prefetch_l2(w0 + (size_t)first * row_bytes, (size_t)nr * row_bytes, tid, nt);
    if (MODE == 2) prefetch_l2(w1 + (size_t)first * row_bytes, (size_t)nr * row_bytes, tid, nt);
}

// Barrier of MM_WARPS * 32 threads: the CTA's (id 0: every CTA that runs
// ternary_tile but the fused kernel's has that many) or a named one (the
// fused kernel's CTAs of two halves).
__device__ __forceinline__ void tile_sync(int id) {
    if (id == 0)
        __syncthreads();
    else
        asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(MM_WARPS * 32) : "memory");
}

// One unit (bx, tokens tok_base .. tok_base + TOK) of a ternary product, by
// MM_WARPS * 32 threads (the CTA, or in the fused kernel half of it:
// threads threadIdx.x % (MM_WARPS * 32), synchronised by tile_sync(bar));
// red is shared [MM_WARPS][16 * TOK]. FUSED: the activations
// (act, act_scale, act_sum) may live in shared memory (plain loads), and
// the added-into output is read from L2 (other CTAs of the persistent
// kernel write it). BATCH: any number of token tiles (the per-operation
// kernels); otherwise TOK == 8, one token tile (the fused decode kernel).
// RT (BATCH only): each warp multiplies RT row tiles of 16 rows with every
// activation fragment it loads, so a CTA holds TILES * RT row tiles and red
// is [MM_WARPS][RT][16 * TOK].
template <int MODE, int TILES, int KSPLIT, bool BATCH, int TOK, bool FUSED, int RT = 1>
__device__ void ternary_tile(int bx, int tok_base, int* red, const u8* __restrict__ w0, const u8* __restrict__ w1,
                             int n_rows, int k, float s0, float s1, float s2, int seg1, int seg2,
                             const i8* __restrict__ act, const float* __restrict__ act_scale,
                             const int* __restrict__ act_sum, int n_tok, float* __restrict__ out, int ld_out,
                             unsigned long long* st = nullptr, int bar = 0) {
    static_assert(BATCH || TOK == 8, "the one-token-tile path (not BATCH) is for one tile of 8 tokens");
    const int tid = threadIdx.x % (MM_WARPS * 32);
    static_assert(BATCH || RT == 1, "several row tiles per warp only in the batch path");
    static_assert(RT == 1 || RT == 2, "one or two row tiles per warp (p0 .. p3 below)");
    int warp = tid >> 5, lane = tid & 31;
    int g = lane >> 2, t = lane & 3;
    int tile = warp / KSPLIT, kpart = warp % KSPLIT;
    // MODE 2: tiles 0 .. GH - 1 take gate rows, GH .. TILES - 1 the same up
    // rows. Warp tile `tile` covers the CTA's row tiles tile * RT .. + RT - 1
    // (MODE 2: gate tiles below GH * RT, then the up tiles of the same rows).
    const int GH = MODE == 2 ? TILES / 2 : TILES;
    const int GR = GH * RT;  // row tiles of one matrix per CTA
    int row_base = MODE == 2 ? (bx * GR + (tile % GH) * RT) * 16 : (bx * TILES * RT + tile * RT) * 16;
    const u8* w = (MODE == 2 && tile >= GH) ? w1 : w0;
    int ntiles = min(TOK / 8, (n_tok - tok_base + 7) / 8);
    // FUSED add: when the epilogue is one entry per thread, its read of the
    // output (from L2) is issued now, overlapping the products.
    const bool early = FUSED && MODE == 1 && TILES * 16 * TOK <= MM_WARPS * 32;
    float prev = 0.0f;
    if (early && tid < TILES * 16 * TOK) {
        int rl = tid % (TILES * 16), tl = tid / (TILES * 16);
        int row = bx * TILES * 16 + rl, tok = tok_base + tl;
        if (row < n_rows && tok < n_tok) prev = ldcg_f(out + (size_t)tok * ld_out + row);
    }
    int acc[RT][TOK / 8][4];
#pragma unroll
    for (int j = 0; j < RT; j++)
#pragma unroll
        for (int i = 0; i < TOK / 8; i++) acc[j][i][0] = acc[j][i][1] = acc[j][i][2] = acc[j][i][3] = 0;
    // Not BATCH (TOK == 8, one token tile): one accumulator per sub-block.
    int acc1[4][4];
#pragma unroll
    for (int c = 0; c < 4; c++) acc1[c][0] = acc1[c][1] = acc1[c][2] = acc1[c][3] = 0;

    int nblk = k >> 7;
    size_t row_bytes = (size_t)(k >> 2);
    int r0 = row_base + g, r1 = row_base + g + 8;
    bool v0 = r0 < n_rows, v1 = r1 < n_rows;
    const u8* p0 = w + (size_t)(v0 ? r0 : 0) * row_bytes + 8 * t;
    const u8* p1 = w + (size_t)(v1 ? r1 : 0) * row_bytes + 8 * t;
    // RT == 2: the warp's second row tile.
    int r2 = r0 + 16, r3 = r1 + 16;
    bool v2 = RT > 1 && r2 < n_rows, v3 = RT > 1 && r3 < n_rows;
    const u8* p2 = RT > 1 ? w + (size_t)(v2 ? r2 : 0) * row_bytes + 8 * t : p0;
    const u8* p3 = RT > 1 ? w + (size_t)(v3 ? r3 : 0) * row_bytes + 8 * t : p1;
    // Activation pointers of this lane's token in each token tile.
    const i8* pa[TOK / 8];
    bool va[TOK / 8];
#pragma unroll
    for (int nt = 0; nt < TOK / 8; nt++) {
        int tok = tok_base + nt * 8 + g;
        va[nt] = tok < n_tok;
        pa[nt] = act + (size_t)(va[nt] ? tok : 0) * k + 8 * t;
    }

    // This warp's blocks: kpart, kpart + KSPLIT, ...
    for (int b0 = kpart; b0 < nblk; b0 += KSPLIT * MM_PREFETCH) {
        uint2 wa[RT][MM_PREFETCH], wb[RT][MM_PREFETCH];
#pragma unroll
        for (int i = 0; i < MM_PREFETCH; i++) {
            int b = b0 + i * KSPLIT;
            bool in = b < nblk;
            wa[0][i] = (in && v0) ? __ldg((const uint2*)(p0 + (size_t)b * 32)) : make_uint2(0u, 0u);
            wb[0][i] = (in && v1) ? __ldg((const uint2*)(p1 + (size_t)b * 32)) : make_uint2(0u, 0u);
            if (RT > 1) {
                wa[RT - 1][i] = (in && v2) ? __ldg((const uint2*)(p2 + (size_t)b * 32)) : make_uint2(0u, 0u);
                wb[RT - 1][i] = (in && v3) ? __ldg((const uint2*)(p3 + (size_t)b * 32)) : make_uint2(0u, 0u);
            }
        }
        // One token tile from global memory (the _1 kernels): every
        // activation fragment of the round's blocks before the first
        // product. (In the fused kernel, whose activations sit in shared
        // memory, this measured 3-4% slower at batch 1: loaded per block.)
        constexpr bool HOIST = !BATCH && !FUSED;
        uint2 bvh[HOIST ? MM_PREFETCH : 1][4];
        if (HOIST) {
#pragma unroll
            for (int i = 0; i < MM_PREFETCH; i++)
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    int b = b0 + i * KSPLIT;
                    bvh[i][c] = (b < nblk && va[0]) ? ld_act8<FUSED>(pa[0] + (size_t)b * 128 + 32 * c)
                                                     : make_uint2(0u, 0u);
                }
        }
#pragma unroll
        for (int i = 0; i < MM_PREFETCH; i++) {
            int b = b0 + i * KSPLIT;
            if (b >= nblk) break;
            if (BATCH) {
                // Many tokens: every activation fragment of the block is
                // loaded before the first product (16 loads in flight).
                uint2 bv[4][TOK / 8];
#pragma unroll
                for (int c = 0; c < 4; c++)
#pragma unroll
                    for (int nt = 0; nt < TOK / 8; nt++)
                        bv[c][nt] = (nt < ntiles && va[nt]) ? ld_act8<FUSED>(pa[nt] + (size_t)b * 128 + 32 * c)
                                                            : make_uint2(0u, 0u);
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    int shift = 6 - 2 * c;
#pragma unroll
                    for (int j = 0; j < RT; j++) {
                        unsigned a0 = (wa[j][i].x >> shift) & 0x03030303u;
                        unsigned a1 = (wb[j][i].x >> shift) & 0x03030303u;
                        unsigned a2 = (wa[j][i].y >> shift) & 0x03030303u;
                        unsigned a3 = (wb[j][i].y >> shift) & 0x03030303u;
#pragma unroll
                        for (int nt = 0; nt < TOK / 8; nt++)
                            if (nt < ntiles) mma_s8(acc[j][nt], a0, a1, a2, a3, bv[c][nt].x, bv[c][nt].y);
                    }
                }
                continue;
            }
            // One token tile (the fused kernel): the block's four
            // activation fragments are loaded before its products, and each
            // sub-block c adds into its own accumulator, so the warp's IMMAs
            // form four short dependency chains instead of one long one
            // (integer sums: exact in any order).
            uint2 bv[4];
#pragma unroll
            for (int c = 0; c < 4; c++)
                bv[c] = HOIST ? bvh[HOIST ? i : 0][c]
                              : (va[0] ? ld_act8<FUSED>(pa[0] + (size_t)b * 128 + 32 * c) : make_uint2(0u, 0u));
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int shift = 6 - 2 * c;
                unsigned a0 = (wa[0][i].x >> shift) & 0x03030303u;
                unsigned a1 = (wb[0][i].x >> shift) & 0x03030303u;
                unsigned a2 = (wa[0][i].y >> shift) & 0x03030303u;
                unsigned a3 = (wb[0][i].y >> shift) & 0x03030303u;
                mma_s8(acc1[c], a0, a1, a2, a3, bv[c].x, bv[c].y);
            }
        }
    }

    if (!BATCH) {
#pragma unroll
        for (int j = 0; j < 4; j++) acc[0][0][j] = (acc1[0][j] + acc1[1][j]) + (acc1[2][j] + acc1[3][j]);
    }
    SUBT(st, 7);
    // Partial sums to shared memory: slot (row tile tile * RT + j, kpart),
    // red[slot * 16 * TOK + token * 16 + row]; with RT == 1 the slot is the
    // warp.
#pragma unroll
    for (int j = 0; j < RT; j++)
#pragma unroll
        for (int nt = 0; nt < TOK / 8; nt++) {
            int tl = nt * 8 + 2 * t;
            int slot = RT == 1 ? warp : (tile * RT + j) * KSPLIT + kpart;
            red[slot * 16 * TOK + tl * 16 + g] = acc[j][nt][0];
            red[slot * 16 * TOK + (tl + 1) * 16 + g] = acc[j][nt][1];
            red[slot * 16 * TOK + tl * 16 + g + 8] = acc[j][nt][2];
            red[slot * 16 * TOK + (tl + 1) * 16 + g + 8] = acc[j][nt][3];
        }
    tile_sync(bar);
    SUBT(st, 8);

    if (MODE == 2) {
        int row_cta = bx * GR * 16;
        for (int idx = tid; idx < GR * 16 * TOK; idx += MM_WARPS * 32) {
            int rl = idx % (GR * 16), tl = idx / (GR * 16);
            int sub = rl >> 4, r16 = rl & 15;
            int row = row_cta + rl, tok = tok_base + tl;
            if (row >= n_rows || tok >= n_tok) continue;
            int ga = 0, ua = 0;
#pragma unroll
            for (int kp = 0; kp < KSPLIT; kp++) {
                ga += red[(sub * KSPLIT + kp) * 16 * TOK + tl * 16 + r16];
                ua += red[((GR + sub) * KSPLIT + kp) * 16 * TOK + tl * 16 + r16];
            }
            float s = act_scale[tok];
            int qs = act_sum[tok];
            float gv = __fmul_rn((float)(ga - qs), __fdiv_rn(s0, s));
            float uv = __fmul_rn((float)(ua - qs), __fdiv_rn(s1, s));
            float rr = fmaxf(gv, 0.0f);
            out[(size_t)tok * ld_out + row] = __fmul_rn(__fmul_rn(rr, rr), uv);
        }
    } else {
        int row_cta = bx * TILES * RT * 16;
        for (int idx = tid; idx < TILES * RT * 16 * TOK; idx += MM_WARPS * 32) {
            int rl = idx % (TILES * RT * 16), tl = idx / (TILES * RT * 16);
            int tile_l = rl >> 4, rr = rl & 15;
            int row = row_cta + rl, tok = tok_base + tl;
            if (row >= n_rows || tok >= n_tok) continue;
            int a = 0;
#pragma unroll
            for (int kp = 0; kp < KSPLIT; kp++) a += red[(tile_l * KSPLIT + kp) * 16 * TOK + tl * 16 + rr];
            float ws = row < seg1 ? s0 : (row < seg2 ? s1 : s2);
            float y = __fmul_rn((float)(a - act_sum[tok]), __fdiv_rn(ws, act_scale[tok]));
            size_t o = (size_t)tok * ld_out + row;
            if (MODE == 0)
                out[o] = y;
            else
                out[o] = __fadd_rn(early ? prev : ld_act<FUSED>(out + o), y);
        }
    }
    tile_sync(bar);  // red is free for the next unit
    SUBT(st, 9);
}

// One CTA of a per-operation ternary product: BATCH, a unit of MM_TOKENS
// tokens (the _b kernels, RT row tiles per warp); otherwise one 8-token
// tile (the _1 kernels).
template <int MODE, int TILES, int KSPLIT, bool BATCH, int RT>
__device__ void ternary_mm_impl(const u8* __restrict__ w0, const u8* __restrict__ w1, int n_rows, int k,
                                float s0, float s1, float s2, int seg1, int seg2, const i8* __restrict__ act,
                                const float* __restrict__ act_scale, const int* __restrict__ act_sum, int n_tok,
                                float* __restrict__ out, int ld_out) {
    constexpr int TOK = BATCH ? MM_TOKENS : 8;
    __shared__ int red[MM_WARPS * RT * 16 * TOK];
    // Let the next kernel launch, and start pulling this CTA's weight rows
    // into L2 while the previous kernel ends.
    pdl_trigger();
    ternary_unit_prefetch<MODE, TILES * RT>(blockIdx.x, w0, w1, n_rows, k, threadIdx.x, blockDim.x);
    pdl_wait();
    ternary_tile<MODE, TILES, KSPLIT, BATCH, TOK, false, RT>(blockIdx.x, blockIdx.y * TOK, red, w0, w1, n_rows, k,
                                                             s0, s1, s2, seg1, seg2, act, act_scale, act_sum, n_tok,
                                                             out, ld_out);
}

// The kernels take the same arguments: the weights (w1 = the up rows for
// gate/up, else unused), the scales of the row segments, the quantised
// activations and the output.
// - _b: grid (row units, ceil(tokens / 32)); all activation fragments of a
//   weight block before its first product; any number of tokens (session
//   11: at one token tile too, 8-11% faster per batch-8 step than loading
//   each fragment right before its product, which the kernels without a
//   suffix did).
// - _b2: as _b with 32 rows per CTA, each warp multiplying two row tiles
//   with every activation fragment (half the activation reads; 140
//   registers, so one CTA per SM: ops.rs takes it for grids of one wave).
// - _1: grid (row units, ceil(tokens / 8)), for passes of up to 12 tokens:
//   the fused decode kernel's tile (four accumulators per warp), with the
//   activations read through the read-only path, all of a round's fragments
//   before its first product (session 11: BF16 batch 4 / 8 1.95 / 2.03 ->
//   1.71 / 1.82 ms per step against the _b kernels).
#define TERNARY(NAME, MODE, TILES, KSPLIT, BATCH, RT)                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                                  \
        NAME(const u8* w0, const u8* w1, int n_rows, int k, float s0, float s1, float s2, int seg1, int seg2, \
             const i8* act, const float* act_scale, const int* act_sum, int n_tok, float* out, int ld_out) { \
        ternary_mm_impl<MODE, TILES, KSPLIT, BATCH, RT>(w0, w1, n_rows, k, s0, s1, s2, seg1, seg2, act, act_scale, \
                                                        act_sum, n_tok, out, ld_out);                  \
    }
TERNARY(ternary_mm_store_b, 0, 1, 8, true, 1)
TERNARY(ternary_mm_add_b, 1, 1, 8, true, 1)
TERNARY(ternary_mm_gate_up_b, 2, 2, 4, true, 1)
TERNARY(ternary_mm_store_b2, 0, 1, 8, true, 2)
TERNARY(ternary_mm_add_b2, 1, 1, 8, true, 2)
TERNARY(ternary_mm_gate_up_b2, 2, 2, 4, true, 2)
TERNARY(ternary_mm_store_1, 0, 1, 8, false, 1)
TERNARY(ternary_mm_add_1, 1, 1, 8, false, 1)
TERNARY(ternary_mm_gate_up_1, 2, 2, 4, false, 1)

// ---------------------------------------------------------------------------
// Staged ternary products for passes of many tokens (batched decode steps and
// prefill): the same products and epilogues as ternary_tile, bit for bit
// (integer sums are exact in any order), organised for throughput:
//
// - a CTA owns MG row groups of 16 output rows (MODE 2: 16 gate rows and the
//   16 up rows of the same indices per group) and TS_BN = 32 tokens; its 8
//   warps are MG row groups x NG token groups (32 / NG tokens each), so every
//   activation byte brought into the SM feeds MG row groups (ternary_tile: 1)
//   and no K split needs a reduction (the kernels: MG = 4, NG = 2);
// - weights and activations travel through a TS_NST-stage cp.async pipeline
//   of TS_KB 128-wide blocks per stage, so the next stages' loads are in
//   flight while a stage is multiplied (ternary_tile waits for each block's
//   activations before its products);
// - rows are padded in shared memory (weights 96 bytes per 64, activations
//   288 per 256) so that the 8-byte fragment loads of a warp hit distinct banks.
//
// grid (ceil(rows / (16 MG)), ceil(tokens / 32)), block 256, dynamic shared
// memory TS_NST * (weight rows * TS_WS + TS_BN * TS_AS) bytes (ops.rs:
// staged_smem). Only where their work fills the GPU (ops.rs:
// staged_grid_fills): with few CTAs each one's chain of pipeline stages is
// long, and ternary_tile's K split is faster (docs/perf/gpu.md, sessions 7
// and 12).

#define TS_BN 32
#define TS_KB 2
#define TS_KC (128 * TS_KB)
#define TS_NST 4
#define TS_AS (TS_KC + 32)
#define TS_WS (TS_KC / 4 + 32)

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

template <int MODE, int MG, int NG>
__device__ void ternary_staged_impl(const u8* __restrict__ w0, const u8* __restrict__ w1, int n_rows, int k,
                                    float s0, float s1, float s2, int seg1, int seg2, const i8* __restrict__ act,
                                    const float* __restrict__ act_scale, const int* __restrict__ act_sum, int n_tok,
                                    float* __restrict__ out, int ld_out) {
    static_assert(MG * NG == MM_WARPS, "8 warps");
    constexpr int WROWS = (MODE == 2 ? 2 : 1) * MG * 16;  // weight rows per CTA
    constexpr int NTW = TS_BN / 8 / NG;                     // 8-token tiles per warp
    constexpr int MT = MODE == 2 ? 2 : 1;                   // 16-row tiles per warp
    constexpr int W_STAGE = WROWS * TS_WS, A_STAGE = TS_BN * TS_AS;
    extern __shared__ __align__(16) unsigned char smem[];
    u8* sw = smem;                               // [TS_NST][WROWS][TS_WS]
    u8* sa = smem + TS_NST * W_STAGE;            // [TS_NST][TS_BN][TS_AS]

    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = lane >> 2, t = lane & 3;
    int mg = warp / NG, ng = warp % NG;
    int row0 = blockIdx.x * MG * 16, tok0 = blockIdx.y * TS_BN;
    int nblk = k >> 7, nch = (nblk + TS_KB - 1) / TS_KB;
    size_t row_bytes = (size_t)(k >> 2);

    // Weight pieces (16 bytes) of a stage: WROWS rows x TS_KC / 64.
    auto load_w = [&](int ch) {
        u8* dst = sw + (ch % TS_NST) * W_STAGE;
        constexpr int PER_ROW = TS_KC / 64, PIECES = WROWS * PER_ROW;
        for (int p = threadIdx.x; p < PIECES; p += blockDim.x) {
            int rl = p / PER_ROW, off = (p % PER_ROW) * 16;
            if (ch * (TS_KC / 4) + off >= (int)row_bytes) continue;
            int row = MODE == 2 ? row0 + rl % (MG * 16) : row0 + rl;
            const u8* base = (MODE == 2 && rl >= MG * 16) ? w1 : w0;
            bool ok = row < n_rows;
            cp_async16(dst + rl * TS_WS + off, base + (size_t)(ok ? row : 0) * row_bytes + (size_t)ch * (TS_KC / 4) + off,
                       ok);
        }
    };
    auto load_a = [&](int ch) {
        u8* dst = sa + (ch % TS_NST) * A_STAGE;
        constexpr int PER_ROW = TS_KC / 16, PIECES = TS_BN * PER_ROW;
        for (int p = threadIdx.x; p < PIECES; p += blockDim.x) {
            int tl = p / PER_ROW, off = (p % PER_ROW) * 16;
            if (ch * TS_KC + off >= k) continue;
            int tok = tok0 + tl;
            bool ok = tok < n_tok;
            cp_async16(dst + tl * TS_AS + off, act + (size_t)(ok ? tok : 0) * k + (size_t)ch * TS_KC + off, ok);
        }
    };

    // Weights are never written during a step: their first stages load
    // while the previous kernel finishes.
    pdl_trigger();
#pragma unroll
    for (int s = 0; s < TS_NST - 1; s++)
        if (s < nch) load_w(s);
    pdl_wait();
#pragma unroll
    for (int s = 0; s < TS_NST - 1; s++) {
        if (s < nch) load_a(s);
        cp_async_commit();
    }

    int acc[MT][NTW][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int n = 0; n < NTW; n++) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0;

    for (int ch = 0; ch < nch; ch++) {
        cp_async_wait<TS_NST - 2>();
        __syncthreads();
        int nx = ch + TS_NST - 1;
        if (nx < nch) {
            load_w(nx);
            load_a(nx);
        }
        cp_async_commit();
        const u8* cw = sw + (ch % TS_NST) * W_STAGE;
        const u8* ca = sa + (ch % TS_NST) * A_STAGE;
#pragma unroll
        for (int j = 0; j < TS_KB; j++) {
            if (ch * TS_KB + j >= nblk) break;
            uint2 wa[MT], wb[MT];
#pragma unroll
            for (int m = 0; m < MT; m++) {
                int rl = m * MG * 16 + mg * 16 + g;
                wa[m] = *(const uint2*)(cw + rl * TS_WS + j * 32 + 8 * t);
                wb[m] = *(const uint2*)(cw + (rl + 8) * TS_WS + j * 32 + 8 * t);
            }
            uint2 bv[4][NTW];
#pragma unroll
            for (int c = 0; c < 4; c++)
#pragma unroll
                for (int n = 0; n < NTW; n++)
                    bv[c][n] = *(const uint2*)(ca + (ng * NTW * 8 + n * 8 + g) * TS_AS + j * 128 + 32 * c + 8 * t);
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int shift = 6 - 2 * c;
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    unsigned a0 = (wa[m].x >> shift) & 0x03030303u;
                    unsigned a1 = (wb[m].x >> shift) & 0x03030303u;
                    unsigned a2 = (wa[m].y >> shift) & 0x03030303u;
                    unsigned a3 = (wb[m].y >> shift) & 0x03030303u;
#pragma unroll
                    for (int n = 0; n < NTW; n++) mma_s8(acc[m][n], a0, a1, a2, a3, bv[c][n].x, bv[c][n].y);
                }
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue straight from the accumulators: c0/c1 = row g, tokens 2t and
    // 2t + 1; c2/c3 = row g + 8.
#pragma unroll
    for (int n = 0; n < NTW; n++) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int row = row0 + mg * 16 + g + (r >= 2 ? 8 : 0);
            int tok = tok0 + ng * NTW * 8 + n * 8 + 2 * t + (r & 1);
            if (row >= n_rows || tok >= n_tok) continue;
            float s = act_scale[tok];
            int qs = act_sum[tok];
            size_t o = (size_t)tok * ld_out + row;
            if (MODE == 2) {
                float gv = __fmul_rn((float)(acc[0][n][r] - qs), __fdiv_rn(s0, s));
                float uv = __fmul_rn((float)(acc[MT - 1][n][r] - qs), __fdiv_rn(s1, s));
                float rr = fmaxf(gv, 0.0f);
                out[o] = __fmul_rn(__fmul_rn(rr, rr), uv);
            } else {
                float ws = row < seg1 ? s0 : (row < seg2 ? s1 : s2);
                float y = __fmul_rn((float)(acc[0][n][r] - qs), __fdiv_rn(ws, s));
                out[o] = MODE == 0 ? y : __fadd_rn(out[o], y);
            }
        }
    }
}

#define TERNARY_STAGED(NAME, MODE, MG, NG)                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                  \
        NAME(const u8* w0, const u8* w1, int n_rows, int k, float s0, float s1, float s2, int seg1, int seg2, \
             const i8* act, const float* act_scale, const int* act_sum, int n_tok, float* out, int ld_out) { \
        ternary_staged_impl<MODE, MG, NG>(w0, w1, n_rows, k, s0, s1, s2, seg1, seg2, act, act_scale, act_sum, \
                                          n_tok, out, ld_out);                                         \
    }
TERNARY_STAGED(ternary_mm_store_s4, 0, 4, 2)
TERNARY_STAGED(ternary_mm_add_s4, 1, 4, 2)
TERNARY_STAGED(ternary_mm_gate_up_s4, 2, 4, 2)

// ---------------------------------------------------------------------------
// Cluster split-K ternary products (sm_90+), for passes whose 16- to 64-row
// tiles are too few to fill the GPU (2B-4T's products at 9-64 tokens). The
// K range is split over the KS CTAs of a thread-block cluster instead of
// over one CTA's warps (_b) or not at all (staged):
//
// - a cluster owns TC_WROWS weight rows (MODE 2: 64 gate rows and the 64 up
//   rows of the same indices) and 32 tokens; its CTA `rank` multiplies the
//   128-wide K blocks [rank nblk / KS, (rank + 1) nblk / KS), each of its 8
//   warps 16 rows by every token;
// - a CTA's weight words go straight into registers, the first ones before
//   pdl_wait (weights are never written during a step), double-buffered by
//   TC_ROUND blocks; its activation slice (32 tokens x its K blocks) comes
//   into shared memory once (cp.async) and feeds all 8 warps, so every
//   activation byte crosses from L2 once per cluster of 128 rows (_b: once
//   per 16-row CTA);
// - the int32 partial sums go to shared memory (ternary_tile's layout);
//   after a cluster barrier each CTA sums its share of the cluster's outputs
//   (output idx = token * rows + row, shares of total / KS in order) over
//   the KS CTAs' partials through distributed shared memory, every load of
//   a thread in flight at once, and runs ternary_tile's epilogue, so the
//   outputs are its bits exactly (integer sums are exact in any order). The
//   residual (MODE 1) and the tokens' scales are read before the barrier.
//   (Adding the partials into the owners' shared memory with red.add
//   instead measured slower on the H200: docs/perf/gpu.md, session 16.)
//
// grid (KS * ceil(rows / output rows per cluster), ceil(tokens / 32)),
// cluster (KS, 1, 1) (a launch attribute), block 256, dynamic shared memory
// (ops.rs: cluster_smem) max(32 activation rows of 128 nb + 32 bytes, the
// 16 KB of partial sums), then the 32 tokens' scales and sums. Activation
// rows 128 nb + 32 bytes apart put the 8-byte fragment loads of a half-warp
// (4 tokens x 32 bytes) in distinct banks. Compiled for sm_80 too (one
// module), where the host never launches it.

#define TC_WROWS 128
#define TC_ROUND 4
#define TC_EMAX 16  // most outputs per thread: 4096 / 256 (one CTA per cluster)
#define TC_KMAX 8   // most CTAs per cluster (the portable limit)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_size() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}
// Every thread of every CTA of the cluster: arrive releases the thread's
// earlier shared-memory writes (and ends its reads of others'), wait
// acquires the others'.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The generic address of this CTA's shared `p` in CTA `rank`'s shared
// memory (plain loads through it; the barriers' memory clobbers keep them
// after the barrier).
__device__ __forceinline__ const int* dsmem_map(const int* p, unsigned rank) {
    const int* r;
    asm("mapa.u64 %0, %1, %2;" : "=l"(r) : "l"(p), "r"(rank));
    return r;
}
#endif

template <int MODE>
__device__ void ternary_cluster_impl(const u8* __restrict__ w0, const u8* __restrict__ w1, int n_rows, int k,
                                     float s0, float s1, float s2, int seg1, int seg2, const i8* __restrict__ act,
                                     const float* __restrict__ act_scale, const int* __restrict__ act_sum, int n_tok,
                                     float* __restrict__ out, int ld_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int OR = MODE == 2 ? TC_WROWS / 2 : TC_WROWS;  // output rows per cluster
    constexpr int TOTAL = OR * 32;                           // outputs per cluster
    const int KS = (int)cluster_size(), rank = (int)cluster_rank();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = lane >> 2, t = lane & 3;
    int row0 = (int)(blockIdx.x / KS) * OR, tok0 = blockIdx.y * 32;
    int nblk = k >> 7;
    int kb0 = rank * nblk / KS, nb = (rank + 1) * nblk / KS - kb0, nb_max = (nblk + KS - 1) / KS;
    int stride = nb * 128 + 32;
    i8* sa = (i8*)smem;    // [32][stride] activations, then
    int* red = (int*)smem;  // [8 warps][32 tokens][16 rows] partial sums
    float* s_scale = (float*)(smem + max(32 * (nb_max * 128 + 32), 8 * 32 * 16 * 4));  // [32]
    int* s_sum = (int*)(s_scale + 32);                                                  // [32]
    size_t row_bytes = (size_t)(k >> 2);
    // This warp's 16 weight rows (MODE 2: warps 0-3 gate rows, 4-7 the
    // same up rows).
    int wr = MODE == 2 ? row0 + (warp & 3) * 16 : row0 + warp * 16;
    const u8* w = (MODE == 2 && warp >= 4) ? w1 : w0;
    int r0 = wr + g, r1 = wr + g + 8;
    bool v0 = r0 < n_rows, v1 = r1 < n_rows;
    const u8* p0 = w + (size_t)(v0 ? r0 : 0) * row_bytes + (size_t)kb0 * 32 + 8 * t;
    const u8* p1 = w + (size_t)(v1 ? r1 : 0) * row_bytes + (size_t)kb0 * 32 + 8 * t;
    auto load = [&](uint2(&wa)[TC_ROUND], uint2(&wb)[TC_ROUND], int b0) {
#pragma unroll
        for (int i = 0; i < TC_ROUND; i++) {
            bool in = b0 + i < nb;
            wa[i] = (in && v0) ? __ldg((const uint2*)(p0 + (size_t)(b0 + i) * 32)) : make_uint2(0u, 0u);
            wb[i] = (in && v1) ? __ldg((const uint2*)(p1 + (size_t)(b0 + i) * 32)) : make_uint2(0u, 0u);
        }
    };
    pdl_trigger();
    uint2 wa0[TC_ROUND], wb0[TC_ROUND], wa1[TC_ROUND], wb1[TC_ROUND];
    load(wa0, wb0, 0);
    load(wa1, wb1, TC_ROUND);
    pdl_wait();
    {
        int per_row = nb * 8;  // 16-byte pieces
        for (int p = threadIdx.x; p < 32 * per_row; p += blockDim.x) {
            int tl = p / per_row, off = (p % per_row) * 16;
            int tok = tok0 + tl;
            bool ok = tok < n_tok;
            cp_async16(sa + tl * stride + off, act + (size_t)(ok ? tok : 0) * k + (size_t)kb0 * 128 + off, ok);
        }
        cp_async_commit();
    }
    if (threadIdx.x < 32) {
        int tok = min(tok0 + (int)threadIdx.x, n_tok - 1);
        s_scale[threadIdx.x] = act_scale[tok];
        s_sum[threadIdx.x] = act_sum[tok];
    }
    int ntiles = min(4, (n_tok - tok0 + 7) / 8);
    int acc[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
    cp_async_wait<0>();
    __syncthreads();
    // Lane (g, t)'s activation bytes of token tile nt, block b, sub-block c:
    // sa[(nt * 8 + g) * stride + b * 128 + 32 c + 8 t], as ternary_tile.
    const i8* la = sa + (size_t)g * stride + 8 * t;
    auto products = [&](const uint2(&wa)[TC_ROUND], const uint2(&wb)[TC_ROUND], int b0) {
#pragma unroll
        for (int i = 0; i < TC_ROUND; i++) {
            if (b0 + i >= nb) break;
            const i8* ab = la + (b0 + i) * 128;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                int shift = 6 - 2 * c;
                unsigned a0 = (wa[i].x >> shift) & 0x03030303u;
                unsigned a1 = (wb[i].x >> shift) & 0x03030303u;
                unsigned a2 = (wa[i].y >> shift) & 0x03030303u;
                unsigned a3 = (wb[i].y >> shift) & 0x03030303u;
                uint2 bv[4];
#pragma unroll
                for (int nt = 0; nt < 4; nt++)
                    if (nt < ntiles) bv[nt] = *(const uint2*)(ab + nt * 8 * stride + 32 * c);
#pragma unroll
                for (int nt = 0; nt < 4; nt++)
                    if (nt < ntiles) mma_s8(acc[nt], a0, a1, a2, a3, bv[nt].x, bv[nt].y);
            }
        }
    };
    for (int b0 = 0; b0 < nb; b0 += 2 * TC_ROUND) {
        products(wa0, wb0, b0);
        if (b0 + 2 * TC_ROUND < nb) load(wa0, wb0, b0 + 2 * TC_ROUND);
        products(wa1, wb1, b0 + TC_ROUND);
        if (b0 + 3 * TC_ROUND < nb) load(wa1, wb1, b0 + 3 * TC_ROUND);
    }
    __syncthreads();  // every warp is done with the activations: red takes their place
#pragma unroll
    for (int nt = 0; nt < 4; nt++) {
        int tl = nt * 8 + 2 * t;
        red[warp * 512 + tl * 16 + g] = acc[nt][0];
        red[warp * 512 + (tl + 1) * 16 + g] = acc[nt][1];
        red[warp * 512 + tl * 16 + g + 8] = acc[nt][2];
        red[warp * 512 + (tl + 1) * 16 + g + 8] = acc[nt][3];
    }
    // This CTA's share of the cluster's outputs: idx = lo + tid + 256 e.
    int lo = rank * TOTAL / KS, hi = (rank + 1) * TOTAL / KS;
    // The residual (MODE 1), read while the other CTAs finish.
    float prev[TC_EMAX];
#pragma unroll
    for (int e = 0; e < TC_EMAX; e++) {
        int idx = lo + (int)threadIdx.x + e * 256;
        int rl = idx % OR, tl = idx / OR;
        prev[e] = (MODE == 1 && idx < hi && row0 + rl < n_rows && tok0 + tl < n_tok)
                      ? out[(size_t)(tok0 + tl) * ld_out + row0 + rl]
                      : 0.0f;
    }
    const int* part[TC_KMAX];
#pragma unroll
    for (int q = 0; q < TC_KMAX; q++) part[q] = dsmem_map(red, q < KS ? q : 0);
    cluster_sync();
#pragma unroll
    for (int e = 0; e < TC_EMAX; e++) {
        int idx = lo + (int)threadIdx.x + e * 256;
        if (idx >= hi) break;
        int rl = idx % OR, tl = idx / OR;
        int row = row0 + rl, tok = tok0 + tl;
        int off = (rl >> 4) * 512 + tl * 16 + (rl & 15);  // gate (MODE 2) or the row's
        int a = 0, u = 0;
#pragma unroll
        for (int q = 0; q < TC_KMAX; q++) {
            if (q < KS) {
                a += part[q][off];
                if (MODE == 2) u += part[q][off + 4 * 512];
            }
        }
        if (row >= n_rows || tok >= n_tok) continue;
        float s = s_scale[tl];
        int qs = s_sum[tl];
        size_t o = (size_t)tok * ld_out + row;
        if (MODE == 2) {
            float gv = __fmul_rn((float)(a - qs), __fdiv_rn(s0, s));
            float uv = __fmul_rn((float)(u - qs), __fdiv_rn(s1, s));
            float rr = fmaxf(gv, 0.0f);
            out[o] = __fmul_rn(__fmul_rn(rr, rr), uv);
        } else {
            float ws = row < seg1 ? s0 : (row < seg2 ? s1 : s2);
            float y = __fmul_rn((float)(a - qs), __fdiv_rn(ws, s));
            out[o] = MODE == 0 ? y : __fadd_rn(prev[e], y);
        }
    }
    cluster_sync();  // no CTA leaves while another still reads its partials
#else
    __trap();
#endif
}

#define TERNARY_CLUSTER(NAME, MODE)                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2)                                               \
        NAME(const u8* w0, const u8* w1, int n_rows, int k, float s0, float s1, float s2, int seg1, int seg2, \
             const i8* act, const float* act_scale, const int* act_sum, int n_tok, float* out, int ld_out) { \
        ternary_cluster_impl<MODE>(w0, w1, n_rows, k, s0, s1, s2, seg1, seg2, act, act_scale, act_sum, n_tok, \
                                   out, ld_out);                                                       \
    }
TERNARY_CLUSTER(ternary_mm_store_c, 0)
TERNARY_CLUSTER(ternary_mm_add_c, 1)
TERNARY_CLUSTER(ternary_mm_gate_up_c, 2)

// ---------------------------------------------------------------------------
// RoPE (NEOX pairing i, i + head_dim/2) on q and k, and the KV-cache write.
//
// qkv [rows, hidden + 2 kv_dim] f32 (q | k | v); cos/sin [max_pos, head_dim/2]
// f32 tables (angles rounded once from f64, as on the CPU). Row r sits at
// position pos[r] of the sequence whose cache slots start at base[r].
// q_out [rows, hidden] f32; kc/vc [slots, kv_dim] in T (one layer).
// grid (rows), block 128.

// NEOX rotation of the pair (x0, x1) by (c, s): (x0 c - x1 s, x1 c + x0 s),
// each product rounded on its own (no FMA), as on the CPU.
__device__ __forceinline__ float2 rope_rot(float x0, float x1, float c, float s) {
    return make_float2(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)), __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s)));
}

template <class P>
__device__ void rope_kv_impl(const float* qkv, const float* cos_t, const float* sin_t, const int* pos,
                             const int* base, float* q_out, typename P::T* kc, typename P::T* vc,
                             int n_heads, int n_kv_heads, int head_dim) {
    pdl_begin();
    int r = blockIdx.x;
    int hidden = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, half = head_dim / 2;
    size_t in = (size_t)r * (hidden + 2 * kv_dim);
    const float* cs = cos_t + (size_t)pos[r] * half;
    const float* sn = sin_t + (size_t)pos[r] * half;
    size_t slot = (size_t)(base[r] + pos[r]) * kv_dim;
    for (int j = threadIdx.x; j < (n_heads + n_kv_heads) * half; j += blockDim.x) {
        int head = j / half, i = j % half;
        float c = cs[i], s = sn[i];
        if (head < n_heads) {
            size_t o = (size_t)head * head_dim + i;
            float2 y = rope_rot(qkv[in + o], qkv[in + o + half], c, s);
            q_out[(size_t)r * hidden + o] = y.x;
            q_out[(size_t)r * hidden + o + half] = y.y;
        } else {
            size_t o = (size_t)(head - n_heads) * head_dim + i;
            float2 y = rope_rot(qkv[in + hidden + o], qkv[in + hidden + o + half], c, s);
            P::store(kc, slot + o, y.x);
            P::store(kc, slot + o + half, y.y);
        }
    }
    for (int j = threadIdx.x; j < kv_dim; j += blockDim.x) P::store(vc, slot + j, qkv[in + hidden + kv_dim + j]);
}

#define ROPE_KV(NAME, P)                                                                               \
    extern "C" __global__ void NAME(const float* qkv, const float* cos_t, const float* sin_t, const int* pos, \
                                    const int* base, float* q_out, P::T* kc, P::T* vc, int n_heads,    \
                                    int n_kv_heads, int head_dim) {                                    \
        rope_kv_impl<P>(qkv, cos_t, sin_t, pos, base, q_out, kc, vc, n_heads, n_kv_heads, head_dim);   \
    }
ROPE_KV(rope_kv_f32, F32)
ROPE_KV(rope_kv_f16, F16)
ROPE_KV(rope_kv_bf16, BF16)

// ---------------------------------------------------------------------------
// Causal GQA attention over the KV cache, for decode and prefill rows alike:
// row r (position pos[r]) attends to cache slots base[r] .. base[r] + pos[r].
//
// Split over positions (flash-decoding): CTA (r, y, s) takes the chunks
// s, s + S, s + 2S, ... of ATT_CHUNK positions, keeps a running maximum m and
// sum l of exp(score - m) and the unnormalised output, and writes them to
// part / ml; attention_combine merges the S parts. Each CTA serves HPC
// query heads of one kv head (y = kv_head * hgroups + group; the last group
// may be partial), so each K and V vector it loads feeds all of them (the
// host takes HPC = 1 when the grid would otherwise be too small to fill the
// GPU). Scores q.k * scale, the softmax and the outputs are f32; q is f32,
// the cache is read in T.
// grid (rows, n_kv_heads * ceil(G / HPC), S), block 128; head_dim a
// multiple of 4, at most 128 * GROUPS.

#define ATT_CHUNK 32
#define ATT_WARPS 4
#define ATT_G 4
#define ATT_MAX_HD 256

#define ATT_PER_WARP (ATT_CHUNK / ATT_WARPS)

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// Each lane holds 4 consecutive dimensions of each 128-wide group:
// d = 128 * j + 4 * lane + {0..3}, j < GROUPS.
// Barrier of the ATT_WARPS * 32 threads of one attention unit: the whole
// CTA (id 0) or a named barrier of half a CTA (id 1, 2).
__device__ __forceinline__ void unit_sync(int id) {
    if (id == 0)
        __syncthreads();
    else
        asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(ATT_WARPS * 32) : "memory");
}

// One attention unit: query heads head0 .. head0 + ng - 1 (q at qh + g *
// head_dim, f32) of one row over the chunks s, s + S, ... of its visible
// positions, whose K/V start at `first` in the caches; tid < ATT_WARPS * 32.
// FUSED (the fused decode kernel): the unit is half a CTA synchronised by
// named barrier sync_id, and position `cur` (if >= 0) takes its K and V
// from knew / vnew (already rounded to T) instead of the caches; otherwise
// the unit is the whole CTA and those arguments are unused. Writes the unnormalised outputs to
// part[slot0 + g] and (m, l) to ml; sc [HPC][ATT_CHUNK] and red
// [ATT_WARPS][ATT_MAX_HD] are this unit's shared scratch.
template <class P, int GROUPS, int HPC, bool FUSED>
__device__ void attention_unit(const float* qh, const typename P::T* __restrict__ kc,
                               const typename P::T* __restrict__ vc, size_t first, int visible, int s, int S,
                               int ng, int head_dim, int kv_dim, float scale, const float* knew, const float* vnew,
                               int cur, size_t slot0, float* part, float* ml, int tid, int sync_id,
                               float (*sc)[ATT_CHUNK], float (*red)[ATT_MAX_HD]) {
    int lane = tid & 31, warp = tid >> 5;
    float4 qv[HPC][GROUPS];
    bool has[GROUPS];
#pragma unroll
    for (int j = 0; j < GROUPS; j++) has[j] = 128 * j + 4 * lane < head_dim;
#pragma unroll
    for (int g = 0; g < HPC; g++) {
#pragma unroll
        for (int j = 0; j < GROUPS; j++) {
            int d = 128 * j + 4 * lane;
            const float* qp = qh + (size_t)g * head_dim;
            qv[g][j] = (g < ng && has[j]) ? make_float4(qp[d], qp[d + 1], qp[d + 2], qp[d + 3])
                                          : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    float m_run[HPC], l_run[HPC];
    float4 acc[HPC][GROUPS];
#pragma unroll
    for (int g = 0; g < HPC; g++) {
        m_run[g] = -__int_as_float(0x7f800000);
        l_run[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < GROUPS; j++) acc[g][j] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int c0 = s * ATT_CHUNK; c0 < visible; c0 += S * ATT_CHUNK) {
        int cnt = min(ATT_CHUNK, visible - c0);
        // Scores: warp w takes positions w, w + ATT_WARPS, ...; every load
        // of the warp's positions is issued before the first reduction.
        float4 kv[ATT_PER_WARP][GROUPS];
#pragma unroll
        for (int ii = 0; ii < ATT_PER_WARP; ii++) {
            int i = warp + ii * ATT_WARPS;
            size_t at = first + (size_t)(c0 + i) * kv_dim;
#pragma unroll
            for (int j = 0; j < GROUPS; j++)
                kv[ii][j] = (i < cnt && has[j])
                                ? ((FUSED && c0 + i == cur) ? *(const float4*)(knew + 128 * j + 4 * lane)
                                                            : P::load4(kc, at + 128 * j + 4 * lane))
                                : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int ii = 0; ii < ATT_PER_WARP; ii++) {
            int i = warp + ii * ATT_WARPS;
#pragma unroll
            for (int g = 0; g < HPC; g++) {
                if (g < ng) {
                    float dot = 0.0f;
#pragma unroll
                    for (int j = 0; j < GROUPS; j++) dot += dot4(qv[g][j], kv[ii][j]);
                    dot = warp_sum_f(dot);
                    if (lane == 0 && i < cnt) sc[g][i] = dot * scale;
                }
            }
        }
        unit_sync(FUSED ? sync_id : 0);
        // One chunk is one warp wide: lane i holds score i of each head;
        // every warp computes the chunk's maxima and sums with shuffles.
        float e_mine[HPC];
#pragma unroll
        for (int g = 0; g < HPC; g++) {
            e_mine[g] = 0.0f;
            if (g < ng) {
                float mine = lane < cnt ? sc[g][lane] : -__int_as_float(0x7f800000);
                float m_new = fmaxf(m_run[g], warp_max_f(mine));
                float factor = expf(m_run[g] - m_new);  // 0 on the first chunk (m_run = -inf)
                e_mine[g] = lane < cnt ? expf(mine - m_new) : 0.0f;
                // Explicit roundings here and below: with plain operators the
                // compiler fused acc * factor into the first product of the
                // chunk in the fused kernel but not in attention_*_h1, so
                // their results differed whenever a split's maximum moved.
                l_run[g] = __fmaf_rn(l_run[g], factor, warp_sum_f(e_mine[g]));
                m_run[g] = m_new;
#pragma unroll
                for (int j = 0; j < GROUPS; j++) {
                    acc[g][j].x = __fmul_rn(acc[g][j].x, factor);
                    acc[g][j].y = __fmul_rn(acc[g][j].y, factor);
                    acc[g][j].z = __fmul_rn(acc[g][j].z, factor);
                    acc[g][j].w = __fmul_rn(acc[g][j].w, factor);
                }
            }
        }
        // V is loaded only now (loading it with K costs registers, and the
        // lower occupancy was measured slower).
#pragma unroll
        for (int ii = 0; ii < ATT_PER_WARP; ii++) {
            int i = warp + ii * ATT_WARPS;
            size_t at = first + (size_t)(c0 + i) * kv_dim;
#pragma unroll
            for (int j = 0; j < GROUPS; j++)
                kv[ii][j] = (i < cnt && has[j])
                                ? ((FUSED && c0 + i == cur) ? *(const float4*)(vnew + 128 * j + 4 * lane)
                                                            : P::load4(vc, at + 128 * j + 4 * lane))
                                : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int ii = 0; ii < ATT_PER_WARP; ii++) {
            int i = warp + ii * ATT_WARPS;
#pragma unroll
            for (int g = 0; g < HPC; g++) {
                float e = __shfl_sync(0xffffffffu, e_mine[g], i & 31);
#pragma unroll
                for (int j = 0; j < GROUPS; j++) {
                    acc[g][j].x = __fmaf_rn(e, kv[ii][j].x, acc[g][j].x);
                    acc[g][j].y = __fmaf_rn(e, kv[ii][j].y, acc[g][j].y);
                    acc[g][j].z = __fmaf_rn(e, kv[ii][j].z, acc[g][j].z);
                    acc[g][j].w = __fmaf_rn(e, kv[ii][j].w, acc[g][j].w);
                }
            }
        }
        unit_sync(FUSED ? sync_id : 0);
    }
    // Per head: the warps' partial outputs summed in a fixed order.
    for (int g = 0; g < ng; g++) {
#pragma unroll
        for (int j = 0; j < GROUPS; j++) {
            int d = 128 * j + 4 * lane;
            if (has[j]) {
                red[warp][d] = acc[g][j].x;
                red[warp][d + 1] = acc[g][j].y;
                red[warp][d + 2] = acc[g][j].z;
                red[warp][d + 3] = acc[g][j].w;
            }
        }
        unit_sync(FUSED ? sync_id : 0);
        size_t slot = slot0 + (size_t)g * S;
        for (int d = tid; d < head_dim; d += ATT_WARPS * 32) {
            float o = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) o += red[w][d];
            part[slot * head_dim + d] = o;
        }
        if (tid == 0) {
            ml[2 * slot] = m_run[g];
            ml[2 * slot + 1] = l_run[g];
        }
        unit_sync(FUSED ? sync_id : 0);
    }
}

template <class P, int GROUPS, int HPC>
__device__ void attention_partial_impl(const float* __restrict__ q, const typename P::T* __restrict__ kc,
                                       const typename P::T* __restrict__ vc, const int* pos, const int* base,
                                       float* part, float* ml, int n_heads, int n_kv_heads, int head_dim,
                                       float scale) {
    __shared__ float sc[HPC][ATT_CHUNK];
    __shared__ float red[ATT_WARPS][ATT_MAX_HD];
    pdl_begin();
    int r = blockIdx.x, s = blockIdx.z, S = gridDim.z;
    int G = n_heads / n_kv_heads, hgroups = (G + HPC - 1) / HPC;
    int kvh = blockIdx.y / hgroups, hg = blockIdx.y % hgroups;
    int head0 = kvh * G + hg * HPC, ng = min(HPC, G - hg * HPC);
    int hidden = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
    size_t first = (size_t)base[r] * kv_dim + (size_t)kvh * head_dim;
    attention_unit<P, GROUPS, HPC, false>(q + (size_t)r * hidden + (size_t)head0 * head_dim, kc, vc, first, pos[r] + 1, s,
                                   S, ng, head_dim, kv_dim, scale, nullptr, nullptr, -1,
                                   ((size_t)r * n_heads + head0) * S + s, part, ml, threadIdx.x, 0, sc, red);
}

#define ATTENTION(NAME, P, GROUPS, HPC)                                                                \
    extern "C" __global__ void __launch_bounds__(128) NAME(const float* q, const P::T* kc, const P::T* vc, \
                                                           const int* pos, const int* base, float* part, float* ml, \
                                                           int n_heads, int n_kv_heads, int head_dim, float scale) { \
        attention_partial_impl<P, GROUPS, HPC>(q, kc, vc, pos, base, part, ml, n_heads, n_kv_heads, head_dim, scale); \
    }
// head_dim <= 128 or <= 256 (_wide); ATT_G query heads per CTA, or one (_h1).
ATTENTION(attention_f32, F32, 1, ATT_G)
ATTENTION(attention_f16, F16, 1, ATT_G)
ATTENTION(attention_bf16, BF16, 1, ATT_G)
ATTENTION(attention_f32_wide, F32, 2, ATT_G)
ATTENTION(attention_f16_wide, F16, 2, ATT_G)
ATTENTION(attention_bf16_wide, BF16, 2, ATT_G)
ATTENTION(attention_f32_h1, F32, 1, 1)
ATTENTION(attention_f16_h1, F16, 1, 1)
ATTENTION(attention_bf16_h1, BF16, 1, 1)
ATTENTION(attention_f32_wide_h1, F32, 2, 1)
ATTENTION(attention_f16_wide_h1, F16, 2, 1)
ATTENTION(attention_bf16_wide_h1, BF16, 2, 1)

// out[d] = sum_s part_s[d] * exp(m_s - M) / sum_s l_s * exp(m_s - M) over the
// S parts of one (row, head) starting at slot0 (f32), by threads tid of
// nthreads; CG reads the parts from L2 (written by other CTAs of the
// persistent kernel). A non-finite result raises FLAG_NONFINITE.
// mls (shared, 2 S floats, or null): the (m, l) pairs are first copied
// there by the unit's threads (barrier sync_id), then read from there.
template <bool CG>
__device__ void combine_head(const float* part, const float* ml, size_t slot0, int S, int head_dim, float* out,
                             int* flags, int tid, int nthreads, float* mls, int sync_id) {
    const float* mp = ml + 2 * slot0;
    if (mls) {
        for (int k = tid; k < 2 * S; k += nthreads) mls[k] = ld_act<CG>(mp + k);
        unit_sync(sync_id);
    }
    auto ldm = [&](int k) { return mls ? mls[k] : ld_act<CG>(mp + k); };
    float M = -__int_as_float(0x7f800000);
    for (int s = 0; s < S; s++) M = fmaxf(M, ldm(2 * s));
    float L = 0.0f;
    for (int s = 0; s < S; s++) L += ldm(2 * s + 1) * expf(ldm(2 * s) - M);
    float inv = 1.0f / L;
    for (int d = tid; d < head_dim; d += nthreads) {
        float o = 0.0f;
        for (int s = 0; s < S; s++) {
            float m = ldm(2 * s);
            if (m > -__int_as_float(0x7f800000)) o += ld_act<CG>(part + (slot0 + s) * head_dim + d) * expf(m - M);
        }
        o *= inv;
        if (!isfinite(o)) atomicOr(flags, FLAG_NONFINITE);
        out[d] = o;
    }
}

// out[r, head, :] = the combined parts (f32). grid (rows, n_heads), block 128.
extern "C" __global__ void attention_combine(const float* part, const float* ml, int n_heads, int head_dim, int S,
                                             float* out, int* flags) {
    pdl_begin();
    int r = blockIdx.x, head = blockIdx.y;
    combine_head<false>(part, ml, ((size_t)r * n_heads + head) * S, S, head_dim,
                        out + ((size_t)r * n_heads + head) * head_dim, flags, threadIdx.x, blockDim.x, nullptr, 0);
}

// ---------------------------------------------------------------------------
// Attention on tensor cores (f16 / bf16 caches, head_dim 64 or 128): the
// same contract as attention_partial_impl (part / ml for attention_combine),
// for the up to 4 query heads of one kv head a unit serves. Split s takes
// the chunks s, s + S, ... of AMMA_CHUNK positions (S from
// attention_mma_splits on the host); in a chunk, warp w takes 16 positions
// and keeps its own running maximum and sum per head; the unit's warps are
// merged in a fixed order at the end (deterministic).
//
// Per warp and 16 positions, two products (mma m16n8k16, f32 accumulation):
//   S^T [16 positions x 8] = K [16 x head_dim] . Qp^T [head_dim x 8]
//   O^T [head_dim x 8]    += V^T [head_dim x 16] . Pp^T [16 x 8]
// The 8 columns of Qp are hi(q_h * scale) for the unit's heads h = 0..3,
// then lo = T(q_h * scale - hi); a score is column h plus column h + 4, so
// q keeps ~16 (bf16) or ~22 (f16) significant bits. Pp likewise holds the
// hi and lo parts of the probabilities, and O = O^T's columns h + h + 4.
// Lane (g, t): K rows p0 + g, p0 + g + 8 as 16-byte loads (dims 8t..8t+7 of
// each 32: the k order is permuted identically in K and Qp); V at positions
// p0 + 2t, +1, +8, +9, dims 8g..8g+7 of each 64, paired into the A
// fragments with byte permutes (row g <-> dim 8g + 2j, row g + 8 <-> +1).

#define AMMA_WARPS 4
#define AMMA_CHUNK (16 * AMMA_WARPS)

// Shared scratch of one unit (floats).
#define AMMA_FLOATS (AMMA_WARPS * 4 * 16 + AMMA_WARPS * 4 * 2 + AMMA_WARPS * 4 * 128 + 16 * 32)

__device__ __forceinline__ unsigned u4_at(uint4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

template <class P>
__device__ __forceinline__ unsigned pack_part(float a, float b, bool lo) {
    u16 ha = P::cvt(a), hb = P::cvt(b);
    if (lo) {
        ha = P::cvt(a - P::f32(ha));
        hb = P::cvt(b - P::f32(hb));
    }
    return (unsigned)ha | ((unsigned)hb << 16);
}

// One warp's K and V fragments for 16 positions p0 .. p0 + 15: K rows
// p0 + g (ka) and p0 + g + 8 (kb), dims 32b + 8t .. + 7; V at positions
// p0 + 2t + {0, 1, 8, 9} (vv[i]), dims 64c + 8g .. + 7. Positions at or past
// `visible` read as zeros; with FUSED, position `cur` comes from knew / vnew
// (shared, in T).
struct AmmaKV {
    uint4 ka[4], kb[4], vv[4][2];
};

template <bool FUSED>
__device__ __forceinline__ void amma_load_k(AmmaKV& r, const u16* __restrict__ kc, size_t first, int p0, int visible,
                                            int kv_dim, int C, int g, int t, const u16* knew, int cur) {
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    int pa = p0 + g, pb = p0 + g + 8;
    const u16* ra = kc + first + (size_t)pa * kv_dim + 8 * t;
    const u16* rb = kc + first + (size_t)pb * kv_dim + 8 * t;
#pragma unroll
    for (int b = 0; b < 4; b++) {
        bool in = b < 2 * C;
        r.ka[b] = (in && pa < visible)
                      ? ((FUSED && pa == cur) ? *(const uint4*)(knew + 32 * b + 8 * t) : __ldg((const uint4*)(ra + 32 * b)))
                      : zero4;
        r.kb[b] = (in && pb < visible)
                      ? ((FUSED && pb == cur) ? *(const uint4*)(knew + 32 * b + 8 * t) : __ldg((const uint4*)(rb + 32 * b)))
                      : zero4;
    }
}

template <bool FUSED>
__device__ __forceinline__ void amma_load_v(AmmaKV& r, const u16* __restrict__ vc, size_t first, int p0, int visible,
                                            int kv_dim, int C, int g, int t, const u16* vnew, int cur) {
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int pp = p0 + 2 * t + (i & 1) + 8 * (i >> 1);
#pragma unroll
        for (int c = 0; c < 2; c++)
            r.vv[i][c] = (c < C && pp < visible)
                             ? ((FUSED && pp == cur) ? *(const uint4*)(vnew + 64 * c + 8 * g)
                                                     : __ldg((const uint4*)(vc + first + (size_t)pp * kv_dim + 64 * c + 8 * g)))
                             : zero4;
    }
}

// Shared scratch of a unit (AMMA_FLOATS floats).
struct AmmaShared {
    float (*pt)[4][16];   // [warp][head][position] probabilities
    float (*wml)[4][2];   // [warp][head] (m, l)
    float (*wo)[4][128];  // [warp][head][dim] outputs
    unsigned (*qbs)[32];  // [fragment][lane] Qp^T fragments
    __device__ explicit AmmaShared(float* s)
        : pt((float(*)[4][16])s),
          wml((float(*)[4][2])(s + AMMA_WARPS * 4 * 16)),
          wo((float(*)[4][128])(s + AMMA_WARPS * 4 * 16 + AMMA_WARPS * 8)),
          qbs((unsigned(*)[32])(s + AMMA_WARPS * 4 * (16 + 2 + 128))) {}
};

// A warp's running state: lane (g, t) tracks heads 2 (t & 1) and + 1.
struct AmmaState {
    float m[2], l[2], acc[2][4][4];
    __device__ void init() {
        m[0] = m[1] = -__int_as_float(0x7f800000);
        l[0] = l[1] = 0.0f;
#pragma unroll
        for (int c = 0; c < 2; c++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[c][j][0] = acc[c][j][1] = acc[c][j][2] = acc[c][j][3] = 0.0f;
    }
};

// Qp^T fragments into shared qbs[4 b + 2 e + {0, 1}] (warp w makes block
// b = w): column g (head g & 3, hi for g < 4, lo above), for each 32-dim
// block b and half e: b0 = dims 32b + 8t + 4e + {0, 1}, b1 = + {2, 3}.
// The caller synchronises before they are read.
template <class P>
__device__ __forceinline__ void amma_qbuild(const float* qh, int ng, int head_dim, float scale, int* flags,
                                            unsigned (*qbs)[32], int warp, int lane) {
    int g = lane >> 2, t = lane & 3, C = head_dim >> 6;
    if (warp >= 2 * C) return;
    int hq = g & 3, b = warp;
    bool live = hq < ng, lo = g >= 4, bad = false;
    const float* qp = qh + (size_t)hq * head_dim;
#pragma unroll
    for (int e = 0; e < 2; e++) {
        float4 v = live ? *(const float4*)(qp + 32 * b + 8 * t + 4 * e) : make_float4(0.f, 0.f, 0.f, 0.f);
        v.x *= scale;
        v.y *= scale;
        v.z *= scale;
        v.w *= scale;
        bad = bad || !(fabsf(v.x) <= P::MAXV && fabsf(v.y) <= P::MAXV && fabsf(v.z) <= P::MAXV && fabsf(v.w) <= P::MAXV);
        qbs[4 * b + 2 * e][lane] = pack_part<P>(v.x, v.y, lo);
        qbs[4 * b + 2 * e + 1][lane] = pack_part<P>(v.z, v.w, lo);
    }
    if (bad) atomicOr(flags, FLAG_NONFINITE);
}

// One warp's 16 positions p0 .. (p0 < visible): scores, the online softmax
// and the weighted values, from kv (K loaded; V too unless LOAD_V, when it is
// loaded after the score products). pt: this warp's [4][16].
template <class P, bool FUSED, bool LOAD_V>
__device__ __forceinline__ void amma_chunk(AmmaState& st, AmmaKV& kv, const unsigned (*qbs)[32], float (*pt)[16],
                                           int p0, int visible, int C, int lane, const u16* __restrict__ vc,
                                           size_t first, int kv_dim, const u16* vnew, int cur) {
    const unsigned full = 0xffffffffu;
    int g = lane >> 2, t = lane & 3;
    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int b = 0; b < 4; b++) {
        if (b < 2 * C) {
#pragma unroll
            for (int e = 0; e < 2; e++)
                P::mma(sc, u4_at(kv.ka[b], 2 * e), u4_at(kv.kb[b], 2 * e), u4_at(kv.ka[b], 2 * e + 1),
                       u4_at(kv.kb[b], 2 * e + 1), qbs[4 * b + 2 * e][lane], qbs[4 * b + 2 * e + 1][lane]);
        }
    }
    if (LOAD_V) amma_load_v<FUSED>(kv, vc, first, p0, visible, kv_dim, C, g, t, vnew, cur);
    // Columns 2t, 2t + 1 of rows g, g + 8: hi (t < 2) or lo parts of
    // heads 2 (t & 1), +1; lane ^ 2 holds the other part.
#pragma unroll
    for (int i = 0; i < 4; i++) sc[i] += __shfl_xor_sync(full, sc[i], 2);
    if (p0 + g >= visible) sc[0] = sc[1] = -__int_as_float(0x7f800000);
    if (p0 + g + 8 >= visible) sc[2] = sc[3] = -__int_as_float(0x7f800000);
    float f[2], pr[4];
#pragma unroll
    for (int e = 0; e < 2; e++) {
        float mx = fmaxf(sc[e], sc[e + 2]);
        mx = fmaxf(mx, __shfl_xor_sync(full, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(full, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(full, mx, 16));
        float mn = fmaxf(st.m[e], mx);  // finite: position p0 is visible
        f[e] = expf(st.m[e] - mn);
        st.m[e] = mn;
        pr[e] = expf(sc[e] - mn);
        pr[e + 2] = expf(sc[e + 2] - mn);
        float sum = pr[e] + pr[e + 2];
        sum += __shfl_xor_sync(full, sum, 4);
        sum += __shfl_xor_sync(full, sum, 8);
        sum += __shfl_xor_sync(full, sum, 16);
        st.l[e] = st.l[e] * f[e] + sum;
    }
#pragma unroll
    for (int c = 0; c < 2; c++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            st.acc[c][j][0] *= f[0];
            st.acc[c][j][1] *= f[1];
            st.acc[c][j][2] *= f[0];
            st.acc[c][j][3] *= f[1];
        }
    // Probabilities through shared memory into Pp^T's layout: column g
    // (head g & 3, hi or lo), positions 2t, 2t + 1 (b0) and 2t + 8, +9 (b1).
    if (t < 2) {
        pt[2 * t][g] = pr[0];
        pt[2 * t + 1][g] = pr[1];
        pt[2 * t][g + 8] = pr[2];
        pt[2 * t + 1][g + 8] = pr[3];
    }
    __syncwarp();
    unsigned pb0, pb1;
    {
        const float* ph = pt[g & 3];
        bool lo = g >= 4;
        pb0 = pack_part<P>(ph[2 * t], ph[2 * t + 1], lo);
        pb1 = pack_part<P>(ph[2 * t + 8], ph[2 * t + 9], lo);
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < 2; c++) {
        if (c < C) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                unsigned w0 = u4_at(kv.vv[0][c], j), w1 = u4_at(kv.vv[1][c], j);
                unsigned w2 = u4_at(kv.vv[2][c], j), w3 = u4_at(kv.vv[3][c], j);
                P::mma(st.acc[c][j], __byte_perm(w0, w1, 0x5410), __byte_perm(w0, w1, 0x7632),
                       __byte_perm(w2, w3, 0x5410), __byte_perm(w2, w3, 0x7632), pb0, pb1);
            }
        }
    }
}

// Head h's maximum over the unit's warps, and its sum of l rescaled to that
// maximum M, merged in order 0 .. AMMA_WARPS - 1 (the part's (m, l)).
__device__ __forceinline__ float amma_head_max(const AmmaShared& sh, int h) {
    float M = -__int_as_float(0x7f800000);
#pragma unroll
    for (int w = 0; w < AMMA_WARPS; w++) M = fmaxf(M, sh.wml[w][h][0]);
    return M;
}
__device__ __forceinline__ float amma_head_sum(const AmmaShared& sh, int h, float M) {
    float L = 0.0f;
#pragma unroll
    for (int w = 0; w < AMMA_WARPS; w++) {
        float m = sh.wml[w][h][0];
        if (m > -__int_as_float(0x7f800000)) L += sh.wml[w][h][1] * expf(m - M);
    }
    return L;
}

// Merges the unit's warps in order 0 .. AMMA_WARPS - 1 and writes
// part[slot0 + h * S] and ml; starts and ends with a unit barrier. DIRECT
// (a unit that covers all of its row's positions, S = 1): writes instead
// the combined output of head h at out + h * head_dim, with the arithmetic
// combine_head applies to one part (the same bits), raising
// FLAG_NONFINITE as it does.
template <bool FUSED, bool DIRECT = false>
__device__ void amma_finish(AmmaState& st, const AmmaShared& sh, size_t slot0, int S, int ng, int head_dim,
                            float* part, float* ml, int tid, int sync_id, float* out = nullptr,
                            int* flags = nullptr, unsigned long long* trace = nullptr) {
    const unsigned full = 0xffffffffu;
    int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3, C = head_dim >> 6;
    // hi + lo columns; lanes t < 2 then hold O[2t][..] (acc[][][0], [2]) and
    // O[2t + 1][..] ([1], [3]) at dims 64c + 8g + 2j (+1 for [2], [3]).
#pragma unroll
    for (int c = 0; c < 2; c++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) st.acc[c][j][i] += __shfl_xor_sync(full, st.acc[c][j][i], 2);
    if (t < 2) {
        if (g == 0) {
            sh.wml[warp][2 * t][0] = st.m[0];
            sh.wml[warp][2 * t][1] = st.l[0];
            sh.wml[warp][2 * t + 1][0] = st.m[1];
            sh.wml[warp][2 * t + 1][1] = st.l[1];
        }
#pragma unroll
        for (int c = 0; c < 2; c++) {
            if (c < C) {
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    int d = 64 * c + 8 * g + 2 * j;
                    sh.wo[warp][2 * t][d] = st.acc[c][j][0];
                    sh.wo[warp][2 * t + 1][d] = st.acc[c][j][1];
                    sh.wo[warp][2 * t][d + 1] = st.acc[c][j][2];
                    sh.wo[warp][2 * t + 1][d + 1] = st.acc[c][j][3];
                }
            }
        }
    }
    unit_sync(FUSED ? sync_id : 0);
    SUBT(trace, 4);
    for (int i = tid; i < ng * head_dim; i += AMMA_WARPS * 32) {
        int h = i / head_dim, d = i - h * head_dim;
        float M = amma_head_max(sh, h);
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < AMMA_WARPS; w++) {
            float m = sh.wml[w][h][0];
            if (m > -__int_as_float(0x7f800000)) o += sh.wo[w][h][d] * expf(m - M);
        }
        if constexpr (DIRECT) {
            // The (m, l) pair the second loop below would store, then
            // combine_head over that one part.
            float L = amma_head_sum(sh, h, M);
            float Mc = fmaxf(-__int_as_float(0x7f800000), M);
            float Lc = 0.0f;
            Lc += L * expf(M - Mc);
            float inv = 1.0f / Lc;
            float oc = 0.0f;
            if (M > -__int_as_float(0x7f800000)) oc += o * expf(M - Mc);
            oc *= inv;
            if (!isfinite(oc)) atomicOr(flags, FLAG_NONFINITE);
            out[(size_t)h * head_dim + d] = oc;
        } else {
            part[(slot0 + (size_t)h * S) * head_dim + d] = o;
        }
    }
    if (!DIRECT && tid < ng) {
        int h = tid;
        float M = amma_head_max(sh, h);
        float L = amma_head_sum(sh, h, M);
        size_t slot = slot0 + (size_t)h * S;
        ml[2 * slot] = M;
        ml[2 * slot + 1] = L;
    }
    unit_sync(FUSED ? sync_id : 0);
}

// Copies n4 float4s of read-only data into shared memory by threads t of
// nt, 4 loads in flight each (not inlined: inlined into the fused kernel's
// attention stage it cost registers there).
__device__ __noinline__ void stage_f4_by(float4* dst, const float4* src, int n4, int t, int nt) {
    for (int b = 0; b < n4; b += 4 * nt) {
        float4 v[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int i = b + j * nt + t;
            if (i < n4) v[j] = __ldg(src + i);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int i = b + j * nt + t;
            if (i < n4) dst[i] = v[j];
        }
    }
}

// One unit of the fused kernel: heads head0 .. head0 + ng - 1 (ng <= 4) of
// one row, q (f32, unscaled) at qh + h * head_dim, over the chunks s, s + S,
// ... of its visible positions, whose K/V start at `first`; half a CTA
// synchronised by named barrier sync_id; position `cur` (if >= 0) takes K
// and V from knew / vnew. Writes part[slot0 + h * S] and ml (DIRECT, S = 1:
// the combined output at out + h * head_dim; see amma_finish); raises
// FLAG_NONFINITE if q * scale is not finite in T.
template <class P, bool DIRECT = false>
__device__ void attention_mma_unit(const float* qh, const u16* __restrict__ kc, const u16* __restrict__ vc,
                                   size_t first, int visible, int s, int S, int ng, int head_dim, int kv_dim,
                                   float scale, const u16* knew, const u16* vnew, int cur, size_t slot0, float* part,
                                   float* ml, int* flags, int tid, int sync_id, float* scratch,
                                   float* out = nullptr, unsigned long long* trace = nullptr) {
    AmmaShared sh(scratch);
    int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3, C = head_dim >> 6;
    amma_qbuild<P>(qh, ng, head_dim, scale, flags, sh.qbs, warp, lane);
    unit_sync(sync_id);
    SUBT(trace, 2);
    AmmaState st;
    st.init();
    AmmaKV kv;
    for (int c0 = s * AMMA_CHUNK; c0 < visible; c0 += S * AMMA_CHUNK) {
        int p0 = c0 + 16 * warp;
        if (p0 >= visible) continue;  // warp-uniform
        amma_load_k<true>(kv, kc, first, p0, visible, kv_dim, C, g, t, knew, cur);
        amma_chunk<P, true, true>(st, kv, sh.qbs, sh.pt[warp], p0, visible, C, lane, vc, first, kv_dim, vnew, cur);
    }
    SUBT(trace, 3);
    amma_finish<true, DIRECT>(st, sh, slot0, S, ng, head_dim, part, ml, tid, sync_id, out, flags, trace);
    SUBT(trace, 5);
}

// The per-operation kernel: one unit per CTA, grid (rows, n_kv_heads *
// ceil(G / 4), S); the first chunk's K and V are in flight while q is
// prepared. Same arithmetic, per unit, as attention_mma_unit. (Persistent
// CTAs that load the next unit's first chunk during a unit's merge measured
// slower on the H200: 1.41 vs 1.21 ms of attention per step at batch 128.)
template <class P>
__device__ void attention_mma_impl(const float* __restrict__ q, const u16* __restrict__ kc,
                                   const u16* __restrict__ vc, const int* pos, const int* base, float* part,
                                   float* ml, int* flags, int n_heads, int n_kv_heads, int head_dim, float scale) {
    __shared__ __align__(16) float scratch[AMMA_FLOATS];
    AmmaShared sh(scratch);
    pdl_begin();
    int r = blockIdx.x, s = blockIdx.z, S = gridDim.z;
    int G = n_heads / n_kv_heads, hgroups = (G + 3) / 4;
    int kvh = blockIdx.y / hgroups, hg = blockIdx.y % hgroups;
    int head0 = kvh * G + hg * 4, ng = min(4, G - hg * 4);
    int hidden = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, C = head_dim >> 6;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    int visible = pos[r] + 1;
    size_t first = (size_t)base[r] * kv_dim + (size_t)kvh * head_dim;
    AmmaKV kv;
    const int c_first = s * AMMA_CHUNK;
    if (c_first + 16 * warp < visible) {
        amma_load_k<false>(kv, kc, first, c_first + 16 * warp, visible, kv_dim, C, g, t, nullptr, -1);
        amma_load_v<false>(kv, vc, first, c_first + 16 * warp, visible, kv_dim, C, g, t, nullptr, -1);
    }
    amma_qbuild<P>(q + (size_t)r * hidden + (size_t)head0 * head_dim, ng, head_dim, scale, flags, sh.qbs, warp, lane);
    __syncthreads();
    AmmaState st;
    st.init();
    for (int c0 = c_first; c0 < visible; c0 += S * AMMA_CHUNK) {
        int p0 = c0 + 16 * warp;
        if (p0 >= visible) continue;  // warp-uniform
        if (c0 != c_first) {
            amma_load_k<false>(kv, kc, first, p0, visible, kv_dim, C, g, t, nullptr, -1);
            amma_load_v<false>(kv, vc, first, p0, visible, kv_dim, C, g, t, nullptr, -1);
        }
        amma_chunk<P, false, false>(st, kv, sh.qbs, sh.pt[warp], p0, visible, C, lane, vc, first, kv_dim, nullptr, -1);
    }
    amma_finish<false>(st, sh, ((size_t)r * n_heads + head0) * S + s, S, ng, head_dim, part, ml, tid, 0);
}

#define ATTENTION_MMA(NAME, P)                                                                         \
    extern "C" __global__ void __launch_bounds__(128, 4)                                               \
        NAME(const float* q, const u16* kc, const u16* vc, const int* pos, const int* base, float* part, float* ml, \
             int* flags, int n_heads, int n_kv_heads, int head_dim, float scale) {                     \
        attention_mma_impl<P>(q, kc, vc, pos, base, part, ml, flags, n_heads, n_kv_heads, head_dim, scale); \
    }
ATTENTION_MMA(attention_mma_f16, F16)
ATTENTION_MMA(attention_mma_bf16, BF16)

// ---------------------------------------------------------------------------
// Fused decode step: every layer of a decode pass of up to FUSED_ROWS rows in
// one persistent kernel (launched cooperatively, so all CTAs are resident),
// with grid-wide barriers between the stages that need all of the previous
// one. Per layer:
//   A  RMSNorm + int8 quantisation of x (every CTA, into shared memory),
//      then the q|k|v rows of this CTA's units                  -> barrier
//   C  attention units (half a CTA each: row, query head, split): RoPE of
//      q and of the new k (the first query head of each kv head also writes
//      k and v into the cache; the others take the new position's k and v
//      from shared memory, so no unit reads a slot written in this stage);
//      the last unit of a (row, head) to finish combines its splits -> barrier
//   D  sub-norm of the attention output, o rows, added into x -> barrier
//   E  FFN norm of x, gate/up rows, relu^2 * up into h        -> barrier
//   F  FFN sub-norm of h, down rows, added into x             -> barrier
// Every CTA prefetches into L2 the weight rows it will multiply next (see
// fused_prefetch_at), so weights stream from memory while the CTAs wait at
// barriers.
//
// Every stage runs the same device code, in the same arithmetic order, as
// the separate kernels (one block of 256 threads per norm row, exact int32
// projections, attention units and the combine in a fixed order), so the
// results are bit-identical to theirs for the same split count S.
//
// Data other CTAs write during the launch (x, qkv, attn, h, the attention
// parts) is read through L2 (ld.global.cg); weights and the caches' earlier
// positions through the read-only path.

#define FUSED_ROWS 2
#define FUSED_NORM_LOADS 16  // the loads fused_norm_n writes out (NORM_LOAD)
static_assert(FUSED_NORM_LOADS == 16, "fused_norm_n issues NORM_LOAD(0) .. NORM_LOAD(15)");
#define FUSED_THREADS 256

// One layer's weights (host layout: 11 pointers, then 8 floats; 120 bytes).
struct FusedLayer {
    const u8* qkv;
    const u8* o;
    const u8* gate;
    const u8* up;
    const u8* down;
    const float* attn_norm;
    const float* attn_sub_norm;
    const float* ffn_norm;
    const float* ffn_sub_norm;
    void* k_cache;
    void* v_cache;
    float qkv_s0, qkv_s1, qkv_s2, o_s, gate_s, up_s, down_s, pad;
};
static_assert(sizeof(FusedLayer) == 120, "host layout: 11 pointers, then 8 floats");

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Grid-wide barrier on a counter zeroed before the launch: barrier number
// `epoch` (1, 2, ...) waits until every CTA has arrived epoch times. Writes
// before it are visible to every CTA after it (release/acquire at gpu scope).
// With a trace buffer, trace[3e - 2 .. 3e] = CTA 0's arrival, the last
// CTA's arrival and CTA 0's departure (ns) of barrier e; after those 15 per
// layer, 4 per layer: when CTA 0 finished each norm.
__device__ __forceinline__ void grid_sync(unsigned* bar, unsigned epoch, unsigned long long* trace) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned target = epoch * gridDim.x;
        if (trace && blockIdx.x == 0) trace[3 * epoch - 2] = global_ns();
        // Release (the CTA's writes, ordered before this by the CTA
        // barrier) then the arrival; the acquiring loads below pair with
        // the other CTAs' releases (CUTLASS's generic barrier does the same).
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
        if (trace) {
            unsigned before = atomicAdd(bar, 1u);
            if (before == target - 1) trace[3 * epoch - 1] = global_ns();
        } else {
            asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
        }
        unsigned v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
        } while (v < target);
        if (trace && blockIdx.x == 0) trace[3 * epoch] = global_ns();
    }
    __syncthreads();
}

// Copies n4 float4s of read-only data (never written during the launch)
// from global memory into shared memory with up to 4 loads per thread in
// flight.
__device__ __forceinline__ void stage_f4(float4* dst, const float4* src, int n4) {
    const int nt = blockDim.x;
    for (int b = 0; b < n4; b += 4 * nt) {
        float4 v[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int i = b + j * nt + threadIdx.x;
            if (i < n4) v[j] = __ldg(src + i);
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int i = b + j * nt + threadIdx.x;
            if (i < n4) dst[i] = v[j];
        }
    }
}

// RMSNorm + quantisation of n <= FUSED_ROWS rows of width values (src in
// global memory, written by other CTAs) into shared q8 / scale / qsum,
// exactly as rmsnorm_quant_f32 computes each row: every thread visits the
// same elements in the same order, and each block reduction uses the same
// warp trees and the same order over warps; the rows only share the passes
// and the barriers. The rows are first copied into shared xs (n x width)
// with many loads in flight (the normalised values then replace them, for
// the quantisation pass); the caller has copied the norm weights into
// shared sw (fused_stage_w) before the barrier that precedes the norm.
// dsl/fsl/isl: shared [FUSED_THREADS / 32][FUSED_ROWS].
template <int NR>
__device__ void fused_norm_n(const float* src, float eps, int width, int n, i8* q8, float* scale,
                           int* qsum, int* flags, float* sw, float* xs, double (*dsl)[FUSED_ROWS],
                           float (*fsl)[FUSED_ROWS], int (*isl)[FUSED_ROWS], unsigned long long* st, int bar) {
    const int nw = FUSED_THREADS / 32;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Each thread loads its elements (i = tid, tid + 256, ...: the order of
    // the sums) up to FUSED_NORM_LOADS at a time, all in flight, and sums
    // their squares straight from the registers as it stores them (with
    // NORM_2PASS also max |x w|, NaN or inf if any x w is).
    double ss[NR];
    float mxw[NR];
#pragma unroll
    for (int r = 0; r < NR; r++) {
        ss[r] = 0.0;
        mxw[r] = 0.0f;
    }
#pragma unroll
    for (int r = 0; r < NR; r++) {
        if (r < n) {
            const float* s = src + (size_t)r * width;
            float* d = xs + (size_t)r * width;
            for (int b = threadIdx.x; b < width; b += FUSED_NORM_LOADS * FUSED_THREADS) {
                float v[FUSED_NORM_LOADS];
#define NORM_LOAD(j) v[j] = ldcg_f_if<(j) * FUSED_THREADS * 4>(s + b, b + (j) * FUSED_THREADS < width)
                NORM_LOAD(0); NORM_LOAD(1); NORM_LOAD(2); NORM_LOAD(3); NORM_LOAD(4); NORM_LOAD(5);
                NORM_LOAD(6); NORM_LOAD(7); NORM_LOAD(8); NORM_LOAD(9); NORM_LOAD(10); NORM_LOAD(11);
                NORM_LOAD(12); NORM_LOAD(13); NORM_LOAD(14); NORM_LOAD(15);
#undef NORM_LOAD
#pragma unroll
                for (int j = 0; j < FUSED_NORM_LOADS; j++) {
                    int i = b + j * FUSED_THREADS;
                    if (i < width) {
                        ss[r] += (double)v[j] * (double)v[j];
                        if (NORM_2PASS) mxw[r] = fmax_nan(mxw[r], fabsf(__fmul_rn(v[j], sw[i])));
                        d[i] = v[j];
                    }
                }
            }
        }
    }
    SUBT(st, 2);
#pragma unroll
    for (int r = 0; r < NR; r++) {
        if (r < n) {
            double t = warp_sum_d(ss[r]);
            if (lane == 0) dsl[warp][r] = t;
            if (NORM_2PASS) {
                float m = warp_max_f(isfinite(mxw[r]) ? mxw[r] : __int_as_float(0x7f800000));
                if (lane == 0) fsl[warp][r] = m;
            }
        }
    }
    tile_sync(bar);
    SUBT(st, 3);
    InvF64 inv[NR];
#pragma unroll
    for (int r = 0; r < NR; r++) {
        inv[r] = inv_split(1.0);
        if (r < n) {
            double t = 0.0;
            for (int k = 0; k < nw; k++) t += dsl[k][r];
            inv[r] = inv_split(1.0 / sqrt(t / (double)width + (double)eps));
        }
    }
    if (!NORM_2PASS) {
        float amax[NR];
        bool finite[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) {
            amax[r] = 0.0f;
            finite[r] = true;
        }
        for (int i = threadIdx.x; i < width; i += FUSED_THREADS) {
            float wi = sw[i];
            float x[NR];
#pragma unroll
            for (int r = 0; r < NR; r++)
                if (r < n) x[r] = xs[(size_t)r * width + i];
#pragma unroll
            for (int r = 0; r < NR; r++) {
                if (r < n) {
                    float v = __fmul_rn(mul_inv(x[r], inv[r]), wi);
                    finite[r] = finite[r] && isfinite(v);
                    amax[r] = fmaxf(amax[r], fabsf(v));
                    xs[(size_t)r * width + i] = v;  // the quantisation pass reads v back
                }
            }
        }
#pragma unroll
        for (int r = 0; r < NR; r++) {
            if (r < n) {
                float m = warp_max_f(finite[r] ? amax[r] : __int_as_float(0x7f800000));
                if (lane == 0) fsl[warp][r] = m;
            }
        }
        tile_sync(bar);
    }
    SUBT(st, 4);
    float sc[NR];
#pragma unroll
    for (int r = 0; r < NR; r++) {
        sc[r] = 0.0f;
        if (r < n) {
            float m = fsl[0][r];
            for (int k = 1; k < nw; k++) m = fmaxf(m, fsl[k][r]);
            if (NORM_2PASS) m = mul_inv(m, inv[r]);  // = max |v|; inf or NaN if any v is not finite
            if (!isfinite(m)) {
                if (threadIdx.x == 0) atomicOr(flags, FLAG_NONFINITE);
                m = 1.0f;
            }
            sc[r] = __fmul_rn(__fdiv_rn(1.0f, fmaxf(m, 1e-5f)), 127.0f);
        }
    }
    int sum[NR];
#pragma unroll
    for (int r = 0; r < NR; r++) sum[r] = 0;
    for (int i = threadIdx.x; i < width; i += FUSED_THREADS) {
        float wi = NORM_2PASS ? sw[i] : 0.0f;
#pragma unroll
        for (int r = 0; r < NR; r++) {
            if (r < n) {
                float x = xs[(size_t)r * width + i];
                float v = NORM_2PASS ? mul_inv(__fmul_rn(x, wi), inv[r]) : x;
                int qi = quant_i8(__fmul_rn(v, sc[r]));
                q8[(size_t)r * width + i] = (i8)qi;
                sum[r] += qi;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < NR; r++) {
        if (r < n) {
            int t = warp_sum_i(sum[r]);
            if (lane == 0) isl[warp][r] = t;
        }
    }
    tile_sync(bar);
    SUBT(st, 5);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int r = 0; r < NR; r++) {
            if (r < n) {
                int t = 0;
                for (int k = 0; k < nw; k++) t += isl[k][r];
                scale[r] = sc[r];
                qsum[r] = t;
            }
        }
    }
    tile_sync(bar);
    SUBT(st, 6);
}

// fused_norm_n for one row or FUSED_ROWS (fewer live registers for one).
// Run by the first FUSED_THREADS threads of the CTA, synchronised by
// tile_sync(bar) (0: the CTA is those threads).
__device__ void fused_norm(const float* src, float eps, int width, int n, i8* q8, float* scale,
                           int* qsum, int* flags, float* sw, float* xs, double (*dsl)[FUSED_ROWS],
                           float (*fsl)[FUSED_ROWS], int (*isl)[FUSED_ROWS], unsigned long long* st, int bar) {
    if (n <= 1)
        fused_norm_n<1>(src, eps, width, n, q8, scale, qsum, flags, sw, xs, dsl, fsl, isl, st, bar);
    else
        fused_norm_n<FUSED_ROWS>(src, eps, width, n, q8, scale, qsum, flags, sw, xs, dsl, fsl, isl, st, bar);
}

// Copies norm weights into shared sw for the next stage's fused_norm, if this
// CTA has units in that stage: done before the barrier
// that precedes the stage, so the copy overlaps the wait. (Measured on the
// H200: as cp.async copies, waited for in the norm or at the barrier's end,
// batch-1 steps are 2.5-4% slower in BF16 and FP32.)
__device__ __forceinline__ void fused_stage_w(float* sw, const float* w, int width, int stage_units) {
    if ((int)blockIdx.x < stage_units) stage_f4((float4*)sw, (const float4*)w, width >> 2);
}

// The fused kernel's CTAs of FUSED_THREADS threads: a CTA of 2 x
// FUSED_THREADS runs two, half h being virtual CTA blockIdx.x + h x
// gridDim.x of a grid of 2 x gridDim.x (fused_decode_impl).
__device__ __forceinline__ int fused_halves() { return (int)blockDim.x / FUSED_THREADS; }
__device__ __forceinline__ int fused_vb() { return (int)blockIdx.x + (int)(threadIdx.x / FUSED_THREADS) * (int)gridDim.x; }
__device__ __forceinline__ int fused_vgrid() { return (int)gridDim.x * fused_halves(); }

// Prefetches into L2 the weight rows this virtual CTA multiplies in stage
// `which` (0 q|k|v, 1 o, 2 gate/up, 3 down) of layer L.
__device__ void fused_prefetch(const FusedLayer& L, int which, int hidden, int qkv_rows, int inter) {
    const int vb = fused_vb(), vg = fused_vgrid(), t = threadIdx.x % FUSED_THREADS;
    if (which == 0)
        for (int u = vb; u * 16 < qkv_rows; u += vg)
            ternary_unit_prefetch<0, 1>(u, L.qkv, L.qkv, qkv_rows, hidden, t, FUSED_THREADS);
    if (which == 1)
        for (int u = vb; u * 16 < hidden; u += vg)
            ternary_unit_prefetch<1, 1>(u, L.o, L.o, hidden, hidden, t, FUSED_THREADS);
    if (which == 2)
        for (int u = vb; u * 32 < inter; u += vg)
            ternary_unit_prefetch<2, 4>(u, L.gate, L.up, inter, hidden, t, FUSED_THREADS);
    if (which == 3)
        for (int u = vb; u * 16 < hidden; u += vg)
            ternary_unit_prefetch<1, 1>(u, L.down, L.down, hidden, inter, t, FUSED_THREADS);
}

// Prefetch schedule (the kernel's `prefetch` argument): 0 none; 1 at each
// layer's start, all of the next layer's rows; 2 at each projection stage's
// start, the rows of the next projection stage (the next layer's q|k|v
// after down).
__device__ __forceinline__ void fused_prefetch_at(const FusedLayer* layers, int n_layers, int l, int which,
                                                  int mode, int hidden, int qkv_rows, int inter) {
    if (mode == 1 && which == 0 && l + 1 < n_layers)
        for (int k = 0; k < 4; k++) fused_prefetch(layers[l + 1], k, hidden, qkv_rows, inter);
    if (mode == 2) {
        if (which < 3)
            fused_prefetch(layers[l], which + 1, hidden, qkv_rows, inter);
        else if (l + 1 < n_layers)
            fused_prefetch(layers[l + 1], 0, hidden, qkv_rows, inter);
    }
}

// The start of projection stage `which` (0 q|k|v, 1 o, 2 gate/up, 3 down)
// of layer l: the weight prefetch of schedule `mode` (fused_prefetch_at),
// then, where this CTA has units in the stage (`active`), the norm of src
// into q8 / scale / qsum by its first half; every thread of the CTA returns
// after the norm.
__device__ __forceinline__ void fused_stage_start(bool active, const FusedLayer* layers, int n_layers, int l, int which,
                                                  int mode, int hidden, int qkv_rows, int inter, const float* src,
                                                  float eps, int width, int n, i8* q8, float* scale, int* qsum,
                                                  int* flags, float* sw, float* xs, double (*dsl)[FUSED_ROWS],
                                                  float (*fsl)[FUSED_ROWS], int (*isl)[FUSED_ROWS],
                                                  unsigned long long* st, int bar, int hf, int halves) {
    fused_prefetch_at(layers, n_layers, l, which, mode, hidden, qkv_rows, inter);
    SUBT(st, 1);
    if (active) {
        if (hf == 0) fused_norm(src, eps, width, n, q8, scale, qsum, flags, sw, xs, dsl, fsl, isl, st, bar);
        if (halves > 1) __syncthreads();
    }
}

// Per attention half-CTA (floats): sc [32], red [4][ATT_MAX_HD], q, new k,
// new v [ATT_MAX_HD] each; or, on tensor cores, the unit's scratch, q of
// four heads and the new k and v in T.
#define FUSED_ATT_SCALAR (ATT_CHUNK + ATT_WARPS * ATT_MAX_HD + 3 * ATT_MAX_HD)
#define FUSED_ATT_MMA (AMMA_FLOATS + 4 * 128 + 128)
#define FUSED_ATT_FLOATS (FUSED_ATT_SCALAR > FUSED_ATT_MMA ? FUSED_ATT_SCALAR : FUSED_ATT_MMA)

// One decode unit on tensor cores: RoPE of the group's q into shared
// memory; if the unit's split covers the new position, RoPE of its k, and k
// and v rounded to T into shared memory (the first group of the kv head also
// writing them into the caches), then attention_mma_unit. Shared by the
// fused kernel's stage C and attention_mma_rope. a: FUSED_ATT_MMA floats
// (the unit's scratch, q of 4 heads, the new k and v in T). DIRECT (S = 1):
// the unit writes its heads' output into out + head0 * head_dim (the row's).
template <class P, bool DIRECT = false>
__device__ void amma_decode_unit(const float* qkv, const int* pos, const int* base, const float* cos_t,
                                 const float* sin_t, typename P::T* kc, typename P::T* vc, float* part, float* ml,
                                 int* flags, int r, int kvh, int head0, int ng, bool first_group, int s, int S,
                                 int n_heads, int n_kv_heads, int head_dim, float scale, int tid, int sid, float* a,
                                 float* out = nullptr, unsigned long long* trace = nullptr) {
    int hidden = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, half = head_dim / 2;
    int qkv_rows = hidden + 2 * kv_dim;
    float* scratch = a;                // AMMA_FLOATS
    float* qs = a + AMMA_FLOATS;       // [4][128]
    u16* knew = (u16*)(qs + 4 * 128);  // [128]
    u16* vnew = knew + 128;            // [128]
    int p = pos[r];
    bool covers = (p / AMMA_CHUNK) % S == s;
    bool writer = covers && first_group;
    const float* row = qkv + (size_t)r * qkv_rows;
    const float* cs = cos_t + (size_t)p * half;
    const float* sn = sin_t + (size_t)p * half;
    size_t slot = (size_t)(base[r] + p) * kv_dim + (size_t)kvh * head_dim;
    // q pairs of the group, the k pairs and v (when covering): every
    // load of an item is issued before its products.
    int items = max(ng * half, covers ? head_dim : 0);
    for (int i = tid; i < items; i += AMMA_WARPS * 32) {
        bool dq = i < ng * half, dk = covers && i < half, dv = covers && i < head_dim;
        int h = i / half, ii = i - h * half;
        size_t o = (size_t)(head0 + h) * head_dim + ii, ko = hidden + (size_t)kvh * head_dim + i;
        float x0 = 0.f, x1 = 0.f, k0 = 0.f, k1 = 0.f, v = 0.f;
        if (dq) {
            x0 = ldcg_f(row + o);
            x1 = ldcg_f(row + o + half);
        }
        if (dk) {
            k0 = ldcg_f(row + ko);
            k1 = ldcg_f(row + ko + half);
        }
        if (dv) v = ldcg_f(row + hidden + kv_dim + (size_t)kvh * head_dim + i);
        if (dq) {
            float2 y = rope_rot(x0, x1, cs[ii], sn[ii]);
            qs[h * head_dim + ii] = y.x;
            qs[h * head_dim + ii + half] = y.y;
        }
        if (dk) {
            float2 y = rope_rot(k0, k1, cs[i], sn[i]);
            knew[i] = P::cvt(y.x);
            knew[i + half] = P::cvt(y.y);
            if (writer) {
                P::store(kc, slot + i, y.x);
                P::store(kc, slot + i + half, y.y);
            }
        }
        if (dv) {
            vnew[i] = P::cvt(v);
            if (writer) P::store(vc, slot + i, v);
        }
    }
    unit_sync(sid);
    SUBT(trace, 1);
    attention_mma_unit<P, DIRECT>(qs, kc, vc, (size_t)base[r] * kv_dim + (size_t)kvh * head_dim, p + 1, s, S,
                                       ng, head_dim, kv_dim, scale, knew, vnew, covers ? p : -1, ((size_t)r * n_heads + head0) * S + s, part,
                                       ml, flags, tid, sid, scratch, DIRECT ? out + (size_t)head0 * head_dim : nullptr, trace);
}

// Stage C of the fused kernel on tensor cores (P::MMA, head_dim 64 or 128):
// units of half a CTA, one per (row, kv head, group of its query heads,
// split); RoPE of the group's q into shared memory; the units whose split
// covers the new position RoPE its k and take k and v from shared memory
// (rounded to T), the first group also writing them into the caches; the
// last unit of a (row, group) to finish combines its heads' splits. Same
// arithmetic per head as rope_kv + attention_mma + attention_combine: a
// head's results do not depend on the other heads of its unit, so groups
// here are of one head when groups of four would leave most units idle
// (small batches). a: this half-CTA's FUSED_ATT_FLOATS.
// The first attention unit of half-CTA hh (then every 2 x grid): units go
// to the first halves of all CTAs before any second half, so the few units
// of a small batch land on as many SMs (measured on the H200, 2B-4T, batch
// 1, against units 2b and 2b + 1 on CTA b: BF16 1.428 / 1.429 -> 1.384 /
// 1.386 ms/step at prompt 128, the attention stage 9.1 -> 6.3 us per layer;
// FP32 unchanged), and from the last CTA down, so the first CTAs, which
// have the projection units and the most norm weights to stage, are the
// ones free to stage them during stage C (SEP_W).
#define FUSED_UNIT0(hh) ((hh) * (int)gridDim.x + (int)gridDim.x - 1 - (int)blockIdx.x)
// Attention units in flight: one per 128 threads of every CTA (the step
// between a unit slot's units).
#define FUSED_SLOTS ((int)gridDim.x * ((int)blockDim.x / 128))

// Query heads per tensor-core unit of the fused kernel's stage C: one when
// groups of four would leave most units idle (small batches), else four.
__device__ __forceinline__ int fused_att_hpu(int n, int n_kv_heads, int G, int S) {
    return n * n_kv_heads * ((G + 3) / 4) * S < FUSED_SLOTS ? 1 : 4;
}

// The units of the fused kernel's stage C: on tensor cores one per (row, kv
// head, group of fused_att_hpu query heads, split), else one per (row,
// query head, split).
template <bool MMA>
__device__ __forceinline__ int fused_att_units(int n, int n_heads, int n_kv_heads, int S) {
    int G = n_heads / n_kv_heads;
    if (MMA) {
        int hpu = fused_att_hpu(n, n_kv_heads, G, S);
        return n * n_kv_heads * ((G + hpu - 1) / hpu) * S;
    }
    return n * n_heads * S;
}

template <class P>
__device__ __forceinline__ void fused_attention_mma(const float* qkv, const int* pos, const int* base, const float* cos_t,
                                    const float* sin_t, typename P::T* kc, typename P::T* vc, float* attn, float* part,
                                    float* ml, unsigned* done, int* flags, int n, int n_heads, int n_kv_heads,
                                    int head_dim, int S, float scale, int layer, float* a, int* last,
                                    unsigned long long* trace = nullptr, unsigned long long* utrace = nullptr) {
    int hh = threadIdx.x / (AMMA_WARPS * 32), tid = threadIdx.x % (AMMA_WARPS * 32), sid = 1 + hh;
    int hidden = n_heads * head_dim, G = n_heads / n_kv_heads;
    int hpu = fused_att_hpu(n, n_kv_heads, G, S), hgroups = (G + hpu - 1) / hpu;
    float* scratch = a;  // the unit's scratch, free again after amma_decode_unit
    int units = fused_att_units<true>(n, n_heads, n_kv_heads, S);
    for (int u = FUSED_UNIT0(hh); u < units; u += FUSED_SLOTS) {
        int r = u / (n_kv_heads * hgroups * S), y = (u / S) % (n_kv_heads * hgroups), s = u % S;
        int kvh = y / hgroups, hg = y % hgroups, head0 = kvh * G + hg * hpu, ng = min(hpu, G - hg * hpu);
        size_t slot0 = ((size_t)r * n_heads + head0) * S;
        unsigned long long* ut = trace;
#if FUSED_UNITTRACE
        // This unit's 12 entries (units of the first quarters only: SUBT
        // records thread 0's clock).
        ut = utrace && u < FUSED_UT_UNITS ? utrace + ((size_t)layer * FUSED_UT_UNITS + u) * 12 : nullptr;
        if (ut && threadIdx.x == 0) {
            bool covers = (pos[r] / AMMA_CHUNK) % S == s;
            ut[9] = global_ns();
            ut[11] = blockIdx.x | (unsigned long long)covers << 16 | (unsigned long long)(covers && hg == 0) << 17;
        }
        SUBT(ut, 0);
#endif
        amma_decode_unit<P>(qkv, pos, base, cos_t, sin_t, kc, vc, part, ml, flags, r, kvh, head0, ng, hg == 0, s, S,
                            n_heads, n_kv_heads, head_dim, scale, tid, sid, a, nullptr, ut);
        // The last of the S units of (r, group) to finish combines them.
        __threadfence();
        unit_sync(sid);
        SUBT(ut, 6);
        if (tid == 0) {
            unsigned before = atomicAdd(done + (size_t)r * n_heads + head0, 1u);
            last[hh] = before == (unsigned)((layer + 1) * S - 1);
            __threadfence();
        }
        unit_sync(sid);
        SUBT(ut, 7);
        if (last[hh]) {
            for (int h = 0; h < ng; h++) {
                combine_head<true>(part, ml, slot0 + (size_t)h * S, S, head_dim,
                                   attn + (size_t)r * hidden + (size_t)(head0 + h) * head_dim, flags, tid,
                                   AMMA_WARPS * 32, scratch, sid);
                unit_sync(sid);
            }
        }
        unit_sync(sid);
        SUBT(ut, 8);
#if FUSED_UNITTRACE
        if (ut && threadIdx.x == 0) ut[10] = global_ns() | (unsigned long long)last[hh] << 63;
#endif
    }
}

// The per-operation kernel's first chunk of K and V rows (its first four
// chunks when S = 1; positions before p, which no kernel of this step
// writes) into L2, issued before pdl_wait: they stream in while the
// previous kernel (the q|k|v product) finishes. A prefetch holds no
// registers (K loaded into registers spilled them) and cannot change
// results; pos and base are the step's inputs, copied before its first
// kernel. Measured on the H200 (BF16 decode): after pdl_wait, while q, k
// and v were read and rotated, it made batch 32 2% faster; moved before
// pdl_wait, 0.5-1.5% more at batches 16-64. The fused kernel, where it
// measured 1% slower, does not prefetch.
template <class P>
__device__ __forceinline__ void amma_kv_prefetch(const typename P::T* kc, const typename P::T* vc, const int* pos,
                                                 const int* base, int r, int kvh, int s, int S, int kv_dim,
                                                 int head_dim, int tid) {
    int p = pos[r];
    int lines = (head_dim * 2 + 127) / 128;  // 128-byte lines of a row
    size_t first = (size_t)base[r] * kv_dim + (size_t)kvh * head_dim;
    int n = S == 1 ? min(p, 4 * AMMA_CHUNK) : AMMA_CHUNK;  // positions from s * AMMA_CHUNK
    for (int i = tid; i < n * lines; i += AMMA_WARPS * 32) {
        int pp = s * AMMA_CHUNK + i / lines;
        size_t o = first + (size_t)pp * kv_dim + (size_t)(i % lines) * 64;
        if (pp < p) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(kc + o));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(vc + o));
        }
    }
}

// Decode rows (each the next position of its own sequence) on tensor cores
// without a separate rope_kv launch: q, k and v straight from qkv, as the
// fused kernel's stage C does (same arithmetic as rope_kv + attention_mma).
// With one split (S = 1) each unit writes its heads' output into attn
// itself (the arithmetic attention_combine applies to one part), so no
// combine launch follows. grid (rows, n_kv_heads * ceil(G / 4), S), block 128.
template <class P>
__device__ void attention_mma_rope_impl(const float* qkv, const int* pos, const int* base, const float* cos_t,
                                        const float* sin_t, u16* kc, u16* vc, float* part, float* ml, float* attn,
                                        int* flags, int n_heads, int n_kv_heads, int head_dim, float scale) {
    __shared__ __align__(16) float a[FUSED_ATT_MMA];
    pdl_trigger();
    int G = n_heads / n_kv_heads, hgroups = (G + 3) / 4;
    int kvh = blockIdx.y / hgroups, hg = blockIdx.y % hgroups;
    int head0 = kvh * G + hg * 4, ng = min(4, G - hg * 4);
    int r = blockIdx.x, S = gridDim.z;
    amma_kv_prefetch<P>(kc, vc, pos, base, r, kvh, blockIdx.z, S, n_kv_heads * head_dim, head_dim, threadIdx.x);
    pdl_wait();
    if (S == 1)
        amma_decode_unit<P, true>(qkv, pos, base, cos_t, sin_t, kc, vc, part, ml, flags, r, kvh, head0, ng, hg == 0,
                                  0, 1, n_heads, n_kv_heads, head_dim, scale, threadIdx.x, 0, a,
                                  attn + (size_t)r * n_heads * head_dim);
    else
        amma_decode_unit<P>(qkv, pos, base, cos_t, sin_t, kc, vc, part, ml, flags, r, kvh, head0, ng, hg == 0,
                            blockIdx.z, S, n_heads, n_kv_heads, head_dim, scale, threadIdx.x, 0, a);
}

#define ATTENTION_MMA_ROPE(NAME, P)                                                                    \
    extern "C" __global__ void __launch_bounds__(128, 4)                                               \
        NAME(const float* qkv, const int* pos, const int* base, const float* cos_t, const float* sin_t, u16* kc, \
             u16* vc, float* part, float* ml, float* attn, int* flags, int n_heads, int n_kv_heads, int head_dim, \
             float scale) {                                                                            \
        attention_mma_rope_impl<P>(qkv, pos, base, cos_t, sin_t, kc, vc, part, ml, attn, flags, n_heads, n_kv_heads, \
                                   head_dim, scale);                                                   \
    }
ATTENTION_MMA_ROPE(attention_mma_rope_f16, F16)
ATTENTION_MMA_ROPE(attention_mma_rope_bf16, BF16)

template <class P, int GROUPS, bool MMA, bool SEP_W>
__device__ void fused_decode_impl(const FusedLayer* layers_g, int n_layers, float* x, int n, const int* pos,
                                  const int* base, const float* cos_t, const float* sin_t, float* qkv, float* attn,
                                  float* hbuf, float* part, float* ml, unsigned* sync, int* flags, int n_heads,
                                  int n_kv_heads, int head_dim, int inter, float eps, int S, float scale,
                                  int prefetch, unsigned long long* trace) {
    constexpr bool sep_w = SEP_W;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ double dsl[FUSED_THREADS / 32][FUSED_ROWS];
    __shared__ float fsl[FUSED_THREADS / 32][FUSED_ROWS];
    __shared__ int isl[FUSED_THREADS / 32][FUSED_ROWS];
    __shared__ int last[2 * FUSED_THREADS / 128];
    // Shared memory (host twin: FusedShape::smem): the ternary partial sums;
    // one region that holds the two attention units' scratch during stage C
    // and the norm rows and int8 activations in the other stages; the norm
    // weights; the rows' scales and sums.
    int hidden = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, half = head_dim / 2;
    int maxw = max(hidden, inter);
    // A CTA of 2 x FUSED_THREADS threads runs two virtual CTAs (halves, see
    // fused_vb) in the products and four attention units: one norm, one
    // barrier arrival and one copy of each row per CTA for both halves.
    // Half h's products synchronise on named barrier 5 + h; the norm runs
    // on the first half alone (barrier 5), then the CTA synchronises.
    const int halves = fused_halves(), hf = threadIdx.x / FUSED_THREADS;
    const int vb = fused_vb(), vgrid = fused_vgrid(), tbar = halves == 1 ? 0 : 5 + hf;
    size_t region = max((size_t)halves * 2 * FUSED_ATT_FLOATS * 4, (size_t)5 * n * maxw);
    region = (region + 15) & ~(size_t)15;
    int* red = (int*)smem + hf * MM_WARPS * 16 * 8;              // [halves][MM_WARPS][16 * 8]
    float* att = (float*)(smem + halves * MM_WARPS * 16 * 8 * 4);  // [2 x halves][FUSED_ATT_FLOATS] (stage C)
    float* xs = att;                                             // [n][maxw] norm rows (other stages)
    i8* q8 = (i8*)(xs + (size_t)n * maxw);                       // [n][maxw]
    float* stage = (float*)((unsigned char*)att + region);       // [maxw] norm weights (sw)
    float* a_scale = stage + maxw;                               // [FUSED_ROWS]
    int* a_sum = (int*)(a_scale + FUSED_ROWS);                   // [FUSED_ROWS]
    // The layer descriptors, copied once: every stage reads its pointers
    // from shared memory instead of waiting on a global load for them.
    size_t desc_off = ((size_t)((unsigned char*)(a_sum + FUSED_ROWS) - smem) + 15) & ~(size_t)15;
    FusedLayer* layers = (FusedLayer*)(smem + desc_off);  // [n_layers]
    for (int i = threadIdx.x; i < n_layers * (int)(sizeof(FusedLayer) / 8); i += blockDim.x)
        ((unsigned long long*)layers)[i] = ((const unsigned long long*)layers_g)[i];
    __syncthreads();
    int qkv_rows = hidden + 2 * kv_dim, G = n_heads / n_kv_heads;
    // Norm weights. With sep_w each of a layer's norms has its own buffer
    // (after the layer descriptors: attn_norm, attn_sub_norm, ffn_norm;
    // ffn_sub_norm in `stage`), all staged during stage C, where most CTAs
    // have no unit; without (where that shared memory would cost a CTA per
    // SM), `stage` holds the next norm's weights, copied before each
    // barrier. (Recomputed from the launch's parameters at each use:
    // pointers kept live across the layer loop cost registers.)
#define FUSED_SEPW ((float*)(smem + ((((size_t)((unsigned char*)(a_sum + FUSED_ROWS) - smem) + 15) & ~(size_t)15) + \
                                     n_layers * sizeof(FusedLayer) + 15 & ~(size_t)15)))
#define w_a (sep_w ? FUSED_SEPW : stage)
#define w_d (sep_w ? FUSED_SEPW + hidden : stage)
#define w_e (sep_w ? FUSED_SEPW + 2 * hidden : stage)
#define w_f stage
    unsigned* bar = sync;
    unsigned* done = sync + 1;  // [n][n_heads] finished attention units
    unsigned epoch = 0;

    if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[0] = global_ns();
    fused_stage_w(w_a, layers[0].attn_norm, hidden, (qkv_rows + 15) / 16);
    __syncthreads();  // the first norm reads these weights in its first pass
    if (prefetch == 1)
        for (int k = 0; k < 4; k++) fused_prefetch(layers[0], k, hidden, qkv_rows, inter);
    if (prefetch == 2) fused_prefetch(layers[0], 0, hidden, qkv_rows, inter);
    // FUSED_SUBTRACE: CTA 0's clocks, 12 per stage (see SUBT).
    // FUSED_SUBTRACE_LAST: the last CTA's clocks instead (at batch 1 it holds
    // attention unit 0; CTA 0 holds none).
    const unsigned sub_cta = FUSED_SUBTRACE_LAST ? gridDim.x - 1 : 0;
    unsigned long long* sub0 =
        (FUSED_SUBTRACE && trace && blockIdx.x == sub_cta) ? trace + 1 + 19 * n_layers : nullptr;
    if (sub0 && threadIdx.x == 0) {
        sub0[60 * n_layers] = global_ns();
        sub0[60 * n_layers + 1] = clock64();
    }
    for (int l = 0; l < n_layers; l++) {
        const FusedLayer& L = layers[l];
        unsigned long long* sA = sub0 ? sub0 + 60 * l : nullptr;
        unsigned long long* sC = sA ? sA + 12 : nullptr;
        unsigned long long* sD = sA ? sA + 24 : nullptr;
        unsigned long long* sE = sA ? sA + 36 : nullptr;
        unsigned long long* sF = sA ? sA + 48 : nullptr;
        typename P::T* kc = (typename P::T*)L.k_cache;
        typename P::T* vc = (typename P::T*)L.v_cache;

        // A: q|k|v.
        SUBT(sA, 0);
        fused_stage_start(blockIdx.x * 16 < qkv_rows, layers, n_layers, l, 0, prefetch, hidden, qkv_rows, inter, x,
                          eps, hidden, n, q8, a_scale, a_sum, flags, w_a, xs, dsl, fsl, isl, sA, tbar, hf, halves);
        if (blockIdx.x * 16 < qkv_rows) {
            if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[1 + 15 * n_layers + 4 * l + 0] = global_ns();
            for (int u = vb; u * 16 < qkv_rows; u += vgrid)
                ternary_tile<0, 1, 8, false, 8, true>(u, 0, red, L.qkv, L.qkv, qkv_rows, hidden, L.qkv_s0, L.qkv_s1,
                                                       L.qkv_s2, hidden, hidden + kv_dim, q8, a_scale, a_sum, n, qkv,
                                                       qkv_rows, sA, tbar);
        }
        if (!sep_w) fused_stage_w(stage, L.attn_sub_norm, hidden, (hidden + 15) / 16);  // for D (free during C)
        SUBT(sA, 10);
        grid_sync(bar, ++epoch, trace);
        SUBT(sA, 11);
        SUBT(sC, 0);

        // C: attention, two units per CTA at a time.
        if constexpr (MMA) {
            static_assert(P::MMA && GROUPS == 1, "tensor-core attention: f16/bf16, head_dim <= 128");
            fused_attention_mma<P>(qkv, pos, base, cos_t, sin_t, kc, vc, attn, part, ml, done, flags, n, n_heads,
                                   n_kv_heads, head_dim, S, scale, l, att + (threadIdx.x / 128) * FUSED_ATT_FLOATS,
                                   last, sC,
                                   FUSED_SUBTRACE && FUSED_UNITTRACE && trace ? trace + 1 + 79 * n_layers + 4
                                                                              : nullptr);
        } else {
            int hh = threadIdx.x / (ATT_WARPS * 32), tid = threadIdx.x % (ATT_WARPS * 32), sid = 1 + hh;
            float* a = att + hh * FUSED_ATT_FLOATS;
            float(*sc)[ATT_CHUNK] = (float(*)[ATT_CHUNK])a;
            float(*ared)[ATT_MAX_HD] = (float(*)[ATT_MAX_HD])(a + ATT_CHUNK);
            float* qs = a + ATT_CHUNK + ATT_WARPS * ATT_MAX_HD;
            float* knew = qs + ATT_MAX_HD;
            float* vnew = knew + ATT_MAX_HD;
            int units = fused_att_units<false>(n, n_heads, n_kv_heads, S);
            for (int u = FUSED_UNIT0(hh); u < units; u += FUSED_SLOTS) {
                int r = u / (n_heads * S), head = (u / S) % n_heads, s = u % S;
                int kvh = head / G, p = pos[r];
                bool covers = (p / ATT_CHUNK) % S == s;
                bool writer = covers && head % G == 0;
                const float* row = qkv + (size_t)r * qkv_rows;
                const float* cs = cos_t + (size_t)p * half;
                const float* sn = sin_t + (size_t)p * half;
                size_t slot = (size_t)(base[r] + p) * kv_dim + (size_t)kvh * head_dim;
                for (int i = tid; i < half; i += ATT_WARPS * 32) {
                    float c = cs[i], si = sn[i];
                    size_t o = (size_t)head * head_dim + i;
                    float x0 = ldcg_f(row + o), x1 = ldcg_f(row + o + half);
                    float2 y = rope_rot(x0, x1, c, si);
                    qs[i] = y.x;
                    qs[i + half] = y.y;
                    if (covers) {
                        size_t ko = hidden + (size_t)kvh * head_dim + i;
                        float2 kr = rope_rot(ldcg_f(row + ko), ldcg_f(row + ko + half), c, si);
                        knew[i] = P::round(kr.x);
                        knew[i + half] = P::round(kr.y);
                        if (writer) {
                            P::store(kc, slot + i, kr.x);
                            P::store(kc, slot + i + half, kr.y);
                        }
                    }
                }
                if (covers) {
                    for (int j = tid; j < head_dim; j += ATT_WARPS * 32) {
                        float v = ldcg_f(row + hidden + kv_dim + (size_t)kvh * head_dim + j);
                        vnew[j] = P::round(v);
                        if (writer) P::store(vc, slot + j, v);
                    }
                }
                unit_sync(sid);
                SUBT(sC, 1);
                size_t slot0 = ((size_t)r * n_heads + head) * S;
                attention_unit<P, GROUPS, 1, true>(qs, kc, vc, (size_t)base[r] * kv_dim + (size_t)kvh * head_dim, p + 1, s,
                                             S, 1, head_dim, kv_dim, scale, knew, vnew, covers ? p : -1, slot0 + s,
                                             part, ml, tid, sid, sc, ared);
                SUBT(sC, 5);
                // The last of the S units of (r, head) to finish combines them.
                __threadfence();
                unit_sync(sid);
                SUBT(sC, 6);
                if (tid == 0) {
                    unsigned before = atomicAdd(done + (size_t)r * n_heads + head, 1u);
                    last[hh] = before == (unsigned)((l + 1) * S - 1);
                    __threadfence();
                }
                unit_sync(sid);
                SUBT(sC, 7);
                if (last[hh])
                    combine_head<true>(part, ml, slot0, S, head_dim, attn + (size_t)r * hidden + (size_t)head * head_dim,
                                       flags, tid, ATT_WARPS * 32, &ared[0][0], sid);
                unit_sync(sid);
                SUBT(sC, 8);
            }
        }
        if constexpr (SEP_W) {
            // The next norms' weights: a CTA without attention units copies
            // them with all its threads, one with units with its second half.
            bool idle = FUSED_UNIT0(0) >= fused_att_units<MMA>(n, n_heads, n_kv_heads, S);
            if (idle || threadIdx.x >= 128) {
                int nt = idle ? (int)blockDim.x : (int)blockDim.x - 128, t = idle ? threadIdx.x : threadIdx.x - 128;
                int b = (int)blockIdx.x;
                if (b < (hidden + 15) / 16) stage_f4_by((float4*)w_d, (const float4*)L.attn_sub_norm, hidden >> 2, t, nt);
                if (b < (inter + 31) / 32) stage_f4_by((float4*)w_e, (const float4*)L.ffn_norm, hidden >> 2, t, nt);
                if (b < (hidden + 15) / 16) stage_f4_by((float4*)w_f, (const float4*)L.ffn_sub_norm, inter >> 2, t, nt);
                if (l + 1 < n_layers && b < (qkv_rows + 15) / 16)
                    stage_f4_by((float4*)w_a, (const float4*)layers[l + 1].attn_norm, hidden >> 2, t, nt);
            }
        }
        SUBT(sC, 10);
        grid_sync(bar, ++epoch, trace);
        SUBT(sC, 11);

        // D: o projection into the residual stream.
        SUBT(sD, 0);
        fused_stage_start(blockIdx.x * 16 < hidden, layers, n_layers, l, 1, prefetch, hidden, qkv_rows, inter, attn,
                          eps, hidden, n, q8, a_scale, a_sum, flags, w_d, xs, dsl, fsl, isl, sD, tbar, hf, halves);
        if (blockIdx.x * 16 < hidden) {
            if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[1 + 15 * n_layers + 4 * l + 1] = global_ns();
            for (int u = vb; u * 16 < hidden; u += vgrid)
                ternary_tile<1, 1, 8, false, 8, true>(u, 0, red, L.o, L.o, hidden, hidden, L.o_s, L.o_s, L.o_s, hidden,
                                                       hidden, q8, a_scale, a_sum, n, x, hidden, sD, tbar);
        }
        if (!sep_w) fused_stage_w(stage, L.ffn_norm, hidden, (inter + 31) / 32);
        SUBT(sD, 10);
        grid_sync(bar, ++epoch, trace);
        SUBT(sD, 11);

        // E: gate/up, relu^2 * up.
        SUBT(sE, 0);
        fused_stage_start(blockIdx.x * 32 < inter, layers, n_layers, l, 2, prefetch, hidden, qkv_rows, inter, x,
                          eps, hidden, n, q8, a_scale, a_sum, flags, w_e, xs, dsl, fsl, isl, sE, tbar, hf, halves);
        if (blockIdx.x * 32 < inter) {
            if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[1 + 15 * n_layers + 4 * l + 2] = global_ns();
            for (int u = vb; u * 32 < inter; u += vgrid)
                ternary_tile<2, 4, 2, false, 8, true>(u, 0, red, L.gate, L.up, inter, hidden, L.gate_s, L.up_s, 0.0f,
                                                       inter, inter, q8, a_scale, a_sum, n, hbuf, inter, sE, tbar);
        }
        if (!sep_w) fused_stage_w(stage, L.ffn_sub_norm, inter, (hidden + 15) / 16);
        SUBT(sE, 10);
        grid_sync(bar, ++epoch, trace);
        SUBT(sE, 11);

        // F: down projection into the residual stream.
        SUBT(sF, 0);
        fused_stage_start(blockIdx.x * 16 < hidden, layers, n_layers, l, 3, prefetch, hidden, qkv_rows, inter, hbuf,
                          eps, inter, n, q8, a_scale, a_sum, flags, w_f, xs, dsl, fsl, isl, sF, tbar, hf, halves);
        if (blockIdx.x * 16 < hidden) {
            if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[1 + 15 * n_layers + 4 * l + 3] = global_ns();
            for (int u = vb; u * 16 < hidden; u += vgrid)
                ternary_tile<1, 1, 8, false, 8, true>(u, 0, red, L.down, L.down, hidden, inter, L.down_s, L.down_s,
                                                       L.down_s, hidden, hidden, q8, a_scale, a_sum, n, x, hidden, sF,
                                                       tbar);
        }
        if (!sep_w && l + 1 < n_layers) fused_stage_w(stage, layers[l + 1].attn_norm, hidden, (qkv_rows + 15) / 16);
        SUBT(sF, 10);
        grid_sync(bar, ++epoch, trace);
        SUBT(sF, 11);
    }
    if (sub0 && threadIdx.x == 0) {
        sub0[60 * n_layers + 2] = global_ns();
        sub0[60 * n_layers + 3] = clock64();
    }
#undef FUSED_SEPW
#undef w_a
#undef w_d
#undef w_e
#undef w_f
}

#define FUSED_DECODE(NAME, P, GROUPS, MMA, SEP_W)                                                      \
    extern "C" __global__ void __launch_bounds__(2 * FUSED_THREADS, 1)                                 \
        NAME(const FusedLayer* layers, int n_layers, float* x, int n, const int* pos, const int* base, \
             const float* cos_t, const float* sin_t, float* qkv, float* attn, float* hbuf, float* part, float* ml, \
             unsigned* sync, int* flags, int n_heads, int n_kv_heads, int head_dim, int inter, float eps, int S, \
             float scale, int prefetch, unsigned long long* trace) {                                   \
        fused_decode_impl<P, GROUPS, MMA, SEP_W>(layers, n_layers, x, n, pos, base, cos_t, sin_t, qkv, attn, \
                                                 hbuf, part, ml, sync, flags, n_heads, n_kv_heads, head_dim, \
                                                 inter, eps, S, scale, prefetch, trace);               \
    }
// Each kernel holds one attention stage, tensor-core or scalar, not both:
// the unused one's code cost the 16-bit kernels registers and spills. The
// main kernels give each norm its own weight buffer (SEP_W; a runtime
// switch cost registers); their _w1 twins run where that shared memory
// would cost a CTA per SM (fused_launch_shape on the host).
FUSED_DECODE(fused_decode_f32, F32, 1, false, true)
FUSED_DECODE(fused_decode_f16, F16, 1, true, true)
FUSED_DECODE(fused_decode_bf16, BF16, 1, true, true)
FUSED_DECODE(fused_decode_f32_w1, F32, 1, false, false)
FUSED_DECODE(fused_decode_f16_w1, F16, 1, true, false)
FUSED_DECODE(fused_decode_bf16_w1, BF16, 1, true, false)
FUSED_DECODE(fused_decode_f16_scalar, F16, 1, false, false)
FUSED_DECODE(fused_decode_bf16_scalar, BF16, 1, false, false)
FUSED_DECODE(fused_decode_f32_wide, F32, 2, false, false)
FUSED_DECODE(fused_decode_f16_wide, F16, 2, false, false)
FUSED_DECODE(fused_decode_bf16_wide, BF16, 2, false, false)

// ---------------------------------------------------------------------------
// Output head: logits[e, v] = sum_k W[v, k] * x[e, k], f32 accumulation.

// f16 / bf16 on tensor cores (mma m16n8k16). Each warp owns 16 vocabulary
// rows and 8 * NT tokens; the k order inside an mma is permuted as in
// the ternary kernel (lane t takes elements 4t..4t+3 of each 16-chunk).
// grid (ceil(vocab / (16 * 4)), ceil(n / (8 * NT))), block 128. NT = 8 for
// batches, 1 for up to 8 tokens (fewer registers: more warps in flight).
#define HEAD_PREFETCH 8

// x holds, for each entry, its hi row then its lo row ([n, 2, hidden]).
template <bool BF, int NT>
__device__ void head_mma_impl(const u16* __restrict__ w, int vocab, int hidden, const u16* __restrict__ x, int n,
                              float* __restrict__ logits) {
    pdl_begin();
    size_t lo_off = (size_t)hidden;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int g = lane >> 2, t = lane & 3;
    int row_base = (blockIdx.x * (blockDim.x >> 5) + warp) * 16;
    if (row_base >= vocab) return;
    int tok_base = blockIdx.y * NT * 8;
    int ntiles = min(NT, (n - tok_base + 7) / 8);
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    int r0 = row_base + g, r1 = row_base + g + 8;
    bool v0 = r0 < vocab, v1 = r1 < vocab;
    const u16* p0 = w + (size_t)(v0 ? r0 : 0) * hidden + 4 * t;
    const u16* p1 = w + (size_t)(v1 ? r1 : 0) * hidden + 4 * t;
    const u16* px[NT];
    bool vx[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        int tok = tok_base + nt * 8 + g;
        vx[nt] = tok < n;
        px[nt] = x + (size_t)(vx[nt] ? tok : 0) * 2 * hidden + 4 * t;
    }
    // hidden is a multiple of 16; weights of HEAD_PREFETCH chunks are loaded
    // before any is used.
    for (int kb = 0; kb < hidden; kb += 16 * HEAD_PREFETCH) {
        uint2 wa[HEAD_PREFETCH], wb[HEAD_PREFETCH];
#pragma unroll
        for (int i = 0; i < HEAD_PREFETCH; i++) {
            int k0 = kb + 16 * i;
            bool in = k0 < hidden;
            wa[i] = (in && v0) ? __ldg((const uint2*)(p0 + k0)) : make_uint2(0u, 0u);
            wb[i] = (in && v1) ? __ldg((const uint2*)(p1 + k0)) : make_uint2(0u, 0u);
        }
#pragma unroll
        for (int i = 0; i < HEAD_PREFETCH; i++) {
            int k0 = kb + 16 * i;
            if (k0 >= hidden) break;
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                if (nt < ntiles) {
                    uint2 bh = vx[nt] ? __ldg((const uint2*)(px[nt] + k0)) : make_uint2(0u, 0u);
                    uint2 bl = vx[nt] ? __ldg((const uint2*)(px[nt] + lo_off + k0)) : make_uint2(0u, 0u);
                    if (BF) {
                        mma_bf16(acc[nt], wa[i].x, wb[i].x, wa[i].y, wb[i].y, bh.x, bh.y);
                        mma_bf16(acc[nt], wa[i].x, wb[i].x, wa[i].y, wb[i].y, bl.x, bl.y);
                    } else {
                        mma_f16(acc[nt], wa[i].x, wb[i].x, wa[i].y, wb[i].y, bh.x, bh.y);
                        mma_f16(acc[nt], wa[i].x, wb[i].x, wa[i].y, wb[i].y, bl.x, bl.y);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        if (nt >= ntiles) continue;
        int tok = tok_base + nt * 8 + 2 * t;
        if (tok < n) {
            if (v0) logits[(size_t)tok * vocab + r0] = acc[nt][0];
            if (v1) logits[(size_t)tok * vocab + r1] = acc[nt][2];
        }
        if (tok + 1 < n) {
            if (v0) logits[(size_t)(tok + 1) * vocab + r0] = acc[nt][1];
            if (v1) logits[(size_t)(tok + 1) * vocab + r1] = acc[nt][3];
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) head_f16(const u16* w, int vocab, int hidden, const u16* x, int n,
                                                           float* logits) {
    head_mma_impl<false, 8>(w, vocab, hidden, x, n, logits);
}
extern "C" __global__ void __launch_bounds__(128) head_bf16(const u16* w, int vocab, int hidden, const u16* x, int n,
                                                            float* logits) {
    head_mma_impl<true, 8>(w, vocab, hidden, x, n, logits);
}
extern "C" __global__ void __launch_bounds__(128) head_f16_small(const u16* w, int vocab, int hidden, const u16* x,
                                                                 int n, float* logits) {
    head_mma_impl<false, 1>(w, vocab, hidden, x, n, logits);
}
extern "C" __global__ void __launch_bounds__(128) head_bf16_small(const u16* w, int vocab, int hidden, const u16* x,
                                                                  int n, float* logits) {
    head_mma_impl<true, 1>(w, vocab, hidden, x, n, logits);
}

// out[r, v] = s[2r, v] + s[2r + 1, v] for r < rows: the hi and lo products
// of the f16/bf16 head when cuBLAS computed them as separate rows.
// grid-stride, block 256.
extern "C" __global__ void add_row_pairs(const float* s, float* out, int rows, int vocab) {
    pdl_begin();
    size_t total = (size_t)rows * vocab, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        size_t r = i / vocab, v = i - r * vocab;
        out[i] = s[2 * r * vocab + v] + s[(2 * r + 1) * vocab + v];
    }
}

// f32: one warp per vocabulary row, float4 loads, up to 8 tokens per pass.
// grid (ceil(vocab / 8), ceil(n / 8)), block 256.
extern "C" __global__ void __launch_bounds__(256) head_f32(const float* __restrict__ w, int vocab, int hidden,
                                                           const float* __restrict__ x, int n,
                                                           float* __restrict__ logits) {
    pdl_begin();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= vocab) return;
    int tok_base = blockIdx.y * 8;
    int nt = min(8, n - tok_base);
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.0f;
    const float4* wr = (const float4*)(w + (size_t)row * hidden);
    for (int k4 = lane; k4 < hidden / 4; k4 += 32) {
        float4 a = __ldg(wr + k4);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (i < nt) {
                float4 b = __ldg((const float4*)(x + (size_t)(tok_base + i) * hidden) + k4);
                acc[i] += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float v = warp_sum_f(acc[i]);
        if (lane == 0 && i < nt) logits[(size_t)(tok_base + i) * vocab + row] = v;
    }
}

// The argmax's pieces: (v, i) into a running maximum, ties to the smaller
// index; a thread's logit, visited in increasing index order (only a
// greater value replaces the maximum, so a row of -inf and NaN keeps no
// index: 0); a warp's reduction.
__device__ __forceinline__ void argmax_pick(float v, int i, float& best, int& bi) {
    if (v > best || (v == best && i < bi)) {
        best = v;
        bi = i;
    }
}
__device__ __forceinline__ void argmax_take(float v, int i, float& best, int& bi, bool& finite) {
    finite = finite && isfinite(v);
    if (v > best) {
        best = v;
        bi = i;
    }
}
__device__ __forceinline__ void argmax_warp(float& best, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        argmax_pick(ov, oi, best, bi);
    }
}

// ---------------------------------------------------------------------------
// Greedy sampling on the device: out[e] = the first index of the maximum of
// logits[e, :]; a NaN or infinite logit raises FLAG_NONFINITE.
// grid (entries), block 1024.
extern "C" __global__ void __launch_bounds__(1024) argmax_rows(const float* logits, int vocab, int* out,
                                                               int* flags) {
    __shared__ float vs[32];
    __shared__ int is[32];
    pdl_begin();
    int e = blockIdx.x;
    const float* l = logits + (size_t)e * vocab;
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    bool finite = true;
    // Each thread visits its elements in increasing index order (so it keeps
    // the first of equal maxima); rows of a multiple of 4 logits starting on
    // 16 bytes are read as float4, four loads in flight per thread.
    if ((vocab & 3) == 0 && ((size_t)logits & 15) == 0) {
        const float4* l4 = (const float4*)l;
        int n4 = vocab >> 2, bd = blockDim.x;
        for (int b = 0; b < n4; b += 4 * bd) {
            float4 v[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int q = b + j * bd + threadIdx.x;
                if (q < n4) v[j] = l4[q];
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int q = b + j * bd + threadIdx.x;
                if (q < n4) {
                    float c[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
                    for (int k = 0; k < 4; k++) argmax_take(c[k], 4 * q + k, best, bi, finite);
                }
            }
        }
    } else {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) argmax_take(l[i], i, best, bi, finite);
    }
    argmax_warp(best, bi);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        vs[warp] = best;
        is[warp] = bi;
    }
    if (!finite) atomicOr(flags, FLAG_NONFINITE);
    __syncthreads();
    if (threadIdx.x == 0) {
        float b = vs[0];
        int i0 = is[0];
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) argmax_pick(vs[w], is[w], b, i0);
        out[e] = i0 == 0x7fffffff ? 0 : i0;
    }
}

// The same argmax with each row split over gridDim.x CTAs of 256 threads
// (grid (S, rows)): CTA s reduces elements [s * chunk, (s + 1) * chunk) (chunk
// a multiple of 4 where the row is read as float4) to its first maximum in
// part_v / part_i[row * S + s]; the last CTA of the row to finish (counted in
// counter[row], which it sets back to 0 for the next launch) reduces the S
// partials, ties to the smaller index, so the result is argmax_rows's.
// One row's 128256 logits are then read by 63 SMs instead of one.
extern "C" __global__ void __launch_bounds__(256) argmax_split(const float* logits, int vocab, int chunk, int* out,
                                                               int* flags, float* part_v, int* part_i,
                                                               unsigned* counter) {
    __shared__ float vs[8];
    __shared__ int is[8];
    __shared__ bool last;
    pdl_begin();
    const int S = gridDim.x, s = blockIdx.x, e = blockIdx.y, tid = threadIdx.x;
    const float* l = logits + (size_t)e * vocab;
    const int lo = s * chunk, hi = min(vocab, lo + chunk);
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    bool finite = true;
    if ((vocab & 3) == 0 && (chunk & 3) == 0 && ((size_t)logits & 15) == 0) {
        const float4* l4 = (const float4*)l;
        for (int q = (lo >> 2) + tid; q < (hi >> 2); q += 256) {
            float4 v = l4[q];
            float c[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 4; k++) argmax_take(c[k], 4 * q + k, best, bi, finite);
        }
    } else {
        for (int i = lo + tid; i < hi; i += 256) argmax_take(l[i], i, best, bi, finite);
    }
    if (!finite) atomicOr(flags, FLAG_NONFINITE);
    // Reduces (best, bi) over the CTA into thread 0's, ties to the smaller index.
    auto reduce = [&]() {
        argmax_warp(best, bi);
        if ((tid & 31) == 0) {
            vs[tid >> 5] = best;
            is[tid >> 5] = bi;
        }
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < 8; w++) argmax_pick(vs[w], is[w], best, bi);
        }
        __syncthreads();
    };
    reduce();
    if (tid == 0) {
        part_v[(size_t)e * S + s] = best;
        part_i[(size_t)e * S + s] = bi;
        __threadfence();
        last = atomicAdd(counter + e, 1u) == (unsigned)(S - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    best = -__int_as_float(0x7f800000);
    bi = 0x7fffffff;
    for (int k = tid; k < S; k += 256)
        argmax_pick(__ldcg(part_v + (size_t)e * S + k), __ldcg(part_i + (size_t)e * S + k), best, bi);
    reduce();
    if (tid == 0) {
        out[e] = bi == 0x7fffffff ? 0 : bi;
        counter[e] = 0;
    }
}

// ---------------------------------------------------------------------------
// Sampling on the device. Each drawn row is split into chunks of SAMPLE_CHUNK
// tokens, one CTA a chunk, over a few kernels launched one after another:
// sample_stats (each chunk's largest finite logit and count of finite
// logits), sample_hist four times where a row keeps its k most likely tokens
// or a top-p nucleus (a radix selection, 8 bits of the key a pass),
// sample_gather (top-k's candidates; every other row's kept mass a chunk),
// sample_final (one CTA a row: the draw). The kernel boundaries are the only
// synchronisation: every CTA of a row derives what it needs of the row from
// what the kernels before left, in one fixed order, so all of them see the
// same numbers, and a row's draw never depends on the other rows of the call.
//
// The draw is the token SampleDraw::apply (crates/bitnet-inference/src/
// sampling.rs) would make from the same logits and the same uniform number u:
// every finite logit v weighs exp(v / T - max / T) (f64); top-k keeps the k
// largest (ties to the smaller token), sorted, then top-p the smallest prefix
// of those whose share of their sum reaches p; top-p alone keeps the smallest
// set of most likely tokens (ties to the smaller token) whose share of the
// whole vocabulary's mass reaches p; and the draw walks the kept tokens
// (sorted for top-k, in token order for temperature alone and top-p alone)
// until u of their mass is passed. The host sends rows with top_k in
// 0..=SAMPLE_MAX_K. Sums are made in other orders than the host's (chunks,
// warps, lanes) and the f64 exp is CUDA's (within 1 ulp), and top-p alone
// finds its nucleus from masses in fixed point (2^-41 a token: integer sums,
// the same in any order), so device and host can differ only where u, or p,
// falls within rounding of a boundary. Rows whose temperature is not above 0
// are left alone (their token is the argmax already written).

#define SAMPLE_MAX_K 1024
// Tokens a chunk CTA takes, its threads, and the tokens each of its warps
// walks in order (its segment).
#define SAMPLE_CHUNK 2048
#define SAMPLE_CTA 256
#define SAMPLE_CTA_WARPS (SAMPLE_CTA / 32)
#define SAMPLE_SEG (SAMPLE_CHUNK / SAMPLE_CTA_WARPS)
#define SAMPLE_FINAL 1024
// A weight (at most 1) in fixed point, 2^41 to one: at most 2^41, two halves
// of 21 and 20 bits, so a chunk's 2048 sum in 32-bit counters, and
// SAMPLE_MAX_VOCAB weights below 2^63.
#define SAMPLE_MAX_VOCAB (1 << 21)
#define SAMPLE_MAX_CHUNKS (SAMPLE_MAX_VOCAB / SAMPLE_CHUNK)

struct SampleParams {
    float temperature;
    int top_k;
    float top_p;
    int pad;
    double u;
};

#define SAMPLE_KEEP 0
#define SAMPLE_TEMP 1
#define SAMPLE_TOPK 2
#define SAMPLE_TOPP 3

__device__ __forceinline__ int sample_kind(const SampleParams& P) {
    if (!(P.temperature > 0.f)) return SAMPLE_KEEP;
    if (P.top_k > 0) return SAMPLE_TOPK;
    return P.top_p < 1.f ? SAMPLE_TOPP : SAMPLE_TEMP;
}

// Order-preserving key of a finite float: larger float, larger key (-0.0
// below +0.0, as f32::total_cmp orders them). Every finite float's key is
// at least 0x00800000, so key 0 stands for "keep every finite logit".
__device__ __forceinline__ unsigned sample_key(float v) {
    unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float sample_key_value(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ bool sample_finite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

__device__ __forceinline__ double sample_weight(float v, double t, double zmax) {
    double z = (double)v / t - zmax;
    return z < -746.0 ? 0.0 : exp(z);
}

__device__ __forceinline__ unsigned long long sample_fx(double w) { return (unsigned long long)rint(w * 2199023255552.0); }

__device__ __forceinline__ double sample_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Warp-wide: the inclusive prefix sums of vals[0, n) (n <= 1024) into out,
// in one fixed order (lane l sums its block of ceil(n / 32) in order, the
// block sums are scanned, then each lane runs through its block again from
// the sum of the blocks before).
__device__ void sample_prefix(const double* vals, double* out, int n, int lane) {
    const int B = (n + 31) >> 5;
    const int a = min(n, lane * B), b = min(n, a + B);
    double s = 0.0;
    for (int i = a; i < b; i++) s += vals[i];
    double incl = s;
    for (int o = 1; o < 32; o <<= 1) {
        double y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    double run = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) run = 0.0;
    for (int i = a; i < b; i++) {
        run += vals[i];
        out[i] = run;
    }
}

// The first i in [0, n) where pre[i] (non-decreasing) passes r (r < pre[i])
// or, with `reach`, reaches it (r <= pre[i]); -1 if none does.
__device__ int sample_search(const double* pre, int n, double r, bool reach) {
    if (n <= 0 || !(reach ? r <= pre[n - 1] : r < pre[n - 1])) return -1;
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (reach ? r <= pre[mid] : r < pre[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

// A bitonic sort of n (a power of two) items by the whole CTA: before(i, j)
// says whether item i belongs before item j, swap(i, j) exchanges them.
template <class Before, class Swap>
__device__ void sample_bitonic(int n, Before before, Swap swap) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                const int j = i ^ stride;
                if (j > i && before(i, j) != ((i & size) == 0)) swap(i, j);
            }
            __syncthreads();
        }
    }
}

// Where a row's radix selection stands: the key bits chosen so far (prefix
// under mask); for top-k how many of the logits matching the prefix are
// still to keep (remaining); for top-p alone the fixed-point mass of the
// keys above the prefix's range (above), the mass to reach (target) and
// how many logits match the prefix (remaining). After the last pass the
// prefix is the kept key kth and ties how many logits of key kth (the first
// by token) are kept.
struct SampleState {
    unsigned prefix, mask;
    int remaining, ties;
    unsigned long long above, target;
};

// One row's scratch (host twin: sample_row_bytes in
// crates/bitnet-kernels/src/cuda/ops.rs).
struct SampleScratch {
    unsigned long long* hmass;  // [4][256] each pass's bucket masses (top-p alone)
    SampleState* st;            // [5]: [j] the state pass j starts from (j = 1..3), [4] the final one
    double* csum;               // [C] each chunk's kept mass
    float* cmax;                // [C] each chunk's largest finite logit
    int* cfin;                  // [C] its finite logits
    unsigned* hcnt;             // [4][256] each pass's bucket counts
    unsigned* chist;            // [C][256] each chunk's counts in the last pass
    unsigned* cand_key;         // [SAMPLE_MAX_K] top-k's candidates, in no order
    int* cand_tok;              // [SAMPLE_MAX_K]
    unsigned* n_cand;
};

__device__ __forceinline__ int sample_chunks(int vocab) { return (vocab + SAMPLE_CHUNK - 1) / SAMPLE_CHUNK; }

__device__ __forceinline__ size_t sample_row_bytes(int C) {
    size_t b = (size_t)4 * 256 * 8 + 5 * sizeof(SampleState) + (size_t)C * (8 + 4 + 4 + 256 * 4) + 4 * 256 * 4 +
               (size_t)SAMPLE_MAX_K * 8 + 4;
    return (b + 255) & ~(size_t)255;
}

__device__ SampleScratch sample_scratch(unsigned char* base, int row, int C) {
    unsigned char* p = base + (size_t)row * sample_row_bytes(C);
    SampleScratch s;
    s.hmass = (unsigned long long*)p;
    p += 4 * 256 * 8;
    s.st = (SampleState*)p;
    p += 5 * sizeof(SampleState);
    s.csum = (double*)p;
    p += (size_t)C * 8;
    s.cmax = (float*)p;
    p += (size_t)C * 4;
    s.cfin = (int*)p;
    p += (size_t)C * 4;
    s.hcnt = (unsigned*)p;
    p += 4 * 256 * 4;
    s.chist = (unsigned*)p;
    p += (size_t)C * 256 * 4;
    s.cand_key = (unsigned*)p;
    p += SAMPLE_MAX_K * 4;
    s.cand_tok = (int*)p;
    p += SAMPLE_MAX_K * 4;
    s.n_cand = (unsigned*)p;
    return s;
}

// The row's largest finite logit and number of finite logits, from its
// chunks' (every CTA of the row gets the same numbers). The whole CTA calls it.
__device__ void sample_row_stats(const SampleScratch& S, int C, float& m, int& finite) {
    __shared__ float rf[32];
    __shared__ int ri[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float mm = -__int_as_float(0x7f800000);
    int ff = 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        mm = fmaxf(mm, S.cmax[c]);
        ff += S.cfin[c];
    }
    for (int o = 16; o > 0; o >>= 1) {
        mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
        ff += __shfl_xor_sync(0xffffffffu, ff, o);
    }
    if (lane == 0) {
        rf[warp] = mm;
        ri[warp] = ff;
    }
    __syncthreads();
    m = rf[0];
    finite = ri[0];
    for (int w = 1; w < nw; w++) {
        m = fmaxf(m, rf[w]);
        finite += ri[w];
    }
}

__device__ SampleState sample_start(const SampleParams& P, int kind, int finite) {
    SampleState s;
    s.prefix = 0u;
    s.mask = 0u;
    s.remaining = kind == SAMPLE_TOPK ? min(min(P.top_k, SAMPLE_MAX_K), finite) : 0;
    s.ties = 0;
    s.above = 0ull;
    s.target = 0ull;
    return s;
}

// One warp: from the state a pass started at and that pass's buckets (cnt,
// and mass for top-p alone), the state after it. Counts: the bucket (digit)
// holding the k-th largest key, remaining how many of it are still to keep.
// Masses: the bucket where the mass above it plus its own reaches the target
// (after the first pass, shift 24, target = ceil(p * the row's mass)),
// remaining its count. Lane l takes buckets 255 - 8l down to 248 - 8l; the
// first lane whose walk stops chooses, which is the bucket a walk from 255
// down chooses.
__device__ SampleState sample_advance(SampleState s, const unsigned* cnt, const unsigned long long* mass, int shift,
                                      bool with_mass, float top_p) {
    const int lane = threadIdx.x & 31;
    unsigned c8[8];
    unsigned long long m8[8];
    unsigned cl = 0u;
    unsigned long long ml = 0ull;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int b = 255 - 8 * lane - i;
        c8[i] = cnt[b];
        m8[i] = with_mass ? mass[b] : 0ull;
        cl += c8[i];
        ml += m8[i];
    }
    unsigned ci = cl;
    unsigned long long mi = ml;
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned cy = __shfl_up_sync(0xffffffffu, ci, o);
        const unsigned long long my = __shfl_up_sync(0xffffffffu, mi, o);
        if (lane >= o) {
            ci += cy;
            mi += my;
        }
    }
    const unsigned long long total = __shfl_sync(0xffffffffu, mi, 31);
    if (with_mass && shift == 24) {
        const double want = ceil((double)top_p * (double)total);
        const unsigned long long tg = want < 1.0 ? 1ull : (unsigned long long)want;
        s.target = tg < total ? tg : total;
    }
    unsigned long long a = s.above + (mi - ml);
    int need = s.remaining - (int)(ci - cl);
    int found = -1;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (found >= 0) continue;
        if (with_mass) {
            if (c8[i] == 0u) continue;
            if (a + m8[i] >= s.target)
                found = i;
            else
                a += m8[i];
        } else {
            if ((int)c8[i] >= need)
                found = i;
            else
                need -= (int)c8[i];
        }
    }
    const unsigned hit = __ballot_sync(0xffffffffu, found >= 0);
    int digit;
    if (hit) {
        const int src = __ffs(hit) - 1;
        digit = 255 - 8 * src - __shfl_sync(0xffffffffu, found, src);
        if (with_mass) {
            s.above = __shfl_sync(0xffffffffu, a, src);
            s.remaining = (int)cnt[digit];
        } else {
            s.remaining = __shfl_sync(0xffffffffu, need, src);
        }
    } else {
        // (Cannot happen: the bucket the pass before chose holds the k-th
        // key, or reaches the target. Were it ever short, the lowest
        // non-empty bucket is kept whole.)
        int lowest = 256;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (c8[i] != 0u) lowest = 255 - 8 * lane - i;
        for (int o = 16; o > 0; o >>= 1) lowest = min(lowest, __shfl_xor_sync(0xffffffffu, lowest, o));
        digit = lowest == 256 ? 0 : lowest;
        s.above = s.above + total - (with_mass ? mass[digit] : 0ull);
        s.remaining = (int)cnt[digit];
    }
    s.prefix |= (unsigned)digit << shift;
    s.mask |= 255u << shift;
    return s;
}

// One warp, after the last pass: the kept key (prefix) and how many of its
// logits are kept (ties): top-k the remaining count; top-p alone, with the
// key's weight w in fixed point, the first ceil((target - above) / w).
__device__ SampleState sample_finish(const SampleScratch& S, const SampleParams& P, int kind, double t, double zmax) {
    SampleState s = sample_advance(S.st[3], S.hcnt + 3 * 256, S.hmass + 3 * 256, 0, kind == SAMPLE_TOPP, P.top_p);
    if (kind == SAMPLE_TOPK) {
        s.ties = s.remaining;
    } else {
        const unsigned long long wk = sample_fx(sample_weight(sample_key_value(s.prefix), t, zmax));
        const unsigned long long gap = s.target > s.above ? s.target - s.above : 0ull;
        const unsigned long long need = wk == 0 ? (unsigned long long)s.remaining : (gap + wk - 1) / wk;
        s.ties = need < (unsigned long long)s.remaining ? (int)need : s.remaining;
    }
    return s;
}

// For the lane's token (v its logit, `in` whether it is one): whether it is
// kept: key above kth, or equal to it among the first `ties` such logits of
// the row; `seen` counts the ties before this group of 32 (warp-wide).
__device__ __forceinline__ bool sample_kept(float v, bool in, unsigned kth, int ties, int& seen) {
    const unsigned lanes_below = (1u << (threadIdx.x & 31)) - 1u;
    const bool fin = in && sample_finite(v);
    const unsigned key = sample_key(v);
    const bool tie = fin && key == kth;
    const unsigned tb = __ballot_sync(0xffffffffu, tie);
    const int rank = seen + __popc(tb & lanes_below);
    seen += __popc(tb);
    return (fin && key > kth) || (tie && rank < ties);
}

// Warp w (< SAMPLE_CTA_WARPS) of a chunk CTA walks tokens [a, b) of the row,
// its segment: lane l holds tokens a + 32 j + l (j < SAMPLE_SEG / 32), NaN
// past b, all loaded at once (one round trip instead of one a group of 32).
#define SAMPLE_PER_LANE (SAMPLE_SEG / 32)
struct SampleSeg {
    float v[SAMPLE_PER_LANE];
    int a, b;
};

__device__ __forceinline__ void sample_load(SampleSeg& g, const float* x, int vocab, int chunk, int w) {
    const int hi = min(vocab, (chunk + 1) * SAMPLE_CHUNK), lane = threadIdx.x & 31;
    g.a = min(hi, chunk * SAMPLE_CHUNK + w * SAMPLE_SEG);
    g.b = min(hi, g.a + SAMPLE_SEG);
#pragma unroll
    for (int j = 0; j < SAMPLE_PER_LANE; j++) {
        const int i = g.a + 32 * j + lane;
        g.v[j] = i < g.b ? x[i] : __int_as_float(0x7fc00000);
    }
}

// The segment's logits of key kth (warp-wide).
__device__ __forceinline__ int sample_seg_ties(const SampleSeg& g, unsigned kth) {
    int n = 0;
#pragma unroll
    for (int j = 0; j < SAMPLE_PER_LANE; j++)
        n += __popc(__ballot_sync(0xffffffffu, sample_finite(g.v[j]) && sample_key(g.v[j]) == kth));
    return n;
}

// The row's logits of key kth (kth != 0) in the chunks before c, from
// their last-pass counts (one warp; every lane gets the sum).
__device__ int sample_ties_before(const SampleScratch& S, int c, unsigned kth) {
    int s = 0;
    for (int q = threadIdx.x & 31; q < c; q += 32) s += (int)S.chist[(size_t)q * 256 + (kth & 255u)];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// seen[w] = *base plus the counts n of the warps below w (warps below
// SAMPLE_CTA_WARPS), then *base moves past the chunk. The whole CTA calls
// it.
__device__ void sample_seen(int n, int* base, int* seen) {
    const int warp = threadIdx.x >> 5;
    if (warp < SAMPLE_CTA_WARPS && (threadIdx.x & 31) == 0) seen[warp] = n;
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = *base;
        for (int w = 0; w < SAMPLE_CTA_WARPS; w++) {
            const int k = seen[w];
            seen[w] = run;
            run += k;
        }
        *base = run;
    }
    __syncthreads();
}

// Whether each of the lane's logits is kept (bit j), from the ties before
// the segment (seen): key above kth, or equal to it among the first `ties`
// such logits of the row (warp-wide).
__device__ __forceinline__ unsigned sample_seg_kept(const SampleSeg& g, unsigned kth, int ties, int seen) {
    unsigned bits = 0u;
#pragma unroll
    for (int j = 0; j < SAMPLE_PER_LANE; j++)
        if (sample_kept(g.v[j], true, kth, ties, seen)) bits |= 1u << j;
    return bits;
}

// The kept logits' weights (0 for the others), computed side by side.
__device__ __forceinline__ void sample_seg_weights(const SampleSeg& g, unsigned kept, double t, double zmax,
                                                   double* w) {
#pragma unroll
    for (int j = 0; j < SAMPLE_PER_LANE; j++) w[j] = (kept >> j) & 1u ? sample_weight(g.v[j], t, zmax) : 0.0;
}

// The kept mass of a segment (each lane its weights in order, then the
// lanes by xor butterfly): sample_gather and sample_final compute it alike.
__device__ __forceinline__ double sample_seg_mass(const double* w) {
    double sum = 0.0;
#pragma unroll
    for (int j = 0; j < SAMPLE_PER_LANE; j++) sum += w[j];
    return sample_warp_sum(sum);
}

// What a chunk kernel's CTA works from: its row, the row's chunks (C), the
// chunks it takes [c0, c1), the row's settings and kind, logits and scratch.
struct SampleCta {
    int row, C, c0, c1, kind;
    SampleParams P;
    const float* x;
    SampleScratch S;
};

__device__ __forceinline__ SampleCta sample_cta(const float* logits, int vocab, const SampleParams* params,
                                                unsigned char* scratch, int group) {
    SampleCta k;
    k.row = blockIdx.y;
    k.C = sample_chunks(vocab);
    k.c0 = blockIdx.x * group;
    k.c1 = min(k.C, k.c0 + group);
    k.P = params[k.row];
    k.kind = sample_kind(k.P);
    k.x = logits + (size_t)k.row * vocab;
    k.S = sample_scratch(scratch, k.row, k.C);
    return k;
}

// The first steps of a chunk CTA after sample_stats: its first chunk's
// logits loaded (in flight while) the row's largest finite logit and finite
// count are read.
__device__ __forceinline__ void sample_begin(const SampleCta& K, int vocab, SampleSeg& g, float& m, int& finite) {
    sample_load(g, K.x, vocab, K.c0, threadIdx.x >> 5);
    sample_row_stats(K.S, K.C, m, finite);
}

// The chunk kernels: grid (ceil(chunks / group), rows), SAMPLE_CTA threads;
// CTA b takes chunks [b * group, (b + 1) * group) one after another, each
// exactly as a CTA of its own would (the next chunk's logits loaded while
// this one is worked on), so how many a CTA takes changes no result.

// Each chunk's largest finite logit and count of finite logits; the row's
// histograms and candidate count cleared for the passes that follow.
extern "C" __global__ void __launch_bounds__(SAMPLE_CTA, 4) sample_stats(const float* logits, int vocab,
                                                                       const SampleParams* params,
                                                                       unsigned char* scratch, int group) {
    __shared__ float rf[SAMPLE_CTA_WARPS];
    __shared__ int ri[SAMPLE_CTA_WARPS];
    pdl_begin();
    const SampleCta K = sample_cta(logits, vocab, params, scratch, group);
    const int tid = threadIdx.x, warp = tid >> 5, kind = K.kind, c0 = K.c0, c1 = K.c1;
    if (kind == SAMPLE_KEEP) return;
    const float* x = K.x;
    const SampleScratch& S = K.S;
    SampleSeg g;
    sample_load(g, x, vocab, c0, warp);
    if (kind != SAMPLE_TEMP) {
        for (int i = blockIdx.x * SAMPLE_CTA + tid; i < 4 * 256; i += gridDim.x * SAMPLE_CTA) {
            S.hcnt[i] = 0u;
            S.hmass[i] = 0ull;
        }
        if (blockIdx.x == 0 && tid == 0) *S.n_cand = 0u;
    }
    for (int c = c0; c < c1; c++) {
        SampleSeg next;
        if (c + 1 < c1) sample_load(next, x, vocab, c + 1, warp);
        float m = -__int_as_float(0x7f800000);
        int finite = 0;
#pragma unroll
        for (int j = 0; j < SAMPLE_PER_LANE; j++) {
            if (sample_finite(g.v[j])) {
                m = fmaxf(m, g.v[j]);
                finite++;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            finite += __shfl_xor_sync(0xffffffffu, finite, o);
        }
        if ((tid & 31) == 0) {
            rf[warp] = m;
            ri[warp] = finite;
        }
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < SAMPLE_CTA_WARPS; w++) {
                m = fmaxf(m, rf[w]);
                finite += ri[w];
            }
            S.cmax[c] = m;
            S.cfin[c] = finite;
        }
        __syncthreads();
        if (c + 1 < c1) g = next;
    }
}

// Pass 0..3 (key bits 31-24 down to 7-0), for rows of top-k or top-p alone:
// the state this pass starts from (the pass before's buckets; CTA 0 stores
// it for the next pass), then the counts (and fixed-point masses) of the
// finite logits whose key matches the prefix, by the pass's 8 bits, added
// to the row's buckets in shared memory (those of a group of 32 in the first
// active lane's bucket once, by one warp reduction; each other one by an
// atomic of its own: session 27 measured this 1.4x faster for top-p alone
// than adding once per bucket after __match_any_sync, whose groups and
// per-group reductions cost the more the more buckets a group of 32
// spans); the last pass also keeps each chunk's counts.
extern "C" __global__ void __launch_bounds__(SAMPLE_CTA, 4) sample_hist(const float* logits, int vocab,
                                                                      const SampleParams* params,
                                                                      unsigned char* scratch, int group, int pass) {
    __shared__ unsigned hist[256], hc[256], mlo[256], mhi[256];
    __shared__ unsigned long long hmass[256];
    __shared__ SampleState cur;
    pdl_begin();
    const SampleCta K = sample_cta(logits, vocab, params, scratch, group);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, kind = K.kind, c0 = K.c0, c1 = K.c1;
    if (kind != SAMPLE_TOPK && kind != SAMPLE_TOPP) return;
    SampleSeg g;
    float m;
    int finite;
    sample_begin(K, vocab, g, m, finite);
    const SampleParams& P = K.P;
    const float* x = K.x;
    const SampleScratch& S = K.S;
    if (finite == 0) return;  // the argmax stands, as on the host
    const bool with_mass = kind == SAMPLE_TOPP;
    const double t = (double)P.temperature, zmax = (double)m / t;
    for (int b = tid; b < 256; b += SAMPLE_CTA) {
        hist[b] = 0u;
        hc[b] = 0u;
        mlo[b] = 0u;
        mhi[b] = 0u;
        hmass[b] = 0ull;
    }
    if (warp == 0) {
        SampleState s = sample_start(P, kind, finite);
        if (pass > 0) {
            if (pass > 1) s = S.st[pass - 1];
            s = sample_advance(s, S.hcnt + (pass - 1) * 256, S.hmass + (pass - 1) * 256, 32 - 8 * pass, with_mass,
                               P.top_p);
        }
        if (lane == 0) {
            cur = s;
            if (blockIdx.x == 0 && pass > 0) S.st[pass] = s;
        }
    }
    __syncthreads();
    const unsigned pf = cur.prefix, mk = cur.mask;
    const int shift = 24 - 8 * pass;
    // The last pass counts each chunk apart (hc), then adds it to the CTA's;
    // masses are summed a chunk at a time in two 32-bit halves (mlo, mhi),
    // then added to the CTA's in 64 bits (no 64-bit shared atomics).
    unsigned* counts = pass == 3 ? hc : hist;
    const bool per_chunk = pass == 3 || with_mass;
    for (int c = c0; c < c1; c++) {
        SampleSeg next;
        if (c + 1 < c1) sample_load(next, x, vocab, c + 1, warp);
        unsigned match = 0u;
#pragma unroll
        for (int j = 0; j < SAMPLE_PER_LANE; j++)
            if (sample_finite(g.v[j]) && (sample_key(g.v[j]) & mk) == pf) match |= 1u << j;
        // Each group of 32 logits: the lanes in the first active lane's
        // bucket (most, in the first pass: they share the top bits) add
        // once, by one reduction; every other lane adds its own.
#pragma unroll
        for (int j = 0; j < SAMPLE_PER_LANE; j++) {
            const bool mj = (match >> j) & 1u;
            const unsigned act = __ballot_sync(0xffffffffu, mj);
            if (act == 0u) continue;
            const unsigned d = (sample_key(g.v[j]) >> shift) & 255u;
            const int src = __ffs(act) - 1;
            const unsigned d0 = __shfl_sync(0xffffffffu, d, src);
            const unsigned same = __ballot_sync(0xffffffffu, mj && d == d0);
            if (mj) {
                unsigned lo = 0u, hi = 0u, n = 1u;
                if (with_mass) {
                    const unsigned long long w = sample_fx(sample_weight(g.v[j], t, zmax));
                    lo = (unsigned)(w & 0x1fffffull);
                    hi = (unsigned)(w >> 21);
                }
                if (d == d0) {
                    if (with_mass) {
                        lo = __reduce_add_sync(same, lo);
                        hi = __reduce_add_sync(same, hi);
                    }
                    n = (unsigned)__popc(same);
                }
                if (d != d0 || lane == src) {
                    if (with_mass) {
                        atomicAdd(&mlo[d], lo);
                        atomicAdd(&mhi[d], hi);
                    }
                    atomicAdd(&counts[d], n);
                }
            }
        }
        if (per_chunk) {
            __syncthreads();
            for (int b = tid; b < 256; b += SAMPLE_CTA) {
                if (pass == 3) {
                    S.chist[(size_t)c * 256 + b] = hc[b];
                    hist[b] += hc[b];
                    hc[b] = 0u;
                }
                if (with_mass) {
                    hmass[b] += ((unsigned long long)mhi[b] << 21) + mlo[b];
                    mlo[b] = 0u;
                    mhi[b] = 0u;
                }
            }
            __syncthreads();
        }
        if (c + 1 < c1) g = next;
    }
    __syncthreads();
    for (int b = tid; b < 256; b += SAMPLE_CTA) {
        if (hist[b] != 0u) atomicAdd(S.hcnt + pass * 256 + b, hist[b]);
        if (hmass[b] != 0ull) atomicAdd(S.hmass + pass * 256 + b, hmass[b]);
    }
}

// The kept key and its ties after the last pass (CTA 0 stores them); then
// top-k's kept logits of each chunk into the row's candidates, or every
// other row's kept mass of each chunk (temperature alone: every finite
// logit), the sum of its warps' in order.
extern "C" __global__ void __launch_bounds__(SAMPLE_CTA, 4) sample_gather(const float* logits, int vocab,
                                                                        const SampleParams* params,
                                                                        unsigned char* scratch, int group) {
    __shared__ SampleState fin;
    __shared__ int seen[SAMPLE_CTA_WARPS], base;
    __shared__ double wsum[SAMPLE_CTA_WARPS];
    pdl_begin();
    const SampleCta K = sample_cta(logits, vocab, params, scratch, group);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, kind = K.kind, c0 = K.c0, c1 = K.c1;
    const SampleParams& P = K.P;
    const float* x = K.x;
    const SampleScratch& S = K.S;
    if (kind == SAMPLE_KEEP) return;
    SampleSeg g;
    float m;
    int finite;
    sample_begin(K, vocab, g, m, finite);
    if (finite == 0) return;
    const double t = (double)P.temperature, zmax = (double)m / t;
    unsigned kth = 0u;
    int ties = 0;
    if (kind != SAMPLE_TEMP) {
        if (warp == 0) {
            const SampleState s = sample_finish(S, P, kind, t, zmax);
            const int before = sample_ties_before(S, c0, s.prefix);
            if (lane == 0) {
                fin = s;
                base = before;
                if (blockIdx.x == 0) S.st[4] = s;
            }
        }
        __syncthreads();
        kth = fin.prefix;
        ties = fin.ties;
    } else if (tid == 0) {
        base = 0;
    }
    const unsigned lanes_below = (1u << lane) - 1u;
    for (int c = c0; c < c1; c++) {
        SampleSeg next;
        if (c + 1 < c1) sample_load(next, x, vocab, c + 1, warp);
        sample_seen(kth != 0u ? sample_seg_ties(g, kth) : 0, &base, seen);
        const unsigned kept = sample_seg_kept(g, kth, ties, seen[warp]);
        if (kind == SAMPLE_TOPK) {
#pragma unroll
            for (int j = 0; j < SAMPLE_PER_LANE; j++) {
                const bool keep = (kept >> j) & 1u;
                const unsigned kb = __ballot_sync(0xffffffffu, keep);
                if (kb == 0u) continue;
                unsigned at = 0u;
                if (lane == 0) at = atomicAdd(S.n_cand, (unsigned)__popc(kb));
                at = __shfl_sync(0xffffffffu, at, 0);
                const unsigned slot = at + (unsigned)__popc(kb & lanes_below);
                if (keep && slot < SAMPLE_MAX_K) {
                    S.cand_key[slot] = sample_key(g.v[j]);
                    S.cand_tok[slot] = g.a + 32 * j + lane;
                }
            }
        } else {
            double w[SAMPLE_PER_LANE];
            sample_seg_weights(g, kept, t, zmax, w);
            const double sum = sample_seg_mass(w);
            if (lane == 0) wsum[warp] = sum;
            __syncthreads();
            if (tid == 0) {
                double s = 0.0;
                for (int q = 0; q < SAMPLE_CTA_WARPS; q++) s += wsum[q];
                S.csum[c] = s;
            }
        }
        if (c + 1 < c1) g = next;
    }
}

// grid (rows), SAMPLE_FINAL threads: the draw. Top-k: the candidates sorted
// most likely first (larger key, then smaller token), their weights' prefix
// sums, top-p among them, the token where u of the kept mass falls. Others:
// the chunk where u of the row's kept mass falls (prefix sums of the
// chunks'), the warp segment within it (the chunk's sums again, in the same
// order), then the token, 32 at a time in token order.
extern "C" __global__ void __launch_bounds__(SAMPLE_FINAL) sample_final(const float* logits, int vocab,
                                                                         const SampleParams* params,
                                                                         unsigned char* scratch, int* tokens) {
    __shared__ double part[SAMPLE_MAX_K > SAMPLE_MAX_CHUNKS ? SAMPLE_MAX_K : SAMPLE_MAX_CHUNKS];
    __shared__ double pre[SAMPLE_MAX_K > SAMPLE_MAX_CHUNKS ? SAMPLE_MAX_K : SAMPLE_MAX_CHUNKS];
    __shared__ unsigned cand_key[SAMPLE_MAX_K];
    __shared__ int cand_tok[SAMPLE_MAX_K];
    __shared__ int seen[SAMPLE_CTA_WARPS], base;
    __shared__ double wsum[SAMPLE_CTA_WARPS];
    __shared__ int hit_c, hit_w;
    __shared__ double r_left;
    pdl_begin();
    const int row = blockIdx.x, C = sample_chunks(vocab);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const SampleParams P = params[row];
    const int kind = sample_kind(P);
    if (kind == SAMPLE_KEEP) return;
    const SampleScratch S = sample_scratch(scratch, row, C);
    float m;
    int finite;
    sample_row_stats(S, C, m, finite);
    if (finite == 0) return;
    const double t = (double)P.temperature, zmax = (double)m / t;

    if (kind == SAMPLE_TOPK) {
        const int k = min(min(P.top_k, SAMPLE_MAX_K), finite);
        const int nc = min((int)*S.n_cand, k);  // k: the gather keeps exactly k
        if (nc <= 0) return;
        int n = 1;
        while (n < nc) n <<= 1;
        for (int i = tid; i < n; i += SAMPLE_FINAL) {
            cand_key[i] = i < nc ? S.cand_key[i] : 0u;
            cand_tok[i] = i < nc ? S.cand_tok[i] : 0x7fffffff;
        }
        __syncthreads();
        sample_bitonic(
            n,
            [&](int i, int j) {
                return cand_key[i] > cand_key[j] || (cand_key[i] == cand_key[j] && cand_tok[i] < cand_tok[j]);
            },
            [&](int i, int j) {
                const unsigned kk = cand_key[i];
                const int tt = cand_tok[i];
                cand_key[i] = cand_key[j];
                cand_tok[i] = cand_tok[j];
                cand_key[j] = kk;
                cand_tok[j] = tt;
            });
        for (int q = tid; q < nc; q += SAMPLE_FINAL) part[q] = sample_weight(sample_key_value(cand_key[q]), t, zmax);
        __syncthreads();
        if (warp == 0) sample_prefix(part, pre, nc, lane);
        __syncthreads();
        if (tid == 0) {
            // Top-p: the first q with pre[q] >= p * total.
            int keep = nc;
            if (P.top_p < 1.f) {
                const int q = sample_search(pre, nc, (double)P.top_p * pre[nc - 1], true);
                keep = q < 0 ? nc : q + 1;
            }
            const int q = sample_search(pre, keep, P.u * pre[keep - 1], false);
            tokens[row] = cand_tok[q < 0 ? keep - 1 : q];
        }
        return;
    }

    unsigned kth = 0u;
    int ties = 0;
    if (kind == SAMPLE_TOPP) {
        kth = S.st[4].prefix;
        ties = S.st[4].ties;
    }
    for (int q = tid; q < C; q += SAMPLE_FINAL) part[q] = S.csum[q];
    __syncthreads();
    if (warp == 0) {
        sample_prefix(part, pre, C, lane);
        __syncwarp();
        if (lane == 0) {
            const double total = pre[C - 1];
            double r = P.u * total;
            int c = sample_search(pre, C, r, false);
            if (c < 0) {
                // Rounding past the end: the first chunk whose prefix sum
                // is the total, walked with all of its mass.
                c = max(0, sample_search(pre, C, total, true));
                r = part[c];
            } else {
                r -= c > 0 ? pre[c - 1] : 0.0;
            }
            hit_c = c;
            r_left = r;
        }
    }
    __syncthreads();
    // The chunk's segments again (warps 0..SAMPLE_CTA_WARPS-1), as the
    // gather summed them.
    SampleSeg g;
    double w[SAMPLE_PER_LANE];
    const bool seg = warp < SAMPLE_CTA_WARPS;
    const int c = hit_c;
    if (seg) sample_load(g, logits + (size_t)row * vocab, vocab, c, warp);
    if (warp == 0) {
        const int before = kth != 0u ? sample_ties_before(S, c, kth) : 0;
        if (lane == 0) base = before;
    }
    sample_seen(seg && kth != 0u ? sample_seg_ties(g, kth) : 0, &base, seen);
    unsigned kept = 0u;
    if (seg) {
        kept = sample_seg_kept(g, kth, ties, seen[warp]);
        sample_seg_weights(g, kept, t, zmax, w);
        const double s = sample_seg_mass(w);
        if (lane == 0) wsum[warp] = s;
    }
    __syncthreads();
    if (tid == 0) {
        // The running sum of the warps' masses is the chunk's (same order).
        double r = r_left, run = 0.0;
        int w_hit = -1, w_last = -1;
        for (int q = 0; q < SAMPLE_CTA_WARPS; q++) {
            const double next = run + wsum[q];
            if (wsum[q] > 0.0) w_last = q;
            if (w_hit < 0 && r < next) {
                w_hit = q;
                r -= run;
            }
            run = next;
        }
        if (w_hit < 0 && w_last >= 0) {
            // Rounding: the last segment with mass, walked with all of it.
            w_hit = w_last;
            r = wsum[w_last];
        }
        hit_w = w_hit;
        r_left = r;
    }
    __syncthreads();
    if (!seg || warp != hit_w) return;
    double r = r_left;
    int token = -1, last = -1;
#pragma unroll
    for (int j = 0; j < SAMPLE_PER_LANE; j++) {
        if (token >= 0) break;
        const bool k = (kept >> j) & 1u;
        double incl = w[j];
        for (int o = 1; o < 32; o <<= 1) {
            double y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        const unsigned hit = __ballot_sync(0xffffffffu, k && r < incl);
        const unsigned kb = __ballot_sync(0xffffffffu, k);
        if (hit) {
            token = g.a + 32 * j + __ffs(hit) - 1;
        } else {
            r -= __shfl_sync(0xffffffffu, incl, 31);
            if (kb) last = g.a + 32 * j + 31 - __clz(kb);
        }
    }
    if (token < 0) token = last;  // rounding: the segment's last kept token
    if (lane == 0 && token >= 0) tokens[row] = token;
}
