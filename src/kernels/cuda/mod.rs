//! The fused CUDA kernel: flash attention written in Triton (`kernels/triton/flash_attention.py`),
//! compiled ahead of time to cubins and PTX that ship inside the crate, launched through candle's
//! [`CustomOp3`](candle_core::CustomOp3) API behind the `cuda` feature.
//!
//! **Status: opt-in, not yet run on a GPU.** [`Backend::CudaFused`](crate::Backend::CudaFused)
//! forces it; [`Backend::Auto`](crate::Backend::Auto) keeps the reference on CUDA until
//! `scripts/gpu-check.sh` has passed on a real GPU ([`AUTO_ROUTED`] is `false`). What has been
//! checked without a GPU: the Triton source under Triton's interpreter against the reference
//! semantics on a sweep of shapes and masks, every shipped cubin assembled with no register spill,
//! and the shipped PTX and cubins against the launcher's manifest (`scripts/cuda-cpu-check.sh`);
//! the launcher's argument lists against the manifest (tests).
//!
//! - **Artifacts.** Every variant (f16 and bf16; head sizes 64, 80, 96, 128, 256; with and
//!   without a dense bias, with and without soft-capping/ALiBi; the forward and the two decode
//!   kernels) is compiled for `sm_80` and for
//!   `sm_90a` (H100/H200, wgmma) and assembled by the ptxas that Triton bundles
//!   ([`PTXAS_VERSION`]): `kernels.cubin.xz` holds the cubins (3.6 MB, about 0.22 MB
//!   xz-compressed), `kernels.ptx.xz` the `sm_80` PTX (3.7 MB, about 0.11 MB). `manifest.rs`,
//!   generated with them by `scripts/build_cuda_kernels.py`, gives each variant's entry,
//!   parameters, launch shape, shared memory, registers and spills (none), and hashes. A build
//!   needs no nvcc, no Python and no extra time.
//! - **Loading.** A GPU of compute capability 8.x loads the `sm_80` cubins, 9.0 the `sm_90a`
//!   ones; any other GPU from 8.0 on gets the `sm_80` PTX, which its driver compiles the first
//!   time a variant is used (and caches). An `sm_80` cubin the driver refuses falls back to its
//!   PTX.
//! - **What a call needs** (otherwise it gets a reason and, under `Auto`, the reference): f16 or
//!   bf16 (f32 stays on the reference: a tensor-core kernel would compute it in TF32); head size
//!   64, 80, 96, 128 or 256, equal for k and v; no appended keys (`add_bias_kv`,
//!   `add_zero_attn`); q, k, v with a contiguous last dimension, batch, row and head strides that
//!   are multiples of 16 elements and 16-byte aligned starts (the alignment the artifacts were
//!   compiled for: it lets every q, k and v load be vectorised); sizes within `i32`; a GPU of
//!   compute capability 8.0 or later with the shared memory the variant needs; no autograd,
//!   attention weights or dropout.
//! - **Masks.** Causal in both alignments and sliding windows (tiles outside the band are never
//!   loaded), key padding as per-batch key ranges, packed sequences (`cu_seqlens`), a dense
//!   additive bias of any broadcast shape (read per tile, in its own compiled variant), GQA/MQA
//!   without repeating K/V, `L != S`, and the fully-masked-row policy of the reference.
//! - **Score modifiers.** Soft-capping (`softcap`, 0 = off) on the scaled logits of each tile,
//!   as `c - 2c / (exp(2s/c) + 1)`; ALiBi (a slopes pointer, `has_alibi`, and the slopes' row
//!   stride: 0 for one row, `H` per batch element or packed sequence) subtracted per element
//!   from the sequence's own `i + S - L`; then the bias and the masks; the sink (`Sinks`,
//!   `has_sinks`) joins each row's online softmax once the row is finished (in the combine
//!   kernel on the decode path, never per split), so a row with no visible key gives 0 under
//!   either policy. All are runtime arguments; the forward has one compile-time flag,
//!   `HAS_MODIFIERS` (soft-capping or ALiBi: a runtime branch between the wgmma and the
//!   softmax fails Triton's sm_90a pipeliner), so calls without them run the loop they ran
//!   before; sinks need no variant. Forward only: autograd (sinks or slopes tracked included)
//!   takes the reference.
//! - **Decode.** Few query rows (`GROUP · L <= 16`) over long keys (`S >=` [`DECODE_MIN_KEYS`])
//!   take the flash-decoding pair: the keys are split across programs (enough for two waves over
//!   the GPU's multiprocessors), each reading a K/V tile once for all the query heads that share
//!   it, and a second kernel merges the partial results.

