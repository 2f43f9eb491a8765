//! The functional attention core with PyTorch `F.scaled_dot_product_attention` semantics, and
//! packed variable-length sequences.
//!
//! For models that already project their own q, k and v (the attention of a candle-transformers
//! Llama, Qwen, BERT or Whisper copy) and want to swap only the core:
//!
//! - [`sdpa`]: `q (B, H, L, D)`, `k (B, Hkv, S, D)`, `v (B, Hkv, S, Dv)` → `(B, H, L, Dv)`, or
//!   the `(B, L, H, D)` layout candle projections produce ([`SdpaLayout::Blhd`]), with
//!   [`SdpaOptions`]: an attention mask, `is_causal` (top-left, as PyTorch) or an explicit
//!   [`CausalAlignment`], a sliding window, the scale, grouped-query attention without repeating
//!   K/V, dropout, and the score modifiers soft-capping, ALiBi and attention sinks
//!   ([`SdpaOptions::softcap`], [`SdpaOptions::alibi_slopes`], [`SdpaOptions::sinks`]; on the
//!   reference kernel);
//! - [`sdpa_varlen`]: sequences of different lengths packed one after the other, as
//!   flash-attn's `flash_attn_varlen_func` takes them: `q (total_q, H, D)`, cumulative offsets
//!   ([`SeqOffsets`]);
//! - [`Packing`]: from a padded batch and Hugging Face's `attention_mask` to packed tokens and
//!   offsets, and back.
//!
//! Both go through the same dispatcher and kernels as the module ([`crate::kernels`]): the fused
//! CPU kernel where it applies (it never computes a tile of another sequence or above the causal
//! diagonal), the reference elsewhere; autograd works through the reference.
//!
//! # Mask polarity: the opposite of `nn.MultiheadAttention`
//!
//! A **boolean SDPA mask says where a query MAY attend**: `true` / nonzero = attend, `false` / 0
//! = masked, exactly as `F.scaled_dot_product_attention`'s `attn_mask`. This is the opposite of
//! the module's [`AttnMask::Bool`] and `key_padding_mask` (PyTorch MHA's
//! polarity, nonzero = masked). [`SdpaMask::Allowed`] names it; a float mask
//! ([`SdpaMask::Additive`]) is added to the scaled logits and may hold `-inf`.
//!
//! # Fully masked rows
//!
//! A query row that may attend to no key returns **zeros**, as PyTorch's SDPA does since 2.5
//! (its math and flash backends); [`SdpaOptions::masked_rows`] with [`MaskedRowPolicy::Nan`]
//! gives NaN there instead (what `nn.MultiheadAttention` with `need_weights=True` returns).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_mha::sdpa::{sdpa, SdpaMask, SdpaOptions};
//! let dev = Device::Cpu;
//! let q = Tensor::randn(0f32, 1., (2, 8, 5, 16), &dev)?; // (B, H, L, D)
//! let kv = Tensor::randn(0f32, 1., (2, 2, 7, 16), &dev)?; // (B, Hkv, S, D): GQA, 4 heads per KV head
//! // SDPA polarity: 1 = may attend. Batch 1 sees only its first 4 keys.
//! let allowed = Tensor::new(&[[1u8, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], &dev)?
//!     .reshape((2, 1, 1, 7))?;
//! let out = sdpa(&q, &kv, &kv, &SdpaOptions::new().attn_mask(SdpaMask::Allowed(allowed)))?;
//! assert_eq!(out.dims(), &[2, 8, 5, 16]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Result, Tensor};

use crate::config::{Backend, MaskedRowPolicy};
use crate::kernels::validate::{self, QkvDims, QkvLayout};
use crate::kernels::{self, compute_dtype, AttnParams};
use crate::mask::{AttnMask, Causal, CausalAlignment, KeyPaddingMask, MaskDims, MaskPlan};

mod offsets;
mod packing;
mod varlen;

pub use offsets::SeqOffsets;
pub use packing::Packing;
pub use varlen::sdpa_varlen;
internal! { use varlen::sdpa_varlen_with_kernel; }

