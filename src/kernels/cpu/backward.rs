//! The fused backward, FlashAttention-2 style: from `q`, `k`, `v`, the output `o`, its gradient
//! `dO` and the per-row log-sum-exp saved by the forward, recompute each score tile and
//! accumulate `dV = Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − Δ)` with `Δᵢ = dOᵢ·oᵢ`, `dK = scale·dSᵀ·Q` and
//! `dQ = scale·dS·K`, in f32, without materialising anything of size `L × S`.
//!
//! One parallel pass over work items `(batch, KV head, tile of` [`BK`] `keys)`: an item owns
//! the `dK` and `dV` rows of its keys, summed over every query row of every query head sharing
//! the KV head (GQA) that may see them (query rows in blocks of [`BQ`]). Its `dQ` contributions
//! go to the running thread's own `(B, L, H, D)` accumulator (one per worker thread, summed at
//! the end), so no two threads write the same memory and nothing is recomputed.
//!
//! The five products per (query block, key tile) use the AVX-512 micro-kernels of the forward
//! where the CPU has them (`Q·Kᵀ` and `dO·Vᵀ` against transposed copies of K and V made once;
//! `Pᵀ·dO` and `dSᵀ·Q` reading the score tile transposed, `dS·K` directly), and the `gemm`
//! crate elsewhere. Query rows, their output gradients and their `dQ` rows are read and written
//! in place (in the projections' own layout) whenever a block's rows are consecutive. The masks are applied exactly as in the forward ([`Ctx::mask_row`]: the same
//! structured ranges, key padding and bias; keys after `kv_len` never masked), so a fully
//! masked row has `P = 0` and contributes nothing.

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::mat::{Mat, MatMut};
use super::portable::matmul;
use super::products::{self, Isa};
use super::softmax::exp_sub;
use super::tile::{Ctx, Data, OutBuf, OutPtr, View};
use super::{cpu_f32, f32_rows, strides3, transpose_heads, AttnCall, Inputs, MAX_HEAD_DIM};

/// Query rows per block.
pub const BQ: usize = 64;
/// Keys per work item.
pub const BK: usize = 128;

struct Scratch {
    q: Vec<f32>,
    go: Vec<f32>,
    /// `P` (`BQ × BK`).
    p: Vec<f32>,
    /// `dP`, then `scale · dS` (`BQ × BK`).
    ds: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dq: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        q: vec![0.0; BQ * MAX_HEAD_DIM],
        go: vec![0.0; BQ * MAX_HEAD_DIM],
        p: vec![0.0; BQ * BK],
        ds: vec![0.0; BQ * BK],
        dk: vec![0.0; BK * MAX_HEAD_DIM],
        dv: vec![0.0; BK * MAX_HEAD_DIM],
        dq: vec![0.0; BQ * MAX_HEAD_DIM],
    });
}

/// What the pass reads besides the forward's context.
struct Bwd<'a> {
    ctx: &'a Ctx<'a>,
    /// The gradient of the output, `(B, L, H, Dv)`.
    go: View<'a>,
    /// The f32 elements of `q`, `k`, `v` (the backward reads f32 inputs) and of `go`.
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    go_s: &'a [f32],
    /// `(B, H, L)`.
    lse: &'a [f32],
    delta: &'a [f32],
    /// Structured visible key range of every query row `(b, i)`.
    ranges: &'a [(usize, usize)],
    /// Kᵀ `(B, Hkv, D, S)` and Vᵀ `(B, Hkv, Dv, S)` for the AVX-512 products.
    kt: Option<&'a [f32]>,
    vt: Option<&'a [f32]>,
    dk: OutPtr,
    dv: OutPtr,
}

// SAFETY: `dk` / `dv` are written at key rows owned by one work item each (see `item`), and the
// buffers outlive the parallel loop.
unsafe impl Sync for Bwd<'_> {}

