//! Helpers shared by the backend tests.

/// Pearson correlation of two equally long slices, in f64.
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let mb = b.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (f64::from(x) - ma, f64::from(y) - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

/// Random operations on a backend, checked against the reference backend
/// (the model-based tests of the CPU and CUDA backends).
pub mod ops {
    use std::sync::{Arc, OnceLock};

    use bitnet_inference::{Backend, ReferenceBackend, StepInput};
    use bitnet_models::synthetic::{self, Preset};
    use bitnet_models::BitNetModel;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    /// Sequence ids the operations use.
    pub const SEQS: u64 = 5;

    /// One operation on a backend.
    #[derive(Debug, Clone)]
    pub enum Op {
        Add {
            seq: u64,
            max_positions: usize,
        },
        Remove {
            seq: u64,
        },
        Step {
            entries: Vec<(u64, Vec<u32>)>,
        },
        /// `Backend::copy_prefix`.
        Copy {
            src: u64,
            dst: u64,
            len: usize,
        },
    }

    /// The tiny synthetic model (seed 25) the operations run on.
    pub fn model() -> Arc<BitNetModel> {
        static MODEL: OnceLock<Arc<BitNetModel>> = OnceLock::new();
        MODEL.get_or_init(|| Arc::new(synthetic::generate(Preset::Tiny, 25).unwrap())).clone()
    }

    fn op() -> impl Strategy<Value = Op> {
        // Sequences 0..3 are added at the start of every case and 3 and 4
        // only by chance; reservations up to 16 positions; one token in 25
        // past the tiny vocabulary of 512, one input in 10 empty.
        let seq = prop_oneof![9 => 0..3u64, 1 => 3..SEQS];
        let token = prop_oneof![24 => 0..512u32, 1 => 512..600u32];
        let tokens = prop_oneof![1 => Just(Vec::new()), 9 => proptest::collection::vec(token, 1..5)];
        prop_oneof![
            2 => (0..SEQS, 0..16usize).prop_map(|(seq, max_positions)| Op::Add { seq, max_positions }),
            1 => (0..SEQS).prop_map(|seq| Op::Remove { seq }),
            6 => proptest::collection::vec((seq, tokens), 1..4).prop_map(|entries| Op::Step { entries }),
            1 => (0..SEQS, 0..SEQS, 0..12usize).prop_map(|(src, dst, len)| Op::Copy { src, dst, len }),
        ]
    }

    /// Adds of sequences 0, 1 and 2, then up to 15 random operations.
    pub fn case() -> impl Strategy<Value = Vec<Op>> {
        (proptest::collection::vec(0..16usize, 3), proptest::collection::vec(op(), 1..16)).prop_map(
            |(reserved, ops)| {
                let adds = reserved
                    .into_iter()
                    .enumerate()
                    .map(|(seq, max_positions)| Op::Add { seq: seq as u64, max_positions });
                adds.chain(ops).collect()
            },
        )
    }

    /// Runs `ops` on `ours` and on a fresh reference backend: the same
    /// errors, the same sequence lengths after every operation, and logits
    /// with Pearson above `min_r` against the reference's. Removes every
    /// sequence from `ours` at the end, so one backend can serve many cases.
    pub fn check(ours: &mut dyn Backend, ops: &[Op], min_r: f64) -> Result<(), TestCaseError> {
        let mut reference = ReferenceBackend::new(model());
        let result = run(ours, &mut reference, ops, min_r);
        for seq in 0..SEQS {
            ours.remove_sequence(seq);
        }
        result
    }

    fn run(
        ours: &mut dyn Backend,
        reference: &mut ReferenceBackend,
        ops: &[Op],
        min_r: f64,
    ) -> Result<(), TestCaseError> {
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Add { seq, max_positions } => {
                    prop_assert_eq!(
                        ours.add_sequence(*seq, *max_positions),
                        reference.add_sequence(*seq, *max_positions),
                        "op {}: {:?}",
                        i,
                        op
                    );
                }
                Op::Remove { seq } => {
                    ours.remove_sequence(*seq);
                    reference.remove_sequence(*seq);
                }
                Op::Copy { src, dst, len } => {
                    prop_assert_eq!(
                        ours.copy_prefix(*src, *dst, *len),
                        reference.copy_prefix(*src, *dst, *len),
                        "op {}: {:?}",
                        i,
                        op
                    );
                }
                Op::Step { entries } => {
                    let batch: Vec<StepInput<'_>> =
                        entries.iter().map(|(seq, tokens)| StepInput { seq: *seq, tokens }).collect();
                    match (ours.step(&batch), reference.step(&batch)) {
                        (Ok(got), Ok(want)) => {
                            prop_assert_eq!(got.len(), want.len());
                            for (row, (a, b)) in got.iter().zip(&want).enumerate() {
                                let r = super::pearson(a, b);
                                prop_assert!(r > min_r, "op {}: {:?}: row {}: Pearson {}", i, op, row, r);
                            }
                        }
                        (got, want) => prop_assert_eq!(got.err(), want.err(), "op {}: {:?}", i, op),
                    }
                }
            }
            for seq in 0..SEQS {
                prop_assert_eq!(ours.sequence_len(seq), reference.sequence_len(seq), "op {}: {:?}: seq {}", i, op, seq);
            }
        }
        Ok(())
    }
}

