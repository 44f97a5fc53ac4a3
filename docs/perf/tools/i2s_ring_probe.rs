//! Session 10's probe of single-thread I2_S streaming on the dev box (not
//! part of the workspace: copy it into a scratch binary crate as src/main.rs,
//! `cargo build --release`, run `./target/release/swp ROUNDS [BYTES]`).
//!
//! The AVX-512 I2_S decode arithmetic per 64-byte code pair (four masks,
//! four `vpdpbusd` against activations in L1) over a buffer of BYTES
//! (default 512 MiB, i.e. DRAM): `plain` loads each pair right before its
//! products (as the shipped kernel does), optionally with a `prefetcht0`
//! 8 KiB ahead; `ring::<U>` loads each pair U pairs before its products
//! into a ring of registers (`ring::<U, QM>`: the activation pair cycles
//! over QM pairs, so QM = 8 gives each unrolled slot a constant activation
//! address); `rows_plain` / `rows_ring` add the row structure of the library
//! (10 pairs per row, a horizontal sum per row); `rows2` runs two rows in
//! lockstep sharing each activation load; `sum` is a plain summing
//! loop. Results in
//! docs/perf/cpu.md (session 10). Experiment code: unsafe intrinsics
//! outside the kernels' safe wrappers, never shipped.

use std::arch::x86_64::*;
use std::time::Instant;

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn plain(codes: *const u8, n: usize, q: *const i8, pf: usize) -> i32 {
    let masks = [0b1100_0000u8, 0b0011_0000, 0b0000_1100, 0b0000_0011].map(|m| _mm512_set1_epi8(m as i8));
    let mut acc = [_mm512_setzero_si512(); 4];
    for p in 0..n {
        let w = _mm512_loadu_si512(codes.add(p * 64) as *const _);
        if pf > 0 { _mm_prefetch::<_MM_HINT_T0>(codes.wrapping_add(p * 64 + pf) as *const i8); }
        let qp = q.add((p & 7) * 256);
        for g in 0..4 {
            acc[g] = _mm512_dpbusd_epi32(acc[g], _mm512_and_si512(w, masks[g]), _mm512_loadu_si512(qp.add(g * 64) as *const _));
        }
    }
    _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3])))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn ring<const U: usize, const QM: usize>(codes: *const u8, n: usize, q: *const i8) -> i32 {
    let masks = [0b1100_0000u8, 0b0011_0000, 0b0000_1100, 0b0000_0011].map(|m| _mm512_set1_epi8(m as i8));
    let mut acc = [_mm512_setzero_si512(); 4];
    let mut r = [_mm512_setzero_si512(); U];
    for j in 0..U { r[j] = _mm512_loadu_si512(codes.add(j * 64) as *const _); }
    let mut p = 0;
    while p + 2 * U <= n {
        for j in 0..U {
            let w = r[j];
            r[j] = _mm512_loadu_si512(codes.add((p + U + j) * 64) as *const _);
            let qp = q.add(((p + j) % QM) * 256);
            for g in 0..4 {
                acc[g] = _mm512_dpbusd_epi32(acc[g], _mm512_and_si512(w, masks[g]), _mm512_loadu_si512(qp.add(g * 64) as *const _));
            }
        }
        p += U;
    }
    _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(acc[0], acc[1]), _mm512_add_epi32(acc[2], acc[3])))
}


#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_plain(codes: *const u8, n: usize, q: *const i8, ppr: usize, pf: usize, out: &mut [i32]) -> i32 {
    let masks = [0b1100_0000u8, 0b0011_0000, 0b0000_1100, 0b0000_0011].map(|m| _mm512_set1_epi8(m as i8));
    let rows = n / ppr;
    for r in 0..rows {
        let mut acc = [_mm512_setzero_si512(); 4];
        let base = codes.add(r * ppr * 64);
        for p in 0..ppr {
            let w = _mm512_loadu_si512(base.add(p * 64) as *const _);
            if pf > 0 { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(p * 64 + pf) as *const i8); }
            let qp = q.add(p * 256);
            for g in 0..4 {
                acc[g] = _mm512_dpbusd_epi32(acc[g], _mm512_and_si512(w, masks[g]), _mm512_loadu_si512(qp.add(g * 64) as *const _));
            }
        }
        out[r] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(_mm512_srai_epi32::<6>(acc[0]), acc[1]), _mm512_add_epi32(acc[2], acc[3])));
    }
    out[rows / 2]
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows_ring(codes: *const u8, n: usize, q: *const i8, ppr: usize, out: &mut [i32]) -> i32 {
    const U: usize = 8;
    let masks = [0b1100_0000u8, 0b0011_0000, 0b0000_1100, 0b0000_0011].map(|m| _mm512_set1_epi8(m as i8));
    let mut acc = [_mm512_setzero_si512(); 4];
    let mut r = [_mm512_setzero_si512(); U];
    for j in 0..U { r[j] = _mm512_loadu_si512(codes.add(j * 64) as *const _); }
    let (mut row, mut pair) = (0usize, 0usize);
    let mut p = 0;
    macro_rules! slot { ($j:expr) => {{
            let w = r[$j];
            r[$j] = _mm512_loadu_si512(codes.add((p + U + $j) * 64) as *const _);
            let qp = q.add((pair % 10) * 256);
            for g in 0..4 {
                acc[g] = _mm512_dpbusd_epi32(acc[g], _mm512_and_si512(w, masks[g]), _mm512_loadu_si512(qp.add(g * 64) as *const _));
            }
            pair += 1;
            if pair == ppr {
                out[row] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(_mm512_srai_epi32::<6>(acc[0]), acc[1]), _mm512_add_epi32(acc[2], acc[3])));
                acc = [_mm512_setzero_si512(); 4];
                pair = 0; row += 1;
            }
    }}; }
    while p + 2 * U <= n {
        slot!(0); slot!(1); slot!(2); slot!(3); slot!(4); slot!(5); slot!(6); slot!(7);
        p += U;
    }
    out[row / 2]
}


