//! Read-only memory-mapped files, so model weights are paged in from the file
//! instead of being copied onto the heap.

#![allow(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Error opening or mapping a file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot memory-map {path}: {source}")]
    Map {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A whole file mapped read-only. An empty file is represented without a
/// mapping (mapping zero bytes is an error on Linux).
pub struct MappedFile {
    path: PathBuf,
    map: Option<memmap2::Mmap>,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self, MapError> {
        let file = File::open(path).map_err(|source| MapError::Open { path: path.to_owned(), source })?;
        let len = file.metadata().map_err(|source| MapError::Open { path: path.to_owned(), source })?.len();
        if len == 0 {
            return Ok(Self { path: path.to_owned(), map: None });
        }
        // SAFETY: the mapping is read-only and private to this process. The
        // invariant memmap2 cannot check is that no one truncates or rewrites
        // the file while it is mapped; model files are treated as immutable
        // inputs (the converters always write a new file, never in place), and
        // every read of the mapped bytes is bounds-checked against the length
        // taken at map time.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|source| MapError::Map { path: path.to_owned(), source })?;
        // Ask for 2 MiB pages: decode streams every weight once per token,
        // and where the kernel maps file pages huge (ext4's large folios,
        // read-only file THP) that spares a TLB miss per 4 KiB. Advice only:
        // where it is unsupported the call fails and nothing else changes.
        // Dev box, 2b4t after evicting the file: 1.10 GB of the model mapped
        // huge against 0.47 GB without the advice (docs/perf/cpu.md).
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(Self { path: path.to_owned(), map: Some(map) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_file_contents() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"hello mapped world").unwrap();
        f.flush().unwrap();
        let m = MappedFile::open(f.path()).unwrap();
        assert_eq!(m.as_slice(), b"hello mapped world");
        assert_eq!(m.len(), 18);
    }

    #[test]
    fn empty_file_maps_to_empty_slice() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let m = MappedFile::open(f.path()).unwrap();
        assert!(m.is_empty());
    }

    #[test]
    fn missing_file_names_path() {
        let err = MappedFile::open(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    }
}
