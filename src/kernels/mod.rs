//! The attention core: `softmax(scale · q·kᵀ + mask) · v` per head, behind one dispatcher.
//!
//! [`attention`] is the only entry point the module uses. It validates shapes, then routes the
//! call to a kernel chosen from the requested [`Backend`], the device, the dtype and whether the
//! caller needs the attention weights or gradients. Two kernels: [`reference`](mod@reference), plain candle
//! ops, the yardstick every other kernel is tested against; and [`cpu`], the fused CPU kernel
//! (tiled GEMM + online softmax, memory independent of the key length).
//!
//! | kernel | devices | dtypes | returns weights | differentiable |
//! |---|---|---|---|---|
//! | [`reference`](mod@reference) | every candle device | all floats | yes | yes (only differentiable candle ops) |
//! | [`cpu`] | CPU | f32, f16, bf16 (f32 accumulation) | no | no |
//!
//! Routing rules, in order: a call that asks for the attention weights, uses dropout, or whose
//! `q`, `k` or `v` is tracked by candle's autograd ([`Tensor::track_op`]: a `Var` or derived from
//! one), always goes to [`reference`](mod@reference), since the fused kernel is forward-only and returns no
//! weights. Otherwise [`Backend::Reference`] forces the reference path, [`Backend::CpuFused`]
//! forces the fused CPU kernel (an error on other devices, on f64 or for head sizes above
//! [`cpu::MAX_HEAD_DIM`]), and [`Backend::Auto`] picks the fused CPU kernel whenever it supports
//! the call (CPU, f32/f16/bf16, head size ≤ 256) and the reference otherwise (f64, CUDA).
//!
//! Crossover: `examples/bench_attention.rs --crossover` times both kernels on tiny shapes
//! (B·H ∈ {1, 12, 96}, L = S ∈ {1 … 256}, D = 64). With the per-thread scratch reused across
//! calls the fused kernel was faster on every one (1.1× to 100×; the closest: B·H = 96,
//! L = S = 8 or 16), so `Auto` has no size threshold: no shape is small enough for the
//! reference to win.

use candle_core::{bail, DType, Result, Tensor};

use crate::config::{Backend, MaskedRowPolicy};
use crate::mask::MaskSpec;

pub mod cpu;
pub mod reference;

/// Per-call options of the attention core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    /// Multiplier of `q·kᵀ`.
    pub scale: f64,
    /// What fully masked query rows produce.
    pub masked_rows: MaskedRowPolicy,
    /// Dropout probability on the attention weights (0 outside training).
    pub dropout: f32,
    /// Whether to return the per-head attention weights.
    pub need_weights: bool,
    /// Which implementation to use.
    pub backend: Backend,
}

impl AttnParams {
    /// Defaults for `head_dim`: scale `1/sqrt(head_dim)`, [`MaskedRowPolicy::Zero`], no dropout,
    /// no weights, [`Backend::Auto`].
    pub fn new(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f64).sqrt(),
            masked_rows: MaskedRowPolicy::Zero,
            dropout: 0.0,
            need_weights: false,
            backend: Backend::Auto,
        }
    }
}

/// What the attention core returns.
#[derive(Debug, Clone)]
pub struct AttnOutput {
    /// `(B, H, L, Dv)`, in the dtype of `q`.
    pub output: Tensor,
    /// `(B, H, L, S)` attention probabilities (compute dtype: f32, or f64 for f64 inputs) when
    /// requested.
    pub weights: Option<Tensor>,
}

/// The dtype scores and softmax are computed in for inputs of `dtype`: f64 stays f64, every
/// other float type computes in f32.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Scaled dot-product attention over heads.
///
/// `q`: `(B, H, L, D)`, `k`: `(B, Hkv, S, D)`, `v`: `(B, Hkv, S, Dv)` with `Hkv` dividing `H`
/// (query head `h` reads KV head `h / (H / Hkv)`, as Hugging Face's `repeat_kv`). `mask` refers
/// to the first `S - mask.extra_keys` keys.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_mha::kernels::{attention, AttnParams};
/// use candle_mha::mask::{CausalAlignment, MaskSpec};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (2, 4, 5, 8), &dev)?;
/// let kv = Tensor::randn(0f32, 1., (2, 2, 5, 8), &dev)?; // 2 KV heads for 4 query heads
/// let mask = MaskSpec { causal: Some(CausalAlignment::TopLeft.into()), ..Default::default() };
/// let out = attention(&q, &kv, &kv, &mask, &AttnParams::new(8))?;
/// assert_eq!(out.output.dims(), &[2, 4, 5, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &MaskSpec,
    params: &AttnParams,
) -> Result<AttnOutput> {
    let (b, h, _l, d) = dims4("q", q)?;
    let (bk, hkv, s, dk) = dims4("k", k)?;
    let (bv, hv, sv, _dv) = dims4("v", v)?;
    if bk != b || bv != b {
        bail!("attention: batch sizes differ: q {b}, k {bk}, v {bv}")
    }
    if hv != hkv || sv != s {
        bail!(
            "attention: k {:?} and v {:?} must have the same heads and length",
            k.dims(),
            v.dims()
        )
    }
    if dk != d {
        bail!("attention: q head size {d} differs from k head size {dk}")
    }
    if hkv == 0 || !h.is_multiple_of(hkv) {
        bail!("attention: {h} query heads cannot share {hkv} KV heads")
    }
    if mask.extra_keys > s {
        bail!(
            "attention: {} appended keys but only {s} keys",
            mask.extra_keys
        )
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!(
            "attention: dtypes differ: q {:?}, k {:?}, v {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    if !q.dtype().is_float() {
        bail!("attention: expected float inputs, got {:?}", q.dtype())
    }
    let needs_reference =
        params.need_weights || params.dropout > 0.0 || q.track_op() || k.track_op() || v.track_op();
    // Auto takes the fused CPU kernel whenever it supports the call: the crossover measurement
    // (see the module docs) found no shape where the reference is faster.
    let fused = !needs_reference
        && match params.backend {
            Backend::Reference => false,
            Backend::CpuFused => true,
            Backend::Auto => cpu::supports(q, k, v, params),
        };
    if fused {
        cpu::attention(q, k, v, mask, params)
    } else {
        reference::attention(q, k, v, mask, params)
    }
}

fn dims4(name: &str, t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match t.dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        other => {
            bail!("attention: {name} must be 4-D (B, heads, seq, head_dim), got shape {other:?}")
        }
    }
}
