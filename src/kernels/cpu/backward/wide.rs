//! The backward's five products in f32: the forward's AVX-512 / AVX2 micro-kernels (`Q·Kᵀ` and
//! `dO·Vᵀ` against the transposed copies of K and V, forming `P` and `dS` in their epilogues
//! ([`products::qk_t_exp`] where a tile needs no mask or modifier, [`products::qk_t_grad`]:
//! a pass over the tile fewer each), `Pᵀ·dO` and `dSᵀ·Q` reading the score tile transposed,
//! `dS·K` against K's rows, or on AVX2 against the key tile's panels), or the `gemm` crate
//! where the CPU has neither.
//!
//! On AVX2 the rows of K a tile's `dS·K` reads lie `Hkv · D` elements apart (3 KiB at H = 12,
//! D = 64), and each 16-column pass of the 6 × 16 micro-kernel over its 256 keys touched 256
//! lines that far apart; the key tile packed once into panels (64 KiB at D = 64, per tile and
//! reused by every block of query rows) is read in address order instead. Measured on AMD
//! Zen 3 with a cycle counter around the product, causal H = 12, D = 64, f32: 30–60% more flops
//! per cycle at L = 2048 (six calls), 18–23% at L = 8192 (two).

use super::super::kt::Kt;
use super::super::mat::{Mat, MatMut};
use super::super::panels;
use super::super::portable::matmul;
use super::super::products;
use super::super::stream;
use super::super::tile::View;
use super::{f32_data, Block, Bwd, DqAcc, Scratch, Tile, BQ, TS};

