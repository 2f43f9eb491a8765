//! Fused CPU attention: tiled GEMM + online (streaming) softmax, O(tile) scratch memory.
//!
//! The `(B, H, L, S)` score matrix is never materialised. Work is split into items of
//! `(batch, KV head, tile of up to` [`BLOCK_Q`] `query rows)`; the `G = H / Hkv` query heads that
//! share a KV head are folded into the query rows (as in [`super::reference`]), so grouped-query
//! attention reads each K/V tile once per item and never repeats K/V. Items run in parallel on
//! rayon's pool. For each item the kernel gathers its query rows into a contiguous tile and walks
//! tiles of up to [`BLOCK_K`] keys:
//!
//! 1. `scores = scale · Q_tile · K_tileᵀ`: on AVX-512 / AVX2 CPUs, a register-blocked
//!    micro-kernel (6 rows × 64 / 16 keys of accumulators) over a transposed copy of K made once
//!    per call (when an item has at least [`MIN_ROWS_FOR_KT`] rows, i.e. every K tile is reused
//!    enough to pay for the transpose; its rows an odd number of cache lines apart, `kt.rs`), or
//!    dot products of query rows with K's rows read in place (decode-like items); the `gemm`
//!    crate elsewhere;
//! 2. the masks of the tile are applied in place: keys outside each row's structured range
//!    ([`MaskPlan::row_range`](crate::mask::MaskPlan::row_range): causal / sliding window, key
//!    ranges, packed sequences) become
//!    `-inf`, and the dense key padding and attention bias rows are added;
//! 3. online softmax in f32: per row a running max `m` and sum `l`; the tile's scores become
//!    `exp(score - m_new)` (a vectorised polynomial `exp`, relative error ≈ 1e-7) and the
//!    accumulator row is rescaled by `exp(m_old - m_new)` (every row's maximum first, then the
//!    factors of 16 rows in one vector `exp`, then each row's pass: `softmax_tile.rs`);
//! 4. `acc += P · V_tile` (AVX-512 micro-kernel of 6 rows × 64 columns, AVX2 of 6 × 16, or the
//!    `gemm` crate), V read in place, or, for prefill-like calls with strided heads, from a copy
//!    with each head's rows contiguous (rows a power-of-two multiple of 1 KiB apart fall into a
//!    few L1 sets). The per-call copies live in buffers reused across calls (`spare.rs`),
//!    reported by [`cpu_retained_bytes`](super::cpu_retained_bytes) and freed by
//!    [`release_cpu_buffers`](super::release_cpu_buffers).
//!
//! Score modifiers (`modifiers.rs`): soft-capping and ALiBi are applied to each score row
//! between 1. and 2.; a sink joins a row's softmax state when the row is finished (after the
//! flash-decoding merge too).
//!
//! Finally each row is divided by `l` and written to its place in the `(B, L, H, Dv)` output; a
//! row that saw no finite logit (`l == 0`: fully masked) gets the
//! [`MaskedRowPolicy`]: zeros or NaN, exactly as
//! [`super::reference::softmax`].
//!
//! Decoding (`decode.rs`): when every KV head has a single tile of query rows (decode steps,
//! short chunks), one item walks all KV heads of a sequence over each key tile, so that K and V
//! are read front to back in their `(B, S, Hkv, D)` layout rather than one short row per page;
//! and a call with fewer items than twice the worker threads is split over its keys too
//! (flash-decoding: chunks of at least [`SPLIT_MIN_KEYS`] keys computed in parallel as
//! partial softmax states, merged per row). K and V are read once, and the `G` query heads of a
//! KV group share every tile read.
//!
//! Packed sequences: items are split by sequence first, then into tiles of up to [`BLOCK_Q`]
//! rows, so that no item mixes sequences and no score is computed against another sequence's
//! keys.
//!
//! Tile skipping: an item only visits the key tiles that intersect the union of its rows'
//! structured ranges (so tiles above the diagonal, left of a sliding window, in padding or in
//! another packed sequence are never computed); with a dense key padding, key tiles whose
//! padding is `-inf` everywhere are skipped. Keys after the plan's `kv_len` (appended by
//! `add_bias_kv` / `add_zero_attn`) are always visited and never masked.
//!
//! Inputs are read where they are: `q`, `k`, `v` in any strided `(B, T, heads, D)` layout with a
//! contiguous last dimension (a narrowed packed projection, a KV cache buffer), in their own
//! dtype: f16/bf16 query rows are converted to f32 as they are gathered, and K/V tiles are read
//! in place by the micro-kernels (AVX-512 and AVX2: bf16 and f16, widened in registers) or
//! converted as they are visited (no whole-tensor f32 copy; a bf16 KV cache is streamed at half
//! the bytes). The SIMD paths keep one transposed f32 copy of K when many query rows share each K
//! tile (`kt.rs`).
//!
//! bf16 on CPUs with AVX512-BF16 (`avx512_bf16.rs`): both products run on `vdpbf16ps` (two bf16
//! products per f32 lane, twice the work per instruction of f32 FMAs), as PyTorch's CPU flash
//! attention does: `Q · Kᵀ` from the query rows read as bf16 pairs against a transposed copy of K
//! kept in bf16 pairs (or, for decode-like items, K's rows in place), accumulated in f32; the
//! probabilities rounded to bf16 (to nearest even) for `P · V`, V's rows read in place and two
//! keys' rows interleaved in registers, accumulated in f32. The softmax's maxima and sums stay
//! f32, from the unrounded probabilities.
//! Memory beyond that: per worker thread a `BLOCK_Q × BLOCK_K` score tile, two `BLOCK_Q ×`
//! [`MAX_HEAD_DIM`] row tiles (192 KiB) and, for half inputs, a converted K and V tile
//! (512 KiB), independent of `S`. Nothing grows with `L · S`.
//!
//! Instruction sets (chosen at run time, `products.rs`): AVX-512 micro-kernels (`avx512.rs`)
//! and, with AVX512-BF16, bf16 dot products (`avx512_bf16.rs`), AVX2 + FMA micro-kernels
//! (`avx2.rs`), or the `gemm` crate (`portable.rs`, any CPU; on aarch64 `gemm` uses NEON).
//!
//! Training: when autograd tracks `q`, `k` or `v`, the forward also saves each row's
//! log-sum-exp `(B, H, L)` and its output becomes a candle autograd node (`op.rs`, a
//! `CustomOp3`) whose backward is the fused backward (`backward/`, FlashAttention-2 style:
//! scores recomputed per tile from q, k and the saved statistics; dV, dP, dS, dK, dQ per tile
//! with f32 accumulation, on f32 operands (`backward/wide.rs`) or bf16 pairs
//! (`backward/pairs.rs`); dK/dV summed over the query heads sharing a KV head; the same masks).
//! Nothing of size
//! `L × S` exists in either direction. Dropout is not implemented here (such calls go to the
//! reference).
//!
//! Files: this one (eligibility, the parallel loop), `inputs.rs` (a call's inputs and its per-call
//! context, with the one rule that picks the call's products), `plan.rs` (those products as the
//! types the tile walk matches on), `view.rs` (the inputs read in
//! place), `kt.rs` (the per-call copies of K and V) and `spare.rs` (their reused buffers),
//! `walk.rs` (the one walk over a work item's key tiles, for prefill and decode), `tile.rs`
//! (one work item: masks, softmax step, products), `modifiers.rs` (soft-cap, ALiBi,
//! sinks), `decode.rs` and `stream.rs`
//! (decode-shaped calls, their prefetch stream), `softmax_tile.rs` (the online softmax of a
//! tile's rows, on AVX-512 / AVX2 in stages), `softmax.rs` and `softmax_x86.rs` (the portable row
//! step, `exp` and its vector forms, soft-capping, ALiBi), `out.rs` (the output, written in its dtype),
//! `backward/` and `op.rs` (the backward and its autograd node), `products.rs` (the run-time
//! instruction set and the products dispatched on it), `avx512.rs`, `avx512_bf16.rs`,
//! `avx2.rs` and `portable.rs` (the products on AVX-512 or AVX2 registers, as AVX512-BF16 dot
//! products, or through `gemm`), `mat.rs` (their bounds-checked matrix operands), `gemm.rs` and
//! `gemm_avx2.rs` (the projections' GEMM).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Result};
use rayon::prelude::*;

