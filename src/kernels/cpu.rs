//! Fused CPU attention: tiled GEMM + online (streaming) softmax, O(tile) scratch memory.
//!
//! The `(B, H, L, S)` score matrix is never materialised. Work is split into items of
//! `(batch, KV head, tile of up to` [`BLOCK_Q`] `query rows)`; the `G = H / Hkv` query heads that
//! share a KV head are folded into the query rows (as in [`super::reference`]), so grouped-query
//! attention reads each K/V tile once per item and never repeats K/V. Items run in parallel on
//! rayon's pool. For each item the kernel walks tiles of up to [`BLOCK_K`] keys:
//!
//! 1. `scores = scale · Q_tile · K_tileᵀ`: on CPUs with AVX-512, a register-blocked micro-kernel
//!    (6 rows × 32 keys of accumulators) over a transposed copy of K made once per call (when an
//!    item has at least [`MIN_ROWS_FOR_KT`] rows, i.e. every K tile is reused enough to pay for
//!    the transpose); otherwise the `gemm` crate (the one candle's matmul uses);
//! 2. the masks of the tile are applied in place: keys outside each row's causal / sliding
//!    window range ([`crate::mask::Causal::key_range`]) or past its key-padding length become
//!    `-inf`, and the additive key padding and bias rows are added;
//! 3. online softmax in f32: per row a running max `m` and sum `l`; the tile's scores become
//!    `exp(score - m_new)` (a vectorised polynomial `exp`, relative error ≈ 1e-7) and the
//!    accumulator row is rescaled by `exp(m_old - m_new)`;
//! 4. `acc += P · V_tile`, accumulating straight into the output rows (AVX-512 micro-kernel of
//!    6 rows × 64 columns, or the `gemm` crate).
//!
//! Finally each row is divided by `l`; a row that saw no finite logit (`l == 0`: fully masked)
//! gets the [`MaskedRowPolicy`]: zeros or NaN, exactly as [`super::reference::softmax`].
//!
//! Tile skipping: an item only visits the key tiles that intersect the union of its rows'
//! causal / window ranges (so tiles above the diagonal, or left of a sliding window, are never
//! computed), clipped to the key-padding length ([`KeyPadding::Lengths`]); with an additive (or
//! boolean) key padding, key tiles whose padding is `-inf` everywhere are skipped. Keys appended
//! by `extra_keys` are always visited and never masked.
//!
//! Memory beyond inputs and output: per worker thread one `BLOCK_Q × BLOCK_K` score tile and a
//! few `BLOCK_Q` row vectors (64 KiB), independent of `S`; plus input-sized copies: f16/bf16
//! inputs are converted to f32 once, non-contiguous inputs are made contiguous, and the AVX-512
//! path keeps one transposed f32 copy of K. Nothing grows with `L · S`.

use candle_core::{bail, DType, Result, Storage, Tensor};
use rayon::prelude::*;

use super::{AttnOutput, AttnParams};
use crate::config::MaskedRowPolicy;
use crate::mask::{Causal, KeyPadding, MaskSpec};

/// Query rows per work item (after folding the query heads of a KV group into the rows).
pub const BLOCK_Q: usize = 64;
/// Keys per tile.
pub const BLOCK_K: usize = 256;
/// Query rows per KV head (`G · L`) from which K is transposed once for the AVX-512 `Q · Kᵀ`
/// micro-kernel.
pub const MIN_ROWS_FOR_KT: usize = 16;
/// Largest supported head size (of `q`/`k` and of `v`).
pub const MAX_HEAD_DIM: usize = 256;

