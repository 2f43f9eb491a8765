//! The attention core behind one dispatcher, and its process-wide settings.
//!
//! Every entry point ([`MultiHeadAttention`](crate::MultiHeadAttention), [`sdpa()`](fn@crate::sdpa),
//! [`sdpa_varlen`](crate::sdpa_varlen), paged attention) computes
//! `softmax(scale · q·kᵀ + mask) · v` per head through one dispatcher, which validates the shapes
//! once and picks a kernel in one place ([`Backend`], device, dtype, and what the call needs);
//! [`KernelId`] tells which one served a call:
//!
//! | kernel | devices | dtypes | returns weights | dropout | differentiable |
//! |---|---|---|---|---|---|
//! | reference | every candle device | all floats | yes | yes | yes (only differentiable candle ops) |
//! | fused CPU | CPU | f32, f16, bf16 (f32 accumulation), head size ≤ 256 | no | no | yes: a fused backward (fully-masked-row policy [`MaskedRowPolicy::Zero`] only) |
//! | fused CUDA (opt-in: not yet run on a GPU) | CUDA, compute capability ≥ 8.0 | f16, bf16 (f32 accumulation), head size 64, 80, 96, 128, 256 | no | no | no |
//!
//! Routing rules, in order: a call that asks for the attention weights or uses dropout needs a
//! kernel with that capability: today only the reference, whatever the backend asks. A call
//! whose `q`, `k` or `v` is tracked by candle's autograd ([`Tensor::track_op`]: a `Var` or
//! derived from one) needs a differentiable kernel: the fused CPU kernel is one (its output is an
//! autograd node whose backward is the fused backward), except under [`MaskedRowPolicy::Nan`].
//! Otherwise [`Backend::Reference`] forces the reference path, [`Backend::CpuFused`] forces the
//! fused CPU kernel (an error, with the reason, on other devices, on f64, for head sizes above
//! 256, or for tracked inputs under [`MaskedRowPolicy::Nan`]), [`Backend::CudaFused`] forces the
//! fused CUDA kernel (an error, with the reason, for calls it cannot run), and [`Backend::Auto`]
//! takes the first fused kernel that supports the call and the reference otherwise (f64, and
//! CUDA until the CUDA kernel has passed on a GPU).
//!
//! Size budget: the reference materialises `(B, H, L, S)` scores (a few copies of them). Before
//! allocating anything, the dispatcher estimates that size (`3 × B·H·L·S` elements of the
//! compute dtype); a call over the budget goes to the fused CPU kernel when it can serve the call
//! (it never materialises the scores), and is otherwise refused with an error naming the size
//! and the budget, instead of aborting the process on a failed allocation. The budget defaults
//! to a quarter of `MemAvailable` (`/proc/meminfo`, read once; 4 GiB where that cannot be read);
//! [`set_reference_budget_bytes`] changes it for the process.
//!
//! Retained memory: the fused CPU kernel keeps its last copies of K and V per thread for reuse;
//! [`release_cpu_buffers`] frees them.
//!
//! Crossover: `examples/bench_attention.rs --crossover` times both kernels on tiny shapes
//! (B·H ∈ {1, 12, 96}, L = S ∈ {1 … 256}, D = 64). With the per-thread scratch reused across
//! calls the fused kernel was faster on every one (1.1× to 100×; the closest: B·H = 96,
//! L = S = 8 or 16), so `Auto` has no size threshold: no shape is small enough for the
//! reference to win.

use candle_core::{bail, DType, Result, Tensor};

use crate::config::{Backend, MaskedRowPolicy};
use crate::mask::MaskPlan;

mod budget;
internal! { mod cpu; }
internal! { mod cuda; }
mod gathered;
internal! { mod paged; }
internal! { mod reference; }
pub(crate) use gathered::{attention_paged, attention_quantized, attention_quantized_rows};
#[cfg(test)]
mod rows_tests;
pub(crate) mod validate;

use budget::check_reference_budget;
pub use budget::set_reference_budget_bytes;
internal! { use budget::{default_reference_budget, reference_budget_bytes, FALLBACK_REFERENCE_BUDGET}; }

