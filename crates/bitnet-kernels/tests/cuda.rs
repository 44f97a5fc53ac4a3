//! Every CUDA kernel against the CPU kernels (the scalar ones, which the SIMD
//! ones already equal) or a host computation in f64, on random inputs.
//!
//! Tolerances (normwise: max |gpu - ref| / max |ref| over the output):
//! f32 1e-5, f16 3e-3, bf16 1e-2. Integer paths (ternary products, argmax,
//! quantisation) are compared exactly. Without a usable GPU each test prints
//! `SKIPPED: <reason>` and returns; it never passes silently.
#![cfg(feature = "cuda")]

use bitnet_kernels::cpu::{self, CpuKernel, I2sMatrixRef};
use bitnet_kernels::cuda::{
    DevBuf, DevRange, GpuContext, GpuDType, HeadImpl, SampleRow, TernaryActs, TernaryBatch, ARGMAX_SPLIT_MAX_ROWS,
};
use half::{bf16, f16};

/// SplitMix64: deterministic inputs without extra dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn gpu() -> Option<GpuContext> {
    match bitnet_device::probe_gpus() {
        bitnet_device::GpuProbe::Devices { gpus, .. } if !gpus.is_empty() => {}
        other => {
            println!("SKIPPED: no CUDA GPU ({other:?})");
            return None;
        }
    }
    match GpuContext::open(0, None) {
        Ok(g) => Some(g),
        Err(e @ bitnet_kernels::cuda::CudaError::Unsupported { .. }) => {
            println!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("a GPU is present but cannot be used: {e}"),
    }
}

fn up_f32(g: &GpuContext, v: &[f32]) -> DevBuf {
    g.upload("test", bytemuck::cast_slice(v)).unwrap()
}
fn up_i32(g: &GpuContext, v: &[i32]) -> DevBuf {
    g.upload("test", bytemuck::cast_slice(v)).unwrap()
}
fn read_f32(g: &GpuContext, b: &DevBuf, n: usize) -> Vec<f32> {
    let mut bytes = vec![0u8; n * 4];
    g.read(b.range(0, n * 4).unwrap(), &mut bytes).unwrap();
    bytemuck::cast_slice(&bytes).to_vec()
}
fn read_i32(g: &GpuContext, b: &DevBuf, n: usize) -> Vec<i32> {
    let mut bytes = vec![0u8; n * 4];
    g.read(b.range(0, n * 4).unwrap(), &mut bytes).unwrap();
    bytemuck::cast_slice(&bytes).to_vec()
}
fn read_bytes(g: &GpuContext, b: &DevBuf, n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    g.read(b.range(0, n).unwrap(), &mut bytes).unwrap();
    bytes
}

/// Host rounding to a precision (round to nearest even, f16 saturating as the kernels do).
fn round_to(dt: GpuDType, v: f32) -> f32 {
    match dt {
        GpuDType::F32 => v,
        GpuDType::F16 => f16::from_f32(v.clamp(-65504.0, 65504.0)).to_f32(),
        GpuDType::BF16 => bf16::from_f32(v).to_f32(),
    }
}
fn encode(dt: GpuDType, v: &[f32]) -> Vec<u8> {
    match dt {
        GpuDType::F32 => bytemuck::cast_slice(v).to_vec(),
        // Saturating, as the kernels store f16.
        GpuDType::F16 => v.iter().flat_map(|&x| f16::from_f32(x.clamp(-65504.0, 65504.0)).to_le_bytes()).collect(),
        GpuDType::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
    }
}
fn decode(dt: GpuDType, b: &[u8]) -> Vec<f32> {
    match dt {
        GpuDType::F32 => bytemuck::cast_slice(b).to_vec(),
        GpuDType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        GpuDType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}
fn tolerance(dt: GpuDType) -> f64 {
    match dt {
        GpuDType::F32 => 1e-5,
        GpuDType::F16 => 3e-3,
        GpuDType::BF16 => 1e-2,
    }
}
/// max |a - b| / max |b|.
fn normwise(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - y).abs()).fold(0.0, f64::max) / scale
}
fn assert_finite(v: &[f32], what: &str) {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!("{what}: non-finite value {} at {i}", v[i]);
    }
}

const DTYPES: [GpuDType; 3] = [GpuDType::F32, GpuDType::F16, GpuDType::BF16];

/// Random valid I2_S codes (0, 1, 2 only) for `rows x k`.
fn random_codes(rng: &mut Rng, rows: usize, k: usize) -> Vec<u8> {
    (0..rows * k / 4)
        .map(|_| {
            let mut b = 0u8;
            for s in 0..4 {
                b |= (rng.below(3) as u8) << (2 * s);
            }
            b
        })
        .collect()
}

struct Acts {
    q: Vec<i8>,
    scale: Vec<f32>,
    qsum: Vec<i32>,
    bufs: (DevBuf, DevBuf, DevBuf),
}

fn random_acts(g: &GpuContext, rng: &mut Rng, n: usize, k: usize) -> Acts {
    let q: Vec<i8> = (0..n * k).map(|_| (rng.below(256) as i32 - 128) as i8).collect();
    let scale: Vec<f32> = (0..n).map(|_| rng.f32(0.5, 200.0)).collect();
    let qsum: Vec<i32> = q.chunks_exact(k).map(|r| r.iter().map(|&v| i32::from(v)).sum()).collect();
    let bufs = (g.upload("q", bytemuck::cast_slice(&q)).unwrap(), up_f32(g, &scale), up_i32(g, &qsum));
    Acts { q, scale, qsum, bufs }
}

impl Acts {
    fn view(&self, n: usize) -> TernaryActs {
        TernaryActs { q: self.bufs.0.all(), scale: self.bufs.1.all(), qsum: self.bufs.2.all(), n_tok: n }
    }
}

/// Exact integer dot products from the scalar CPU kernel: `[n][rows]`.
fn cpu_dots(codes: &[u8], rows: usize, k: usize, q: &[i8], n: usize) -> Vec<i32> {
    let w = I2sMatrixRef::new(codes, rows, k).unwrap();
    let mut out = vec![0i32; n * rows];
    cpu::gemm_i2s_i8(CpuKernel::Scalar, w, q, n, &mut out).unwrap();
    out
}

/// Reads below, at and past the page-locked threshold, one longer than the
/// page-locked buffer (copied in pieces) and sub-ranges at odd offsets come
/// back byte for byte; a smaller read after the large one reuses the buffer;
/// rows of f32 come back row by row, also across pieces.
#[test]
fn reads_through_the_page_locked_buffer_return_every_byte() {
    let Some(g) = gpu() else { return };
    let len = bitnet_kernels::cuda::PINNED_MAX_BYTES + 3 * bitnet_kernels::cuda::PINNED_MIN_BYTES + 13;
    let mut rng = Rng(41);
    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    let buf = g.upload("pattern", &data).unwrap();
    let min = bitnet_kernels::cuda::PINNED_MIN_BYTES;
    for (offset, n) in
        [(0, min - 1), (0, min), (7, min + 5), (0, len), (5, len - 5), (len - min - 1, min + 1), (3, 200_000)]
    {
        let mut out = vec![0u8; n];
        g.read(buf.range(offset, n).unwrap(), &mut out).unwrap();
        assert!(out == data[offset..offset + n], "read of {n} bytes at {offset} differs");
    }
    // Rows of logits: 70 rows of 128256 floats span more than the buffer
    // (pieces of whole rows); 3 rows of 10 go the pageable way.
    for (rows, row_len) in [(70usize, 128_256usize), (3, 10), (1, 128_256)] {
        let values: Vec<f32> = (0..rows * row_len).map(|_| rng.f32(-100.0, 100.0)).collect();
        let buf = up_f32(&g, &values);
        let got = g.read_rows_f32(buf.range(0, rows * row_len * 4).unwrap(), row_len, rows).unwrap();
        assert_eq!(got.len(), rows);
        for (r, row) in got.iter().enumerate() {
            assert!(row[..] == values[r * row_len..(r + 1) * row_len], "row {r} of {rows} x {row_len}");
        }
    }
}

