//! Masks: key padding, explicit attention masks and causal structure, and how they merge.
//!
//! Conventions (PyTorch's, unless stated):
//! - [`KeyPaddingMask`]: per batch element, which keys to ignore. As a tensor `(B, S)` (or `(S,)`
//!   for unbatched input) with **1 / nonzero = ignore this key** (`nn.MultiheadAttention`
//!   polarity), as a float tensor added to the logits, as Hugging Face's `attention_mask`
//!   (1 = keep) via [`KeyPaddingMask::from_keep_mask`], or as sequence lengths (keys
//!   `len..S` ignored) via [`KeyPaddingMask::from_lengths`].
//! - [`AttnMask`]: `(L, S)`, `(B·H, L, S)` (row `b*H + h`; `(H, L, S)` for unbatched input) or
//!   `(B, H, L, S)` where the B, H and L dims may be 1 to broadcast. An integer (e.g. `u8`) mask
//!   is boolean with **nonzero = not allowed** (PyTorch's `True` = masked); a float mask is added
//!   to the logits and may hold `-inf`.
//! - [`CausalAlignment`]: the crate's own causal option (no mask tensor needed). With L queries
//!   and S keys, query `i` may see key `j` iff
//!   - [`CausalAlignment::TopLeft`]: `j <= i` (torch SDPA `is_causal=True`);
//!   - [`CausalAlignment::BottomRight`]: `j <= i + S - L` (the last query sees every key: KV-cache
//!     decoding, where the L new queries are the last L positions of the sequence).
//!
//!   With a sliding window of `W` ([`Causal::window`]), query `i` additionally sees only the `W`
//!   most recent keys up to and including its diagonal: `i + off - W < j <= i + off`, where
//!   `off` is 0 (top-left) or `S - L` (bottom-right). `W = 1` lets a query see only its own
//!   position; this is Mistral's / Hugging Face's `sliding_window` (flash-attn's
//!   `window_size = (W - 1, 0)`).
//!
//! All masks given at once are merged the way PyTorch merges them: boolean masks become `-inf`
//! additive masks and every additive mask is summed onto the logits. Keys appended by
//! `add_bias_kv` / `add_zero_attn` are never masked (PyTorch pads the masks with a 0 column).
//! A query row whose logits are all `-inf` is *fully masked*; what it produces is the
//! [`MaskedRowPolicy`](crate::MaskedRowPolicy).

use candle_core::{bail, DType, Device, Result, Tensor, D};

/// Which way a causal mask is aligned when the query and key lengths differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CausalAlignment {
    /// Query `i` sees keys `j <= i` (torch `scaled_dot_product_attention(is_causal=True)`).
    TopLeft,
    /// Query `i` sees keys `j <= i + S - L` (KV-cache decoding, flash-attn's convention).
    BottomRight,
}

impl CausalAlignment {
    /// The largest key index query `i` may see is `i + offset`.
    pub fn offset(self, l: usize, s: usize) -> i64 {
        match self {
            CausalAlignment::TopLeft => 0,
            CausalAlignment::BottomRight => s as i64 - l as i64,
        }
    }
}

/// A causal mask: its alignment and an optional sliding window. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Causal {
    /// How the diagonal is aligned when L != S.
    pub alignment: CausalAlignment,
    /// Sliding window: each query sees at most this many keys (ending at its diagonal).
    pub window: Option<usize>,
}

impl Causal {
    /// A causal mask without window.
    pub fn new(alignment: CausalAlignment) -> Self {
        Self {
            alignment,
            window: None,
        }
    }

    /// The half-open range `lo..hi` of keys (out of `s`) query `i` (out of `l`) may see; empty
    /// (`lo >= hi`) when it sees none.
    pub fn key_range(&self, i: usize, l: usize, s: usize) -> (usize, usize) {
        let last = i as i64 + self.alignment.offset(l, s); // largest visible key index
        let hi = (last + 1).clamp(0, s as i64) as usize;
        let lo = match self.window {
            Some(w) => (last + 1 - w as i64).clamp(0, s as i64) as usize,
            None => 0,
        };
        (lo, hi.max(lo))
    }
}

