//! Which instruction set a family of CPU kernels runs: the attention kernel
//! (`kernels::cpu::products`) and the projections' GEMM (`gemm::isa`) each keep their own
//! selection (forcing one leaves the other), over the same names and the same run-time checks.

use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction sets by name, best first, with their codes.
pub(crate) const NAMES: [(&str, u8); 4] = [
    ("avx512bf16", AVX512BF16),
    ("avx512", AVX512),
    ("avx2", AVX2),
    ("portable", PORTABLE),
];

/// AVX-512 F/BW with AVX512-BF16.
pub(crate) const AVX512BF16: u8 = 4;
/// AVX-512 F.
pub(crate) const AVX512: u8 = 1;
/// AVX2 + FMA + F16C.
pub(crate) const AVX2: u8 = 2;
/// No SIMD of ours.
pub(crate) const PORTABLE: u8 = 3;

/// Whether this CPU runs the instruction set with code `code` (checked at run time).
pub(crate) fn runs(code: u8) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let ok = match code {
            AVX512BF16 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512bf16")
            }
            AVX512 => is_x86_feature_detected!("avx512f"),
            AVX2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            _ => false,
        };
        if ok {
            return true;
        }
    }
    code == PORTABLE
}

/// One family's selection: the best instruction set this CPU runs, or a forced one.
pub(crate) struct Selection(AtomicU8);

impl Selection {
    /// The best available until something is forced.
    pub(crate) const fn new() -> Self {
        Self(AtomicU8::new(0))
    }

    /// The code of the instruction set in use: the forced one, else the best this CPU runs.
    pub(crate) fn code(&self) -> u8 {
        let best = || NAMES.iter().map(|&(_, c)| c).find(|&c| runs(c));
        match self.0.load(Ordering::Relaxed) {
            0 => best(),
            c => Some(c).filter(|&c| runs(c)).or_else(best),
        }
        .unwrap_or(PORTABLE)
    }

    /// Whether `code` was forced.
    pub(crate) fn forced(&self, code: u8) -> bool {
        self.0.load(Ordering::Relaxed) == code
    }

    /// Forces the instruction set named `name` (process-wide; `None`: the best available).
    /// Errors when the name is unknown or the CPU lacks it.
    pub(crate) fn force(&self, name: Option<&str>) -> Result<(), String> {
        let Some(name) = name else {
            self.0.store(0, Ordering::Relaxed);
            return Ok(());
        };
        let Some(&(_, code)) = NAMES.iter().find(|(n, _)| *n == name) else {
            return Err(format!("unknown instruction set {name:?}"));
        };
        if !runs(code) {
            return Err(format!("this CPU cannot run the {name} kernels"));
        }
        self.0.store(code, Ordering::Relaxed);
        Ok(())
    }
}