/// The draw written plainly (the definition `SampleDraw::apply` in
/// bitnet-inference implements, with the tests there comparing the two):
/// finite logits weigh exp(v / T - max / T); top-k and top-p sort them
/// (larger first, ties to the smaller token), top-k keeps the k first,
/// top-p the smallest prefix whose share reaches p; the draw walks the kept
/// tokens until u of their mass is passed: sorted under top-k, in token
/// order for temperature alone (everything) and top-p alone (its nucleus).
fn host_draw(row: &SampleRow, logits: &[f32]) -> u32 {
    let t = f64::from(row.temperature);
    let mut items: Vec<(u32, f32)> =
        logits.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, v)).collect();
    let Some(max) = items.iter().map(|&(_, v)| v).reduce(f32::max) else {
        return 0;
    };
    let weight = |v: f32| {
        let z = f64::from(v) / t - f64::from(max) / t;
        if z < -746.0 {
            0.0
        } else {
            z.exp()
        }
    };
    if row.top_k > 0 || row.top_p < 1.0 {
        items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if row.top_k > 0 {
            items.truncate(row.top_k);
        }
        if row.top_p < 1.0 {
            let total: f64 = items.iter().map(|&(_, v)| weight(v)).sum();
            let mut cumulative = 0.0;
            let mut keep = items.len();
            for (i, &(_, v)) in items.iter().enumerate() {
                cumulative += weight(v) / total;
                if cumulative >= f64::from(row.top_p) {
                    keep = i + 1;
                    break;
                }
            }
            items.truncate(keep);
        }
        if row.top_k == 0 {
            items.sort_by_key(|&(token, _)| token);
        }
    }
    let total: f64 = items.iter().map(|&(_, v)| weight(v)).sum();
    let mut r = row.u * total;
    for &(token, v) in &items {
        let p = weight(v);
        if r < p {
            return token;
        }
        r -= p;
    }
    items.last().map_or(0, |&(token, _)| token)
}

/// The device draw equals the host's on rows with ties, NaN, infinities and
/// negative zeros, for temperature alone, top-k 1..1024 with and without
/// top-p, and top-p alone with nuclei of a few tokens to most of the
/// vocabulary, at vocabularies of 1000 (one chunk of the kernels), 4097 (two
/// whole chunks of 2048 and one token) and 128256; rows left alone (greedy,
/// top-k above 1024) keep the token they held; a row drawn alone gets the
/// token it got among the others. Then rows of equal logits, whose nucleus
/// ends inside one run of ties spread over many chunks, and a vocabulary
/// beyond SAMPLE_MAX_VOCAB, refused.
#[test]
fn sample_rows_draw_what_the_host_draws() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(77);
    let (mut drawn_narrow_nucleus, mut drawn_wide_nucleus) = (0, 0);
    for vocab in [1000usize, 4097, 128_256] {
        let configs: Vec<(f32, usize, f32)> = vec![
            (1.0, 0, 1.0),
            (0.7, 0, 1.0),
            (1.3, 1, 1.0),
            (0.8, 40, 1.0),
            (0.8, 40, 0.95),
            (1.0, 256, 0.5),
            (2.0, 1024, 0.9),
            (0.6, 1024, 1.0),
            (1.0, 7, 0.3),
            (0.9, 0, 0.9),
            (0.5, 0, 0.5),
            (3.0, 0, 0.95),
            (1.0, 0, 0.99),
            (0.7, 0, 0.2),
        ];
        let rows = configs.len() * 4 + 2;
        let mut logits: Vec<f32> = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            for i in 0..vocab {
                logits.push(match (i * 7 + r) % 601 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    3 => -0.0,
                    4 => 0.0,
                    5..=40 => 2.5,
                    _ => rng.f32(-12.0, if r % 2 == 0 { 4.0 } else { 12.0 }),
                });
            }
            // Every third row peaked: a few tokens far above the rest, so
            // top-p nuclei of a few tokens; the others flat enough for
            // nuclei of thousands.
            if r % 3 == 2 {
                for j in 0..5 {
                    let at = r * vocab + (r * 9973 + j * 26_111) % vocab;
                    logits[at] = 30.0 + j as f32;
                }
            }
        }
        let mut draws: Vec<SampleRow> = Vec::new();
        for &(temperature, top_k, top_p) in &configs {
            for _ in 0..4 {
                let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
                draws.push(SampleRow { temperature, top_k, top_p, u });
            }
        }
        draws.push(SampleRow::KEEP);
        draws.push(SampleRow { temperature: 0.9, top_k: 1025, top_p: 0.9, u: 0.5 });
        assert!(!draws[rows - 1].on_device() && !draws[rows - 2].on_device());
        let lb = up_f32(&g, &logits);
        let before: Vec<i32> = (0..rows as i32).map(|r| -1 - r).collect();
        let tokens = up_i32(&g, &before);
        let params = g.alloc("sampling workspace", GpuContext::sample_workspace_bytes(rows, vocab)).unwrap();
        g.sample_rows(lb.all(), vocab, &draws, params.all(), tokens.all()).unwrap();
        let got = read_i32(&g, &tokens, rows);
        for (r, draw) in draws.iter().enumerate() {
            if !draw.on_device() {
                assert_eq!(got[r], before[r], "row {r} ({draw:?}) must keep its token");
                continue;
            }
            let row = &logits[r * vocab..(r + 1) * vocab];
            let want = host_draw(draw, row);
            assert_eq!(got[r], want as i32, "vocab {vocab}, row {r}: {draw:?}");
            if draw.top_k == 0 && draw.top_p < 1.0 && vocab > bitnet_kernels::cuda::SAMPLE_MAX_K {
                // Nuclei within and beyond the 1024 most likely tokens are
                // both drawn.
                if host_nucleus(draw, row) > bitnet_kernels::cuda::SAMPLE_MAX_K {
                    drawn_wide_nucleus += 1;
                } else {
                    drawn_narrow_nucleus += 1;
                }
            }
        }
        // A row's draw does not depend on the rows around it: each of a
        // few rows drawn alone (one row a call, from its own copy).
        for r in [0usize, 13, 27, 41, rows - 3] {
            let one = up_f32(&g, &logits[r * vocab..(r + 1) * vocab]);
            let tok = up_i32(&g, &[-5]);
            g.sample_rows(one.all(), vocab, &draws[r..r + 1], params.all(), tok.all()).unwrap();
            assert_eq!(read_i32(&g, &tok, 1)[0], got[r], "vocab {vocab}, row {r} alone: {:?}", draws[r]);
        }
    }
    assert!(
        drawn_narrow_nucleus > 0 && drawn_wide_nucleus > 0,
        "{drawn_narrow_nucleus} narrow, {drawn_wide_nucleus} wide"
    );

    // Equal logits: the nucleus is the first ceil(p * n) tokens (p * n kept
    // away from an integer, so no rounding can move it), drawn in token
    // order: token floor(u * nucleus). Nuclei of 475 and 42757 tokens (the
    // second's run of ties spans 21 chunks of the kernels).
    let vocab = 128_256;
    let flat: Vec<f32> = (0..vocab).map(|i| if i % 1000 == 999 { f32::NAN } else { 1.0 }).collect();
    let finite = vocab - vocab / 1000;
    let us = [0.0, 0.25, 0.5, 0.999_99];
    let draws: Vec<SampleRow> = [0.0037f32, 0.3337]
        .iter()
        .flat_map(|&top_p| us.iter().map(move |&u| SampleRow { temperature: 1.0, top_k: 0, top_p, u }))
        .collect();
    let rows = draws.len();
    let logits: Vec<f32> = (0..rows).flat_map(|_| flat.iter().copied()).collect();
    let lb = up_f32(&g, &logits);
    let tokens = up_i32(&g, &vec![0; rows]);
    let params = g.alloc("sampling workspace", GpuContext::sample_workspace_bytes(rows, vocab)).unwrap();
    g.sample_rows(lb.all(), vocab, &draws, params.all(), tokens.all()).unwrap();
    let got = read_i32(&g, &tokens, rows);
    for (r, draw) in draws.iter().enumerate() {
        let nucleus = (f64::from(draw.top_p) * finite as f64).ceil() as usize;
        assert_eq!(host_nucleus(draw, &flat), nucleus);
        let nth = (draw.u * nucleus as f64) as usize;
        // The nth finite token: NaN every 1000th.
        let token = nth + nth / 999;
        assert_eq!(got[r], token as i32, "u {}", draw.u);
        assert_eq!(got[r], host_draw(draw, &flat) as i32, "u {}", draw.u);
    }

    // A vocabulary too large for the fixed-point sums is refused, not drawn.
    let vocab = bitnet_kernels::cuda::SAMPLE_MAX_VOCAB + 1;
    let lb = g.alloc("logits", vocab * 4).unwrap();
    let draw = [SampleRow { temperature: 1.0, top_k: 0, top_p: 0.5, u: 0.5 }];
    let err = g.sample_rows(lb.all(), vocab, &draw, params.all(), tokens.all()).unwrap_err().to_string();
    assert!(err.contains("vocabularies of at most"), "{err}");
}

