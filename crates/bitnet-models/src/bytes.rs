//! `SharedBytes`: a cheaply clonable, sliceable view of model bytes that may
//! live in a memory-mapped file, on the heap, or in the binary itself.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

use bitnet_device::{HugePageBuffer, MappedFile};

/// A reference-counted byte range. Cloning and slicing never copy.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

struct StaticBytes(&'static [u8]);

impl AsRef<[u8]> for StaticBytes {
    fn as_ref(&self) -> &[u8] {
        self.0
    }
}

impl SharedBytes {
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self { owner: Arc::new(bytes), start: 0, len }
    }

    pub fn from_static(bytes: &'static [u8]) -> Self {
        Self { owner: Arc::new(StaticBytes(bytes)), start: 0, len: bytes.len() }
    }

    pub fn from_mapped(file: MappedFile) -> Self {
        let len = file.len();
        Self { owner: Arc::new(file), start: 0, len }
    }

    /// Bytes read into memory in 2 MiB pages ([`HugePageBuffer`]).
    pub fn from_huge_pages(buffer: HugePageBuffer) -> Self {
        let len = buffer.len();
        Self { owner: Arc::new(buffer), start: 0, len }
    }

    /// A sub-range of these bytes, or `None` if it is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Option<Self> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        Some(Self { owner: Arc::clone(&self.owner), start: self.start + range.start, len: range.end - range.start })
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

impl Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_and_bound_check() {
        let b = SharedBytes::from_vec((0u8..10).collect());
        let s = b.slice(2..6).unwrap();
        assert_eq!(&*s, &[2, 3, 4, 5]);
        let ss = s.slice(1..3).unwrap();
        assert_eq!(&*ss, &[3, 4]);
        assert!(s.slice(2..5).is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = b.slice(5..4);
        assert!(reversed.is_none());
        assert_eq!(SharedBytes::from_static(b"abc").slice(3..3).unwrap().len(), 0);
    }
}
