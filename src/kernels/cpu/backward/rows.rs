//! Head-major copies of a work item's query rows and output gradients.
//!
//! In the projections' `(B, L, H, D)` layout consecutive query rows of one head lie `H · D`
//! elements apart (3 KiB at H = 12, D = 64), and every (query block, key tile) step of the
//! backward reads a new block of them: 64 rows of Q and of dO, each on its own page run, which
//! the hardware prefetchers do not follow. The first product of each step (`Q · Kᵀ`, then
//! `dO · Vᵀ`) waited on them: measured in place on AMD Zen 4 (causal L = 2048, H = 12, f32),
//! those two products ran at 60–68% of the per-thread FMA rate while the three that read the
//! step's own tiles ran at 85%. An item therefore first copies the rows its key tiles may need
//! (`g` heads × the positions that see them: all `L` for a whole causal head, 2 × 1 MiB at
//! L = 2048, D = 64 in f32) into contiguous per-head blocks in the thread's reused [`Spare`]
//! buffers, asking for each row a few rows ahead (the copy itself is a strided gather), and its
//! steps read blocks of consecutive rows there.

use super::super::mat::{Mat, PairMat};
use super::super::spare::Spare;
use super::{f32_data, Block, Bwd};

/// Most bytes of copies per work item (and worker thread): 8 MiB holds L = 8192 rows of one
/// query head at D = 64 in f32, or four heads at L = 2048 and D = 64.
const MAX_COPY_BYTES: usize = 8 << 20;

/// The copies of one item: rows `lo..hi` of every query head sharing its KV head, row
/// `(gg, i)` of query head `kh · g + gg` at unit `(gg · (hi − lo) + i − lo) · w` (units: f32
/// elements, or bf16 pairs with [`Bwd::pairs`]).
pub(super) struct HeadRows {
    data: Copies,
    lo: usize,
    hi: usize,
}

enum Copies {
    /// f32 rows ([`Bwd::block_wide`]).
    Wide { q: Spare<f32>, go: Spare<f32> },
    /// bf16 rows as pairs ([`Bwd::block_pairs`]).
    Pairs { q: Spare<u32>, go: Spare<u32> },
}

/// Row distance (bytes) from which a head's rows are copied.
const FAR: usize = 1024;

/// Rows the copy loop asks for ahead of the one it copies (their loads in flight meanwhile).
const AHEAD: usize = 8;

impl Bwd<'_> {
    /// Whether the steps read copies ([`HeadRows`]): when the rows of a head lie at least
    /// [`FAR`] bytes apart, or are gathered, in the query or the gradient tensor (closer rows
    /// share pages and the hardware prefetchers follow them: measured on AMD Zen 4, copies lost
    /// 2–3% with 768-byte rows and won 3–6% with 1.5 KiB ones), and unless an item's copies
    /// would take more than [`MAX_COPY_BYTES`] (long sequences with many query heads per KV
    /// head: read in place).
    pub(super) fn copies_rows(&self) -> bool {
        let ctx = self.ctx;
        let far = |v: &super::View, w: usize| {
            let size = match v.data {
                super::Data::F32(_) => 4,
                _ => 2,
            };
            v.rows.is_some() || (v.strides[1] != w && v.strides[1] * size >= FAR)
        };
        let bytes = ctx.g * ctx.l * (ctx.d + ctx.dv) * 4;
        bytes <= MAX_COPY_BYTES && (far(&ctx.q, ctx.d) || far(&self.go, ctx.dv))
    }

    /// The query positions `lo..hi` that may see a key of the tiles `run` of batch element `bi`
    /// (every one that does lies inside: the same rule as [`Bwd::key_tile`]'s).
    pub(super) fn row_span(&self, bi: usize, run: &[(usize, usize)]) -> (usize, usize) {
        let (ctx, l) = (self.ctx, self.ctx.l);
        let unmasked = run.iter().any(|&(j0, _)| !(j0 < ctx.real_s && ctx.masked));
        if unmasked {
            return (0, l);
        }
        let (a, b) = match (run.first(), run.last()) {
            (Some(&(a, _)), Some(&(_, b))) => (a, b),
            _ => return (0, 0),
        };
        let sees = |i: usize| self.row_sees(bi, i, (a, b));
        match (0..l).position(sees) {
            Some(first) => (
                first,
                (first..l).rfind(|&i| sees(i)).map_or(first, |i| i + 1),
            ),
            None => (0, 0),
        }
    }

    /// The copies of the query rows `lo..hi` and their output gradients of every query head
    /// sharing KV head `kh` of batch element `bi`.
    pub(super) fn head_rows(&self, bi: usize, kh: usize, (lo, hi): (usize, usize)) -> HeadRows {
        let ctx = self.ctx;
        let (g, n, d, dv) = (ctx.g, hi - lo, ctx.d, ctx.dv);
        let rows = (g, kh, lo, hi);
        let ahead = |i: usize, hh: usize| {
            ctx.q.prefetch_row(ctx.q.at(bi, i, hh), d);
            self.go.prefetch_row(self.go.at(bi, i, hh), dv);
        };
        let data = if self.pairs {
            let (dp, dvp) = (d / 2, dv / 2);
            let (mut q, mut go) = (
                Spare::<u32>::new(g * n * dp),
                Spare::<u32>::new(g * n * dvp),
            );
            each(rows, ahead, |r, i, hh| {
                ctx.q
                    .pairs_into(ctx.q.at(bi, i, hh), &mut q[r * dp..(r + 1) * dp])
                    .expect("bf16 queries");
                self.go
                    .pairs_into(self.go.at(bi, i, hh), &mut go[r * dvp..(r + 1) * dvp])
                    .expect("bf16 output gradients");
            });
            Copies::Pairs { q, go }
        } else {
            let (mut q, mut go) = (Spare::<f32>::new(g * n * d), Spare::<f32>::new(g * n * dv));
            let (qs, gs) = (f32_data(&ctx.q), f32_data(&self.go));
            each(rows, ahead, |r, i, hh| {
                let at = ctx.q.at(bi, i, hh);
                q[r * d..(r + 1) * d].copy_from_slice(&qs[at..at + d]);
                let at = self.go.at(bi, i, hh);
                go[r * dv..(r + 1) * dv].copy_from_slice(&gs[at..at + dv]);
            });
            Copies::Wide { q, go }
        };
        HeadRows { data, lo, hi }
    }
}