use super::{AttnCall, AttnOutput, Caps, Kernel};
use crate::config::MaskedRowPolicy;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_q16;
#[cfg(target_arch = "x86_64")]
mod avx2_rows;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
#[cfg(target_arch = "x86_64")]
mod avx512_vnni;
mod backward;
mod decode;
#[cfg(target_arch = "x86_64")]
mod fp8_vbmi;
#[cfg(target_arch = "x86_64")]
pub(crate) mod gemm;
#[cfg(target_arch = "x86_64")]
pub(crate) mod gemm_avx2;
#[cfg(test)]
mod guard_tests;
mod inputs;
mod kt;
mod mat;
mod modifiers;
mod op;
mod out;
mod panels;
mod plan;
mod portable;
mod products;
mod proj_kernel;
mod quant;
mod score_row;
mod softmax;
mod softmax_tile;
#[cfg(target_arch = "x86_64")]
mod softmax_x86;
mod spare;
mod stream;
mod tile;
mod view;
mod walk;

pub use decode::SPLIT_MIN_KEYS;
pub(crate) use inputs::quant_rows;
use inputs::{f32_rows, native_rows, view, Inputs};
#[cfg(feature = "internals")]
pub(crate) use op::forward_backward;
pub(crate) use out::bf16_nearest;
use out::OutVec;
use products::Isa;
pub(crate) use proj_kernel::{proj_kernel, ProjKernel};
use tile::OutPtr;

