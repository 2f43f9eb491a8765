//! The backward's five products on bf16 pairs (AVX512-BF16 `vdpbf16ps`, f32 accumulation), for
//! bf16 inputs where the forward uses them too: `Q·Kᵀ` and `dO·Vᵀ` from the gathered rows as
//! pairs against pair-transposed copies of K and V; `Pᵀ·dO` and `dSᵀ·Q` with `P` and `dS`
//! rounded to bf16 as pairs of their rows ([`products::interleave_pairs`]) against the
//! gathered rows; `dS·K` with `dS` as pairs of its columns against K's rows in place. `P` and
//! `dS` are rounded to bf16 before their products, as PyTorch's CPU flash backward does; `dS`
//! itself is formed in f32 from the f32 `P`.

use super::super::kt::Kt;
use super::super::mat::{HalfMat, MatMut, PairMat};
use super::super::products;
use super::super::stream;
use super::{Block, Bwd, DqAcc, Scratch, Tile, BK, TS};
use crate::kernels::cpu::mat::Mat;

impl Bwd<'_> {
    /// `out (nr × bk, row stride TS) = scale · a · Xᵀ` for the pair rows `a` (`nr × w/2`) and
    /// the key tile `j0..j0 + bk` of the pair-transposed copy `xt` (Kᵀ or Vᵀ).
    fn pairs_times_keys_t(
        &self,
        a: PairMat,
        xt: Option<Kt>,
        tile: Tile,
        out: &mut [f32],
        scale: f32,
    ) {
        let Some(Kt::Pairs(xt)) = xt else {
            unreachable!("the pair products are given pair-transposed K and V")
        };
        let (nr, bk) = (a.rows(), tile.3);
        let xt = self.tile_t(xt, a.cols(), tile);
        let o = MatMut::new(&mut out[..nr * TS], nr, bk, TS);
        products::qk_pairs(self.ctx.paths.isa, a, xt, o, scale);
    }

    /// One (query block, key tile) step on bf16 pairs.
    pub(super) fn block_pairs(&self, blk: &Block, dq: &mut DqAcc, sc: &mut Scratch) {
        let ctx = self.ctx;
        let isa = ctx.paths.isa;
        let (d, dv, bk, nr, hh) = (ctx.d, ctx.dv, blk.bk, blk.rows.len(), blk.hh);
        let (dp, dvp) = (d / 2, dv / 2);
        // The block's query rows and output gradients as pairs: in place when they are
        // consecutive rows whose pairs are aligned words, else gathered.
        let first = blk.rows[0].1;
        let (qa, ga) = (ctx.q.at(blk.bi, first, hh), self.go.at(blk.bi, first, hh));
        let in_place = if let Some(x) = blk.copy.and_then(|c| c.pairs(blk, (dp, dvp))) {
            Some(x)
        } else if blk.consecutive {
            let q = ctx.q.pairs_mat(qa, (nr, dp, ctx.q.strides[1]));
            let go = self.go.pairs_mat(ga, (nr, dvp, self.go.strides[1]));
            q.zip(go)
        } else {
            None
        };
        let (q, go) = match in_place {
            Some(x) => x,
            None => {
                for (r, &(_, i)) in blk.rows.iter().enumerate() {
                    let at = ctx.q.at(blk.bi, i, hh);
                    ctx.q
                        .pairs_into(at, &mut sc.qp[r * dp..(r + 1) * dp])
                        .expect("bf16 queries");
                    let at = self.go.at(blk.bi, i, hh);
                    self.go
                        .pairs_into(at, &mut sc.gop[r * dvp..(r + 1) * dvp])
                        .expect("bf16 output gradients");
                }
                (
                    PairMat::new(&sc.qp, nr, dp, dp),
                    PairMat::new(&sc.gop, nr, dvp, dvp),
                )
            }
        };
        let tile = (blk.bi, blk.kh, blk.j0, bk);
        // P = exp(scale · Q · Kᵀ + masks − lse)
        self.pairs_times_keys_t(q, self.kt, tile, &mut sc.p, ctx.scale);
        if !self.probabilities(blk, &mut sc.p, &mut sc.cap) {
            return;
        }
        self.queue_next(blk, (q, go), dq);
        // scale · dS = scale · P ∘ (dO · Vᵀ − Δ)
        self.pairs_times_keys_t(go, self.vt, tile, &mut sc.ds, 1.0);
        self.score_grads(blk, &sc.p, &mut sc.ds, &sc.cap);
        // dV += Pᵀ · dO ; dK += (scale · dS)ᵀ · Q, with P and dS as pairs of their rows.
        let np = nr.div_ceil(2);
        let go_rows = HalfMat::from_pairs(go);
        let q_rows = HalfMat::from_pairs(q);
        products::interleave_pairs(isa, Mat::new(&sc.p, nr, bk, TS), &mut sc.pt, TS);
        let pt = PairMat::new(&sc.pt, np, bk, TS);
        products::pv_t_pairs(isa, pt, go_rows, MatMut::new(&mut sc.dv, bk, dv, dv));
        let ds = Mat::new(&sc.ds, nr, bk, TS);
        products::interleave_pairs(isa, ds, &mut sc.pt, TS);
        let pt = PairMat::new(&sc.pt, np, bk, TS);
        products::pv_t_pairs(isa, pt, q_rows, MatMut::new(&mut sc.dk, bk, d, d));
        // dQ += (scale · dS) · K, with dS as pairs of its columns and K's rows read in place.
        products::to_pairs(isa, ds, &mut sc.dsp, BK / 2);
        let dsp = PairMat::new(&sc.dsp, nr, bk.div_ceil(2), BK / 2);
        let (k0, kst) = (ctx.k.at(blk.bi, blk.j0, blk.kh), ctx.k.strides[1]);
        let k = ctx.k.bf16_mat(k0, (bk, d, kst)).expect("bf16 keys");
        self.add_dq(blk, dq, &mut sc.dq, |acc| {
            products::pv_pairs(isa, dsp, k, acc)
        });
        stream::queue(&[], 0);
    }
}
