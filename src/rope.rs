//! Positional hooks applied to the projected queries and keys: rotary embeddings (RoPE).
//!
//! A [`PositionalHook`] runs after the q/k projections and the split into heads, and before the
//! keys are cached (see [`crate::cache`]), so a [`KvCache`](crate::KvCache) holds keys that are
//! already rotated and never needs re-rotating.
//!
//! Positions: without a cache, row `t` of sequence `b` has position `t - pad[b]`, where
//! `pad[b]` is its left padding ([`MhaInput::left_padding`](crate::MhaInput::left_padding), 0 by
//! default); with a cache, the new rows continue at `cache.len() - pad[b]`. Padding rows (negative
//! positions) are rotated as position 0; they are masked anyway.
//!
//! Two RoPE conventions, both via candle-nn's [`rotary_emb`](candle_nn::rotary_emb) kernels:
//! - [`RopeStyle::HalfSplit`]: Hugging Face's `rotate_half` — feature `i` pairs with `i + D/2`
//!   (`candle_nn::rotary_emb::rope`).
//! - [`RopeStyle::Interleaved`]: GPT-J / llama.cpp (GGUF) / Meta's original Llama — features
//!   `2i` and `2i + 1` pair (`candle_nn::rotary_emb::rope_i`).
//!
//! The two are the same rotation up to a permutation of the head features; llama.cpp's GGUF
//! converter permutes the q/k projection rows accordingly, so GGUF Llama weights need
//! [`RopeStyle::Interleaved`] and Hugging Face checkpoints [`RopeStyle::HalfSplit`].

use candle_core::{bail, DType, Device, Result, Tensor};

/// Which features a rotary embedding rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Feature `i` with `i + D/2` (Hugging Face `rotate_half`).
    HalfSplit,
    /// Feature `2i` with `2i + 1` (GPT-J, llama.cpp / GGUF).
    Interleaved,
}

