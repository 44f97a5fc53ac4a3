// Two numbers that decide whether a batch-1 decode kernel run by one
// thread-block cluster (hardware barriers and distributed shared memory
// instead of grid barriers through L2) could reach the bandwidth target:
//
//   stream: how fast CTAS CTAs (one per SM: the dynamic shared memory asks
//     for most of an SM) read BYTES_PER_CTA bytes each, launched plain or in
//     clusters of CLUSTER CTAs, by
//       METHOD 0: ld.global.nc.v4 (16 bytes a load, 16 loads in flight per
//                 thread, 512 threads: 128 KB in flight per SM)
//       METHOD 1: cp.async.bulk (TMA) of CHUNK bytes into a ring of STAGES
//                 shared-memory buffers (STAGES x CHUNK in flight per SM),
//                 issued by one thread
//     RESIDENT 0: every repetition reads a region of a 4 GiB buffer no other
//     repetition touched (HBM); 1: the same region each time (L2 when the
//     total fits in it). Prints GB/s (best of 7) for the grid and per CTA.
//
//   cbar: rounds of a stage hand-off inside one cluster of CLUSTER CTAs
//     (512 threads each): every CTA writes its share of an N_FLOATS row,
//     cluster barrier (barrier.cluster arrive.release / wait.acquire),
//     and then
//       MODE 0: nothing (the barrier alone)
//       MODE 1: every CTA reads the whole row from its peers' shared memory
//               (ld.shared::cluster, 16 bytes a load) and sums its squares
//       MODE 2: as 1, but each CTA first pushed its share into every peer's
//               shared memory (st.shared::cluster) before the barrier, so
//               the row is read locally after it
//     Each CTA checks the sum (a stale row fails the run); us per round,
//     best of 5. Compare with stage_microbench.cu's grid-barrier rounds.
//
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -o /tmp/cmb docs/perf/tools/cluster_microbench.cu
//   /tmp/cmb stream CTAS BYTES_PER_CTA METHOD CLUSTER RESIDENT [CHUNK STAGES]
//   /tmp/cmb cbar CLUSTER N_FLOATS MODE ITERS
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define CHECK(x)                                                                                \
    do {                                                                                        \
        cudaError_t e = (x);                                                                    \
        if (e != cudaSuccess) {                                                                 \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e));   \
            exit(1);                                                                            \
        }                                                                                       \
    } while (0)

constexpr int NT = 512;
constexpr int UNROLL = 16;

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_nctas() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync_all() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The shared::cluster address of `p` (this CTA's shared memory) in CTA `rank`.
__device__ __forceinline__ unsigned map_rank(const void* p, unsigned rank) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(smem_u32(p)), "r"(rank));
    return r;
}

__device__ __forceinline__ uint4 ld_nc4(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__global__ void __launch_bounds__(NT, 1) stream_ld(const uint4* __restrict__ src, size_t per_cta_vec, unsigned* out) {
    const uint4* p = src + blockIdx.x * per_cta_vec;
    unsigned acc = 0;
    for (size_t i = threadIdx.x; i < per_cta_vec; i += (size_t)NT * UNROLL) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            size_t j = i + (size_t)u * NT;
            v[u] = j < per_cta_vec ? ld_nc4(p + j) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads live
}

__global__ void __launch_bounds__(32, 1) stream_tma(const char* src, size_t per_cta, unsigned chunk, int stages) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) unsigned long long mbar[16];
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&mbar[s])));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    if (threadIdx.x != 0) return;
    const char* p = src + blockIdx.x * per_cta;
    size_t n = per_cta / chunk;
    auto wait = [&](int s, unsigned parity) {
        unsigned done = 0;
        while (!done) {
            asm volatile(
                "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
                : "=r"(done)
                : "r"(smem_u32(&mbar[s])), "r"(parity)
                : "memory");
        }
    };
    for (size_t i = 0; i < n; i++) {
        int s = (int)(i % stages);
        if (i >= (size_t)stages) wait(s, (unsigned)((i / stages - 1) & 1));
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(&mbar[s])), "r"(chunk)
                     : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                smem_u32(smem + (size_t)s * chunk)),
            "l"(p + i * chunk), "r"(chunk), "r"(smem_u32(&mbar[s]))
            : "memory");
    }
    size_t first = n > (size_t)stages ? n - stages : 0;
    for (size_t i = first; i < n; i++) wait((int)(i % stages), (unsigned)((i / stages) & 1));
}