// Without the `cuda` feature the launcher is absent; the logic it uses stays compiled and tested.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{DType, Layout, Tensor};

use super::{AttnCall, AttnOutput, Caps, Kernel};
use crate::config::MaskedRowPolicy;

pub(crate) mod artifact;
#[rustfmt::skip]
pub(crate) mod manifest;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub(crate) use launch::set_poison;

use artifact::{Dt, KernelKind};
pub use manifest::{BLOB_SHA256, CUBIN_BLOB_SHA256, PTXAS_VERSION, SOURCE_SHA256, TRITON_VERSION};

/// Whether [`Backend::Auto`](crate::Backend::Auto) routes CUDA calls to this kernel. `false`
/// until `scripts/gpu-check.sh` has passed on a real GPU: until then `Auto` keeps the reference
/// on CUDA and [`Backend::CudaFused`](crate::Backend::CudaFused) opts in.
pub const AUTO_ROUTED: bool = false;

/// Calls with at least this many keys (and few query rows) take the split-K decode kernels.
pub const DECODE_MIN_KEYS: usize = 1024;

/// Query rows per decode program: `GROUP · L` must fit (the `BLOCK_M` of `attn_decode_split`).
pub const DECODE_MAX_ROWS: usize = 16;

/// The fused CUDA kernel behind the dispatcher.
pub(crate) struct CudaFused;

/// One argument of a kernel launch, as the PTX entry takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Arg {
    /// A device pointer (`*fp16`, `*bf16`, `*fp32`, `*i32`).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    /// Whether the manifest type `ty` (`*fp16`, `i32`, `i64`, `fp32`, ...) takes this argument.
    fn fits(&self, ty: &str) -> bool {
        match self {
            Arg::Ptr(_) => ty.starts_with('*'),
            Arg::I32(_) => ty == "i32",
            Arg::I64(_) => ty == "i64",
            Arg::F32(_) => ty == "fp32",
        }
    }
}

/// Errors unless `args` are exactly the artifact's parameters, by name and type, in order: a
/// launch with a stale argument list fails instead of computing garbage.
pub(crate) fn check_args(a: &artifact::Artifact, args: &[(&str, Arg)]) -> Result<(), String> {
    let want: Vec<(&str, &str)> = a
        .params
        .split(',')
        .map(|p| p.split_once(':').unwrap_or((p, "")))
        .collect();
    if want.len() != args.len() {
        return Err(format!(
            "{}: the launcher passes {} arguments, the PTX takes {}",
            a.entry,
            args.len(),
            want.len()
        ));
    }
    for ((name, arg), (wname, wty)) in args.iter().zip(&want) {
        if name != wname || !arg.fits(wty) {
            return Err(format!(
                "{}: argument {name} = {arg:?} where the PTX takes {wname}: {wty}",
                a.entry
            ));
        }
    }
    Ok(())
}

/// Strides of a `(B, seq, heads, D)` view as the kernel takes them: `(batch, row, head)` in
/// elements, 0 for a dimension of size 1 (never stepped over, and divisible by anything).
pub(crate) fn strides3(layout: &Layout) -> [usize; 3] {
    let dims = layout.dims();
    let st = layout.stride();
    [0, 1, 2].map(|i| if dims[i] == 1 { 0 } else { st[i] })
}

/// Why a 4-D q/k/v/output layout does not fit the artifacts' assumptions, if it does not.
pub(crate) fn layout_problem(name: &str, layout: &Layout, elem: usize) -> Option<String> {
    let st = layout.stride();
    if layout.dims()[3] > 1 && st[3] != 1 {
        return Some(format!(
            "{name} has a strided last dimension (strides {st:?}); the CUDA kernel reads contiguous rows"
        ));
    }
    let [sb, sr, sh] = strides3(layout);
    if !sb.is_multiple_of(16) || !sr.is_multiple_of(16) || !sh.is_multiple_of(16) {
        return Some(format!(
            "{name}'s batch, row and head strides {:?} must be multiples of 16 elements for the CUDA kernel",
            [sb, sr, sh]
        ));
    }
    if !(layout.start_offset() * elem).is_multiple_of(16) {
        return Some(format!(
            "{name} starts {} elements into its buffer, not 16-byte aligned",
            layout.start_offset()
        ));
    }
    if sb > i64::MAX as usize || sr > i32::MAX as usize || sh > i32::MAX as usize {
        return Some(format!("{name}'s strides do not fit the kernel's integers"));
    }
    None
}