/// How many tokens top-p alone keeps on the host (the definition).
fn host_nucleus(row: &SampleRow, logits: &[f32]) -> usize {
    let t = f64::from(row.temperature);
    let mut values: Vec<f32> = logits.iter().copied().filter(|v| v.is_finite()).collect();
    values.sort_by(|a, b| b.total_cmp(a));
    let max = values[0];
    let weights: Vec<f64> = values.iter().map(|&v| (f64::from(v) / t - f64::from(max) / t).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = 0.0;
    for (i, w) in weights.iter().enumerate() {
        cumulative += w / total;
        if cumulative >= f64::from(row.top_p) {
            return i + 1;
        }
    }
    weights.len()
}

#[test]
fn ternary_store_and_add_are_exact() {
    let Some(g) = gpu() else { return };
    // Shapes cover partial row tiles, partial token tiles, several CTAs
    // along tokens and the K split, each on both kernel families (the
    // staged ones also with a last pipeline stage of one 128-wide block:
    // k = 128, 1152).
    let shapes = [
        (16, 128, 1),
        (40, 256, 3),
        (96, 640, 8),
        (200, 1152, 33),
        (3840, 2560, 70),
        (64, 6912, 5),
        (40, 128, 17),
        (2560, 6912, 40),
        (300, 1280, 12),
    ];
    // Every supported GPU (sm_80+) can give the staged kernels their 84 KB.
    assert_eq!(g.set_ternary_batch(TernaryBatch::Staged4), TernaryBatch::Staged4, "staged kernels unavailable");
    for (i, &(rows, k, n)) in shapes.iter().enumerate() {
        for batch in BATCH_VARIANTS {
            if !takes(&g, batch) {
                continue;
            }
            // Passes of up to 12 tokens on the one-tile kernels and on the K-split ones.
            for one in [true, false] {
                g.set_ternary_one(one);
                check_store_and_add(&g, &mut Rng(1000 + i as u64), rows, k, n, batch);
            }
        }
    }
    g.set_ternary_batch(TernaryBatch::Auto);
    g.set_ternary_one(true);
}

/// The kernel choices every pass is tested with (any token count can take
/// any kernel family; Auto picks by grid size). Every GPU these tests run
/// on (compute capability 9.0+ asserted where the cluster kernels are
/// tested) takes the cluster kernels.
const BATCH_VARIANTS: [TernaryBatch; 5] =
    [TernaryBatch::Split, TernaryBatch::Split2, TernaryBatch::Staged4, TernaryBatch::Cluster, TernaryBatch::Auto];

/// Sets the kernel choice; false (after printing SKIPPED) for the cluster
/// kernels on a GPU below compute capability 9.0, which has none.
fn takes(g: &GpuContext, batch: TernaryBatch) -> bool {
    if batch == TernaryBatch::Cluster && g.compute_capability() < (9, 0) {
        println!("SKIPPED: the cluster ternary kernels need compute capability 9.0");
        g.set_ternary_batch(TernaryBatch::Auto);
        return false;
    }
    assert_eq!(g.set_ternary_batch(batch), batch);
    true
}

fn check_store_and_add(g: &GpuContext, rng: &mut Rng, rows: usize, k: usize, n: usize, batch: TernaryBatch) {
    let codes = random_codes(rng, rows, k);
    let acts = random_acts(g, rng, n, k);
    let dots = cpu_dots(&codes, rows, k, &acts.q, n);
    let w = g.upload("w", &codes).unwrap();
    let scales = [0.7f32, 1.3, 2.1];
    let segs = [rows / 3, 2 * rows / 3];
    let ld = rows + 5;
    let out = g.alloc("out", n * ld * 4).unwrap();
    g.ternary_store(w.all(), rows, k, scales, segs, &acts.view(n), out.all(), ld).unwrap();
    let got = read_f32(g, &out, n * ld);
    for t in 0..n {
        for r in 0..rows {
            let ws = if r < segs[0] {
                scales[0]
            } else if r < segs[1] {
                scales[1]
            } else {
                scales[2]
            };
            let want = dots[t * rows + r] as f32 * (ws / acts.scale[t]);
            assert_eq!(
                got[t * ld + r].to_bits(),
                want.to_bits(),
                "store {batch:?} rows {rows} k {k} n {n}: t {t} r {r}"
            );
        }
    }
    // The residual add: out += y, on top of random values.
    let init: Vec<f32> = (0..n * ld).map(|_| rng.f32(-3.0, 3.0)).collect();
    let out = up_f32(g, &init);
    g.ternary_add(w.all(), rows, k, scales[1], &acts.view(n), out.all(), ld).unwrap();
    let got = read_f32(g, &out, n * ld);
    for t in 0..n {
        for r in 0..rows {
            let want = init[t * ld + r] + dots[t * rows + r] as f32 * (scales[1] / acts.scale[t]);
            assert_eq!(got[t * ld + r].to_bits(), want.to_bits(), "add {batch:?} rows {rows} k {k} n {n}: t {t} r {r}");
        }
    }
    let _ = acts.qsum;
}

#[test]
fn gate_up_relu2_is_exact_and_survives_f16_overflow() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(2);
    let shapes = [(48, 256, 2), (120, 640, 5), (6912, 2560, 9), (96, 512, 40), (6912, 2560, 33), (70, 1152, 100)];
    for (rows, k, n) in shapes {
        for batch in BATCH_VARIANTS {
            if !takes(&g, batch) {
                continue;
            }
            // Passes of up to 12 tokens: Split takes the K-split kernels, the
            // others the one-tile kernels (unless staged).
            g.set_ternary_one(batch != TernaryBatch::Split);
            let gate = random_codes(&mut rng, rows, k);
            let up = random_codes(&mut rng, rows, k);
            let acts = random_acts(&g, &mut rng, n, k);
            let (gd, ud) = (cpu_dots(&gate, rows, k, &acts.q, n), cpu_dots(&up, rows, k, &acts.q, n));
            // Scales large enough that relu(gate)^2 * up leaves the f16 range.
            let scales = [40.0f32, 30.0];
            let (gb, ub) = (g.upload("g", &gate).unwrap(), g.upload("u", &up).unwrap());
            let out = g.alloc("out", n * rows * 4).unwrap();
            g.ternary_gate_up(gb.all(), ub.all(), rows, k, scales, &acts.view(n), out.all(), rows).unwrap();
            let got = read_f32(&g, &out, n * rows);
            let mut biggest = 0f32;
            for t in 0..n {
                for r in 0..rows {
                    let gv = gd[t * rows + r] as f32 * (scales[0] / acts.scale[t]);
                    let uv = ud[t * rows + r] as f32 * (scales[1] / acts.scale[t]);
                    let rr = gv.max(0.0);
                    let want = rr * rr * uv;
                    biggest = biggest.max(want.abs());
                    assert_eq!(got[t * rows + r].to_bits(), want.to_bits(), "{batch:?} rows {rows} n {n}: t {t} r {r}");
                }
            }
            assert!(biggest > 65504.0, "the test must exceed the f16 range (largest {biggest})");
        }
    }
    g.set_ternary_batch(TernaryBatch::Auto);
    g.set_ternary_one(true);
}

