//! Which CPU kernel runs: the `CpuKernel` names, availability checks, and
//! selection of the best one (overridable with `BITNET_CPU_KERNEL`).

use bitnet_device::CpuInfo;

use super::token;
use crate::KernelError;

/// Environment variable that overrides [`select_kernel`]'s choice.
pub const KERNEL_ENV_VAR: &str = "BITNET_CPU_KERNEL";

const KERNEL_NAMES: &str = "scalar, portable, avx2, avxvnni, avx512, amx, neon";

/// An implementation of every kernel in this crate for one instruction set.
///
/// Any variant can be named on any machine; an operation given a kernel the
/// CPU lacks returns [`KernelError::KernelUnavailable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CpuKernel {
    /// Plain Rust, the reference every other kernel is tested against.
    Scalar,
    /// Portable SIMD through the `wide` crate (SSE2 on x86-64, NEON on AArch64, scalar elsewhere).
    Portable,
    /// x86-64 AVX2 + FMA + F16C: `vpmaddubsw` for I2_S, 8-wide f32.
    Avx2,
    /// AVX2 plus AVX-VNNI: 256-bit `vpdpbusd` for I2_S; float kernels as [`CpuKernel::Avx2`].
    AvxVnni,
    /// AVX-512 F/BW/VL/VNNI: 512-bit `vpdpbusd` for I2_S, 16-wide float GEMV;
    /// element-wise kernels as [`CpuKernel::Avx2`].
    Avx512Vnni,
    /// [`CpuKernel::Avx512Vnni`] plus AMX-INT8 tiles (Intel Sapphire Rapids
    /// and later, where the OS grants the tile state): I2_S products of
    /// batches of [`crate::cpu::AMX_MIN_TOKENS`] tokens or more (prefill,
    /// batched decode) on `tdpbusd`; decode and every other kernel as
    /// [`CpuKernel::Avx512Vnni`], with the same results.
    Amx,
    /// AArch64 Advanced SIMD: I2_S with `smull`/`sadalp`, 4-wide float GEMV;
    /// element-wise kernels as [`CpuKernel::Portable`] (which is NEON there).
    Neon,
}

/// A kernel resolved against the running CPU, holding the proof token its
/// SIMD code needs. Only [`CpuKernel::resolve`] makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Resolved {
    Scalar,
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2(token::Avx2Token),
    #[cfg(target_arch = "x86_64")]
    AvxVnni(token::AvxVnniToken),
    #[cfg(target_arch = "x86_64")]
    Avx512(token::Avx512Token),
    #[cfg(target_arch = "x86_64")]
    Amx(token::AmxToken),
    #[cfg(target_arch = "aarch64")]
    Neon(token::NeonToken),
}

impl CpuKernel {
    /// Every kernel, best first on its architecture.
    pub const ALL: [CpuKernel; 7] = [
        CpuKernel::Amx,
        CpuKernel::Avx512Vnni,
        CpuKernel::AvxVnni,
        CpuKernel::Avx2,
        CpuKernel::Neon,
        CpuKernel::Portable,
        CpuKernel::Scalar,
    ];

    /// The short name used by `BITNET_CPU_KERNEL` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            CpuKernel::Scalar => "scalar",
            CpuKernel::Portable => "portable",
            CpuKernel::Avx2 => "avx2",
            CpuKernel::AvxVnni => "avxvnni",
            CpuKernel::Avx512Vnni => "avx512",
            CpuKernel::Amx => "amx",
            CpuKernel::Neon => "neon",
        }
    }

    /// Parses a name as written by [`CpuKernel::name`] (ASCII case-insensitive,
    /// surrounding whitespace ignored).
    pub fn from_name(name: &str) -> Result<CpuKernel, KernelError> {
        let wanted = name.trim();
        CpuKernel::ALL
            .into_iter()
            .find(|kernel| kernel.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| KernelError::UnknownKernel { name: name.to_owned(), expected: KERNEL_NAMES })
    }

    /// Whether this kernel can run on the running CPU (checked with `std`'s
    /// run-time detection; cheap after the first call).
    pub fn is_available(self) -> bool {
        self.resolve().is_ok()
    }

    /// Whether a CPU with these features could run this kernel. Pure, for
    /// reporting and tests; the kernels themselves never trust a `CpuInfo`.
    pub fn is_supported_by(self, info: &CpuInfo) -> bool {
        let avx2 = info.arch == "x86_64" && info.avx2 && info.fma && info.f16c;
        let avx512 = avx2 && info.avx512f && info.avx512bw && info.avx512vl && info.avx512_vnni;
        match self {
            CpuKernel::Scalar | CpuKernel::Portable => true,
            CpuKernel::Avx2 => avx2,
            CpuKernel::AvxVnni => avx2 && info.avx_vnni,
            CpuKernel::Avx512Vnni => avx512,
            CpuKernel::Amx => avx512 && info.amx_int8,
            CpuKernel::Neon => info.arch == "aarch64" && info.neon,
        }
    }

    /// The kernels that run on this CPU, best first.
    pub fn all_available() -> Vec<CpuKernel> {
        CpuKernel::ALL.into_iter().filter(|kernel| kernel.is_available()).collect()
    }

    /// The best kernel a CPU with these features supports.
    pub fn best_for(info: &CpuInfo) -> CpuKernel {
        CpuKernel::ALL.into_iter().find(|kernel| kernel.is_supported_by(info)).unwrap_or(CpuKernel::Scalar)
    }

    pub(crate) fn resolve(self) -> Result<Resolved, KernelError> {
        let unavailable = KernelError::KernelUnavailable { kernel: self.name() };
        match self {
            CpuKernel::Scalar => Ok(Resolved::Scalar),
            CpuKernel::Portable => Ok(Resolved::Portable),
            #[cfg(target_arch = "x86_64")]
            CpuKernel::Avx2 => token::Avx2Token::detect().map(Resolved::Avx2).ok_or(unavailable),
            #[cfg(target_arch = "x86_64")]
            CpuKernel::AvxVnni => token::AvxVnniToken::detect().map(Resolved::AvxVnni).ok_or(unavailable),
            #[cfg(target_arch = "x86_64")]
            CpuKernel::Avx512Vnni => token::Avx512Token::detect().map(Resolved::Avx512).ok_or(unavailable),
            #[cfg(target_arch = "x86_64")]
            CpuKernel::Amx => token::AmxToken::detect().map(Resolved::Amx).ok_or(unavailable),
            #[cfg(target_arch = "aarch64")]
            CpuKernel::Neon => token::NeonToken::detect().map(Resolved::Neon).ok_or(unavailable),
            #[allow(unreachable_patterns)]
            _ => Err(unavailable),
        }
    }
}

