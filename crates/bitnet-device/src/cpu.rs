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
    /// AMX-TILE and AMX-INT8 present, their tile state enabled by the OS,
    /// and this process granted its use (Linux: `arch_prctl`
    /// `ARCH_REQ_XCOMP_PERM`, asked for once by [`amx_int8_usable`]).
    pub amx_int8: bool,
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
            ("amx_int8", self.amx_int8),
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
        amx_int8: false,
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
        amx_int8: amx_int8_usable(),
        ..no_features()
    }
}

/// Whether this process may run AMX-INT8 tile instructions: the CPU has
/// AMX-TILE and AMX-INT8 (CPUID leaf 7), the OS saves tile state (XCR0 bits
/// 17 and 18), and, on Linux, the kernel granted this process the tile data
/// state when asked (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`;
/// without that grant the first tile instruction kills the process with
/// SIGILL). Asked once per process; the grant is process-wide and lasts.
/// `std` cannot answer this on stable Rust (its `amx-*` detection is unstable).
#[cfg(target_arch = "x86_64")]
pub fn amx_int8_usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(amx::probe)
}

#[cfg(not(target_arch = "x86_64"))]
pub fn amx_int8_usable() -> bool {
    false
}

#[cfg(target_arch = "aarch64")]
fn probe_features() -> CpuInfo {
    CpuInfo { neon: std::arch::is_aarch64_feature_detected!("neon"), ..no_features() }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn probe_features() -> CpuInfo {
    no_features()
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod amx {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};

    /// XCR0 bits of the tile configuration (17) and tile data (18) state.
    const XCR0_TILE: u64 = (1 << 17) | (1 << 18);

    // `__cpuid_count` is a safe function from Rust 1.87 on, `unsafe` before.
    #[allow(unused_unsafe)]
    pub(super) fn probe() -> bool {
        // SAFETY: CPUID exists on every x86-64 CPU; leaves 1 and 7 are read only.
        let leaf7 = unsafe { __cpuid_count(7, 0) };
        let amx_tile = leaf7.edx & (1 << 24) != 0;
        let amx_int8 = leaf7.edx & (1 << 25) != 0;
        if !(amx_tile && amx_int8 && std::arch::is_x86_feature_detected!("xsave")) {
            return false;
        }
        // OSXSAVE (CPUID.1:ECX bit 27): XGETBV may be executed.
        // SAFETY: as above.
        if unsafe { __cpuid_count(1, 0) }.ecx & (1 << 27) == 0 {
            return false;
        }
        // SAFETY: XSAVE was detected at run time and OSXSAVE says the OS
        // enabled XGETBV, the only requirement of `_xgetbv(0)`.
        let xcr0 = unsafe { xcr0() };
        xcr0 & XCR0_TILE == XCR0_TILE && permitted()
    }

    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        _xgetbv(0)
    }

    /// Asks Linux for the tile data state (kernel 5.16 and later; older
    /// kernels, which cannot save the state, refuse).
    #[cfg(target_os = "linux")]
    fn permitted() -> bool {
        const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes a feature number
        // and touches no memory of ours; it fails with an error code on
        // kernels or CPUs that cannot grant it.
        let asked = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        if asked != 0 {
            return false;
        }
        let mut granted: u64 = 0;
        // SAFETY: ARCH_GET_XCOMP_PERM writes one u64 bit mask through the
        // pointer, which points at `granted`, a live, aligned u64.
        let read = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut granted as *mut u64) };
        read == 0 && granted & (1 << XFEATURE_XTILEDATA) != 0
    }

    /// Other systems: never assumed.
    #[cfg(not(target_os = "linux"))]
    fn permitted() -> bool {
        false
    }
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
        // Asking again gives the same answer (the grant is process-wide).
        assert_eq!(info.amx_int8, amx_int8_usable());
        assert_eq!(CpuInfo::probe().amx_int8, info.amx_int8);
    }
}
