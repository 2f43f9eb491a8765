//! Exact GELU (`x · Φ(x)`, through the error function) as one vectorised pass on the CPU.
//!
//! candle's `gelu_erf` calls the scalar `libm::erf` (which calls `expf`) per element: in an
//! all-MiniLM-L6-v2 embedding that was about 18% of the run. Here the error function is the
//! rational approximation XLA and Eigen use for f32 (`erf(x) = x·P(x²)/Q(x²)` on `[-4, 4]`,
//! ±1 outside; within 4.2e-7 of the exact error function), evaluated branch-free so that it
//! vectorises.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// `xs · Φ(xs)` (Hugging Face `"gelu"`, PyTorch `F.gelu`): the vectorised pass for contiguous
/// f32 CPU tensors that autograd does not track, candle's `gelu_erf` otherwise.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && !xs.track_op() {
        xs.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        xs.gelu_erf()
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "candle-mha-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            bail!("gelu_erf: expected an f32 tensor")
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("gelu_erf: expected a contiguous tensor")
        };
        let src = &data[start..end];
        // One thread: a vectorised pass is memory-bound already, and handing it to rayon while
        // candle's own CPU pool spins between ops makes the two pools fight for the cores.
        let mut out = vec![0f32; src.len()];
        gelu_slice(src, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Whether every CPU of this target fuses multiply-adds (aarch64: `fmadd` is base ARMv8, and
/// `mul_add` compiles to it).
const FMA_EVERYWHERE: bool = cfg!(target_arch = "aarch64");

/// `out[i] = gelu(src[i])`, with FMA where the CPU has it (chosen at run time).
fn gelu_slice(src: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the enabled features (checked just above).
        return unsafe { gelu_slice_fma(src, out) };
    }
    if FMA_EVERYWHERE {
        return out
            .iter_mut()
            .zip(src)
            .for_each(|(o, &x)| *o = gelu::<true>(x));
    }
    out.iter_mut()
        .zip(src)
        .for_each(|(o, &x)| *o = gelu::<false>(x));
}

/// `x[i] = gelu(x[i])` in place (the GEMM epilogue of a feed-forward layer's first projection).
pub(crate) fn gelu_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the enabled features (checked just above).
        return unsafe { gelu_in_place_fma(x) };
    }
    if FMA_EVERYWHERE {
        return x.iter_mut().for_each(|v| *v = gelu::<true>(*v));
    }
    x.iter_mut().for_each(|v| *v = gelu::<false>(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_in_place_fma(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = gelu::<true>(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_fma(src: &[f32], out: &mut [f32]) {
    out.iter_mut()
        .zip(src)
        .for_each(|(o, &x)| *o = gelu::<true>(x));
}

/// `a · b + c`, fused where `FMA` (only inside functions compiled with the `fma` feature:
/// elsewhere `mul_add` is a slow library call).
#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `0.5 · x · (1 + erf(x / √2))`.
#[inline(always)]
fn gelu<const FMA: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The error function, f32 rational approximation (XLA / Eigen `generic_fast_erf_float`),
/// branch-free so that it vectorises.
#[inline(always)]
fn erf<const FMA: bool>(x: f32) -> f32 {
    // Beyond ±4 the error function is ±1 in f32 (1 − 1.5e-8).
    let xc = x.clamp(-4.0, 4.0);
    let x2 = xc * xc;
    let mut p = -2.726_142_3e-10f32;
    p = fma::<FMA>(p, x2, 2.770_681_4e-8);
    p = fma::<FMA>(p, x2, -2.101_024e-6);
    p = fma::<FMA>(p, x2, -5.692_506_4e-5);
    p = fma::<FMA>(p, x2, -7.349_906_3e-4);
    p = fma::<FMA>(p, x2, -2.954_600_1e-3);
    p = fma::<FMA>(p, x2, -1.609_603_3e-2);
    let mut q = -1.456_607_2e-5f32;
    q = fma::<FMA>(q, x2, -2.133_740_6e-4);
    q = fma::<FMA>(q, x2, -1.682_827e-3);
    q = fma::<FMA>(q, x2, -7.373_329_3e-3);
    q = fma::<FMA>(q, x2, -1.426_474e-2);
    let r = xc * p / q;
    if xc.abs() >= 4.0 {
        1f32.copysign(xc)
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_exact_gelu() {
        let v: Vec<f32> = (0..200_001).map(|i| -12.0 + i as f32 * 1.2e-4).collect();
        let x = Tensor::from_vec(v, 200_001, &Device::Cpu).unwrap();
        let fast = gelu_erf(&x).unwrap().to_vec1::<f32>().unwrap();
        let exact = x.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        let worst = |fast: &[f32]| {
            fast.iter()
                .zip(&exact)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                .fold(0f32, f32::max)
        };
        let w = worst(&fast);
        assert!(w < 1e-6, "worst relative difference {w}");
        // Both scalar forms over the whole range, whichever this CPU runs: fused multiply-adds
        // within 1e-6, separate ones (x86 CPUs without FMA) within 2e-6.
        let x = x.to_vec1::<f32>().unwrap();
        let fused: Vec<f32> = x.iter().map(|&x| gelu::<true>(x)).collect();
        let split: Vec<f32> = x.iter().map(|&x| gelu::<false>(x)).collect();
        let (wf, ws) = (worst(&fused), worst(&split));
        assert!(wf < 1e-6, "fused: worst relative difference {wf}");
        assert!(ws < 2e-6, "separate: worst relative difference {ws}");
        // Tails: exact 0 far left, x far right; NaN stays NaN.
        for fma in [false, true] {
            let g = |x: f32| {
                if fma {
                    gelu::<true>(x)
                } else {
                    gelu::<false>(x)
                }
            };
            assert_eq!(g(-20.0), 0.0);
            assert_eq!(g(20.0), 20.0);
            assert!(g(f32::NAN).is_nan());
        }
    }
}
