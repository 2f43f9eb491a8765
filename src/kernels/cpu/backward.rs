//! The fused backward, FlashAttention-2 style: from `q`, `k`, `v`, the output `o`, its gradient
//! `dO` and the per-row log-sum-exp saved by the forward, recompute each score tile and
//! accumulate `dV = Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − Δ)` with `Δᵢ = dOᵢ·oᵢ`, `dK = scale·dSᵀ·Q` and
//! `dQ = scale·dS·K`, in f32, without materialising anything of size `L × S`.
//!
//! Two parallel passes, so that every work item owns the rows it writes (no atomics):
//! 1. per `(batch, KV head, tile of` [`BK`] `keys)`: `dK` and `dV` of those keys, summed over
//!    every query row of every query head sharing the KV head (GQA) that may see them;
//! 2. per work item of the forward (a tile of folded query rows): `dQ` of those rows over the
//!    key tiles they see.
//!
//! The masks are applied exactly as in the forward ([`Ctx::mask_row`], the same structured
//! ranges, key padding and bias, keys after `kv_len` never masked), so a fully masked row has
//! `P = 0` and contributes nothing. Scratch per worker: a few `64 × 256` tiles.

use std::cell::RefCell;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::portable::matmul;
use super::softmax::exp_sub;
use super::tile::{Ctx, OutPtr, View};
use super::{cpu_f32, f32_rows, for_each_item, strides3, AttnCall, Inputs, MAX_HEAD_DIM};

/// Query rows per block.
pub const BQ: usize = 64;
/// Keys per `dK`/`dV` work item.
pub const BK: usize = 64;
/// Keys per tile in the `dQ` pass.
const BKQ: usize = 128;

struct Scratch {
    q: Vec<f32>,
    go: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
    acc_a: Vec<f32>,
    acc_b: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        q: vec![0.0; BQ * MAX_HEAD_DIM],
        go: vec![0.0; BQ * MAX_HEAD_DIM],
        p: vec![0.0; BQ * BKQ.max(BK)],
        dp: vec![0.0; BQ * BKQ.max(BK)],
        acc_a: vec![0.0; BQ.max(BK) * MAX_HEAD_DIM],
        acc_b: vec![0.0; BK * MAX_HEAD_DIM],
    });
}

/// What the two passes read besides the forward's context.
struct Bwd<'a> {
    ctx: &'a Ctx<'a>,
    /// The gradient of the output, `(B, L, H, Dv)`.
    go: View<'a>,
    /// `(B, H, L)`.
    lse: &'a [f32],
    delta: &'a [f32],
    /// Structured visible key range of every query row `(b, i)`.
    ranges: &'a [(usize, usize)],
    dq: OutPtr,
    dk: OutPtr,
    dv: OutPtr,
}

// SAFETY: the raw output pointers are written at disjoint rows by the work items (see each
// pass), and the buffers outlive the parallel loops.
unsafe impl Sync for Bwd<'_> {}

/// `(dq, dk, dv)` for the call `c` whose forward returned `out` with log-sum-exp `lse`, given
/// the output's gradient `grad`; in the dtypes (and shapes) of `q`, `k`, `v`.
pub(super) fn backward(
    c: &AttnCall,
    out: &Tensor,
    grad: &Tensor,
    lse: &[f32],
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, h, hkv, s, d, dv) = (c.b, c.l, c.h, c.hkv, c.s, c.d, c.dv);
    let inputs = Inputs::new(c)?;
    let (o, go) = (f32_rows(out)?, f32_rows(grad)?);
    let (og, _) = o.storage_and_layout();
    let (gg, _) = go.storage_and_layout();
    let ov = View {
        data: cpu_f32(&og, &o)?,
        strides: strides3(&o),
    };
    let gov = View {
        data: cpu_f32(&gg, &go)?,
        strides: strides3(&go),
    };
    // Δ = rowsum(dO ∘ O), per (b, head, i).
    let mut delta = vec![0f32; b * h * l];
    delta
        .par_chunks_mut(l.max(1))
        .enumerate()
        .for_each(|(bh, row)| {
            let (bi, hh) = (bh / h, bh % h);
            for (i, x) in row.iter_mut().enumerate() {
                let (a, g) = (ov.at(bi, i, hh), gov.at(bi, i, hh));
                *x = ov.data[a..a + dv]
                    .iter()
                    .zip(&gov.data[g..g + dv])
                    .map(|(p, q)| p * q)
                    .sum();
            }
        });
    let real_s = s - c.extra_keys;
    let ranges: Vec<(usize, usize)> = if c.mask.is_empty() {
        vec![(0, real_s); b * l]
    } else {
        (0..b * l).map(|x| c.mask.row_range(x / l, x % l)).collect()
    };
    let mut dq = vec![0f32; b * l * h * d];
    let mut dk = vec![0f32; b * s * hkv * d];
    let mut dvv = vec![0f32; b * s * hkv * dv];
    let (dq_p, dk_p, dv_p) = (
        OutPtr(dq.as_mut_ptr()),
        OutPtr(dk.as_mut_ptr()),
        OutPtr(dvv.as_mut_ptr()),
    );
    let unused = OutPtr(std::ptr::null_mut());
    inputs.with_ctx(c, false, unused, None, |ctx| {
        let bw = Bwd {
            ctx,
            go: View {
                data: gov.data,
                strides: gov.strides,
            },
            lse,
            delta: &delta,
            ranges: &ranges,
            dq: dq_p,
            dk: dk_p,
            dv: dv_p,
        };
        // Pass 1: dK, dV per key tile (real keys, then the appended ones).
        let mut tiles = Vec::new();
        for (from, to) in [(0, real_s), (real_s, s)] {
            for j0 in (from..to).step_by(BK) {
                tiles.push((j0, (j0 + BK).min(to)));
            }
        }
        let items: Vec<_> = (0..b * hkv)
            .flat_map(|x| {
                tiles
                    .iter()
                    .map(move |&(j0, j1)| (x / hkv, x % hkv, j0, j1))
            })
            .collect();
        items.into_par_iter().for_each(|(bi, kh, j0, j1)| {
            SCRATCH.with(|sc| bw.kv_item(bi, kh, j0, j1, &mut sc.borrow_mut()))
        });
        // Pass 2: dQ per tile of folded query rows, as the forward splits them.
        for_each_item(c, ctx.g, |(bi, kh, r0, nr)| {
            SCRATCH.with(|sc| bw.q_item(bi, kh, r0, nr, &mut sc.borrow_mut()))
        });
    })?;
    drop((og, gg));
    let dev = c.q.device();
    Ok((
        Tensor::from_vec(dq, (b, l, h, d), dev)?.to_dtype(c.q.dtype())?,
        Tensor::from_vec(dk, (b, s, hkv, d), dev)?.to_dtype(c.k.dtype())?,
        Tensor::from_vec(dvv, (b, s, hkv, dv), dev)?.to_dtype(c.v.dtype())?,
    ))
}

