//! The CPU backend against the reference forward pass, and batching invariants.

mod common;

use common::pearson;
use std::io::Write;
use std::sync::Arc;

use bitnet_inference::{
    argmax, Backend, CpuBackend, CpuBackendConfig, HeadPrecision, KvCachePrecision, LogitsMode, ReferenceBackend,
    ReferenceForward, StepInput,
};
use bitnet_kernels::cpu::CpuKernel;
use bitnet_models::synthetic::{self, Preset};

fn backend(model: &Arc<bitnet_models::BitNetModel>, kernel: CpuKernel) -> CpuBackend {
    CpuBackend::new(model.clone(), &CpuBackendConfig { threads: 2, kernel: Some(kernel), ..Default::default() })
        .unwrap()
}

/// Teacher-forced logits of every position, one token per step (decode path).
fn decode_logits(b: &mut dyn Backend, seq: u64, tokens: &[u32]) -> Vec<Vec<f32>> {
    b.add_sequence(seq, tokens.len()).unwrap();
    tokens.iter().map(|&t| b.step(&[StepInput { seq, tokens: &[t] }]).unwrap().remove(0)).collect()
}

#[test]
fn cpu_backend_tracks_the_reference_on_every_kernel() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 21).unwrap());
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 500).collect();
    let forward = ReferenceForward::new(&model);
    let reference = forward.forward(&tokens, &mut forward.new_cache(), LogitsMode::All).unwrap();
    let vocab = model.config.vocab_size;
    let mut checked = 0;
    for kernel in CpuKernel::all_available() {
        let mut b = backend(&model, kernel);
        let ours = decode_logits(&mut b, 1, &tokens);
        let mut top1 = 0;
        for (pos, logits) in ours.iter().enumerate() {
            let want = &reference[pos * vocab..(pos + 1) * vocab];
            let r = pearson(logits, want);
            assert!(r > 0.999, "{}: position {pos}: Pearson {r}", kernel.name());
            top1 += usize::from(argmax(logits) == argmax(want));
        }
        assert!(top1 >= tokens.len() - 1, "{}: top-1 agreement {top1}/{}", kernel.name(), tokens.len());
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn prefill_in_one_step_equals_decoding_token_by_token() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 22).unwrap());
    let tokens: Vec<u32> = (0..10).map(|i| (i * 53 + 3) % 500).collect();
    let mut a = backend(&model, CpuKernel::Scalar);
    let step_by_step = decode_logits(&mut a, 1, &tokens);
    let mut b = backend(&model, CpuKernel::Scalar);
    b.add_sequence(7, tokens.len()).unwrap();
    let prefill = b.step(&[StepInput { seq: 7, tokens: &tokens }]).unwrap();
    // Every row is computed independently of the others in the step: exact equality.
    assert_eq!(prefill[0], *step_by_step.last().unwrap());
}

/// The AMX kernel differs from the AVX-512 one only in how the integer
/// products of passes of 16 or more tokens are summed (exactly, on tiles), so
/// every logit of a prefill, a batch of prefills and the decode steps after
/// them must be the same bits. `small` has widths 512 and 1536, which the
/// tiles take.
#[test]
fn amx_prefill_gives_the_avx512_kernels_bits() {
    if !CpuKernel::Amx.is_available() {
        // Past the harness's capture, so the skip shows in every run.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: amx not available on this CPU (amx_prefill_gives_the_avx512_kernels_bits)"
        );
        return;
    }
    let model = Arc::new(synthetic::generate(Preset::Small, 23).unwrap());
    let prompts: Vec<Vec<u32>> = [40usize, 24, 17]
        .iter()
        .enumerate()
        .map(|(s, &len)| (0..len as u32).map(|i| (i * 61 + 7 + s as u32 * 101) % 4096).collect())
        .collect();
    let run = |kernel: CpuKernel| {
        let mut b = backend(&model, kernel);
        let mut logits = Vec::new();
        // One long prompt alone, then two together (41 rows in one pass), then decode steps.
        b.add_sequence(0, 64).unwrap();
        logits.extend(b.step(&[StepInput { seq: 0, tokens: &prompts[0] }]).unwrap());
        b.add_sequence(1, 64).unwrap();
        b.add_sequence(2, 64).unwrap();
        let batch = [StepInput { seq: 1, tokens: &prompts[1] }, StepInput { seq: 2, tokens: &prompts[2] }];
        logits.extend(b.step(&batch).unwrap());
        for t in 0..4u32 {
            let tokens = [[t + 1], [t + 2], [t + 3]];
            let step: Vec<StepInput<'_>> =
                tokens.iter().enumerate().map(|(s, tok)| StepInput { seq: s as u64, tokens: tok }).collect();
            logits.extend(b.step(&step).unwrap());
        }
        logits
    };
    let (amx, avx512) = (run(CpuKernel::Amx), run(CpuKernel::Avx512Vnni));
    assert_eq!(amx.len(), avx512.len());
    for (i, (a, b)) in amx.iter().zip(&avx512).enumerate() {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "logits row {i} differ");
    }
}