/// The f32 elements of a view (the backward converts its inputs to f32 first).
fn f32_of<'a>(v: &View<'a>) -> Result<&'a [f32]> {
    match v.f32s() {
        Some(s) => Ok(s),
        None => candle_core::bail!("fused attention backward: expected f32 inputs"),
    }
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
    let inputs = Inputs::new(c, false)?;
    let (o, go) = (f32_rows(out)?, f32_rows(grad)?);
    let (og, _) = o.storage_and_layout();
    let (gg, _) = go.storage_and_layout();
    let (o_s, go_s) = (cpu_f32(&og, &o)?, cpu_f32(&gg, &go)?);
    let ov = View {
        data: Data::F32(o_s),
        strides: strides3(&o),
    };
    let gov = View {
        data: Data::F32(go_s),
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
                *x = o_s[a..a + dv]
                    .iter()
                    .zip(&go_s[g..g + dv])
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
    let mut dk = vec![0f32; b * s * hkv * d];
    let mut dvv = vec![0f32; b * s * hkv * dv];
    let (dk_p, dv_p) = (OutPtr(dk.as_mut_ptr()), OutPtr(dvv.as_mut_ptr()));
    let threads = rayon::current_num_threads().max(1);
    let dq_parts: Vec<Mutex<Vec<f32>>> = (0..threads).map(|_| Mutex::new(Vec::new())).collect();
    let unused = OutBuf::F32(std::ptr::null_mut());
    inputs.with_ctx(c, false, unused, None, |ctx| -> Result<()> {
        let (kt, vt) = if ctx.isa != Isa::Portable {
            (
                Some(transpose_heads(&ctx.k, b, hkv, s, d)),
                Some(transpose_heads(&ctx.v, b, hkv, s, dv)),
            )
        } else {
            (None, None)
        };
        let bw = Bwd {
            ctx,
            go: View {
                data: gov.data,
                strides: gov.strides,
            },
            q: f32_of(&ctx.q)?,
            k: f32_of(&ctx.k)?,
            v: f32_of(&ctx.v)?,
            go_s,
            lse,
            delta: &delta,
            ranges: &ranges,
            kt: kt.as_deref(),
            vt: vt.as_deref(),
            dk: dk_p,
            dv: dv_p,
        };
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
            let slot = rayon::current_thread_index().unwrap_or(0) % threads;
            // Uncontended: a worker only takes its own slot.
            let mut dq = dq_parts[slot].lock().unwrap_or_else(|e| e.into_inner());
            if dq.is_empty() {
                dq.resize(b * l * h * d, 0.0);
            }
            SCRATCH.with(|sc| bw.item(bi, kh, (j0, j1), &mut dq, &mut sc.borrow_mut()))
        });
        Ok(())
    })??;
    drop((og, gg));
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
    let dev = c.q.device();
    Ok((
        Tensor::from_vec(dq, (b, l, h, d), dev)?.to_dtype(c.q.dtype())?,
        Tensor::from_vec(dk, (b, s, hkv, d), dev)?.to_dtype(c.k.dtype())?,
        Tensor::from_vec(dvv, (b, s, hkv, dv), dev)?.to_dtype(c.v.dtype())?,
    ))
}

