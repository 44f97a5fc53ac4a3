//! Decode passes over weights as one sequential stream per thread.
//!
//! A decode step reads every weight once. Cut into many small chunks shared
//! out by rayon's work stealing, each chunk restarts a thread's stream at a
//! new address (the hardware prefetchers and the kernels' own prefetch start
//! cold) and costs a task. Here a call's rows are cut into exactly one
//! contiguous share per pool thread ([`stream_parts`], by bytes, at multiples
//! of 16 rows), which thread `i` reads front to back; `rows::run_rows` runs
//! them, with threads that finish early claiming runs from the back of the
//! shares with the most left.

/// The most a thread claims of its own share at once (`rows::run_rows`).
/// The decode kernels read a claim as two streams (its two halves), and each
/// claim restarts them at new addresses: on the Intel dev box (session 15,
/// docs/perf/cpu.md) blocks of 32 / 64 KiB cost 5.5 / 2.5 ms more I2_S time
/// per 2B-4T token than 256 KiB, and 1 MiB about 0.8 ms less.
pub(crate) const STREAM_BLOCK_BYTES: usize = 1024 * 1024;

/// Row granularity of the cuts: 16 `i32`/`f32` outputs are one 64-byte cache line.
pub(crate) const CUT_ROWS: usize = 16;

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
}
