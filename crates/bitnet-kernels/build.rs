//! With the `cuda` feature and `nvcc` on PATH (or in `$CUDA_HOME/bin`),
//! compiles `kernels/*.cu` to PTX ahead of time and sets the cfg
//! `bitnet_prebuilt_ptx`; the sources are always embedded, and without nvcc
//! the kernels are compiled at run time by NVRTC (see `src/cuda/ptx.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(bitnet_prebuilt_ptx)");
    let kernels = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let source = kernels.join("bitnet.cu");
    println!("cargo::rerun-if-changed={}", source.display());
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=BITNET_NO_NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() || std::env::var_os("BITNET_NO_NVCC").is_some() {
        return;
    }
    let Some(nvcc) = find_nvcc() else { return };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("bitnet.ptx");
    // compute_80: the oldest architecture the kernels support (mma.sync int8
    // m16n8k32, bf16); the driver JIT-compiles this PTX for newer GPUs.
    let status = Command::new(&nvcc)
        .args(["-ptx", "-arch=compute_80", "-std=c++17", "-O3", "-o"])
        .arg(&out)
        .arg(&source)
        .status();
    match status {
        Ok(s) if s.success() => println!("cargo::rustc-cfg=bitnet_prebuilt_ptx"),
        Ok(s) => println!("cargo::warning=nvcc failed ({s}) on {}; NVRTC will compile at run time", source.display()),
        Err(e) => println!("cargo::warning=cannot run {}: {e}; NVRTC will compile at run time", nvcc.display()),
    }
}

fn find_nvcc() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    dirs.into_iter().map(|d| d.join("nvcc")).find(|p| p.is_file())
}