impl Bwd<'_> {
    /// `out (nr × bk, row stride TS) = scale · a · Xᵀ` for `a` (`nr × w`) and the key rows
    /// `j0..j0 + bk` of `x` (K or V of KV head `kh`), through the micro-kernel against its
    /// transposed copy `xt`, or in place through `gemm`.
    fn times_keys_t(
        &self,
        a: Mat,
        (x, xt): (&View, Option<Kt>),
        (bi, kh, j0, bk): Tile,
        out: &mut [f32],
        scale: f32,
    ) {
        let (nr, w) = (a.rows(), a.cols());
        match xt {
            Some(Kt::F32(xt)) => {
                let xt = self.tile_t(xt, w, (bi, kh, j0, bk));
                // The output rows hold TS >= round_up(bk, 16) columns.
                let o = MatMut::new(&mut out[..nr * TS], nr, bk, TS);
                products::qk_t(self.ctx.paths.isa, a, xt, o, scale);
            }
            _ => {
                let at = x.at(bi, j0, kh);
                matmul(
                    (nr, bk, w),
                    out,
                    TS,
                    false,
                    (a.data(), a.stride(), 1),
                    (&f32_data(x)[at..], 1, x.strides[1]),
                    scale,
                );
            }
        }
    }

    /// Whether every row of `blk` sees every key of its tile, with nothing added to the scores
    /// (no soft-capping, ALiBi, key padding or bias): `P = exp(scale · S − lse)` as it stands.
    fn plain_tile(&self, blk: &Block) -> bool {
        let ctx = self.ctx;
        let covers = |&(_, i): &(usize, usize)| {
            let (lo, hi) = self.ranges[blk.bi * ctx.l + i];
            lo <= blk.j0 && hi >= blk.j0 + blk.bk
        };
        ctx.mods.softcap.is_none()
            && !ctx.mods.has_alibi()
            && ctx.key_bias.is_none()
            && ctx.bias.is_none()
            && (!blk.masked || blk.rows.iter().all(covers))
    }

    /// One (query block, key tile) step on f32 operands.
    pub(super) fn block_wide(&self, blk: &Block, dq: &mut DqAcc, sc: &mut Scratch) {
        let ctx = self.ctx;
        let (d, dv, bk, nr, hh) = (ctx.d, ctx.dv, blk.bk, blk.rows.len(), blk.hh);
        let (qs, gs) = (f32_data(&ctx.q), f32_data(&self.go));
        // Consecutive queries are read (and their dQ written) in place; others are gathered
        // into the scratch.
        let first = blk.rows[0].1;
        let (q, go) = if let Some(x) = blk.copy.and_then(|c| c.wide(blk, (d, dv))) {
            x
        } else if blk.consecutive {
            let (qa, ga) = (ctx.q.at(blk.bi, first, hh), self.go.at(blk.bi, first, hh));
            (
                Mat::new(&qs[qa..], nr, d, ctx.q.strides[1]),
                Mat::new(&gs[ga..], nr, dv, self.go.strides[1]),
            )
        } else {
            for (r, &(_, i)) in blk.rows.iter().enumerate() {
                let at = ctx.q.at(blk.bi, i, hh);
                sc.q[r * d..(r + 1) * d].copy_from_slice(&qs[at..at + d]);
                let at = self.go.at(blk.bi, i, hh);
                sc.go[r * dv..(r + 1) * dv].copy_from_slice(&gs[at..at + dv]);
            }
            (Mat::new(&sc.q, nr, d, d), Mat::new(&sc.go, nr, dv, dv))
        };
        let tile = (blk.bi, blk.kh, blk.j0, bk);
        // The rows' statistics (lse, then Δ) for the products' epilogues.
        let mut stats = [0f32; BQ];
        let mut gather = |from: &[f32]| {
            for (x, &(_, i)) in stats.iter_mut().zip(blk.rows) {
                *x = from[blk.stats + i];
            }
            stats
        };
        // P = exp(scale · Q · Kᵀ + masks − lse): in the product's epilogue for a plain tile
        // against the transposed copy of K, else the scores, then a pass over them.
        match self.kt {
            Some(Kt::F32(kt)) if self.plain_tile(blk) => {
                let (kt, lse) = (self.tile_t(kt, d, tile), gather(self.lse));
                let o = MatMut::new(&mut sc.p[..nr * TS], nr, bk, TS);
                products::qk_t_exp(ctx.paths.isa, (q, kt), &lse[..nr], o, ctx.scale);
            }
            _ => {
                self.times_keys_t(q, (&ctx.k, self.kt), tile, &mut sc.p, ctx.scale);
                if !self.probabilities(blk, &mut sc.p, &mut sc.cap) {
                    return;
                }
            }
        }
        self.queue_next(blk, (q, go), dq);
        // scale · dS = scale · P ∘ (dO · Vᵀ − Δ): in the product's epilogue against the
        // transposed copy of V (without soft-capping), else in a pass over `dO · Vᵀ`.
        match self.vt {
            Some(Kt::F32(vt)) if ctx.mods.softcap.is_none() => {
                let (vt, delta) = (self.tile_t(vt, dv, tile), gather(self.delta));
                let p = Mat::new(&sc.p[..nr * TS], nr, bk, TS);
                let o = MatMut::new(&mut sc.ds[..nr * TS], nr, bk, TS);
                products::qk_t_grad(ctx.paths.isa, (go, vt), (p, &delta[..nr]), o, ctx.scale);
            }
            _ => {
                self.times_keys_t(go, (&ctx.v, self.vt), tile, &mut sc.ds, 1.0);
                self.score_grads(blk, &sc.p, &mut sc.ds, &sc.cap);
            }
        }
        // dV += Pᵀ · dO ; dK += (scale · dS)ᵀ · Q
        let isa = ctx.paths.isa;
        let p = Mat::new(&sc.p, nr, bk, TS);
        products::pv_t(isa, p, go, MatMut::new(&mut sc.dv, bk, dv, dv));
        let ds = Mat::new(&sc.ds, nr, bk, TS);
        products::pv_t(isa, ds, q, MatMut::new(&mut sc.dk, bk, d, d));
        // dQ += (scale · dS) · K: K's panels where the tile has them, else its rows in place.
        if let Some(kp) = blk.k_panels {
            let k = panels::tile_panels(kp, bk, d);
            self.add_dq(blk, dq, &mut sc.dq, |acc| {
                products::pv_panel(isa, ds, k, acc)
            });
        } else {
            let (k0, kst) = (ctx.k.at(blk.bi, blk.j0, blk.kh), ctx.k.strides[1]);
            let k = Mat::new(&f32_data(&ctx.k)[k0..], bk, d, kst);
            self.add_dq(blk, dq, &mut sc.dq, |acc| products::pv(isa, ds, k, acc));
        }
        stream::queue(&[], 0);
    }
}
