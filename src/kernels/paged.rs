//! Attention over the block tables of a paged KV pool ([`paged_attention`]).
//!
//! A batch of sequences, each with its own new tokens (packed by `cu_q`, flash-attn's
//! `cu_seqlens_q`) and its own keys, which live in fixed-size blocks of a pool (vLLM's
//! PagedAttention layout): position `t` of sequence `b` is row `t % block_size` of block
//! `tables[b][t / block_size]`. The new tokens of a sequence are its last keys, so the causal
//! mask is bottom-right aligned per sequence; prefill of new requests and decode of running ones
//! share one call.
//!
//! Today's path validates the call ([`validate`]), gathers each sequence's key and value rows
//! into packed `(total_k, Hkv, D)` tensors ([`gather`]) and runs
//! [`sdpa_varlen`](crate::sdpa::sdpa_varlen)'s kernels on them. A kernel reading the blocks in
//! place slots in between the two. The pool that owns the blocks is
//! [`PagedKvPool`](crate::cache::PagedKvPool).

use candle_core::{bail, DType, Result, Tensor};

use crate::cache::QuantKv;
use crate::kernels::{self, AttnParams};
use crate::mask::{MaskDims, MaskPlan};
use crate::sdpa::{SdpaOptions, SdpaOutput, SeqOffsets};
use crate::CausalAlignment;

/// The keys and values of a batch of sequences in a paged pool.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    /// Keys `(num_blocks, block_size, Hkv, D)`, contiguous, in the pool's dtype.
    pub k_pool: &'a Tensor,
    /// Values `(num_blocks, block_size, Hkv, Dv)`, contiguous.
    pub v_pool: &'a Tensor,
    /// Positions per block.
    pub block_size: usize,
    /// Per sequence: its blocks, in position order (position t is in block
    /// `tables[b][t / block_size]`, row `t % block_size`).
    pub tables: &'a [Vec<u32>],
    /// Per sequence: how many keys it has (cached + new), ≤ `tables[b].len() · block_size`.
    pub seq_lens: &'a [usize],
}

/// The shapes of a validated [`paged_attention`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedDims {
    /// Query rows of all sequences.
    pub total_q: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head size of queries and keys.
    pub head_dim: usize,
    /// Head size of values.
    pub v_head_dim: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

/// Attention of the packed new tokens of a batch of sequences over their keys and values in a
/// paged pool.
///
/// `q` `(total_q, H, D)` is packed by `cu_q` (one sequence per entry of `kv.tables`); the new
/// tokens of each sequence are its **last** keys: with no causal alignment in `opts` the mask is
/// [`CausalAlignment::BottomRight`] per sequence (query `i` of a sequence with `L` new tokens
/// and `S` keys sees keys `j <= i + S - L`); `opts.causal(..)` sets another alignment.
/// A sliding window and the score modifiers (soft-cap, ALiBi, sinks), the scale, the
/// fully-masked-row policy and the backend in `opts` apply as in
/// [`sdpa_varlen`](crate::sdpa::sdpa_varlen); an attention mask is refused. `Hkv` must divide
/// `H` (grouped-query attention). Returns `(total_q, H, Dv)`.
///
/// Every argument is checked first (shapes, dtypes, devices, counts, block ids, lengths): a bad
/// one is an error naming it, never a panic or an out-of-bounds read.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_mha::kernels::paged::{paged_attention, PagedKv};
/// use candle_mha::sdpa::{SdpaOptions, SeqOffsets};
/// let dev = Device::Cpu;
/// // A pool of 4 blocks of 2 positions, 1 KV head of size 8.
/// let k_pool = Tensor::randn(0f32, 1., (4, 2, 1, 8), &dev)?;
/// let v_pool = Tensor::randn(0f32, 1., (4, 2, 1, 8), &dev)?;
/// // Sequence 0: 3 keys in blocks 2, 0 (prefill of 3 tokens); sequence 1: 1 key in block 3
/// // (decode of 1 token).
/// let tables = vec![vec![2, 0], vec![3]];
/// let kv = PagedKv { k_pool: &k_pool, v_pool: &v_pool, block_size: 2, tables: &tables, seq_lens: &[3, 1] };
/// let q = Tensor::randn(0f32, 1., (4, 2, 8), &dev)?; // 3 + 1 new tokens, 2 query heads
/// let out = paged_attention(&q, &SeqOffsets::from_lengths(&[3, 1]), &kv, &SdpaOptions::new())?;
/// assert_eq!(out.output.dims(), &[4, 2, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn paged_attention(
    q: &Tensor,
    cu_q: &SeqOffsets,
    kv: &PagedKv,
    opts: &SdpaOptions,
) -> Result<SdpaOutput> {
    let dims = validate(q, cu_q, kv)?;
    if opts.attn_mask.is_some() {
        bail!("paged_attention: an attention mask is not supported (use causal alignment / sliding window)")
    }
    let opts = match opts.causal_alignment() {
        Some(_) => opts.clone(),
        None => opts.clone().causal(CausalAlignment::BottomRight),
    };
    let cu_k = SeqOffsets::from_lengths(kv.seq_lens);
    let mut plan = MaskPlan::new(MaskDims::new(1, dims.heads, dims.total_q, cu_k.total()))
        .with_packed_sequences(cu_q.as_slice(), cu_k.as_slice())?;
    if let Some(c) = opts.causal_mask()? {
        plan = plan.with_causal(c)?;
    }
    let plan = opts.with_modifiers(plan, q)?;
    attend(q, cu_q, kv, &dims, &plan, &opts.params(dims.head_dim)?)
}

