//! Token sampling: greedy, and seeded temperature / top-k / top-p.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::InferenceError;

/// How to pick the next token. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), InferenceError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(InferenceError::BadSampling(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InferenceError::BadSampling(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self::greedy()
    }
}

/// Index of the largest logit; the lowest index wins ties. NaNs are skipped;
/// a row without any number above `-inf` gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    // Two passes the compiler turns into SIMD: the largest value, in eight
    // independent lanes (`f32::max` skips NaN), then its first index.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    let max = tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        return 0;
    }
    logits.iter().position(|&v| v == max).map_or(0, |i| i as u32)
}

/// The largest finite logit (`-inf` when there is none), in eight lanes the
/// compiler turns into SIMD.
fn finite_max(logits: &[f32]) -> f32 {
    let finite = |v: f32| if v.is_finite() { v } else { f32::NEG_INFINITY };
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(finite(v));
        }
    }
    tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(finite(v)))
}

/// A sampler with its own seeded random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

/// A finite logit, its token and its unnormalised probability.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    token: u32,
    logit: f32,
    p: f64,
}

/// Most likely first: larger logit, then smaller token. Orders candidates as
/// their scaled logits `logit / temperature` would (dividing distinct f32
/// values, exact in f64, by one positive number keeps them distinct).
fn more_likely(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.token.cmp(&b.token))
}

thread_local! {
    /// Top-p alone's probabilities of every token, reused from token to
    /// token on each sampling thread (a vocabulary of 128256 takes 1 MB; a
    /// fresh allocation's page faults cost more than the draw gained).
    static PROBABILITIES: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Candidates taken from the most likely end before the top-p scan sorts
/// everything: the nucleus of a trained model's step is usually far smaller.
const NUCLEUS_FIRST_TAKE: usize = 256;

/// Logits per chunk of the temperature-only draw's sum.
const SUM_CHUNK: usize = 8192;

/// Vocabularies from this size sum their chunks on the rayon pool.
const PARALLEL_SUM_MIN: usize = 4 * SUM_CHUNK;

/// The `k` most likely finite logits, most likely first, in one pass that
/// keeps at most `2k` of them: whenever the buffer fills it is cut back to
/// its best `k`, whose last logit then turns away every later logit not
/// above it (a later token of equal logit ranks below, being larger).
fn top_candidates(logits: &[f32], k: usize) -> Vec<Candidate> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<Candidate> = Vec::with_capacity(2 * k);
    let mut floor = f32::NEG_INFINITY;
    let mut full = false;
    for (c, chunk) in logits.chunks(64).enumerate() {
        // Most chunks hold nothing above the floor: one SIMD-able test
        // (NaN compares false) skips them.
        if full && !chunk.iter().fold(false, |any, &v| any | (v > floor)) {
            continue;
        }
        for (j, &logit) in chunk.iter().enumerate() {
            if !logit.is_finite() || (full && logit <= floor) {
                continue;
            }
            best.push(Candidate { token: (c * 64 + j) as u32, logit, p: 0.0 });
            if best.len() == 2 * k {
                best.select_nth_unstable_by(k - 1, more_likely);
                best.truncate(k);
                floor = best[k - 1].logit;
                full = true;
            }
        }
    }
    if best.len() > k {
        best.select_nth_unstable_by(k - 1, more_likely);
        best.truncate(k);
    }
    best.sort_unstable_by(more_likely);
    best
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Result<Self, InferenceError> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// Picks a token from one position's logits: the argmax when greedy,
    /// else [`SampleDraw::apply`] of [`Self::next_draw`].
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.is_greedy() {
            return argmax(logits);
        }
        self.next_draw().apply(logits)
    }

    /// The next sampled token's settings and uniform random number (one
    /// number from this sampler's stream per sampled token, as
    /// [`Self::sample`] takes): a backend that samples on its own device
    /// draws the same token from it as [`SampleDraw::apply`] would.
    pub fn next_draw(&mut self) -> SampleDraw {
        SampleDraw {
            temperature: self.config.temperature,
            top_k: self.config.top_k,
            top_p: self.config.top_p,
            u: self.rng.random::<f64>(),
        }
    }
}

/// One sampled token's settings (temperature > 0) and the uniform number in
/// [0, 1) its draw uses, taken from the request's [`Sampler`] beforehand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleDraw {
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    pub u: f64,
}

