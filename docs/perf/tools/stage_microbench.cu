// What a grid-synchronised stage of the batch-1 fused kernel costs on this
// GPU, without weights: a persistent grid of `ctas` CTAs of THREADS threads
// (256, the default, or 512) runs
// `iters` rounds of
//   each CTA writes its share of a float row (the producing stage's outputs),
//   grid barrier,
//   each CTA brings the whole row into shared memory, sums its squares and
//   reduces them over the CTA (the start of every norm),
// with the row brought in one of four ways (mode):
//   0 no row (the barrier alone)
//   1 every thread loads its elements with ld.global.cg (the fused kernel's way)
//   2 one bulk copy (cp.async.bulk, TMA) per CTA into shared memory
//   3 clusters of `cl` CTAs: each CTA bulk-copies 1/cl of the row, multicast
//     into every CTA of its cluster (L2 reads the row once per cluster)
//   4 no grid barrier: two CTAs hand a flag back and forth (release store,
//     acquire poll), so a round is two one-way hand-offs through L2
//   6 as 1, then the rest of the fused kernel's norm: sums of squares in
//     f64, the normalised values' absolute maximum (a pass and a reduction),
//     the int8 quantisation and its sum (a pass and a reduction)
//   7 as 6, each pass loading eight of a thread's elements before using any
//   8 as 6 without conversion instructions (x * inv and the rounding as
//     kernels/bitnet.cu's mul_inv and quant_i8 compute them)
//   9 as 8 in two passes: max |x w| with the sum of squares (one combined
//     reduction), then v = (x w) * inv, so max |v| needs no pass of its own
//   5 no grid barrier: each element travels with its round number in one
//     64-bit word (NCCL's "LL" protocol: value bits | round << 32, stored and
//     loaded relaxed, single-copy atomic), every CTA loads the whole row and
//     reloads the words whose round is not yet the current one
// Each CTA checks the sum against the value the row must hold in that round
// (a stale or torn row fails), and the run prints us per round.
//
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -o /tmp/smb docs/perf/tools/stage_microbench.cu
//   /tmp/smb MODE N_FLOATS CTAS CLUSTER BARRIER_KIND ITERS [THREADS]
// BARRIER_KIND 0: fence.acq_rel.gpu then red.relaxed, acquire polls of the
//                 counter (the fused kernel's);
//              1: red.release.gpu (no separate fence);
//              2: as 0, relaxed polls and one acquire fence after;
//              3: as 0, 32 ns sleeps between polls;
//              4: the last CTA to arrive (atomicAdd's old value) sets a flag
//                 on another line, which the others poll.
//              5: no counter: each CTA stores the epoch in its own word of a
//                 flag array (fence, then a relaxed store); warp 0 of every
//                 CTA polls all the words with relaxed 16-byte loads, then
//                 one acquire fence;
//              6: as 5, each lane polling its words with acquire loads;
//              7: eight counters on separate 128-byte lines, CTA b arriving
//                 at counter b % 8; lanes 0-7 poll one counter each
//                 (acquire) until each holds its share.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                   \
    do {                                                                           \
        cudaError_t e = (x);                                                       \
        if (e != cudaSuccess) {                                                    \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                               \
        }                                                                          \
    } while (0)