/// Whether a call takes the decode kernels: few query rows per KV head over long keys, not
/// packed.
pub(crate) fn use_decode(c: &AttnCall) -> bool {
    let group = c.h / c.hkv;
    !c.mask.is_packed() && group * c.l <= DECODE_MAX_ROWS && c.s >= DECODE_MIN_KEYS
}

/// `(splits, chunk)`: the keys cut into chunks of whole `block_n` tiles, enough chunks for two
/// waves of programs over `num_sms` multiprocessors (`programs` is the grid without splitting).
pub(crate) fn decode_splits(
    s: usize,
    block_n: usize,
    programs: usize,
    num_sms: usize,
) -> (usize, usize) {
    let blocks = s.div_ceil(block_n);
    let splits = (2 * num_sms)
        .div_ceil(programs.max(1))
        .clamp(1, blocks.max(1));
    let chunk = blocks.div_ceil(splits) * block_n;
    (s.div_ceil(chunk), chunk)
}

/// Why the call cannot run on the fused CUDA kernel, device aside.
pub(crate) fn unsupported_call(c: &AttnCall) -> Option<String> {
    let Some(dt) = Dt::of(c.q.dtype()) else {
        return Some(match c.q.dtype() {
            DType::F32 => "the fused CUDA kernel takes f16/bf16; f32 stays on the reference (a tensor-core kernel would compute it in TF32)".into(),
            other => format!("the fused CUDA kernel takes f16/bf16, got {other:?}"),
        });
    };
    if c.d != c.dv {
        return Some(format!(
            "the fused CUDA kernel needs equal q/k and v head sizes, got {} and {}",
            c.d, c.dv
        ));
    }
    if artifact::find(KernelKind::Fwd, 80, dt, c.d, false, false).is_none() {
        return Some(format!(
            "the fused CUDA kernel is compiled for head sizes {:?}, got {}",
            artifact::head_dims(),
            c.d
        ));
    }
    if c.extra_keys > 0 {
        return Some(
            "appended keys (add_bias_kv / add_zero_attn) are not supported by the fused CUDA kernel"
                .into(),
        );
    }
    // Grid: (row tiles, sequences, heads); CUDA allows 65535 in y and z.
    let sequences = c
        .mask
        .packed_offsets()
        .map_or(c.b, |(cu_q, _)| cu_q.len() - 1);
    let too_big = [c.b, c.l, c.s, c.h].iter().any(|&x| x > i32::MAX as usize)
        || c.h > 65535
        || sequences > 65535;
    if too_big {
        return Some(format!(
            "(B, L, H, S) = ({}, {}, {}, {}) with {sequences} sequences exceeds the CUDA kernel's grid or integer limits",
            c.b, c.l, c.h, c.s
        ));
    }
    if let Some(why) = modifier_problem(c, sequences) {
        return Some(why);
    }
    let elem = c.q.dtype().size_in_bytes();
    for (name, t) in [("q", c.q), ("k", c.k), ("v", c.v)] {
        if let Some(why) = layout_problem(name, t.layout(), elem) {
            return Some(why);
        }
    }
    None
}

/// Why the call's score modifiers (named in the message) do not fit the kernel's arguments, if
/// they do not: ALiBi slopes of shape `(1 or sequences, H)` (`sequences`: the batch elements, or
/// the packed sequences), sinks of shape `(H,)`, a soft-cap that is finite and positive as an
/// f32. The mask plan validates all three; this guards the kernel's reads against a plan built
/// otherwise.
pub(crate) fn modifier_problem(c: &AttnCall, sequences: usize) -> Option<String> {
    let why = if let Some(t) = c
        .mask
        .alibi_slopes()
        .filter(|t| !matches!(*t.dims(), [n, h] if h == c.h && (n == 1 || n == sequences)))
    {
        format!(
            "ALiBi slopes of shape (1 or {sequences}, {}) expected, got {:?}",
            c.h,
            t.dims()
        )
    } else if let Some(t) = c.mask.sinks().filter(|t| t.dims() != [c.h]) {
        format!("sinks of shape ({},) expected, got {:?}", c.h, t.dims())
    } else if let Some(cap) = c
        .mask
        .softcap()
        .filter(|&cap| !((cap as f32).is_finite() && cap as f32 > 0.0))
    {
        format!("softcap {cap} is not a finite positive f32")
    } else {
        return None;
    };
    Some(format!(
        "the fused CUDA kernel cannot apply these score modifiers ({}): {why}",
        c.mask.score_modifier_names()
    ))
}

