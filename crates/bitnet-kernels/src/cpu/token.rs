//! Proof tokens for instruction sets: a token exists only if the running CPU
//! was checked to have the features, so a safe function that takes one may
//! call the matching `#[target_feature]` code.
//!
//! Tokens are zero-sized and their fields private: the only way to get one is
//! `detect()`, which asks `std`'s run-time feature detection, never the build
//! configuration and never a caller-supplied `CpuInfo` (whose fields are public
//! and could be wrong).

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{AmxToken, Avx2Token, Avx512Token, AvxVnniToken};

#[cfg(target_arch = "aarch64")]
pub(crate) use arm::NeonToken;

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// AVX2 with FMA and F16C (every AVX2 CPU shipped has all three; the
    /// float kernels need them).
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx2Token(());

    impl Avx2Token {
        pub(crate) fn detect() -> Option<Self> {
            let present = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            present.then_some(Self(()))
        }
    }

    /// AVX-VNNI (256-bit `vpdpbusd` without AVX-512, e.g. Alder Lake) on top of [`Avx2Token`].
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct AvxVnniToken(Avx2Token);

    impl AvxVnniToken {
        pub(crate) fn detect() -> Option<Self> {
            let avx2 = Avx2Token::detect()?;
            std::arch::is_x86_feature_detected!("avxvnni").then_some(Self(avx2))
        }

        pub(crate) fn avx2(self) -> Avx2Token {
            self.0
        }
    }

    /// AVX-512 F, BW, VL and VNNI, on top of [`Avx2Token`].
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx512Token(Avx2Token);

    impl Avx512Token {
        pub(crate) fn detect() -> Option<Self> {
            let avx2 = Avx2Token::detect()?;
            let present = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni");
            present.then_some(Self(avx2))
        }

        pub(crate) fn avx2(self) -> Avx2Token {
            self.0
        }
    }

    /// AMX-TILE and AMX-INT8 with the OS's tile state granted to this
    /// process, on top of [`Avx512Token`]. `std`'s AMX detection is not
    /// stable, so this asks `bitnet_device::cpu::amx_int8_usable`, which
    /// reads CPUID and XCR0 itself and requests the Linux permission
    /// (never a caller-supplied `CpuInfo`).
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct AmxToken(Avx512Token);

    impl AmxToken {
        pub(crate) fn detect() -> Option<Self> {
            let avx512 = Avx512Token::detect()?;
            bitnet_device::cpu::amx_int8_usable().then_some(Self(avx512))
        }

        pub(crate) fn avx512(self) -> Avx512Token {
            self.0
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    /// Advanced SIMD (NEON), part of every AArch64 CPU, still checked at run time.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct NeonToken(());

    impl NeonToken {
        pub(crate) fn detect() -> Option<Self> {
            std::arch::is_aarch64_feature_detected!("neon").then_some(Self(()))
        }
    }
}