/// Host RMSNorm + quantisation, as the kernels define it.
fn host_rmsnorm_quant(x: &[f32], w: &[f32], eps: f32) -> (Vec<i8>, f32) {
    let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let inv = 1.0 / (ss / x.len() as f64 + f64::from(eps)).sqrt();
    let normed: Vec<f32> = x.iter().zip(w).map(|(&v, &wi)| (f64::from(v) * inv) as f32 * wi).collect();
    let amax = normed.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = (1.0 / amax.max(1e-5)) * 127.0;
    (normed.iter().map(|&v| (v * s).round_ties_even().clamp(-128.0, 127.0) as i8).collect(), s)
}

#[test]
fn rmsnorm_quant_matches_host_and_survives_relu2_sized_values() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(3);
    // 2B-4T's FFN width (held in registers) and a longer row, not a
    // multiple of the block size, that the kernel reads three times.
    for width in [6912, 9000] {
        rmsnorm_quant_case(&g, &mut rng, width);
    }
}

fn rmsnorm_quant_case(g: &GpuContext, rng: &mut Rng, width: usize) {
    let (rows, eps) = (7, 1e-5f32);
    let w: Vec<f32> = (0..width).map(|_| rng.f32(0.2, 3.0)).collect();
    // relu^2-sized values, far above the f16 range.
    let x: Vec<f32> = (0..rows * width).map(|_| rng.f32(-1.0, 1.0).powi(3) * 2.0e5).collect();
    let (wb, xb) = (up_f32(g, &w), up_f32(g, &x));
    let q = g.alloc("q", rows * width).unwrap();
    let (s, qs, flags) = (g.alloc("s", rows * 4).unwrap(), g.alloc("qs", rows * 4).unwrap(), g.alloc("f", 4).unwrap());
    let acts = TernaryActs { q: q.all(), scale: s.all(), qsum: qs.all(), n_tok: rows };
    g.rmsnorm_quant(xb.all(), wb.all(), eps, rows, width, &acts, flags.all()).unwrap();
    let (gq, gs, gqs) = (read_bytes(g, &q, rows * width), read_f32(g, &s, rows), read_i32(g, &qs, rows));
    assert_eq!(read_i32(g, &flags, 1)[0], 0, "non-finite flag");
    let mut flips = 0usize;
    for r in 0..rows {
        let (hq, hs) = host_rmsnorm_quant(&x[r * width..(r + 1) * width], &w, eps);
        let rel = (f64::from(gs[r]) - f64::from(hs)).abs() / f64::from(hs);
        assert!(rel <= 1e-6, "row {r}: scale {} vs {hs}", gs[r]);
        let mut sum = 0i32;
        for i in 0..width {
            let (a, b) = (gq[r * width + i] as i8, hq[i]);
            sum += i32::from(a);
            // The f64 sum of squares is added in another order on the GPU; a
            // value exactly on a rounding boundary may move by one step.
            assert!((i32::from(a) - i32::from(b)).abs() <= 1, "row {r} col {i}: {a} vs {b}");
            flips += usize::from(a != b);
        }
        assert_eq!(gqs[r], sum, "qsum row {r}");
    }
    assert!(flips * 1000 <= rows * width, "{flips} one-step differences");
}

#[test]
fn final_norm_matches_host_with_hi_lo_split() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(4);
    let (x_rows, width, eps) = (9, 2560, 1e-5f32);
    let x: Vec<f32> = (0..x_rows * width).map(|_| rng.f32(-50.0, 50.0)).collect();
    let w: Vec<f32> = (0..width).map(|_| rng.f32(0.1, 2.0)).collect();
    let rows = [8i32, 0, 3];
    let (xb, wb, rb) = (up_f32(&g, &x), up_f32(&g, &w), up_i32(&g, &rows));
    let mut want = Vec::new();
    for &r in &rows {
        let r = r as usize;
        let xr = &x[r * width..(r + 1) * width];
        let ss: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let inv = 1.0 / (ss / width as f64 + f64::from(eps)).sqrt();
        want.extend(xr.iter().zip(&w).map(|(&v, &wi)| f64::from((f64::from(v) * inv) as f32 * wi)));
    }
    for dt in DTYPES {
        let bytes = GpuContext::final_norm_bytes(dt, rows.len(), width);
        let out = g.alloc("out", bytes).unwrap();
        g.final_norm(dt, xb.all(), x_rows, rb.all(), rows.len(), wb.all(), eps, width, out.all()).unwrap();
        let all = decode(dt, &read_bytes(&g, &out, bytes));
        // f32: one row per entry; f16/bf16: the hi row, then the lo row.
        let parts = if dt == GpuDType::F32 { 1 } else { 2 };
        let row = |e: usize, p: usize| &all[(parts * e + p) * width..(parts * e + p + 1) * width];
        let hi: Vec<f32> = (0..rows.len()).flat_map(|e| row(e, 0).to_vec()).collect();
        let err = normwise(&hi, &want);
        assert!(err <= tolerance(dt), "{dt:?}: hi part error {err}");
        if dt != GpuDType::F32 {
            // hi + lo carries the value to ~16 bits: far inside the f32 tolerance.
            let sum: Vec<f32> = (0..rows.len())
                .flat_map(|e| row(e, 0).iter().zip(row(e, 1)).map(|(a, b)| a + b).collect::<Vec<_>>())
                .collect();
            let err = normwise(&sum, &want);
            assert!(err <= 1e-4, "{dt:?}: hi + lo error {err}");
        }
    }
}