/// [`paged_attention`] with a mask plan built once for every layer of a step (packed sequences,
/// causal alignment, window and the layer's score modifiers) and the layer's parameters.
///
/// The fused CPU kernel reads the blocks in place. A step whose sequences all bring the same
/// few new tokens (decoding) runs as a batch, each sequence's keys right-aligned in the
/// longest's positions ([`as_batch`]), which takes the kernel's decoding paths (every KV head
/// walking the keys together, the keys split across threads when there are few sequences);
/// other steps run as packed sequences.
pub(crate) fn paged_attention_planned(
    q: &Tensor,
    cu_q: &SeqOffsets,
    kv: &PagedKv,
    plan: &MaskPlan,
    params: &AttnParams,
) -> Result<SdpaOutput> {
    let dims = validate(q, cu_q, kv)?;
    attend(q, cu_q, kv, &dims, plan, params)
}

/// [`paged_attention_planned`] after [`validate`] (which gave `dims`).
fn attend(
    q: &Tensor,
    cu_q: &SeqOffsets,
    kv: &PagedKv,
    dims: &PagedDims,
    plan: &MaskPlan,
    params: &AttnParams,
) -> Result<SdpaOutput> {
    let rows = |t: &Tensor| -> Result<Tensor> {
        let (nb, bs, h, d) = t.dims4()?;
        t.reshape((1, nb * bs, h, d))
    };
    let (k, v) = (rows(kv.k_pool)?, rows(kv.v_pool)?);
    let dv = dims.v_head_dim;
    if let Some((batch_plan, key_rows, l)) = as_batch(plan, cu_q, kv, dims)? {
        let b = kv.seq_lens.len();
        let q = q.reshape((b, l, dims.heads, dims.head_dim))?;
        let out = kernels::attention_paged(&q, (&k, &v), &key_rows, &batch_plan, params)?;
        return Ok(SdpaOutput {
            output: out.output.reshape((b * l, dims.heads, dv))?,
            kernel: out.kernel,
        });
    }
    let key_rows = gather_rows(kv);
    let out = kernels::attention_paged(&q.unsqueeze(0)?, (&k, &v), &key_rows, plan, params)?;
    Ok(SdpaOutput {
        output: out.output.squeeze(0)?,
        kernel: out.kernel,
    })
}

/// Most new tokens per sequence for which a step runs as a batch ([`as_batch`]): the decoding
/// paths take up to 64 query rows per KV head.
const BATCH_ROWS: usize = 64;