static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many calls the fused CPU kernel has served in this process (lets tests check that a
/// path really went through it).
pub fn calls() -> usize {
    CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the fused CPU kernel can run this call (device, dtype, head size, no weights, no
/// dropout, no autograd tracking). [`attention`] errors with the reason otherwise.
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor, params: &AttnParams) -> bool {
    unsupported_reason(q, k, v, params).is_none()
}

fn unsupported_reason(q: &Tensor, k: &Tensor, v: &Tensor, params: &AttnParams) -> Option<String> {
    if !q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu() {
        return Some(format!(
            "the fused CPU kernel needs CPU tensors, got {:?}",
            q.device().location()
        ));
    }
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Some(format!(
            "the fused CPU kernel supports f32/f16/bf16, got {:?}",
            q.dtype()
        ));
    }
    let (d, dv) = (q.dims().last().copied()?, v.dims().last().copied()?);
    if d > MAX_HEAD_DIM || dv > MAX_HEAD_DIM {
        return Some(format!(
            "the fused CPU kernel supports head sizes up to {MAX_HEAD_DIM}, got {d} / {dv}"
        ));
    }
    if params.need_weights {
        return Some("the fused CPU kernel returns no attention weights".into());
    }
    if params.dropout > 0.0 {
        return Some("the fused CPU kernel has no dropout".into());
    }
    if q.track_op() || k.track_op() || v.track_op() {
        return Some("the fused CPU kernel is not differentiable".into());
    }
    None
}

/// Slice of a contiguous f32 CPU tensor.
fn cpu_f32<'a>(storage: &'a Storage, t: &Tensor) -> Result<&'a [f32]> {
    let layout = t.layout();
    let Storage::Cpu(cpu) = storage else {
        bail!("fused CPU attention: tensor is not on the CPU")
    };
    let all = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    Ok(&all[start..start + t.elem_count()])
}

fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// Additive bias, broadcast over B/H/L by zero strides; the key dim is contiguous.
#[derive(Clone, Copy)]
struct Bias<'a> {
    data: &'a [f32],
    sb: usize,
    sh: usize,
    sl: usize,
}

/// Everything one work item reads.
struct Ctx<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    h: usize,
    hkv: usize,
    l: usize,
    s: usize,
    d: usize,
    dv: usize,
    g: usize,
    /// Keys covered by the mask (the first `real_s`); the rest are `extra_keys`.
    real_s: usize,
    scale: f32,
    policy: MaskedRowPolicy,
    causal: Option<Causal>,
    lengths: Option<&'a [usize]>,
    pad: Option<&'a [f32]>,
    /// Per `(batch, aligned key tile)`: the additive padding is `-inf` on the whole tile.
    dead_tiles: Option<Vec<bool>>,
    n_tiles: usize,
    bias: Option<Bias<'a>>,
    /// `kᵀ` as `(B, Hkv, D, S)` when the AVX-512 micro-kernels are used (else the portable
    /// `gemm` path).
    kt: Option<&'a [f32]>,
    /// Whether the AVX-512 `P · V` micro-kernel is used.
    avx512: bool,
}

/// Per-worker scratch.
struct Scratch {
    scores: Vec<f32>,
    m: Vec<f32>,
    lsum: Vec<f32>,
    lo: Vec<usize>,
    hi: Vec<usize>,
}

thread_local! {
    /// One scratch per worker thread, reused across calls.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::new());
}

impl Scratch {
    fn new() -> Self {
        Self {
            scores: vec![0.0; BLOCK_Q * BLOCK_K],
            m: vec![0.0; BLOCK_Q],
            lsum: vec![0.0; BLOCK_Q],
            lo: vec![0; BLOCK_Q],
            hi: vec![0; BLOCK_Q],
        }
    }
}

