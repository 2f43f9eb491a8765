//! Reference attention on plain candle ops: materialises the `(B, H, L, S)` logits.
//!
//! Clear rather than fast: it is the specification the fused kernels are tested against, it can
//! return the attention weights, and it uses only differentiable candle ops (no fused softmax),
//! so gradients flow through it. Scores and softmax run in f32 for f16/bf16/f32 inputs (f64 for
//! f64); the output is cast back to the input dtype.
//!
//! Grouped KV heads are handled without copying K/V: the `G = H / Hkv` query heads that share a
//! KV head are folded into the query length, `(B, Hkv, G·L, D) · (B, Hkv, D, S)`.

use candle_core::{Result, Tensor, D};

use super::{compute_dtype, AttnOutput, AttnParams};
use crate::config::MaskedRowPolicy;

/// See [`super::attention`], which validates the shapes before calling this.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &crate::mask::MaskSpec,
    params: &AttnParams,
) -> Result<AttnOutput> {
    let (b, h, l, d) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let dv = v.dim(3)?;
    let g = h / hkv;
    let in_dtype = q.dtype();
    let cd = compute_dtype(in_dtype);
    let q = q.to_dtype(cd)?.contiguous()?.reshape((b, hkv, g * l, d))?;
    let k = k.to_dtype(cd)?.contiguous()?;
    let v = v.to_dtype(cd)?.contiguous()?;
    let scores = q.matmul(&k.t()?)?.reshape((b, h, l, s))?;
    let mut scores = (scores * params.scale)?;
    let real_s = s - mask.extra_keys;
    if let Some(bias) = mask.materialize(b, l, real_s, cd, q.device())? {
        scores = scores.broadcast_add(&bias)?;
    }
    let mut probs = softmax(&scores, params.masked_rows)?;
    if params.dropout > 0.0 {
        probs = candle_nn::ops::dropout(&probs, params.dropout)?;
    }
    // Like PyTorch, the returned weights are the ones actually applied (after dropout).
    let weights = params.need_weights.then(|| probs.clone());
    let out = probs
        .reshape((b, hkv, g * l, s))?
        .matmul(&v)?
        .reshape((b, h, l, dv))?;
    Ok(AttnOutput {
        output: out.to_dtype(in_dtype)?,
        weights,
    })
}

/// Softmax over the last dim with the fully-masked-row `policy`, on differentiable ops.
///
/// A row whose logits are all `-inf` gives NaN under [`MaskedRowPolicy::Nan`] (PyTorch) and
/// zeros under [`MaskedRowPolicy::Zero`].
pub fn softmax(scores: &Tensor, policy: MaskedRowPolicy) -> Result<Tensor> {
    let max = scores.max_keepdim(D::Minus1)?.detach();
    match policy {
        MaskedRowPolicy::Nan => {
            let e = scores.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        }
        MaskedRowPolicy::Zero => {
            // max = -inf only for a fully masked row: shift by 0 there so exp gives 0, not NaN.
            let dead = max.eq(f64::NEG_INFINITY)?;
            let max = dead.where_cond(&max.zeros_like()?, &max)?;
            let e = scores.broadcast_sub(&max)?.exp()?;
            let sum = e.sum_keepdim(D::Minus1)?;
            let sum = sum.eq(0f64)?.where_cond(&sum.ones_like()?, &sum)?;
            e.broadcast_div(&sum)
        }
    }
}
