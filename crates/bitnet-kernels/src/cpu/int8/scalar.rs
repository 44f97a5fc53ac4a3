//! The scalar int8 x int8 kernel: the reference the SIMD kernels must match exactly.

pub(super) fn gemv_rows(values: &[i8], q: &[i8], out: &mut [i32]) {
    for (row, value) in values.chunks_exact(q.len()).zip(out.iter_mut()) {
        *value = row.iter().zip(q).map(|(&w, &v)| i32::from(w) * i32::from(v)).sum();
    }
}
