//! Decode passes over weights as one sequential stream per thread.
//!
//! A decode step reads every weight once. Cut into many small chunks shared
//! out by rayon's work stealing, each chunk restarts a thread's stream at a
//! new address (the hardware prefetchers and the kernels' own prefetch start
//! cold) and costs a task. Here a call's rows are cut into exactly one
//! contiguous share per pool thread ([`stream_parts`], by bytes, at multiples
//! of 16 rows), and thread `i` works through share `i` front to back in
//! blocks of about [`STREAM_BLOCK_BYTES`], the last one cut into pieces of
//! halving size ([`share_blocks`]). A thread that finishes early takes
//! blocks from the *back* of another share, smallest first, so a descheduled
//! or slower thread delays the call by at most about one block, and two
//! threads running at the same speed finish within one small piece of each
//! other.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Bytes of weights per block: the unit a thread claims in its share, and
/// that an idle thread takes from another's. The decode kernels read a
/// block as two streams (its two halves), and each block restarts one of
/// them at a new address: on the Intel dev box (session 15, docs/perf/cpu.md)
/// 32 / 64 KiB blocks cost 5.5 / 2.5 ms more I2_S time per 2B-4T token than
/// 256 KiB, and 1 MiB (with [`share_blocks`]' smaller last pieces) about
/// 0.8 ms less.
pub(crate) const STREAM_BLOCK_BYTES: usize = 1024 * 1024;

/// Row granularity of the cuts: 16 `i32`/`f32` outputs are one 64-byte cache line.
const CUT_ROWS: usize = 16;

/// Rows `start..end` of job `job`: one piece of a thread's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) job: usize,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Cuts the concatenation of `jobs` (`(rows, row_bytes)` each, in order) into
/// `n_parts` contiguous shares of about equal bytes. Cuts fall on multiples of
/// [`CUT_ROWS`] rows inside a job (or on a job's end), so two shares never
/// write one cache line of a job's output. Every row of every job is in
/// exactly one share, in order; a share may be empty.
pub(crate) fn stream_parts(jobs: &[(usize, usize)], n_parts: usize) -> Vec<Vec<Segment>> {
    let n_parts = n_parts.max(1);
    let bytes: Vec<u128> = jobs.iter().map(|&(rows, row_bytes)| rows as u128 * row_bytes as u128).collect();
    let total: u128 = bytes.iter().sum();
    // Cut `t` as (job, row), non-decreasing in t.
    let mut cuts = Vec::with_capacity(n_parts + 1);
    cuts.push((0usize, 0usize));
    for t in 1..n_parts {
        let target = total * t as u128 / n_parts as u128;
        let mut before = 0u128;
        let mut cut = (jobs.len(), 0);
        for (j, (&(rows, row_bytes), &b)) in jobs.iter().zip(&bytes).enumerate() {
            if b > 0 && target < before + b {
                let local = ((target - before) / row_bytes as u128) as usize;
                let rounded = (local + CUT_ROWS / 2) / CUT_ROWS * CUT_ROWS;
                cut = (j, rounded.min(rows));
                break;
            }
            before += b;
        }
        cuts.push(cut);
    }
    cuts.push((jobs.len(), 0));
    cuts.windows(2)
        .map(|w| {
            let ((ja, ra), (jb, rb)) = (w[0], w[1]);
            (ja..jobs.len().min(jb + 1))
                .filter_map(|j| {
                    let start = if j == ja { ra } else { 0 };
                    let end = if j == jb { rb } else { jobs[j].0 };
                    (end > start).then_some(Segment { job: j, start, end })
                })
                .collect()
        })
        .collect()
}

/// Rows per block for rows of `row_bytes` bytes: about
/// [`STREAM_BLOCK_BYTES`], a multiple of [`CUT_ROWS`], at least [`CUT_ROWS`].
pub(crate) fn block_rows(row_bytes: usize) -> usize {
    (STREAM_BLOCK_BYTES / row_bytes.max(1) / CUT_ROWS).max(1) * CUT_ROWS
}

