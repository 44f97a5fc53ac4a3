//! The kernels' PTX: built by nvcc at compile time when it was available,
//! otherwise compiled from the embedded source by NVRTC at run time and kept
//! in an on-disk cache keyed by a hash of the source and the architecture.

use std::path::PathBuf;

use cudarc::nvrtc::{CompileOptions, Ptx};

use super::CudaError;

/// The CUDA source of every kernel, embedded in the binary.
pub const SOURCE: &str = include_str!("../../../../kernels/bitnet.cu");

/// The oldest architecture the kernels support (int8 `mma.sync` m16n8k32 and
/// bf16 need compute capability 8.0).
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (8, 0);

#[cfg(bitnet_prebuilt_ptx)]
const PREBUILT: Option<&str> = Some(include_str!(concat!(env!("OUT_DIR"), "/bitnet.ptx")));
#[cfg(not(bitnet_prebuilt_ptx))]
const PREBUILT: Option<&str> = None;

/// Where the PTX came from, for logs and `bitnet devices`.
#[derive(Debug, Clone, PartialEq)]
pub enum PtxOrigin {
    /// Compiled by nvcc when this binary was built.
    Prebuilt,
    /// Read from the NVRTC cache.
    Cached(PathBuf),
    /// Compiled by NVRTC now (and written to the cache when possible).
    Compiled { arch: String, seconds: f64 },
}

/// Whether libnvrtc can be loaded (cudarc would panic on first use if not).
pub fn nvrtc_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen libnvrtc under its
    // usual names and reports whether that worked; it has no precondition.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// 64-bit FNV-1a: a stable cache key (not a security boundary).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache folder: `$BITNET_PTX_CACHE`, else `$XDG_CACHE_HOME/bitnet-rs/ptx`,
/// else `$HOME/.cache/bitnet-rs/ptx`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("BITNET_PTX_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("bitnet-rs").join("ptx"))
}

/// Whether NVRTC compiles with `-lineinfo` (`BITNET_CUDA_LINEINFO=1`), so a
/// profiler (Nsight Compute's source view) can map samples to lines of
/// `kernels/bitnet.cu`. The generated code is the same otherwise.
pub fn lineinfo_requested() -> bool {
    std::env::var("BITNET_CUDA_LINEINFO").is_ok_and(|v| v == "1")
}

/// Compiles `source` for `compute_{major}{minor}` with NVRTC (with
/// `-lineinfo` when [`lineinfo_requested`]).
pub fn compile(source: &str, arch: (u32, u32)) -> Result<String, CudaError> {
    compile_with(source, arch, lineinfo_requested())
}

fn compile_with(source: &str, arch: (u32, u32), lineinfo: bool) -> Result<String, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let mut options = vec![format!("--gpu-architecture=compute_{}{}", arch.0, arch.1), "-std=c++17".into()];
    if lineinfo {
        options.push("-lineinfo".into());
    }
    let opts = CompileOptions { options, ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map_err(|e| CudaError::Compile { arch: format!("compute_{}{}", arch.0, arch.1), log: e.to_string() })?;
    Ok(ptx.to_src())
}

/// The PTX for a device of compute capability `cc`: the prebuilt one, the
/// cached one, or a fresh NVRTC compile (for the device's architecture, or
/// for `compute_80` if this NVRTC does not know the device's).
pub fn load(cc: (u32, u32)) -> Result<(Ptx, PtxOrigin), CudaError> {
    if let Some(ptx) = PREBUILT {
        return Ok((Ptx::from_src(ptx), PtxOrigin::Prebuilt));
    }
    let mut last_err = None;
    let lineinfo = lineinfo_requested();
    for arch in [cc, MIN_COMPUTE_CAPABILITY] {
        let key = cache_key(SOURCE, arch, lineinfo);
        let path = cache_dir().map(|d| d.join(format!("bitnet-{key:016x}-compute_{}{}.ptx", arch.0, arch.1)));
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            if text.contains(".entry") {
                return Ok((Ptx::from_src(text), PtxOrigin::Cached(path.unwrap_or_default())));
            }
        }
        let start = std::time::Instant::now();
        match compile_with(SOURCE, arch, lineinfo) {
            Ok(text) => {
                if let Some(path) = &path {
                    store(path, &text);
                }
                let origin = PtxOrigin::Compiled {
                    arch: format!("compute_{}{}", arch.0, arch.1),
                    seconds: start.elapsed().as_secs_f64(),
                };
                return Ok((Ptx::from_src(text), origin));
            }
            Err(CudaError::NoNvrtc) => return Err(CudaError::NoNvrtc),
            Err(e) => last_err = Some(e),
        }
        if arch == MIN_COMPUTE_CAPABILITY {
            break;
        }
    }
    Err(last_err.unwrap_or(CudaError::NoNvrtc))
}

