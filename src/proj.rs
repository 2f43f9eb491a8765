//! The projections' matrix product: [`candle_nn::Linear`]'s `forward`, except for bf16 on CPUs
//! with AVX512-BF16, where candle's CPU matmul (no bf16 kernel: both operands widened to f32
//! copies, single-threaded, and the product rounded back before the bias is added in bf16) is
//! replaced by [`gemm_bf16`](crate::kernels::cpu::gemm_bf16): operands read in place, f32
//! accumulation, the bias added in f32 and one rounding, as PyTorch's bf16 `nn.Linear` does.
//!
//! The fast path is taken only when it computes the same function: CPU tensors, bf16 input,
//! weight and bias, a weight stored row-major in `nn.Linear`'s `(out, in)` orientation (GPT-2's
//! transposed `Conv1D` view keeps candle's path), and nothing tracked by autograd (the op has no
//! backward). Everything else is `Linear::forward` unchanged.

use std::cell::Cell;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Linear;
use half::bf16;

thread_local! {
    /// Calls served by the bf16 GEMM from this thread (lets tests check which path ran).
    static FAST_CALLS: Cell<usize> = const { Cell::new(0) };
}

/// How many projections the AVX512-BF16 GEMM has computed for calls from this thread.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn fast_calls() -> usize {
    FAST_CALLS.with(Cell::get)
}

/// `lin.forward(x)`: `x · Wᵀ + b` over the last dimension of `x`.
pub(crate) fn linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    if !fast_path(lin, x) {
        return lin.forward(x);
    }
    let w = lin.weight();
    let (n, k) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let m = x.elem_count() / k;
    let flat = x.contiguous()?.reshape((m, k))?;
    let bias = match lin.bias() {
        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let y = flat.apply_op2_no_bwd(w, &Bf16Linear { bias })?;
    FAST_CALLS.with(|c| c.set(c.get() + 1));
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    y.reshape(dims)
}

/// Whether [`linear`] can use the bf16 GEMM for this call (see the module docs).
fn fast_path(lin: &Linear, x: &Tensor) -> bool {
    let w = lin.weight();
    let bf16 = |t: &Tensor| t.dtype() == DType::BF16 && t.device().is_cpu() && !t.track_op();
    let shapes_ok = w.rank() == 2 && x.rank() >= 1 && x.dims().last() == w.dims().get(1);
    crate::kernels::cpu::bf16_gemm_enabled()
        && shapes_ok
        && bf16(x)
        && bf16(w)
        && w.is_contiguous()
        && lin
            .bias()
            .is_none_or(|b| bf16(b) && b.rank() == 1 && b.dim(0).ok() == w.dims().first().copied())
}

/// `(M, K) · (N, K)ᵀ + bias` in bf16 with f32 accumulation (no backward: only reached with
/// nothing tracked).
struct Bf16Linear {
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for Bf16Linear {
    fn name(&self) -> &'static str {
        "candle-mha-bf16-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::BF16(x), CpuStorage::BF16(w)) = (xs, ws) else {
            bail!("bf16 linear: expected a bf16 input and weight")
        };
        let (m, k) = xl.shape().dims2()?;
        let (n, kw) = wl.shape().dims2()?;
        if k != kw {
            bail!("bf16 linear: input has {k} features but the weight {kw} (weight shape ({n}, {kw}))")
        }
        let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            bail!("bf16 linear: the input and the weight must be contiguous")
        };
        let mut out = vec![bf16::ZERO; m * n];
        gemm(
            &x[xa..xb],
            &w[wa..wb],
            self.bias.as_deref(),
            &mut out,
            (m, n, k),
        )?;
        Ok((CpuStorage::BF16(out), Shape::from((m, n))))
    }
}

/// The AVX512-BF16 GEMM on x86-64.
#[cfg(target_arch = "x86_64")]
fn gemm(
    x: &[bf16],
    w: &[bf16],
    bias: Option<&[f32]>,
    out: &mut [bf16],
    mnk: (usize, usize, usize),
) -> Result<()> {
    crate::kernels::cpu::gemm_bf16::gemm_bt(x, w, bias, out, mnk);
    Ok(())
}