/// The dense additive bias the kernel reads: the plan's attention mask and float key padding
/// merged (f32, 4-D, contiguous last dimension), or `None`.
pub(crate) fn dense_bias(c: &AttnCall) -> candle_core::Result<Option<Tensor>> {
    let bias = c.mask.bias().cloned();
    let key = match c.mask.key_bias() {
        Some(kb) => Some(kb.reshape((c.b, 1, 1, c.mask.dims().kv_len))?),
        None => None,
    };
    let merged = match (bias, key) {
        (None, None) => return Ok(None),
        (Some(b), None) => b,
        (None, Some(k)) => k,
        (Some(b), Some(k)) => b.broadcast_add(&k)?,
    };
    let merged = merged.to_dtype(DType::F32)?;
    let st = merged.stride();
    Ok(Some(if st[3] == 1 {
        merged
    } else {
        merged.contiguous()?
    }))
}

/// The scalar arguments every forward variant shares, from the call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Flags {
    pub causal: i32,
    pub bottom_right: i32,
    pub window: i32,
    pub has_range: i32,
    pub nan_rows: i32,
    pub scale: f32,
    /// The soft-cap `c` (`s ← c·tanh(s/c)`); 0 = off.
    pub softcap: f32,
    /// Whether ALiBi slopes are read.
    pub has_alibi: i32,
    /// The slopes' row stride in elements: 0 for one row, `H` for one row per batch element
    /// (per packed sequence).
    pub alibi_stride: i32,
    /// Whether sink logits are read (they join every row's softmax once, at its end).
    pub has_sinks: i32,
}

impl Flags {
    pub(crate) fn of(c: &AttnCall) -> Self {
        let causal = c.mask.causal();
        Flags {
            causal: causal.is_some() as i32,
            bottom_right: matches!(
                causal.map(|c| c.alignment),
                Some(crate::mask::CausalAlignment::BottomRight)
            ) as i32,
            window: causal
                .and_then(|c| c.window)
                .map_or(0, |w| w.min(i32::MAX as usize) as i32),
            has_range: c.mask.key_ranges().is_some() as i32,
            nan_rows: (c.params.masked_rows == MaskedRowPolicy::Nan) as i32,
            scale: c.params.scale as f32,
            softcap: c.mask.softcap().map_or(0.0, |cap| cap as f32),
            has_alibi: c.mask.alibi_slopes().is_some() as i32,
            alibi_stride: match c.mask.alibi_slopes().map(|t| t.dims()[0]) {
                Some(n) if n > 1 => c.h as i32,
                _ => 0,
            },
            has_sinks: c.mask.sinks().is_some() as i32,
        }
    }
}

impl Kernel for CudaFused {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn id(&self) -> super::KernelId {
        super::KernelId::Cuda
    }

    fn caps(&self) -> Caps {
        Caps {
            weights: false,
            dropout: false,
            backward: false,
        }
    }

    fn unsupported_inputs(&self, c: &AttnCall) -> Option<String> {
        if !c.q.device().is_cuda() {
            return Some(format!(
                "the fused CUDA kernel needs CUDA tensors, got {:?}",
                c.q.device().location()
            ));
        }
        #[cfg(not(feature = "cuda"))]
        {
            Some("candle-mha was built without the `cuda` feature".into())
        }
        #[cfg(feature = "cuda")]
        {
            unsupported_call(c).or_else(|| launch::unsupported_device(c))
        }
    }

    fn forward(&self, c: &AttnCall) -> candle_core::Result<AttnOutput> {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = c;
            candle_core::bail!("candle-mha was built without the `cuda` feature")
        }
        #[cfg(feature = "cuda")]
        {
            Ok(AttnOutput {
                output: launch::forward(c)?,
                weights: None,
                kernel: self.id(),
            })
        }
    }
}

/// The arguments of `attn_fwd`, in the PTX's order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fwd_args(
    ptrs: [u64; 10],
    q: [usize; 3],
    k: [usize; 3],
    v: [usize; 3],
    o: [usize; 3],
    m: [usize; 3],
    (l, s, group): (usize, usize, usize),
    f: Flags,
    packed: bool,
) -> Vec<(&'static str, Arg)> {
    let names = [
        "Q", "K", "V", "O", "Bias", "KeyRange", "CuQ", "CuK", "Alibi", "Sinks",
    ];
    let mut args = pointer_args(&names, &ptrs);
    qkv_strides(&mut args, q, k, v);
    push_strides(&mut args, ["stride_ob", "stride_ol", "stride_oh"], o);
    push_strides(&mut args, ["stride_mb", "stride_mh", "stride_ml"], m);
    args.extend([
        ("L", Arg::I32(l as i32)),
        ("S", Arg::I32(s as i32)),
        ("GROUP", Arg::I32(group as i32)),
    ]);
    args.extend(mask_args(f));
    args.extend(modifier_args(f));
    args.extend([
        ("has_sinks", Arg::I32(f.has_sinks)),
        ("packed", Arg::I32(packed as i32)),
        ("nan_rows", Arg::I32(f.nan_rows)),
    ]);
    args
}