/// The PTX cache key: the source, the architecture and (only when set, so
/// the default keys stay as they were) `-lineinfo`.
fn cache_key(source: &str, arch: (u32, u32), lineinfo: bool) -> u64 {
    let arch = format!("compute_{}{}", arch.0, arch.1);
    if lineinfo {
        fnv1a(&[source.as_bytes(), arch.as_bytes(), b"-lineinfo"])
    } else {
        fnv1a(&[source.as_bytes(), arch.as_bytes()])
    }
}

/// Writes the cache file atomically (temporary file, then rename); a cache
/// that cannot be written is not an error, only slower next time.
fn store(path: &std::path::Path, text: &str) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp =
        dir.join(format!(".tmp-{}-{}", std::process::id(), path.file_name().map_or("", |n| n.to_str().unwrap_or(""))));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_depends_on_source_and_arch() {
        let a = fnv1a(&[b"src", b"compute_80"]);
        assert_ne!(a, fnv1a(&[b"src", b"compute_90"]));
        assert_ne!(a, fnv1a(&[b"src2", b"compute_80"]));
        // Part boundaries matter: ("ab", "c") is not ("a", "bc").
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        // -lineinfo PTX never answers for the default build, and the default
        // key is the one earlier builds used.
        assert_ne!(cache_key("src", (9, 0), true), cache_key("src", (9, 0), false));
        assert_eq!(cache_key("src", (9, 0), false), fnv1a(&[b"src", b"compute_90"]));
    }

    /// Compiles every kernel with NVRTC for sm_80 and sm_90. Needs only
    /// libnvrtc (CI installs the `nvidia-cuda-nvrtc-cu12` wheel), no GPU.
    #[test]
    fn kernels_compile_with_nvrtc() {
        if !nvrtc_present() {
            println!("SKIPPED: libnvrtc not found (set LD_LIBRARY_PATH to a CUDA or nvidia-cuda-nvrtc lib folder)");
            return;
        }
        for arch in [(8, 0), (9, 0)] {
            let ptx = compile(SOURCE, arch).unwrap_or_else(|e| panic!("{e}"));
            if let Some(dir) = std::env::var_os("BITNET_DUMP_PTX") {
                let path = std::path::Path::new(&dir).join(format!("bitnet-compute_{}{}.ptx", arch.0, arch.1));
                std::fs::write(&path, &ptx).unwrap();
            }
            for name in super::super::KERNEL_NAMES {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "compute_{}{}: kernel {name} missing",
                    arch.0,
                    arch.1
                );
            }
            // And every kernel of the source is in the list the module
            // loads (a launch of an unlisted one fails only on a GPU).
            for line in ptx.lines() {
                if let Some(rest) = line.trim_start().strip_prefix(".visible .entry ") {
                    let name = rest.split('(').next().unwrap_or(rest).trim();
                    assert!(
                        super::super::KERNEL_NAMES.contains(&name),
                        "kernel {name} is not in KERNEL_NAMES, so it is never loaded"
                    );
                }
            }
        }
        // With -lineinfo (profiling builds) the PTX carries source lines.
        let ptx = compile_with(SOURCE, (9, 0), true).unwrap_or_else(|e| panic!("{e}"));
        assert!(ptx.contains(".loc"), "-lineinfo PTX has no .loc directives");
    }
}