impl Bwd<'_> {
    /// `out (nr × bk, row stride BK) = scale · a · Xᵀ` for `a` (`nr × w`, contiguous rows) and
    /// the key rows `j0..j0 + bk` of `x` (K or V of KV head `kh`, with its transposed copy on
    /// AVX-512): through the micro-kernel on AVX-512, in place through `gemm` elsewhere.
    fn times_keys_t(
        &self,
        a: Mat,
        x: (&View, Option<&[f32]>, &[f32]),
        (bi, kh, j0, bk): (usize, usize, usize, usize),
        out: &mut [f32],
        scale: f32,
    ) {
        let (nr, w) = (a.rows, a.cols);
        match x.1 {
            Some(xt) => {
                let s = super::kt::kt_stride(self.ctx.s);
                let base = (bi * self.ctx.hkv + kh) * w * s;
                let xt = Mat::new(&xt[base + j0..base + w * s], w, bk, s);
                // The output rows hold BK >= round_up(bk, 16) columns.
                let o = MatMut::new(&mut out[..nr * BK], nr, bk, BK);
                products::qk_t(self.ctx.isa, a, xt, o, scale);
            }
            None => {
                let v = x.0;
                let at = v.at(bi, j0, kh);
                matmul(
                    (nr, bk, w),
                    out,
                    BK,
                    false,
                    (a.data, a.stride, 1),
                    (&x.2[at..], 1, v.strides[1]),
                    scale,
                );
            }
        }
    }

    /// `acc += p · v` (`transposed`: `acc += pᵀ · v`, `p` stored `k × m`).
    fn accumulate(&self, p: Mat, transposed: bool, v: Mat, acc: MatMut) {
        if transposed {
            products::pv_t(self.ctx.isa, p, v, acc)
        } else {
            products::pv(self.ctx.isa, p, v, acc)
        }
    }

    /// One work item: `dK`, `dV` of keys `j0..j1` of KV head `kh` in batch `bi`, and their `dQ`
    /// contributions added to `dq` (`(B, L, H, D)`).
    fn item(
        &self,
        bi: usize,
        kh: usize,
        (j0, j1): (usize, usize),
        dq: &mut [f32],
        sc: &mut Scratch,
    ) {
        let ctx = self.ctx;
        let (d, dv, l, g, h, bk) = (ctx.d, ctx.dv, ctx.l, ctx.g, ctx.h, j1 - j0);
        sc.dk[..bk * d].fill(0.0);
        sc.dv[..bk * dv].fill(0.0);
        let masked = j0 < ctx.real_s && ctx.masked;
        let (k0, kst) = (ctx.k.at(bi, j0, kh), ctx.k.strides[1]);
        let mut rows: Vec<(usize, usize)> = Vec::with_capacity(BQ);
        for gg in 0..g {
            let hh = kh * g + gg;
            let stats = (bi * h + hh) * l;
            for i0 in (0..l).step_by(BQ) {
                rows.clear();
                for i in i0..(i0 + BQ).min(l) {
                    let (lo, hi) = self.ranges[bi * l + i];
                    let sees = !masked || (lo < hi && lo < j1 && hi > j0);
                    if sees && self.lse[stats + i] != f32::NEG_INFINITY {
                        rows.push((gg * l + i, i));
                    }
                }
                let nr = rows.len();
                if nr == 0 {
                    continue;
                }
                // Consecutive queries are read (and their dQ written) in place; others are
                // gathered into the scratch.
                let first = rows[0].1;
                let in_place = rows[nr - 1].1 - first + 1 == nr;
                let (q, go) = if in_place {
                    let (qa, ga) = (ctx.q.at(bi, first, hh), self.go.at(bi, first, hh));
                    let (qs, gs) = (ctx.q.strides[1], self.go.strides[1]);
                    (
                        Mat::new(&self.q[qa..], nr, d, qs),
                        Mat::new(&self.go_s[ga..], nr, dv, gs),
                    )
                } else {
                    for (r, &(_, i)) in rows.iter().enumerate() {
                        let at = ctx.q.at(bi, i, hh);
                        sc.q[r * d..(r + 1) * d].copy_from_slice(&self.q[at..at + d]);
                        let at = self.go.at(bi, i, hh);
                        sc.go[r * dv..(r + 1) * dv].copy_from_slice(&self.go_s[at..at + dv]);
                    }
                    (Mat::new(&sc.q, nr, d, d), Mat::new(&sc.go, nr, dv, dv))
                };
                // P = exp(scale · Q · Kᵀ + masks − lse)
                let tile = (bi, kh, j0, bk);
                self.times_keys_t(q, (&ctx.k, self.kt, self.k), tile, &mut sc.p, ctx.scale);
                let mut any = false;
                for (r, &(fr, i)) in rows.iter().enumerate() {
                    let row = &mut sc.p[r * BK..r * BK + bk];
                    if masked && !ctx.mask_row(bi, kh, fr, self.ranges[bi * l + i], j0, row) {
                        row.fill(0.0);
                        continue;
                    }
                    exp_sub(ctx.isa, row, self.lse[stats + i]);
                    any = true;
                }
                if !any {
                    continue;
                }
                // scale · dS = scale · P ∘ (dO · Vᵀ − Δ)
                self.times_keys_t(go, (&ctx.v, self.vt, self.v), tile, &mut sc.ds, 1.0);
                let scale = ctx.scale;
                for (r, &(_, i)) in rows.iter().enumerate() {
                    let delta = self.delta[stats + i];
                    let p = &sc.p[r * BK..r * BK + bk];
                    let ds = &mut sc.ds[r * BK..r * BK + bk];
                    ds.iter_mut()
                        .zip(p)
                        .for_each(|(x, &pp)| *x = scale * pp * (*x - delta));
                }
                // dV += Pᵀ · dO ; dK += (scale · dS)ᵀ · Q
                let p = Mat::new(&sc.p, nr, bk, BK);
                self.accumulate(p, true, go, MatMut::new(&mut sc.dv, bk, dv, dv));
                let ds = Mat::new(&sc.ds, nr, bk, BK);
                self.accumulate(ds, true, q, MatMut::new(&mut sc.dk, bk, d, d));
                // dQ += (scale · dS) · K
                let k = Mat::new(&self.k[k0..], bk, d, kst);
                if in_place {
                    let at = ((bi * l + first) * h + hh) * d;
                    self.accumulate(ds, false, k, MatMut::new(&mut dq[at..], nr, d, h * d));
                } else {
                    sc.dq[..nr * d].fill(0.0);
                    self.accumulate(ds, false, k, MatMut::new(&mut sc.dq, nr, d, d));
                    for (r, &(_, i)) in rows.iter().enumerate() {
                        let at = ((bi * l + i) * h + hh) * d;
                        dq[at..at + d]
                            .iter_mut()
                            .zip(&sc.dq[r * d..(r + 1) * d])
                            .for_each(|(a, x)| *a += x);
                    }
                }
            }
        }
        let (s, hkv) = (ctx.s, ctx.hkv);
        for j in 0..bk {
            let row = (bi * s + j0 + j) * hkv + kh;
            // SAFETY: key row (bi, j0 + j, kh) of the contiguous (B, S, Hkv, D|Dv) gradients
            // belongs to this item only, and lies inside them.
            unsafe {
                std::slice::from_raw_parts_mut(self.dk.0.add(row * d), d)
                    .copy_from_slice(&sc.dk[j * d..(j + 1) * d]);
                std::slice::from_raw_parts_mut(self.dv.0.add(row * dv), dv)
                    .copy_from_slice(&sc.dv[j * dv..(j + 1) * dv]);
            }
        }
    }
}
