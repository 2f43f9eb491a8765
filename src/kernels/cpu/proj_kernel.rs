//! Which of our GEMM kernels serves a projection of each dtype, by the projections'
//! instruction set in use ([`crate::gemm::isa`], apart from the fused kernel's).

use candle_core::DType;

#[cfg(target_arch = "x86_64")]
use super::gemm;
#[cfg(target_arch = "x86_64")]
use crate::gemm::isa::{self, GemmIsa};

/// Which of our GEMM kernels ([`gemm`]) computes the projections of one dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only x86-64 has them
pub(crate) enum ProjKernel {
    /// bf16 by AVX512-BF16 dot products.
    Avx512Bf16,
    /// bf16 split into f32 halves in registers, AVX2 + FMA (CPUs without AVX512-BF16, or where
    /// its dot products are slower than f32 FMAs).
    Avx2Bf16,
    /// f32 by AVX-512 FMAs.
    Avx512F32,
    /// f16 widened to f32 in registers, AVX-512 FMAs.
    Avx512F16,
    /// f16 widened to f32 in registers (F16C), AVX2 + FMA (CPUs without AVX-512).
    Avx2F16,
}

impl ProjKernel {
    /// Short name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ProjKernel::Avx512Bf16 => "AVX512-BF16",
            ProjKernel::Avx2Bf16 => "AVX2 bf16",
            ProjKernel::Avx512F32 => "AVX-512 f32",
            ProjKernel::Avx512F16 => "AVX-512 f16",
            ProjKernel::Avx2F16 => "AVX2 f16",
        }
    }
}

/// The GEMM kernel for projections of `dtype` now, if any: bf16 on AVX512-BF16, else on
/// AVX2 + FMA; f16 on AVX-512, else on AVX2 + FMA + F16C; f32 on AVX-512 (elsewhere candle's
/// matmul, whose `gemm` crate is as good). The projections' instruction set in use decides
/// (forcing `avx512`, AVX2 or the portable path, as `bench_gemm --isa` and
/// `bench_attention --isa` do, picks what CPUs without AVX512-BF16 or AVX-512 run).
pub(crate) fn proj_kernel(dtype: DType) -> Option<ProjKernel> {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = isa::current();
        match dtype {
            DType::BF16 if isa::dots_bf16(isa) => Some(ProjKernel::Avx512Bf16),
            DType::BF16 if isa != GemmIsa::Portable && gemm::avx2_supported() => {
                Some(ProjKernel::Avx2Bf16)
            }
            DType::F32 if isa.avx512() => Some(ProjKernel::Avx512F32),
            DType::F16 if isa.avx512() => Some(ProjKernel::Avx512F16),
            DType::F16 if isa != GemmIsa::Portable && gemm::avx2_supported() => {
                Some(ProjKernel::Avx2F16)
            }
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        None
    }
}