/// `Backend::copy_prefix`: a sequence started from a copy of another's first
/// positions gives the same bits as one that ran those tokens itself, the
/// source is unchanged, and a bad copy is refused without touching anything.
pub mod prefix {
    use bitnet_inference::{Backend, BackendError, StepInput};

    fn bits(rows: &[Vec<f32>]) -> Vec<Vec<u32>> {
        rows.iter().map(|r| r.iter().map(|x| x.to_bits()).collect()).collect()
    }

    /// Runs the checks on `b` (empty, a model with a vocabulary of at least 64).
    pub fn check(b: &mut dyn Backend, what: &str) {
        let vocab = b.config().vocab_size as u32;
        let prompt: Vec<u32> = (0..20).map(|i| (i * 73 + 5) % vocab).collect();
        let step =
            |b: &mut dyn Backend, seq: u64, tokens: &[u32]| b.step(&[StepInput { seq, tokens }]).unwrap().remove(0);
        // The source: the prompt in two steps (13 + 7 tokens), then three decode steps.
        b.add_sequence(100, 40).unwrap();
        step(b, 100, &prompt[..13]);
        step(b, 100, &prompt[13..]);
        let mut held = prompt.clone();
        for t in [7, 8, 9] {
            step(b, 100, &[t]);
            held.push(t);
        }
        let (suffix, next) = ([11u32, 12], [13u32]);
        for len in [0, 1, 12, 13, 22, 23] {
            // Fresh: the held tokens and the suffix in one step, then a decode step.
            b.add_sequence(200, len + 3).unwrap();
            let tokens: Vec<u32> = held[..len].iter().chain(&suffix).copied().collect();
            let fresh = [step(b, 200, &tokens), step(b, 200, &next)];
            // From a copy: only the suffix is run.
            b.add_sequence(201, len + 3).unwrap();
            b.copy_prefix(100, 201, len).unwrap();
            assert_eq!(b.sequence_len(201), Some(len), "{what}: length after a copy of {len}");
            let copied = [step(b, 201, &suffix), step(b, 201, &next)];
            assert!(bits(&fresh) == bits(&copied), "{what}: a copy of {len} positions continues differently");
            b.remove_sequence(200);
            b.remove_sequence(201);
        }
        // The source continues as a sequence that ran all its tokens at once.
        assert_eq!(b.sequence_len(100), Some(held.len()));
        b.add_sequence(202, 40).unwrap();
        step(b, 202, &held);
        let (a, c) = (step(b, 202, &[14]), step(b, 100, &[14]));
        assert!(bits(&[a]) == bits(&[c]), "{what}: copying changed the source");
        // Shrunk to its length, the source holds the same positions, copies
        // from it still continue exactly, and it can grow no further.
        let held_len = held.len() + 1;
        b.shrink_to_fit(100).unwrap();
        assert_eq!(b.sequence_len(100), Some(held_len), "{what}");
        let err = b.step(&[StepInput { seq: 100, tokens: &[15] }]).unwrap_err();
        assert!(matches!(err, BackendError::ReservationExceeded { seq: 100, .. }), "{what}: {err}");
        b.add_sequence(203, held_len + 1).unwrap();
        b.copy_prefix(100, 203, held_len).unwrap();
        let (a, c) = (step(b, 202, &[15]), step(b, 203, &[15]));
        assert!(bits(&[a]) == bits(&[c]), "{what}: a copy from a shrunk sequence continues differently");
        b.remove_sequence(203);
        assert_eq!(b.shrink_to_fit(998).unwrap_err(), BackendError::UnknownSequence(998));
        // Refused copies leave the destination as it was.
        b.add_sequence(300, 5).unwrap();
        step(b, 300, &[1]);
        b.add_sequence(301, 5).unwrap();
        let refused =
            [(100, 300, 1), (100, 301, 6), (100, 301, held_len + 1), (999, 301, 1), (100, 998, 1), (100, 100, 1)];
        for (src, dst, len) in refused {
            let err = b.copy_prefix(src, dst, len).unwrap_err();
            let expected_kind = match (src, dst) {
                (999, _) => matches!(err, BackendError::UnknownSequence(999)),
                (_, 998) => matches!(err, BackendError::UnknownSequence(998)),
                _ => matches!(err, BackendError::PrefixCopy { .. }),
            };
            assert!(expected_kind, "{what}: copy ({src}, {dst}, {len}) gave {err}");
        }
        assert_eq!((b.sequence_len(300), b.sequence_len(301)), (Some(1), Some(0)), "{what}");
        for seq in [100, 202, 300, 301] {
            b.remove_sequence(seq);
        }
    }
}