__device__ __forceinline__ void grid_sync(unsigned* bar, unsigned epoch, int kind) {
    __syncthreads();
    if (kind >= 5) {
        // bar + 32 * (1 + i): kind 7's counters; bar + 512: kinds 5-6's flags
        // (at most 1024 CTAs: main checks).
        if (threadIdx.x < 32) {
            const int lane = threadIdx.x, g = gridDim.x;
            unsigned* flags = bar + 512;
            if (lane == 0) {
                asm volatile("fence.acq_rel.gpu;" ::: "memory");
                if (kind == 7)
                    asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(bar + 32 * (1 + blockIdx.x % 8))
                                 : "memory");
                else
                    asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(flags + blockIdx.x), "r"(epoch)
                                 : "memory");
            }
            bool ok;
            if (kind == 5) {
                do {
                    ok = true;
                    for (int i = 4 * lane; i < g; i += 128) {
                        unsigned a, b, c, d;
                        asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                                     : "=r"(a), "=r"(b), "=r"(c), "=r"(d)
                                     : "l"(flags + i)
                                     : "memory");
                        // Words past the grid stay 0: count them as arrived.
                        ok &= (a >= epoch) && (i + 1 >= g || b >= epoch) && (i + 2 >= g || c >= epoch) &&
                              (i + 3 >= g || d >= epoch);
                    }
                } while (!__all_sync(0xffffffffu, ok));
                asm volatile("fence.acq_rel.gpu;" ::: "memory");
            } else if (kind == 6) {
                do {
                    ok = true;
                    for (int i = lane; i < g; i += 32) {
                        unsigned v;
                        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(flags + i) : "memory");
                        ok &= v >= epoch;
                    }
                } while (!__all_sync(0xffffffffu, ok));
            } else {
                unsigned share = lane < 8 ? epoch * (unsigned)(g / 8 + (lane < g % 8 ? 1 : 0)) : 0u;
                do {
                    unsigned v = 0;
                    if (lane < 8)
                        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar + 32 * (1 + lane))
                                     : "memory");
                    ok = v >= share;
                } while (!__all_sync(0xffffffffu, ok));
            }
        }
        __syncthreads();
        return;
    }
    if (threadIdx.x == 0) {
        unsigned target = epoch * gridDim.x;
        unsigned v;
        if (kind == 4) {
            // The last CTA to arrive publishes the epoch in a flag on its own
            // line (bar + 32); the others poll the flag, not the counter.
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            unsigned before = atomicAdd(bar, 1u);
            if (before == target - 1) {
                asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(bar + 32), "r"(epoch) : "memory");
            } else {
                do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar + 32) : "memory");
                } while (v < epoch);
            }
        } else {
            if (kind == 1) {
                asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
            } else {
                asm volatile("fence.acq_rel.gpu;" ::: "memory");
                asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
            }
            if (kind == 2) {
                // Relaxed polls, one acquire fence after.
                do {
                    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
                } while (v < target);
                asm volatile("fence.acq_rel.gpu;" ::: "memory");
            } else {
                do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
                    if (kind == 3 && v < target) __nanosleep(32);
                } while (v < target);
            }
        }
    }
    __syncthreads();
}

template <int NT>
__device__ __forceinline__ float block_sum(float v, float* red) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < NT / 32; w++) s += red[w];
    __syncthreads();
    return s;
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ void cluster_sync_all() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// kernels/bitnet.cu's mul_inv (x * inv for inv = ih + il) and quant_i8.
__device__ __forceinline__ float mul_inv(float x, float ih, float il) {
    float ph = __fmul_rn(x, ih);
    return __fadd_rn(ph, __fmaf_rn(x, il, __fmaf_rn(x, ih, -ph)));
}
__device__ __forceinline__ int quant_i8(float t) {
    return __float_as_int(__fadd_rn(fminf(fmaxf(t, -128.f), 127.f), 12582912.0f)) - 0x4B400000;
}

// Value of element i in round r (exact in f32: small integers).
__device__ __forceinline__ float elem(int i, int r) { return (float)((i + r) & 7); }

template <int NT>
__global__ void __launch_bounds__(NT) stage_bench(float* rows, unsigned* bar, int* bad, int n, int iters,
                                                               int mode, int cl, int kind) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) unsigned long long mbar;
    __shared__ float red[NT / 32];
    float* row = (float*)smem;
    float* wn = row + n;  // modes 6-9: the norm weights (all 1, read at run time)
    for (int i = threadIdx.x; i < n && mode >= 6; i += NT) wn[i] = 1.0f;
    const int tid = threadIdx.x;
    if (mode >= 2) {
        if (tid == 0) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&mbar)));
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        if (mode == 3) cluster_sync_all();
        else __syncthreads();
    }
    // Expected sum of squares of a round's row, per residue class.
    const int per = (n + gridDim.x - 1) / gridDim.x;
    unsigned phase = 0;
    if (mode == 4) {
        // CTA 0 waits for even values, CTA 1 for odd ones; each writes the next.
        if (tid == 0 && blockIdx.x < 2) {
            for (unsigned v = blockIdx.x; v < 2u * iters; v += 2) {
                unsigned seen;
                do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(bar) : "memory");
                } while (seen != v);
                asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(bar), "r"(v + 1) : "memory");
            }
        }
        return;
    }
    if (mode == 5) {
        unsigned long long* words = (unsigned long long*)rows;
        for (int r = 0; r < iters; r++) {
            unsigned long long* buf = words + (size_t)(r & 1) * n;
            const unsigned tag = (unsigned)r + 1u;
            for (int i = blockIdx.x * per + tid; i < min(n, (blockIdx.x + 1) * per); i += NT) {
                unsigned long long w = (unsigned long long)__float_as_uint(elem(i, r)) | ((unsigned long long)tag << 32);
                asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(buf + i), "l"(w) : "memory");
            }
            float s = 0.f;
            constexpr int MAXJ = 28;  // n <= 28 * NT
            unsigned long long w[MAXJ];
#pragma unroll
            for (int j = 0; j < MAXJ; j++) {
                int i = tid + j * NT;
                w[j] = 0;
                if (i < n) asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w[j]) : "l"(buf + i) : "memory");
            }
