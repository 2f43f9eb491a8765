//! The attention core: `softmax(scale · q·kᵀ + mask) · v` per head, behind one dispatcher.
//!
//! [`attention`] is the only entry point the module uses. Every kernel reads `q`, `k`, `v` in the
//! layout the projections produce, `(B, L, H, D)` / `(B, S, Hkv, D)` (any strides with a
//! contiguous last dimension: a narrowed view of a packed projection, a KV cache's buffer, all
//! read in place), takes the call's [`MaskPlan`], and writes `(B, L, H, Dv)`, so that merging the
//! heads is a free reshape. The dispatcher validates the shapes once and picks a kernel in one
//! place ([`Backend`], device, dtype, and what the call needs):
//!
//! | kernel | devices | dtypes | returns weights | dropout | differentiable |
//! |---|---|---|---|---|---|
//! | [`reference`](mod@reference) | every candle device | all floats | yes | yes | yes (only differentiable candle ops) |
//! | [`cpu`] | CPU | f32, f16, bf16 (f32 accumulation), head size ≤ [`cpu::MAX_HEAD_DIM`] | no | no | yes: a fused backward (fully-masked-row policy [`MaskedRowPolicy::Zero`] only) |
//! | [`cuda`] (opt-in: not yet run on a GPU) | CUDA, compute capability ≥ 8.0 | f16, bf16 (f32 accumulation), head size 64, 80, 96, 128, 256 | no | no | no |
//!
//! Routing rules, in order: a call that asks for the attention weights or uses dropout needs a
//! kernel with that capability: today only [`reference`](mod@reference), whatever the backend
//! asks. A call whose `q`, `k` or `v` is tracked by candle's autograd ([`Tensor::track_op`]: a
//! `Var` or derived from one) needs a differentiable kernel: the fused CPU kernel is one (its
//! output is an autograd node whose backward is the fused backward, see [`cpu`]), except under
//! [`MaskedRowPolicy::Nan`]. Otherwise [`Backend::Reference`] forces the reference path,
//! [`Backend::CpuFused`] forces the fused CPU kernel (an error, with the reason, on other
//! devices, on f64, for head sizes above [`cpu::MAX_HEAD_DIM`], or for tracked inputs under
//! [`MaskedRowPolicy::Nan`]), [`Backend::CudaFused`] forces the fused CUDA kernel (an error, with
//! the reason, for calls it cannot run: see [`cuda`]), and [`Backend::Auto`] takes the first fused
//! kernel that supports the call and the reference otherwise (f64, and CUDA until the CUDA kernel
//! has passed on a GPU: [`cuda::AUTO_ROUTED`]).
//!
//! Size budget: the reference materialises `(B, H, L, S)` scores (a few copies of them). Before
//! allocating anything, the dispatcher estimates that size (`3 × B·H·L·S` elements of the
//! compute dtype); a call over [`reference_budget_bytes`] goes to the fused CPU kernel when it
//! can serve the call (it never materialises the scores), and is otherwise refused with an error
//! naming the size and the budget, instead of aborting the process on a failed allocation. The
//! budget defaults to a quarter of `MemAvailable` (`/proc/meminfo`, read once; 4 GiB where that
//! cannot be read); [`set_reference_budget_bytes`] changes it for the process.
//!
//! Crossover: `examples/bench_attention.rs --crossover` times both kernels on tiny shapes
//! (B·H ∈ {1, 12, 96}, L = S ∈ {1 … 256}, D = 64). With the per-thread scratch reused across
//! calls the fused kernel was faster on every one (1.1× to 100×; the closest: B·H = 96,
//! L = S = 8 or 16), so `Auto` has no size threshold: no shape is small enough for the
//! reference to win.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use candle_core::{bail, DType, Result, Tensor};

use crate::config::{Backend, MaskedRowPolicy};
use crate::mask::MaskPlan;

pub mod cpu;
pub mod cuda;
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
    /// `(B, L, H, Dv)`, in the dtype of `q`.
    pub output: Tensor,
    /// `(B, H, L, S)` attention probabilities (compute dtype: f32, or f64 for f64 inputs) when
    /// requested.
    pub weights: Option<Tensor>,
    /// The kernel that served the call ([`KernelId::None`] for an empty call: `B`, `H` or `L`
    /// is 0, or there is no key). Compares with its name: `out.kernel == "cpu"`.
    pub kernel: KernelId,
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

/// The dtype scores and softmax are computed in for inputs of `dtype`: f64 stays f64, every
/// other float type computes in f32.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
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