/// Fused attention on CPU; see the [module docs](self). Same contract as
/// [`super::attention`] (which validates shapes), without weights: `AttnOutput::weights` is
/// `None`. Errors when [`supports`] is false.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &MaskSpec,
    params: &AttnParams,
) -> Result<AttnOutput> {
    if let Some(reason) = unsupported_reason(q, k, v, params) {
        bail!("Backend::CpuFused: {reason}")
    }
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (b, h, l, d) = q.dims4()?;
    let (_, hkv, s, _) = k.dims4()?;
    let dv = v.dim(3)?;
    let in_dtype = q.dtype();
    let real_s = s - mask.extra_keys;
    let q = f32_contiguous(q)?;
    let k = f32_contiguous(k)?;
    let v = f32_contiguous(v)?;
    let bias = mask.bias.as_ref().map(f32_contiguous).transpose()?;
    let (pad, lengths) = match &mask.key_padding {
        None => (None, None),
        Some(KeyPadding::Additive(t)) => (Some(f32_contiguous(&t.reshape((b, real_s))?)?), None),
        Some(KeyPadding::Lengths(v)) => (None, Some(v.as_slice())),
    };
    let (qg, _) = q.storage_and_layout();
    let (kg, _) = k.storage_and_layout();
    let (vg, _) = v.storage_and_layout();
    let bg = bias.as_ref().map(|t| t.storage_and_layout().0);
    let pg = pad.as_ref().map(|t| t.storage_and_layout().0);
    let bias = match (&bias, &bg) {
        (Some(t), Some(g)) => {
            let (mb, mh, ml, ms) = t.dims4()?;
            if ms != real_s {
                bail!("fused CPU attention: bias has {ms} keys, expected {real_s}")
            }
            Some(Bias {
                data: cpu_f32(g, t)?,
                sb: if mb == 1 { 0 } else { mh * ml * ms },
                sh: if mh == 1 { 0 } else { ml * ms },
                sl: if ml == 1 { 0 } else { ms },
            })
        }
        _ => None,
    };
    let pad = match (&pad, &pg) {
        (Some(t), Some(g)) => Some(cpu_f32(g, t)?),
        _ => None,
    };
    let n_tiles = real_s.div_ceil(BLOCK_K);
    let dead_tiles = pad.map(|p| {
        let mut dead = vec![false; b * n_tiles];
        for bi in 0..b {
            for t in 0..n_tiles {
                let row = &p[bi * real_s..(bi + 1) * real_s];
                let keys = &row[t * BLOCK_K..((t + 1) * BLOCK_K).min(real_s)];
                dead[bi * n_tiles + t] = keys.iter().all(|&x| x == f32::NEG_INFINITY);
            }
        }
        dead
    });
    let k_slice = cpu_f32(&kg, &k)?;
    let avx512 = use_avx512();
    // The transposed copy of K pays off when each K tile serves many query rows; decode-like
    // calls (few rows per KV head) read K through the `gemm` crate instead.
    let kt = (avx512 && h / hkv * l >= MIN_ROWS_FOR_KT).then(|| transpose_heads(k_slice, s, d));
    let ctx = Ctx {
        q: cpu_f32(&qg, &q)?,
        k: k_slice,
        v: cpu_f32(&vg, &v)?,
        h,
        hkv,
        l,
        s,
        d,
        dv,
        g: h / hkv,
        real_s,
        scale: params.scale as f32,
        policy: params.masked_rows,
        causal: mask.causal,
        lengths,
        pad,
        dead_tiles,
        n_tiles,
        bias,
        kt: kt.as_deref(),
        avx512,
    };
    let mut out = vec![0f32; b * h * l * dv];
    let group = ctx.g * l * dv; // output of one (batch, KV head): G heads × L rows, contiguous
    if group > 0 {
        out.par_chunks_mut(group)
            .enumerate()
            .for_each(|(bk, chunk)| {
                let (bi, kh) = (bk / hkv, bk % hkv);
                chunk
                    .par_chunks_mut(BLOCK_Q * dv)
                    .enumerate()
                    .for_each(|(t, rows)| {
                        SCRATCH.with(|sc| ctx.item(bi, kh, t * BLOCK_Q, rows, &mut sc.borrow_mut()))
                    });
            });
    }
    drop((qg, kg, vg, bg, pg));
    let out = Tensor::from_vec(out, (b, h, l, dv), q.device())?.to_dtype(in_dtype)?;
    Ok(AttnOutput {
        output: out,
        weights: None,
    })
}

