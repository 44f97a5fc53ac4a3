//! Decode products run over their rows by the pool's threads, each row
//! claimed at run time by exactly one thread.
//!
//! A decode step reads every weight once, in about 150 parallel calls of
//! 1.6-9 MB each (2B-4T). Each call's rows are cut into one contiguous share
//! per thread (`stream::stream_parts`); the owner of a share reads it front
//! to back as one stream, in runs it claims as it goes, and a thread that
//! is done claims runs from the back of the share with the most rows left
//! ([`run_rows`]). Which thread writes which output rows is so known only
//! when a run is claimed. Cutting `&mut` slices for fixed blocks beforehand
//! (the previous scheme) cost an allocation and a lock per block on the
//! calling thread, and fixed blocks cannot follow a slow thread: on the
//! H200 host's 16 vCPUs (session 33, docs/perf/cpu.md) threads reading equal
//! shares of a 1.64 MB product took 12.4 us at the median and 17.7 at the
//! slowest, and with 1 MiB blocks whose last one was halved into pieces the
//! slowest owner still finished its own blocks at 16.9 us against the
//! fastest's 10.6 (medians of 600 calls). So the outputs are kept as raw
//! pointers ([`SharedRows`]) and a claimed run becomes slices in its
//! claimant's hands: `unsafe` is that one step, sound because a claim is a
//! compare-and-swap that moves a share's front or back past the run.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::stream::{stream_parts, CUT_ROWS, STREAM_BLOCK_BYTES};

/// Plans [`row_plan`] remembers, per thread.
const PLANS_KEPT: usize = 16;

/// Each job's output (`tokens` rows of `rows[job]` values each, token after
/// token), mutably borrowed for `'o` and written through claimed row ranges.
pub(crate) struct SharedRows<'o, T> {
    /// Per job: the output's first element and the job's rows.
    jobs: Vec<(*mut T, usize)>,
    tokens: usize,
    _out: PhantomData<&'o mut [T]>,
}

// SAFETY: a `SharedRows` is a mutable borrow of `T`s split among threads; a
// thread gets a `&mut` to rows only through `rows`, whose contract is that
// no other live slice covers them, so sending or sharing it across threads
// is sharing `&mut [T]`s of disjoint rows, which is sound for `T: Send`.
unsafe impl<T: Send> Send for SharedRows<'_, T> {}
// SAFETY: as for `Send` above.
unsafe impl<T: Send> Sync for SharedRows<'_, T> {}

impl<'o, T> SharedRows<'o, T> {
    /// `outs[j]` is job `j`'s output, `tokens * jobs[j].0` values (`jobs`
    /// as [`run_rows`] takes them: `(rows, row_bytes)`).
    ///
    /// # Panics
    /// When the lengths disagree (a caller's bug: the public functions check
    /// their shapes before this).
    pub(crate) fn new(outs: &'o mut [&mut [T]], jobs: &[(usize, usize)], tokens: usize) -> Self {
        assert_eq!(outs.len(), jobs.len(), "one output per job");
        let jobs = outs
            .iter_mut()
            .zip(jobs)
            .map(|(out, &(r, _))| {
                assert_eq!(Some(out.len()), r.checked_mul(tokens), "an output of tokens * rows values");
                (out.as_mut_ptr(), r)
            })
            .collect();
        SharedRows { jobs, tokens, _out: PhantomData }
    }

    /// Token `token`'s outputs for rows `range` of job `job`.
    ///
    /// # Safety
    /// No other slice returned by this method for the same job and token and
    /// an overlapping range may be alive while this one is.
    ///
    /// # Panics
    /// When `job`, `token` or `range` are out of bounds.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn rows(&self, job: usize, token: usize, range: Range<usize>) -> &mut [T] {
        let (base, rows) = self.jobs[job];
        assert!(token < self.tokens && range.start <= range.end && range.end <= rows, "rows out of bounds");
        // SAFETY: `base` points at `tokens * rows` values borrowed mutably
        // for `'o` (checked in `new`); `token * rows + range.end` is within
        // them (asserted above), and the caller guarantees that no other
        // live slice overlaps these rows.
        unsafe { std::slice::from_raw_parts_mut(base.add(token * rows + range.start), range.end - range.start) }
    }
}

