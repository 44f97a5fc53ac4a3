// vpdpbusd throughput on this CPU, one and two threads (docs/perf/cpu.md,
// session 7). Twelve independent accumulator chains, so the loop is bound by
// the VNNI units' throughput, not their latency; distinct start values and an
// empty asm barrier keep the compiler from merging the chains. Build and run:
//   gcc -O2 -mavx512f -mavx512bw -mavx512vnni -o /tmp/vnni tools/cpu_probes/vnni_throughput.c -lpthread && /tmp/vnni
// (objdump -d /tmp/vnni | grep -c vpdpbusd should print 12).
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 400000000L
#define D(a) a = _mm512_dpbusd_epi32(a, w, q);

static void* run(void* arg) {
    __m512i w = _mm512_set1_epi8(3), q = _mm512_set1_epi8(1);
    __m512i a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1), a2 = _mm512_set1_epi32(2),
            a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5),
            a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7), a8 = _mm512_set1_epi32(8),
            a9 = _mm512_set1_epi32(9), a10 = _mm512_set1_epi32(10), a11 = _mm512_set1_epi32(11);
    for (long i = 0; i < N / 12; i++) {
        __asm__ volatile("" : "+v"(w), "+v"(q));
        D(a0) D(a1) D(a2) D(a3) D(a4) D(a5) D(a6) D(a7) D(a8) D(a9) D(a10) D(a11)
    }
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                 _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
    s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)));
    *(int*)arg = _mm512_reduce_add_epi32(s);
    return 0;
}

int main(void) {
    for (int th = 1; th <= 2; th++) {
        pthread_t t[2];
        int r[2];
        double t0 = now();
        for (int i = 0; i < th; i++) pthread_create(&t[i], 0, run, &r[i]);
        for (int i = 0; i < th; i++) pthread_join(t[i], 0);
        double dt = now() - t0;
        printf("%d thread(s): %.2f G vpdpbusd/s in all, %.2f per thread (%.0f GB/s of I2_S codes per thread)\n", th,
               th * N / dt / 1e9, N / dt / 1e9, N / dt * 16 / 1e9);
    }
    return 0;
}