/// The packed `plan` of a step as a batch, when every sequence brings the same `L` new tokens
/// (`L · H / Hkv ≤ 64`), the causal alignment (if any) is bottom-right and nothing else is
/// masked: `(B, H, L, S)` with `S` the longest sequence's keys, sequence `b`'s keys in the last
/// `len_b` positions (left padding; its window, ALiBi distances and sinks unchanged), and the
/// pool row of every `(b, position)` (padding positions name row 0, never read).
pub(crate) fn as_batch(
    plan: &MaskPlan,
    cu_q: &SeqOffsets,
    kv: &PagedKv,
    dims: &PagedDims,
) -> Result<Option<(MaskPlan, Vec<u32>, usize)>> {
    let b = kv.seq_lens.len();
    let l = if b > 0 { cu_q.range(0).len() } else { 0 };
    let g = dims.heads / dims.kv_heads.max(1);
    let uniform = b > 0 && l > 0 && (0..b).all(|n| cu_q.range(n).len() == l);
    let causal = plan.causal();
    let plain = plan.bias().is_none() && plan.key_bias().is_none() && plan.key_ranges().is_none();
    let aligned = causal.is_none_or(|c| c.alignment == CausalAlignment::BottomRight);
    if !(uniform && l * g <= BATCH_ROWS && plain && aligned) {
        return Ok(None);
    }
    let s = kv.seq_lens.iter().copied().max().unwrap_or(0);
    let pads: Vec<usize> = kv.seq_lens.iter().map(|&len| s - len).collect();
    let mut rows = Vec::with_capacity(b * s);
    let bs = kv.block_size;
    for ((table, &len), &pad) in kv.tables.iter().zip(kv.seq_lens).zip(&pads) {
        rows.resize(rows.len() + pad, 0);
        rows.extend((0..len).map(|t| table[t / bs] * bs as u32 + (t % bs) as u32));
    }
    let mut batch = MaskPlan::new(MaskDims::new(b, dims.heads, l, s)).with_left_padding(&pads)?;
    if let Some(c) = causal {
        batch = batch.with_causal(c)?;
    }
    if let Some(c) = plan.softcap() {
        batch = batch.with_softcap(c)?;
    }
    if let Some(t) = plan.alibi_slopes() {
        batch = batch.with_alibi_slopes(t)?;
    }
    if let Some(t) = plan.sinks() {
        batch = batch.with_sinks(t)?;
    }
    Ok(Some((batch, rows, l)))
}

/// [`paged_attention_planned`] over a quantized pool: `kv` holds int8 / fp8 rows and `scales`
/// their f32 scales `(num_blocks, block_size, Hkv)`. The fused CPU kernel reads the blocks in
/// place and widens them in registers, decoding steps as a batch ([`as_batch`]); elsewhere the
/// rows are gathered and dequantized.
pub(crate) fn paged_attention_quantized_planned(
    q: &Tensor,
    cu_q: &SeqOffsets,
    kv: &PagedKv,
    scales: (&Tensor, &Tensor),
    plan: &MaskPlan,
    params: &AttnParams,
) -> Result<SdpaOutput> {
    let dims = validate_stored(q, cu_q, kv, Some(scales))?;
    // The pool as rows: (1, num_blocks · block_size, ...).
    let rows = |t: &Tensor| -> Result<Tensor> {
        let mut shape = t.dims().to_vec();
        shape[1] *= shape[0];
        shape[0] = 1;
        t.reshape(shape)
    };
    let pool = QuantKv {
        k: rows(kv.k_pool)?,
        k_scale: rows(scales.0)?,
        v: rows(kv.v_pool)?,
        v_scale: rows(scales.1)?,
    };
    if let Some((batch_plan, key_rows, l)) = as_batch(plan, cu_q, kv, &dims)? {
        let b = kv.seq_lens.len();
        let q = q.reshape((b, l, dims.heads, dims.head_dim))?;
        let out = kernels::attention_quantized_rows(&q, &pool, &key_rows, &batch_plan, params)?;
        return Ok(SdpaOutput {
            output: out.output.reshape((b * l, dims.heads, dims.v_head_dim))?,
            kernel: out.kernel,
        });
    }
    let key_rows = gather_rows(kv);
    let out = kernels::attention_quantized_rows(&q.unsqueeze(0)?, &pool, &key_rows, plan, params)?;
    Ok(SdpaOutput {
        output: out.output.squeeze(0)?,
        kernel: out.kernel,
    })
}