/// Rotary position embedding tables: `cos` and `sin`, `(max_positions, D/2)`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_mha::rope::{Rope, RopeStyle};
/// let rope = Rope::from_theta(10_000.0, 8, 64, RopeStyle::HalfSplit, DType::F32, &Device::Cpu)?;
/// let q = Tensor::randn(0f32, 1., (2, 4, 5, 8), &Device::Cpu)?; // (B, H, T, D)
/// let rotated = rope.apply(&q, &[3, 0])?; // sequence 0 starts at position 3, sequence 1 at 0
/// assert_eq!(rotated.dims(), q.dims());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rope {
    /// From precomputed tables `cos`, `sin` of shape `(max_positions, D/2)`, in the dtype of the
    /// tensors they will rotate.
    pub fn new(cos: Tensor, sin: Tensor, style: RopeStyle) -> Result<Self> {
        if cos.rank() != 2 || cos.dims() != sin.dims() {
            bail!(
                "rope: cos and sin must both be (max_positions, head_dim / 2), got {:?} and {:?}",
                cos.dims(),
                sin.dims()
            )
        }
        Ok(Self {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            style,
        })
    }

    /// The standard tables: frequency `theta^(-2i/D)` for `i < D/2`, positions
    /// `0..max_positions` (Llama's `rope_theta`, `head_dim`, `max_position_embeddings`),
    /// computed in f32 and stored in `dtype`.
    pub fn from_theta(
        theta: f64,
        head_dim: usize,
        max_positions: usize,
        style: RopeStyle,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            bail!("rope: head_dim must be even and > 0, got {head_dim}")
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1f32 / (theta as f32).powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let t = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = t.broadcast_mul(&inv_freq)?;
        Self::new(
            freqs.cos()?.to_dtype(dtype)?,
            freqs.sin()?.to_dtype(dtype)?,
            style,
        )
    }

    /// The convention.
    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// How many positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// The rotated head size `D`.
    pub fn head_dim(&self) -> usize {
        self.cos.dim(1).unwrap_or(0) * 2
    }

    /// Rotates `x` `(B, H, T, D)`: row `t` of batch element `b` gets position `starts[b] + t`
    /// (negative positions, i.e. left padding, are rotated as position 0). `starts` has one
    /// entry per batch element, or a single entry shared by all.
    pub fn apply(&self, x: &Tensor, starts: &[i64]) -> Result<Tensor> {
        let (b, _h, t, d) = x.dims4()?;
        if d != self.head_dim() {
            bail!(
                "rope: tables are for head_dim {}, got a tensor of shape {:?}",
                self.head_dim(),
                x.dims()
            )
        }
        if starts.len() != b && starts.len() != 1 {
            bail!(
                "rope: expected 1 or {b} start positions, got {}",
                starts.len()
            )
        }
        let max = self.max_positions() as i64;
        let last = starts.iter().map(|&s| s + t as i64).max().unwrap_or(0);
        if last > max {
            bail!("rope: position {} is beyond the {max} positions of the tables (build the Rope with a larger max_positions)", last - 1)
        }
        let x = x.contiguous()?;
        let uniform = starts.iter().all(|&s| s == starts[0]) && starts[0] >= 0;
        let (cos, sin) = if uniform {
            let s = starts[0] as usize;
            (self.cos.narrow(0, s, t)?, self.sin.narrow(0, s, t)?)
        } else {
            let mut idx = Vec::with_capacity(b * t);
            for bi in 0..b {
                let s = starts[if starts.len() == 1 { 0 } else { bi }];
                idx.extend((0..t as i64).map(|j| (s + j).max(0) as u32));
            }
            let idx = Tensor::from_vec(idx, b * t, x.device())?;
            let half = d / 2;
            (
                self.cos.index_select(&idx, 0)?.reshape((b, t, half))?,
                self.sin.index_select(&idx, 0)?.reshape((b, t, half))?,
            )
        };
        let (cos, sin) = (
            cos.to_dtype(x.dtype())?.contiguous()?,
            sin.to_dtype(x.dtype())?.contiguous()?,
        );
        // candle-nn's fused rope kernels have no backward: use the op-by-op versions when
        // gradients are tracked.
        let (cos, sin) = if x.track_op() && cos.rank() == 3 {
            // The slow versions take (T, D/2) tables only: rotate batch element by batch element.
            let rows = (0..b)
                .map(|bi| {
                    let xi = x.narrow(0, bi, 1)?;
                    let (c, s) = (cos.get(bi)?, sin.get(bi)?);
                    match self.style {
                        RopeStyle::HalfSplit => candle_nn::rotary_emb::rope_slow(&xi, &c, &s),
                        RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i_slow(&xi, &c, &s),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            return Tensor::cat(&rows, 0);
        } else {
            (cos, sin)
        };
        match (self.style, x.track_op()) {
            (RopeStyle::HalfSplit, false) => candle_nn::rotary_emb::rope(&x, &cos, &sin),
            (RopeStyle::Interleaved, false) => candle_nn::rotary_emb::rope_i(&x, &cos, &sin),
            (RopeStyle::HalfSplit, true) => candle_nn::rotary_emb::rope_slow(&x, &cos, &sin),
            (RopeStyle::Interleaved, true) => candle_nn::rotary_emb::rope_i_slow(&x, &cos, &sin),
        }
    }
}

/// What to do to the projected queries and keys before attention (and before caching the keys).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PositionalHook {
    /// Rotary position embedding of q and k.
    Rope(Rope),
}

impl PositionalHook {
    /// Applies the hook to `x` `(B, heads, T, D)` whose row `t` of batch element `b` sits at
    /// position `starts[b] + t` (see [`Rope::apply`]).
    pub fn apply(&self, x: &Tensor, starts: &[i64]) -> Result<Tensor> {
        match self {
            PositionalHook::Rope(r) => r.apply(x, starts),
        }
    }
}

impl From<Rope> for PositionalHook {
    fn from(r: Rope) -> Self {
        PositionalHook::Rope(r)
    }
}