impl From<CausalAlignment> for Causal {
    fn from(alignment: CausalAlignment) -> Self {
        Self::new(alignment)
    }
}

/// Which keys to ignore, per batch element. See the [module docs](self).
#[derive(Debug, Clone)]
pub enum KeyPaddingMask {
    /// Integer tensor `(B, S)` / `(S,)`, nonzero = ignore the key (PyTorch polarity);
    /// or a float tensor of the same shape added to the logits.
    Tensor(Tensor),
    /// Valid lengths per batch element: keys `len..S` are ignored.
    Lengths(Vec<usize>),
}

impl KeyPaddingMask {
    /// A PyTorch-polarity mask (`1` = ignore) or a float additive mask.
    pub fn new(mask: Tensor) -> Self {
        Self::Tensor(mask)
    }

    /// From Hugging Face's `attention_mask` polarity (`1` = real token, `0` = padding).
    pub fn from_keep_mask(keep: &Tensor) -> Result<Self> {
        if keep.dtype().is_float() {
            bail!(
                "key padding keep-mask must have an integer dtype, got {:?}",
                keep.dtype()
            )
        }
        Ok(Self::Tensor(keep.eq(0u32)?))
    }

    /// From valid sequence lengths.
    pub fn from_lengths(lengths: &[usize]) -> Self {
        Self::Lengths(lengths.to_vec())
    }
}

/// An explicit attention mask. See the [module docs](self) for shapes and polarity.
#[derive(Debug, Clone)]
pub enum AttnMask {
    /// Integer tensor, nonzero = this (query, key) pair is not allowed.
    Bool(Tensor),
    /// Float tensor added to the logits (`-inf` forbids a pair).
    Additive(Tensor),
}

impl AttnMask {
    /// Chooses by dtype: integer → [`AttnMask::Bool`], float → [`AttnMask::Additive`].
    pub fn new(mask: Tensor) -> Self {
        if mask.dtype().is_float() {
            Self::Additive(mask)
        } else {
            Self::Bool(mask)
        }
    }

    /// From a mask with the opposite polarity: nonzero = allowed.
    pub fn from_allowed(allowed: &Tensor) -> Result<Self> {
        Ok(Self::Bool(allowed.eq(0u32)?))
    }

    fn tensor(&self) -> &Tensor {
        match self {
            Self::Bool(t) | Self::Additive(t) => t,
        }
    }
}

/// Key padding after validation: lengths, or an additive `(B, S)` float tensor.
#[derive(Debug, Clone)]
pub enum KeyPadding {
    /// Valid key count per batch element.
    Lengths(Vec<usize>),
    /// Additive `(B, S)` bias in the compute dtype (`-inf` = padded).
    Additive(Tensor),
}

/// Everything that masks the logits of one attention call, validated against its shapes.
///
/// This is what the attention kernels receive: structured (causal, lengths) where possible so
/// that fused kernels can skip whole tiles, with [`MaskSpec::materialize`] for those that want
/// one additive tensor. It refers to the first `s` keys; `extra_keys` more keys (from
/// `add_bias_kv` / `add_zero_attn`) follow them and are never masked.
#[derive(Debug, Clone, Default)]
pub struct MaskSpec {
    /// Causal structure (and sliding window) over the first `s` keys.
    pub causal: Option<Causal>,
    /// Key padding over the first `s` keys.
    pub key_padding: Option<KeyPadding>,
    /// Additive bias, 4-D, broadcastable to `(B, H, L, s)`, in the compute dtype.
    pub bias: Option<Tensor>,
    /// Number of always-visible keys appended after the first `s`.
    pub extra_keys: usize,
}

/// The shapes a mask is validated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskDims {
    /// Batch size B.
    pub batch: usize,
    /// Query heads H.
    pub heads: usize,
    /// Query length L.
    pub q_len: usize,
    /// Key length S (before any appended keys).
    pub kv_len: usize,
    /// Whether the caller's input was unbatched (then B = 1 and masks may omit B).
    pub unbatched: bool,
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

