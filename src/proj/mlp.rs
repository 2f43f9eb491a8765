//! A feed-forward block's two projections in one pass over blocks of rows
//! ([`crate::gemm::mlp`]).

use std::sync::Arc;

use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor};

use super::{bias_f32, fast_path, packed_kernel, Plan, Proj, FAST_CALLS, PACKED_CALLS};
use crate::gemm::{PackedWeight, ResidualFn, RowFn};

/// `epilogue(act(x · upᵀ + b_up) · downᵀ + b_down, x)` in f32 by [`crate::gemm::mlp`] (the hidden
/// layer computed and consumed one block of rows at a time, never written out whole), or
/// `None` where the packed f32 GEMM does not serve both products (then the caller runs them
/// one by one).
pub(crate) fn mlp(
    x: &Tensor,
    (up, act): (&Proj, RowFn),
    (down, epilogue): (&Proj, Option<ResidualFn>),
) -> Result<Option<Tensor>> {
    use crate::gemm::pack::Form;
    if x.dtype() != DType::F32 {
        return Ok(None);
    }
    let Some(Plan::Packed(k1)) = fast_path(&up.lin, x, up.frozen) else {
        return Ok(None);
    };
    let (n1, k) = up.weight().dims2()?;
    let (n2, k_down) = down.weight().dims2()?;
    let k2 = packed_kernel(DType::F32);
    let plain = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op();
    let down_ok = plain(down.weight())
        && down.weight().is_contiguous()
        && down.bias().is_none_or(|b| plain(b) && b.dims() == [n2]);
    let (Some(k2), true, true) = (k2, down_ok, k_down == n1) else {
        return Ok(None);
    };
    if k1.form() != Form::F32 || k2.form() != Form::F32 {
        return Ok(None);
    }
    let op = Mlp {
        w1: up.packed_for(k1)?,
        b1: bias_f32(&up.lin)?,
        act,
        w2: down.packed_for(k2)?,
        b2: bias_f32(&down.lin)?,
        epilogue,
    };
    let mut dims = x.dims().to_vec();
    let m = x.elem_count() / k.max(1);
    let y = x.contiguous()?.reshape((m, k))?.apply_op1_no_bwd(&op)?;
    FAST_CALLS.with(|c| c.set(c.get() + 2));
    PACKED_CALLS.with(|c| c.set(c.get() + 2));
    if let Some(last) = dims.last_mut() {
        *last = n2;
    }
    y.reshape(dims).map(Some)
}

/// The fused two-layer op of [`mlp`].
struct Mlp<'a> {
    w1: Arc<PackedWeight>,
    b1: Option<Vec<f32>>,
    act: RowFn<'a>,
    w2: Arc<PackedWeight>,
    b2: Option<Vec<f32>>,
    epilogue: Option<ResidualFn<'a>>,
}

impl candle_core::CustomOp1 for Mlp<'_> {
    fn name(&self) -> &'static str {
        "candle-mha-mlp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            bail!("mlp: expected an f32 input")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            bail!("mlp: expected a contiguous input")
        };
        let (m, k) = l.shape().dims2()?;
        if k != self.w1.k() {
            bail!("mlp: input has {k} features, the weight {}", self.w1.k())
        }
        let n2 = self.w2.n();
        let mut out = crate::pages::zeroed(m * n2);
        crate::gemm::mlp(
            &x[a..b],
            m,
            (&self.w1, self.b1.as_deref(), self.act),
            (&self.w2, self.b2.as_deref(), self.epilogue),
            &mut out,
        );
        Ok((CpuStorage::F32(out), Shape::from((m, n2))))
    }
}
