//! The fused backward, FlashAttention-2 style: from `q`, `k`, `v`, the output `o`, its gradient
//! `dO` and the per-row log-sum-exp saved by the forward, recompute each score tile and
//! accumulate `dV = Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − Δ)` with `Δᵢ = dOᵢ·oᵢ`, `dK = scale·dSᵀ·Q` and
//! `dQ = scale·dS·K`, accumulated in f32, without materialising anything of size `L × S`.
//!
//! One parallel pass over work items `(batch, KV head, run of key tiles of` [`BK`] `keys)`: an
//! item owns the `dK` and `dV` rows of its keys, summed over every query row of every query
//! head sharing the KV head (GQA) that may see them (query rows in blocks of [`BQ`]). When there
//! are enough `(batch, KV head)` pairs to share out evenly, an item takes all of its head's key
//! tiles and so owns that head's `dQ` rows too: it sums them in a buffer of its own and writes
//! them once, in the output dtype. Otherwise a head's key tiles are split over several items,
//! whose `dQ` contributions go to the running thread's own `(B, L, H, D)` accumulator (one per
//! worker thread, summed at the end). Either way no two threads write the same memory and
//! nothing is recomputed.
//!
//! The five products per (query block, key tile) run on the forward's micro-kernels
//! ([`wide`]: f32, where the CPU has AVX-512 or AVX2 `Q·Kᵀ` and `dO·Vᵀ` against transposed
//! copies of K and V made once, `P` and `dS` formed in the epilogues of `Q·Kᵀ` (tiles that
//! need no mask or modifier) and `dO·Vᵀ` while their sums are in registers, `Pᵀ·dO` and `dSᵀ·Q`
//! reading the score tile transposed, `dS·K` reading K's rows in place on AVX-512 and the key
//! tile packed once as 16-column panels on AVX2 ([`panels::pack_tile`]); the `gemm` crate
//! elsewhere), or, for bf16 inputs where the forward uses AVX512-BF16 dot products, on bf16
//! pairs ([`pairs`]: `P` and `dS` rounded to bf16 before their products, as PyTorch's CPU
//! flash backward does, f32 accumulation). The masks are applied exactly as in the forward ([`Ctx::score_row`]: the
//! same structured ranges, key padding and bias; keys after `kv_len` never masked), so a fully
//! masked row has `P = 0` and contributes nothing. So are the score modifiers: soft-capping
//! multiplies `dS` by its derivative `1 − (s / c)²`, ALiBi is a constant, and the sinks enter
//! through the saved log-sum-exp (which includes them) alone. While a block's last three
//! products run, their micro-kernels prefetch the next block's query rows, output gradients and
//! `dQ` rows into L2 ([`Bwd::queue_next`]).

mod delta;
mod pairs;
mod rows;
#[cfg(test)]
mod tests;
mod wide;

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::kt::{transpose_blocks, transpose_heads, KeyTiles, Kt, KtBuf};
use super::mat::{Mat, MatMut};
use super::out::OutVec;
use super::panels;
use super::products::{self, Isa};
use super::softmax::exp_sub;
use super::spare::Spare;
use super::stream;
use super::tile::{Ctx, Data, OutBuf, View};
use super::{f32_rows, native_rows, view, AttnCall, Inputs, MAX_HEAD_DIM};
use delta::deltas;
use rows::HeadRows;

/// A key tile: (batch, KV head, first key, keys).
type Tile = (usize, usize, usize, usize);

/// Query rows per block.
pub const BQ: usize = 64;
/// Keys per tile. Measured on AMD Zen 4 (causal, H = 12, D = 64): 256 keys ran 2–2.5% faster
/// than 128 in f32 and bf16 (each block of query rows and its `dQ` passed half as often), 512
/// 3% slower (a tile's operands, over 800 KiB, outgrow a 1 MiB L2).
pub const BK: usize = 256;
// The key tiles are those of the copies of K and V (`KeyTiles`).
const _: () = assert!(BK == super::BLOCK_K);
/// Row stride (f32 elements) of the score tiles `P` and `dS`: 16 past [`BK`], so that a
/// column of the tile, which `Pᵀ·dO` and `dSᵀ·Q` read down the rows, spreads over L1's sets
/// (rows 1 KiB apart fall in a sixteenth of them and evicted each other and the value rows:
/// 3.6% of the f32 forward and backward at L = 8192 on AMD Zen 4).
pub(super) const TS: usize = BK + 16;