/// The least a claim takes: at least about 16 KiB of weights (and at least
/// [`CUT_ROWS`] rows), about 2 us of reading for one of 16 threads on the
/// H200 host (session 33).
const MIN_CLAIM_BYTES: usize = 16 * 1024;

/// The most a claim takes: about [`STREAM_BLOCK_BYTES`].
const MAX_CLAIM_BYTES: usize = STREAM_BLOCK_BYTES;

/// A claim takes this fraction (1 / n) of what is left of the share, from
/// its front (the owner) or its back (a thread that finished its own).
const CLAIM_DIVISOR: usize = 2;

/// Tokens a [`run_rows`] call serves at most.
pub(crate) const MAX_TOKENS: usize = 4;

/// A call's rows as one space: job `j` is rows `offsets[j]..offsets[j + 1]`,
/// share `i` rows `shares[i].0..shares[i].1`.
#[derive(Debug, PartialEq, Eq)]
struct RowPlan {
    offsets: Vec<usize>,
    shares: Vec<(usize, usize)>,
}

impl RowPlan {
    /// One contiguous share per part, of about equal bytes ([`stream_parts`]).
    fn new(jobs: &[(usize, usize)], n_parts: usize) -> RowPlan {
        let mut offsets = Vec::with_capacity(jobs.len() + 1);
        offsets.push(0usize);
        for &(rows, _) in jobs {
            offsets.push(offsets.last().copied().unwrap_or(0) + rows);
        }
        let mut at = 0;
        let shares = stream_parts(jobs, n_parts)
            .iter()
            .map(|part| match (part.first(), part.last()) {
                (Some(first), Some(last)) => {
                    at = offsets[last.job] + last.end;
                    (offsets[first.job] + first.start, at)
                }
                _ => (at, at),
            })
            .collect();
        RowPlan { offsets, shares }
    }

    /// The job holding row `row` (a row of some job).
    fn job_of(&self, row: usize) -> usize {
        self.offsets[1..].iter().position(|&end| row < end).unwrap_or(self.offsets.len().saturating_sub(2))
    }
}

/// A remembered plan: the jobs' `(rows, row_bytes)`, the thread count, the plan.
type KeptPlan = (Vec<(usize, usize)>, usize, Rc<RowPlan>);

thread_local! {
    /// The last [`PLANS_KEPT`] plans made on this thread.
    static PLANS: RefCell<Vec<KeptPlan>> = const { RefCell::new(Vec::new()) };
}

/// [`RowPlan::new`], remembered: a decode step asks for the same few plans
/// (q/k/v, o, gate/up, down, the head) about 150 times.
fn row_plan(jobs: &[(usize, usize)], n_parts: usize) -> Rc<RowPlan> {
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        if let Some((_, _, plan)) = plans.iter().find(|(j, n, _)| j.as_slice() == jobs && *n == n_parts) {
            return Rc::clone(plan);
        }
        let plan = Rc::new(RowPlan::new(jobs, n_parts));
        if plans.len() == PLANS_KEPT {
            plans.remove(0);
        }
        plans.push((jobs.to_vec(), n_parts, Rc::clone(&plan)));
        plan
    })
}

/// An atomic in a cache line of its own.
#[repr(align(128))]
struct Padded<T>(T);