internal! {
    /// Per-call options of the attention core.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct AttnParams {
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

internal! {
    /// What the attention core returns.
    #[derive(Debug, Clone)]
    struct AttnOutput {
        /// `(B, L, H, Dv)`, in the dtype of `q`.
        pub output: Tensor,
        /// `(B, H, L, S)` attention probabilities (compute dtype: f32, or f64 for f64 inputs) when
        /// requested.
        pub weights: Option<Tensor>,
        /// The kernel that served the call ([`KernelId::None`] for an empty call: `B`, `H` or `L`
        /// is 0, or there is no key). Compares with its name: `out.kernel == "cpu"`.
        pub kernel: KernelId,
    }
}

/// Which kernel served a call.
///
/// ```
/// use candle_mha::kernels::KernelId;
/// assert_eq!(KernelId::Cpu, "cpu");
/// assert_eq!(KernelId::Reference.to_string(), "reference");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelId {
    /// The reference kernel on candle ops.
    Reference,
    /// The fused CPU kernel.
    Cpu,
    /// The fused CUDA kernel.
    Cuda,
    /// No kernel: an empty call (nothing to compute).
    None,
}

impl KernelId {
    /// The kernel's name: `"reference"`, `"cpu"`, `"cuda"` or `"none"`.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelId::Reference => "reference",
            KernelId::Cpu => "cpu",
            KernelId::Cuda => "cuda",
            KernelId::None => "none",
        }
    }
}

impl std::fmt::Display for KernelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for KernelId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for KernelId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

internal! {
    /// The dtype scores and softmax are computed in for inputs of `dtype`: f64 stays f64, every
    /// other float type computes in f32.
    fn compute_dtype(dtype: DType) -> DType {
        match dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        }
    }
}

/// One validated call, as the kernels see it.
pub(crate) struct AttnCall<'a> {
    /// `(B, L, H, D)`.
    pub q: &'a Tensor,
    /// `(B, S, Hkv, D)`: the plan's `kv_len` maskable keys, then `extra_keys` always visible.
    pub k: &'a Tensor,
    /// `(B, S, Hkv, Dv)`.
    pub v: &'a Tensor,
    pub mask: &'a MaskPlan,
    pub params: &'a AttnParams,
    pub b: usize,
    pub l: usize,
    pub h: usize,
    pub hkv: usize,
    /// All keys, appended ones included.
    pub s: usize,
    pub d: usize,
    pub dv: usize,
    /// Keys after the plan's `kv_len`, never masked (`add_bias_kv`, `add_zero_attn`).
    pub extra_keys: usize,
    /// With an int8 KV cache: `k` and `v` are its `U8` rows (value + 128) and these their
    /// `(B, S, Hkv)` f32 scales (only the fused CPU kernel gets such calls).
    pub kv_scales: Option<(&'a Tensor, &'a Tensor)>,
    /// With a paged KV cache: key `j` (of `S`) of batch element `b` is row `key_rows[b·S + j]`
    /// of `k` and `v` (`(1, rows, Hkv, D | Dv)`, the pool's blocks); only the fused CPU kernel
    /// gets such calls.
    pub key_rows: Option<&'a [u32]>,
}

impl AttnCall<'_> {
    /// Whether candle's autograd tracks any input (q, k, v, the sinks or the ALiBi slopes).
    pub(crate) fn tracked(&self) -> bool {
        let tracked = |t: Option<&Tensor>| t.is_some_and(Tensor::track_op);
        self.q.track_op()
            || self.k.track_op()
            || self.v.track_op()
            || tracked(self.mask.sinks())
            || tracked(self.mask.alibi_slopes())
    }
}

/// What a kernel can do besides computing the output.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    /// Returns the attention weights.
    pub weights: bool,
    /// Applies dropout to the attention weights.
    pub dropout: bool,
    /// Gradients flow through it.
    pub backward: bool,
}

/// One attention implementation behind the dispatcher.
pub(crate) trait Kernel: Sync {
    /// Short name, in messages.
    fn name(&self) -> &'static str;
    /// Which kernel this is, reported in [`AttnOutput::kernel`].
    fn id(&self) -> KernelId;
    /// What it can do besides the forward output.
    fn caps(&self) -> Caps;
    /// Why it cannot run these inputs (device, dtype, head size); `None` if it can.
    fn unsupported_inputs(&self, call: &AttnCall) -> Option<String>;
    /// Runs the call (validated by the dispatcher, eligibility checked).
    fn forward(&self, call: &AttnCall) -> Result<AttnOutput>;
}

/// Fused kernels in order of preference for [`Backend::Auto`] (the CUDA kernel only once it has
/// passed on a GPU: [`cuda::AUTO_ROUTED`]).
fn fused() -> &'static [&'static dyn Kernel] {
    if cuda::AUTO_ROUTED {
        &[&cpu::CpuFused, &cuda::CudaFused]
    } else {
        &[&cpu::CpuFused]
    }
}