/// The layout of `q`, `k`, `v` and of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SdpaLayout {
    /// `(B, H, L, D)`: PyTorch's layout for `F.scaled_dot_product_attention`.
    #[default]
    Bhld,
    /// `(B, L, H, D)`: what a candle projection reshaped into heads gives (no transpose needed;
    /// the kernels read it in place).
    Blhd,
}

/// An SDPA attention mask, broadcastable to `(B, H, L, S)` (trailing dimensions aligned, as
/// PyTorch broadcasts: `(L, S)`, `(B, 1, 1, S)`, `(H, L, S)`, …).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SdpaMask {
    /// Integer or boolean (`u8`) tensor, **nonzero = may attend**, 0 = masked (SDPA's polarity,
    /// the opposite of the module's [`AttnMask::Bool`]).
    Allowed(Tensor),
    /// Float tensor added to the scaled logits (`-inf` forbids a pair).
    Additive(Tensor),
}

impl SdpaMask {
    /// Chooses by dtype as PyTorch does: float → [`SdpaMask::Additive`], integer →
    /// [`SdpaMask::Allowed`] (nonzero = may attend).
    pub fn new(mask: Tensor) -> Self {
        if mask.dtype().is_float() {
            Self::Additive(mask)
        } else {
            Self::Allowed(mask)
        }
    }

    fn tensor(&self) -> &Tensor {
        match self {
            Self::Allowed(t) | Self::Additive(t) => t,
        }
    }
}

/// Options of [`sdpa`] and [`sdpa_varlen`], built fluently; the defaults are PyTorch's.
///
/// ```
/// use candle_mha::sdpa::{SdpaLayout, SdpaOptions};
/// use candle_mha::CausalAlignment;
/// let opts = SdpaOptions::new()
///     .causal(CausalAlignment::BottomRight) // KV-cache decoding
///     .sliding_window(4096)
///     .layout(SdpaLayout::Blhd);
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
pub struct SdpaOptions {
    pub(crate) attn_mask: Option<SdpaMask>,
    causal: Option<CausalAlignment>,
    window: Option<usize>,
    scale: Option<f64>,
    layout: SdpaLayout,
    masked_rows: MaskedRowPolicy,
    dropout: f32,
    backend: Backend,
    softcap: Option<f64>,
    alibi_slopes: Option<Tensor>,
    sinks: Option<Tensor>,
}

impl SdpaOptions {
    /// No mask, not causal, scale `1/sqrt(D)`, [`SdpaLayout::Bhld`], fully masked rows give
    /// zeros, no dropout, [`Backend::Auto`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The attention mask (merged with the causal mask when both are given; PyTorch rejects
    /// that combination, this crate adds them). Not available with [`sdpa_varlen`].
    pub fn attn_mask(mut self, mask: SdpaMask) -> Self {
        self.attn_mask = Some(mask);
        self
    }

    /// PyTorch's `is_causal`: `true` = [`CausalAlignment::TopLeft`] (query `i` sees keys
    /// `j <= i`), `false` = not causal.
    pub fn is_causal(mut self, causal: bool) -> Self {
        self.causal = causal.then_some(CausalAlignment::TopLeft);
        self
    }

    /// A causal mask with an explicit alignment; [`CausalAlignment::BottomRight`] (query `i`
    /// sees keys `j <= i + S - L`) is the one for decoding with a KV cache.
    pub fn causal(mut self, alignment: CausalAlignment) -> Self {
        self.causal = Some(alignment);
        self
    }

    /// Sliding window of `w` keys (requires a causal mask): query `i` sees only the `w` most
    /// recent keys up to its diagonal (see [`crate::mask`]).
    pub fn sliding_window(mut self, w: usize) -> Self {
        self.window = Some(w);
        self
    }

