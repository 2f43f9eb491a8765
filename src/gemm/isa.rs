//! The instruction set the projections' GEMMs run on, chosen at run time: the best this CPU
//! has, or one forced by the tests and benchmarks ([`force`]). Its own choice, apart from the
//! fused attention kernel's (`kernels::cpu::products`): forcing one never changes the other.
//! The packed GEMM ([`super::kernel_for`]) and the dot-product kernels of few-row calls
//! (`kernels::cpu::proj_kernel`) both pick their kernels from it; each kernel still checks its
//! CPU features itself before it runs.

use crate::isa_select::{self, Selection};

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

/// The projections' selection (the attention kernel keeps its own).
static SELECTION: Selection = Selection::new();

impl GemmIsa {
    /// Short name (`"avx512bf16"`, `"avx512"`, `"avx2"`, `"portable"`).
    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // read by the test hooks
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

/// The instruction set with code `code` (see [`crate::isa_select`]).
fn of_code(code: u8) -> GemmIsa {
    match code {
        isa_select::AVX512BF16 => GemmIsa::Avx512Bf16,
        isa_select::AVX512 => GemmIsa::Avx512,
        isa_select::AVX2 => GemmIsa::Avx2,
        _ => GemmIsa::Portable,
    }
}

/// The instruction set the projections use now.
pub(crate) fn current() -> GemmIsa {
    of_code(SELECTION.code())
}

/// Forces the projections' instruction set named `name` for every following call
/// (process-wide; `None`: the best available). Errors when the name is unknown or the CPU lacks
/// it.
#[cfg_attr(not(feature = "internals"), allow(dead_code))] // called by the test hooks
pub(crate) fn force(name: Option<&str>) -> Result<(), String> {
    SELECTION.force(name)
}

/// Whether bf16 projections on `isa` run on AVX512-BF16 dot products: on
/// [`GemmIsa::Avx512Bf16`] when it was forced, or when the process's measured bf16 strategy
/// ([`bf16_strategy`]) prefers `vdpbf16ps`; else bf16 is widened to f32.
pub(crate) fn dots_bf16(isa: GemmIsa) -> bool {
    isa == GemmIsa::Avx512Bf16
        && (SELECTION.forced(isa_select::AVX512BF16) || bf16_strategy() == Bf16Strategy::Dot)
}