/// Checks a [`paged_attention`] call: `q` `(total_q, H, D)` float, the pools 4-D, contiguous,
/// of `q`'s dtype and device with `block_size` rows per block and the same blocks and heads,
/// `Hkv` dividing `H`, one table, length and `cu_q` sequence per sequence, every block id in
/// the pool, every length within its table and at least its number of new tokens.
pub fn validate(q: &Tensor, cu_q: &SeqOffsets, kv: &PagedKv) -> Result<PagedDims> {
    validate_stored(q, cu_q, kv, None)
}

/// [`validate`] for pools in `q`'s dtype (`scales: None`) or quantized ones: int8 (`U8`) or fp8
/// rows with their f32 scales `(num_blocks, block_size, Hkv)`.
fn validate_stored(
    q: &Tensor,
    cu_q: &SeqOffsets,
    kv: &PagedKv,
    scales: Option<(&Tensor, &Tensor)>,
) -> Result<PagedDims> {
    let (total_q, heads, head_dim) = match q.dims() {
        &[a, b, c] => (a, b, c),
        other => {
            bail!("paged_attention: q must be 3-D (total_q, heads, head_dim), got shape {other:?}")
        }
    };
    if !q.dtype().is_float() {
        bail!(
            "paged_attention: q must be a float tensor, got {:?}",
            q.dtype()
        )
    }
    let pool_dims = |name: &str, t: &Tensor| -> Result<(usize, usize, usize, usize)> {
        match t.dims() {
            &[a, b, c, d] => Ok((a, b, c, d)),
            other => bail!(
                "paged_attention: {name} must be 4-D (num_blocks, block_size, kv_heads, head_dim), got shape {other:?}"
            ),
        }
    };
    let (num_blocks, bs, kv_heads, kd) = pool_dims("k_pool", kv.k_pool)?;
    let (vnb, vbs, vh, v_head_dim) = pool_dims("v_pool", kv.v_pool)?;
    if kv.block_size == 0 {
        bail!("paged_attention: block_size must be > 0")
    }
    if bs != kv.block_size {
        bail!(
            "paged_attention: block_size is {} but k_pool {:?} has {bs} rows per block",
            kv.block_size,
            kv.k_pool.dims()
        )
    }
    if (vnb, vbs, vh) != (num_blocks, bs, kv_heads) {
        bail!(
            "paged_attention: v_pool {:?} must have the blocks, rows and heads of k_pool {:?}",
            kv.v_pool.dims(),
            kv.k_pool.dims()
        )
    }
    if kd != head_dim {
        bail!(
            "paged_attention: q {:?} and k_pool {:?} must have the same head_dim ({head_dim} vs {kd})",
            q.dims(),
            kv.k_pool.dims()
        )
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        bail!(
            "paged_attention: the number of KV heads ({kv_heads}) must divide the number of query heads ({heads}): q {:?}, k_pool {:?}",
            q.dims(),
            kv.k_pool.dims()
        )
    }
    for (name, t) in [("k_pool", kv.k_pool), ("v_pool", kv.v_pool)] {
        let quantized = matches!(t.dtype(), DType::U8 | DType::F8E4M3);
        if scales.is_some() && !quantized {
            bail!("paged_attention: {name} is {:?}, not int8 (U8) or fp8 rows (F8E4M3) of a quantized pool", t.dtype())
        }
        if scales.is_none() && t.dtype() != q.dtype() {
            bail!(
                "paged_attention: {name} is {:?} but q is {:?} (the pool's dtype must be the queries')",
                t.dtype(),
                q.dtype()
            )
        }
        if !t.device().same_device(q.device()) {
            bail!(
                "paged_attention: {name} is on {:?} but q is on {:?}",
                t.device(),
                q.device()
            )
        }
        if !t.is_contiguous() {
            bail!("paged_attention: {name} {:?} must be contiguous", t.dims())
        }
    }
    if let Some((ks, vs)) = scales {
        for (name, t) in [("k_scale", ks), ("v_scale", vs)] {
            if t.dims() != [num_blocks, bs, kv_heads]
                || t.dtype() != DType::F32
                || !t.is_contiguous()
            {
                bail!(
                    "paged_attention: {name} must be contiguous F32 ({num_blocks}, {bs}, {kv_heads}) (one scale per stored row), got {:?} {:?}",
                    t.dtype(),
                    t.dims()
                )
            }
        }
    }
    if num_blocks
        .checked_mul(bs)
        .is_none_or(|rows| rows > u32::MAX as usize)
    {
        bail!("paged_attention: the pool has {num_blocks} blocks of {bs} rows: more than 2^32 rows")
    }
    let n = cu_q.num_seqs();
    if kv.tables.len() != n || kv.seq_lens.len() != n {
        bail!(
            "paged_attention: cu_q has {n} sequences but there are {} block tables and {} seq_lens",
            kv.tables.len(),
            kv.seq_lens.len()
        )
    }
    if cu_q.total() != total_q {
        bail!(
            "paged_attention: cu_q ends at {} but q {:?} has {total_q} rows",
            cu_q.total(),
            q.dims()
        )
    }
    for (b, (table, &len)) in kv.tables.iter().zip(kv.seq_lens).enumerate() {
        if let Some((i, &id)) = table
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= num_blocks)
        {
            bail!("paged_attention: tables[{b}][{i}] = block {id}, but the pool has {num_blocks} blocks")
        }
        let cap = table.len() * bs;
        if len > cap {
            bail!(
                "paged_attention: seq_lens[{b}] = {len} but tables[{b}] has {} blocks of {bs} positions ({cap})",
                table.len()
            )
        }
        let new = cu_q.range(b).len();
        if new > len {
            bail!("paged_attention: sequence {b} has {new} new tokens but only {len} keys (its new tokens are its last keys: seq_lens counts them)")
        }
    }
    Ok(PagedDims {
        total_q,
        heads,
        kv_heads,
        head_dim,
        v_head_dim,
        num_blocks,
    })
}

