//! [`MaskPlan`]: every mask of one attention call, validated and merged once.
//!
//! See [`MaskPlan`].

use std::sync::Arc;

use candle_core::{bail, DType, Device, Result, Tensor, D};

use super::modifiers::{check_alibi, check_sinks, check_softcap, ScoreMods};
use super::{AttnMask, Causal, KeyPaddingMask};

/// The shapes a [`MaskPlan`] is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskDims {
    /// Batch size B.
    pub batch: usize,
    /// Query heads H.
    pub heads: usize,
    /// Query length L.
    pub q_len: usize,
    /// Maskable key length S (keys appended by `add_bias_kv` / `add_zero_attn` come after these
    /// and are never masked).
    pub kv_len: usize,
    /// Whether the caller's input was unbatched (then B = 1 and masks may omit B).
    pub unbatched: bool,
}

impl MaskDims {
    /// Batched dimensions `(B, H, L, S)`.
    pub fn new(batch: usize, heads: usize, q_len: usize, kv_len: usize) -> Self {
        Self {
            batch,
            heads,
            q_len,
            kv_len,
            unbatched: false,
        }
    }
}

/// Packed sequences: cumulative query and key offsets, `n + 1` each.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Packed {
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
}

/// Every mask of one attention call, validated against its shapes and merged: what the kernels
/// receive.
///
/// A plan keeps what has structure as structure (the causal diagonal with its alignment and
/// sliding window, one visible key range per batch element for right or left padding, packed
/// sequences), so that fused kernels skip whole tiles and never read a mask tensor for it; only
/// the tensors a caller passes stay dense (a float key padding mask, the attention mask), in the
/// compute dtype.
///
/// Building one converts boolean masks, checks every shape and, for a boolean key padding mask,
/// reads it once to find its ranges: a model with many layers builds it once per forward with
/// [`MultiHeadAttention::mask_plan`](crate::MultiHeadAttention::mask_plan) (or
/// [`mask_plan_cached`](crate::MultiHeadAttention::mask_plan_cached) when decoding with a KV
/// cache) and hands it to every layer with [`MhaInput::mask_plan`](crate::MhaInput::mask_plan).
/// Its contents are not part of the API.
#[derive(Debug, Clone)]
pub struct MaskPlan {
    dims: MaskDims,
    causal: Option<Causal>,
    key_ranges: Option<Arc<[(usize, usize)]>>,
    key_bias: Option<Tensor>,
    bias: Option<Tensor>,
    packed: Option<Arc<Packed>>,
    mods: ScoreMods,
}

impl MaskPlan {
    internal! {
        /// A plan that masks nothing.
        fn new(dims: MaskDims) -> Self {
            Self {
                dims,
                causal: None,
                key_ranges: None,
                key_bias: None,
                bias: None,
                packed: None,
                mods: ScoreMods::default(),
            }
        }
    }

    internal! {
        /// Logit soft-capping: `s ← c · tanh(s / c)` on the scaled logits, before ALiBi and the
        /// masks (Gemma 2's `attn_logit_softcapping`). `c` must be finite and positive.
        fn with_softcap(mut self, c: f64) -> Result<Self> {
            self.mods.softcap = Some(check_softcap(c)?);
            Ok(self)
        }
    }

    internal! {
        /// ALiBi: `s_ij ← s_ij − m · |i + S − L − j|` with `m` the slope of the query head, from
        /// `slopes` of shape `(H,)` or `(B, H)` (queries aligned to the end of the keys). With packed
        /// sequences (set them first) `B` counts sequences and `L`, `S`, `i`, `j` are each
        /// sequence's own. Added after soft-capping, before the masks.
        fn with_alibi_slopes(mut self, slopes: &Tensor) -> Result<Self> {
            let seqs = self.packed.as_deref().map(|p| p.cu_q.len() - 1);
            self.mods.alibi = Some(check_alibi(slopes, self.dims, seqs)?);
            Ok(self)
        }
    }

    internal! {
        /// Attention sinks: one logit per query head (`(H,)`) joined to every row's softmax as a key
        /// without a value. A row whose keys are all masked then gives 0.
        fn with_sinks(mut self, sinks: &Tensor) -> Result<Self> {
            self.mods.sinks = Some(check_sinks(sinks, self.dims)?);
            Ok(self)
        }
    }

