//! [`sdpa_varlen`]: attention over packed variable-length sequences.

use candle_core::{bail, Result, Tensor};

use super::{SdpaOptions, SdpaOutput, SeqOffsets};
use crate::kernels::{
    self,
    validate::{self, QkvDims, QkvLayout},
};
use crate::mask::{MaskDims, MaskPlan};

/// Attention over sequences of different lengths packed one after the other, as flash-attn's
/// `flash_attn_varlen_func` takes them.
///
/// `q (total_q, H, D)`, `k (total_k, Hkv, D)`, `v (total_k, Hkv, Dv)`; `cu_q` and `cu_k` hold
/// the same number of sequences (build them from `cu_seqlens` tensors or from lengths:
/// [`SeqOffsets`]). Sequence `b`'s queries (rows `cu_q[b]..cu_q[b+1]`) attend only to its own
/// keys (rows `cu_k[b]..cu_k[b+1]`); a causal alignment or sliding window in `opts` applies
/// within each sequence with that sequence's own lengths. A sequence may have no queries, and
/// one with no keys gives zero rows (or NaN with [`MaskedRowPolicy::Nan`]). `Hkv` must divide
/// `H`. Returns `(total_q, H, Dv)`.
///
/// No compute is spent across sequences: the fused CPU kernel only visits the key tiles of each
/// query tile's own sequences. `opts`' attention mask is not available here (an error), and its
/// layout does not apply.
///
/// [`MaskedRowPolicy::Nan`]: crate::MaskedRowPolicy::Nan
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_mha::sdpa::{sdpa_varlen, SdpaOptions, SeqOffsets};
/// use candle_mha::CausalAlignment;
/// let dev = Device::Cpu;
/// let cu = SeqOffsets::from_lengths(&[3, 5, 0, 2]); // four sequences, 10 tokens
/// let q = Tensor::randn(0f32, 1., (10, 4, 8), &dev)?;
/// let kv = Tensor::randn(0f32, 1., (10, 2, 8), &dev)?;
/// let opts = SdpaOptions::new().causal(CausalAlignment::TopLeft);
/// let out = sdpa_varlen(&q, &kv, &kv, &cu, &cu, &opts)?;
/// assert_eq!(out.dims(), &[10, 4, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn sdpa_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_q: &SeqOffsets,
    cu_k: &SeqOffsets,
    opts: &SdpaOptions,
) -> Result<Tensor> {
    Ok(sdpa_varlen_with_kernel(q, k, v, cu_q, cu_k, opts)?.output)
}

internal! {
    /// [`sdpa_varlen`], also saying which kernel served the call.
    fn sdpa_varlen_with_kernel(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cu_q: &SeqOffsets,
        cu_k: &SeqOffsets,
        opts: &SdpaOptions,
    ) -> Result<SdpaOutput> {
        if opts.attn_mask.is_some() {
            bail!("sdpa_varlen: an attention mask is not supported with packed sequences (use causal alignment / sliding window, or sdpa on a padded batch)")
        }
        let layout = QkvLayout {
            caller: "sdpa_varlen",
            rank: 3,
            shape: "3-D (total, heads, head_dim)",
            batch: None,
            seq: 0,
            heads: 1,
            dim: 2,
            read_as: None,
        };
        let QkvDims {
            l: tq,
            h,
            d,
            s: tk,
            ..
        } = validate::qkv(&layout, q, k, v)?;
        if cu_q.num_seqs() != cu_k.num_seqs() {
            bail!(
                "sdpa_varlen: cu_seqlens_q has {} sequences but cu_seqlens_k has {}",
                cu_q.num_seqs(),
                cu_k.num_seqs()
            )
        }
        if cu_q.total() != tq {
            bail!(
                "sdpa_varlen: cu_seqlens_q ends at {} but q {:?} has {tq} rows",
                cu_q.total(),
                q.dims()
            )
        }
        if cu_k.total() != tk {
            bail!(
                "sdpa_varlen: cu_seqlens_k ends at {} but k {:?} has {tk} rows",
                cu_k.total(),
                k.dims()
            )
        }
        let params = opts.params(d)?;
        // Empty calls (no rows, or no keys) are served by the dispatcher without a kernel.
        let mut plan = MaskPlan::new(MaskDims::new(1, h, tq, tk))
            .with_packed_sequences(cu_q.as_slice(), cu_k.as_slice())?;
        if let Some(c) = opts.causal_mask()? {
            plan = plan.with_causal(c)?;
        }
        let plan = opts.with_modifiers(plan, q)?;
        let out = kernels::attention(
            &q.unsqueeze(0)?,
            &k.unsqueeze(0)?,
            &v.unsqueeze(0)?,
            &plan,
            &params,
        )?;
        Ok(SdpaOutput {
            output: out.output.squeeze(0)?,
            kernel: out.kernel,
        })
    }
}