impl MaskSpec {
    /// Validates and merges the user's masks for an attention call of dimensions `dims`,
    /// converting tensors to additive masks in `dtype` on `device`.
    pub fn build(
        dims: MaskDims,
        key_padding: Option<&KeyPaddingMask>,
        attn_mask: Option<&AttnMask>,
        causal: Option<Causal>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let MaskDims {
            batch: b,
            heads: h,
            q_len: l,
            kv_len: s,
            unbatched,
        } = dims;
        if let Some(Causal {
            window: Some(0), ..
        }) = causal
        {
            bail!("sliding window must be at least 1 key, got 0")
        }
        let key_padding = match key_padding {
            None => None,
            Some(KeyPaddingMask::Lengths(lens)) => {
                if lens.len() != b {
                    bail!(
                        "key padding lengths: expected one length per batch element ({b}), got {}",
                        lens.len()
                    )
                }
                if let Some(bad) = lens.iter().find(|&&n| n > s) {
                    bail!("key padding lengths: length {bad} exceeds the key sequence length {s}")
                }
                Some(KeyPadding::Lengths(lens.clone()))
            }
            Some(KeyPaddingMask::Tensor(t)) => {
                check_device("key_padding_mask", t, device)?;
                let expected: &[usize] = if unbatched { &[s] } else { &[b, s] };
                if t.dims() != expected {
                    bail!(
                        "key_padding_mask: expected shape {expected:?} ({}), got {:?}",
                        if unbatched { "S" } else { "B, S" },
                        t.dims()
                    )
                }
                let t = to_additive(t, !t.dtype().is_float(), dtype)?.reshape((b, s))?;
                Some(KeyPadding::Additive(t))
            }
        };
        let bias = match attn_mask {
            None => None,
            Some(m) => {
                let t = m.tensor();
                check_device("attn_mask", t, device)?;
                if let AttnMask::Additive(_) = m {
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
                let is_bool = matches!(m, AttnMask::Bool(_)) || !t.dtype().is_float();
                Some(to_additive(&t4, is_bool, dtype)?)
            }
        };
        Ok(Self {
            causal,
            key_padding,
            bias,
            extra_keys: 0,
        })
    }

    /// Whether nothing is masked.
    pub fn is_empty(&self) -> bool {
        self.causal.is_none() && self.key_padding.is_none() && self.bias.is_none()
    }

    /// The whole mask as one additive tensor in `dtype`, broadcastable to
    /// `(b, h, l, s + extra_keys)`, or `None` when nothing is masked.
    pub fn materialize(
        &self,
        b: usize,
        l: usize,
        s: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
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
        match &self.key_padding {
            None => {}
            Some(KeyPadding::Additive(t)) => add(t.to_dtype(dtype)?.reshape((b, 1, 1, s))?)?,
            Some(KeyPadding::Lengths(lens)) => {
                let mut v = vec![0f32; b * s];
                for (bi, &n) in lens.iter().enumerate() {
                    v[bi * s + n..(bi + 1) * s].fill(f32::NEG_INFINITY);
                }
                let t = Tensor::from_vec(v, (b, 1, 1, s), device)?.to_dtype(dtype)?;
                add(t)?
            }
        }
        if let Some(causal) = self.causal {
            add(causal_bias(l, s, causal, dtype, device)?)?;
        }
        match acc {
            None => Ok(None),
            Some(t) if self.extra_keys > 0 => {
                let mut dims = t.dims().to_vec();
                dims[3] = self.extra_keys;
                let pad = Tensor::zeros(dims, dtype, device)?;
                Ok(Some(Tensor::cat(&[&t, &pad], D::Minus1)?))
            }
            Some(t) => Ok(Some(t)),
        }
    }
}

/// A `(1, 1, l, s)` additive causal mask: 0 where key `j` is visible to query `i` (see
/// [`Causal::key_range`]), `-inf` elsewhere.
pub fn causal_bias(
    l: usize,
    s: usize,
    causal: impl Into<Causal>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let causal = causal.into();
    let mut v = vec![f32::NEG_INFINITY; l * s];
    for i in 0..l {
        let (lo, hi) = causal.key_range(i, l, s);
        v[i * s + lo..i * s + hi].fill(0.0);
    }
    Tensor::from_vec(v, (1, 1, l, s), device)?.to_dtype(dtype)
}