#pragma unroll
            for (int j = 0; j < MAXJ; j++) {
                int i = tid + j * NT;
                if (i < n) {
                    while ((unsigned)(w[j] >> 32) != tag)
                        asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w[j]) : "l"(buf + i) : "memory");
                    float v = __uint_as_float((unsigned)w[j]);
                    row[i] = v;
                    s += v * v;
                }
            }
            s = block_sum<NT>(s, red);
            double exact = 0.0;
            for (int c = 0; c < 8; c++) {
                int cnt = n / 8 + ((n % 8) > c ? 1 : 0);
                float v = (float)((c + r) & 7);
                exact += (double)cnt * v * v;
            }
            if (tid == 0 && (double)s != exact) atomicAdd(bad, 1);
        }
        return;
    }
    for (int r = 0; r < iters; r++) {
        float* buf = rows + (size_t)(r & 1) * n;
        // Produce: this CTA's share of the row.
        for (int i = blockIdx.x * per + tid; i < min(n, (blockIdx.x + 1) * per); i += NT) buf[i] = elem(i, r);
        grid_sync(bar, r + 1, kind);
        if (mode == 0) continue;
        float s = 0.f;
        if (mode == 9) {
            // Two passes: the sum of squares and max |x w| from the loads,
            // one combined reduction, then v = (x w) * inv quantised.
            double ss = 0.0;
            float m = 0.f;
            for (int i = tid; i < n; i += NT) {
                float v;
                asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(buf + i));
                row[i] = v;
                ss += (double)v * (double)v;
                m = fmaxf(m, fabsf(__fmul_rn(v, wn[i])));
            }
            for (int o = 16; o; o >>= 1) {
                ss += __shfl_xor_sync(0xffffffffu, ss, o);
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            }
            __shared__ double dred9[NT / 32];
            if ((tid & 31) == 0) {
                dred9[tid >> 5] = ss;
                red[tid >> 5] = m;
            }
            __syncthreads();
            double t = 0.0;
            float mm = red[0];
            for (int w = 0; w < NT / 32; w++) t += dred9[w];
            for (int w = 1; w < NT / 32; w++) mm = fmaxf(mm, red[w]);
            double inv = 1.0 / sqrt(t / (double)n + 1e-6);
            float ih = (float)inv, il = (float)(inv - (double)ih);
            float amax = mul_inv(mm, ih, il);
            float sc = 127.0f / fmaxf(amax, 1e-5f);
            int qs = 0;
            signed char* q8 = (signed char*)(row + 2 * n);
            for (int i = tid; i < n; i += NT) {
                int q = quant_i8(__fmul_rn(mul_inv(__fmul_rn(row[i], wn[i]), ih, il), sc));
                q8[i] = (signed char)q;
                qs += q;
            }
            for (int o = 16; o; o >>= 1) qs += __shfl_xor_sync(0xffffffffu, qs, o);
            __shared__ int ired9[NT / 32];
            if ((tid & 31) == 0) ired9[tid >> 5] = qs;
            __syncthreads();
            int qt = 0;
            for (int w = 0; w < NT / 32; w++) qt += ired9[w];
            s = (float)t;
            if (qt < 0) s = -1.f;
            __syncthreads();
        } else if (mode >= 6) {
            // The fused norm's shape: f64 squares, three CTA reductions, two
            // passes over the shared row; weights w_i = 1 (the row is 0..7,
            // so the scale and every quantised value are exact).
            double ss = 0.0;
            for (int i = tid; i < n; i += NT) {
                float v;
                asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(buf + i));
                row[i] = v;
                ss += (double)v * (double)v;
            }
            for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            __shared__ double dred[NT / 32];
            if ((tid & 31) == 0) dred[tid >> 5] = ss;
            __syncthreads();
            double t = 0.0;
            for (int w = 0; w < NT / 32; w++) t += dred[w];
            double inv = 1.0 / sqrt(t / (double)n + 1e-6);
            float amax = 0.f;
            if (mode == 7) {
                // Eight of the thread's elements loaded before any is used.
                for (int b = tid; b < n; b += NT * 8) {
                    float x[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) x[u] = b + u * NT < n ? row[b + u * NT] : 0.f;
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        float v = (float)((double)x[u] * inv) * wn[b + u * NT < n ? b + u * NT : 0];
                        amax = fmaxf(amax, fabsf(v));
                        if (b + u * NT < n) row[b + u * NT] = v;
                    }
                }
            } else if (mode == 8) {
                float ih = (float)inv, il = (float)(inv - (double)ih);
                for (int i = tid; i < n; i += NT) {
                    float v = __fmul_rn(mul_inv(row[i], ih, il), wn[i]);
                    amax = fmaxf(amax, fabsf(v));
                    row[i] = v;
                }
            } else {
                for (int i = tid; i < n; i += NT) {
                    float v = (float)((double)row[i] * inv) * wn[i];
                    amax = fmaxf(amax, fabsf(v));
                    row[i] = v;
                }
            }
            for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            if ((tid & 31) == 0) red[tid >> 5] = amax;
            __syncthreads();
            float m = red[0];
            for (int w = 1; w < NT / 32; w++) m = fmaxf(m, red[w]);
            float sc = 127.0f / fmaxf(m, 1e-5f);
            int qs = 0;
            signed char* q8 = (signed char*)(row + 2 * n);
            if (mode == 7) {
                for (int b = tid; b < n; b += NT * 8) {
                    float x[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) x[u] = b + u * NT < n ? row[b + u * NT] : 0.f;
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        int q = (int)fminf(fmaxf(rintf(x[u] * sc), -128.f), 127.f);
                        if (b + u * NT < n) {
                            q8[b + u * NT] = (signed char)q;
                            qs += q;
                        }
                    }
                }
            } else if (mode == 8) {
                for (int i = tid; i < n; i += NT) {
                    int q = quant_i8(__fmul_rn(row[i], sc));
                    q8[i] = (signed char)q;
                    qs += q;
                }
            } else {
                for (int i = tid; i < n; i += NT) {
                    int q = (int)fminf(fmaxf(rintf(row[i] * sc), -128.f), 127.f);
                    q8[i] = (signed char)q;
                    qs += q;
                }
            }
            __syncthreads();
            for (int o = 16; o; o >>= 1) qs += __shfl_xor_sync(0xffffffffu, qs, o);
            __shared__ int ired[NT / 32];
            if ((tid & 31) == 0) ired[tid >> 5] = qs;
            __syncthreads();
            int qt = 0;
            for (int w = 0; w < NT / 32; w++) qt += ired[w];
            // The check: the sum of squares of the row, recomputed exactly.
            s = (float)t;
            if (qt < 0) s = -1.f;  // keeps the quantisation live (the row is non-negative)
            __syncthreads();
        } else if (mode == 1) {
            for (int i = tid; i < n; i += NT) {
                float v;
                asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(buf + i));
                row[i] = v;
                s += v * v;
            }
        } else {
            if (tid == 0) {
                const unsigned bytes = (unsigned)n * 4u;
                asm volatile("fence.proxy.async.global;" ::: "memory");
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(&mbar)),
                             "r"(bytes)
                             : "memory");
                if (mode == 2) {
                    asm volatile(
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                            smem_u32(row)),
                        "l"(buf), "r"(bytes), "r"(smem_u32(&mbar))
                        : "memory");
                } else {
                    const unsigned rank = cluster_rank();
                    const unsigned part = bytes / cl;  // n * 4 / cl, a multiple of 16 (checked on the host)
                    const unsigned short mask = (unsigned short)((1u << cl) - 1u);
                    asm volatile(
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], "
                        "[%1], %2, [%3], %4;" ::"r"(smem_u32(row) + rank * part),
                        "l"((const char*)buf + rank * part), "r"(part), "r"(smem_u32(&mbar)), "h"(mask)
                        : "memory");
                }
            }
            // Every thread waits for the phase to complete.
            unsigned done = 0;
            while (!done) {
                asm volatile(
                    "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
                    : "=r"(done)
                    : "r"(smem_u32(&mbar)), "r"(phase)
                    : "memory");
            }
            phase ^= 1;
            for (int i = tid; i < n; i += NT) {
                float v = row[i];
                s += v * v;
            }
        }
        if (mode < 6) s = block_sum<NT>(s, red);
        // Exact check of the whole sum: each residue class mod 8 repeats.
        double exact = 0.0;
        for (int c = 0; c < 8; c++) {
            int cnt = n / 8 + ((n % 8) > c ? 1 : 0);
            float v = (float)((c + r) & 7);
            exact += (double)cnt * v * v;
        }
        if (tid == 0 && (double)s != exact) atomicAdd(bad, 1);
    }
    if (mode == 3) cluster_sync_all();  // no CTA exits while a peer may still multicast into it
}