struct Scratch {
    /// Gathered query rows and their output gradients: f32 ([`wide`]) or bf16 pairs
    /// ([`pairs`]).
    q: Vec<f32>,
    go: Vec<f32>,
    qp: Vec<u32>,
    gop: Vec<u32>,
    /// `P` (`BQ × BK`, rows [`TS`] apart).
    p: Vec<f32>,
    /// `dP`, then `scale · dS` (`BQ × BK`, rows [`TS`] apart).
    ds: Vec<f32>,
    /// The soft-capped scores (`BQ × BK`, rows [`TS`] apart, with soft-capping).
    cap: Vec<f32>,
    /// `P` or `dS` as pairs of rows (`BQ/2 × BK`, rows [`TS`] apart), and `dS` as pairs of
    /// columns (`BQ × BK/2`).
    pt: Vec<u32>,
    dsp: Vec<u32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dq: Vec<f32>,
    /// The key tile's K as panels for `dQ += dS · K` on AVX2 ([`panels::pack_tile`]).
    kp: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        q: vec![0.0; BQ * MAX_HEAD_DIM],
        go: vec![0.0; BQ * MAX_HEAD_DIM],
        qp: vec![0; BQ * MAX_HEAD_DIM / 2],
        gop: vec![0; BQ * MAX_HEAD_DIM / 2],
        p: vec![0.0; BQ * TS],
        ds: vec![0.0; BQ * TS],
        cap: vec![0.0; BQ * TS],
        pt: vec![0; BQ / 2 * TS],
        dsp: vec![0; BQ * BK / 2],
        dk: vec![0.0; BK * MAX_HEAD_DIM],
        dv: vec![0.0; BK * MAX_HEAD_DIM],
        dq: vec![0.0; BQ * MAX_HEAD_DIM],
        kp: Vec::new(),
    });
}

/// What the pass reads besides the forward's context.
struct Bwd<'a> {
    ctx: &'a Ctx<'a>,
    /// The gradient of the output, `(B, L, H, Dv)`: f32, or bf16 with [`Bwd::pairs`].
    go: View<'a>,
    /// `(B, H, L)`.
    lse: &'a [f32],
    delta: &'a [f32],
    /// Structured visible key range of every query row `(b, i)`.
    ranges: &'a [(usize, usize)],
    /// Kᵀ `(B, Hkv, D, S)` and Vᵀ `(B, Hkv, Dv, S)` (f32, or bf16 pairs along D with
    /// [`Bwd::pairs`]) for the SIMD products.
    kt: Option<Kt<'a>>,
    vt: Option<Kt<'a>>,
    /// Whether the products run on bf16 pairs ([`pairs`]).
    pairs: bool,
    /// The gradients of k and v, `(B, S, Hkv, D | Dv)`, and of q `(B, L, H, D)` when items own
    /// whole heads.
    dk: OutBuf,
    dv: OutBuf,
    dq: OutBuf,
}

// SAFETY: `dk` / `dv` (and `dq` for whole-head items) are written at rows owned by one work
// item each (see `item`), and the buffers outlive the parallel loop.
unsafe impl Sync for Bwd<'_> {}

/// Where an item sums its `dQ` rows: row `(gg, i)` of the item's KV head at
/// `base + gg · head + i · row`.
struct DqAcc<'a> {
    data: &'a mut [f32],
    base: usize,
    head: usize,
    row: usize,
}

impl DqAcc<'_> {
    fn at(&self, gg: usize, i: usize) -> usize {
        self.base + gg * self.head + i * self.row
    }
}

/// The query rows of one (query block, key tile) step: `(folded row g·L + i, i)` of head `hh`.
struct Block<'r> {
    bi: usize,
    kh: usize,
    gg: usize,
    hh: usize,
    j0: usize,
    bk: usize,
    rows: &'r [(usize, usize)],
    /// Index of `(bi, hh, 0)` in the `(B, H, L)` statistics.
    stats: usize,
    /// Whether the tile's keys are subject to the mask plan.
    masked: bool,
    /// Whether the rows are consecutive queries (read and written in place).
    consecutive: bool,
    /// The item's head-major copies of its query rows and output gradients, if it made them.
    copy: Option<&'r HeadRows>,
    /// The tile's keys as panels ([`panels::pack_tile`]), where `dS · K` reads them.
    k_panels: Option<&'r [f32]>,
}