#[test]
fn rope_kv_matches_cpu_rope() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(5);
    let (nh, nkv, hd, max_pos, slots) = (8, 2, 64, 300, 600);
    let (hidden, kv_dim, half) = (nh * hd, nkv * hd, hd / 2);
    let mut cos = Vec::new();
    let mut sin = Vec::new();
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f64 / 10000f64.powf(2.0 * i as f64 / hd as f64);
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let n = 5;
    let pos = [0i32, 7, 299, 100, 1];
    let base = [0i32, 10, 300, 0, 590]; // distinct slots 0, 17, 599, 100, 591
    let qkv: Vec<f32> = (0..n * (hidden + 2 * kv_dim)).map(|_| rng.f32(-4.0, 4.0)).collect();
    let (qb, cb, sb, pb, bb) =
        (up_f32(&g, &qkv), up_f32(&g, &cos), up_f32(&g, &sin), up_i32(&g, &pos), up_i32(&g, &base));
    for dt in DTYPES {
        let e = dt.size();
        let (qo, kc, vc) = (
            g.alloc("q", n * hidden * 4).unwrap(),
            g.alloc("k", slots * kv_dim * e).unwrap(),
            g.alloc("v", slots * kv_dim * e).unwrap(),
        );
        g.rope_kv(
            dt,
            qb.all(),
            cb.all(),
            sb.all(),
            max_pos,
            pb.all(),
            bb.all(),
            n,
            qo.all(),
            kc.all(),
            vc.all(),
            slots,
            (nh, nkv, hd),
        )
        .unwrap();
        let gq = read_f32(&g, &qo, n * hidden);
        let gk = decode(dt, &read_bytes(&g, &kc, slots * kv_dim * e));
        let gv = decode(dt, &read_bytes(&g, &vc, slots * kv_dim * e));
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for r in 0..n {
            let row = &qkv[r * (hidden + 2 * kv_dim)..(r + 1) * (hidden + 2 * kv_dim)];
            let p = pos[r] as usize;
            let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            let mut q = row[..hidden].to_vec();
            let mut k = row[hidden..hidden + kv_dim].to_vec();
            cpu::rope_neox_f32(CpuKernel::Scalar, &mut q, hd, c, s).unwrap();
            cpu::rope_neox_f32(CpuKernel::Scalar, &mut k, hd, c, s).unwrap();
            let slot = (base[r] + pos[r]) as usize;
            got.extend(&gq[r * hidden..(r + 1) * hidden]);
            got.extend(&gk[slot * kv_dim..(slot + 1) * kv_dim]);
            got.extend(&gv[slot * kv_dim..(slot + 1) * kv_dim]);
            want.extend(q.iter().chain(&k).chain(&row[hidden + kv_dim..]).map(|&v| f64::from(v)));
        }
        let err = normwise(&got, &want);
        assert!(err <= tolerance(dt), "{dt:?}: error {err}");
    }
}

/// A KV cache pair on the device for [`run_attention`].
struct Caches<'a> {
    dt: GpuDType,
    k: &'a DevBuf,
    v: &'a DevBuf,
    slots: usize,
    heads: (usize, usize, usize),
}

/// `g.attention` of `n` rows over `caches`, with its own scratch.
#[allow(clippy::too_many_arguments)]
fn run_attention(
    g: &GpuContext,
    caches: &Caches<'_>,
    q: &DevBuf,
    pos: &DevBuf,
    base: &DevBuf,
    n: usize,
    max_visible: usize,
    out: &DevBuf,
    flags: &DevBuf,
) {
    let (nh, _, hd) = caches.heads;
    let scratch = g.alloc("s", GpuContext::attention_scratch_bytes(n, max_visible, nh, hd)).unwrap();
    let (k, v) = (caches.k.all(), caches.v.all());
    g.attention(
        caches.dt,
        q.all(),
        k,
        v,
        caches.slots,
        pos.all(),
        base.all(),
        n,
        max_visible,
        out.all(),
        caches.heads,
        scratch.all(),
        flags.all(),
    )
    .unwrap();
}