impl SampleDraw {
    /// Picks the token: among the tokens left by temperature, top-k and
    /// top-p, with probability proportional to `exp((logit - max) /
    /// temperature)`, the one where `u` of the cumulative mass falls,
    /// walking the kept tokens most likely first under top-k, in token order
    /// otherwise (temperature alone, top-p alone: the order a device can
    /// walk a wide nucleus in without sorting it; the order does not change
    /// the distribution). It costs one pass over the logits plus a
    /// selection: only the top-k, or the nucleus of top-p, is ever sorted
    /// (a vocabulary of 128256 sorted in full took 8-14 ms a token).
    pub fn apply(&self, logits: &[f32]) -> u32 {
        if self.top_k == 0 && self.top_p >= 1.0 {
            return self.apply_all(logits);
        }
        if self.top_k == 0 {
            let max = finite_max(logits);
            if max == f32::NEG_INFINITY {
                return argmax(logits);
            }
            let probability = self.probability(max);
            return self.top_p_alone(logits, &probability, |logits, p, few| match few {
                Ok(kept) => walk(&kept, self.u).unwrap_or_else(|| argmax(logits)),
                Err(wide) => wide.draw(logits, p, self.u).unwrap_or_else(|| argmax(logits)),
            });
        }
        walk(&self.kept_candidates(logits), self.u).unwrap_or_else(|| argmax(logits))
    }

    /// Temperature alone: every finite logit is a candidate, drawn in token
    /// order. The probabilities' sum runs in fixed chunks of the vocabulary
    /// on the rayon pool (the same sum, so the same token, on any number of
    /// threads); the draw then finds its chunk from the chunk sums and
    /// recomputes only that chunk's probabilities.
    fn apply_all(&self, logits: &[f32]) -> u32 {
        let max = finite_max(logits);
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        let probability = self.probability(max);
        let masses = chunk_masses(logits, &probability);
        let total: f64 = masses.iter().sum();
        let mut r = self.u * total;
        let mut last_finite = None;
        for (c, (chunk, &mass)) in logits.chunks(SUM_CHUNK).zip(&masses).enumerate() {
            if r >= mass {
                r -= mass;
                continue;
            }
            for (j, &v) in chunk.iter().enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let token = (c * SUM_CHUNK + j) as u32;
                let p = probability(v);
                if r < p {
                    return token;
                }
                r -= p;
                last_finite = Some(token);
            }
            // Rounding left r just above the chunk's sum: its last token.
            if let Some(token) = last_finite {
                return token;
            }
        }
        // Rounding past the end: the last finite token.
        logits.iter().rposition(|v| v.is_finite()).map_or_else(|| argmax(logits), |i| i as u32)
    }

    /// `logit -> exp((logit - max) / temperature)` in f64.
    fn probability(&self, max: f32) -> impl Fn(f32) -> f64 {
        let t = f64::from(self.temperature);
        let scaled_max = f64::from(max) / t;
        move |logit: f32| {
            let z = f64::from(logit) / t - scaled_max;
            // exp underflows to 0 below this anyway: skip the call.
            if z < -746.0 {
                0.0
            } else {
                z.exp()
            }
        }
    }

    /// The candidates left after temperature, top-k and top-p, with their
    /// unnormalised probabilities: sorted most likely first under top-k, in
    /// token order without it (the order the draw walks them in).
    fn kept_candidates(&self, logits: &[f32]) -> Vec<Candidate> {
        let max = finite_max(logits);
        if max == f32::NEG_INFINITY {
            return Vec::new();
        }
        let probability = self.probability(max);
        let top_k = self.top_k;
        let top_p = f64::from(self.top_p);
        let all_finite = || -> Vec<Candidate> {
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &logit)| Candidate { token: i as u32, logit, p: probability(logit) })
                .collect()
        };
        if top_k == 0 {
            if self.top_p >= 1.0 {
                return all_finite();
            }
            return self.top_p_alone(logits, &probability, |logits, p, few| match few {
                Ok(kept) => kept,
                Err(wide) => wide.kept(logits, p),
            });
        }
        let mut candidates = top_candidates(logits, top_k);
        for c in candidates.iter_mut() {
            c.p = probability(c.logit);
        }
        if self.top_p >= 1.0 {
            return candidates;
        }
        let total: f64 = candidates.iter().map(|c| c.p).sum();
        let keep = nucleus_len(&candidates, total, top_p).unwrap_or(candidates.len());
        candidates.truncate(keep);
        candidates
    }
}

impl SampleDraw {
    /// Top-p alone: the total from the chunk sums (each probability kept in
    /// this thread's scratch buffer), then the most likely few; a nucleus
    /// wider than them is found by mass. `finish` gets the logits, every
    /// token's probability (0 where not finite) and either the nucleus, in
    /// token order, or the wide nucleus's description. The logits hold a
    /// finite value (the caller checked `max`).
    fn top_p_alone<T>(
        &self,
        logits: &[f32],
        probability: &(impl Fn(f32) -> f64 + Sync),
        finish: impl FnOnce(&[f32], &[f64], Result<Vec<Candidate>, WideNucleus>) -> T,
    ) -> T {
        let top_p = f64::from(self.top_p);
        // Taken out of the cell, not borrowed: rayon may run another draw
        // on this thread while this one waits (that one then allocates).
        let mut scratch = PROBABILITIES.take();
        if scratch.len() < logits.len() {
            scratch.resize(logits.len(), 0.0);
        }
        let p = &mut scratch[..logits.len()];
        let total: f64 = chunk_masses_kept(logits, probability, p).iter().sum();
        let mut first = top_candidates(logits, NUCLEUS_FIRST_TAKE);
        for c in first.iter_mut() {
            c.p = probability(c.logit);
        }
        let few = match nucleus_len(&first, total, top_p) {
            Some(keep) => {
                first.truncate(keep);
                first.sort_unstable_by_key(|c| c.token);
                Ok(first)
            }
            None => Err(nucleus_by_mass(logits, p, probability, total, top_p)),
        };
        let out = finish(logits, p, few);
        PROBABILITIES.set(scratch);
        out
    }
}