/// Runs `work(job, rows, outs)` over every row of `jobs` (`(rows, row_bytes)`
/// each, all of one row width) on the current pool's threads, each row
/// once; `outs[t]` is token `t`'s outputs for those rows of the job.
/// `outputs[j]` holds job `j`'s outputs, `tokens` runs of its `rows` values,
/// token after token.
///
/// The rows, as one space, are cut into one contiguous share per thread
/// ([`stream_parts`]). Thread `i` claims runs from the front of share `i`,
/// so it reads its share as one stream; a thread whose share is done claims
/// runs from the back of whichever share has the most rows left. Each claim
/// takes half of what is left of the share (at most ~1 MiB, at least
/// ~16 KiB), so a slow or descheduled thread delays the call by about the
/// run it holds, threads finish within about one small run of each other,
/// and a share is cut into no more runs than that needs. A
/// run never spans two jobs, and starts on a multiple of [`CUT_ROWS`] rows
/// of its job (so two threads never write one cache line of `i32` or `f32`
/// outputs) or at a job's start.
///
/// # Panics
/// When `tokens > MAX_TOKENS`, an output's length is not `tokens * rows`, or
/// the rows together pass `u32::MAX` (callers check their shapes first).
pub(crate) fn run_rows<T: Send>(
    jobs: &[(usize, usize)],
    outputs: &mut [&mut [T]],
    tokens: usize,
    work: impl Fn(usize, Range<usize>, &mut [&mut [T]]) + Sync,
) {
    assert!(tokens <= MAX_TOKENS, "at most {MAX_TOKENS} tokens a call");
    let out = SharedRows::new(outputs, jobs, tokens);
    let plan = row_plan(jobs, rayon::current_num_threads());
    let plan = &*plan;
    let total = plan.offsets.last().copied().unwrap_or(0);
    assert!(u32::try_from(total).is_ok(), "at most u32::MAX rows a call");
    if total == 0 {
        return;
    }
    let row_bytes = jobs.first().map_or(1, |j| j.1.max(1));
    let claim_rows = |bytes: usize| bytes.div_ceil(row_bytes).div_ceil(CUT_ROWS).max(1) * CUT_ROWS;
    let (min_rows, max_rows) = (claim_rows(MIN_CLAIM_BYTES), claim_rows(MAX_CLAIM_BYTES));
    // Per share: unclaimed rows `front..back`, packed as `back << 32 | front`.
    let bounds: Vec<Padded<AtomicU64>> = plan.shares.iter().map(|&(a, b)| Padded(AtomicU64::new(pack(a, b)))).collect();
    // Claims a run of `share` from its front (its owner) or its back.
    let claim = |share: usize, owner: bool| -> Option<Range<usize>> {
        let state = &bounds[share].0;
        let mut cur = state.load(Ordering::Acquire);
        loop {
            let (front, back) = unpack(cur);
            if front >= back {
                return None;
            }
            // Half of what is left, within the bounds, at whole cache lines.
            let want = ((back - front) / CLAIM_DIVISOR / CUT_ROWS * CUT_ROWS).clamp(min_rows, max_rows);
            let run = if owner {
                let job = plan.job_of(front);
                front..(front + want).min(back).min(plan.offsets[job + 1])
            } else {
                let job = plan.job_of(back - 1);
                let local_from = (back - plan.offsets[job]).saturating_sub(want).div_ceil(CUT_ROWS) * CUT_ROWS;
                (plan.offsets[job] + local_from).max(front)..back
            };
            let next = if owner { pack(run.end, back) } else { pack(front, run.start) };
            match state.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(run),
                Err(seen) => cur = seen,
            }
        }
    };
    let run = |rows: Range<usize>| {
        let job = plan.job_of(rows.start);
        let local = rows.start - plan.offsets[job]..rows.end - plan.offsets[job];
        let mut outs: [&mut [T]; MAX_TOKENS] = Default::default();
        for (token, slot) in outs.iter_mut().enumerate().take(tokens) {
            // SAFETY: these rows of this job were claimed by this thread
            // alone: a claim moves a share's front or back past them with
            // one compare-and-swap, bounds only move inward, and shares and
            // jobs do not overlap. The slice is dropped before the next claim.
            *slot = unsafe { out.rows(job, token, local.clone()) };
        }
        work(job, local, &mut outs[..tokens]);
    };
    let n = bounds.len();
    let drain = |me: usize| {
        if me < n {
            while let Some(rows) = claim(me, true) {
                run(rows);
            }
        }
        loop {
            let mut fullest = (0usize, 0usize);
            for (share, state) in bounds.iter().enumerate() {
                let (front, back) = unpack(state.0.load(Ordering::Relaxed));
                if back.saturating_sub(front) > fullest.1 {
                    fullest = (share, back - front);
                }
            }
            if fullest.1 == 0 {
                return;
            }
            if let Some(rows) = claim(fullest.0, false) {
                run(rows);
            }
        }
    };
    super::team::broadcast(|index, _| drain(index));
}