/// Query rows per work item (after folding the query heads of a KV group into the rows).
pub const BLOCK_Q: usize = 64;
/// Keys per tile.
pub const BLOCK_K: usize = 256;
/// Query rows per KV head (`G · L`) from which K is transposed once for the AVX-512 `Q · Kᵀ`
/// micro-kernel.
pub const MIN_ROWS_FOR_KT: usize = 16;
/// Largest supported head size (of `q`/`k` and of `v`).
pub const MAX_HEAD_DIM: usize = 256;

static CALLS: AtomicUsize = AtomicUsize::new(0);
/// Calls split over their keys (flash-decoding).
pub(super) static SPLITS: AtomicUsize = AtomicUsize::new(0);
/// Backward calls served by the fused backward.
pub(super) static BWD_CALLS: AtomicUsize = AtomicUsize::new(0);
/// Backward calls whose products ran on bf16 pairs.
static PAIR_BWD_CALLS: AtomicUsize = AtomicUsize::new(0);
/// Calls that widened fp8 key tiles to bf16 for the AVX512-BF16 products.
pub(super) static FP8_TILE_CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many calls the fused CPU kernel has served in this process (lets tests check that a
/// path really went through it).
pub(crate) fn calls() -> usize {
    CALLS.load(Ordering::Relaxed)
}

/// How many calls were split over their keys (flash-decoding) in this process.
pub(crate) fn split_calls() -> usize {
    SPLITS.load(Ordering::Relaxed)
}

/// How many backward passes the fused CPU backward has served in this process.
pub(crate) fn bwd_calls() -> usize {
    BWD_CALLS.load(Ordering::Relaxed)
}

/// How many of those ran their products on bf16 pairs (AVX512-BF16 dot products).
pub(crate) fn pair_bwd_calls() -> usize {
    PAIR_BWD_CALLS.load(Ordering::Relaxed)
}

/// How many calls widened fp8 key tiles to bf16 for the AVX512-BF16 products.
pub(crate) fn fp8_tile_calls() -> usize {
    FP8_TILE_CALLS.load(Ordering::Relaxed)
}

/// The instruction sets of the fused kernel this CPU can run (`"avx512bf16"`, `"avx512"`,
/// `"avx2"`, `"portable"`), best first.
pub(crate) fn isas() -> Vec<&'static str> {
    products::available().into_iter().map(Isa::name).collect()
}