/// Whether the fused backward computes this call's products on bf16 pairs: bf16 q, k, v and
/// gradient where the forward's instruction set uses AVX512-BF16 dot products, and head sizes
/// that the pair micro-kernels read in place (multiples of 32).
fn pair_products(c: &AttnCall, grad: &Tensor, isa: Isa) -> bool {
    let bf16 = |t: &Tensor| t.dtype() == DType::BF16;
    products::dots_bf16(isa)
        && bf16(c.q)
        && bf16(c.k)
        && bf16(c.v)
        && bf16(grad)
        && c.d.is_multiple_of(32)
        && c.dv.is_multiple_of(32)
}

/// `(dq, dk, dv)` for the call `c` whose forward returned `out` with log-sum-exp `lse`, given
/// the output's gradient `grad`; in the dtypes (and shapes) of `q`, `k`, `v`.
pub(super) fn backward(
    c: &AttnCall,
    out: &Tensor,
    grad: &Tensor,
    lse: &[f32],
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, h, hkv, s, d, dv) = (c.b, c.l, c.h, c.hkv, c.s, c.d, c.dv);
    let pairs = pair_products(c, grad, products::current());
    if pairs {
        super::PAIR_BWD_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // f32 inputs, or bf16 ones kept as they are for the pair products.
    let inputs = Inputs::new(c, pairs)?;
    let o = native_rows(out)?;
    let go = if pairs {
        native_rows(grad)?
    } else {
        f32_rows(grad)?
    };
    let (og, _) = o.storage_and_layout();
    let (gg, _) = go.storage_and_layout();
    let (ov, gov) = (view(&og, &o)?, view(&gg, &go)?);
    let delta = deltas(&ov, &gov, (b, l, h, dv));
    let real_s = s - c.extra_keys;
    let ranges: Vec<(usize, usize)> = if c.mask.is_empty() {
        vec![(0, real_s); b * l]
    } else {
        (0..b * l).map(|x| c.mask.row_range(x / l, x % l)).collect()
    };
    let mut dk = OutVec::zeros(c.k.dtype(), b * s * hkv * d);
    let mut dvv = OutVec::zeros(c.v.dtype(), b * s * hkv * dv);

    let threads = rayon::current_num_threads().max(1);
    // The tiles of the copies of K and V (`BK` is their tile size).
    let tiles: Vec<(usize, usize)> = KeyTiles::new(real_s, s).spans().collect();
    // Whole heads per item when they share out evenly; else each head's tiles in runs.
    let heads = b * hkv;
    let whole = heads >= 4 * threads || heads.is_multiple_of(threads);
    let runs = if whole {
        1
    } else {
        (4 * threads)
            .div_ceil(heads.max(1))
            .clamp(1, tiles.len().max(1))
    };
    let per_run = tiles.len().div_ceil(runs).max(1);
    // The dQ that whole-head items write; split items sum into `dq_parts` instead.
    let mut dq_out = whole.then(|| OutVec::zeros(c.q.dtype(), b * l * h * d));
    let dq_parts: Vec<Mutex<Vec<f32>>> = (0..threads).map(|_| Mutex::new(Vec::new())).collect();
    let unused = OutBuf::F32(std::ptr::null_mut());
    inputs.with_ctx(c, false, unused, None, |ctx| -> Result<()> {
        let (kt, vt) = match ctx.paths.isa {
            Isa::Portable => (None, None),
            _ if pairs => {
                let t = |x: &View, w: usize| {
                    let read = |at, dst: &mut [u32]| x.pairs_into(at, dst).expect("bf16 rows");
                    KtBuf::Pairs(transpose_blocks(x, (b, hkv, w / 2), ctx.tiles, read))
                };
                (Some(t(&ctx.k, d)), Some(t(&ctx.v, dv)))
            }
            _ => (
                Some(KtBuf::F32(transpose_heads(&ctx.k, (b, hkv, d), ctx.tiles))),
                Some(KtBuf::F32(transpose_heads(&ctx.v, (b, hkv, dv), ctx.tiles))),
            ),
        };
        let bw = Bwd {
            ctx,
            go: gov,
            lse,
            delta: &delta,
            ranges: &ranges,
            kt: kt.as_ref().map(KtBuf::view),
            vt: vt.as_ref().map(KtBuf::view),
            pairs,
            dk: dk.buf(),
            dv: dvv.buf(),
            dq: dq_out.as_mut().map_or(unused, OutVec::buf),
        };
        let items: Vec<_> = (0..heads)
            .flat_map(|x| (0..runs).map(move |r| (x / hkv, x % hkv, r)))
            .filter(|&(_, _, r)| r * per_run < tiles.len())
            .collect();
        items.into_par_iter().for_each(|(bi, kh, r)| {
            let run = &tiles[r * per_run..((r + 1) * per_run).min(tiles.len())];
            SCRATCH.with(|sc| {
                let sc = &mut sc.borrow_mut();
                if whole {
                    bw.whole_head(bi, kh, run, sc);
                } else {
                    let slot = rayon::current_thread_index().unwrap_or(0) % threads;
                    // Uncontended: a worker only takes its own slot.
                    let mut dq = dq_parts[slot].lock().unwrap_or_else(|e| e.into_inner());
                    if dq.is_empty() {
                        dq.resize(b * l * h * d, 0.0);
                    }
                    let g = ctx.g;
                    let mut acc = DqAcc {
                        data: &mut dq,
                        base: bi * l * h * d + kh * g * d,
                        head: d,
                        row: h * d,
                    };
                    let copy = bw
                        .copies_rows()
                        .then(|| bw.head_rows(bi, kh, bw.row_span(bi, run)));
                    for &t in run {
                        bw.key_tile(bi, kh, t, (&mut acc, copy.as_ref()), sc);
                    }
                }
            })
        });
        Ok(())
    })??;
    drop((og, gg));
    let dev = c.q.device();
    let dq = if let Some(dq) = dq_out {
        dq.into_tensor((b, l, h, d).into(), c.q.dtype(), dev)?
    } else {
        // dQ: the sum of the per-thread accumulators.
        let mut parts: Vec<Vec<f32>> = dq_parts
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .filter(|v| !v.is_empty())
            .collect();
        let mut dq = parts.pop().unwrap_or_else(|| vec![0f32; b * l * h * d]);
        for p in &parts {
            dq.par_chunks_mut(1 << 14)
                .zip(p.par_chunks(1 << 14))
                .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += x));
        }
        Tensor::from_vec(dq, (b, l, h, d), dev)?.to_dtype(c.q.dtype())?
    };
    Ok((
        dq,
        dk.into_tensor((b, s, hkv, d).into(), c.k.dtype(), dev)?,
        dvv.into_tensor((b, s, hkv, dv).into(), c.v.dtype(), dev)?,
    ))
}