impl Ctx<'_> {
    /// One work item: folded query rows `r0..r0 + out.len() / dv` of KV head `kh` in batch `bi`.
    fn item(&self, bi: usize, kh: usize, r0: usize, out: &mut [f32], sc: &mut Scratch) {
        let (d, dv, l) = (self.d, self.dv, self.l);
        let nr = out.len() / dv;
        let len = self.lengths.map_or(self.real_s, |ls| ls[bi]);
        // Visible real-key range of every row, and their union.
        let (mut k_lo, mut k_hi) = (usize::MAX, 0);
        for r in 0..nr {
            let i = (r0 + r) % l;
            let (lo, hi) = match self.causal {
                Some(c) => c.key_range(i, l, self.real_s),
                None => (0, self.real_s),
            };
            let hi = hi.min(len);
            let lo = lo.min(hi);
            sc.lo[r] = lo;
            sc.hi[r] = hi;
            if lo < hi {
                k_lo = k_lo.min(lo);
                k_hi = k_hi.max(hi);
            }
        }
        sc.m[..nr].fill(f32::NEG_INFINITY);
        sc.lsum[..nr].fill(0.0);
        out.fill(0.0);
        let q_base = ((bi * self.h + kh * self.g) * l + r0) * d;
        let q = &self.q[q_base..q_base + nr * d];
        let kv_row0 = (bi * self.hkv + kh) * self.s;
        let masked = self.causal.is_some()
            || self.lengths.is_some()
            || self.pad.is_some()
            || self.bias.is_some();
        if k_lo < k_hi {
            let mut start = k_lo / BLOCK_K * BLOCK_K;
            while start < k_hi {
                let tile = start / BLOCK_K;
                let (j0, j1) = (start.max(k_lo), (start + BLOCK_K).min(k_hi));
                start += BLOCK_K;
                if let Some(dead) = &self.dead_tiles {
                    if dead[bi * self.n_tiles + tile] {
                        continue;
                    }
                }
                self.tile(bi, kh, r0, q, kv_row0, j0, j1, masked, out, sc);
            }
        }
        // Appended keys: never masked.
        let mut j0 = self.real_s;
        while j0 < self.s {
            let j1 = (j0 + BLOCK_K).min(self.s);
            self.tile(bi, kh, r0, q, kv_row0, j0, j1, false, out, sc);
            j0 = j1;
        }
        for r in 0..nr {
            let row = &mut out[r * dv..(r + 1) * dv];
            let sum = sc.lsum[r];
            if sum == 0.0 {
                match self.policy {
                    MaskedRowPolicy::Zero => row.fill(0.0),
                    MaskedRowPolicy::Nan => row.fill(f32::NAN),
                }
            } else {
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        }
    }

    /// Keys `j0..j1` for the item's rows: scores, masks, online softmax, `out += P · V`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        bi: usize,
        kh: usize,
        r0: usize,
        q: &[f32],
        kv_row0: usize,
        j0: usize,
        j1: usize,
        masked: bool,
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        let (d, dv) = (self.d, self.dv);
        let nr = out.len() / dv;
        let bk = j1 - j0;
        let ktile = &self.k[(kv_row0 + j0) * d..(kv_row0 + j1) * d];
        let vt = &self.v[(kv_row0 + j0) * dv..(kv_row0 + j1) * dv];
        let scores = &mut sc.scores[..nr * BLOCK_K];
        if let Some(kt) = self.kt {
            // kᵀ of this KV head: (d × s), row stride s.
            let kt = &kt[kv_row0 * d..(kv_row0 + self.s) * d];
            // SAFETY: avx512f was detected when `kt` was built; slices are in bounds (checked
            // by the callee's debug assertions and the slice arithmetic above).
            unsafe { avx512::qk(q, nr, d, kt, self.s, j0, bk, scores, BLOCK_K, self.scale) };
        } else {
            // SAFETY: all pointers and strides describe in-bounds row-major matrices:
            // scores (nr × bk, row stride BLOCK_K), q (nr × d), kᵀ (d × bk) from k rows (bk × d).
            unsafe {
                gemm::gemm(
                    nr,
                    bk,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    BLOCK_K as isize,
                    false,
                    q.as_ptr(),
                    1,
                    d as isize,
                    ktile.as_ptr(),
                    d as isize,
                    1,
                    0.0f32,
                    self.scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        let mut any = false;
        for r in 0..nr {
            let row = &mut scores[r * BLOCK_K..r * BLOCK_K + bk];
            if masked {
                let (lo, hi) = (sc.lo[r].clamp(j0, j1), sc.hi[r].clamp(j0, j1));
                if lo >= hi {
                    row.fill(0.0);
                    continue;
                }
                row[..lo - j0].fill(f32::NEG_INFINITY);
                row[hi - j0..].fill(f32::NEG_INFINITY);
                let vis = &mut row[lo - j0..hi - j0];
                if let Some(p) = self.pad {
                    add_assign(vis, &p[bi * self.real_s + lo..bi * self.real_s + hi]);
                }
                if let Some(bias) = self.bias {
                    let fr = r0 + r;
                    let (hh, i) = (kh * self.g + fr / self.l, fr % self.l);
                    let base = bi * bias.sb + hh * bias.sh + i * bias.sl;
                    add_assign(vis, &bias.data[base + lo..base + hi]);
                }
            }
            let out_row = &mut out[r * dv..(r + 1) * dv];
            any |= softmax_step(row, &mut sc.m[r], &mut sc.lsum[r], out_row);
        }
        if !any {
            return;
        }
        if self.avx512 {
            // SAFETY: avx512f detected (see above); out (nr × dv), p (nr × bk, stride BLOCK_K),
            // v tile (bk × dv) are in bounds.
            unsafe { avx512::pv(scores, BLOCK_K, nr, bk, vt, dv, out) };
            return;
        }
        // SAFETY: out (nr × dv), p = scores (nr × bk, row stride BLOCK_K), v tile (bk × dv),
        // all row-major in bounds.
        unsafe {
            gemm::gemm(
                nr,
                dv,
                bk,
                out.as_mut_ptr(),
                1,
                dv as isize,
                true,
                scores.as_ptr(),
                1,
                BLOCK_K as isize,
                vt.as_ptr(),
                1,
                dv as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

static PORTABLE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Forces the portable path (`gemm` crate micro-kernels) even where AVX-512 is available, so
/// that tests cover both paths on one machine. Process-wide; both paths compute the same
/// function.
#[doc(hidden)]
pub fn set_portable_only(on: bool) {
    PORTABLE_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn use_avx512() -> bool {
    if PORTABLE_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `(n, s, d)` → `(n, d, s)` for every one of the `n = x.len() / (s·d)` heads, in parallel.
fn transpose_heads(x: &[f32], s: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    if s * d == 0 {
        return out;
    }
    out.par_chunks_mut(s * d)
        .zip(x.par_chunks(s * d))
        .for_each(|(o, x)| {
            const T: usize = 32;
            for j0 in (0..s).step_by(T) {
                for d0 in (0..d).step_by(T) {
                    for j in j0..(j0 + T).min(s) {
                        for dd in d0..(d0 + T).min(d) {
                            o[dd * s + j] = x[j * d + dd];
                        }
                    }
                }
            }
        });
    out
}

fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}

/// One row of one tile: `row` (logits) becomes `exp(row - m_new)`, `m`/`lsum` are updated and
/// `acc` is rescaled. Returns whether the row has any nonzero probability in this tile.
fn softmax_step(row: &mut [f32], m: &mut f32, lsum: &mut f32, acc: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the enabled features (checked just above).
            return unsafe { softmax_step_avx512(row, m, lsum, acc) };
        }
        if is_x86_feature_detected!("avx") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the enabled features (checked just above).
            return unsafe { softmax_step_avx(row, m, lsum, acc) };
        }
    }
    softmax_step_impl::<false, 8>(row, m, lsum, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx,fma")]
unsafe fn softmax_step_avx512(
    row: &mut [f32],
    m: &mut f32,
    lsum: &mut f32,
    acc: &mut [f32],
) -> bool {
    softmax_step_impl::<true, 16>(row, m, lsum, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn softmax_step_avx(row: &mut [f32], m: &mut f32, lsum: &mut f32, acc: &mut [f32]) -> bool {
    softmax_step_impl::<true, 8>(row, m, lsum, acc)
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn softmax_step_impl<const FMA: bool, const W: usize>(
    row: &mut [f32],
    m: &mut f32,
    lsum: &mut f32,
    acc: &mut [f32],
) -> bool {
    let mut mx = [f32::NEG_INFINITY; W];
    let mut chunks = row.chunks_exact(W);
    for c in &mut chunks {
        for t in 0..W {
            mx[t] = if c[t] > mx[t] { c[t] } else { mx[t] };
        }
    }
    let mut tile_max = f32::NEG_INFINITY;
    for &x in chunks.remainder().iter().chain(mx.iter()) {
        tile_max = if x > tile_max { x } else { tile_max };
    }
    let m_new = if tile_max > *m { tile_max } else { *m };
    if m_new == f32::NEG_INFINITY {
        // Nothing visible so far: probabilities 0, no state change.
        row.fill(0.0);
        return false;
    }
    let mut sums = [0f32; W];
    let mut chunks = row.chunks_exact_mut(W);
    for c in &mut chunks {
        for t in 0..W {
            let e = fast_exp::<FMA>(c[t] - m_new);
            c[t] = e;
            sums[t] += e;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        let e = fast_exp::<FMA>(*x - m_new);
        *x = e;
        sum += e;
    }
    sum += sums.iter().sum::<f32>();
    if m_new != *m {
        let corr = fast_exp::<FMA>(*m - m_new); // 0 when m was -inf
        if *lsum != 0.0 {
            acc.iter_mut().for_each(|x| *x *= corr);
        }
        *lsum *= corr;
        *m = m_new;
    }
    *lsum += sum;
    true
}

#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` for `x <= 0` (Cephes polynomial, relative error ≈ 1e-7); 0 below the f32 normal
/// range and for `-inf`. Branch-free so that it vectorises.
#[inline(always)]
fn fast_exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const MIN: f32 = -87.336_55; // exp(MIN) ≈ smallest normal f32
    let xc = if x < MIN { MIN } else { x };
    let z = fma::<FMA>(xc, LOG2E, MAGIC);
    let n = z - MAGIC;
    let ni = z.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = fma::<FMA>(n, -LN2_HI, xc);
    let r = fma::<FMA>(n, -LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    p = fma::<FMA>(p, r, 1.398_199_9e-3);
    p = fma::<FMA>(p, r, 8.333_452e-3);
    p = fma::<FMA>(p, r, 4.166_579_6e-2);
    p = fma::<FMA>(p, r, 1.666_666_5e-1);
    p = fma::<FMA>(p, r, 0.5);
    let y = fma::<FMA>(p, r * r, r + 1.0);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = y * scale;
    if x < MIN {
        0.0
    } else {
        y
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub unsafe fn qk(
        _: &[f32],
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: f32,
    ) {
        unreachable!("AVX-512 path on a non-x86 target")
    }
    pub unsafe fn pv(_: &[f32], _: usize, _: usize, _: usize, _: &[f32], _: usize, _: &mut [f32]) {
        unreachable!("AVX-512 path on a non-x86 target")
    }
}

/// AVX-512 register-blocked micro-kernels for the two products of a tile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // explicit indices name the register block's cells
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows per register block.
    const MR: usize = 6;

    fn tail_mask(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// `out[r][c] = scale · Σ_d q[r][d] · kt[d][j0 + c]` for `r < nr`, `c < round_up(bk, 16)`
    /// (columns past `bk` hold garbage-free zeros or unused values; callers read `..bk`).
    ///
    /// # Safety
    /// avx512f must be available; `q` holds `nr × d`, `kt` is `d × s` (row stride `s`) with
    /// `j0 + bk <= s`, `out` holds `nr` rows of stride `out_stride >= round_up(bk, 16)`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn qk(
        q: &[f32],
        nr: usize,
        d: usize,
        kt: &[f32],
        s: usize,
        j0: usize,
        bk: usize,
        out: &mut [f32],
        out_stride: usize,
        scale: f32,
    ) {
        debug_assert!(q.len() >= nr * d && kt.len() >= d * s && j0 + bk <= s);
        debug_assert!(out.len() >= (nr - 1) * out_stride + bk.div_ceil(16) * 16);
        let nv = bk.div_ceil(16);
        let mut c = 0;
        while c < nv {
            let nb = (nv - c).min(2);
            let m0 = tail_mask(bk - 16 * c);
            let m1 = if nb == 2 {
                tail_mask(bk - 16 * (c + 1))
            } else {
                0
            };
            let masks = [m0, m1];
            let kp = kt.as_ptr().add(j0 + 16 * c);
            let mut r = 0;
            while r < nr {
                let mr = (nr - r).min(MR);
                let qp = q.as_ptr().add(r * d);
                let op = out.as_mut_ptr().add(r * out_stride + 16 * c);
                macro_rules! go {
                    ($($m:literal),*) => {
                        match (mr, nb) {
                            $(($m, 1) => qk_block::<$m, 1>(qp, d, kp, s, op, out_stride, scale, masks),
                              ($m, _) => qk_block::<$m, 2>(qp, d, kp, s, op, out_stride, scale, masks),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1, 2, 3, 4, 5, 6);
                r += mr;
            }
            c += nb;
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn qk_block<const M: usize, const N: usize>(
        q: *const f32,
        d: usize,
        kt: *const f32,
        s: usize,
        out: *mut f32,
        out_stride: usize,
        scale: f32,
        masks: [u16; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        for dd in 0..d {
            let krow = kt.add(dd * s);
            let mut kv = [_mm512_setzero_ps(); N];
            for n in 0..N {
                kv[n] = _mm512_maskz_loadu_ps(masks[n], krow.add(16 * n));
            }
            for r in 0..M {
                let b = _mm512_set1_ps(*q.add(r * d + dd));
                for n in 0..N {
                    acc[r][n] = _mm512_fmadd_ps(b, kv[n], acc[r][n]);
                }
            }
        }
        let sv = _mm512_set1_ps(scale);
        for r in 0..M {
            for n in 0..N {
                _mm512_storeu_ps(
                    out.add(r * out_stride + 16 * n),
                    _mm512_mul_ps(acc[r][n], sv),
                );
            }
        }
    }

    /// `out[r][c] += Σ_{j < bk} p[r][j] · v[j][c]` for `r < nr`, `c < dv`.
    ///
    /// # Safety
    /// avx512f must be available; `p` holds `nr` rows of stride `p_stride >= bk`, `v` holds
    /// `bk × dv`, `out` holds `nr × dv`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pv(
        p: &[f32],
        p_stride: usize,
        nr: usize,
        bk: usize,
        v: &[f32],
        dv: usize,
        out: &mut [f32],
    ) {
        debug_assert!(p.len() >= (nr - 1) * p_stride + bk && v.len() >= bk * dv);
        debug_assert!(out.len() >= nr * dv);
        let mut c = 0;
        while c < dv {
            let w = (dv - c).min(64);
            let nb = w.div_ceil(16);
            let mut masks = [0u16; 4];
            for (n, m) in masks.iter_mut().enumerate().take(nb) {
                *m = tail_mask(w - 16 * n);
            }
            let vp = v.as_ptr().add(c);
            let mut r = 0;
            while r < nr {
                let mr = (nr - r).min(MR);
                let pp = p.as_ptr().add(r * p_stride);
                let op = out.as_mut_ptr().add(r * dv + c);
                macro_rules! go {
                    ($($m:literal),*) => {
                        match (mr, nb) {
                            $(($m, 1) => pv_block::<$m, 1>(pp, p_stride, bk, vp, dv, op, masks),
                              ($m, 2) => pv_block::<$m, 2>(pp, p_stride, bk, vp, dv, op, masks),
                              ($m, 3) => pv_block::<$m, 3>(pp, p_stride, bk, vp, dv, op, masks),
                              ($m, _) => pv_block::<$m, 4>(pp, p_stride, bk, vp, dv, op, masks),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1, 2, 3, 4, 5, 6);
                r += mr;
            }
            c += w;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv_block<const M: usize, const N: usize>(
        p: *const f32,
        p_stride: usize,
        bk: usize,
        v: *const f32,
        dv: usize,
        out: *mut f32,
        masks: [u16; 4],
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        for r in 0..M {
            for n in 0..N {
                acc[r][n] = _mm512_maskz_loadu_ps(masks[n], out.add(r * dv + 16 * n));
            }
        }
        for j in 0..bk {
            let vrow = v.add(j * dv);
            let mut vv = [_mm512_setzero_ps(); N];
            for n in 0..N {
                vv[n] = _mm512_maskz_loadu_ps(masks[n], vrow.add(16 * n));
            }
            for r in 0..M {
                let b = _mm512_set1_ps(*p.add(r * p_stride + j));
                for n in 0..N {
                    acc[r][n] = _mm512_fmadd_ps(b, vv[n], acc[r][n]);
                }
            }
        }
        for r in 0..M {
            for n in 0..N {
                _mm512_mask_storeu_ps(out.add(r * dv + 16 * n), masks[n], acc[r][n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let want = x.exp();
            for got in [fast_exp::<false>(x), fast_exp::<true>(x)] {
                let err = (got - want).abs();
                assert!(
                    err <= 2e-7 * want || (want < 1.2e-38 && got < 1.2e-38),
                    "{x}: {got} vs {want}"
                );
            }
            x += 0.0137;
        }
        assert_eq!(fast_exp::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp::<false>(0.0), 1.0);
    }
}