/// Forces the instruction set named `name` (`None`: the best available), process-wide, for
/// the fused kernel only (the projections have their own: `crate::gemm::isa::force`).
pub(crate) fn force_isa(name: Option<&str>) -> std::result::Result<(), String> {
    products::force(name)
}

/// On every rayon worker and the calling thread: `f` of the thread's retained buffers (the
/// per-call K / V copies and the converted tiles), summed.
fn on_every_thread(f: impl Fn(&mut tile::Scratch) -> usize + Sync, spare: fn() -> usize) -> usize {
    let here = |_: rayon::BroadcastContext| {
        spare()
            + tile::SCRATCH
                .try_with(|s| f(&mut s.borrow_mut()))
                .unwrap_or(0)
    };
    let workers: usize = rayon::broadcast(here).into_iter().sum();
    let caller = if rayon::current_thread_index().is_none() {
        spare()
            + tile::SCRATCH
                .try_with(|s| f(&mut s.borrow_mut()))
                .unwrap_or(0)
    } else {
        0
    };
    workers + caller
}

/// Bytes kept between calls beyond the fixed per-thread tiles (see [`release_buffers`]).
pub(crate) fn retained_bytes() -> usize {
    on_every_thread(|s| s.extra_bytes(), spare::retained)
}

/// Frees the buffers kept between calls; the bytes freed.
pub(crate) fn release_buffers() -> usize {
    on_every_thread(tile::Scratch::release, spare::release)
}

/// The instruction set calls use now.
pub(crate) fn isa_name() -> &'static str {
    products::current().name()
}

/// Forces the portable path (`gemm` crate products) even where SIMD micro-kernels are
/// available (process-wide), so that tests cover both paths on one machine.
pub(crate) fn set_portable_only(on: bool) {
    let _ = products::force(on.then_some("portable"));
}

/// The fused CPU kernel behind the dispatcher.
pub(crate) struct CpuFused;

impl Kernel for CpuFused {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn id(&self) -> super::KernelId {
        super::KernelId::Cpu
    }

    fn caps(&self) -> Caps {
        Caps {
            weights: false,
            dropout: false,
            backward: true,
        }
    }

    fn unsupported_inputs(&self, c: &AttnCall) -> Option<String> {
        if !c.q.device().is_cpu() {
            return Some(format!(
                "the fused CPU kernel needs CPU tensors, got {:?}",
                c.q.device().location()
            ));
        }
        if c.mask.alibi_slopes().is_some_and(|t| t.track_op()) {
            return Some(
                "the fused CPU kernel has no gradient for ALiBi slopes that autograd tracks: the reference has"
                    .into(),
            );
        }
        if !matches!(c.q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Some(format!(
                "the fused CPU kernel supports f32/f16/bf16, got {:?}",
                c.q.dtype()
            ));
        }
        if c.tracked() && c.params.masked_rows == MaskedRowPolicy::Nan {
            return Some(
                "the fused CPU backward supports MaskedRowPolicy::Zero only (NaN rows give NaN gradients)"
                    .into(),
            );
        }
        if c.d > MAX_HEAD_DIM || c.dv > MAX_HEAD_DIM {
            return Some(format!(
                "the fused CPU kernel supports head sizes up to {MAX_HEAD_DIM}, got {} / {}",
                c.d, c.dv
            ));
        }
        None
    }