/// The process-wide reference budget in bytes; 0 = the default ([`default_reference_budget`]).
static REFERENCE_BUDGET: AtomicU64 = AtomicU64::new(0);

/// The default reference budget when `/proc/meminfo` cannot be read: 4 GiB.
pub const FALLBACK_REFERENCE_BUDGET: u64 = 4 << 30;

/// The default budget of the reference kernel: a quarter of the memory available when first
/// asked (`MemAvailable` in `/proc/meminfo`), or [`FALLBACK_REFERENCE_BUDGET`] where that file
/// cannot be read (non-Linux systems). Read once per process.
pub fn default_reference_budget() -> u64 {
    static DEFAULT: OnceLock<u64> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| (kib.saturating_mul(1024) / 4).max(1))
            .unwrap_or(FALLBACK_REFERENCE_BUDGET)
    })
}

/// The largest score buffer the reference kernel may materialise, in bytes (see the
/// [module docs](self)): the value set by [`set_reference_budget_bytes`], else
/// [`default_reference_budget`].
pub fn reference_budget_bytes() -> u64 {
    match REFERENCE_BUDGET.load(Ordering::Relaxed) {
        0 => default_reference_budget(),
        b => b,
    }
}

/// Sets the reference kernel's budget for the whole process (`None`: back to the default).
/// Calls whose `(B, H, L, S)` scores would exceed it go to the fused CPU kernel when it can
/// serve them, and fail with an error naming the size otherwise.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_mha::kernels::{attention, set_reference_budget_bytes, AttnParams};
/// use candle_mha::mask::{MaskDims, MaskPlan};
/// use candle_mha::Backend;
/// let x = Tensor::zeros((1, 64, 2, 8), DType::F32, &Device::Cpu)?;
/// let plan = MaskPlan::new(MaskDims::new(1, 2, 64, 64));
/// let mut p = AttnParams::new(8);
/// p.backend = Backend::Reference;
/// set_reference_budget_bytes(Some(1024));
/// let err = attention(&x, &x, &x, &plan, &p).unwrap_err().to_string();
/// assert!(err.contains("over the budget"), "{err}");
/// p.backend = Backend::Auto; // the fused CPU kernel does not materialise the scores
/// assert_eq!(attention(&x, &x, &x, &plan, &p)?.kernel, "cpu");
/// set_reference_budget_bytes(None);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn set_reference_budget_bytes(bytes: Option<u64>) {
    let stored = match bytes {
        None => 0,
        Some(b) => b.max(1),
    };
    REFERENCE_BUDGET.store(stored, Ordering::Relaxed);
}

/// Bytes the reference kernel would materialise for `call`: three `(B, H, L, S)` buffers of the
/// compute dtype (scores, exponentials, probabilities), saturating.
fn reference_bytes(call: &AttnCall) -> u64 {
    let elems = [call.b, call.h, call.l, call.s]
        .iter()
        .fold(3u64, |acc, &x| acc.saturating_mul(x as u64));
    elems.saturating_mul(compute_dtype(call.q.dtype()).size_in_bytes() as u64)
}