impl Bwd<'_> {
    /// Every key tile of KV head `kh` in batch `bi`, owning the head's `dQ` rows: summed in a
    /// buffer of the item's own, then written once.
    fn whole_head(&self, bi: usize, kh: usize, run: &[(usize, usize)], sc: &mut Scratch) {
        let ctx = self.ctx;
        let (g, l, d, h) = (ctx.g, ctx.l, ctx.d, ctx.h);
        let mut buf = Spare::<f32>::new(g * l * d);
        buf.fill(0.0);
        let mut acc = DqAcc {
            data: &mut buf,
            base: 0,
            head: l * d,
            row: d,
        };
        let copy = self
            .copies_rows()
            .then(|| self.head_rows(bi, kh, self.row_span(bi, run)));
        for &t in run {
            self.key_tile(bi, kh, t, (&mut acc, copy.as_ref()), sc);
        }
        for gg in 0..g {
            for i in 0..l {
                let src = &buf[(gg * l + i) * d..(gg * l + i + 1) * d];
                let off = ((bi * l + i) * h + kh * g + gg) * d;
                // SAFETY: row (bi, i, kh·G + gg) of the (B, L, H, D) gradient belongs to this
                // item only (whole heads are never split), and lies inside it.
                unsafe { self.dq.write(off, src, 1.0) };
            }
        }
    }

    /// One key tile `j0..j1` of KV head `kh` in batch `bi`: its `dK`, `dV` rows, and their
    /// `dQ` contributions added to `dq`; query rows read from the item's `copy` if it has one.
    fn key_tile(
        &self,
        bi: usize,
        kh: usize,
        (j0, j1): (usize, usize),
        (dq, copy): (&mut DqAcc, Option<&HeadRows>),
        sc: &mut Scratch,
    ) {
        let ctx = self.ctx;
        let (d, dv, l, g, h, bk) = (ctx.d, ctx.dv, ctx.l, ctx.g, ctx.h, j1 - j0);
        sc.dk[..bk * d].fill(0.0);
        sc.dv[..bk * dv].fill(0.0);
        let masked = j0 < ctx.real_s && ctx.masked;
        let mut rows: Vec<(usize, usize)> = Vec::with_capacity(BQ);
        let mut kp = std::mem::take(&mut sc.kp);
        let k_panels = (!self.pairs && products::panels_for(ctx.paths.isa))
            .then(|| panels::pack_tile(&ctx.k, (bi, kh, j0, bk), d, &mut kp));
        for gg in 0..g {
            let hh = kh * g + gg;
            let stats = (bi * h + hh) * l;
            for i0 in (0..l).step_by(BQ) {
                rows.clear();
                // The end of the keys any of the rows may see.
                let mut end = j0;
                for i in i0..(i0 + BQ).min(l) {
                    let sees = !masked || self.row_sees(bi, i, (j0, j1));
                    if sees && self.lse[stats + i] != f32::NEG_INFINITY {
                        rows.push((gg * l + i, i));
                        end = end.max(self.ranges[bi * l + i].1);
                    }
                }
                let nr = rows.len();
                if nr == 0 {
                    continue;
                }
                // Keys past every row's structured range are masked for all of them: the block
                // stops at the first whole vector after them (on the causal diagonal, half of
                // the tile for the first block of rows).
                let bk = if masked {
                    bk.min((end - j0).next_multiple_of(16))
                } else {
                    bk
                };
                let blk = Block {
                    bi,
                    kh,
                    gg,
                    hh,
                    j0,
                    bk,
                    rows: &rows,
                    stats,
                    masked,
                    consecutive: rows[nr - 1].1 - rows[0].1 + 1 == nr,
                    copy,
                    k_panels,
                };
                if self.pairs {
                    self.block_pairs(&blk, dq, sc);
                } else {
                    self.block_wide(&blk, dq, sc);
                }
            }
        }
        sc.kp = kp;
        let (s, hkv) = (ctx.s, ctx.hkv);
        for j in 0..bk {
            let row = (bi * s + j0 + j) * hkv + kh;
            // SAFETY: key row (bi, j0 + j, kh) of the contiguous (B, S, Hkv, D|Dv) gradients
            // belongs to this item only, and lies inside them.
            unsafe {
                self.dk.write(row * d, &sc.dk[j * d..(j + 1) * d], 1.0);
                self.dv.write(row * dv, &sc.dv[j * dv..(j + 1) * dv], 1.0);
            }
        }
    }

    /// Whether query position `i` of batch element `bi` may see a key in `j0..j1` (its
    /// structured range meets them).
    fn row_sees(&self, bi: usize, i: usize, (j0, j1): (usize, usize)) -> bool {
        let (lo, hi) = self.ranges[bi * self.ctx.l + i];
        lo < hi && lo < j1 && hi > j0
    }

    /// `P = exp(modified S + masks − lse)` in place over the score rows of `blk` (rows [`TS`]
    /// apart); rows that see no key of the tile become 0. With soft-capping the capped scores
    /// go to `cap`. Returns whether any row sees a key.
    fn probabilities(&self, blk: &Block, p: &mut [f32], cap: &mut [f32]) -> bool {
        let (ctx, l) = (self.ctx, self.ctx.l);
        if let (Some(_), Some(last)) = (ctx.mods.softcap, blk.rows.len().checked_sub(1)) {
            // The whole block at once; the capped scores kept for the derivative.
            let n = last * TS + blk.bk;
            ctx.mods.cap(ctx.paths.isa, &mut p[..n]);
            cap[..n].copy_from_slice(&p[..n]);
        }
        let mut any = false;
        for (r, &(fr, i)) in blk.rows.iter().enumerate() {
            let row = &mut p[r * TS..r * TS + blk.bk];
            let range = self.ranges[blk.bi * l + i];
            let (at, masks) = ((blk.bi, blk.kh, fr), (range, blk.masked));
            if !ctx.score_row(at, masks, blk.j0, row) {
                row.fill(0.0);
                continue;
            }
            exp_sub(ctx.paths.isa, row, self.lse[blk.stats + i]);
            any = true;
        }
        any
    }

    /// `ds ← scale · P ∘ (ds − Δ)` over the rows of `blk` (`ds` holds `dO · Vᵀ`), times
    /// soft-capping's derivative `1 − (s / c)²` from the capped scores `cap`.
    fn score_grads(&self, blk: &Block, p: &[f32], ds: &mut [f32], cap: &[f32]) {
        let scale = self.ctx.scale;
        for (r, &(_, i)) in blk.rows.iter().enumerate() {
            let delta = self.delta[blk.stats + i];
            let p = &p[r * TS..r * TS + blk.bk];
            let ds = &mut ds[r * TS..r * TS + blk.bk];
            ds.iter_mut()
                .zip(p)
                .for_each(|(x, &pp)| *x = scale * pp * (*x - delta));
            if let Some(c) = self.ctx.mods.softcap {
                let inv = 1.0 / c;
                let t = &cap[r * TS..r * TS + blk.bk];
                ds.iter_mut().zip(t).for_each(|(x, &t)| {
                    let y = t * inv;
                    *x *= 1.0 - y * y;
                });
            }
        }
    }

    /// Keys `j0..j0 + bk` of KV head `kh` in batch `bi` in the transposed copy `xt` of K or V
    /// (`w` rows of f32 elements or bf16 pairs, [`KeyTiles::kt`]).
    fn tile_t<'a, T>(&self, xt: &'a [T], w: usize, (bi, kh, j0, bk): Tile) -> Mat<'a, T> {
        self.ctx.tiles.kt(xt, w, bi * self.ctx.hkv + kh, (j0, bk))
    }

    /// Queues the rows of the block after `blk` for the products' prefetch stream (into L2,
    /// a few lines at a time, [`super::stream`]): its query rows and output gradients (`q`, `go`
    /// continued, where they are contiguous rows read in place: the item's copies) and its `dQ`
    /// rows (where they are the item's own buffer). At long sequences these come from L3 (the
    /// copies of one head are 2 × 2 MiB at L = 8192, D = 64 in f32), and the first product of a
    /// block waited on them; the caller empties the queue when the block is done.
    fn queue_next<T>(&self, blk: &Block, (q, go): (Mat<T>, Mat<T>), dq: &DqAcc) {
        let nr = blk.rows.len();
        // Elements `from..from + len` of `data` (as far as it goes), as a byte address range.
        fn range<T>(data: &[T], from: usize, len: usize) -> (usize, usize) {
            let (a, b) = (from.min(data.len()), (from + len).min(data.len()));
            let (p, size) = (data.as_ptr() as usize, std::mem::size_of::<T>());
            (p + a * size, p + b * size)
        }
        let mut ranges = [(0, 0); 3];
        // Consecutive rows read in one piece: the item's copies, or a tensor one head wide.
        if blk.consecutive && q.stride() == q.cols() && go.stride() == go.cols() {
            ranges[0] = range(q.data(), nr * q.cols(), BQ * q.cols());
            ranges[1] = range(go.data(), nr * go.cols(), BQ * go.cols());
        }
        let d = self.ctx.d;
        if blk.consecutive && dq.row == d {
            let at = dq.at(blk.gg, blk.rows[0].1);
            ranges[2] = range(dq.data, at + nr * d, BQ * d);
        }
        let lines: usize = ranges.iter().map(|r| (r.1 - r.0).div_ceil(64)).sum();
        // A few lines per step of the block's last three products (about 1000 steps in a whole
        // block): all issued within its first 400 steps, a third of the block ahead of its end.
        stream::queue(&ranges, lines.div_ceil(400));
    }

    /// Adds the block's `dQ` contribution, which `product` accumulates into the matrix it is
    /// given (`nr × D`), to the block's rows of `dq`: in place for consecutive rows, else into
    /// `scratch` first and then added row by row.
    fn add_dq(
        &self,
        blk: &Block,
        dq: &mut DqAcc,
        scratch: &mut [f32],
        product: impl FnOnce(MatMut),
    ) {
        let (nr, d) = (blk.rows.len(), self.ctx.d);
        if blk.consecutive {
            let (at, row) = (dq.at(blk.gg, blk.rows[0].1), dq.row);
            return product(MatMut::new(&mut dq.data[at..], nr, d, row));
        }
        let part = &mut scratch[..nr * d];
        part.fill(0.0);
        product(MatMut::new(part, nr, d, d));
        for (r, &(_, i)) in blk.rows.iter().enumerate() {
            let at = dq.at(blk.gg, i);
            dq.data[at..at + d]
                .iter_mut()
                .zip(&part[r * d..(r + 1) * d])
                .for_each(|(a, x)| *a += x);
        }
    }
}

/// The data of a view, for the variants the backward reads.
fn f32_data<'a>(v: &View<'a>) -> &'a [f32] {
    match v.data {
        Data::F32(s) => s,
        _ => unreachable!("the f32 products read f32 inputs"),
    }
}