/// The token where `u` of the candidates' total mass falls, walking them
/// in order; `None` without candidates.
fn walk(kept: &[Candidate], u: f64) -> Option<u32> {
    let total: f64 = kept.iter().map(|c| c.p).sum();
    let mut r = u * total;
    for c in kept {
        if r < c.p {
            return Some(c.token);
        }
        r -= c.p;
    }
    kept.last().map(|c| c.token)
}

/// How many of `sorted` (most likely first) the smallest prefix whose share
/// of `total` reaches `top_p` takes; `None` if all of them fall short.
fn nucleus_len(sorted: &[Candidate], total: f64, top_p: f64) -> Option<usize> {
    let mut cumulative = 0.0;
    for (i, c) in sorted.iter().enumerate() {
        cumulative += c.p / total;
        if cumulative >= top_p {
            return Some(i + 1);
        }
    }
    None
}

/// Order key of a finite logit: larger logit, larger key, in
/// `f32::total_cmp`'s order (-0.0 below +0.0).
fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The logit whose [`order_key`] is `key`.
fn key_value(key: u32) -> f32 {
    f32::from_bits(if key & 0x8000_0000 != 0 { key & 0x7fff_ffff } else { !key })
}

/// A top-p nucleus wider than the first take: every finite token whose
/// [`order_key`] is above `threshold`, and the first `need` (by token) of
/// those whose key equals it (each of probability `w`).
#[derive(Debug, Clone, Copy)]
struct WideNucleus {
    threshold: u32,
    need: usize,
    w: f64,
}

impl WideNucleus {
    /// Its tokens in token order; `p` holds every token's probability.
    fn kept(&self, logits: &[f32], p: &[f64]) -> Vec<Candidate> {
        self.kept_in(logits, self.need).map(|(i, &logit)| Candidate { token: i as u32, logit, p: p[i] }).collect()
    }

    /// The token where `u` of its mass falls, walking it in token order
    /// without building it: each fixed chunk's kept mass on the rayon pool
    /// (the same sums on any number of threads), then the tokens of the one
    /// chunk `u` falls in. `None` if it is empty.
    fn draw(&self, logits: &[f32], p: &[f64], u: f64) -> Option<u32> {
        let threshold = self.threshold;
        // A chunk's mass and count above the threshold and its tokens at it.
        let part = |(chunk, ps): (&[f32], &[f64])| -> (f64, usize, usize) {
            let (mut mass, mut count, mut ties) = (0.0f64, 0usize, 0usize);
            for (&v, &pv) in chunk.iter().zip(ps) {
                // Not finite: p is 0, and no finite key equals the threshold's.
                let (key, finite) = (order_key(v), v.is_finite());
                mass += if key > threshold { pv } else { 0.0 };
                count += usize::from(finite && key > threshold);
                ties += usize::from(finite && key == threshold);
            }
            (mass, count, ties)
        };
        let parts: Vec<(f64, usize, usize)> = if logits.len() >= PARALLEL_SUM_MIN {
            logits.par_chunks(SUM_CHUNK).zip(p.par_chunks(SUM_CHUNK)).map(part).collect()
        } else {
            logits.chunks(SUM_CHUNK).zip(p.chunks(SUM_CHUNK)).map(part).collect()
        };
        // Ties are kept first by token: each chunk's share of `need`.
        let mut left = self.need;
        let chunks: Vec<(f64, usize, usize)> = parts
            .iter()
            .map(|&(mass, count, ties)| {
                let kept = ties.min(left);
                left -= kept;
                (mass + kept as f64 * self.w, count + kept, kept)
            })
            .collect();
        let total: f64 = chunks.iter().map(|c| c.0).sum();
        let mut r = u * total;
        for (c, &(mass, _, ties_kept)) in chunks.iter().enumerate() {
            if r >= mass {
                r -= mass;
                continue;
            }
            let start = c * SUM_CHUNK;
            let end = (start + SUM_CHUNK).min(logits.len());
            let mut last = None;
            for (j, _) in self.kept_in(&logits[start..end], ties_kept) {
                last = Some((start + j) as u32);
                if r < p[start + j] {
                    return last;
                }
                r -= p[start + j];
            }
            // Rounding left r just above the chunk's sum: its last token.
            return last;
        }
        // Rounding past the end: the last kept token.
        let (c, &(_, _, ties_kept)) = chunks.iter().enumerate().rev().find(|(_, c)| c.1 > 0)?;
        let start = c * SUM_CHUNK;
        let end = (start + SUM_CHUNK).min(logits.len());
        self.kept_in(&logits[start..end], ties_kept).last().map(|(j, _)| (start + j) as u32)
    }