#[test]
fn attention_matches_host_softmax_attention() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(6);
    // Rows of two sequences (cache bases 0 and 500), prefill-like and
    // decode-like positions spanning several 32- and 64-position chunks.
    let (pos9, base9) = (vec![0i32, 1, 2, 399, 0, 5, 63, 64, 395], vec![0i32, 0, 0, 0, 500, 500, 400, 400, 500]);
    // 70 rows: more than 4096 / 64, so a split takes several chunks of the
    // long rows (positions up to 4095 of a window of 8192).
    let mut pos70 = vec![3900i32, 3990, 4095];
    let mut base70 = vec![0i32, 0, 0];
    for i in 0..67 {
        pos70.push(i % 40);
        base70.push(4200 + 41 * i);
    }
    // Query heads per kv head: 4 (one CTA group), 6 (a full and a partial
    // group of the kernel's 4), 3 and 1 (partial groups), and 1 with
    // head_dim 200 (the wide variant).
    let cases = [
        (8usize, 2usize, 128usize, &pos9, &base9, 900usize, 4096usize),
        (12, 2, 64, &pos9, &base9, 900, 4096),
        (6, 2, 128, &pos9, &base9, 900, 4096),
        (2, 2, 64, &pos9, &base9, 900, 4096),
        (3, 3, 200, &pos9, &base9, 900, 4096),
        (8, 2, 128, &pos70, &base70, 4200 + 41 * 67, 8192),
    ];
    for (nh, nkv, hd, pos, base, slots, max_visible) in cases {
        let (hidden, kv_dim) = (nh * hd, nkv * hd);
        let n = pos.len();
        // f16/bf16 caches with head_dim 64 or 128 run on tensor cores unless
        // turned off: both kernels are checked.
        for (dt, mma) in [
            (GpuDType::F32, false),
            (GpuDType::F16, true),
            (GpuDType::F16, false),
            (GpuDType::BF16, true),
            (GpuDType::BF16, false),
        ] {
            g.set_attention_mma(mma);
            let q: Vec<f32> = (0..n * hidden).map(|_| rng.f32(-2.0, 2.0)).collect();
            let k: Vec<f32> = (0..slots * kv_dim).map(|_| round_to(dt, rng.f32(-2.0, 2.0))).collect();
            let v: Vec<f32> = (0..slots * kv_dim).map(|_| round_to(dt, rng.f32(-3.0, 3.0))).collect();
            let (qb, kb, vb) =
                (up_f32(&g, &q), g.upload("k", &encode(dt, &k)).unwrap(), g.upload("v", &encode(dt, &v)).unwrap());
            let (pb, bb) = (up_i32(&g, pos), up_i32(&g, base));
            let (out, flags) = (g.alloc("o", n * hidden * 4).unwrap(), g.alloc("f", 4).unwrap());
            let caches = Caches { dt, k: &kb, v: &vb, slots, heads: (nh, nkv, hd) };
            run_attention(&g, &caches, &qb, &pb, &bb, n, max_visible, &out, &flags);
            let got = read_f32(&g, &out, n * hidden);
            assert_eq!(read_i32(&g, &flags, 1)[0], 0);
            let mut want = vec![0f64; n * hidden];
            let scale = 1.0 / (hd as f64).sqrt();
            for r in 0..n {
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let qh = &q[r * hidden + h * hd..r * hidden + (h + 1) * hd];
                    let visible = pos[r] as usize + 1;
                    let slot = |p: usize| (base[r] as usize + p) * kv_dim + kvh * hd;
                    let scores: Vec<f64> = (0..visible)
                        .map(|p| {
                            qh.iter()
                                .zip(&k[slot(p)..slot(p) + hd])
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let sum: f64 = ex.iter().sum();
                    for d in 0..hd {
                        want[r * hidden + h * hd + d] =
                            (0..visible).map(|p| ex[p] / sum * f64::from(v[slot(p) + d])).sum();
                    }
                }
            }
            let err_rows = normwise(&got, &want);
            assert!(
                err_rows <= tolerance(dt),
                "{dt:?} (tensor cores: {mma}) heads {nh}/{nkv} hd {hd}: error {err_rows}"
            );
            // One row alone: few CTAs, so one query head per CTA.
            let r = 3;
            let q1 = up_f32(&g, &q[r * hidden..(r + 1) * hidden]);
            let (p1, b1) = (up_i32(&g, &pos[r..=r]), up_i32(&g, &base[r..=r]));
            let out1 = g.alloc("o1", hidden * 4).unwrap();
            run_attention(&g, &caches, &q1, &p1, &b1, 1, 512, &out1, &flags);
            let got1 = read_f32(&g, &out1, hidden);
            let err = normwise(&got1, &want[r * hidden..(r + 1) * hidden]);
            assert!(
                err <= tolerance(dt),
                "{dt:?} (tensor cores: {mma}) heads {nh}/{nkv} hd {hd}, one row: error {err}"
            );
            println!(
                "{dt:?} (tensor cores: {mma}) heads {nh}/{nkv} hd {hd}, {n} rows: normwise error {err_rows:.2e}, row {r} alone {err:.2e}"
            );
        }
    }
    g.set_attention_mma(true);
}

#[test]
fn tensor_core_attention_flags_a_query_beyond_f16() {
    let Some(g) = gpu() else { return };
    // q * scale must split into f16 parts; 1e6 / sqrt(64) does not fit.
    let (nh, nkv, hd, slots) = (4usize, 1usize, 64usize, 64usize);
    assert!(g.attention_on_tensor_cores(GpuDType::F16, hd));
    let q = vec![1.0e6f32; nh * hd];
    let kv = vec![0.5f32; slots * nkv * hd];
    let (qb, kb, vb) = (
        up_f32(&g, &q),
        g.upload("k", &encode(GpuDType::F16, &kv)).unwrap(),
        g.upload("v", &encode(GpuDType::F16, &kv)).unwrap(),
    );
    let (pb, bb) = (up_i32(&g, &[10]), up_i32(&g, &[0]));
    let (out, flags) = (g.alloc("o", nh * hd * 4).unwrap(), g.alloc("f", 4).unwrap());
    g.zero(flags.all()).unwrap();
    let caches = Caches { dt: GpuDType::F16, k: &kb, v: &vb, slots, heads: (nh, nkv, hd) };
    run_attention(&g, &caches, &qb, &pb, &bb, 1, slots, &out, &flags);
    assert_ne!(read_i32(&g, &flags, 1)[0] & bitnet_kernels::cuda::FLAG_NONFINITE, 0, "the overflow must be flagged");
}

#[test]
fn head_matches_host_dot_products() {
    let Some(g) = gpu() else { return };
    // Both implementations: cuBLAS (when it loads; on a GPU machine without
    // it this test says SKIPPED, which run.sh counts as a failure) and ours.
    for imp in [HeadImpl::Cublas, HeadImpl::Kernels] {
        if g.set_head_impl(imp) != imp {
            println!("SKIPPED: cuBLAS head: {}", g.cublas_note());
            continue;
        }
        let mut rng = Rng(7);
        let (vocab, hidden) = (1000, 256); // vocab not a multiple of 16 or 64
        for dt in DTYPES {
            for n in [1usize, 3, 8, 20, 70] {
                let w: Vec<f32> = (0..vocab * hidden).map(|_| round_to(dt, rng.f32(-1.0, 1.0))).collect();
                // Activations in f32, split into hi + lo parts of the precision as
                // final_norm writes them.
                let x: Vec<f32> = (0..n * hidden).map(|_| rng.f32(-3.0, 3.0)).collect();
                // Each entry's hi row, then (f16/bf16) its lo row; padded to
                // the buffer size the head asks for.
                let mut parts = Vec::new();
                for row in x.chunks_exact(hidden) {
                    parts.extend(row.iter().map(|&v| round_to(dt, v)));
                    if dt != GpuDType::F32 {
                        parts.extend(row.iter().map(|&v| round_to(dt, v - round_to(dt, v))));
                    }
                }
                let in_bytes = g.head_input_bytes(dt, n, hidden);
                parts.resize(in_bytes / dt.size(), 0.0);
                let (wb, xb) = (g.upload("w", &encode(dt, &w)).unwrap(), g.upload("x", &encode(dt, &parts)).unwrap());
                let logits = g.alloc("l", g.head_logits_bytes(dt, n, vocab)).unwrap();
                let scratch = g.alloc("s", g.head_scratch_bytes(dt, vocab)).unwrap();
                // Calls of few entries on small cuBLAS calls where those give
                // the bits of whole chunks (checked there): the entries
                // alone below then run the smallest such calls, 3, 8 and 20
                // together the smallest that hold them, 70 whole chunks.
                if imp == HeadImpl::Cublas {
                    let small = g.verify_head_small_chunk(dt, wb.all(), vocab, hidden, scratch.all()).unwrap();
                    println!("{dt:?} n {n}: cuBLAS head, small calls {small:?}");
                }
                g.head(dt, wb.all(), vocab, hidden, xb.all(), n, logits.all(), scratch.all()).unwrap();
                let got = read_f32(&g, &logits, n * vocab);
                // Batch invariance: an entry alone gets the same bits.
                for t in [0, n / 2, n - 1] {
                    let per = if dt == GpuDType::F32 { hidden } else { 2 * hidden };
                    let mut one = parts[t * per..(t + 1) * per].to_vec();
                    one.resize(g.head_input_bytes(dt, 1, hidden) / dt.size(), 0.0);
                    let xo = g.upload("x1", &encode(dt, &one)).unwrap();
                    let lo = g.alloc("l1", g.head_logits_bytes(dt, 1, vocab)).unwrap();
                    g.head(dt, wb.all(), vocab, hidden, xo.all(), 1, lo.all(), scratch.all()).unwrap();
                    let alone = read_f32(&g, &lo, vocab);
                    let batched = &got[t * vocab..(t + 1) * vocab];
                    let differ = alone.iter().zip(batched).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert_eq!(
                        differ, 0,
                        "{imp:?} {dt:?}: entry {t} of {n} differs from the entry alone in {differ} logits"
                    );
                }
                let want: Vec<f64> = (0..n)
                    .flat_map(|t| {
                        let (w, x) = (&w, &x);
                        (0..vocab).map(move |r| {
                            (0..hidden)
                                .map(|i| f64::from(w[r * hidden + i]) * f64::from(x[t * hidden + i]))
                                .sum::<f64>()
                        })
                    })
                    .collect();
                let err = normwise(&got, &want);
                // The lo part makes f16/bf16 products nearly f32-exact: hold
                // them to the f32 tolerance x 10, far inside theirs.
                let tol = if dt == GpuDType::F32 { tolerance(dt) } else { 1e-4 };
                assert!(err <= tol, "{imp:?} {dt:?} n {n}: error {err}");
            }
        }
    }
}