impl Bwd<'_> {
    /// Gathers query row `i` of head `hh` (batch `bi`) and its output gradient into row `r` of
    /// the scratch tiles.
    fn gather(&self, sc: &mut Scratch, r: usize, bi: usize, i: usize, hh: usize) {
        let (d, dv) = (self.ctx.d, self.ctx.dv);
        let q = &self.ctx.q;
        let at = q.at(bi, i, hh);
        sc.q[r * d..(r + 1) * d].copy_from_slice(&q.data[at..at + d]);
        let at = self.go.at(bi, i, hh);
        sc.go[r * dv..(r + 1) * dv].copy_from_slice(&self.go.data[at..at + dv]);
    }

    /// For rows `0..nr` (folded rows `fr(r)`, query `i(r)` of head `hh(r)`) against keys
    /// `j0..j1`: `p` ← P (masked, normalised by the saved log-sum-exp) and `dp` ← dS.
    /// Returns whether any probability is nonzero.
    fn probs_and_ds(
        &self,
        sc: &mut Scratch,
        bi: usize,
        kh: usize,
        rows: &[(usize, usize, usize)],
        (j0, j1): (usize, usize),
        stride: usize,
    ) -> bool {
        let ctx = self.ctx;
        let (d, dv, nr, bk) = (ctx.d, ctx.dv, rows.len(), j1 - j0);
        let (l, h) = (ctx.l, ctx.h);
        let masked = ctx.masked && j0 < ctx.real_s;
        let (k0, v0) = (ctx.k.at(bi, j0, kh), ctx.v.at(bi, j0, kh));
        let (kst, vst) = (ctx.k.strides[1], ctx.v.strides[1]);
        // S = scale · Q · Kᵀ
        matmul(
            (nr, bk, d),
            &mut sc.p,
            stride,
            false,
            (&sc.q, d, 1),
            (&ctx.k.data[k0..], 1, kst),
            ctx.scale,
        );
        let mut any = false;
        for (r, &(fr, i, hh)) in rows.iter().enumerate() {
            let row = &mut sc.p[r * stride..r * stride + bk];
            let m = self.lse[(bi * h + hh) * l + i];
            if m == f32::NEG_INFINITY
                || (masked && !ctx.mask_row(bi, kh, fr, self.ranges[bi * l + i], j0, row))
            {
                row.fill(0.0);
                continue;
            }
            exp_sub(row, m);
            any = true;
        }
        if !any {
            return false;
        }
        // dP = dO · Vᵀ, then dS = P ∘ (dP − Δ) in place.
        matmul(
            (nr, bk, dv),
            &mut sc.dp,
            stride,
            false,
            (&sc.go, dv, 1),
            (&ctx.v.data[v0..], 1, vst),
            1.0,
        );
        for (r, &(_, i, hh)) in rows.iter().enumerate() {
            let delta = self.delta[(bi * h + hh) * l + i];
            let p = &sc.p[r * stride..r * stride + bk];
            let ds = &mut sc.dp[r * stride..r * stride + bk];
            ds.iter_mut()
                .zip(p)
                .for_each(|(x, &pp)| *x = pp * (*x - delta));
        }
        true
    }

    /// Pass 1: `dK`, `dV` of keys `j0..j1` of KV head `kh`.
    fn kv_item(&self, bi: usize, kh: usize, j0: usize, j1: usize, sc: &mut Scratch) {
        let ctx = self.ctx;
        let (d, dv, l, g, bk) = (ctx.d, ctx.dv, ctx.l, ctx.g, j1 - j0);
        sc.acc_a[..bk * d].fill(0.0); // dK
        sc.acc_b[..bk * dv].fill(0.0); // dV
        let real = j0 < ctx.real_s;
        let mut rows = Vec::with_capacity(BQ);
        for gg in 0..g {
            let hh = kh * g + gg;
            for i0 in (0..l).step_by(BQ) {
                let i1 = (i0 + BQ).min(l);
                rows.clear();
                for i in i0..i1 {
                    let (lo, hi) = self.ranges[bi * l + i];
                    if !real || !ctx.masked || (lo < hi && lo < j1 && hi > j0) {
                        rows.push((gg * l + i, i, hh));
                    }
                }
                if rows.is_empty() {
                    continue;
                }
                for (r, &(_, i, hh)) in rows.iter().enumerate() {
                    self.gather(sc, r, bi, i, hh);
                }
                if !self.probs_and_ds(sc, bi, kh, &rows, (j0, j1), BK) {
                    continue;
                }
                let nr = rows.len();
                // dV += Pᵀ · dO ; dK += scale · dSᵀ · Q
                matmul(
                    (bk, dv, nr),
                    &mut sc.acc_b,
                    dv,
                    true,
                    (&sc.p, 1, BK),
                    (&sc.go, dv, 1),
                    1.0,
                );
                matmul(
                    (bk, d, nr),
                    &mut sc.acc_a,
                    d,
                    true,
                    (&sc.dp, 1, BK),
                    (&sc.q, d, 1),
                    ctx.scale,
                );
            }
        }
        let (s, hkv) = (ctx.s, ctx.hkv);
        for j in 0..bk {
            let row = (bi * s + j0 + j) * hkv + kh;
            // SAFETY: key row (bi, j0 + j, kh) of the contiguous (B, S, Hkv, D|Dv) gradients
            // belongs to this item only, and lies inside them.
            unsafe {
                std::slice::from_raw_parts_mut(self.dk.0.add(row * d), d)
                    .copy_from_slice(&sc.acc_a[j * d..(j + 1) * d]);
                std::slice::from_raw_parts_mut(self.dv.0.add(row * dv), dv)
                    .copy_from_slice(&sc.acc_b[j * dv..(j + 1) * dv]);
            }
        }
    }

    /// Pass 2: `dQ` of folded rows `r0..r0 + nr` of KV head `kh`.
    fn q_item(&self, bi: usize, kh: usize, r0: usize, nr: usize, sc: &mut Scratch) {
        let ctx = self.ctx;
        let (d, l, g) = (ctx.d, ctx.l, ctx.g);
        let rows: Vec<(usize, usize, usize)> = (r0..r0 + nr)
            .map(|fr| (fr, fr % l, kh * g + fr / l))
            .collect();
        let (mut k_lo, mut k_hi) = (usize::MAX, 0);
        for (r, &(_, i, hh)) in rows.iter().enumerate() {
            self.gather(sc, r, bi, i, hh);
            let (lo, hi) = self.ranges[bi * l + i];
            if lo < hi {
                k_lo = k_lo.min(lo);
                k_hi = k_hi.max(hi);
            }
        }
        sc.acc_a[..nr * d].fill(0.0);
        let mut tiles = Vec::new();
        if k_lo < k_hi {
            let mut start = k_lo / BKQ * BKQ;
            while start < k_hi {
                tiles.push((start.max(k_lo), (start + BKQ).min(k_hi)));
                start += BKQ;
            }
        }
        for j0 in (ctx.real_s..ctx.s).step_by(BKQ) {
            tiles.push((j0, (j0 + BKQ).min(ctx.s)));
        }
        for (j0, j1) in tiles {
            if !self.probs_and_ds(sc, bi, kh, &rows, (j0, j1), BKQ) {
                continue;
            }
            // dQ += scale · dS · K
            let k0 = ctx.k.at(bi, j0, kh);
            matmul(
                (nr, d, j1 - j0),
                &mut sc.acc_a,
                d,
                true,
                (&sc.dp, BKQ, 1),
                (&ctx.k.data[k0..], ctx.k.strides[1], 1),
                ctx.scale,
            );
        }
        for (r, &(_, i, hh)) in rows.iter().enumerate() {
            let at = ((bi * l + i) * ctx.h + hh) * d;
            // SAFETY: query row (bi, i, hh) of the contiguous (B, L, H, D) gradient belongs to
            // this item only, and lies inside it.
            unsafe {
                std::slice::from_raw_parts_mut(self.dq.0.add(at), d)
                    .copy_from_slice(&sc.acc_a[r * d..(r + 1) * d]);
            }
        }
    }
}
