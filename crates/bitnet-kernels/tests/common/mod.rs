//! Shared test helpers: running one test body on every kernel, with an
//! explicit SKIPPED line for kernels this CPU lacks.

#![allow(dead_code)]

use std::io::Write;

use bitnet_kernels::cpu::CpuKernel;
use proptest::test_runner::{Config, TestRunner};

/// Runs `body` on `kernel` if this CPU has it; otherwise writes
/// `SKIPPED: <kernel> not available on this CPU` straight to stderr (past the
/// test harness's capture, so it shows in every run) and returns without
/// claiming to have checked anything.
pub fn run_on(kernel: CpuKernel, test_name: &str, body: impl FnOnce(CpuKernel)) {
    if !kernel.is_available() {
        let _ = writeln!(std::io::stderr(), "SKIPPED: {} not available on this CPU ({test_name})", kernel.name());
        return;
    }
    body(kernel);
}

/// A proptest runner with a fixed case count (kept small enough for the
/// opt-level-1 test profile on two cores).
pub fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// Generates `mod $name { #[test] fn scalar() .. fn amx() .. fn neon() }`: one test per
/// kernel, each running `$body(kernel)` or printing SKIPPED.
macro_rules! test_each_kernel {
    ($name:ident, $body:ident) => {
        mod $name {
            use bitnet_kernels::cpu::CpuKernel;

            fn run(kernel: CpuKernel) {
                crate::common::run_on(kernel, module_path!(), super::$body);
            }

            #[test]
            fn scalar() {
                run(CpuKernel::Scalar);
            }

            #[test]
            fn portable() {
                run(CpuKernel::Portable);
            }

            #[test]
            fn avx2() {
                run(CpuKernel::Avx2);
            }

            #[test]
            fn avxvnni() {
                run(CpuKernel::AvxVnni);
            }

            #[test]
            fn avx512() {
                run(CpuKernel::Avx512Vnni);
            }

            #[test]
            fn amx() {
                run(CpuKernel::Amx);
            }

            #[test]
            fn neon() {
                run(CpuKernel::Neon);
            }
        }
    };
}

pub(crate) use test_each_kernel;