/// A share's segments cut into blocks in stream order: [`block_rows`] rows
/// each, except that the share's last block is cut again into pieces of
/// halving size (at multiples of [`CUT_ROWS`] rows), so that a thread taking
/// blocks from the back of this share takes small ones first and the two
/// threads finish within about one small piece of each other, where a whole
/// last block would leave one idle for up to a block's time.
pub(crate) fn share_blocks(part: &[Segment], row_bytes: usize) -> Vec<Segment> {
    let rows = block_rows(row_bytes);
    let mut blocks: Vec<Segment> = Vec::new();
    for seg in part {
        for first in (seg.start..seg.end).step_by(rows) {
            blocks.push(Segment { job: seg.job, start: first, end: (first + rows).min(seg.end) });
        }
    }
    if let Some(last) = blocks.pop() {
        let mut start = last.start;
        while last.end - start >= 4 * CUT_ROWS {
            let piece = (last.end - start) / 2 / CUT_ROWS * CUT_ROWS;
            blocks.push(Segment { job: last.job, start, end: start + piece });
            start += piece;
        }
        blocks.push(Segment { job: last.job, start, end: last.end });
    }
    blocks
}

/// Shapes whose cuts [`share_plan`] remembers, per thread.
const PLANS_KEPT: usize = 16;

/// One remembered cut: the jobs' `(rows, row_bytes)`, the thread count, the blocks.
type Plan = (Vec<(usize, usize)>, usize, Rc<[Vec<Segment>]>);

thread_local! {
    static PLANS: RefCell<Vec<Plan>> = const { RefCell::new(Vec::new()) };
}

/// Every share's blocks for `jobs` (`(rows, row_bytes)` each, one row width)
/// on `n_parts` threads: [`stream_parts`], then [`share_blocks`] of each
/// part. A decode step asks for the same few cuts (q/k/v, o, gate/up, down,
/// the head) about 150 times, and computing one cost 2-3.5 us on the dev box
/// (session 32), so the calling thread keeps the last [`PLANS_KEPT`].
pub(crate) fn share_plan(jobs: &[(usize, usize)], n_parts: usize) -> Rc<[Vec<Segment>]> {
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        if let Some((_, _, plan)) = plans.iter().find(|(j, n, _)| j.as_slice() == jobs && *n == n_parts) {
            return Rc::clone(plan);
        }
        let row_bytes = jobs.first().map_or(0, |&(_, b)| b);
        let plan: Rc<[Vec<Segment>]> =
            stream_parts(jobs, n_parts).iter().map(|part| share_blocks(part, row_bytes)).collect();
        if plans.len() == PLANS_KEPT {
            plans.remove(0);
        }
        plans.push((jobs.to_vec(), n_parts, Rc::clone(&plan)));
        plan
    })
}

/// One row-major matrix of `out.len()` rows of `row_len` elements each
/// (`values`), one output per row, cut into one share per thread
/// ([`stream_parts`], by bytes) of blocks of [`block_rows`] rows: each
/// block's elements and its outputs.
pub(crate) fn matrix_shares<'v, 'o, E, T>(
    values: &'v [E],
    row_len: usize,
    out: &'o mut [T],
    threads: usize,
) -> Vec<Vec<(&'v [E], &'o mut [T])>> {
    let row_bytes = row_len * std::mem::size_of::<E>();
    let mut rest = out;
    let mut shares = Vec::with_capacity(threads);
    for part in share_plan(&[(rest.len(), row_bytes)], threads).iter() {
        let mut blocks = Vec::with_capacity(part.len());
        for block in part {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(block.end - block.start);
            rest = tail;
            blocks.push((&values[block.start * row_len..block.end * row_len], mine));
        }
        shares.push(blocks);
    }
    shares
}