impl std::fmt::Display for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The best available kernel, or the one named by `BITNET_CPU_KERNEL`
/// (`scalar|portable|avx2|avxvnni|avx512|amx|neon`).
///
/// An unknown name is [`KernelError::UnknownKernel`]; a known kernel this CPU
/// lacks is [`KernelError::KernelUnavailable`]: an explicit request is never
/// silently replaced by another kernel. An empty variable counts as unset.
pub fn select_kernel() -> Result<CpuKernel, KernelError> {
    let requested = std::env::var(KERNEL_ENV_VAR).ok();
    select_kernel_from(requested.as_deref())
}

/// [`select_kernel`] with the request passed in rather than read from the environment.
pub fn select_kernel_from(requested: Option<&str>) -> Result<CpuKernel, KernelError> {
    match requested.map(str::trim).filter(|name| !name.is_empty()) {
        None => Ok(CpuKernel::ALL.into_iter().find(|kernel| kernel.is_available()).unwrap_or(CpuKernel::Scalar)),
        Some(name) => {
            let kernel = CpuKernel::from_name(name)?;
            kernel.resolve()?;
            Ok(kernel)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kernel in CpuKernel::ALL {
            assert_eq!(CpuKernel::from_name(kernel.name()), Ok(kernel));
            assert_eq!(CpuKernel::from_name(&format!(" {} ", kernel.name().to_uppercase())), Ok(kernel));
        }
        assert_eq!(
            CpuKernel::from_name("sse9"),
            Err(KernelError::UnknownKernel { name: "sse9".into(), expected: KERNEL_NAMES })
        );
    }

    #[test]
    fn availability_agrees_with_the_device_probe() {
        let info = CpuInfo::probe();
        for kernel in CpuKernel::ALL {
            assert_eq!(kernel.is_available(), kernel.is_supported_by(&info), "{kernel}");
        }
        assert_eq!(select_kernel_from(None), Ok(CpuKernel::best_for(&info)));
    }

    #[test]
    fn scalar_and_portable_run_everywhere() {
        let available = CpuKernel::all_available();
        assert!(available.contains(&CpuKernel::Scalar) && available.contains(&CpuKernel::Portable));
        assert_eq!(select_kernel_from(Some("scalar")), Ok(CpuKernel::Scalar));
        assert_eq!(select_kernel_from(Some("")), select_kernel_from(None));
    }

    #[test]
    fn explicit_request_for_a_missing_kernel_is_an_error() {
        for kernel in CpuKernel::ALL {
            let result = select_kernel_from(Some(kernel.name()));
            if kernel.is_available() {
                assert_eq!(result, Ok(kernel));
            } else {
                assert_eq!(result, Err(KernelError::KernelUnavailable { kernel: kernel.name() }));
            }
        }
        // Never both x86 and Arm kernels on one machine.
        assert!(!(CpuKernel::Neon.is_available() && CpuKernel::Avx2.is_available()));
    }

    #[test]
    fn best_for_follows_the_features() {
        let mut info = CpuInfo::probe();
        info.arch = "x86_64";
        info.neon = false;
        for (avx2, vnni, avx512, amx, expected) in [
            (false, false, false, false, CpuKernel::Portable),
            (true, false, false, false, CpuKernel::Avx2),
            (true, true, false, false, CpuKernel::AvxVnni),
            (true, true, true, false, CpuKernel::Avx512Vnni),
            (true, false, true, false, CpuKernel::Avx512Vnni),
            (true, true, true, true, CpuKernel::Amx),
            // AMX without AVX-512 (no such CPU) is not used.
            (true, true, false, true, CpuKernel::AvxVnni),
        ] {
            (info.avx2, info.fma, info.f16c, info.avx_vnni) = (avx2, avx2, avx2, vnni);
            (info.avx512f, info.avx512bw, info.avx512vl, info.avx512_vnni) = (avx512, avx512, avx512, avx512);
            info.amx_int8 = amx;
            assert_eq!(CpuKernel::best_for(&info), expected);
        }
        info.arch = "aarch64";
        info.neon = true;
        assert_eq!(CpuKernel::best_for(&info), CpuKernel::Neon);
    }
}