/// The arguments of `attn_decode_split`, in the PTX's order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_split_args(
    ptrs: [u64; 9],
    q: [usize; 3],
    k: [usize; 3],
    v: [usize; 3],
    m: [usize; 3],
    (l, s, h, group): (usize, usize, usize, usize),
    f: Flags,
    has_bias: bool,
    (chunk, splits): (usize, usize),
) -> Vec<(&'static str, Arg)> {
    let names = [
        "Q", "K", "V", "Bias", "KeyRange", "Alibi", "PartO", "PartM", "PartL",
    ];
    let mut args = pointer_args(&names, &ptrs);
    qkv_strides(&mut args, q, k, v);
    push_strides(&mut args, ["stride_mb", "stride_mh", "stride_ml"], m);
    args.extend([
        ("L", Arg::I32(l as i32)),
        ("S", Arg::I32(s as i32)),
        ("H", Arg::I32(h as i32)),
        ("GROUP", Arg::I32(group as i32)),
    ]);
    args.extend(mask_args(f));
    args.extend(modifier_args(f));
    args.extend([
        ("has_bias", Arg::I32(has_bias as i32)),
        ("chunk", Arg::I32(chunk as i32)),
        ("num_splits", Arg::I32(splits as i32)),
    ]);
    args
}

/// The arguments of `attn_decode_combine`, in the PTX's order: the sinks join here, once per
/// row, after the splits are merged.
pub(crate) fn decode_combine_args(
    ptrs: [u64; 5],
    o: [usize; 3],
    (l, h, splits): (usize, usize, usize),
    f: Flags,
) -> Vec<(&'static str, Arg)> {
    let mut args = pointer_args(&["PartO", "PartM", "PartL", "O", "Sinks"], &ptrs);
    push_strides(&mut args, ["stride_ob", "stride_ol", "stride_oh"], o);
    args.extend([
        ("L", Arg::I32(l as i32)),
        ("H", Arg::I32(h as i32)),
        ("num_splits", Arg::I32(splits as i32)),
        ("has_sinks", Arg::I32(f.has_sinks)),
        ("nan_rows", Arg::I32(f.nan_rows)),
    ]);
    args
}

/// The pointer arguments, named.
fn pointer_args(names: &[&'static str], ptrs: &[u64]) -> Vec<(&'static str, Arg)> {
    names
        .iter()
        .zip(ptrs)
        .map(|(n, p)| (*n, Arg::Ptr(*p)))
        .collect()
}

/// q's, k's and v's strides, in the order both attention kernels take them.
fn qkv_strides(args: &mut Vec<(&'static str, Arg)>, q: [usize; 3], k: [usize; 3], v: [usize; 3]) {
    push_strides(args, ["stride_qb", "stride_ql", "stride_qh"], q);
    push_strides(args, ["stride_kb", "stride_ks", "stride_kh"], k);
    push_strides(args, ["stride_vb", "stride_vs", "stride_vh"], v);
}

/// The scale and the structured masks, in the order both attention kernels take them.
fn mask_args(f: Flags) -> [(&'static str, Arg); 5] {
    [
        ("scale", Arg::F32(f.scale)),
        ("causal", Arg::I32(f.causal)),
        ("bottom_right", Arg::I32(f.bottom_right)),
        ("window", Arg::I32(f.window)),
        ("has_range", Arg::I32(f.has_range)),
    ]
}

/// Soft-capping and ALiBi, in the order both attention kernels take them (the sinks join at the
/// end of a row: in `attn_fwd`, or in `attn_decode_combine`).
fn modifier_args(f: Flags) -> [(&'static str, Arg); 3] {
    [
        ("softcap", Arg::F32(f.softcap)),
        ("has_alibi", Arg::I32(f.has_alibi)),
        ("stride_ab", Arg::I32(f.alibi_stride)),
    ]
}

/// `(batch, row, head)` strides: the batch stride as i64, the others as i32.
fn push_strides(args: &mut Vec<(&'static str, Arg)>, names: [&'static str; 3], st: [usize; 3]) {
    args.push((names[0], Arg::I64(st[0] as i64)));
    args.push((names[1], Arg::I32(st[1] as i32)));
    args.push((names[2], Arg::I32(st[2] as i32)));
}

#[cfg(test)]
mod tests;