    /// Multiplier of `q·kᵀ` (default `1/sqrt(D)`).
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Layout of `q`, `k`, `v` and of the output (ignored by [`sdpa_varlen`], whose tensors
    /// are always `(total, heads, D)`).
    pub fn layout(mut self, layout: SdpaLayout) -> Self {
        self.layout = layout;
        self
    }

    /// What fully masked query rows produce: zeros by default, as PyTorch's SDPA (≥ 2.5);
    /// [`MaskedRowPolicy::Nan`] gives NaN.
    pub fn masked_rows(mut self, policy: MaskedRowPolicy) -> Self {
        self.masked_rows = policy;
        self
    }

    /// PyTorch's `dropout_p` on the attention weights. As in PyTorch's functional SDPA there is
    /// no training flag: dropout applies to every call with `p > 0` (pass 0 for inference).
    /// Served by the reference kernel.
    pub fn dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    /// Which kernel to use (see [`crate::kernels`]).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Logit soft-capping (Gemma 2, Grok): `s ← c · tanh(s / c)` on the scaled logits, before
    /// ALiBi and the masks. `c` must be finite and positive (checked by the call).
    pub fn softcap(mut self, c: f64) -> Self {
        self.softcap = Some(c);
        self
    }

    /// ALiBi (BLOOM, MPT, Baichuan): `s_ij ← s_ij − m · |i + S − L − j|`, `m` the slope of
    /// the query head, from a float tensor of shape `(H,)` or `(B, H)` (for [`sdpa_varlen`]:
    /// `(H,)` or `(sequences, H)`, with each sequence's own `L`, `S`, `i`, `j`). Queries are
    /// aligned to the end of the keys, as in flash-attn. A slope may be 0. BLOOM's and MPT's
    /// slopes: [`MhaConfig::standard_alibi_slopes`](crate::MhaConfig::standard_alibi_slopes).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_mha::{MhaConfig, SdpaOptions};
    /// let slopes: Vec<f32> = MhaConfig::standard_alibi_slopes(8).iter().map(|&m| m as f32).collect();
    /// let opts = SdpaOptions::new().alibi_slopes(Tensor::new(slopes, &Device::Cpu)?);
    /// # let _ = opts;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn alibi_slopes(mut self, slopes: Tensor) -> Self {
        self.alibi_slopes = Some(slopes);
        self
    }

    /// Attention sinks (gpt-oss, StreamingLLM): one logit per query head, a float tensor of
    /// shape `(H,)`, joined to every row's softmax as a key without a value:
    /// `p_ij = exp(s_ij) / (exp(σ_h) + Σ_j' exp(s_ij'))`. A row whose keys are all masked then
    /// gives 0, whatever [`SdpaOptions::masked_rows`] says. Gradients flow to a tracked tensor.
    pub fn sinks(mut self, sinks: Tensor) -> Self {
        self.sinks = Some(sinks);
        self
    }

    /// `plan` with the score modifiers set here, each tensor checked against `q`'s device.
    pub(crate) fn with_modifiers(&self, mut plan: MaskPlan, q: &Tensor) -> Result<MaskPlan> {
        for (name, t) in [("alibi_slopes", &self.alibi_slopes), ("sinks", &self.sinks)] {
            if let Some(t) = t {
                if !t.device().same_device(q.device()) {
                    bail!(
                        "sdpa: {name} is on {:?} but q is on {:?}",
                        t.device(),
                        q.device()
                    )
                }
            }
        }
        if let Some(c) = self.softcap {
            plan = plan.with_softcap(c)?;
        }
        if let Some(t) = &self.alibi_slopes {
            plan = plan.with_alibi_slopes(t)?;
        }
        if let Some(t) = &self.sinks {
            plan = plan.with_sinks(t)?;
        }
        Ok(plan)
    }

    /// The causal alignment set, if any.
    pub(crate) fn causal_alignment(&self) -> Option<CausalAlignment> {
        self.causal
    }

    pub(crate) fn causal_mask(&self) -> Result<Option<Causal>> {
        match (self.causal, self.window) {
            (Some(alignment), window) => Ok(Some(Causal { alignment, window })),
            (None, Some(w)) => bail!(
                "sdpa: sliding_window({w}) needs a causal mask (is_causal(true) or causal(..))"
            ),
            (None, None) => Ok(None),
        }
    }