__device__ __forceinline__ float elem(int i, int r) { return (float)((i + r) & 7); }

__global__ void __launch_bounds__(NT, 1) cbar(int n, int iters, int mode, int* bad) {
    extern __shared__ __align__(16) float row2[];  // [2][n]
    __shared__ float red[NT / 32];
    const unsigned C = cluster_nctas(), rank = cluster_rank();
    const int per = n / (int)C, tid = threadIdx.x;
    for (int r = 0; r < iters; r++) {
        float* buf = row2 + (size_t)(r & 1) * n;
        for (int i = tid; i < per; i += NT) {
            int g = (int)rank * per + i;
            float v = elem(g, r);
            if (mode == 2) {
                for (unsigned d = 0; d < C; d++)
                    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(map_rank(buf + g, d)), "f"(v) : "memory");
            } else {
                buf[g] = v;
            }
        }
        cluster_sync_all();
        if (mode == 0) continue;
        float s = 0.f;
        for (int i = tid * 4; i < n; i += NT * 4) {
            float4 v;
            if (mode == 1) {
                unsigned owner = (unsigned)(i / per);
                asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];"
                             : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                             : "r"(map_rank(buf + i, owner))
                             : "memory");
            } else {
                v = *(const float4*)(buf + i);
            }
            s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if ((tid & 31) == 0) red[tid >> 5] = s;
        __syncthreads();
        float t = 0.f;
        for (int w = 0; w < NT / 32; w++) t += red[w];
        __syncthreads();
        double exact = 0.0;
        for (int c = 0; c < 8; c++) {
            int cnt = n / 8 + ((n % 8) > c ? 1 : 0);
            float v = (float)((c + r) & 7);
            exact += (double)cnt * v * v;
        }
        if (tid == 0 && (double)t != exact) atomicAdd(bad, 1);
    }
    cluster_sync_all();  // no CTA leaves while a peer may still read its shared memory
}

static int run_stream(int argc, char** argv) {
    if (argc < 7) return 2;
    int ctas = atoi(argv[2]), method = atoi(argv[4]), cl = atoi(argv[5]), resident = atoi(argv[6]);
    size_t per = strtoull(argv[3], nullptr, 10);
    unsigned chunk = argc > 7 ? (unsigned)atoi(argv[7]) : 32768;
    int stages = argc > 8 ? atoi(argv[8]) : 6;
    if (per % 16 || (method == 1 && (per % chunk || chunk % 16 || stages < 1 || stages > 16)) || ctas % cl) {
        fprintf(stderr, "bad shape\n");
        return 2;
    }
    const size_t pool = (size_t)4 << 30, total = per * ctas;
    if (total > pool / 8) {
        fprintf(stderr, "at most %zu bytes per run\n", pool / 8);
        return 2;
    }
    char* buf;
    unsigned* out;
    CHECK(cudaMalloc(&buf, pool));
    CHECK(cudaMemset(buf, 1, pool));
    CHECK(cudaMalloc(&out, 4));
    size_t smem = method == 1 ? (size_t)chunk * stages : 160 * 1024;
    void* kern = method == 1 ? (void*)stream_tma : (void*)stream_ld;
    CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    if (cl > 8) CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(ctas);
    cfg.blockDim = dim3(method == 1 ? 32 : NT);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cl;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    if (cl > 1) {
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        int clusters = 0;
        if (method == 1)
            CHECK(cudaOccupancyMaxActiveClusters(&clusters, stream_tma, &cfg));
        else
            CHECK(cudaOccupancyMaxActiveClusters(&clusters, stream_ld, &cfg));
        printf("max active clusters of %d: %d\n", cl, clusters);
        if (clusters * cl < ctas) {
            printf("RESULT stream ctas=%d cl=%d: does not fit\n", ctas, cl);
            return 0;
        }
    }
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    float best = 1e30f;
    for (int rep = 0; rep < 8; rep++) {
        size_t off = resident ? 0 : (size_t)(rep % 8) * (pool / 8);
        CHECK(cudaEventRecord(e0));
        cudaError_t le;
        if (method == 1)
            le = cudaLaunchKernelEx(&cfg, stream_tma, (const char*)(buf + off), per, chunk, stages);
        else
            le = cudaLaunchKernelEx(&cfg, stream_ld, (const uint4*)(buf + off), per / 16, out);
        CHECK(le);
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (rep > 0 && ms < best) best = ms;  // the first run warms up
    }
    double gbs = (double)total / (best * 1e-3) / 1e9;
    printf("RESULT stream ctas=%d bytes/cta=%zu method=%d cl=%d resident=%d chunk=%u stages=%d: %.1f us, %.0f GB/s, "
           "%.1f GB/s per CTA\n",
           ctas, per, method, cl, resident, chunk, stages, best * 1e3, gbs, gbs / ctas);
    return 0;
}

