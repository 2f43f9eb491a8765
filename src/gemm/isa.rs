//! The instruction set the projections' GEMMs run on, chosen at run time: the best this CPU
//! has, or one forced by the tests and benchmarks ([`force`]). Its own choice, apart from the
//! fused attention kernel's (`kernels::cpu::products`): forcing one never changes the other.
//! The packed GEMM ([`super::kernel_for`]) and the dot-product kernels of few-row calls
//! (`kernels::cpu::proj_kernel`) both pick their kernels from it; each kernel still checks its
//! CPU features itself before it runs.

use std::sync::atomic::{AtomicU8, Ordering};

use super::{bf16_strategy, Bf16Strategy};

/// An instruction set of the projections' GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only x86 detects the SIMD sets
pub(crate) enum GemmIsa {
    /// AVX-512 F/BW with AVX512-BF16: bf16 by `vdpbf16ps` where it is the process's bf16
    /// strategy ([`dots_bf16`]), else as [`GemmIsa::Avx512`].
    Avx512Bf16,
    /// AVX-512F kernels.
    Avx512,
    /// AVX2 + FMA + F16C kernels.
    Avx2,
    /// None of ours: candle's matmul.
    Portable,
}

/// The instruction sets by name (the attention kernel's names), best first, with their codes
/// in [`FORCED`].
const NAMES: [(&str, u8); 4] = [
    ("avx512bf16", 4),
    ("avx512", 1),
    ("avx2", 2),
    ("portable", 3),
];

/// 0: the best available; else a forced instruction set's code (see [`NAMES`]).
static FORCED: AtomicU8 = AtomicU8::new(0);

impl GemmIsa {
    /// Short name (`"avx512bf16"`, `"avx512"`, `"avx2"`, `"portable"`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            GemmIsa::Avx512Bf16 => "avx512bf16",
            GemmIsa::Avx512 => "avx512",
            GemmIsa::Avx2 => "avx2",
            GemmIsa::Portable => "portable",
        }
    }

    /// Whether this is one of the AVX-512 sets.
    pub(crate) fn avx512(self) -> bool {
        matches!(self, GemmIsa::Avx512 | GemmIsa::Avx512Bf16)
    }
}

/// The instruction set with code `code`, when this CPU runs it.
fn detect(code: u8) -> Option<GemmIsa> {
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &[bool]| f.iter().all(|&x| x);
        let isa = match code {
            4 => has(&[
                is_x86_feature_detected!("avx512f"),
                is_x86_feature_detected!("avx512bw"),
                is_x86_feature_detected!("avx512bf16"),
            ])
            .then_some(GemmIsa::Avx512Bf16),
            1 => is_x86_feature_detected!("avx512f").then_some(GemmIsa::Avx512),
            2 => has(&[
                is_x86_feature_detected!("avx2"),
                is_x86_feature_detected!("fma"),
                is_x86_feature_detected!("f16c"),
            ])
            .then_some(GemmIsa::Avx2),
            _ => None,
        };
        if isa.is_some() {
            return isa;
        }
    }
    (code == 3).then_some(GemmIsa::Portable)
}

/// The instruction set the projections use now.
pub(crate) fn current() -> GemmIsa {
    let best = || NAMES.iter().find_map(|&(_, c)| detect(c));
    match FORCED.load(Ordering::Relaxed) {
        0 => best(),
        c => detect(c).or_else(best),
    }
    .unwrap_or(GemmIsa::Portable)
}

/// Forces the projections' instruction set named `name` for every following call
/// (process-wide; `None`: the best available). Errors when the name is unknown or the CPU lacks
/// it.
pub(crate) fn force(name: Option<&str>) -> Result<(), String> {
    let Some(name) = name else {
        FORCED.store(0, Ordering::Relaxed);
        return Ok(());
    };
    let Some(&(_, code)) = NAMES.iter().find(|(n, _)| *n == name) else {
        return Err(format!("unknown instruction set {name:?}"));
    };
    if detect(code).is_none() {
        return Err(format!("this CPU cannot run the {name} kernels"));
    }
    FORCED.store(code, Ordering::Relaxed);
    Ok(())
}

/// Whether bf16 projections on `isa` run on AVX512-BF16 dot products: on
/// [`GemmIsa::Avx512Bf16`] when it was forced, or when the process's measured bf16 strategy
/// ([`bf16_strategy`]) prefers `vdpbf16ps`; else bf16 is widened to f32.
pub(crate) fn dots_bf16(isa: GemmIsa) -> bool {
    isa == GemmIsa::Avx512Bf16
        && (FORCED.load(Ordering::Relaxed) == NAMES[0].1 || bf16_strategy() == Bf16Strategy::Dot)
}