#[test]
fn batch_composition_does_not_change_results() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 23).unwrap());
    let kernel = CpuKernel::all_available().into_iter().last().unwrap();
    let prompts: [&[u32]; 3] = [&[1, 2, 3, 4], &[9, 8], &[100, 200, 300, 400, 500, 7]];
    // Alone.
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut b = backend(&model, kernel);
        b.add_sequence(i as u64, 16).unwrap();
        let first = b.step(&[StepInput { seq: i as u64, tokens: p }]).unwrap().remove(0);
        let next = argmax(&first);
        let second = b.step(&[StepInput { seq: i as u64, tokens: &[next] }]).unwrap().remove(0);
        alone.push((first, second));
    }
    // Together: all prefills in one step, then all decodes in one step.
    let mut b = backend(&model, kernel);
    for i in 0..3 {
        b.add_sequence(i, 16).unwrap();
    }
    let batch: Vec<StepInput<'_>> =
        prompts.iter().enumerate().map(|(i, p)| StepInput { seq: i as u64, tokens: p }).collect();
    let firsts = b.step(&batch).unwrap();
    let nexts: Vec<[u32; 1]> = firsts.iter().map(|l| [argmax(l)]).collect();
    let batch: Vec<StepInput<'_>> =
        nexts.iter().enumerate().rev().map(|(i, t)| StepInput { seq: i as u64, tokens: t }).collect();
    let mut seconds = b.step(&batch).unwrap();
    seconds.reverse();
    for i in 0..3 {
        assert_eq!(firsts[i], alone[i].0, "prefill of sequence {i}");
        assert_eq!(seconds[i], alone[i].1, "decode of sequence {i}");
    }
}

/// Every output is computed by the same operations in the same order
/// whichever thread computes it, so the logits are the same bits on any
/// number of threads: one thread (no team), and pools whose other threads
/// are held as a team for the step's parallel calls (some of them rayon's
/// own, in the batched steps). A call index run twice or not at all, or a
/// result read before its index finished, changes bits here.
#[test]
fn logits_do_not_depend_on_the_thread_count() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 26).unwrap());
    // A long prompt too: steps of many rows split their per-row work (norms,
    // rescaling, RoPE, residual adds) over the threads.
    let long: Vec<u32> = (0..40).map(|i| (i * 13 + 2) % 500).collect();
    let prompts: [&[u32]; 3] = [&[5, 6, 7, 8, 9], &[40, 41], &long];
    // The scalar kernel and the best one.
    for kernel in [CpuKernel::Scalar, CpuKernel::all_available()[0]] {
        same_logits_on_any_thread_count(&model, kernel, &prompts);
    }
}

fn same_logits_on_any_thread_count(model: &Arc<bitnet_models::BitNetModel>, kernel: CpuKernel, prompts: &[&[u32]; 3]) {
    let run = |threads: usize| -> Vec<Vec<f32>> {
        let config = CpuBackendConfig { threads, kernel: Some(kernel), ..Default::default() };
        let mut b = CpuBackend::new(model.clone(), &config).unwrap();
        assert_eq!(b.threads(), threads);
        let mut out = Vec::new();
        for i in 0..3u64 {
            b.add_sequence(i, 64).unwrap();
        }
        let batch: Vec<StepInput<'_>> =
            prompts.iter().enumerate().map(|(i, p)| StepInput { seq: i as u64, tokens: p }).collect();
        out.extend(b.step(&batch).unwrap());
        // Decode: one sequence alone (the team's calls), then all three.
        for _ in 0..20 {
            let next = [argmax(out.last().unwrap())];
            out.extend(b.step(&[StepInput { seq: 0, tokens: &next }]).unwrap());
        }
        for _ in 0..4 {
            let nexts: Vec<[u32; 1]> = out[out.len() - 3..].iter().map(|l| [argmax(l)]).collect();
            let batch: Vec<StepInput<'_>> =
                nexts.iter().enumerate().map(|(i, t)| StepInput { seq: i as u64, tokens: t }).collect();
            out.extend(b.step(&batch).unwrap());
        }
        out
    };
    let one = run(1);
    for threads in [2, 3, 4, 5, 8] {
        let many = run(threads);
        assert_eq!(many.len(), one.len());
        for (step, (a, b)) in one.iter().zip(&many).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{kernel}, {threads} threads: logits {step} differ from one thread's"
            );
        }
    }
}

