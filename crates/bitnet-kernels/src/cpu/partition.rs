//! How row-parallel kernels cut a matrix into tasks for the rayon pool.

/// Rows per parallel task: a multiple of 16 rows (a 64-byte cache line of
/// `i32`/`f32` outputs, so two threads never write one line), about eight
/// tasks per thread for load balance, and at most ~256 KiB of weights per
/// task so a chunk stays in L2 while every token tile passes over it.
pub(crate) fn par_chunk_rows(rows: usize, row_bytes: usize, n_threads: usize) -> usize {
    const MIN_ROWS: usize = 16;
    const MAX_CHUNK_BYTES: usize = 256 * 1024;
    let balanced = rows.div_ceil(n_threads.max(1) * 8);
    let cache_cap = (MAX_CHUNK_BYTES / row_bytes.max(1)).max(MIN_ROWS);
    balanced.min(cache_cap).max(MIN_ROWS).next_multiple_of(MIN_ROWS)
}

/// Splits `out` (`[n, rows]`: one output row per vector) into, for each
/// chunk of `chunk_rows` rows, the matching slice of every vector's row: the
/// shape of a batched GEMM split over row chunks.
pub(crate) fn chunk_outputs<T>(out: &mut [T], rows: usize, chunk_rows: usize) -> Vec<Vec<&mut [T]>> {
    let n = out.len().checked_div(rows).unwrap_or(0);
    let mut per_chunk: Vec<Vec<&mut [T]>> =
        (0..rows.div_ceil(chunk_rows.max(1))).map(|_| Vec::with_capacity(n)).collect();
    for row in out.chunks_mut(rows.max(1)) {
        for (c, part) in row.chunks_mut(chunk_rows.max(1)).enumerate() {
            per_chunk[c].push(part);
        }
    }
    per_chunk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_rows_are_cache_line_multiples() {
        fn check(rows: usize, row_bytes: usize, threads: usize, expected: usize) {
            assert_eq!(par_chunk_rows(rows, row_bytes, threads), expected, "rows {rows} row_bytes {row_bytes}");
        }
        // 2B-4T I2_S shapes on 2 threads: q/o 2560 x 2560, gate/up 6912 x 2560.
        check(2560, 640, 2, 160);
        check(6912, 640, 2, 416);
        check(2560, 1728, 8, 48);
        // The f16 output head, 128256 x 2560: capped by the 256 KiB chunk size.
        check(128_256, 5120, 2, 64);
        check(1, 640, 2, 16);
        check(100, 0, 0, 16);
    }
}