/// The fused kernel that would serve calls on `call`'s device, to explain why it did not.
fn fused_for_device(call: &AttnCall) -> &'static dyn Kernel {
    if call.q.device().is_cuda() {
        &cuda::CudaFused
    } else {
        &cpu::CpuFused
    }
}

/// Which capability the call needs that `kernel` lacks, if any.
fn missing_capability(kernel: &dyn Kernel, call: &AttnCall) -> Option<String> {
    let caps = kernel.caps();
    let name = kernel.name();
    if call.params.need_weights && !caps.weights {
        return Some(format!("the {name} kernel returns no attention weights"));
    }
    if call.params.dropout > 0.0 && !caps.dropout {
        return Some(format!("the {name} kernel has no dropout"));
    }
    if call.tracked() && !caps.backward {
        return Some(format!("the {name} kernel is not differentiable"));
    }
    None
}

/// The one place that decides which kernel serves a call, within the reference's size budget.
fn select(call: &AttnCall) -> Result<&'static dyn Kernel> {
    let kernel = select_kernel(call)?;
    if kernel.name() == reference::Reference.name() {
        // Why the reference serves it: worked out only for the error message.
        check_reference_budget(call, || match call.params.backend {
            Backend::Reference => "Backend::Reference was asked for".to_string(),
            _ => {
                let k = fused_for_device(call);
                missing_capability(k, call)
                    .or_else(|| k.unsupported_inputs(call))
                    .unwrap_or_else(|| "no fused kernel serves this call".into())
            }
        })?;
    }
    Ok(kernel)
}

/// Which kernel serves a call, by backend, device, dtype and capabilities.
fn select_kernel(call: &AttnCall) -> Result<&'static dyn Kernel> {
    let eligible = |k: &dyn Kernel| {
        missing_capability(k, call).is_none() && k.unsupported_inputs(call).is_none()
    };
    Ok(match call.params.backend {
        Backend::Reference => &reference::Reference,
        Backend::CpuFused => forced(&cpu::CpuFused, "Backend::CpuFused", call)?,
        Backend::CudaFused => forced(&cuda::CudaFused, "Backend::CudaFused", call)?,
        Backend::Auto => fused()
            .iter()
            .copied()
            .find(|k| eligible(*k))
            .unwrap_or(&reference::Reference),
    })
}

/// The kernel a forced backend gets: `kernel`, the reference for calls needing a capability it
/// lacks (weights, dropout: the documented rule), or an error naming why it cannot run the call.
fn forced(kernel: &'static dyn Kernel, what: &str, call: &AttnCall) -> Result<&'static dyn Kernel> {
    if missing_capability(kernel, call).is_some() {
        Ok(&reference::Reference)
    } else if let Some(reason) = kernel.unsupported_inputs(call) {
        bail!("{what}: {reason}")
    } else {
        Ok(kernel)
    }
}

internal! {
    /// Scaled dot-product attention over heads.
    ///
    /// `q`: `(B, L, H, D)`, `k`: `(B, S, Hkv, D)`, `v`: `(B, S, Hkv, Dv)` with `Hkv` dividing `H`
    /// (query head `h` reads KV head `h / (H / Hkv)`, as Hugging Face's `repeat_kv`); any strides
    /// with a contiguous last dimension are read in place. `mask` must have been built for
    /// `(B, H, L, S')` with `S' <= S`: the keys after the first `S'` (appended by `add_bias_kv` /
    /// `add_zero_attn`) are never masked. Returns `(B, L, H, Dv)`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_mha::kernels::{attention, AttnParams};
    /// use candle_mha::mask::{CausalAlignment, MaskDims, MaskPlan};
    /// let dev = Device::Cpu;
    /// let q = Tensor::randn(0f32, 1., (2, 5, 4, 8), &dev)?; // (B, L, H, D)
    /// let kv = Tensor::randn(0f32, 1., (2, 5, 2, 8), &dev)?; // 2 KV heads for 4 query heads
    /// let mask = MaskPlan::new(MaskDims::new(2, 4, 5, 5)).with_causal(CausalAlignment::TopLeft)?;
    /// let out = attention(&q, &kv, &kv, &mask, &AttnParams::new(8))?;
    /// assert_eq!(out.output.dims(), &[2, 5, 4, 8]);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &MaskPlan,
        params: &AttnParams,
    ) -> Result<AttnOutput> {
        let call = checked_call(q, k, v, mask, params)?;
        let (b, l, h, s, dv) = (call.b, call.l, call.h, call.s, call.dv);
        if b * h * l * dv == 0 || s == 0 {
            // With attention sinks a row without keys keeps only the sink: 0 under any policy.
            let params = if mask.sinks().is_some() {
                &AttnParams {
                    masked_rows: MaskedRowPolicy::Zero,
                    ..*params
                }
            } else {
                params
            };
            return empty_call(q, (b, l, h, dv), s, params);
        }
        select(&call)?.forward(&call)
    }
}

