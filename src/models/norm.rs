//! `LayerNorm(x + residual)` in one pass over each row (f32, CPU), for the encoder's two
//! residual blocks: as a GEMM epilogue ([`crate::proj::mlp`]'s second product) where the row is
//! the output projection's, or as a fused op of its own. candle's path is an elementwise add
//! (which wakes candle's CPU thread pool, whose workers then spin beside the GEMM's threads)
//! and then its layer norm, two passes.
//!
//! Numerics: the mean and then the variance of the row in f32 (two passes over the row in
//! cache), `(x − mean) / √(var + eps) · γ + β`, as PyTorch's CPU layer norm computes it.

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::LayerNorm;
use rayon::prelude::*;

/// A layer norm's parameters as f32 rows.
#[derive(Clone, Debug)]
pub(crate) struct LnRows {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl LnRows {
    /// The parameters of `ln` when it is an f32 CPU layer norm with a bias that autograd does
    /// not track (else `None`: candle's path).
    pub(crate) fn of(ln: &LayerNorm) -> Result<Option<Self>> {
        let w = ln.weight();
        let Some(b) = ln.bias() else { return Ok(None) };
        let plain = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op();
        if !ln.remove_mean() || !plain(w) || !plain(b) || w.rank() != 1 {
            return Ok(None);
        }
        Ok(Some(Self {
            gamma: w.to_vec1()?,
            beta: b.to_vec1()?,
            eps: ln.eps() as f32,
        }))
    }

    /// Features per row.
    pub(crate) fn dim(&self) -> usize {
        self.gamma.len()
    }

    /// `row = LayerNorm(row + residual)`.
    pub(crate) fn add_norm(&self, row: &mut [f32], residual: &[f32]) {
        let n = row.len();
        for (x, r) in row.iter_mut().zip(residual) {
            *x += r;
        }
        let mean = row.iter().sum::<f32>() / n as f32;
        let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n as f32;
        let inv = 1.0 / (var + self.eps).sqrt();
        for ((x, g), b) in row.iter_mut().zip(&self.gamma).zip(&self.beta) {
            *x = (*x - mean) * inv * g + b;
        }
    }
}

/// `ln(a + b)`: one fused pass where `rows` are `ln`'s parameters and both inputs are f32 CPU
/// tensors of `ln`'s width that autograd does not track; candle's add and layer norm otherwise.
pub(crate) fn add_layer_norm(
    a: &Tensor,
    b: &Tensor,
    ln: &LayerNorm,
    rows: Option<&LnRows>,
) -> Result<Tensor> {
    let fits = |t: &Tensor| {
        t.dtype() == DType::F32
            && t.device().is_cpu()
            && !t.track_op()
            && rows.is_some_and(|r| t.dims().last() == Some(&r.dim()))
    };
    match rows {
        Some(r) if fits(a) && fits(b) && a.dims() == b.dims() => a
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &AddNorm(r)),
        _ => ln.forward(&(a + b)?),
    }
}

/// The fused op of [`add_layer_norm`].
struct AddNorm<'a>(&'a LnRows);

impl CustomOp2 for AddNorm<'_> {
    fn name(&self) -> &'static str {
        "candle-mha-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            bail!("add_layer_norm: expected f32 tensors")
        };
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("add_layer_norm: expected contiguous tensors")
        };
        let n = self.0.dim();
        if a1 - a0 != b1 - b0 || n == 0 || (a1 - a0) % n != 0 {
            bail!(
                "add_layer_norm: shapes {:?} and {:?} with {n} features",
                l1.shape(),
                l2.shape()
            )
        }
        let mut out = a[a0..a1].to_vec();
        out.par_chunks_mut(64 * n)
            .zip(b[b0..b1].par_chunks(64 * n))
            .for_each(|(o, r)| {
                for (row, res) in o.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                    self.0.add_norm(row, res);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused pass equals candle's add + layer norm to f32 rounding.
    #[test]
    fn matches_candles_add_then_layer_norm() -> Result<()> {
        let dev = Device::Cpu;
        let n = 48;
        let w = (Tensor::randn(0f32, 1., n, &dev)? + 1.0)?;
        let b = Tensor::randn(0f32, 1., n, &dev)?;
        let ln = LayerNorm::new(w, b, 1e-12);
        let rows = LnRows::of(&ln)?.expect("an f32 layer norm with a bias");
        let x = (Tensor::randn(0f32, 3., (3, 70, n), &dev)? + 5.0)?;
        let r = Tensor::randn(0f32, 1., (3, 70, n), &dev)?;
        let fused = add_layer_norm(&x, &r, &ln, Some(&rows))?;
        let want = ln.forward(&(&x + &r)?)?;
        let big = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let d = (fused - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // Both sum in f32 in different orders: a few ulps of the largest output (about 15).
        assert!(
            d <= 4e-6 * big.max(1.0),
            "max difference {d} (largest output {big})"
        );
        Ok(())
    }
}