/// Both argmax kernels on the same rows (the split one on `scratch`, reused
/// across calls, so its row counters must come back to zero); they must agree.
fn argmax_both(g: &GpuContext, logits: DevRange, vocab: usize, n: usize, flags: &DevBuf, scratch: &DevBuf) -> Vec<i32> {
    let out = g.alloc("o", n * 4).unwrap();
    g.argmax(logits, vocab, n, out.all(), flags.all(), None).unwrap();
    let rows = read_i32(g, &out, n);
    for round in 0..2 {
        g.argmax(logits, vocab, n, out.all(), flags.all(), Some(scratch.all())).unwrap();
        assert_eq!(read_i32(g, &out, n), rows, "split kernel, vocab {vocab}, {n} rows, round {round}");
    }
    rows
}

#[test]
fn argmax_takes_the_first_maximum_and_flags_nan() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(8);
    let (vocab, n) = (128_256, 5);
    let scratch = g.alloc("argmax scratch", GpuContext::argmax_scratch_bytes(n, vocab)).unwrap();
    let mut logits: Vec<f32> = (0..n * vocab).map(|_| rng.f32(-10.0, 10.0)).collect();
    // Ties: row 1 has its maximum at 5 and 90_000; row 2 at 0 and the end
    // (with 63 CTAs a row, in different CTAs); row 3 at both sides of a CTA
    // boundary (2036 logits a CTA), the later one first in the row's second CTA.
    logits[vocab + 5] = 50.0;
    logits[vocab + 90_000] = 50.0;
    logits[2 * vocab] = 60.0;
    logits[3 * vocab - 1] = 60.0;
    logits[3 * vocab + 2035] = 70.0;
    logits[3 * vocab + 2036] = 70.0;
    let flags = g.alloc("f", 4).unwrap();
    let lb = up_f32(&g, &logits);
    let got = argmax_both(&g, lb.all(), vocab, n, &flags, &scratch);
    for r in 0..n {
        assert_eq!(got[r] as u32, argmax_host(&logits[r * vocab..(r + 1) * vocab]), "row {r}");
    }
    assert_eq!((got[1], got[2], got[3]), (5, 0, 2035));
    assert_eq!(read_i32(&g, &flags, 1)[0], 0);
    logits[4 * vocab + 17] = f32::NAN;
    let lb = up_f32(&g, &logits);
    let out = g.alloc("o", n * 4).unwrap();
    g.argmax(lb.all(), vocab, n, out.all(), flags.all(), None).unwrap();
    assert_ne!(read_i32(&g, &flags, 1)[0], 0, "a NaN logit must raise the flag");
    let flags2 = g.alloc("f", 4).unwrap();
    g.argmax(lb.all(), vocab, n, out.all(), flags2.all(), Some(scratch.all())).unwrap();
    assert_ne!(read_i32(&g, &flags2, 1)[0], 0, "a NaN logit must raise the flag (split kernel)");
    // Rows of a multiple of 4 logits are read four at a time, others one at
    // a time: ties inside one group of four, across threads and loads (row
    // 1: index 7 and the row's last two), in a row of odd length, and a row
    // of only -inf (no maximum: index 0).
    for (vocab, n) in [(8192, 4), (1001, 4)] {
        let mut logits: Vec<f32> = (0..n * vocab).map(|_| rng.f32(-10.0, 10.0)).collect();
        (logits[9], logits[10]) = (30.0, 30.0);
        (logits[2 * vocab - 2], logits[2 * vocab - 1], logits[vocab + 7]) = (30.0, 30.0, 30.0);
        (logits[2 * vocab + 4], logits[2 * vocab]) = (30.0, 30.0);
        logits[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
        let lb = up_f32(&g, &logits);
        let got = argmax_both(&g, lb.all(), vocab, n, &flags, &scratch);
        for r in 0..n {
            assert_eq!(got[r] as u32, argmax_host(&logits[r * vocab..(r + 1) * vocab]), "vocab {vocab} row {r}");
        }
        assert_eq!(&got[..], &[9, 7, 0, 0], "vocab {vocab}");
        // The same rows 4 bytes into a buffer (not on 16 bytes: one at a time).
        let shifted: Vec<f32> = std::iter::once(0.0).chain(logits.iter().copied()).collect();
        let sb = up_f32(&g, &shifted);
        let got_shifted = argmax_both(&g, sb.all().sub(4, n * vocab * 4).unwrap(), vocab, n, &flags, &scratch);
        assert_eq!(got_shifted, got, "vocab {vocab}, rows 4 bytes off alignment");
    }
    // Rows of only NaN and -inf have no maximum: index 0 (as on the host),
    // whichever comes first.
    let mut odd = vec![f32::NEG_INFINITY; 2 * 8192];
    (odd[0], odd[8192 + 4000]) = (f32::NAN, f32::NAN);
    let lb = up_f32(&g, &odd);
    assert_eq!(argmax_both(&g, lb.all(), 8192, 2, &flags, &scratch), [0, 0]);
    assert_eq!((argmax_host(&odd[..8192]), argmax_host(&odd[8192..])), (0, 0));
    // More rows than the split kernel takes: the row kernel, same results.
    let (vocab, n) = (1000, ARGMAX_SPLIT_MAX_ROWS + 8);
    let logits: Vec<f32> = (0..n * vocab).map(|_| rng.f32(-10.0, 10.0)).collect();
    let lb = up_f32(&g, &logits);
    let got = argmax_both(&g, lb.all(), vocab, n, &flags, &scratch);
    for r in 0..n {
        assert_eq!(got[r] as u32, argmax_host(&logits[r * vocab..(r + 1) * vocab]), "{n} rows, row {r}");
    }
    // A scratch too small for the rows is refused before any launch.
    let small = g.alloc("small scratch", GpuContext::argmax_scratch_bytes(1, 128_256)).unwrap();
    let lb = up_f32(&g, &vec![0.0; 2 * 128_256]);
    assert!(g.argmax(lb.all(), 128_256, 2, out.all(), flags.all(), Some(small.all())).is_err());
}