#[test]
fn failed_steps_leave_sequences_untouched_and_errors_match_the_reference() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 24).unwrap());
    let mut cpu = backend(&model, CpuKernel::Scalar);
    let mut reference = ReferenceBackend::new(model.clone());
    for b in [&mut cpu as &mut dyn Backend, &mut reference] {
        b.add_sequence(1, 4).unwrap();
    }
    let bad: [&[u32]; 3] = [&[], &[1, 2, 3, 4, 5], &[100_000]];
    for tokens in bad {
        let batch = [StepInput { seq: 1, tokens }];
        assert_eq!(cpu.step(&batch).unwrap_err(), reference.step(&batch).unwrap_err());
        assert_eq!(cpu.sequence_len(1), Some(0));
    }
    assert!(cpu.add_sequence(2, 1_000_000).is_err());
}

/// Per position, `ours` against the reference logits (`[positions, vocab]`):
/// asserts Pearson > `min_r`; returns the positions whose top-1 token agrees
/// with the reference and those whose logits differ from `other`'s.
fn agreement(
    ours: &[Vec<f32>],
    other: &[Vec<f32>],
    reference: &[f32],
    vocab: usize,
    min_r: f64,
    what: &str,
) -> (usize, usize) {
    let (mut top1, mut differing) = (0, 0);
    for (pos, logits) in ours.iter().enumerate() {
        let want = &reference[pos * vocab..(pos + 1) * vocab];
        let r = pearson(logits, want);
        assert!(r > min_r, "{what}: position {pos}: Pearson {r}");
        top1 += usize::from(argmax(logits) == argmax(want));
        differing += usize::from(logits != &other[pos]);
    }
    (top1, differing)
}

#[test]
fn int8_head_tracks_the_reference_and_differs_from_the_native_head() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 25).unwrap());
    let tokens: Vec<u32> = (0..24).map(|i| (i * 41 + 5) % 500).collect();
    let forward = ReferenceForward::new(&model);
    let reference = forward.forward(&tokens, &mut forward.new_cache(), LogitsMode::All).unwrap();
    let vocab = model.config.vocab_size;
    let kernel = CpuKernel::all_available()[0];
    let config = CpuBackendConfig { threads: 2, kernel: Some(kernel), head: HeadPrecision::Int8, ..Default::default() };
    let mut int8 = CpuBackend::new(model.clone(), &config).unwrap();
    assert_eq!(int8.head_precision(), HeadPrecision::Int8);
    assert!(int8.info().detail.ends_with("int8 head"), "{}", int8.info().detail);
    // One byte per weight plus one f32 scale per row, against the file's f16 or f32.
    let head = model.head();
    assert_eq!(int8.head_bytes(), head.rows() * head.cols() + head.rows() * 4);
    let mut native = backend(&model, kernel);
    assert_eq!(native.head_precision(), HeadPrecision::Native);
    assert_eq!(native.head_bytes(), head.bytes().len());
    assert!(!native.info().detail.contains("int8"));

    let ours = decode_logits(&mut int8, 1, &tokens);
    let theirs = decode_logits(&mut native, 1, &tokens);
    let (top1, differing) = agreement(&ours, &theirs, &reference, vocab, 0.99, "int8 head");
    assert!(top1 + 2 >= tokens.len(), "top-1 agreement {top1}/{}", tokens.len());
    assert_eq!(differing, tokens.len(), "the int8 head gave the native head's logits");
}