/// Elsewhere never reached ([`fast_path`] is false).
#[cfg(not(target_arch = "x86_64"))]
fn gemm(
    _: &[bf16],
    _: &[bf16],
    _: Option<&[f32]>,
    _: &mut [bf16],
    _: (usize, usize, usize),
) -> Result<()> {
    bail!("bf16 linear: no AVX512-BF16 on this architecture")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn bf16_tensor(dims: &[usize], seed: u64) -> Result<Tensor> {
        let n = dims.iter().product();
        Tensor::from_vec(rand(n, seed), dims, &Device::Cpu)?.to_dtype(DType::BF16)
    }

    /// Checks `y` (`(M, N)` flattened) against a float64 product of the bf16 operands: within
    /// one bf16 rounding of the exact value plus f32 accumulation error.
    fn check(y: &Tensor, x: &Tensor, w: &Tensor, b: Option<&Tensor>, what: &str) -> Result<()> {
        let (n, k) = w.dims2()?;
        let f = |t: &Tensor| -> Result<Vec<f64>> {
            t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
        };
        let (xv, wv, yv) = (f(x)?, f(w)?, f(y)?);
        let bv = match b {
            Some(b) => f(b)?,
            None => vec![0.0; n],
        };
        let m = xv.len() / k;
        assert_eq!(yv.len(), m * n, "{what}: output size");
        for r in 0..m {
            for j in 0..n {
                let (mut exact, mut mag) = (bv[j], bv[j].abs());
                for x in 0..k {
                    exact += xv[r * k + x] * wv[j * k + x];
                    mag += (xv[r * k + x] * wv[j * k + x]).abs();
                }
                let got = yv[r * n + j];
                let tol =
                    exact.abs() / 256.0 + (k as f64 + 2.0) * mag / (1u64 << 24) as f64 + 1e-30;
                assert!(
                    (got - exact).abs() <= tol,
                    "{what}: y[{r}][{j}] = {got}, exact {exact} (tolerance {tol:e})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bf16_gemm_matches_float64_on_every_edge() -> Result<()> {
        if !crate::kernels::cpu::bf16_gemm_enabled() {
            eprintln!("this CPU has no AVX512-BF16: the bf16 GEMM cannot run here");
            return Ok(());
        }
        // Rows and columns around the 4 × 4 register block and the 64 × 64 task; K around the
        // 32-element step and the 1024-element block.
        let shapes = [
            (1, 1, 1),
            (1, 5, 31),
            (3, 4, 32),
            (4, 7, 33),
            (5, 3, 64),
            (17, 66, 95),
            (65, 70, 768),
            (8, 9, 1024),
            (6, 130, 1057),
            (130, 2, 2080),
        ];
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            let seed = 10 * i as u64;
            let x = bf16_tensor(&[m, k], seed)?;
            let w = bf16_tensor(&[n, k], seed + 1)?;
            let b = bf16_tensor(&[n], seed + 2)?;
            for bias in [None, Some(b)] {
                let lin = Linear::new(w.clone(), bias.clone());
                let before = fast_calls();
                let y = linear(&lin, &x)?;
                assert_eq!(
                    fast_calls(),
                    before + 1,
                    "({m}, {n}, {k}) took the fast path"
                );
                assert_eq!(y.dtype(), DType::BF16);
                check(
                    &y,
                    &x,
                    &w,
                    bias.as_ref(),
                    &format!("({m}, {n}, {k}) bias {}", bias.is_some()),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn bf16_linear_keeps_shapes_views_and_falls_back_where_it_must() -> Result<()> {
        let fast = crate::kernels::cpu::bf16_gemm_enabled();
        let (e, n) = (48, 40);
        let w = bf16_tensor(&[n, e], 1)?;
        let b = bf16_tensor(&[n], 2)?;
        let lin = Linear::new(w.clone(), Some(b.clone()));
        // A (L, B, E) input read as (B, L, E): a non-contiguous view.
        let x = bf16_tensor(&[5, 3, e], 3)?.transpose(0, 1)?;
        let before = fast_calls();
        let y = linear(&lin, &x)?;
        assert_eq!(y.dims(), &[3, 5, n]);
        assert_eq!(fast_calls(), before + usize::from(fast));
        check(
            &y.flatten_to(1)?,
            &x.flatten_to(1)?,
            &w,
            Some(&b),
            "3-d view",
        )?;
        // The candle path on the same call agrees to one bf16 rounding of each of its two steps.
        let reference = lin.forward(&x)?.to_dtype(DType::F32)?;
        let diff = (y.to_dtype(DType::F32)? - &reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff <= scale / 64.0,
            "differs from Linear::forward by {diff} (scale {scale})"
        );

        // A transposed weight (GPT-2's Conv1D view), a tracked weight and an f32 call all keep
        // candle's path and its results.
        let wt = w.t()?.contiguous()?.t()?;
        let var = Var::from_tensor(&w)?;
        let x32 = x.to_dtype(DType::F32)?;
        let cases: [(&str, Linear, &Tensor); 3] = [
            ("transposed weight", Linear::new(wt, Some(b.clone())), &x),
            (
                "tracked weight",
                Linear::new(var.as_tensor().clone(), Some(b.clone())),
                &x,
            ),
            ("f32", Linear::new(w.to_dtype(DType::F32)?, None), &x32),
        ];
        for (what, lin, x) in cases {
            let before = fast_calls();
            let y = linear(&lin, x)?;
            assert_eq!(fast_calls(), before, "{what}: fell back");
            let want = lin.forward(x)?;
            let d = (y - want)?
                .abs()?
                .to_dtype(DType::F32)?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{what}: same as Linear::forward");
        }
        Ok(())
    }
}