    pub(crate) fn params(&self, d: usize) -> Result<AttnParams> {
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("sdpa: dropout must be in [0, 1), got {}", self.dropout)
        }
        let mut p = AttnParams::new(d);
        if let Some(s) = self.scale {
            if !s.is_finite() {
                bail!("sdpa: scale must be finite, got {s}")
            }
            p.scale = s;
        }
        p.masked_rows = self.masked_rows;
        p.dropout = self.dropout;
        p.backend = self.backend;
        Ok(p)
    }
}

internal! {
    /// What [`sdpa_with_kernel`] returns.
    #[derive(Debug, Clone)]
    struct SdpaOutput {
        /// The attention output, in the call's layout and dtype.
        pub output: Tensor,
        /// The kernel that served the call ([`KernelId::None`](crate::kernels::KernelId::None)
        /// when there was nothing to compute: no keys, or an empty output); compares with its name
        /// (`out.kernel == "cpu"`).
        pub kernel: crate::kernels::KernelId,
    }
}

/// PyTorch's `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
/// enable_gqa=True)`.
///
/// Shapes ([`SdpaLayout::Bhld`], the default): `q (B, H, L, D)`, `k (B, Hkv, S, D)`,
/// `v (B, Hkv, S, Dv)`, output `(B, H, L, Dv)`; `Hkv` must divide `H` (query head `h` reads KV
/// head `h / (H / Hkv)`, without K/V being repeated). 3-D inputs `(H, L, D)` are one unbatched
/// sequence. With [`SdpaLayout::Blhd`] every tensor is `(B, L, H, D)` instead. Any strides are
/// read in place; the output may be a transposed view.
///
/// See the [module docs](self) for the mask polarity (**nonzero = may attend**) and fully masked
/// rows (zeros by default).
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, opts: &SdpaOptions) -> Result<Tensor> {
    Ok(sdpa_with_kernel(q, k, v, opts)?.output)
}

internal! {
    /// [`sdpa`], also saying which kernel served the call.
    fn sdpa_with_kernel(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &SdpaOptions,
    ) -> Result<SdpaOutput> {
        let unbatched = q.rank() == 3;
        let (shape, read_as) = match (opts.layout, unbatched) {
            (SdpaLayout::Bhld, false) => ("4-D (B, heads, seq, head_dim)", BHLD_HINT),
            (SdpaLayout::Blhd, false) => ("4-D (B, seq, heads, head_dim)", BLHD_HINT),
            (SdpaLayout::Bhld, true) => ("3-D (heads, seq, head_dim), as q", BHLD_HINT),
            (SdpaLayout::Blhd, true) => ("3-D (seq, heads, head_dim), as q", BLHD_HINT),
        };
        // The axes of a (B, H, L, D) or (B, L, H, D) tensor, without B when unbatched.
        let first = usize::from(!unbatched);
        let (seq, heads) = match opts.layout {
            SdpaLayout::Bhld => (first + 1, first),
            SdpaLayout::Blhd => (first, first + 1),
        };
        let layout = QkvLayout {
            caller: "sdpa",
            rank: first + 3,
            shape,
            batch: (!unbatched).then_some(0),
            seq,
            heads,
            dim: first + 2,
            read_as: Some(read_as),
        };
        let QkvDims { b, l, h, d, s, .. } = validate::qkv(&layout, q, k, v)?;
        // Everything to the kernels' (B, T, heads, D) layout, as views.
        let to_blhd = |t: &Tensor| -> Result<Tensor> {
            let t = if unbatched {
                t.unsqueeze(0)?
            } else {
                t.clone()
            };
            match opts.layout {
                SdpaLayout::Bhld => t.transpose(1, 2),
                SdpaLayout::Blhd => Ok(t),
            }
        };
        let (qb, kb, vb) = (to_blhd(q)?, to_blhd(k)?, to_blhd(v)?);
        let params = opts.params(d)?;
        let dims = MaskDims::new(b, h, l, s);
        let plan = build_plan(dims, opts, q)?;
        let finish = |o: Tensor| -> Result<Tensor> {
            let o = match opts.layout {
                SdpaLayout::Bhld => o.transpose(1, 2)?,
                SdpaLayout::Blhd => o,
            };
            if unbatched {
                o.squeeze(0)
            } else {
                Ok(o)
            }
        };
        // Empty calls (no rows, or no keys: every row fully masked) are the dispatcher's too.
        let out = kernels::attention(&qb, &kb, &vb, &plan, &params)?;
        Ok(SdpaOutput {
            output: finish(out.output)?,
            kernel: out.kernel,
        })
    }
}