#[test]
fn f16_kv_cache_tracks_the_reference_and_differs_from_the_f32_cache() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 26).unwrap());
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 500).collect();
    let forward = ReferenceForward::new(&model);
    let reference = forward.forward(&tokens, &mut forward.new_cache(), LogitsMode::All).unwrap();
    let vocab = model.config.vocab_size;
    for kernel in CpuKernel::all_available() {
        let config = CpuBackendConfig {
            threads: 2,
            kernel: Some(kernel),
            kv_cache: KvCachePrecision::F16,
            ..Default::default()
        };
        let mut f16 = CpuBackend::new(model.clone(), &config).unwrap();
        assert_eq!(f16.kv_cache_precision(), KvCachePrecision::F16);
        assert!(f16.info().detail.contains("f16 KV cache"), "{}", f16.info().detail);
        let mut f32 = backend(&model, kernel);
        assert_eq!(f32.kv_cache_precision(), KvCachePrecision::F32);
        // One token a step: every position after the first reads keys and
        // values the cache rounded to f16.
        let ours = decode_logits(&mut f16, 1, &tokens);
        let theirs = decode_logits(&mut f32, 1, &tokens);
        let (top1, differing) = agreement(&ours, &theirs, &reference, vocab, 0.999, kernel.name());
        assert!(top1 + 1 >= tokens.len(), "{kernel:?}: top-1 agreement {top1}/{}", tokens.len());
        assert!(differing > 0, "{kernel:?}: the f16 cache gave the f32 cache's logits");
    }
    assert_eq!("f16".parse::<KvCachePrecision>(), Ok(KvCachePrecision::F16));
    assert!("bf16".parse::<KvCachePrecision>().unwrap_err().contains("expected f32 or f16"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Random sequences of adds, removes and batched steps (valid and not:
    /// unknown or repeated sequences, empty inputs, tokens past the
    /// vocabulary, reservations overrun) give the CPU backend the reference
    /// backend's answers: the same errors, the same sequence lengths after
    /// every operation, and logits that track the reference's.
    #[test]
    fn random_operations_match_the_reference_backend(ops in common::ops::case()) {
        let model = common::ops::model();
        let mut cpu = CpuBackend::new(model.clone(), &CpuBackendConfig { threads: 1, ..Default::default() }).unwrap();
        common::ops::check(&mut cpu, &ops, 0.999)?;
    }
}

/// A sequence started from a copy of another's first positions continues
/// with the same bits as one that ran them itself: the reference backend,
/// and the CPU backend on every kernel with either KV-cache precision.
#[test]
fn copied_prefixes_continue_bit_for_bit() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 26).unwrap());
    common::prefix::check(&mut ReferenceBackend::new(model.clone()), "reference");
    for kernel in CpuKernel::all_available() {
        for kv_cache in [KvCachePrecision::F32, KvCachePrecision::F16] {
            let config = CpuBackendConfig { threads: 2, kernel: Some(kernel), kv_cache, ..Default::default() };
            let mut b = CpuBackend::new(model.clone(), &config).unwrap();
            common::prefix::check(&mut b, &format!("{} kernel, {} KV cache", kernel.name(), kv_cache.name()));
        }
    }
}

/// Phase timing changes no result, counts the steps it timed, and its
/// phases, which partition each step, sum to no more than the steps took.
#[test]
fn phase_timing_partitions_the_steps_and_changes_nothing() {
    let model = Arc::new(synthetic::generate(Preset::Tiny, 24).unwrap());
    let kernel = CpuKernel::Portable;
    let mut plain = backend(&model, kernel);
    let mut timed = backend(&model, kernel);
    assert_eq!(timed.take_phase_times(), None, "off until asked for");
    let prompt = [1u32, 5, 9, 2];
    for b in [&mut plain, &mut timed] {
        b.add_sequence(0, 16).unwrap();
        b.step(&[StepInput { seq: 0, tokens: &prompt }]).unwrap();
    }
    timed.time_phases();
    let start = std::time::Instant::now();
    for token in [3u32, 4, 7] {
        let a = plain.step(&[StepInput { seq: 0, tokens: &[token] }]).unwrap();
        let b = timed.step(&[StepInput { seq: 0, tokens: &[token] }]).unwrap();
        assert_eq!(a, b);
    }
    let elapsed = start.elapsed();
    let times = timed.take_phase_times().expect("timed since time_phases");
    assert_eq!(times.steps, 3);
    assert!(times.total() <= elapsed, "{times:?} in {elapsed:?}");
    for (name, d) in times.phases() {
        assert!(!d.is_zero(), "{name} was never timed: {times:?}");
    }
    assert_eq!(timed.take_phase_times(), None, "taking stops the timing");
}
