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
//!   With a sliding window of `W` ([`MhaInput::sliding_window`](crate::MhaInput::sliding_window),
//!   [`SdpaOptions::sliding_window`](crate::SdpaOptions::sliding_window)), query `i` additionally sees only the `W`
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
//!
//! The kernels never see these types: a call's masks are validated and merged once into a
//! [`MaskPlan`] (structured where possible, dense only for the tensors the caller passed), which
//! a model can build once per forward and reuse in every layer
//! ([`MultiHeadAttention::mask_plan`](crate::MultiHeadAttention::mask_plan)).

use candle_core::{bail, Result, Tensor};

mod modifiers;
mod plan;

pub(crate) use modifiers::alibi_distances;
pub use plan::MaskPlan;
internal! { use plan::MaskDims; }

/// Which way a causal mask is aligned when the query and key lengths differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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

internal! {
    /// A causal mask: its alignment and an optional sliding window. See the [module docs](self).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Causal {
        /// How the diagonal is aligned when L != S.
        pub alignment: CausalAlignment,
        /// Sliding window: each query sees at most this many keys (ending at its diagonal).
        pub window: Option<usize>,
    }
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
#[non_exhaustive]
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

    /// From valid sequence lengths held in a 1-D integer tensor (`(B,)`, e.g. a tokenizer's
    /// lengths on the device).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_mha::KeyPaddingMask;
    /// let lens = Tensor::new(&[5u32, 3], &Device::Cpu)?;
    /// let m = KeyPaddingMask::from_lengths_tensor(&lens)?;
    /// assert!(matches!(m, KeyPaddingMask::Lengths(ref v) if v == &[5, 3]));
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn from_lengths_tensor(lengths: &Tensor) -> Result<Self> {
        if lengths.dtype().is_float() || lengths.rank() != 1 {
            bail!(
                "key padding lengths: expected a 1-D integer tensor (B,), got {:?} {:?}",
                lengths.dtype(),
                lengths.dims()
            )
        }
        let v = lengths
            .to_dtype(candle_core::DType::I64)?
            .to_vec1::<i64>()?;
        if let Some(bad) = v.iter().find(|&&x| x < 0) {
            bail!("key padding lengths: a length is negative ({bad})")
        }
        Ok(Self::Lengths(v.into_iter().map(|x| x as usize).collect()))
    }
}

/// An explicit attention mask. See the [module docs](self) for shapes and polarity.
#[derive(Debug, Clone)]
#[non_exhaustive]
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

    pub(crate) fn tensor(&self) -> &Tensor {
        match self {
            Self::Bool(t) | Self::Additive(t) => t,
        }
    }
}