/// The pool rows of every sequence's keys, in order: sequence after sequence, position after
/// position (`tables[b][t / block_size] · block_size + t % block_size`). Call after [`validate`].
pub fn gather_rows(kv: &PagedKv) -> Vec<u32> {
    let bs = kv.block_size;
    let mut rows = Vec::with_capacity(kv.seq_lens.iter().sum());
    for (table, &len) in kv.tables.iter().zip(kv.seq_lens) {
        for (i, &block) in table.iter().enumerate() {
            let start = i * bs;
            if start >= len {
                break;
            }
            let base = block * bs as u32;
            rows.extend((0..(len - start).min(bs) as u32).map(|r| base + r));
        }
    }
    rows
}

/// Each sequence's keys and values copied out of the pool, packed: `(total_k, Hkv, D)`,
/// `(total_k, Hkv, Dv)` and their offsets. Call after [`validate`].
pub fn gather(kv: &PagedKv) -> Result<(Tensor, Tensor, SeqOffsets)> {
    let rows = gather_rows(kv);
    let cu_k = SeqOffsets::from_lengths(kv.seq_lens);
    let idx = Tensor::from_vec(rows, cu_k.total(), kv.k_pool.device())?;
    let flat = |t: &Tensor| -> Result<Tensor> {
        let (nb, bs, h, d) = t.dims4()?;
        t.reshape((nb * bs, h, d))?.index_select(&idx, 0)
    };
    Ok((flat(kv.k_pool)?, flat(kv.v_pool)?, cu_k))
}