static int run_cbar(int argc, char** argv) {
    if (argc < 6) return 2;
    int cl = atoi(argv[2]), n = atoi(argv[3]), mode = atoi(argv[4]), iters = atoi(argv[5]);
    if (n % (4 * cl) || n < 4 * cl) {
        fprintf(stderr, "N_FLOATS must be a multiple of 4 x CLUSTER\n");
        return 2;
    }
    int* bad;
    CHECK(cudaMalloc(&bad, 4));
    size_t smem = 160 * 1024;  // one CTA per SM, like the fused kernel
    CHECK(cudaFuncSetAttribute(cbar, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    if (cl > 8) CHECK(cudaFuncSetAttribute(cbar, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(cl);
    cfg.blockDim = dim3(NT);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cl;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    CHECK(cudaOccupancyMaxActiveClusters(&clusters, cbar, &cfg));
    if (clusters < 1) {
        printf("RESULT cbar cl=%d: does not fit\n", cl);
        return 0;
    }
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    float best = 1e30f;
    for (int rep = 0; rep < 6; rep++) {
        CHECK(cudaMemset(bad, 0, 4));
        CHECK(cudaEventRecord(e0));
        CHECK(cudaLaunchKernelEx(&cfg, cbar, n, iters, mode, bad));
        CHECK(cudaEventRecord(e1));
        CHECK(cudaEventSynchronize(e1));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, e0, e1));
        int hbad;
        CHECK(cudaMemcpy(&hbad, bad, 4, cudaMemcpyDeviceToHost));
        if (hbad) {
            printf("RESULT cbar cl=%d n=%d mode=%d: %d WRONG SUMS\n", cl, n, mode, hbad);
            return 1;
        }
        if (rep > 0 && ms < best) best = ms;
    }
    printf("RESULT cbar cl=%d n=%d mode=%d: %.3f us per round (best of 5, %d rounds; max active clusters %d)\n", cl, n,
           mode, best * 1000.f / iters, iters, clusters);
    return 0;
}

int main(int argc, char** argv) {
    int rc = 2;
    if (argc > 1 && !strcmp(argv[1], "stream")) rc = run_stream(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "cbar")) rc = run_cbar(argc, argv);
    if (rc == 2)
        fprintf(stderr,
                "usage: %s stream CTAS BYTES_PER_CTA METHOD CLUSTER RESIDENT [CHUNK STAGES]\n"
                "       %s cbar CLUSTER N_FLOATS MODE ITERS\n",
                argv[0], argv[0]);
    return rc;
}
