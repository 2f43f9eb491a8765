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

use super::{compute_dtype, AttnCall, AttnOutput, Caps, Kernel};
use crate::config::MaskedRowPolicy;

/// The reference kernel behind the dispatcher.
pub(crate) struct Reference;

impl Kernel for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn id(&self) -> super::KernelId {
        super::KernelId::Reference
    }

    fn caps(&self) -> Caps {
        Caps {
            weights: true,
            dropout: true,
            backward: true,
        }
    }

    fn unsupported_inputs(&self, _: &AttnCall) -> Option<String> {
        None
    }

    fn forward(&self, c: &AttnCall) -> Result<AttnOutput> {
        let (b, l, h, hkv, s, d, dv) = (c.b, c.l, c.h, c.hkv, c.s, c.d, c.dv);
        let g = h / hkv;
        let params = c.params;
        let in_dtype = c.q.dtype();
        let cd = compute_dtype(in_dtype);
        // (B, L, H, D) -> (B, H, L, D) -> (B, Hkv, G·L, D); keys/values to (B, Hkv, S, D).
        let q = c.q.to_dtype(cd)?.transpose(1, 2)?.contiguous()?;
        let q = q.reshape((b, hkv, g * l, d))?;
        let k = c.k.to_dtype(cd)?.transpose(1, 2)?.contiguous()?;
        let v = c.v.to_dtype(cd)?.transpose(1, 2)?.contiguous()?;
        let scores = q.matmul(&k.t()?)?.reshape((b, h, l, s))?;
        let mut scores = (scores * params.scale)?;
        if let Some(cap) = c.mask.softcap() {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        if let Some(slopes) = c.mask.alibi_slopes() {
            scores = scores.broadcast_sub(&alibi_bias(c, slopes, cd)?)?;
        }
        if let Some(bias) = c.mask.materialize(c.extra_keys, cd, q.device())? {
            scores = scores.broadcast_add(&bias)?;
        }
        let mut probs = match c.mask.sinks() {
            // The sink joins every row's softmax as a first column, then leaves it: a row with
            // every key masked keeps only the sink (probabilities 0, output 0).
            Some(sinks) => {
                let sink = sinks
                    .to_dtype(cd)?
                    .reshape((1, h, 1, 1))?
                    .broadcast_as((b, h, l, 1))?;
                let all = Tensor::cat(&[&sink, &scores], 3)?;
                softmax(&all, params.masked_rows)?.narrow(3, 1, s)?
            }
            None => softmax(&scores, params.masked_rows)?,
        };
        if params.dropout > 0.0 {
            probs = candle_nn::ops::dropout(&probs, params.dropout)?;
        }
        // Like PyTorch, the returned weights are the ones actually applied (after dropout).
        let weights = params.need_weights.then(|| probs.clone());
        let out = probs
            .reshape((b, hkv, g * l, s))?
            .matmul(&v)?
            .reshape((b, h, l, dv))?
            .transpose(1, 2)?;
        Ok(AttnOutput {
            output: out.to_dtype(in_dtype)?,
            weights,
            kernel: self.id(),
        })
    }
}

/// `m · |i + S − L − j|` broadcastable to `(B, H, L, S)` (see [`crate::mask::MaskPlan::with_alibi_slopes`]):
/// the slopes `(B or 1, H)` (per sequence for packed ones) times the distances.
fn alibi_bias(c: &AttnCall, slopes: &Tensor, cd: candle_core::DType) -> Result<Tensor> {
    let (l, s, h) = (c.l, c.s, c.h);
    let dev = c.q.device();
    let packed = c.mask.packed_offsets();
    // Keys appended after the plan's (`add_bias_kv` / `add_zero_attn`) are at distance 0.
    let real = s - c.extra_keys;
    let mut dist = crate::mask::alibi_distances((l, real), packed, cd, dev)?;
    if c.extra_keys > 0 {
        dist = dist.pad_with_zeros(3, 0, c.extra_keys)?;
    }
    let slopes = slopes.to_dtype(cd)?.to_device(dev)?;
    let per_row = match packed {
        // Packed: row i takes the slopes of its own sequence.
        Some((cu_q, _)) if slopes.dim(0)? > 1 => {
            let mut seq = vec![0u32; l];
            for (n, w) in cu_q.windows(2).enumerate() {
                seq[w[0]..w[1]].fill(n as u32);
            }
            let idx = Tensor::from_vec(seq, l, dev)?;
            // (L, H) -> (1, H, L, 1)
            slopes.index_select(&idx, 0)?.t()?.reshape((1, h, l, 1))?
        }
        _ => slopes.reshape((slopes.dim(0)?, h, 1, 1))?,
    };
    per_row.broadcast_mul(&dist)
}

/// The reference kernel alone, bypassing the dispatcher's routing (same contract as
/// [`super::attention`]): the yardstick other kernels are tested against.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &crate::mask::MaskPlan,
    params: &super::AttnParams,
) -> Result<AttnOutput> {
    let params = super::AttnParams {
        backend: crate::config::Backend::Reference,
        ..*params
    };
    super::attention(q, k, v, mask, &params)
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
