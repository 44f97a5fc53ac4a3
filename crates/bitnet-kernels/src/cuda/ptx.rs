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

impl std::fmt::Display for PtxOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Prebuilt => write!(f, "PTX built in by nvcc"),
            Self::Cached(_) => write!(f, "cached NVRTC PTX"),
            Self::Compiled { arch, seconds } => write!(f, "compiled by NVRTC for {arch} in {seconds:.1} s"),
        }
    }
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

/// The preprocessor definitions of a developer build,
/// `BITNET_CUDA_DEFINES="NAME[=VALUE],..."` (e.g. `FUSED_SUBTRACE=1`, the
/// fused kernel's sub-stage trace): each becomes `-DNAME[=VALUE]` for NVRTC,
/// so an experiment needs no rebuilt binary. Names are C identifiers, values
/// letters, digits, `_`, `.` or `-`; anything else is an error naming the
/// item. Set, the run compiles the source even where the binary carries
/// nvcc's PTX, and caches it under its own key.
pub fn requested_defines() -> Result<Vec<String>, CudaError> {
    parse_defines(&std::env::var("BITNET_CUDA_DEFINES").unwrap_or_default())
}

fn parse_defines(spec: &str) -> Result<Vec<String>, CudaError> {
    let bad = |item: &str, why: &str| CudaError::Shape(format!("BITNET_CUDA_DEFINES: `{item}` {why}"));
    let mut out = Vec::new();
    for item in spec.split([',', ' ']).map(str::trim).filter(|i| !i.is_empty()) {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (item, None),
        };
        let ident = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident {
            return Err(bad(item, "is not NAME or NAME=VALUE with NAME a C identifier"));
        }
        if let Some(v) = value {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
                return Err(bad(item, "has a value other than letters, digits, `_`, `.` or `-`"));
            }
        }
        out.push(format!("-D{item}"));
    }
    Ok(out)
}

/// Compiles `source` for `compute_{major}{minor}` with NVRTC (with
/// `-lineinfo` when [`lineinfo_requested`] and the
/// [`requested_defines`]).
pub fn compile(source: &str, arch: (u32, u32)) -> Result<String, CudaError> {
    compile_with(source, arch, &dev_options()?)
}

/// The options of a developer build: `-lineinfo`, then the definitions.
fn dev_options() -> Result<Vec<String>, CudaError> {
    options(lineinfo_requested(), &std::env::var("BITNET_CUDA_DEFINES").unwrap_or_default())
}

/// `-lineinfo` if asked, then the definitions of `defines` (a
/// `BITNET_CUDA_DEFINES` value): a run's options and its cache key.
fn options(lineinfo: bool, defines: &str) -> Result<Vec<String>, CudaError> {
    let mut extra = Vec::new();
    if lineinfo {
        extra.push("-lineinfo".to_string());
    }
    extra.extend(parse_defines(defines)?);
    Ok(extra)
}

fn compile_with(source: &str, arch: (u32, u32), extra: &[String]) -> Result<String, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let mut options = vec![format!("--gpu-architecture=compute_{}{}", arch.0, arch.1), "-std=c++17".into()];
    options.extend(extra.iter().cloned());
    let opts = CompileOptions { options, ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map_err(|e| CudaError::Compile { arch: format!("compute_{}{}", arch.0, arch.1), log: e.to_string() })?;
    Ok(ptx.to_src())
}