fn pack(front: usize, back: usize) -> u64 {
    ((back as u64) << 32) | front as u64
}

fn unpack(word: u64) -> (usize, usize) {
    ((word & 0xffff_ffff) as usize, (word >> 32) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_address_each_job_and_token() {
        let mut a = vec![0i32; 2 * 3];
        let mut b = vec![0i32; 2 * 5];
        {
            let mut outs: Vec<&mut [i32]> = vec![&mut a, &mut b];
            let shared = SharedRows::new(&mut outs, &[(3, 4), (5, 4)], 2);
            // SAFETY: each slice is dropped before the next is made.
            unsafe {
                shared.rows(0, 1, 1..3).copy_from_slice(&[1, 2]);
                shared.rows(1, 0, 4..5).copy_from_slice(&[3]);
                shared.rows(1, 1, 0..2).copy_from_slice(&[4, 5]);
            }
        }
        assert_eq!(a, [0, 0, 0, 0, 1, 2]);
        assert_eq!(b, [0, 0, 0, 0, 3, 4, 5, 0, 0, 0]);
    }

    #[test]
    #[should_panic(expected = "rows out of bounds")]
    fn rows_past_a_job_panic() {
        let mut a = vec![0i32; 4];
        let mut outs: Vec<&mut [i32]> = vec![&mut a];
        let shared = SharedRows::new(&mut outs, &[(4, 4)], 1);
        // SAFETY: the only slice.
        let _ = unsafe { shared.rows(0, 0, 2..5) };
    }

    /// Each job's outputs, and the runs made.
    type Marked = (Vec<Vec<u32>>, Vec<(usize, Range<usize>)>);

    /// Runs `run_rows` over `jobs` on a pool of `threads` (inside a team
    /// when `team`), each run writing `1 + job * 1_000_000 + token * 100_000 +
    /// row` into its outputs; returns the outputs and the runs `(job, rows)`.
    fn run_marked(jobs: &[(usize, usize)], tokens: usize, threads: usize, team: bool) -> Marked {
        let mut outputs: Vec<Vec<u32>> = jobs.iter().map(|&(rows, _)| vec![0; rows * tokens]).collect();
        let runs = std::sync::Mutex::new(Vec::new());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let _team = team.then(crate::cpu::team::Team::start);
            let mut outs: Vec<&mut [u32]> = outputs.iter_mut().map(|o| &mut o[..]).collect();
            run_rows(jobs, &mut outs, tokens, |job, rows, outs| {
                assert_eq!(outs.len(), tokens);
                for (token, out) in outs.iter_mut().enumerate() {
                    assert_eq!(out.len(), rows.len());
                    for (value, row) in out.iter_mut().zip(rows.clone()) {
                        assert_eq!(*value, 0, "row {row} of job {job} written twice");
                        *value = (1 + job * 1_000_000 + token * 100_000 + row) as u32;
                    }
                }
                runs.lock().unwrap().push((job, rows));
            });
        });
        (outputs, runs.into_inner().unwrap())
    }

    #[test]
    fn every_row_runs_once_in_runs_within_one_job() {
        let shapes: [&[(usize, usize)]; 6] = [
            &[(2560, 640), (640, 640), (640, 640)],
            &[(6912, 640), (6912, 640)],
            &[(2560, 1728)],
            &[(17, 64), (0, 64), (33, 64)],
            &[(5, 1 << 20)],
            &[(0, 640)],
        ];
        for jobs in shapes {
            for threads in [1, 2, 3, 5, 8] {
                for tokens in 1..=MAX_TOKENS {
                    for team in [false, true] {
                        let (outputs, runs) = run_marked(jobs, tokens, threads, team);
                        for (job, (out, &(rows, _))) in outputs.iter().zip(jobs).enumerate() {
                            for token in 0..tokens {
                                for row in 0..rows {
                                    assert_eq!(
                                        out[token * rows + row] as usize,
                                        1 + job * 1_000_000 + token * 100_000 + row,
                                        "{jobs:?} on {threads} threads, {tokens} tokens: job {job} row {row}"
                                    );
                                }
                            }
                        }
                        for (job, rows) in runs {
                            assert!(!rows.is_empty() && rows.end <= jobs[job].0, "{rows:?} of job {job}");
                            assert!(rows.start % CUT_ROWS == 0, "a run starting inside a cache line: {rows:?}");
                        }
                    }
                }
            }
        }
    }

    /// While the owner of a share holds its first run, the other threads
    /// take everything else of that share: a stalled thread delays a call by
    /// the run it holds, not by its share.
    #[test]
    fn a_stalled_threads_share_is_taken_by_the_others() {
        use std::sync::atomic::AtomicUsize;
        let jobs = [(6912usize, 640usize), (6912, 640)];
        let total = 2 * 6912;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let plan = pool.install(|| RowPlan::new(&jobs, 4));
        let stalled_start = plan.shares[1].0;
        let done = AtomicUsize::new(0);
        let held = AtomicUsize::new(0);
        let others_finished = std::sync::atomic::AtomicBool::new(false);
        let mut a = vec![0i32; 6912];
        let mut b = vec![0i32; 6912];
        pool.install(|| {
            let _team = crate::cpu::team::Team::start();
            run_rows(&jobs, &mut [&mut a, &mut b], 1, |job, rows, _| {
                let global = job * 6912 + rows.start;
                if global == stalled_start {
                    held.store(rows.len(), Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    while done.load(Ordering::SeqCst) < total - rows.len() && std::time::Instant::now() < deadline {
                        std::thread::yield_now();
                    }
                    others_finished.store(done.load(Ordering::SeqCst) == total - rows.len(), Ordering::SeqCst);
                }
                done.fetch_add(rows.len(), Ordering::SeqCst);
            });
        });
        assert!(others_finished.load(Ordering::SeqCst), "the others left rows of the stalled share undone");
        // The stalled run is half the share (its owner's first claim), not all of it.
        let share = plan.shares[1].1 - plan.shares[1].0;
        assert!(held.load(Ordering::SeqCst) <= share / 2 + CUT_ROWS, "held {} of {share}", held.load(Ordering::SeqCst));
    }

    #[test]
    fn plans_cut_shares_on_row_boundaries_in_order() {
        let plan = RowPlan::new(&[(2560, 640), (640, 640), (640, 640)], 2);
        assert_eq!(plan.offsets, vec![0, 2560, 3200, 3840]);
        assert_eq!(plan.shares, vec![(0, 1920), (1920, 3840)]);
        assert_eq!((plan.job_of(0), plan.job_of(2559), plan.job_of(2560), plan.job_of(3839)), (0, 0, 1, 2));
        let plan = RowPlan::new(&[(0, 640), (32, 640)], 4);
        assert_eq!(plan.job_of(0), 1);
        let covered: usize = plan.shares.iter().map(|(a, b)| b - a).sum();
        assert_eq!(covered, 32);
        // Remembered plans are the plans, thread count included.
        for n in [1, 2, 3, 16, 2] {
            assert_eq!(*row_plan(&[(6912, 640), (6912, 640)], n), RowPlan::new(&[(6912, 640), (6912, 640)], n));
        }
    }
}