/// `Err` when the reference would materialise more than the budget.
fn check_reference_budget(call: &AttnCall, why: impl FnOnce() -> String) -> Result<()> {
    let bytes = reference_bytes(call);
    let budget = reference_budget_bytes();
    if bytes > budget {
        let why = why();
        let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
        bail!(
            "reference attention would materialise 3 × (B, H, L, S) = 3 × ({}, {}, {}, {}) {:?} scores = {:.3} GiB, over the budget of {:.3} GiB ({why}); use a kernel that does not materialise the scores (the fused CPU kernel: no attention weights, no dropout), smaller chunks, or raise the budget with candle_mha::kernels::set_reference_budget_bytes",
            call.b,
            call.h,
            call.l,
            call.s,
            compute_dtype(call.q.dtype()),
            gib(bytes),
            gib(budget),
        )
    }
    Ok(())
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
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &MaskPlan,
    params: &AttnParams,
) -> Result<AttnOutput> {
    let (b, l, h, d) = dims4("q", q)?;
    let (bk, s, hkv, dk) = dims4("k", k)?;
    let (bv, sv, hv, dv) = dims4("v", v)?;
    if bk != b || bv != b {
        bail!("attention: batch sizes differ: q {b}, k {bk}, v {bv}")
    }
    if hv != hkv || sv != s {
        bail!(
            "attention: k {:?} and v {:?} must have the same length and heads",
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
    let md = mask.dims();
    if md.kv_len > s {
        bail!(
            "attention: the mask plan covers {} keys but k has only {s}",
            md.kv_len
        )
    }
    mask.check_dims("attention", b, h, l, md.kv_len)?;
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
    for (name, t) in [("k", k), ("v", v)] {
        if !t.device().same_device(q.device()) {
            bail!(
                "attention: {name} is on {:?} but q is on {:?}",
                t.device(),
                q.device()
            )
        }
    }
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
    let call = AttnCall {
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
    };
    select(&call)?.forward(&call)
}

/// Bytes the fused CPU kernel keeps between calls for reuse, on the calling thread and on
/// rayon's workers: the last calls' copies of K and V (a transposed K and a repacked V for
/// prefill-shaped calls, the four largest per thread: `8 · B · S · Hkv · D` bytes for an f32 call
/// of `S` keys, half that for bf16) and the converted K / V tiles of half and quantized inputs
/// (512 KiB per thread). Not counted: each thread's fixed tiles (about 0.25 MiB for the forward,
/// 0.65 MiB for the backward). [`release_cpu_buffers`] frees them.
pub fn cpu_retained_bytes() -> usize {
    cpu::retained_bytes()
}

/// Frees the buffers [`cpu_retained_bytes`] counts (a long-running server after a burst of long
/// prompts, say); the next calls allocate what they need again. Returns the bytes freed.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_mha::kernels::{attention, cpu_retained_bytes, release_cpu_buffers, AttnParams};
/// use candle_mha::mask::{MaskDims, MaskPlan};
/// let x = Tensor::zeros((1, 512, 4, 64), DType::F32, &Device::Cpu)?;
/// let plan = MaskPlan::new(MaskDims::new(1, 4, 512, 512));
/// attention(&x, &x, &x, &plan, &AttnParams::new(64))?; // keeps its copies of K and V
/// assert!(cpu_retained_bytes() > 0);
/// release_cpu_buffers();
/// assert_eq!(cpu_retained_bytes(), 0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn release_cpu_buffers() -> usize {
    cpu::release_buffers()
}

/// [`attention`] over the int8 keys and values of a quantized cache: read in place by the fused
/// CPU kernel when it can serve the call (CPU, [`Backend::Auto`] or [`Backend::CpuFused`], not
/// tracked by autograd, no weights or dropout), else dequantized to `q`'s dtype for
/// [`attention`].
pub(crate) fn attention_quantized(
    q: &Tensor,
    kv: &crate::cache::QuantKv,
    mask: &MaskPlan,
    params: &AttnParams,
) -> Result<AttnOutput> {
    let (b, l, h, d) = dims4("q", q)?;
    let (bk, s, hkv, dk) = dims4("k", &kv.k)?;
    let dv = kv.v.dim(3)?;
    let md = mask.dims();
    let shapes_ok = bk == b
        && dk == d
        && hkv > 0
        && h.is_multiple_of(hkv)
        && md.kv_len == s
        && kv.v.dims()[..3] == kv.k.dims()[..3]
        && b * h * l * dv > 0;
    let call = AttnCall {
        q,
        k: &kv.k,
        v: &kv.v,
        mask,
        params,
        b,
        l,
        h,
        hkv,
        s,
        d,
        dv,
        extra_keys: 0,
        kv_scales: Some((&kv.k_scale, &kv.v_scale)),
    };
    let fused = shapes_ok
        && matches!(params.backend, Backend::Auto | Backend::CpuFused)
        && q.device().is_cpu()
        && !call.tracked()
        && cpu::quant_rows(&kv.k, &kv.k_scale)
        && cpu::quant_rows(&kv.v, &kv.v_scale)
        && missing_capability(&cpu::CpuFused, &call).is_none()
        && cpu::CpuFused.unsupported_inputs(&call).is_none();
    if fused {
        mask.check_dims("attention", b, h, l, s)?;
        return cpu::CpuFused.forward(&call);
    }
    let (k, v) = kv.dequantize(q.dtype())?;
    attention(q, &k, &v, mask, params)
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

fn dims4(name: &str, t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match t.dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        other => {
            bail!("attention: {name} must be 4-D (B, seq, heads, head_dim), got shape {other:?}")
        }
    }
}

/// Hooks for the crate's own tests; not part of the API.
#[doc(hidden)]
pub mod test_support {
    /// Tests: whether the fused CUDA kernel fills each output with NaN bytes before writing it
    /// (an element it never writes then shows up as NaN instead of a stale value). A no-op
    /// without the `cuda` feature.
    pub fn set_cuda_poison(on: bool) {
        #[cfg(feature = "cuda")]
        super::cuda::set_poison(on);
        #[cfg(not(feature = "cuda"))]
        let _ = on;
    }

    /// [`super::attention`] of `q` over everything `cache` holds, as it is stored (an int8
    /// cache's rows read in place by the fused CPU kernel where it serves the call): what a
    /// cached decode step runs, without the projections (lets the benchmarks time it alone).
    pub fn attention_over_cache(
        q: &candle_core::Tensor,
        cache: &crate::cache::KvCache,
        mask: &crate::mask::MaskPlan,
        params: &super::AttnParams,
    ) -> candle_core::Result<super::AttnOutput> {
        match cache.stored()? {
            None => candle_core::bail!("attention_over_cache: the cache is empty"),
            Some(crate::cache::CachedKv::Dense(k, v)) => super::attention(q, &k, &v, mask, params),
            Some(crate::cache::CachedKv::Quant(kv)) => {
                super::attention_quantized(q, &kv, mask, params)
            }
        }
    }

    /// How many calls the fused CPU kernel has served in this process.
    pub fn cpu_calls() -> usize {
        super::cpu::calls()
    }

    /// How many fused CPU calls were split over their keys (flash-decoding).
    pub fn cpu_split_calls() -> usize {
        super::cpu::split_calls()
    }

    /// How many backward passes the fused CPU backward has served in this process.
    pub fn cpu_backward_calls() -> usize {
        super::cpu::bwd_calls()
    }

    /// How many of those computed their products on bf16 pairs (AVX512-BF16 dot products).
    pub fn cpu_pair_backward_calls() -> usize {
        super::cpu::pair_bwd_calls()
    }

    /// The instruction sets of the fused CPU kernel this CPU can run (`"avx512bf16"`,
    /// `"avx512"`, `"avx2"`, `"portable"`), best first.
    pub fn cpu_isas() -> Vec<&'static str> {
        super::cpu::isas()
    }

    /// Forces the fused CPU kernel's instruction set (`None`: the best available),
    /// process-wide; an error when the CPU lacks it.
    pub fn force_cpu_isa(name: Option<&str>) -> Result<(), String> {
        super::cpu::force_isa(name)
    }

    /// The fused CPU kernel's instruction set now.
    pub fn cpu_isa() -> &'static str {
        super::cpu::isa_name()
    }

    /// The projections' matmul, `lin.forward(x)`: the AVX512-BF16 GEMM for bf16 where the CPU
    /// has it (and AVX-512 is the instruction set in use), else candle's (lets the benchmarks
    /// time the projections alone).
    pub fn linear(
        lin: &candle_nn::Linear,
        x: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        crate::proj::linear(lin, x)
    }

    /// The GEMM kernel projections of `dtype` use now for calls of few rows (`None`: candle's
    /// matmul).
    pub fn proj_gemm_kernel(dtype: candle_core::DType) -> Option<&'static str> {
        super::cpu::proj_kernel(dtype).map(|k| k.name())
    }

    /// The packed GEMM kernel projections of `dtype` use now for calls of at least
    /// [`packed_min_rows`] rows (`None`: the dot-product kernels or candle's matmul).
    pub fn packed_gemm_kernel(dtype: candle_core::DType) -> Option<&'static str> {
        crate::proj::packed_kernel(dtype).map(|k| k.name())
    }

    /// Rows from which projections take the packed GEMM.
    pub fn packed_min_rows() -> usize {
        crate::proj::PACK_MIN_ROWS
    }

    /// The machine's register-only peak rates ([`PeakKind`]).
    pub use crate::gemm::peak::{peak_gflops, PeakKind};

    /// The CPU's L1d and L2 sizes in bytes as the packed GEMM reads them.
    pub fn cache_sizes() -> (usize, usize) {
        crate::gemm::cache_sizes()
    }

    /// A projection that keeps its weight packed (as the module's own projections do).
    #[derive(Clone, Debug)]
    pub struct PackedLinear(crate::proj::Proj);

    impl PackedLinear {
        /// Wraps `lin`.
        pub fn new(lin: candle_nn::Linear) -> Self {
            Self(crate::proj::Proj::new(lin))
        }

        /// `x · Wᵀ + b`.
        pub fn forward(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
            self.0.forward(x)
        }

        /// Bytes of the packed weight kept (0 before the first call that packs).
        pub fn packed_bytes(&self) -> usize {
            self.0.packed_bytes()
        }
    }

    /// Forces the fused CPU kernel's portable (`gemm`) products even where AVX-512 is
    /// available (process-wide), so that tests cover both paths on one machine.
    pub fn set_portable_only(on: bool) {
        super::cpu::set_portable_only(on)
    }
}