    internal! {
        /// The soft-cap, if any.
        fn softcap(&self) -> Option<f64> {
            self.mods.softcap
        }
    }

    internal! {
        /// The ALiBi slopes as `(B or 1, H)` (`B`: sequences, for packed ones), if any.
        fn alibi_slopes(&self) -> Option<&Tensor> {
            self.mods.alibi.as_ref()
        }
    }

    internal! {
        /// The sink logits `(H,)`, if any.
        fn sinks(&self) -> Option<&Tensor> {
            self.mods.sinks.as_ref()
        }
    }

    internal! {
        /// Whether any score modifier (soft-cap, ALiBi, sinks) is set.
        fn has_score_modifiers(&self) -> bool {
            self.mods.any()
        }
    }

    /// The score modifiers set, by name (`"softcap, alibi, sinks"`), for messages.
    pub(crate) fn score_modifier_names(&self) -> String {
        self.mods.names()
    }

    internal! {
        /// Validates and merges the user's masks (any may be `None`), converting tensors to additive
        /// masks in `dtype` (the compute dtype: f32, or f64 for f64 inputs) on `device`.
        fn build(
            dims: MaskDims,
            key_padding: Option<&KeyPaddingMask>,
            attn_mask: Option<&AttnMask>,
            causal: Option<Causal>,
            dtype: DType,
            device: &Device,
        ) -> Result<Self> {
            let mut plan = Self::new(dims);
            if let Some(c) = causal {
                plan = plan.with_causal(c)?;
            }
            if let Some(kpm) = key_padding {
                plan = plan.with_key_padding(kpm, dtype, device)?;
            }
            if let Some(m) = attn_mask {
                plan = plan.with_attn_mask(m, dtype, device)?;
            }
            Ok(plan)
        }
    }

    internal! {
        /// Adds the causal structure (alignment and optional sliding window).
        fn with_causal(mut self, causal: impl Into<Causal>) -> Result<Self> {
            let causal = causal.into();
            if causal.window == Some(0) {
                bail!("sliding window must be at least 1 key, got 0")
            }
            self.causal = Some(causal);
            Ok(self)
        }
    }

    internal! {
        /// Adds a key padding mask: lengths and boolean masks whose kept keys are contiguous become
        /// key ranges; a float mask (or a boolean one with holes) stays a dense `(B, S)` bias.
        fn with_key_padding(
            self,
            mask: &KeyPaddingMask,
            dtype: DType,
            device: &Device,
        ) -> Result<Self> {
            let MaskDims {
                batch: b,
                kv_len: s,
                unbatched,
                ..
            } = self.dims;
            match mask {
                KeyPaddingMask::Lengths(lens) => {
                    if lens.len() != b {
                        bail!(
                            "key padding lengths: expected one length per batch element ({b}), got {}",
                            lens.len()
                        )
                    }
                    if let Some(bad) = lens.iter().find(|&&n| n > s) {
                        bail!("key padding lengths: length {bad} exceeds the key sequence length {s}")
                    }
                    let ranges: Vec<_> = lens.iter().map(|&n| (0, n)).collect();
                    self.with_key_ranges(&ranges)
                }
                KeyPaddingMask::Tensor(t) => {
                    check_device("key_padding_mask", t, device)?;
                    let expected: &[usize] = if unbatched { &[s] } else { &[b, s] };
                    if t.dims() != expected {
                        // (S, B) for (B, S): the module read (B, L, E) inputs as (L, B, E).
                        let hint = if !unbatched && t.dims() == [s, b] && s != b {
                            "; the inputs were read as (L, B, E): if they are (B, L, E), set batch_first (MhaConfig::with_batch_first(true))"
                        } else {
                            ""
                        };
                        bail!(
                            "key_padding_mask: expected shape {expected:?} ({}), got {:?}{hint}",
                            if unbatched { "S" } else { "B, S" },
                            t.dims()
                        )
                    }
                    if !t.dtype().is_float() {
                        if let Some(ranges) = contiguous_ranges(t, b, s)? {
                            return self.with_key_ranges(&ranges);
                        }
                    }
                    self.no_key_padding_yet()?;
                    let bias = to_additive(t, !t.dtype().is_float(), dtype)?.reshape((b, s))?;
                    Ok(Self {
                        key_bias: Some(bias),
                        ..self
                    })
                }
            }
        }
    }