/// The PTX for a device of compute capability `cc`: the prebuilt one (unless
/// a developer build asks for definitions), the cached one, or a fresh NVRTC
/// compile (for the device's architecture, or for `compute_80` if this NVRTC
/// does not know the device's).
pub fn load(cc: (u32, u32)) -> Result<(Ptx, PtxOrigin), CudaError> {
    let defines = requested_defines()?;
    if let (Some(ptx), true) = (PREBUILT, defines.is_empty()) {
        return Ok((Ptx::from_src(ptx), PtxOrigin::Prebuilt));
    }
    let mut last_err = None;
    let extra = dev_options()?;
    for arch in [cc, MIN_COMPUTE_CAPABILITY] {
        let path = cache_path(cache_dir().as_deref(), arch, &extra);
        if let Some(text) = path.as_ref().and_then(|p| read_cached(p)) {
            return Ok((Ptx::from_src(text), PtxOrigin::Cached(path.unwrap_or_default())));
        }
        let start = std::time::Instant::now();
        match compile_with(SOURCE, arch, &extra) {
            Ok(text) => {
                if let Some(path) = &path {
                    // A cache that cannot be written is no error, only
                    // slower next time.
                    let _ = store(path, &text);
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

/// Whether nvcc built the kernels' PTX into this binary (used unless
/// developer definitions ask for another build).
pub fn prebuilt() -> bool {
    PREBUILT.is_some() && requested_defines().is_ok_and(|d| d.is_empty())
}

/// The cache file of the kernels for `arch` under `dir`.
fn cache_path(dir: Option<&std::path::Path>, arch: (u32, u32), extra: &[String]) -> Option<PathBuf> {
    dir.map(|d| d.join(cache_name(arch, extra)))
}

/// The cache file's name for `arch` and these options.
fn cache_name(arch: (u32, u32), extra: &[String]) -> String {
    let key = cache_key(SOURCE, arch, extra);
    format!("bitnet-{key:016x}-compute_{}{}.ptx", arch.0, arch.1)
}

/// A cache file's PTX, if it holds any kernel (a truncated or foreign file
/// is compiled again).
fn read_cached(path: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(path).ok().filter(|text| text.contains(".entry"))
}

/// Whether [`load`] for a device of compute capability `cc` will compile
/// the kernels with NVRTC, which takes half a minute or more: no PTX built
/// in by nvcc (or developer options asked for another build) and none
/// cached under `dir` for that architecture. Callers tell the user first
/// ([`super::kernel_compile_notice`]).
pub fn will_compile(cc: (u32, u32), dir: Option<&std::path::Path>) -> Result<bool, CudaError> {
    if PREBUILT.is_some() && requested_defines()?.is_empty() {
        return Ok(false);
    }
    Ok(cache_path(dir, cc, &dev_options()?).and_then(|p| read_cached(&p)).is_none())
}

/// The PTX cache key: the source, the architecture and the developer
/// options, if any (none: the key earlier builds used).
fn cache_key(source: &str, arch: (u32, u32), extra: &[String]) -> u64 {
    let arch = format!("compute_{}{}", arch.0, arch.1);
    let mut parts: Vec<&[u8]> = vec![source.as_bytes(), arch.as_bytes()];
    parts.extend(extra.iter().map(|o| o.as_bytes()));
    fnv1a(&parts)
}

/// Compiles the kernels for `arch` with this machine's NVRTC, with the
/// options a run with `BITNET_CUDA_DEFINES=defines` (and, if `lineinfo`,
/// `BITNET_CUDA_LINEINFO=1`) would use, and writes the PTX into `dir` under
/// the name [`load`] looks for with those settings. `cargo xtask ptx` fills
/// a GPU bundle's cache this way, so the GPU machine does not spend a minute
/// or more compiling each variant of an experiment (its PTX then comes from
/// this NVRTC, not the GPU machine's). Returns the file written.
pub fn precompile(
    dir: &std::path::Path,
    arch: (u32, u32),
    defines: &str,
    lineinfo: bool,
) -> Result<PathBuf, CudaError> {
    let extra = options(lineinfo, defines)?;
    let text = compile_with(SOURCE, arch, &extra)?;
    let path = dir.join(cache_name(arch, &extra));
    store(&path, &text).map_err(|e| CudaError::Shape(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

/// Writes a cache file atomically (temporary file, then rename), creating
/// its folder.
fn store(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp =
        dir.join(format!(".tmp-{}-{}", std::process::id(), path.file_name().map_or("", |n| n.to_str().unwrap_or(""))));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
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
        let lineinfo = ["-lineinfo".to_string()];
        assert_ne!(cache_key("src", (9, 0), &lineinfo), cache_key("src", (9, 0), &[]));
        assert_eq!(cache_key("src", (9, 0), &[]), fnv1a(&[b"src", b"compute_90"]));
        // The key -lineinfo builds used before definitions existed.
        assert_eq!(cache_key("src", (9, 0), &lineinfo), fnv1a(&[b"src", b"compute_90", b"-lineinfo"]));
        // Definitions give their own key.
        let d = ["-DFUSED_SUBTRACE=1".to_string()];
        assert_ne!(cache_key("src", (9, 0), &d), cache_key("src", (9, 0), &[]));
    }

    #[test]
    fn a_compile_is_announced_only_without_prebuilt_or_cached_ptx() {
        let dir = std::env::temp_dir().join(format!("bitnet-ptx-notice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let extra = dev_options().unwrap();
        let path = cache_path(Some(&dir), (9, 0), &extra).unwrap();
        let prebuilt = PREBUILT.is_some() && requested_defines().unwrap().is_empty();
        // Nothing cached: a compile unless nvcc built the PTX in.
        assert_eq!(will_compile((9, 0), Some(&dir)).unwrap(), !prebuilt);
        assert_eq!(will_compile((9, 0), None).unwrap(), !prebuilt);
        // A file without any kernel (truncated, foreign) does not count.
        std::fs::write(&path, "// PTX header only\n").unwrap();
        assert_eq!(will_compile((9, 0), Some(&dir)).unwrap(), !prebuilt);
        // Cached PTX for this architecture: no compile; another
        // architecture's file does not answer for it.
        std::fs::write(&path, ".visible .entry k(){}").unwrap();
        assert!(!will_compile((9, 0), Some(&dir)).unwrap());
        assert_eq!(will_compile((8, 0), Some(&dir)).unwrap(), !prebuilt);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_status_names_the_source_or_the_missing_capability() {
        let old = super::super::kernel_source_status((7, 5));
        assert!(old.contains("compute capability 8.0 or newer"), "{old}");
        let now = super::super::kernel_source_status((9, 0));
        let expected = if prebuilt() {
            "PTX built in by nvcc"
        } else if will_compile((9, 0), cache_dir().as_deref()).unwrap() {
            if nvrtc_present() {
                "compiled by NVRTC for compute_90 on first use"
            } else {
                "libnvrtc not found"
            }
        } else {
            "cached NVRTC PTX for compute_90"
        };
        assert!(now.contains(expected), "{now}");
    }

    #[test]
    fn developer_defines_are_checked() {
        assert_eq!(parse_defines("").unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_defines("FUSED_SUBTRACE=1, X_2 ,_Y=a.b-c").unwrap(),
            ["-DFUSED_SUBTRACE=1", "-DX_2", "-D_Y=a.b-c"]
        );
        for bad in ["1X", "A=", "A=b c=", "A=\"x\"", "A-B", "=1", "A=$(x)"] {
            let e = parse_defines(bad).expect_err(bad).to_string();
            assert!(e.contains("BITNET_CUDA_DEFINES"), "{bad}: {e}");
        }
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
        // With -lineinfo (profiling builds) the PTX carries source lines;
        // compiled ahead (`cargo xtask ptx --lineinfo`), it lands where a
        // run with BITNET_CUDA_LINEINFO=1 looks for it.
        let dir = std::env::temp_dir().join(format!("bitnet-ptx-precompile-{}", std::process::id()));
        let path = precompile(&dir, (9, 0), "", true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Some(&path), cache_path(Some(&dir), (9, 0), &["-lineinfo".to_string()]).as_ref());
        let ptx = read_cached(&path).expect("the precompiled PTX reads back as a cache file");
        assert!(ptx.contains(".loc"), "-lineinfo PTX has no .loc directives");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A bad definition is refused before any compile (no NVRTC needed),
    /// naming the item, and writes nothing.
    #[test]
    fn precompile_refuses_a_bad_definition() {
        let dir = std::env::temp_dir().join(format!("bitnet-ptx-bad-define-{}", std::process::id()));
        let err = precompile(&dir, (9, 0), "FUSED_SUBTRACE=1,2BAD", false).unwrap_err().to_string();
        assert!(err.contains("`2BAD`"), "{err}");
        assert!(!dir.exists(), "a refused definition created {}", dir.display());
    }
}