/// Runs every block of every share: share `i`'s blocks in order on pool
/// thread `i` (so consecutive calls stream the same rows on the same core),
/// while a thread with nothing left of its own takes the last unclaimed
/// block of another share. Each block runs exactly once; the call returns
/// when all have run.
pub(crate) fn run_shares<B: Send>(shares: Vec<Vec<B>>, work: impl Fn(B) + Sync) {
    // Per share: unclaimed blocks are `front..back`, packed as
    // `back << 32 | front`, claimed with compare-and-swap. Every share's
    // blocks in one list, share `i`'s from `first[i]`.
    let mut bounds = Vec::with_capacity(shares.len());
    let mut first = Vec::with_capacity(shares.len());
    let mut slots: Vec<Mutex<Option<B>>> = Vec::with_capacity(shares.iter().map(Vec::len).sum());
    for share in shares {
        bounds.push(AtomicU64::new((share.len() as u64) << 32));
        first.push(slots.len());
        slots.extend(share.into_iter().map(|b| Mutex::new(Some(b))));
    }
    let claim = |share: usize, from_front: bool| -> Option<usize> {
        let state = &bounds[share];
        let mut cur = state.load(Ordering::Acquire);
        loop {
            let (front, back) = (cur & 0xffff_ffff, cur >> 32);
            if front >= back {
                return None;
            }
            let (next, block) =
                if from_front { ((back << 32) | (front + 1), front) } else { (((back - 1) << 32) | front, back - 1) };
            match state.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(block as usize),
                Err(seen) => cur = seen,
            }
        }
    };
    let run = |share: usize, block: usize| {
        let taken = slots[first[share] + block].lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(b) = taken {
            work(b);
        }
    };
    let n = bounds.len();
    if n == 0 {
        return;
    }
    let drain = |me: usize| {
        if me < n {
            while let Some(block) = claim(me, true) {
                run(me, block);
            }
        }
        for other in (1..=n).map(|d| (me + d) % n) {
            while let Some(block) = claim(other, false) {
                run(other, block);
            }
        }
    };
    super::team::broadcast(|index, _| drain(index));
    // Every block was claimed by some thread before `broadcast` returned;
    // this only matters if the pool had no threads to broadcast to.
    drain(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(job: usize, start: usize, end: usize) -> Segment {
        Segment { job, start, end }
    }

    #[test]
    fn shares_cover_every_row_once_in_order() {
        // q|k|v of 2B-4T on two threads: 3840 rows of 640 bytes, cut at 1920.
        let qkv = [(2560, 640), (640, 640), (640, 640)];
        assert_eq!(
            stream_parts(&qkv, 2),
            vec![vec![seg(0, 0, 1920)], vec![seg(0, 1920, 2560), seg(1, 0, 640), seg(2, 0, 640)]]
        );
        // One job on one thread.
        assert_eq!(stream_parts(&[(2560, 640)], 1), vec![vec![seg(0, 0, 2560)]]);
        // Cuts on multiples of 16 rows: 100 rows in three shares.
        assert_eq!(
            stream_parts(&[(100, 32)], 3),
            vec![vec![seg(0, 0, 32)], vec![seg(0, 32, 64)], vec![seg(0, 64, 100)]]
        );
        // More shares than 16-row pieces: some shares are empty.
        let tiny = stream_parts(&[(20, 32)], 4);
        assert_eq!(tiny.iter().flatten().map(|s| s.end - s.start).sum::<usize>(), 20);
        assert!(tiny.iter().any(Vec::is_empty));
        // Empty jobs are skipped; a zero-byte group gives empty shares.
        assert_eq!(stream_parts(&[(0, 640), (32, 640)], 2), vec![vec![seg(1, 0, 16)], vec![seg(1, 16, 32)]]);
        assert_eq!(stream_parts(&[(0, 640)], 2), vec![vec![], vec![]]);
    }

    #[test]
    fn shares_are_balanced_by_bytes_and_disjoint() {
        for threads in 1..=9 {
            for jobs in [
                vec![(6912, 640), (6912, 640)],
                vec![(2560, 1728)],
                vec![(2560, 640), (640, 640), (640, 640)],
                vec![(17, 32), (100, 64)],
            ] {
                let parts = stream_parts(&jobs, threads);
                assert_eq!(parts.len(), threads);
                let mut next = vec![0usize; jobs.len()];
                let mut last_job = 0;
                for seg in parts.iter().flatten() {
                    assert!(seg.job >= last_job, "shares out of order");
                    last_job = seg.job;
                    assert_eq!(seg.start, next[seg.job], "gap or overlap in job {}", seg.job);
                    assert!(seg.start.is_multiple_of(CUT_ROWS), "cut inside a cache line");
                    next[seg.job] = seg.end;
                }
                assert_eq!(next, jobs.iter().map(|j| j.0).collect::<Vec<_>>());
                let total: usize = jobs.iter().map(|(r, b)| r * b).sum();
                let slack = CUT_ROWS * jobs.iter().map(|j| j.1).max().unwrap() * 2;
                for part in &parts {
                    let bytes: usize = part.iter().map(|s| (s.end - s.start) * jobs[s.job].1).sum();
                    assert!(bytes.abs_diff(total / threads) <= slack, "{threads} threads, {jobs:?}: {bytes} bytes");
                }
            }
        }
    }

    #[test]
    fn every_block_runs_exactly_once_on_any_pool() {
        use std::sync::atomic::AtomicUsize;
        // Uneven shares (one empty, one long), more or fewer than the threads.
        for sizes in [vec![0usize, 40], vec![7, 1, 30], vec![5], vec![3, 3, 3, 3, 3, 3]] {
            for threads in [1, 2, 3, 5] {
                let counts: Vec<Vec<AtomicUsize>> =
                    sizes.iter().map(|&n| (0..n).map(|_| AtomicUsize::new(0)).collect()).collect();
                let shares: Vec<Vec<(usize, usize)>> =
                    sizes.iter().enumerate().map(|(s, &n)| (0..n).map(|b| (s, b)).collect()).collect();
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| run_shares(shares, |(s, b)| _ = counts[s][b].fetch_add(1, Ordering::Relaxed)));
                for (s, share) in counts.iter().enumerate() {
                    for (b, c) in share.iter().enumerate() {
                        assert_eq!(c.load(Ordering::Relaxed), 1, "sizes {sizes:?}, {threads} threads, block {s}.{b}");
                    }
                }
            }
        }
        run_shares(Vec::<Vec<usize>>::new(), |_| unreachable!("no blocks"));
    }

    /// The remembered cuts are the cuts: every shape asked for, again after
    /// more than [`PLANS_KEPT`] other shapes pushed it out, gives what
    /// [`stream_parts`] and [`share_blocks`] give.
    #[test]
    fn share_plans_equal_fresh_cuts() {
        let fresh = |jobs: &[(usize, usize)], n: usize| -> Vec<Vec<Segment>> {
            let row_bytes = jobs.first().map_or(0, |&(_, b)| b);
            stream_parts(jobs, n).iter().map(|part| share_blocks(part, row_bytes)).collect()
        };
        let shapes: Vec<(Vec<(usize, usize)>, usize)> = (0..2 * PLANS_KEPT)
            .map(|i| (vec![(2560 + 16 * i, 640), (640, 640), (640, 640)], 1 + i % 5))
            .chain([
                (vec![(6912, 640), (6912, 640)], 16),
                (vec![(6912, 640), (6912, 640)], 8),
                (vec![(2560, 1728)], 2),
                (vec![], 3),
            ])
            .collect();
        for _ in 0..2 {
            for (jobs, n) in &shapes {
                assert_eq!(share_plan(jobs, *n).to_vec(), fresh(jobs, *n), "{jobs:?} on {n}");
                assert_eq!(share_plan(jobs, *n).to_vec(), fresh(jobs, *n), "{jobs:?} on {n}, remembered");
            }
        }
    }

    #[test]
    fn share_blocks_cover_the_share_in_order_with_a_halving_tail() {
        // An I2_S gate|up share of 2B-4T on two threads: 6912 rows of 640 bytes.
        let part = stream_parts(&[(6912, 640), (6912, 640)], 2).remove(0);
        let blocks = share_blocks(&part, 640);
        let sizes: Vec<usize> = blocks.iter().map(|b| b.end - b.start).collect();
        // Four whole blocks of 1632 rows, then the last 6912 - 4 * 1632 = 384
        // rows halved at multiples of 16 while at least 64 remain: 192, 96, 48, 48.
        assert_eq!(sizes, vec![1632, 1632, 1632, 1632, 192, 96, 48, 48]);
        let mut next = 0;
        for b in &blocks {
            assert_eq!((b.job, b.start), (0, next));
            assert!(b.start.is_multiple_of(CUT_ROWS));
            next = b.end;
        }
        assert_eq!(next, 6912);
        // A share spanning jobs (q|k|v's second share): the pieces come from its last job.
        let part = stream_parts(&[(2560, 640), (640, 640), (640, 640)], 2).remove(1);
        let blocks = share_blocks(&part, 640);
        let tail: Vec<(usize, usize, usize)> = blocks.iter().map(|b| (b.job, b.start, b.end)).collect();
        // v's 640 rows: 320, 160, 80, 32 (half of 80 rounded down to 16), then the last 48.
        assert_eq!(
            tail,
            vec![(0, 1920, 2560), (1, 0, 640), (2, 0, 320), (2, 320, 480), (2, 480, 560), (2, 560, 592), (2, 592, 640)]
        );
        // Small and empty shares.
        assert_eq!(share_blocks(&[seg(0, 0, 48)], 640), vec![seg(0, 0, 48)]);
        assert_eq!(share_blocks(&[seg(0, 16, 80)], 640), vec![seg(0, 16, 48), seg(0, 48, 80)]);
        assert!(share_blocks(&[], 640).is_empty());
    }

    #[test]
    fn blocks_are_whole_cache_lines_of_output() {
        assert_eq!(block_rows(640), 1632);
        assert_eq!(block_rows(5120), 192);
        assert_eq!(block_rows(1 << 20), CUT_ROWS);
        assert_eq!(block_rows(0) % CUT_ROWS, 0);
    }
}
