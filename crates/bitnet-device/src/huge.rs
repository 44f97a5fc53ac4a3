//! Zeroed anonymous memory asked to be backed by 2 MiB pages: buffers that a
//! decode step reads in full and cold every token (the model's weights when
//! read into memory, the CPU backend's KV cache), where 4 KiB pages cost a
//! TLB miss every 4 KiB and scatter a stream over physical memory.
//!
//! On the 2-vCPU Intel dev box (session 15, docs/perf/cpu.md) attention over
//! a 2B-4T cache of 192 positions took 3.2 / 2.8 / 3.2 ms per token in 4 KiB
//! pages and 2.5 / 2.5 / 2.4 ms in 2 MiB ones (alternated runs). Where the
//! kernel does not grant huge pages (transparent huge pages off, or not
//! Linux) the buffer is still valid, in ordinary pages.

use std::fmt;

/// Huge page size the buffer's start is aligned to.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// `len` zeroed bytes starting on a 2 MiB boundary, in an anonymous private
/// mapping advised `MADV_HUGEPAGE`. Memory is committed as it is first
/// touched, a huge page (2 MiB) at a time where huge pages are granted.
pub struct HugePageBuffer {
    map: Option<memmap2::MmapMut>,
    offset: usize,
    len: usize,
}

impl HugePageBuffer {
    /// Maps `len` zeroed bytes. An error (the OS's, or `OutOfMemory` when
    /// `len` plus the alignment slack overflows) when the mapping cannot be
    /// made; zero bytes need no mapping.
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Ok(Self { map: None, offset: 0, len: 0 });
        }
        let map_len = len.checked_add(HUGE_PAGE_BYTES).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, format!("{len} bytes cannot be mapped"))
        })?;
        let map = memmap2::MmapMut::map_anon(map_len)?;
        // Advice only: where the kernel has no transparent huge pages the
        // call fails and the mapping keeps ordinary pages.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let offset = map.as_ptr().align_offset(HUGE_PAGE_BYTES);
        // `align_offset` on a byte pointer is below the alignment, so the
        // aligned run of `len` bytes lies inside the mapping.
        debug_assert!(offset < HUGE_PAGE_BYTES);
        Ok(Self { map: Some(map), offset, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.map {
            Some(map) => &map[self.offset..self.offset + self.len],
            None => &[],
        }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.map {
            Some(map) => &mut map[self.offset..self.offset + self.len],
            None => &mut [],
        }
    }

    /// Shortens the buffer to its first `keep` bytes (no-op if it is not
    /// longer) and gives the whole 2 MiB pages after them back to the OS
    /// (`MADV_DONTNEED`: no longer resident). The kept bytes are untouched.
    #[allow(unsafe_code)]
    pub fn truncate(&mut self, keep: usize) {
        if keep >= self.len {
            return;
        }
        self.len = keep;
        #[cfg(unix)]
        if let Some(map) = &self.map {
            // The mapping starts on a page boundary, so a multiple of 2 MiB from
            // it is one on any page size up to 2 MiB; it is at or past the end
            // of the kept bytes.
            let start = (self.offset + keep).div_ceil(HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES;
            if start < map.len() {
                // SAFETY: `start..map.len()` lies inside the mapping and is page
                // aligned; no reference into it outlives this `&mut self` call,
                // and `len` now ends before it, so nothing reads those bytes
                // before the buffer is dropped. Advice only: an error leaves the
                // pages resident, which is still correct.
                let _ =
                    unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, map.len() - start) };
            }
        }
    }
}

impl AsRef<[u8]> for HugePageBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for HugePageBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HugePageBuffer").field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_writable() {
        for len in [0usize, 1, 4096, HUGE_PAGE_BYTES + 12_345] {
            let mut buf = HugePageBuffer::zeroed(len).unwrap();
            assert_eq!((buf.len(), buf.is_empty(), buf.as_bytes().len()), (len, len == 0, len));
            assert!(buf.as_bytes().iter().all(|&b| b == 0));
            if len > 0 {
                assert_eq!(buf.as_bytes().as_ptr() as usize % HUGE_PAGE_BYTES, 0);
                let bytes = buf.as_bytes_mut();
                bytes[len - 1] = 9;
                bytes[len / 2] = 7;
                assert_eq!(buf.as_bytes()[len / 2], 7);
                assert_eq!(buf.as_bytes()[len - 1], if len == 1 { 7 } else { 9 });
            }
        }
        // Truncation keeps the first bytes and shortens the buffer.
        let mut buf = HugePageBuffer::zeroed(3 * HUGE_PAGE_BYTES).unwrap();
        for (i, b) in buf.as_bytes_mut().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        for keep in [3 * HUGE_PAGE_BYTES, 2 * HUGE_PAGE_BYTES + 4097, HUGE_PAGE_BYTES, 100, 0] {
            buf.truncate(keep);
            assert_eq!(buf.len(), keep);
            assert!(buf.as_bytes().iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "keep {keep}");
        }
        buf.truncate(10);
        assert_eq!(buf.len(), 0);
        // Far beyond any address space: an error, not a panic.
        assert!(HugePageBuffer::zeroed(usize::MAX - 10).is_err());
        assert!(HugePageBuffer::zeroed(usize::MAX / 2).is_err());
    }
}