    fn forward(&self, c: &AttnCall) -> Result<AttnOutput> {
        CALLS.fetch_add(1, Ordering::Relaxed);
        let output = if c.tracked() {
            // Autograd: the output becomes a node whose backward is the fused backward, fed by
            // the log-sum-exp this forward saves (and, for tracked sinks, their own path).
            let (out, lse) = forward(c, true)?;
            let lse = lse.unwrap_or_default();
            let sinks = modifiers::sink_path(c, &lse)?;
            let qkv = c.q.track_op() || c.k.track_op() || c.v.track_op();
            let out = if qkv {
                op::attach(c, out, lse)?
            } else {
                let (b, l, h, dv) = (c.b, c.l, c.h, c.dv);
                out.into_tensor((b, l, h, dv).into(), c.q.dtype(), c.q.device())?
            };
            match sinks {
                Some(path) => path.apply(out)?,
                None => out,
            }
        } else {
            let (b, l, h, dv) = (c.b, c.l, c.h, c.dv);
            let (out, _) = forward(c, false)?;
            out.into_tensor((b, l, h, dv).into(), c.q.dtype(), c.q.device())?
        };
        Ok(AttnOutput {
            output,
            weights: None,
            kernel: self.id(),
        })
    }
}

/// The forward pass: the `(B, L, H, Dv)` elements (in the input dtype where it is f32, bf16 or
/// f16, else f32), and with `want_lse` the per-row log-sum-exp `(B, H, L)` (f32; `-inf` for
/// fully masked rows) that the backward needs.
fn forward(c: &AttnCall, want_lse: bool) -> Result<(OutVec, Option<Vec<f32>>)> {
    let (b, l, h, dv) = (c.b, c.l, c.h, c.dv);
    // The output is written in the inputs' dtype (f64 and other dtypes run in f32).
    let mut out = OutVec::zeros(c.q.dtype(), b * l * h * dv);
    let out_buf = out.buf();
    let mut lse = want_lse.then(|| vec![f32::NEG_INFINITY; b * h * l]);
    let lse_ptr = lse.as_mut().map(|v| OutPtr(v.as_mut_ptr()));
    let inputs = Inputs::new(c, true)?;
    inputs.with_ctx(c, true, out_buf, lse_ptr, |ctx| {
        let g = ctx.g;
        if decode::run(c, ctx) {
            return;
        }
        let run = |(bi, kh, r0, nr): (usize, usize, usize, usize)| {
            tile::SCRATCH.with(|sc| ctx.item(bi, kh, r0, nr, &mut sc.borrow_mut()))
        };
        for_each_item(c, g, run);
    })?;
    Ok((out, lse))
}

/// Runs `run` on every work item `(batch, KV head, first folded row, rows)` of the call, in
/// parallel: tiles of up to [`BLOCK_Q`] folded rows, or, for packed sequences, each sequence's
/// rows in such tiles.
fn for_each_item(c: &AttnCall, g: usize, run: impl Fn((usize, usize, usize, usize)) + Sync + Send) {
    let (b, l, hkv) = (c.b, c.l, c.hkv);
    match c.mask.packed_offsets() {
        // Packed sequences (B = 1): items split by sequence, then by tile, so that no item
        // mixes sequences and no score is computed against another sequence's keys.
        Some((cu_q, _)) => packed_items(cu_q, hkv, g, l).into_par_iter().for_each(run),
        None => {
            let row_tiles = (g * l).div_ceil(BLOCK_Q);
            (0..b * hkv * row_tiles).into_par_iter().for_each(|item| {
                let (t, kh, bi) = (
                    item % row_tiles,
                    item / row_tiles % hkv,
                    item / (hkv * row_tiles),
                );
                let r0 = t * BLOCK_Q;
                run((bi, kh, r0, BLOCK_Q.min(g * l - r0)));
            });
        }
    }
}

/// Work items `(batch 0, KV head, first folded row, rows)` of packed sequences: per KV head and
/// query head of its group, each sequence's rows in tiles of up to [`BLOCK_Q`].
fn packed_items(
    cu_q: &[usize],
    hkv: usize,
    g: usize,
    l: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let mut items = Vec::new();
    for kh in 0..hkv {
        for gg in 0..g {
            for w in cu_q.windows(2) {
                for c0 in (w[0]..w[1]).step_by(BLOCK_Q) {
                    items.push((0, kh, gg * l + c0, BLOCK_Q.min(w[1] - c0)));
                }
            }
        }
    }
    items
}
