//! CPU capability probing: the SIMD features our kernels dispatch on, core
//! count and memory.

use std::fmt;

/// What this CPU offers. Probed once at run time, never assumed from the build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    pub arch: &'static str,
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512_vnni: bool,
    pub avx_vnni: bool,
    pub neon: bool,
    /// Logical CPUs this process may run on.
    pub logical_cores: usize,
    /// Total physical memory in bytes, when the OS tells.
    pub total_memory_bytes: Option<u64>,
    /// Memory available for new allocations in bytes, when the OS tells.
    pub available_memory_bytes: Option<u64>,
}

impl CpuInfo {
    /// Probes the running CPU.
    pub fn probe() -> Self {
        let (total, available) = read_meminfo();
        Self {
            arch: std::env::consts::ARCH,
            logical_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            total_memory_bytes: total,
            available_memory_bytes: available,
            ..probe_features()
        }
    }

    /// Names of the SIMD features present, in a fixed order.
    pub fn feature_names(&self) -> Vec<&'static str> {
        let flags = [
            ("avx2", self.avx2),
            ("fma", self.fma),
            ("f16c", self.f16c),
            ("avx512f", self.avx512f),
            ("avx512bw", self.avx512bw),
            ("avx512vl", self.avx512vl),
            ("avx512_vnni", self.avx512_vnni),
            ("avx_vnni", self.avx_vnni),
            ("neon", self.neon),
        ];
        flags.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect()
    }
}

impl fmt::Display for CpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} with {} logical cores, features [{}]",
            self.arch,
            self.logical_cores,
            self.feature_names().join(", ")
        )
    }
}

fn no_features() -> CpuInfo {
    CpuInfo {
        arch: std::env::consts::ARCH,
        avx2: false,
        fma: false,
        f16c: false,
        avx512f: false,
        avx512bw: false,
        avx512vl: false,
        avx512_vnni: false,
        avx_vnni: false,
        neon: false,
        logical_cores: 1,
        total_memory_bytes: None,
        available_memory_bytes: None,
    }
}

#[cfg(target_arch = "x86_64")]
fn probe_features() -> CpuInfo {
    CpuInfo {
        avx2: std::arch::is_x86_feature_detected!("avx2"),
        fma: std::arch::is_x86_feature_detected!("fma"),
        f16c: std::arch::is_x86_feature_detected!("f16c"),
        avx512f: std::arch::is_x86_feature_detected!("avx512f"),
        avx512bw: std::arch::is_x86_feature_detected!("avx512bw"),
        avx512vl: std::arch::is_x86_feature_detected!("avx512vl"),
        avx512_vnni: std::arch::is_x86_feature_detected!("avx512vnni"),
        avx_vnni: std::arch::is_x86_feature_detected!("avxvnni"),
        ..no_features()
    }
}

#[cfg(target_arch = "aarch64")]
fn probe_features() -> CpuInfo {
    CpuInfo { neon: std::arch::is_aarch64_feature_detected!("neon"), ..no_features() }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn probe_features() -> CpuInfo {
    no_features()
}

/// Reads MemTotal and MemAvailable from /proc/meminfo (Linux); `None` elsewhere.
fn read_meminfo() -> (Option<u64>, Option<u64>) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (None, None);
    };
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            kib.checked_mul(1024)
        })
    };
    (field("MemTotal"), field("MemAvailable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo_in_kib() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(parse_meminfo(text), (Some(24_576_000 * 1024), Some(1_024_000)));
    }

    #[test]
    fn meminfo_without_fields_is_none() {
        assert_eq!(parse_meminfo("garbage"), (None, None));
    }

    #[test]
    fn probe_is_consistent_with_std() {
        let info = CpuInfo::probe();
        assert!(info.logical_cores >= 1);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(info.avx2, std::arch::is_x86_feature_detected!("avx2"));
        // AVX-512 subsets imply the foundation.
        if info.avx512bw || info.avx512vl || info.avx512_vnni {
            assert!(info.avx512f);
        }
    }
}