    /// The kept tokens of a run of logits (index in the run, logit) whose
    /// first `ties_kept` ties are kept: one chunk, or all of them.
    fn kept_in<'a>(&self, chunk: &'a [f32], ties_kept: usize) -> impl Iterator<Item = (usize, &'a f32)> + 'a {
        let threshold = self.threshold;
        let mut ties = 0;
        chunk.iter().enumerate().filter(move |&(_, &v)| {
            let key = order_key(v);
            v.is_finite()
                && (key > threshold
                    || (key == threshold && {
                        ties += 1;
                        ties <= ties_kept
                    }))
        })
    }
}

/// Top-p alone's nucleus when wider than the first take, without sorting
/// the vocabulary: every logit above some threshold plus the first few (by
/// token) equal to it, the smallest such set of most likely tokens whose
/// mass reaches `top_p * total`. The threshold's order key is found 8 bits
/// at a time from each bucket's mass (a radix selection, as the GPU's
/// `sample_hist` passes do) instead of a sort (a vocabulary of 128256
/// sorted in full took 8-14 ms). `p` holds each token's probability (0
/// where not finite). The first pass, and the list of tokens left in the
/// threshold's top-byte bucket, run on the rayon pool in fixed chunks
/// whose bucket sums are added in chunk order (the same sums on any number
/// of threads); the later passes see only the tokens still in the
/// threshold's bucket.
fn nucleus_by_mass(
    logits: &[f32],
    p: &[f64],
    probability: &impl Fn(f32) -> f64,
    total: f64,
    top_p: f64,
) -> WideNucleus {
    struct Buckets {
        count: [usize; 256],
        mass: [f64; 256],
    }
    impl Buckets {
        fn new() -> Self {
            Self { count: [0; 256], mass: [0.0; 256] }
        }
    }
    let target = top_p * total;
    let parallel = logits.len() >= PARALLEL_SUM_MIN;
    // Pass 0: the key's top byte.
    let first = |(src, ps): (&[f32], &[f64])| -> Buckets {
        let mut b = Buckets::new();
        for (&logit, &v) in src.iter().zip(ps) {
            if logit.is_finite() {
                let d = (order_key(logit) >> 24) as usize;
                b.count[d] += 1;
                b.mass[d] += v;
            }
        }
        b
    };
    let parts: Vec<Buckets> = if parallel {
        logits.par_chunks(SUM_CHUNK).zip(p.par_chunks(SUM_CHUNK)).map(first).collect()
    } else {
        logits.chunks(SUM_CHUNK).zip(p.chunks(SUM_CHUNK)).map(first).collect()
    };
    let mut buckets = Buckets::new();
    for part in &parts {
        for d in 0..256 {
            buckets.count[d] += part.count[d];
            buckets.mass[d] += part.mass[d];
        }
    }
    let mut above = 0.0f64;
    // The bucket of the threshold: the first, from the top, whose mass
    // brings `above` to the target.
    let choose = |b: &Buckets, above: &mut f64| -> usize {
        let mut lowest = 0;
        for d in (0..256).rev() {
            if b.count[d] == 0 {
                continue;
            }
            lowest = d;
            if *above + b.mass[d] >= target {
                return d;
            }
            *above += b.mass[d];
        }
        // Rounding can leave the buckets' sum just short of the bucket
        // chosen before: then its last bucket is the one.
        *above -= b.mass[lowest];
        lowest
    };
    let d = choose(&buckets, &mut above);
    let mut at_threshold = buckets.count[d];
    let mut prefix = (d as u32) << 24;
    // The tokens still in the threshold's bucket, in token order (written
    // without a branch: the test is a coin toss for most tokens).
    let in_bucket = |(c, chunk): (usize, &[f32])| -> Vec<u32> {
        let mut out = vec![0u32; chunk.len()];
        let mut n = 0;
        for (j, &v) in chunk.iter().enumerate() {
            out[n] = (c * SUM_CHUNK + j) as u32;
            n += usize::from(v.is_finite() && order_key(v) >> 24 == d as u32);
        }
        out.truncate(n);
        out
    };
    let mut edge: Vec<u32> = if parallel {
        logits.par_chunks(SUM_CHUNK).enumerate().map(in_bucket).collect::<Vec<_>>().concat()
    } else {
        logits.chunks(SUM_CHUNK).enumerate().map(in_bucket).collect::<Vec<_>>().concat()
    };
    for shift in [16u32, 8, 0] {
        let mut b = Buckets::new();
        for &i in &edge {
            let d = ((order_key(logits[i as usize]) >> shift) & 255) as usize;
            b.count[d] += 1;
            b.mass[d] += p[i as usize];
        }
        let d = choose(&b, &mut above);
        at_threshold = b.count[d];
        prefix |= (d as u32) << shift;
        if shift > 0 {
            let mask = !0u32 << shift;
            edge.retain(|&i| order_key(logits[i as usize]) & mask == prefix);
        }
    }
    let (threshold, w) = (prefix, probability(key_value(prefix)));
    let need = if w > 0.0 { (((target - above) / w).ceil().max(1.0) as usize).min(at_threshold) } else { at_threshold };
    WideNucleus { threshold, need, w }
}