    internal! {
        /// Restricts batch element `b` to the keys `ranges[b].0 .. ranges[b].1` (right padding:
        /// `(0, len)`; left padding: `(pad, S)`).
        fn with_key_ranges(self, ranges: &[(usize, usize)]) -> Result<Self> {
            let (b, s) = (self.dims.batch, self.dims.kv_len);
            if ranges.len() != b {
                bail!(
                    "key ranges: expected one range per batch element ({b}), got {}",
                    ranges.len()
                )
            }
            if let Some(bad) = ranges.iter().find(|&&(lo, hi)| lo > hi || hi > s) {
                bail!("key ranges: {bad:?} is not a range within the {s} keys")
            }
            self.no_key_padding_yet()?;
            Ok(Self {
                key_ranges: Some(ranges.into()),
                ..self
            })
        }
    }

    internal! {
        /// Left-padded sequences: the first `pad[b]` keys of batch element `b` are padding (counts
        /// past `S` mask every key).
        fn with_left_padding(self, pad: &[usize]) -> Result<Self> {
            let s = self.dims.kv_len;
            let ranges: Vec<_> = pad.iter().map(|&p| (p.min(s), s)).collect();
            self.with_key_ranges(&ranges)
        }
    }

    internal! {
        /// Packed variable-length sequences (B must be 1): `cu_q` and `cu_k` are the cumulative
        /// query and key offsets (`n + 1` each, from 0 to L and to S; a sequence may be empty).
        /// Query row `i` of sequence `n` sees only the keys of sequence `n`; a causal mask then
        /// applies within each sequence, with its own lengths.
        fn with_packed_sequences(mut self, cu_q: &[usize], cu_k: &[usize]) -> Result<Self> {
            let MaskDims {
                batch,
                q_len,
                kv_len,
                ..
            } = self.dims;
            if batch != 1 {
                bail!("packed sequences: the batch size must be 1 (all sequences in one row), got {batch}")
            }
            if cu_q.len() != cu_k.len() || cu_q.len() < 2 {
                bail!(
                    "packed sequences: cu_seqlens_q and cu_seqlens_k must both hold n + 1 >= 2 offsets, got {} and {}",
                    cu_q.len(),
                    cu_k.len()
                )
            }
            for (name, cu, total) in [
                ("cu_seqlens_q", cu_q, q_len),
                ("cu_seqlens_k", cu_k, kv_len),
            ] {
                if cu[0] != 0 || cu[cu.len() - 1] != total || cu.windows(2).any(|w| w[0] > w[1]) {
                    bail!("packed sequences: {name} must rise from 0 to {total}, got {cu:?}")
                }
            }
            self.packed = Some(Arc::new(Packed {
                cu_q: cu_q.to_vec(),
                cu_k: cu_k.to_vec(),
            }));
            Ok(self)
        }
    }

    internal! {
        /// Adds an explicit attention mask (see [`crate::mask`] for its shapes and polarity).
        fn with_attn_mask(
            mut self,
            mask: &AttnMask,
            dtype: DType,
            device: &Device,
        ) -> Result<Self> {
            let MaskDims {
                batch: b,
                heads: h,
                q_len: l,
                kv_len: s,
                unbatched,
            } = self.dims;
            let t = mask.tensor();
            check_device("attn_mask", t, device)?;
            if let AttnMask::Additive(_) = mask {
                if !t.dtype().is_float() {
                    bail!(
                        "attn_mask: an additive mask must be float, got {:?}",
                        t.dtype()
                    )
                }
            }
            let t4 = match t.dims() {
                &[ml, ms] => {
                    if (ml, ms) != (l, s) {
                        bail!(
                            "attn_mask: the shape of the 2D attn_mask is {:?}, but should be {:?} (L, S)",
                            t.dims(),
                            [l, s]
                        )
                    }
                    t.reshape((1, 1, l, s))?
                }
                &[bh, ml, ms] => {
                    if (bh, ml, ms) != (b * h, l, s) {
                        bail!(
                            "attn_mask: the shape of the 3D attn_mask is {:?}, but should be {:?} ({}, L, S)",
                            t.dims(),
                            [b * h, l, s],
                            if unbatched { "H" } else { "B*H" }
                        )
                    }
                    t.reshape((b, h, l, s))?
                }
                &[mb, mh, ml, ms] => {
                    let ok = |got: usize, want: usize| got == want || got == 1;
                    if !(ok(mb, b) && ok(mh, h) && ok(ml, l) && ms == s) {
                        bail!(
                            "attn_mask: the shape of the 4D attn_mask is {:?}, but should be {:?} (B, H, L, S; B, H and L may be 1)",
                            t.dims(),
                            [b, h, l, s]
                        )
                    }
                    t.clone()
                }
                other => bail!(
                    "attn_mask: expected a 2-D (L, S), 3-D (B*H, L, S) or 4-D (B, H, L, S) mask, got shape {other:?}"
                ),
            };
            let is_bool = matches!(mask, AttnMask::Bool(_)) || !t.dtype().is_float();
            self.bias = Some(to_additive(&t4, is_bool, dtype)?);
            Ok(self)
        }
    }

