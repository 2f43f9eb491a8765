//! The fused kernel as a candle autograd node: a [`CustomOp3`] over `(q, k, v)` whose backward
//! is [`super::backward`].

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::out::OutVec;
use super::{backward, AttnCall, BWD_CALLS};
use crate::kernels::AttnParams;
use crate::mask::MaskPlan;

/// One forward call of the fused kernel, recorded for its backward: the call's masks and
/// options, its output (handed to candle once) and the per-row log-sum-exp.
struct FusedAttention {
    plan: MaskPlan,
    params: AttnParams,
    extra_keys: usize,
    out: Mutex<Option<CpuStorage>>,
    shape: Shape,
    lse: Vec<f32>,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "candle-mha-fused-attention"
    }

    /// The output was computed by the fused forward before the node was built (it also saved
    /// the log-sum-exp); it is handed over here without a copy.
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(out) = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention: poisoned lock".into()))?
            .take()
        else {
            bail!("fused attention: the output was already taken")
        };
        Ok((out, self.shape.clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, l, h, d) = q.dims4()?;
        let (_, s, hkv, _) = k.dims4()?;
        let dv = v.dim(3)?;
        let call = AttnCall {
            q,
            k,
            v,
            mask: &self.plan,
            params: &self.params,
            b,
            l,
            h,
            hkv,
            s,
            d,
            dv,
            extra_keys: self.extra_keys,
            kv_scales: None,
            key_rows: None,
        };
        BWD_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (dq, dk, dv) = backward::backward(&call, res, grad, &self.lse)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `out` (the fused forward's output for `c`, `(B, L, H, Dv)` elements) as the output of an
/// autograd node over `c`'s `q`, `k`, `v`, whose backward is the fused backward using `lse`.
/// The elements are handed to candle as they are (no copy) when they already are in `q`'s
/// dtype.
pub(super) fn attach(c: &AttnCall, out: OutVec, lse: Vec<f32>) -> Result<Tensor> {
    let dtype = c.q.dtype();
    let shape = Shape::from((c.b, c.l, c.h, c.dv));
    let storage = match out.into_storage(dtype) {
        Ok(storage) => storage,
        // Other dtypes ran in f32: converted, then copied out of the tensor once.
        Err(out) => {
            let t = out.into_tensor(shape.clone(), dtype, c.q.device())?;
            let (st, layout) = t.storage_and_layout();
            let Storage::Cpu(cpu) = &*st else {
                bail!("fused attention: the output is not on the CPU")
            };
            if !layout.is_contiguous() || layout.start_offset() != 0 {
                bail!("fused attention: the output must be a fresh contiguous tensor")
            }
            cpu.clone()
        }
    };
    let op = FusedAttention {
        plan: c.mask.clone(),
        params: *c.params,
        extra_keys: c.extra_keys,
        out: Mutex::new(Some(storage)),
        shape,
        lse,
    };
    c.q.apply_op3_arc(c.k, c.v, Arc::new(Box::new(op)))
}

/// The fused forward of `c` and the fused backward of its output against the output gradient
/// `grad` (`dO`, `(B, L, H, Dv)`), called directly instead of through candle's autograd: the
/// two kernels alone, as PyTorch's `out.backward(dO)` runs them (the benchmarks time this next
/// to a candle training step, whose loss and gradient bookkeeping are candle's). Returns the
/// output and `(dQ, dK, dV)`. Not with attention sinks (their gradient takes its own path).
#[cfg(feature = "internals")]
pub(crate) fn forward_backward(c: &AttnCall, grad: &Tensor) -> Result<[Tensor; 4]> {
    use super::super::Kernel;
    if let Some(why) = super::CpuFused.unsupported_inputs(c) {
        bail!("fused forward + backward: {why}")
    }
    if c.mask.sinks().is_some() {
        bail!("fused forward + backward: attention sinks take candle's autograd")
    }
    let (b, l, h, dv) = (c.b, c.l, c.h, c.dv);
    if grad.dims() != [b, l, h, dv] {
        bail!(
            "fused forward + backward: grad must be {:?} (B, L, H, Dv), got {:?}",
            [b, l, h, dv],
            grad.dims()
        )
    }
    let (out, lse) = super::forward(c, true)?;
    let out = out.into_tensor((b, l, h, dv).into(), c.q.dtype(), c.q.device())?;
    let (dq, dk, dv) = backward::backward(c, &out, grad, &lse.unwrap_or_default())?;
    Ok([out, dq, dk, dv])
}