/// [`chunk_masses`], also writing each token's probability into `p` (as
/// long as `logits`; 0 where the logit is not finite).
fn chunk_masses_kept(logits: &[f32], probability: &(impl Fn(f32) -> f64 + Sync), p: &mut [f64]) -> Vec<f64> {
    let chunk_mass = |(chunk, out): (&[f32], &mut [f64])| -> f64 {
        let mut sum = 0.0;
        for (&v, o) in chunk.iter().zip(out) {
            *o = if v.is_finite() { probability(v) } else { 0.0 };
            sum += *o;
        }
        sum
    };
    if logits.len() >= PARALLEL_SUM_MIN {
        logits.par_chunks(SUM_CHUNK).zip(p.par_chunks_mut(SUM_CHUNK)).map(chunk_mass).collect()
    } else {
        logits.chunks(SUM_CHUNK).zip(p.chunks_mut(SUM_CHUNK)).map(chunk_mass).collect()
    }
}

/// The probabilities' sum over each fixed chunk of the vocabulary (finite
/// logits only), on the rayon pool for large vocabularies: the same sums in
/// the same order on any number of threads.
fn chunk_masses(logits: &[f32], probability: &(impl Fn(f32) -> f64 + Sync)) -> Vec<f64> {
    let chunk_mass = |chunk: &[f32]| -> f64 { chunk.iter().filter(|v| v.is_finite()).map(|&v| probability(v)).sum() };
    if logits.len() >= PARALLEL_SUM_MIN {
        logits.par_chunks(SUM_CHUNK).map(chunk_mass).collect()
    } else {
        logits.chunks(SUM_CHUNK).map(chunk_mass).collect()
    }
}