/// [`attention`]'s arguments checked (shapes, the mask plan against them) and gathered into
/// one call, which may have nothing to compute (`B`, `H`, `L` or `Dv` is 0, or `S` is).
fn checked_call<'a>(
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    mask: &'a MaskPlan,
    params: &'a AttnParams,
) -> Result<AttnCall<'a>> {
    let validate::QkvDims {
        b,
        l,
        h,
        d,
        s,
        hkv,
        dv,
    } = validate::qkv(&validate::ATTENTION, q, k, v)?;
    let md = mask.dims();
    if md.kv_len > s {
        bail!(
            "attention: the mask plan covers {} keys but k has only {s}",
            md.kv_len
        )
    }
    mask.check_dims("attention", b, h, l, md.kv_len)?;
    Ok(AttnCall {
        q,
        k,
        v,
        mask,
        params,
        b,
        l,
        h,
        hkv,
        s,
        d,
        dv,
        extra_keys: s - md.kv_len,
        kv_scales: None,
        key_rows: None,
    })
}

internal! {
    /// Bytes the fused CPU kernel keeps between calls for reuse, on the calling thread and on
    /// rayon's workers: the last calls' copies of K and V (a transposed K and a repacked V for
    /// prefill-shaped calls, the four largest per thread: `8 · B · S · Hkv · D` bytes for an f32 call
    /// of `S` keys, half that for bf16) and the converted K / V tiles of half and quantized inputs
    /// (512 KiB per thread). Not counted: each thread's fixed tiles (about 0.25 MiB for the forward,
    /// 0.65 MiB for the backward). `release_cpu_buffers` frees them.
    fn cpu_retained_bytes() -> usize {
        cpu::retained_bytes()
    }
}

/// Frees the buffers the fused CPU kernel keeps between calls for reuse, on the calling thread
/// and on rayon's workers (a long-running server after a burst of long prompts, say); the next
/// calls allocate what they need again. Returns the bytes freed.
///
/// What it frees: the last calls' copies of K and V (a transposed K and a repacked V for
/// prefill-shaped calls, the four largest per thread: `8 · B · S · Hkv · D` bytes for an f32 call
/// of `S` keys, half that for bf16) and the converted K / V tiles of half and quantized inputs
/// (512 KiB per thread). Not freed: each thread's fixed tiles (about 0.25 MiB for the forward,
/// 0.65 MiB for the backward).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_mha::{kernels::release_cpu_buffers, sdpa, SdpaOptions};
/// let x = Tensor::zeros((1, 4, 512, 64), DType::F32, &Device::Cpu)?; // (B, H, L, D)
/// sdpa(&x, &x, &x, &SdpaOptions::new())?; // the fused CPU kernel keeps its copies of K and V
/// assert!(release_cpu_buffers() > 0);
/// assert_eq!(release_cpu_buffers(), 0); // nothing left
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn release_cpu_buffers() -> usize {
    cpu::release_buffers()
}

/// A call with nothing to compute (`B`, `H`, `L` or `Dv` is 0), or no key at all (`S = 0`: every row
/// fully masked): the output by the fully-masked-row policy, without a kernel.
fn empty_call(
    q: &Tensor,
    (b, l, h, dv): (usize, usize, usize, usize),
    s: usize,
    params: &AttnParams,
) -> Result<AttnOutput> {
    let zeros = Tensor::zeros((b, l, h, dv), q.dtype(), q.device())?;
    let output = match params.masked_rows {
        MaskedRowPolicy::Zero => zeros,
        MaskedRowPolicy::Nan => (zeros + f64::NAN)?,
    };
    let weights = if params.need_weights {
        let w = Tensor::zeros((b, h, l, s), compute_dtype(q.dtype()), q.device())?;
        Some(match params.masked_rows {
            MaskedRowPolicy::Zero => w,
            MaskedRowPolicy::Nan => (w + f64::NAN)?,
        })
    } else {
        None
    };
    Ok(AttnOutput {
        output,
        weights,
        kernel: KernelId::None,
    })
}

/// Hooks for the crate's own tests; not part of the API (feature `internals`).
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod test_support;
