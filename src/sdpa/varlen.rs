//! [`sdpa_varlen`]: attention over packed variable-length sequences.

use candle_core::{bail, Result, Tensor};

use super::{SdpaOptions, SdpaOutput, SeqOffsets};
use crate::kernels;
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

/// [`sdpa_varlen`], also saying which kernel served the call.
pub fn sdpa_varlen_with_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_q: &SeqOffsets,
    cu_k: &SeqOffsets,
    opts: &SdpaOptions,
) -> Result<SdpaOutput> {
    varlen(q, (k, v), None, (cu_q, cu_k), opts)
}

/// [`sdpa_varlen`] over keys and values gathered by row: packed key `j` is row `rows[j]` of `k`
/// `(R, Hkv, D)` and `v` `(R, Hkv, Dv)` (a paged KV cache's blocks viewed as rows; every row id
/// must be below `R`). The fused CPU kernel reads them in place; other kernels gather them.
pub(crate) fn sdpa_varlen_rows(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    rows: &[u32],
    (cu_q, cu_k): (&SeqOffsets, &SeqOffsets),
    opts: &SdpaOptions,
) -> Result<SdpaOutput> {
    varlen(q, (k, v), Some(rows), (cu_q, cu_k), opts)
}

fn varlen(
    q: &Tensor,
    (k, v): (&Tensor, &Tensor),
    rows: Option<&[u32]>,
    (cu_q, cu_k): (&SeqOffsets, &SeqOffsets),
    opts: &SdpaOptions,
) -> Result<SdpaOutput> {
    if opts.attn_mask.is_some() {
        bail!("sdpa_varlen: an attention mask is not supported with packed sequences (use causal alignment / sliding window, or sdpa on a padded batch)")
    }
    let dims3 = |name: &str, t: &Tensor| -> Result<(usize, usize, usize)> {
        match t.dims() {
            &[a, b, c] => Ok((a, b, c)),
            other => bail!(
                "sdpa_varlen: {name} must be 3-D (total, heads, head_dim), got shape {other:?}"
            ),
        }
    };
    let (tq, h, d) = dims3("q", q)?;
    let (rk, hkv, dk) = dims3("k", k)?;
    let (tv, hv, _) = dims3("v", v)?;
    let (tk, tv) = match rows {
        Some(rows) => {
            if let Some(&bad) = rows.iter().find(|&&r| r as usize >= rk) {
                bail!(
                    "sdpa_varlen: key row {bad} is outside the {rk} rows of k {:?}",
                    k.dims()
                )
            }
            (rows.len(), if tv == rk { rows.len() } else { tv })
        }
        None => (rk, tv),
    };
    if (tv, hv) != (tk, hkv) {
        bail!(
            "sdpa_varlen: k {:?} and v {:?} must have the same rows and heads",
            k.dims(),
            v.dims()
        )
    }
    if dk != d {
        bail!(
            "sdpa_varlen: q {:?} and k {:?} must have the same head_dim",
            q.dims(),
            k.dims()
        )
    }
    if hkv == 0 || !h.is_multiple_of(hkv) {
        bail!(
            "sdpa_varlen: the number of KV heads ({hkv}) must divide the number of query heads ({h}): q {:?}, k {:?}",
            q.dims(),
            k.dims()
        )
    }
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
            "sdpa_varlen: cu_seqlens_k ends at {} but k {:?} gives {tk} keys",
            cu_k.total(),
            k.dims()
        )
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!(
            "sdpa_varlen: q, k and v must have the same dtype, got {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    if !q.dtype().is_float() {
        bail!("sdpa_varlen: expected float inputs, got {:?}", q.dtype())
    }
    let params = opts.params(d)?;
    // Empty calls (no rows, or no keys) are served by the dispatcher without a kernel.
    let mut plan = MaskPlan::new(MaskDims::new(1, h, tq, tk))
        .with_packed_sequences(cu_q.as_slice(), cu_k.as_slice())?;
    if let Some(c) = opts.causal_mask()? {
        plan = plan.with_causal(c)?;
    }
    let plan = opts.with_modifiers(plan, q)?;
    let (q, k, v) = (q.unsqueeze(0)?, k.unsqueeze(0)?, v.unsqueeze(0)?);
    let out = match rows {
        Some(rows) => kernels::attention_paged(&q, (&k, &v), rows, &plan, &params)?,
        None => kernels::attention(&q, &k, &v, &plan, &params)?,
    };
    Ok(SdpaOutput {
        output: out.output.squeeze(0)?,
        kernel: out.kernel,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::config::Backend;
    use crate::kernels::KernelId;
    use crate::CausalAlignment;

    /// A small deterministic generator (no dependency for a unit test).
    struct Lcg(u64);
    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n.max(1) as u64) as usize
        }
    }

    /// Keys gathered by row (a paged cache's blocks in shuffled order, blocks of 1 to 64
    /// positions, sequences with 0 to 300 keys and their last 0 to 9 as queries, modifiers and
    /// windows drawn at random) equal the same call on the gathered keys, in f32 and bf16: the
    /// fused CPU kernel reads them in place (tiles cut at block edges), the reference gathers.
    #[test]
    fn gathered_rows_equal_gathered_keys() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Lcg(7);
        for case in 0..48 {
            let bs = [1usize, 3, 16, 64][case % 4];
            let dtype = if case % 3 == 2 {
                DType::BF16
            } else {
                DType::F32
            };
            let (hkv, g, d) = (
                1 + rng.below(2),
                1 + rng.below(3),
                [8usize, 32, 64][rng.below(3)],
            );
            let n = 1 + rng.below(4);
            let lens: Vec<usize> = (0..n).map(|_| rng.below(300)).collect();
            let news: Vec<usize> = lens.iter().map(|&s| rng.below(10).min(s)).collect();
            let blocks: Vec<usize> = lens.iter().map(|s| s.div_ceil(bs)).collect();
            let nb = blocks.iter().sum::<usize>() + 3;
            // Blocks handed out in a shuffled order (sometimes in order: long runs).
            let mut free: Vec<u32> = (0..nb as u32).collect();
            if case % 5 != 0 {
                for i in (1..free.len()).rev() {
                    free.swap(i, rng.below(i + 1));
                }
            }
            let mut rows = vec![];
            for (b, &s) in lens.iter().enumerate() {
                let table: Vec<u32> = free.drain(..blocks[b]).collect();
                rows.extend((0..s).map(|t| table[t / bs] * bs as u32 + (t % bs) as u32));
            }
            let t = |shape: (usize, usize, usize)| -> Result<Tensor> {
                Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(dtype)
            };
            let (kp, vp) = (t((nb * bs, hkv, d))?, t((nb * bs, hkv, d))?);
            let q = t((news.iter().sum(), hkv * g, d))?;
            let ids = Tensor::from_slice(&rows, rows.len(), &dev)?;
            let (kd, vd) = (kp.index_select(&ids, 0)?, vp.index_select(&ids, 0)?);
            let (cu_q, cu_k) = (
                SeqOffsets::from_lengths(&news),
                SeqOffsets::from_lengths(&lens),
            );
            let mut opts = SdpaOptions::new().causal(CausalAlignment::BottomRight);
            if rng.below(3) == 0 {
                opts = opts.sliding_window(1 + rng.below(40));
            }
            if rng.below(3) == 0 {
                opts = opts.softcap(5.0);
            }
            for backend in [Backend::Auto, Backend::Reference] {
                let opts = opts.clone().backend(backend);
                let want = sdpa_varlen_with_kernel(&q, &kd, &vd, &cu_q, &cu_k, &opts)?;
                let got = sdpa_varlen_rows(&q, (&kp, &vp), &rows, (&cu_q, &cu_k), &opts)?;
                if backend == Backend::Auto && got.output.elem_count() > 0 {
                    assert_eq!(got.kernel, KernelId::Cpu, "case {case}");
                }
                let diff = (got.output.to_dtype(DType::F32)?
                    - want.output.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
                let tol = if dtype == DType::F32 { 2e-6 } else { 1.6e-2 };
                assert!(diff <= tol, "case {case} {backend:?} bs {bs}: {diff}");
            }
        }
        Ok(())
    }

    /// A row id outside the pool is an error naming it, not a read out of bounds.
    #[test]
    fn row_outside_the_pool_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let kv = Tensor::zeros((4, 1, 8), DType::F32, &dev)?;
        let q = Tensor::zeros((1, 1, 8), DType::F32, &dev)?;
        let cu = (
            SeqOffsets::from_lengths(&[1]),
            SeqOffsets::from_lengths(&[2]),
        );
        let err = sdpa_varlen_rows(&q, (&kv, &kv), &[0, 4], (&cu.0, &cu.1), &SdpaOptions::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("key row 4 is outside the 4 rows"), "{err}");
        Ok(())
    }
}