/// Calls `f(copy row, position, query head)` for rows `lo..hi` of the `g` query heads of KV
/// head `kh`, in the order of their addresses (the heads of one position are adjacent in the
/// projections' layout), after `ahead(position, query head)` for the row [`AHEAD`] positions on.
fn each(
    (g, kh, lo, hi): (usize, usize, usize, usize),
    ahead: impl Fn(usize, usize),
    mut f: impl FnMut(usize, usize, usize),
) {
    let n = hi - lo;
    for i in lo..hi {
        for gg in 0..g {
            if i + AHEAD < hi {
                ahead(i + AHEAD, kh * g + gg);
            }
            f(gg * n + i - lo, i, kh * g + gg);
        }
    }
}

impl HeadRows {
    /// Where the block's rows start in the copies (in rows), if they are consecutive and
    /// copied.
    fn start(&self, blk: &Block) -> Option<usize> {
        let (first, nr) = (blk.rows[0].1, blk.rows.len());
        (blk.consecutive && first >= self.lo && first + nr <= self.hi)
            .then(|| blk.gg * (self.hi - self.lo) + first - self.lo)
    }

    /// The `nr` f32 rows of `blk` from its first (query, gradient), when they are consecutive
    /// and these are f32 copies holding them.
    pub(super) fn wide<'a>(
        &'a self,
        blk: &Block,
        (d, dv): (usize, usize),
    ) -> Option<(Mat<'a>, Mat<'a>)> {
        let Copies::Wide { q, go } = &self.data else {
            return None;
        };
        let (nr, r0) = (blk.rows.len(), self.start(blk)?);
        Some((
            Mat::new(&q[r0 * d..], nr, d, d),
            Mat::new(&go[r0 * dv..], nr, dv, dv),
        ))
    }

    /// As [`Self::wide`] for pair copies (`wq`, `wg` pairs per row).
    pub(super) fn pairs<'a>(
        &'a self,
        blk: &Block,
        (wq, wg): (usize, usize),
    ) -> Option<(PairMat<'a>, PairMat<'a>)> {
        let Copies::Pairs { q, go } = &self.data else {
            return None;
        };
        let (nr, r0) = (blk.rows.len(), self.start(blk)?);
        Some((
            PairMat::new(&q[r0 * wq..], nr, wq, wq),
            PairMat::new(&go[r0 * wg..], nr, wg, wg),
        ))
    }
}
