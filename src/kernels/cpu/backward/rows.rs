//! Head-major copies of a work item's query rows and output gradients.
//!
//! In the projections' `(B, L, H, D)` layout consecutive query rows of one head lie `H · D`
//! elements apart (3 KiB at H = 12, D = 64), and every (query block, key tile) step of the
//! backward reads a new block of them: 64 rows of Q and of dO, each on its own page run, which
//! the hardware prefetchers do not follow. The first product of each step (`Q · Kᵀ`, then
//! `dO · Vᵀ`) waited on them: measured in place on AMD Zen 4 (causal L = 2048, H = 12, f32),
//! those two products ran at 60–68% of the per-thread FMA rate while the three that read the
//! step's own tiles ran at 85%. An item therefore first copies its heads' rows once into
//! contiguous per-head blocks (`g · L` rows, 2 × 1 MiB per item at L = 2048, D = 64 in f32, in
//! the thread's reused [`Spare`] buffers) and its steps read blocks of consecutive rows there.

use super::super::mat::{Mat, PairMat};
use super::super::spare::Spare;
use super::{f32_data, Block, Bwd};

/// Most bytes of copies per work item (and worker thread): 8 MiB holds L = 8192 rows of one
/// query head at D = 64 in f32, or four heads at L = 2048 and D = 64.
const MAX_COPY_BYTES: usize = 8 << 20;

/// The copies of one item: row `(gg, i)` of query head `kh · g + gg` at unit
/// `(gg · L + i) · w` (units: f32 elements, or bf16 pairs with [`Bwd::pairs`]).
pub(super) enum HeadRows {
    /// f32 rows ([`Bwd::block_wide`]).
    Wide { q: Spare<f32>, go: Spare<f32> },
    /// bf16 rows as pairs ([`Bwd::block_pairs`]).
    Pairs { q: Spare<u32>, go: Spare<u32> },
}

impl Bwd<'_> {
    /// Whether the steps read copies ([`HeadRows`]): unless the rows of a head are contiguous
    /// already (both tensors head-major, rows not gathered), or the copies of an item would
    /// take more than [`MAX_COPY_BYTES`] (long sequences with many query heads per KV head:
    /// read in place).
    pub(super) fn copies_rows(&self) -> bool {
        let ctx = self.ctx;
        let (wq, wg) = (ctx.d, ctx.dv);
        let contiguous = |v: &super::View, w: usize| v.rows.is_none() && v.strides[1] == w;
        let bytes = ctx.g * ctx.l * (wq + wg) * 4;
        bytes <= MAX_COPY_BYTES && !(contiguous(&ctx.q, wq) && contiguous(&self.go, wg))
    }

    /// The copies of the query rows and output gradients of every query head sharing KV head
    /// `kh` of batch element `bi` (all `L` rows).
    pub(super) fn head_rows(&self, bi: usize, kh: usize) -> HeadRows {
        let ctx = self.ctx;
        let (g, l, d, dv) = (ctx.g, ctx.l, ctx.d, ctx.dv);
        if self.pairs {
            let (dp, dvp) = (d / 2, dv / 2);
            let (mut q, mut go) = (
                Spare::<u32>::new(g * l * dp),
                Spare::<u32>::new(g * l * dvp),
            );
            each((g, l, kh), |r, i, hh| {
                ctx.q
                    .pairs_into(ctx.q.at(bi, i, hh), &mut q[r * dp..(r + 1) * dp])
                    .expect("bf16 queries");
                self.go
                    .pairs_into(self.go.at(bi, i, hh), &mut go[r * dvp..(r + 1) * dvp])
                    .expect("bf16 output gradients");
            });
            HeadRows::Pairs { q, go }
        } else {
            let (mut q, mut go) = (Spare::<f32>::new(g * l * d), Spare::<f32>::new(g * l * dv));
            let (qs, gs) = (f32_data(&ctx.q), f32_data(&self.go));
            each((g, l, kh), |r, i, hh| {
                let at = ctx.q.at(bi, i, hh);
                q[r * d..(r + 1) * d].copy_from_slice(&qs[at..at + d]);
                let at = self.go.at(bi, i, hh);
                go[r * dv..(r + 1) * dv].copy_from_slice(&gs[at..at + dv]);
            });
            HeadRows::Wide { q, go }
        }
    }
}

/// Calls `f(copy row, position, query head)` for every row of the `g` query heads of KV head
/// `kh`, in the order of their addresses (the heads of one position are adjacent in the
/// projections' layout).
fn each((g, l, kh): (usize, usize, usize), mut f: impl FnMut(usize, usize, usize)) {
    for i in 0..l {
        for gg in 0..g {
            f(gg * l + i, i, kh * g + gg);
        }
    }
}

impl HeadRows {
    /// The `nr` consecutive f32 rows of `blk` from its first (query, gradient), when these are
    /// f32 copies.
    pub(super) fn wide<'a>(
        &'a self,
        blk: &Block,
        l: usize,
        (d, dv): (usize, usize),
    ) -> Option<(Mat<'a>, Mat<'a>)> {
        let HeadRows::Wide { q, go } = self else {
            return None;
        };
        let (nr, r0) = (blk.rows.len(), blk.gg * l + blk.rows[0].1);
        Some((
            Mat::new(&q[r0 * d..], nr, d, d),
            Mat::new(&go[r0 * dv..], nr, dv, dv),
        ))
    }

    /// As [`Self::wide`] for pair copies (`wq`, `wg` pairs per row).
    pub(super) fn pairs<'a>(
        &'a self,
        blk: &Block,
        l: usize,
        (wq, wg): (usize, usize),
    ) -> Option<(PairMat<'a>, PairMat<'a>)> {
        let HeadRows::Pairs { q, go } = self else {
            return None;
        };
        let (nr, r0) = (blk.rows.len(), blk.gg * l + blk.rows[0].1);
        Some((
            PairMat::new(&q[r0 * wq..], nr, wq, wq),
            PairMat::new(&go[r0 * wg..], nr, wg, wg),
        ))
    }
}