    fn no_key_padding_yet(&self) -> Result<()> {
        if self.key_ranges.is_some() || self.key_bias.is_some() {
            bail!("key padding given twice (a key padding mask and left padding / lengths / ranges): give one")
        }
        Ok(())
    }

    internal! {
        /// The shapes the plan was built for.
        fn dims(&self) -> MaskDims {
            self.dims
        }
    }

    internal! {
        /// The causal structure.
        fn causal(&self) -> Option<Causal> {
            self.causal
        }
    }

    internal! {
        /// Visible key range per batch element, when key padding has that structure.
        fn key_ranges(&self) -> Option<&[(usize, usize)]> {
            self.key_ranges.as_deref()
        }
    }

    internal! {
        /// Dense additive key padding `(B, S)` in the compute dtype (float masks, or boolean masks
        /// whose kept keys are not contiguous).
        fn key_bias(&self) -> Option<&Tensor> {
            self.key_bias.as_ref()
        }
    }

    internal! {
        /// Dense additive attention mask, 4-D, broadcastable to `(B, H, L, S)`, in the compute dtype.
        fn bias(&self) -> Option<&Tensor> {
            self.bias.as_ref()
        }
    }

    internal! {
        /// Whether the plan holds packed sequences.
        fn is_packed(&self) -> bool {
            self.packed.is_some()
        }
    }

    internal! {
        /// The packed sequences' cumulative query and key offsets, when the plan has them.
        fn packed_offsets(&self) -> Option<(&[usize], &[usize])> {
            self.packed.as_deref().map(|p| (&p.cu_q[..], &p.cu_k[..]))
        }
    }

    internal! {
        /// Whether nothing is masked (score modifiers aside: see [`MaskPlan::has_score_modifiers`]).
        fn is_empty(&self) -> bool {
            !self.has_structure() && self.key_bias.is_none() && self.bias.is_none()
        }
    }

    internal! {
        /// Whether [`Self::row_range`] can be narrower than all keys.
        fn has_structure(&self) -> bool {
            self.causal.is_some() || self.key_ranges.is_some() || self.packed.is_some()
        }
    }

    internal! {
        /// The keys `lo..hi` (of the S maskable ones) that query `i` of batch element `b` may see by
        /// the structured parts of the plan (causal and window, key ranges, packed sequences); empty
        /// (`lo == hi`) when it sees none. Dense biases may mask more.
        fn row_range(&self, b: usize, i: usize) -> (usize, usize) {
            let (l, s) = (self.dims.q_len, self.dims.kv_len);
            let (mut lo, mut hi) = match &self.packed {
                None => match self.causal {
                    Some(c) => c.key_range(i, l, s),
                    None => (0, s),
                },
                Some(p) => {
                    // The last sequence starting at or before row i (empty sequences hold no row).
                    let n = p.cu_q.partition_point(|&x| x <= i) - 1;
                    let (q0, q1) = (p.cu_q[n], p.cu_q[n + 1]);
                    let (k0, k1) = (p.cu_k[n], p.cu_k[n + 1]);
                    let (lo, hi) = match self.causal {
                        Some(c) => c.key_range(i - q0, q1 - q0, k1 - k0),
                        None => (0, k1 - k0),
                    };
                    (k0 + lo, k0 + hi)
                }
            };
            if let Some(r) = &self.key_ranges {
                let (rlo, rhi) = r[b];
                lo = lo.max(rlo);
                hi = hi.min(rhi);
            }
            (lo, hi.max(lo))
        }
    }