/// The definition, written plainly: every finite logit scaled by the
/// temperature and sorted (larger first, then smaller token), cut to
/// top-k, turned into `exp(z - max)`, cut to the smallest prefix whose
/// share reaches top-p. (The sampler before session 24, which sorted the
/// whole vocabulary for every token.) The tests compare [`Sampler`] with
/// it and the `sampling` benchmark times it as the baseline; it costs a
/// sort of the whole vocabulary, so nothing else should call it.
pub fn kept_by_full_sort(config: &SamplingConfig, logits: &[f32]) -> Vec<(u32, f64)> {
    let t = f64::from(config.temperature);
    let mut items: Vec<(u32, f64)> =
        logits.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| (i as u32, f64::from(v) / t)).collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if config.top_k > 0 {
        items.truncate(config.top_k);
    }
    let Some(&(_, max)) = items.first() else {
        return items;
    };
    for item in items.iter_mut() {
        item.1 = (item.1 - max).exp();
    }
    if config.top_p < 1.0 {
        let total: f64 = items.iter().map(|(_, p)| p).sum();
        let mut cumulative = 0.0;
        let mut keep = items.len();
        for (i, (_, p)) in items.iter().enumerate() {
            cumulative += p / total;
            if cumulative >= f64::from(config.top_p) {
                keep = i + 1;
                break;
            }
        }
        items.truncate(keep);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingConfig { temperature, top_k, top_p, seed }).unwrap()
    }

    #[test]
    fn argmax_prefers_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = sampler(1.0, 1, 1.0, 9);
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities at T=1: e^2, e^1.9, e^0.1, e^-1 normalised -> about 0.49, 0.44, 0.07, 0.02.
        // top_p 0.9 keeps tokens 1 and 2 only.
        let logits = [0.1, 2.0, 1.9, -1.0];
        let mut s = sampler(1.0, 0, 0.9, 3);
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert_eq!((seen[0], seen[3]), (0, 0), "{seen:?}");
        let ratio = seen[1] as f64 / seen[2] as f64;
        let expected = (0.1f64).exp(); // e^2 / e^1.9
        assert!((ratio - expected).abs() < 0.15, "ratio {ratio}, expected {expected}");
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = sampler(0.8, 20, 0.95, seed);
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    fn kept(config: &SamplingConfig, logits: &[f32]) -> Vec<(u32, f64)> {
        let mut s = Sampler::new(config.clone()).unwrap();
        s.next_draw().kept_candidates(logits).iter().map(|c| (c.token, c.p)).collect()
    }

    /// Logits with ties, infinities and NaNs among ordinary values.
    fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
        let value = prop_oneof![
            8 => -20.0f32..20.0,
            1 => proptest::sample::select(vec![0.5f32, -3.0, 7.25]),
            1 => proptest::sample::select(vec![f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -1e30]),
        ];
        proptest::collection::vec(value, 0..1200)
    }

    use proptest::prelude::{any, prop_assert, prop_assert_eq, prop_oneof, proptest, Just, ProptestConfig, Strategy};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Top-k (with or without top-p) keeps exactly the definition's
        /// tokens, order and probabilities, bit for bit, so a seed draws the
        /// same token as the full sort did.
        #[test]
        fn top_k_equals_the_definition(
            logits in logits_strategy(),
            temperature in 0.05f32..4.0,
            top_k in 1usize..300,
            top_p in prop_oneof![Just(1.0f32), 0.05f32..1.0],
            seed in any::<u64>(),
        ) {
            let config = SamplingConfig { temperature, top_k, top_p, seed };
            prop_assert_eq!(kept(&config, &logits), kept_by_full_sort(&config, &logits));
            let mut fast = Sampler::new(config.clone()).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let reference = kept_by_full_sort(&config, &logits);
            for _ in 0..4 {
                let total: f64 = reference.iter().map(|(_, p)| p).sum();
                let mut r = rng.random::<f64>() * total;
                let mut expected = reference.last().map_or_else(|| argmax(&logits), |&(t, _)| t);
                for &(token, p) in &reference {
                    if r < p {
                        expected = token;
                        break;
                    }
                    r -= p;
                }
                prop_assert_eq!(fast.sample(&logits), expected);
            }
        }

        /// Without top-k: top-p keeps the definition's tokens, in token
        /// order (the total is summed in another order, so probabilities
        /// may differ in the last bit); with neither, every finite logit is
        /// kept with its probability.
        #[test]
        fn top_p_alone_and_plain_temperature_keep_the_definition(
            logits in logits_strategy(),
            temperature in 0.05f32..4.0,
            top_p in prop_oneof![Just(1.0f32), 0.05f32..1.0],
        ) {
            let config = SamplingConfig { temperature, top_k: 0, top_p, seed: 0 };
            let fast = kept(&config, &logits);
            let mut reference = kept_by_full_sort(&config, &logits);
            reference.sort_by_key(|&(t, _)| t);
            prop_assert_eq!(
                fast.iter().map(|&(t, _)| t).collect::<Vec<_>>(),
                reference.iter().map(|&(t, _)| t).collect::<Vec<_>>()
            );
            for (a, b) in fast.iter().zip(&reference) {
                prop_assert!((a.1 - b.1).abs() <= 1e-15 * b.1.abs().max(1e-300), "{a:?} vs {b:?}");
            }
        }

        #[test]
        fn argmax_equals_the_first_largest(logits in logits_strategy()) {
            let mut best = 0usize;
            let mut best_value = f32::NEG_INFINITY;
            for (i, &v) in logits.iter().enumerate() {
                if v > best_value {
                    best = i;
                    best_value = v;
                }
            }
            prop_assert_eq!(argmax(&logits) as usize, best);
        }
    }

    /// The temperature-only draw, written plainly: walk every finite token
    /// in token order, subtracting its probability from `u * total`.
    /// `kept_in_token_order`: the definition's candidates sorted by token.
    fn naive_walk(kept_in_token_order: &[(u32, f64)], total: f64, u: f64) -> u32 {
        let mut r = u * total;
        for &(token, p) in kept_in_token_order {
            if r < p {
                return token;
            }
            r -= p;
        }
        kept_in_token_order.last().map_or(0, |&(t, _)| t)
    }

    /// 200 draws of `config` (seeded by its seed) equal the plain walk over
    /// the definition's nucleus, in token order, fed the same numbers; that
    /// nucleus and its total.
    fn draws_follow_the_walk(logits: &[f32], config: SamplingConfig, label: &str) -> (Vec<(u32, f64)>, f64) {
        let mut nucleus = kept_by_full_sort(&config, logits);
        nucleus.sort_by_key(|&(t, _)| t);
        let total: f64 = nucleus.iter().map(|(_, p)| p).sum();
        let mut stream = ChaCha8Rng::seed_from_u64(config.seed);
        let mut fast = Sampler::new(config).unwrap();
        for _ in 0..200 {
            let u = stream.random::<f64>();
            assert_eq!(fast.sample(logits), naive_walk(&nucleus, total, u), "{label}, u {u}");
        }
        (nucleus, total)
    }

    /// Draws over vocabularies of one to nine chunks, on the serial and the
    /// rayon sum, equal the plain walk fed the same random numbers.
    #[test]
    fn temperature_only_draw_equals_the_plain_walk() {
        let mut gen = ChaCha8Rng::seed_from_u64(17);
        for (n, temperature) in [(100usize, 1.0f32), (20_000, 0.7), (70_001, 1.3)] {
            let logits: Vec<f32> = (0..n)
                .map(|i| match i % 997 {
                    5 => f32::NAN,
                    6 => f32::NEG_INFINITY,
                    _ => gen.random_range(-12.0f32..12.0),
                })
                .collect();
            let config = SamplingConfig { temperature, top_k: 0, top_p: 1.0, seed: 99 };
            let mut fast = Sampler::new(config.clone()).unwrap();
            let mut stream = ChaCha8Rng::seed_from_u64(99);
            let mut kept = kept_by_full_sort(&config, &logits);
            let total: f64 = kept.iter().map(|(_, p)| p).sum();
            kept.sort_by_key(|&(t, _)| t);
            let mut differ = 0;
            for _ in 0..300 {
                let u = stream.random::<f64>();
                // The chunk sums and the plain running sum round differently,
                // which can move a draw by one token only at a boundary.
                if fast.sample(&logits) != naive_walk(&kept, total, u) {
                    differ += 1;
                }
            }
            assert_eq!(differ, 0, "vocabulary {n}");
        }
    }

    /// Top-p alone draws from its nucleus in token order: the plain walk
    /// over the definition's nucleus sorted by token, fed the same random
    /// numbers, for nuclei inside and far beyond the first take.
    #[test]
    fn top_p_alone_draws_its_nucleus_in_token_order() {
        let mut gen = ChaCha8Rng::seed_from_u64(23);
        let cases = [(100usize, 1.0f32, 0.9f32, 12.0f32), (5000, 0.8, 0.5, 1.0), (20_000, 1.2, 0.95, 0.5)];
        for (n, temperature, top_p, spread) in cases {
            let logits: Vec<f32> =
                (0..n).map(|i| if i % 613 == 7 { f32::NAN } else { gen.random_range(-spread..spread) }).collect();
            let config = SamplingConfig { temperature, top_k: 0, top_p, seed: 5 };
            let (nucleus, _) = draws_follow_the_walk(&logits, config, &format!("vocabulary {n}"));
            if n == 20_000 {
                assert!(nucleus.len() > 16 * NUCLEUS_FIRST_TAKE, "nucleus of {}", nucleus.len());
            }
        }
    }

    /// Wide nuclei drawn without being built (chunk masses on the rayon
    /// pool), including edges inside runs of ties that span chunks: the
    /// plain walk over the definition's nucleus fed the same numbers.
    #[test]
    fn wide_nucleus_draws_equal_the_plain_walk() {
        let mut gen = ChaCha8Rng::seed_from_u64(31);
        let random: Vec<f32> = (0..50_000)
            .map(|i| if i % 997 == 3 { f32::NEG_INFINITY } else { gen.random_range(-2.0f32..2.0) })
            .collect();
        let ties: Vec<f32> = (0..128_256).map(|i| ((i * 7919) % 13) as f32 * 0.25).collect();
        for (name, logits, temperature, top_p) in
            [("random", &random, 0.9f32, 0.93f32), ("ties", &ties, 1.0, 0.9137), ("ties", &ties, 0.7, 0.4219)]
        {
            let config = SamplingConfig { temperature, top_k: 0, top_p, seed: 9 };
            let (nucleus, total) = draws_follow_the_walk(logits, config, &format!("{name} T {temperature}"));
            assert!(nucleus.len() > NUCLEUS_FIRST_TAKE, "{name}: nucleus of {}", nucleus.len());
            // The ends: the first kept token, and the last (u just below 1).
            let draw = |u: f64| SampleDraw { temperature, top_k: 0, top_p, u }.apply(logits);
            assert_eq!(draw(0.0), nucleus[0].0, "{name}");
            assert_eq!(draw(1.0 - f64::EPSILON), naive_walk(&nucleus, total, 1.0 - f64::EPSILON), "{name}");
        }
    }

    /// Across chunk boundaries (tokens 8191, 8192, 39999 of 40000, everything
    /// else -inf or NaN) the frequencies follow 1 : 2 : 3 (logits ln 1, ln 2,
    /// ln 3 at T = 1).
    #[test]
    fn temperature_only_frequencies_across_chunks() {
        let mut logits = vec![f32::NEG_INFINITY; 40_000];
        logits[100] = f32::NAN;
        let picks = [(8191usize, 1.0f64), (8192, 2.0), (39_999, 3.0)];
        for &(token, weight) in &picks {
            logits[token] = weight.ln() as f32;
        }
        let mut s = sampler(1.0, 0, 1.0, 8);
        let draws = 3000;
        let mut seen = std::collections::HashMap::new();
        for _ in 0..draws {
            *seen.entry(s.sample(&logits) as usize).or_insert(0usize) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        for &(token, weight) in &picks {
            let share = weight / 6.0;
            let expected = draws as f64 * share;
            let sd = (expected * (1.0 - share)).sqrt();
            assert!((seen[&token] as f64 - expected).abs() < 5.0 * sd, "{seen:?}");
        }
    }

    /// A nucleus larger than the first take (flat logits) is still found.
    #[test]
    fn wide_nucleus_beyond_the_first_take() {
        let logits: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
        let config = SamplingConfig { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 0 };
        let fast = kept(&config, &logits);
        assert!(fast.len() > 4 * NUCLEUS_FIRST_TAKE, "nucleus of {}", fast.len());
        let fast_tokens: Vec<u32> = fast.iter().map(|&(t, _)| t).collect();
        let mut reference: Vec<u32> = kept_by_full_sort(&config, &logits).iter().map(|&(t, _)| t).collect();
        reference.sort_unstable();
        assert_eq!(fast_tokens, reference);
    }

    /// Wide nuclei over vocabularies of several chunks, summed on the rayon
    /// pool (random logits with NaNs and infinities; temperatures and top-p
    /// across their ranges): the definition's tokens and probabilities.
    #[test]
    fn wide_nucleus_over_many_chunks_keeps_the_definition() {
        let mut rng = ChaCha8Rng::seed_from_u64(29);
        for case in 0..12 {
            let n = PARALLEL_SUM_MIN + rng.random_range(0..3 * SUM_CHUNK);
            let spread = [0.3f32, 1.0, 4.0][case % 3];
            let logits: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..1000) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    _ => rng.random_range(-spread..spread),
                })
                .collect();
            let temperature = [0.5f32, 1.0, 2.0][case % 3];
            let top_p = rng.random_range(0.3f32..0.99);
            let config = SamplingConfig { temperature, top_k: 0, top_p, seed: 0 };
            let fast = kept(&config, &logits);
            let mut reference = kept_by_full_sort(&config, &logits);
            reference.sort_by_key(|&(t, _)| t);
            assert!(reference.len() > NUCLEUS_FIRST_TAKE, "case {case}: nucleus of {}", reference.len());
            let tokens = |v: &[(u32, f64)]| v.iter().map(|&(t, _)| t).collect::<Vec<_>>();
            assert_eq!(tokens(&fast), tokens(&reference), "case {case}: n {n}, T {temperature}, top-p {top_p}");
            for (a, b) in fast.iter().zip(&reference) {
                assert!((a.1 - b.1).abs() <= 1e-15 * b.1.abs().max(1e-300), "case {case}: {a:?} vs {b:?}");
            }
        }
    }

    /// Wide nuclei whose edge falls inside a run of equal logits (13
    /// distinct values): the mass selection keeps the definition's tokens,
    /// the first of the tied ones by token.
    #[test]
    fn wide_nucleus_with_ties_at_its_edge() {
        for (n, top_p) in [(3000usize, 0.4219f32), (50_000, 0.7321), (128_256, 0.9137)] {
            let logits: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 * 0.25).collect();
            let config = SamplingConfig { temperature: 1.0, top_k: 0, top_p, seed: 0 };
            let fast: Vec<u32> = kept(&config, &logits).iter().map(|&(t, _)| t).collect();
            let reference = kept_by_full_sort(&config, &logits);
            let edge = logits[reference.last().unwrap().0 as usize];
            let kept_at_edge = reference.iter().filter(|&&(t, _)| logits[t as usize] == edge).count();
            let all_at_edge = logits.iter().filter(|&&v| v == edge).count();
            assert!(kept_at_edge < all_at_edge, "n {n}: the edge is not inside a run of ties");
            let mut reference: Vec<u32> = reference.iter().map(|&(t, _)| t).collect();
            reference.sort_unstable();
            assert!(reference.len() > NUCLEUS_FIRST_TAKE, "n {n}");
            assert_eq!(fast, reference, "n {n}");
        }
    }

    /// Plain temperature draws in token order: the frequencies still follow
    /// exp(logit / T) (hand-derived: 1 : e : e^2 at T = 1).
    #[test]
    fn plain_temperature_frequencies() {
        let logits = [0.0f32, 1.0, 2.0, f32::NAN, f32::NEG_INFINITY];
        let mut s = sampler(1.0, 0, 1.0, 5);
        let mut seen = [0usize; 5];
        let draws = 40_000;
        for _ in 0..draws {
            seen[s.sample(&logits) as usize] += 1;
        }
        assert_eq!((seen[3], seen[4]), (0, 0));
        let e = std::f64::consts::E;
        let z = 1.0 + e + e * e;
        for (token, weight) in [(0usize, 1.0), (1, e), (2, e * e)] {
            let expected = draws as f64 * weight / z;
            let sd = (expected * (1.0 - weight / z)).sqrt();
            assert!((seen[token] as f64 - expected).abs() < 5.0 * sd, "{seen:?}");
        }
    }

    #[test]
    fn validates_parameters() {
        let bad = [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)];
        for (temperature, top_p) in bad {
            let cfg = SamplingConfig { temperature, top_k: 0, top_p, seed: 0 };
            assert!(matches!(Sampler::new(cfg), Err(InferenceError::BadSampling(_))));
        }
    }
}