/// How [`sdpa`]'s tensors were read, said when their heads do not divide (a `(B, L, H, D)`
/// tensor read in the default layout has its heads and sequence swapped).
const BHLD_HINT: &str = "(B, H, L, D), the default SdpaLayout::Bhld; for (B, L, H, D) tensors use .layout(SdpaLayout::Blhd)";
/// [`BHLD_HINT`] for [`SdpaLayout::Blhd`].
const BLHD_HINT: &str =
    "(B, L, H, D), SdpaLayout::Blhd; for (B, H, L, D) tensors use the default SdpaLayout::Bhld";

/// The mask plan of an SDPA call: the causal structure, and the mask as key padding when it
/// only varies along the keys (so that fused kernels skip padded tiles), else as a dense bias.
fn build_plan(dims: MaskDims, opts: &SdpaOptions, q: &Tensor) -> Result<MaskPlan> {
    let mut plan = opts.with_modifiers(MaskPlan::new(dims), q)?;
    if let Some(c) = opts.causal_mask()? {
        plan = plan.with_causal(c)?;
    }
    let Some(mask) = &opts.attn_mask else {
        return Ok(plan);
    };
    let MaskDims {
        batch: b,
        heads: h,
        q_len: l,
        kv_len: s,
        ..
    } = dims;
    let t = mask.tensor();
    if !t.device().same_device(q.device()) {
        bail!(
            "sdpa: attn_mask is on {:?} but q is on {:?}",
            t.device(),
            q.device()
        )
    }
    if t.rank() == 0 || t.rank() > 4 {
        bail!(
            "sdpa: attn_mask must be broadcastable to (B, H, L, S) = {:?}, got shape {:?}",
            [b, h, l, s],
            t.dims()
        )
    }
    // Align trailing dimensions, as PyTorch broadcasting does.
    let mut shape = vec![1usize; 4 - t.rank()];
    shape.extend_from_slice(t.dims());
    let want = [b, h, l, s];
    if shape.iter().zip(want).any(|(&m, w)| m != w && m != 1) {
        bail!(
            "sdpa: attn_mask of shape {:?} is not broadcastable to (B, H, L, S) = {want:?}",
            t.dims()
        )
    }
    let mut t4 = t.reshape(shape.as_slice())?;
    if shape[3] != s {
        t4 = t4.broadcast_as((shape[0], shape[1], shape[2], s))?;
    }
    let cd = compute_dtype(q.dtype());
    // In the module's polarity: nonzero = masked.
    let masked = match mask {
        SdpaMask::Allowed(_) => {
            if t.dtype().is_float() {
                bail!(
                    "sdpa: SdpaMask::Allowed must be an integer/boolean tensor, got {:?}",
                    t.dtype()
                )
            }
            t4.eq(0u32)?
        }
        SdpaMask::Additive(_) => {
            if !t.dtype().is_float() {
                bail!(
                    "sdpa: SdpaMask::Additive must be a float tensor, got {:?}",
                    t.dtype()
                )
            }
            t4
        }
    };
    if shape[1] == 1 && shape[2] == 1 {
        // Varies along the keys only: key padding (contiguous kept keys become ranges).
        let kp = masked.reshape((shape[0], s))?;
        let kp = if shape[0] == b {
            kp
        } else {
            kp.broadcast_as((b, s))?.contiguous()?
        };
        return plan.with_key_padding(&KeyPaddingMask::Tensor(kp), cd, q.device());
    }
    let am = if masked.dtype().is_float() {
        AttnMask::Additive(masked)
    } else {
        AttnMask::Bool(masked)
    };
    plan.with_attn_mask(&am, cd, q.device())
}
