//! Positional hooks applied to the projected queries and keys: rotary embeddings (RoPE).
//!
//! A rotary embedding ([`Rope`], given to [`MhaInput::rope`](crate::MhaInput::rope)) runs after
//! the q/k projections and the split into heads, and before the keys are cached (see [`crate::cache`]), so a [`KvCache`](crate::KvCache) holds keys that are
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
#[non_exhaustive]
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
/// let q = Tensor::randn(0f32, 1., (2, 5, 4, 8), &Device::Cpu)?; // (B, T, H, D)
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

    /// Rotates `x` `(B, T, H, D)` (any strides; the layout the projections produce): row `t`
    /// of batch element `b` gets position `starts[b] + t` (negative positions, i.e. left
    /// padding, are rotated as position 0). `starts` has one entry per batch element, or a
    /// single entry shared by all. Returns a contiguous `(B, T, H, D)` tensor.
    pub fn apply(&self, x: &Tensor, starts: &[i64]) -> Result<Tensor> {
        let (b, t, _, d) = x.dims4()?;
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
        // One table row per (b, t): positions differ per sequence only with left padding.
        let uniform = starts.iter().all(|&s| s == starts[0]);
        let (nb, cos, sin) = if uniform && starts[0] >= 0 {
            // A slice of the tables: no copy for a single sequence.
            let s0 = starts[0] as usize;
            (1, self.cos.narrow(0, s0, t)?, self.sin.narrow(0, s0, t)?)
        } else {
            let nb = if uniform { 1 } else { b };
            let idx: Vec<u32> = (0..nb)
                .flat_map(|bi| {
                    let s = starts[if starts.len() == 1 { 0 } else { bi }];
                    (0..t as i64).map(move |j| (s + j).max(0) as u32)
                })
                .collect();
            let idx = Tensor::from_vec(idx, nb * t, x.device())?;
            let rows = |tab: &Tensor| tab.index_select(&idx, 0);
            (nb, rows(&self.cos)?, rows(&self.sin)?)
        };
        self.rotate(x, nb, cos, sin)
    }

    /// Rotates `x` `(B, T, H, D)` with an explicit position per row: `positions` holds `B · T`
    /// values, row `t` of batch element `b` at `positions[b · T + t]` (packed sequences, whose
    /// positions restart at every sequence: [`SeqOffsets::positions`]).
    ///
    /// [`SeqOffsets::positions`]: crate::sdpa::SeqOffsets::positions
    pub fn apply_positions(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (b, t, _, d) = x.dims4()?;
        if d != self.head_dim() {
            bail!(
                "rope: tables are for head_dim {}, got a tensor of shape {:?}",
                self.head_dim(),
                x.dims()
            )
        }
        if positions.len() != b * t {
            bail!(
                "rope: expected {} positions (one per row of {:?}), got {}",
                b * t,
                x.dims(),
                positions.len()
            )
        }
        let max = self.max_positions();
        if let Some(&bad) = positions.iter().find(|&&p| p >= max) {
            bail!("rope: position {bad} is beyond the {max} positions of the tables (build the Rope with a larger max_positions)")
        }
        let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let idx = Tensor::from_vec(idx, b * t, x.device())?;
        let (cos, sin) = (
            self.cos.index_select(&idx, 0)?,
            self.sin.index_select(&idx, 0)?,
        );
        self.rotate(x, b, cos, sin)
    }

    /// Rotates `x` with `nb · T` table rows (`nb` is 1, shared by every batch element, or B).
    fn rotate(&self, x: &Tensor, nb: usize, cos: Tensor, sin: Tensor) -> Result<Tensor> {
        let (b, t, h, d) = x.dims4()?;
        let table = |rows: Tensor| -> Result<Tensor> {
            let rows = rows.to_dtype(x.dtype())?.reshape((nb, t, 1, d / 2))?;
            if nb == b {
                rows.contiguous()
            } else {
                rows.broadcast_as((b, t, 1, d / 2))?.contiguous()
            }
        };
        let (cos, sin) = (table(cos)?, table(sin)?);
        let x = x.contiguous()?;
        if !x.track_op() {
            // candle-nn's fused kernels rotate (B', H', T', D) with per-B' tables indexed by T':
            // view the rows as (B·T, H, 1, D), one table row per (b, t).
            let x4 = x.reshape((b * t, h, 1, d))?;
            let (cos, sin) = (
                cos.reshape((b * t, 1, d / 2))?,
                sin.reshape((b * t, 1, d / 2))?,
            );
            let y = match self.style {
                RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x4, &cos, &sin)?,
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, &cos, &sin)?,
            };
            return y.reshape((b, t, h, d));
        }
        // Tracked by autograd: candle-nn's fused kernels have no backward, so the same rotation
        // on differentiable ops (as candle-nn's `rope_slow` / `rope_i_slow`).
        let rot = |x0: &Tensor, x1: &Tensor, c: &Tensor, s: &Tensor| -> Result<(Tensor, Tensor)> {
            let y0 = (x0.broadcast_mul(c)? - x1.broadcast_mul(s)?)?;
            let y1 = (x0.broadcast_mul(s)? + x1.broadcast_mul(c)?)?;
            Ok((y0, y1))
        };
        match self.style {
            RopeStyle::HalfSplit => {
                let (x0, x1) = (x.narrow(3, 0, d / 2)?, x.narrow(3, d / 2, d / 2)?);
                let (y0, y1) = rot(&x0, &x1, &cos, &sin)?;
                Tensor::cat(&[y0, y1], 3)
            }
            RopeStyle::Interleaved => {
                let x5 = x.reshape((b, t, h, d / 2, 2))?;
                let (x0, x1) = (x5.narrow(4, 0, 1)?, x5.narrow(4, 1, 1)?);
                let (c, s) = (cos.unsqueeze(4)?, sin.unsqueeze(4)?);
                let (y0, y1) = rot(&x0, &x1, &c, &s)?;
                Tensor::cat(&[y0, y1], 4)?.reshape((b, t, h, d))
            }
        }
    }
}

/// What to do to the projected queries and keys before attention (and before caching the keys).
#[derive(Debug, Clone)]
pub(crate) enum PositionalHook {
    /// Rotary position embedding of q and k.
    Rope(Rope),
}

impl PositionalHook {
    /// Applies the hook to `x` `(B, T, heads, D)` whose row `t` of batch element `b` sits at
    /// position `starts[b] + t` (see [`Rope::apply`]).
    pub(crate) fn apply(&self, x: &Tensor, starts: &[i64]) -> Result<Tensor> {
        match self {
            PositionalHook::Rope(r) => r.apply(x, starts),
        }
    }

    /// Applies the hook with an explicit position per row (`B · T` values; see
    /// [`Rope::apply_positions`]).
    pub(crate) fn apply_positions(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        match self {
            PositionalHook::Rope(r) => r.apply_positions(x, positions),
        }
    }
}

impl From<Rope> for PositionalHook {
    fn from(r: Rope) -> Self {
        PositionalHook::Rope(r)
    }
}