    /// Errors unless the plan was built for `(b, h, l, s)` (`what` names the caller).
    pub(crate) fn check_dims(
        &self,
        what: &str,
        b: usize,
        h: usize,
        l: usize,
        s: usize,
    ) -> Result<()> {
        let d = self.dims;
        if (d.batch, d.heads, d.q_len, d.kv_len) != (b, h, l, s) {
            bail!(
                "{what}: the mask plan was built for (B, H, L, S) = ({}, {}, {}, {}), this call has ({b}, {h}, {l}, {s})",
                d.batch,
                d.heads,
                d.q_len,
                d.kv_len
            )
        }
        Ok(())
    }

    internal! {
        /// The whole plan as one additive tensor in `dtype`, broadcastable to
        /// `(B, H, L, S + extra_keys)` (the appended keys get 0), or `None` when nothing is masked.
        fn materialize(
            &self,
            extra_keys: usize,
            dtype: DType,
            device: &Device,
        ) -> Result<Option<Tensor>> {
            let MaskDims {
                batch: b,
                q_len: l,
                kv_len: s,
                ..
            } = self.dims;
            let mut acc: Option<Tensor> = None;
            let mut add = |t: Tensor| -> Result<()> {
                acc = Some(match acc.take() {
                    None => t,
                    Some(a) => a.broadcast_add(&t)?,
                });
                Ok(())
            };
            if let Some(bias) = &self.bias {
                add(bias.to_dtype(dtype)?)?;
            }
            if let Some(t) = &self.key_bias {
                add(t.to_dtype(dtype)?.reshape((b, 1, 1, s))?)?;
            }
            if self.has_structure() {
                // Per batch element only when the structure differs between them.
                let nb = if self.key_ranges.is_some() { b } else { 1 };
                let mut v = vec![f32::NEG_INFINITY; nb * l * s];
                for bi in 0..nb {
                    for i in 0..l {
                        let (lo, hi) = self.row_range(bi, i);
                        let row = (bi * l + i) * s;
                        v[row + lo..row + hi].fill(0.0);
                    }
                }
                add(Tensor::from_vec(v, (nb, 1, l, s), device)?.to_dtype(dtype)?)?;
            }
            match acc {
                None => Ok(None),
                Some(t) if extra_keys > 0 => {
                    let mut dims = t.dims().to_vec();
                    dims[3] = extra_keys;
                    let pad = Tensor::zeros(dims, dtype, device)?;
                    Ok(Some(Tensor::cat(&[&t, &pad], D::Minus1)?))
                }
                Some(t) => Ok(Some(t)),
            }
        }
    }
}

/// Per batch element, the range of kept keys of a boolean (nonzero = ignore) `(B, S)` / `(S,)`
/// mask, or `None` when some row's kept keys are not contiguous.
fn contiguous_ranges(t: &Tensor, b: usize, s: usize) -> Result<Option<Vec<(usize, usize)>>> {
    if s == 0 {
        return Ok(Some(vec![(0, 0); b]));
    }
    let ignore = t.ne(0u32)?.flatten_all()?.to_vec1::<u8>()?;
    let mut ranges = Vec::with_capacity(b);
    for row in ignore.chunks(s) {
        let lo = row.iter().position(|&x| x == 0).unwrap_or(s);
        let hi = row.iter().rposition(|&x| x == 0).map_or(lo, |j| j + 1);
        if row[lo..hi].iter().any(|&x| x != 0) {
            return Ok(None);
        }
        ranges.push((lo, hi));
    }
    Ok(Some(ranges))
}

fn to_additive(t: &Tensor, is_bool: bool, dtype: DType) -> Result<Tensor> {
    if is_bool {
        let masked = t.ne(0u32)?;
        let zeros = Tensor::zeros(t.shape(), dtype, t.device())?;
        let ninf = Tensor::full(f32::NEG_INFINITY, t.shape(), t.device())?.to_dtype(dtype)?;
        masked.where_cond(&ninf, &zeros)
    } else {
        t.to_dtype(dtype)
    }
}

fn check_device(name: &str, t: &Tensor, device: &Device) -> Result<()> {
    if !t.device().same_device(device) {
        bail!(
            "{name} is on {:?} but the query is on {:?}",
            t.device(),
            device
        )
    }
    Ok(())
}