#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn rows2(codes: *const u8, n: usize, q: *const i8, ppr: usize, pf: usize, out: &mut [i32]) -> i32 {
    let masks = [0b1100_0000u8, 0b0011_0000, 0b0000_1100, 0b0000_0011].map(|m| _mm512_set1_epi8(m as i8));
    let rows = n / ppr;
    let mut r = 0;
    while r + 2 <= rows {
        let mut a = [_mm512_setzero_si512(); 4];
        let mut b = [_mm512_setzero_si512(); 4];
        let base = codes.add(r * ppr * 64);
        for p in 0..ppr {
            let wa = _mm512_loadu_si512(base.add(p * 64) as *const _);
            let wb = _mm512_loadu_si512(base.add((ppr + p) * 64) as *const _);
            if pf > 0 { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(p * 128 + pf) as *const i8); }
            let qp = q.add(p * 256);
            for g in 0..4 {
                let qv = _mm512_loadu_si512(qp.add(g * 64) as *const _);
                a[g] = _mm512_dpbusd_epi32(a[g], _mm512_and_si512(wa, masks[g]), qv);
                b[g] = _mm512_dpbusd_epi32(b[g], _mm512_and_si512(wb, masks[g]), qv);
            }
        }
        out[r] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(_mm512_srai_epi32::<6>(a[0]), a[1]), _mm512_add_epi32(a[2], a[3])));
        out[r + 1] = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(_mm512_srai_epi32::<6>(b[0]), b[1]), _mm512_add_epi32(b[2], b[3])));
        r += 2;
    }
    out[rows / 2]
}

#[target_feature(enable = "avx512f")]
unsafe fn sum(codes: *const u8, n: usize) -> i64 {
    let mut a = [_mm512_setzero_si512(); 4];
    let mut p = 0;
    while p + 4 <= n {
        for j in 0..4 { a[j] = _mm512_add_epi64(a[j], _mm512_loadu_si512(codes.add((p + j) * 64) as *const _)); }
        p += 4;
    }
    _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a[0], a[1]), _mm512_add_epi64(a[2], a[3])))
}

fn main() {
    let bytes: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(512usize << 20);
    let buf: Vec<u8> = (0..bytes).map(|i| (i * 2654435761usize >> 13) as u8).collect();
    let q: Vec<i8> = (0..2560).map(|i| (i % 251) as i8).collect();
    let n = bytes / 64;
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(6);
    let reps = ((512usize << 20) / bytes).max(1);
    let t = |f: &dyn Fn() -> i64| { let s = Instant::now(); for _ in 0..reps { std::hint::black_box(f()); } (bytes * reps) as f64 / s.elapsed().as_secs_f64() / 1e9 };
    let mut out = vec![0i32; n / 8 + 1];
    let outp = std::cell::RefCell::new(out);
    for r in 0..rounds {
        let s = t(&|| unsafe { sum(buf.as_ptr(), n) });
        let a0 = t(&|| unsafe { plain(buf.as_ptr(), n, q.as_ptr(), 0) as i64 });
        let r8 = t(&|| unsafe { ring::<8, 8>(buf.as_ptr(), n, q.as_ptr()) as i64 });
        let r10 = t(&|| unsafe { ring::<8, 10>(buf.as_ptr(), n, q.as_ptr()) as i64 });
        let rp = t(&|| unsafe { rows_plain(buf.as_ptr(), n, q.as_ptr(), 10, 0, &mut outp.borrow_mut()) as i64 });
        let rpf = t(&|| unsafe { rows_plain(buf.as_ptr(), n, q.as_ptr(), 10, 8192, &mut outp.borrow_mut()) as i64 });
        let rr = t(&|| unsafe { rows_ring(buf.as_ptr(), n, q.as_ptr(), 10, &mut outp.borrow_mut()) as i64 });
        let rr8 = t(&|| unsafe { rows_ring(buf.as_ptr(), n, q.as_ptr(), 8, &mut outp.borrow_mut()) as i64 });
        let rr40 = t(&|| unsafe { rows_ring(buf.as_ptr(), n, q.as_ptr(), 40, &mut outp.borrow_mut()) as i64 });
        let t2 = t(&|| unsafe { rows2(buf.as_ptr(), n, q.as_ptr(), 10, 0, &mut outp.borrow_mut()) as i64 });
        let t2p = t(&|| unsafe { rows2(buf.as_ptr(), n, q.as_ptr(), 10, 8192, &mut outp.borrow_mut()) as i64 });
        println!("rows2 {t2:.1} rows2+pf {t2p:.1}");
        println!("round {r}: sum {s:.1}  plain {a0:.1}  ring8 {r8:.1} ring8-q%10 {r10:.1}  rows_plain {rp:.1}  rows_plain+pf {rpf:.1}  rows_ring {rr:.1}  rows_ring(ppr 8) {rr8:.1}  (ppr 40) {rr40:.1} GB/s");
    }
}