int main(int argc, char** argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s MODE N_FLOATS CTAS CLUSTER BARRIER_KIND ITERS [THREADS: 256 or 512]\n", argv[0]);
        return 2;
    }
    int mode = atoi(argv[1]), n = atoi(argv[2]), ctas = atoi(argv[3]), cl = atoi(argv[4]), kind = atoi(argv[5]),
        iters = atoi(argv[6]), nt = argc > 7 ? atoi(argv[7]) : 256;
    if (nt != 256 && nt != 512) {
        fprintf(stderr, "THREADS must be 256 or 512\n");
        return 2;
    }
    auto kern = nt == 256 ? stage_bench<256> : stage_bench<512>;
    if (mode == 5 && n > 28 * nt) {
        fprintf(stderr, "mode 5 takes at most 7168 floats\n");
        return 2;
    }
    if (mode == 3 && ((n * 4) % (16 * cl) || ctas % cl)) {
        fprintf(stderr, "row bytes must split into 16-byte multiples per cluster CTA, CTAs into clusters\n");
        return 2;
    }
    float* rows;
    unsigned* bar;
    int* bad;
    CHECK(cudaMalloc(&rows, 2 * (size_t)n * 8));  // mode 5: 64-bit words
    CHECK(cudaMemset(rows, 0, 2 * (size_t)n * 8));
    if (kind >= 5 && ctas > 1024) {
        fprintf(stderr, "barrier kinds 5-7 take at most 1024 CTAs\n");
        return 2;
    }
    CHECK(cudaMalloc(&bar, 8192));  // kinds 5-6: the flags at byte 2048
    CHECK(cudaMalloc(&bad, 4));
    size_t smem = (size_t)n * 9;  // the row, (modes 6-9) the norm weights and the int8 copy
    CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    if (mode == 3) CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(ctas);
    cfg.blockDim = dim3(nt);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attrs[2];
    int na = 0;
    attrs[na].id = cudaLaunchAttributeCooperative;
    attrs[na].val.cooperative = 1;
    na++;
    if (mode == 3) {
        attrs[na].id = cudaLaunchAttributeClusterDimension;
        attrs[na].val.clusterDim.x = cl;
        attrs[na].val.clusterDim.y = 1;
        attrs[na].val.clusterDim.z = 1;
        na++;
        int clusters = 0;
        cfg.attrs = attrs + 1;
        cfg.numAttrs = 1;
        CHECK(cudaOccupancyMaxActiveClusters(&clusters, kern, &cfg));
        printf("max active clusters of %d: %d (%d CTAs)\n", cl, clusters, clusters * cl);
        if (clusters * cl < ctas) {
            printf("RESULT mode=%d n=%d ctas=%d cl=%d kind=%d: does not fit\n", mode, n, ctas, cl, kind);
            return 0;
        }
    }
    cfg.attrs = attrs;
    cfg.numAttrs = na;
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    float best = 1e30f;
    for (int rep = 0; rep < 5; rep++) {
        CHECK(cudaMemset(bar, 0, 8192));
        CHECK(cudaMemset(bad, 0, 4));
        CHECK(cudaEventRecord(e0));
        cudaError_t le = cudaLaunchKernelEx(&cfg, kern, rows, bar, bad, n, iters, mode, cl, kind);
        if (le != cudaSuccess && mode == 3 && rep == 0) {
            printf("cooperative + cluster launch refused (%s); launching without the cooperative attribute\n",
                   cudaGetErrorString(le));
            cudaGetLastError();
            cfg.attrs = attrs + 1;
            cfg.numAttrs = 1;
            le = cudaLaunchKernelEx(&cfg, kern, rows, bar, bad, n, iters, mode, cl, kind);
        }
        CHECK(le);
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        int hbad;
        CHECK(cudaMemcpy(&hbad, bad, 4, cudaMemcpyDeviceToHost));
        if (hbad) {
            printf("RESULT mode=%d n=%d ctas=%d cl=%d kind=%d: %d WRONG SUMS\n", mode, n, ctas, cl, kind, hbad);
            return 1;
        }
        if (ms < best) best = ms;
    }
    printf("RESULT mode=%d n=%d ctas=%d threads=%d cl=%d kind=%d: %.3f us per round (best of 5, %d rounds)\n", mode, n,
           ctas, nt, cl, kind, best * 1000.f / iters, iters);
    return 0;
}