fn argmax_host(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn embed_and_convert_round_as_the_host_does() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(9);
    let (vocab, hidden) = (50, 64);
    let table: Vec<f32> =
        (0..vocab * hidden).map(|_| rng.f32(-70000.0, 70000.0) * if rng.below(2) == 0 { 1e-4 } else { 1.0 }).collect();
    for from in DTYPES {
        let src_bytes = encode(from, &table);
        let src_vals = decode(from, &src_bytes);
        let src = g.upload("src", &src_bytes).unwrap();
        for to in DTYPES {
            let dst = g.alloc("dst", vocab * hidden * to.size()).unwrap();
            g.convert(from, to, src.all(), dst.all(), vocab * hidden).unwrap();
            let got = decode(to, &read_bytes(&g, &dst, vocab * hidden * to.size()));
            for (i, (&a, &b)) in got.iter().zip(&src_vals).enumerate() {
                assert_eq!(a.to_bits(), round_to(to, b).to_bits(), "{from:?}->{to:?} at {i}: {a} vs {b}");
            }
            assert_finite(&got, "converted");
        }
        let tokens = [3i32, 49, 0, 3];
        let tb = up_i32(&g, &tokens);
        let x = g.alloc("x", tokens.len() * hidden * 4).unwrap();
        g.embed(from, src.all(), vocab, hidden, tb.all(), tokens.len(), x.all()).unwrap();
        let got = read_f32(&g, &x, tokens.len() * hidden);
        for (r, &t) in tokens.iter().enumerate() {
            let t = t as usize;
            assert_eq!(&got[r * hidden..(r + 1) * hidden], &src_vals[t * hidden..(t + 1) * hidden], "{from:?} row {r}");
        }
    }
}

#[test]
fn launch_wrappers_refuse_short_buffers() {
    let Some(g) = gpu() else { return };
    let w = g.alloc("w", 16 * 32 - 1).unwrap(); // one byte short of 16 rows x 128
    let q = g.alloc("q", 128).unwrap();
    let s = g.alloc("s", 4).unwrap();
    let out = g.alloc("o", 16 * 4).unwrap();
    let acts = TernaryActs { q: q.all(), scale: s.all(), qsum: s.all(), n_tok: 1 };
    let err = g.ternary_add(w.all(), 16, 128, 1.0, &acts, out.all(), 16).unwrap_err();
    assert!(err.to_string().contains("I2_S weights"), "{err}");
    let err = g.ternary_add(w.all(), 16, 100, 1.0, &acts, out.all(), 16).unwrap_err();
    assert!(err.to_string().contains("multiple of 128"), "{err}");
}

#[test]
fn decode_attention_with_rope_equals_rope_kv_then_attention() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng(17);
    // Decode rows of five distinct sequences, positions across chunks and
    // splits; 4, 6 (two groups) and 1 query heads per kv head.
    let pos = [0i32, 63, 64, 700, 1000];
    let base = [0i32, 1100, 2200, 3300, 4400];
    let (n, slots, max_pos, max_visible) = (pos.len(), 5500usize, 1024usize, 1024usize);
    for (nh, nkv, hd) in [(8usize, 2usize, 128usize), (12, 2, 64), (2, 2, 64)] {
        let (hidden, kv_dim, half) = (nh * hd, nkv * hd, hd / 2);
        let cos: Vec<f32> = (0..max_pos * half).map(|_| rng.f32(-1.0, 1.0)).collect();
        let sin: Vec<f32> = (0..max_pos * half).map(|_| rng.f32(-1.0, 1.0)).collect();
        let qkv: Vec<f32> = (0..n * (hidden + 2 * kv_dim)).map(|_| rng.f32(-2.0, 2.0)).collect();
        let (qkvb, cb, sb, pb, bb) =
            (up_f32(&g, &qkv), up_f32(&g, &cos), up_f32(&g, &sin), up_i32(&g, &pos), up_i32(&g, &base));
        for dt in [GpuDType::F16, GpuDType::BF16] {
            assert!(g.decode_rope_in_attention(dt, hd), "{dt:?} hd {hd}: tensor-core attention expected");
            let k: Vec<f32> = (0..slots * kv_dim).map(|_| round_to(dt, rng.f32(-2.0, 2.0))).collect();
            let v: Vec<f32> = (0..slots * kv_dim).map(|_| round_to(dt, rng.f32(-3.0, 3.0))).collect();
            let scratch_bytes = GpuContext::attention_scratch_bytes(n, max_visible, nh, hd);
            // The default split count (many splits here: parts, then the
            // combine kernel) and one split (the decode kernel writes its
            // output itself; rope_kv + attention still combine one part).
            for ctas in [0usize, 1] {
                g.set_attention_ctas(ctas);
                // Separate kernels: rope_kv, then attention.
                let (ka, va) = (g.upload("k", &encode(dt, &k)).unwrap(), g.upload("v", &encode(dt, &v)).unwrap());
                let (q, out_a, flags) = (
                    g.alloc("q", n * hidden * 4).unwrap(),
                    g.alloc("o", n * hidden * 4).unwrap(),
                    g.alloc("f", 4).unwrap(),
                );
                let heads = (nh, nkv, hd);
                let rope = (cb.all(), sb.all(), max_pos);
                g.rope_kv(
                    dt,
                    qkvb.all(),
                    rope.0,
                    rope.1,
                    max_pos,
                    pb.all(),
                    bb.all(),
                    n,
                    q.all(),
                    ka.all(),
                    va.all(),
                    slots,
                    heads,
                )
                .unwrap();
                let caches = Caches { dt, k: &ka, v: &va, slots, heads };
                run_attention(&g, &caches, &q, &pb, &bb, n, max_visible, &out_a, &flags);
                // One kernel.
                let (kb, vb) = (g.upload("k", &encode(dt, &k)).unwrap(), g.upload("v", &encode(dt, &v)).unwrap());
                let (out_b, scratch) = (g.alloc("o", n * hidden * 4).unwrap(), g.alloc("s", scratch_bytes).unwrap());
                g.attention_decode_rope(
                    dt,
                    qkvb.all(),
                    rope,
                    pb.all(),
                    bb.all(),
                    n,
                    max_visible,
                    (kb.all(), vb.all(), slots),
                    out_b.all(),
                    heads,
                    scratch.all(),
                    flags.all(),
                )
                .unwrap();
                assert_eq!(read_i32(&g, &flags, 1)[0], 0);
                let (a, b) = (read_f32(&g, &out_a, n * hidden), read_f32(&g, &out_b, n * hidden));
                assert_finite(&b, "attention output");
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{dt:?} heads {nh}/{nkv} hd {hd} target CTAs {ctas}: outputs differ"
                );
                let cache_bytes = slots * kv_dim * dt.size();
                assert!(
                    read_bytes(&g, &ka, cache_bytes) == read_bytes(&g, &kb, cache_bytes),
                    "{dt:?} hd {hd}: key caches differ"
                );
                assert!(
                    read_bytes(&g, &va, cache_bytes) == read_bytes(&g, &vb, cache_bytes),
                    "{dt:?} hd {hd}: value caches differ"
                );
                println!(
                    "{dt:?} heads {nh}/{nkv} hd {hd} target CTAs {ctas}: one decode kernel equals rope_kv + attention \
                     bit for bit"
                );
            }
            g.set_attention_ctas(0);
        }
    }
}
