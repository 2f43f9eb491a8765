//! AVX2 + FMA register-blocked micro-kernels (8 lanes) for the same products as `avx512.rs`:
//! `scale · q · kᵀ` against a transposed K, and `acc += p · v` (or `pᵀ · v`). Blocks of 6 rows ×
//! 16 columns: 12 accumulators, 2 loads and a broadcast fit the 16 `ymm` registers.
#![allow(clippy::needless_range_loop)] // explicit indices name the register block's cells

use std::arch::x86_64::*;

use super::avx512::{EXP, GRAD, SCALED};
use super::mat::{ByteMat, HalfMat, Mat, MatMut, PanelMat};
use super::softmax_x86::exp8;

/// Rows per register block.
const MR: usize = 6;
/// Vectors (of 8 lanes) per register block.
const NV: usize = 2;

/// Lane mask for the first `n` (≤ 8) lanes, as `maskload`/`maskstore` take it.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn lanes(n: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), idx)
}

/// `out[r][c] = scale · Σ_x q[r][x] · kt[x][c]` (`q` is `nr × d` with row stride `q.stride`,
/// `kt` is `d × bk`). Only the `bk` columns of `out` are written.
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn qk(q: Mat, kt: Mat, out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { qk_with::<SCALED>(q, kt, out, scale, (std::ptr::null(), 0, std::ptr::null())) }
}

/// The backward's probabilities in one pass: `out[r][c] = exp(min(0, scale · Σ_x q[r][x] ·
/// kt[x][c] − lse[r]))` ([`exp8`]) for rows that see every key of the tile. Only the `bk`
/// columns of `out` are written.
///
/// # Safety
/// avx2, fma and f16c must be available; `lse` must hold `nr` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn qk_exp(q: Mat, kt: Mat, lse: &[f32], out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { qk_with::<EXP>(q, kt, out, scale, (std::ptr::null(), 0, lse.as_ptr())) }
}

/// The backward's score gradients from `dP = dO · Vᵀ` in one pass: `out[r][c] = (scale ·
/// p[r][c]) · (Σ_x g[r][x] · vt[x][c] − delta[r])` (`p` is `nr × bk`, `delta` has `nr`
/// values). Only the `bk` columns of `out` are written (and read of `p`).
///
/// # Safety
/// avx2, fma and f16c must be available; `p` must be `nr × bk` and `delta` hold `nr` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn qk_grad(g: Mat, vt: Mat, p: Mat, delta: &[f32], out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let grad = (p.data().as_ptr(), p.stride(), delta.as_ptr());
        qk_with::<GRAD>(g, vt, out, scale, grad)
    }
}

/// [`qk`], [`qk_grad`] or [`qk_exp`] by `MODE` (`grad` = (`p`, its row stride, the rows' `Δ`
/// or `lse`), read as the mode needs).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qk_with<const MODE: u8>(
    q: Mat,
    kt: Mat,
    mut out: MatMut,
    scale: f32,
    grad: (*const f32, usize, *const f32),
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (nr, d, bk) = (q.rows(), q.cols(), kt.cols());
        debug_assert!(kt.rows() == d && out.rows() == nr && out.cols() == bk);
        let mut c = 0;
        while c < bk {
            let w = (bk - c).min(8 * NV);
            let masks = [lanes(w), lanes(w.saturating_sub(8))];
            let nb = w.div_ceil(8);
            let kp = (kt.data().as_ptr().add(c), kt.stride());
            let mut r = 0;
            while r < nr {
                let mr = (nr - r).min(MR);
                let qp = (q.data().as_ptr().add(r * q.stride()), q.stride());
                let op = (
                    out.data().as_mut_ptr().add(r * out.stride() + c),
                    out.stride(),
                );
                // The block's probabilities and row values.
                let gp = match MODE {
                    GRAD => (grad.0.add(r * grad.1 + c), grad.1, grad.2.add(r)),
                    EXP => (grad.0, grad.1, grad.2.add(r)),
                    _ => grad,
                };
                let ep = (scale, masks, gp);
                // Whole 16-column blocks load and store without masks.
                macro_rules! go {
                ($($m:literal),*) => {
                    match (mr, nb, w == 8 * NV) {
                        $(($m, 1, _) => qk_block::<$m, 1, false, MODE>(qp, d, kp, op, ep),
                          ($m, _, false) => qk_block::<$m, 2, false, MODE>(qp, d, kp, op, ep),
                          ($m, _, true) => qk_block::<$m, 2, true, MODE>(qp, d, kp, op, ep),)*
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
}

/// One `M × 8N` block of [`qk`] (by `MODE`, of [`qk_grad`] or [`qk_exp`]); the epilogue
/// `(scale, the columns' lane masks, (p, its row stride, the rows' Δ or lse))`, `p` read with
/// `GRAD` only.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qk_block<const M: usize, const N: usize, const FULL: bool, const MODE: u8>(
    (q, qs): (*const f32, usize),
    d: usize,
    (kt, ks): (*const f32, usize),
    (out, os): (*mut f32, usize),
    (scale, masks, (p, ps, delta)): (f32, [__m256i; NV], (*const f32, usize, *const f32)),
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        for dd in 0..d {
            let krow = kt.add(dd * ks);
            let mut kv = [_mm256_setzero_ps(); N];
            for n in 0..N {
                kv[n] = if FULL {
                    _mm256_loadu_ps(krow.add(8 * n))
                } else {
                    _mm256_maskload_ps(krow.add(8 * n), masks[n])
                };
            }
            for r in 0..M {
                let b = _mm256_broadcast_ss(&*q.add(r * qs + dd));
                for n in 0..N {
                    acc[r][n] = _mm256_fmadd_ps(b, kv[n], acc[r][n]);
                }
            }
        }
        let (sv, zero) = (_mm256_set1_ps(scale), _mm256_setzero_ps());
        for r in 0..M {
            let dl = if MODE == SCALED {
                sv
            } else {
                _mm256_set1_ps(*delta.add(r))
            };
            for n in 0..N {
                let x = match MODE {
                    GRAD => {
                        // (scale · p) · (dP − Δ), as the row-by-row step rounds it.
                        let at = p.add(r * ps + 8 * n);
                        let pr = if FULL {
                            _mm256_loadu_ps(at)
                        } else {
                            _mm256_maskload_ps(at, masks[n])
                        };
                        _mm256_mul_ps(_mm256_mul_ps(sv, pr), _mm256_sub_ps(acc[r][n], dl))
                    }
                    // exp(min(0, scale · S − lse)), as `softmax::exp_sub` rounds it.
                    EXP => exp8(_mm256_min_ps(
                        zero,
                        _mm256_sub_ps(_mm256_mul_ps(acc[r][n], sv), dl),
                    )),
                    _ => _mm256_mul_ps(acc[r][n], sv),
                };
                if FULL {
                    _mm256_storeu_ps(out.add(r * os + 8 * n), x);
                } else {
                    _mm256_maskstore_ps(out.add(r * os + 8 * n), masks[n], x);
                }
            }
        }
    }
}

/// `acc += p · v` (`p` is `nr × bk`, `v` is `bk × dv`, `acc` is `nr × dv`).
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pv(p: Mat, v: Mat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { pv_strided::<F32>((p.data(), p.rows(), p.cols(), p.stride(), 1), raw_v(v), acc) }
}

/// [`pv`] with `v` in bf16 or f16, read in place (`v.cols` a multiple of 8).
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pv_half(p: Mat, v: HalfMat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(v.cols().is_multiple_of(8));
        let vp = (
            v.data().as_ptr().cast::<u8>(),
            v.rows(),
            v.cols(),
            v.stride(),
            16,
        );
        let pp = (p.data(), p.rows(), p.cols(), p.stride(), 1);
        if v.is_bf16() {
            pv_strided::<BF16>(pp, vp, acc)
        } else {
            pv_strided::<F16>(pp, vp, acc)
        }
    }
}

/// A matrix as (pointer, rows, cols, row stride in elements).
pub(super) fn raw(m: Mat) -> (*const u8, usize, usize, usize) {
    (m.data().as_ptr().cast(), m.rows(), m.cols(), m.stride())
}

/// A matrix read in place as [`pv_strided`]'s values: [`raw`] and 16 elements from one
/// 16-column slab to the next.
fn raw_v(m: Mat) -> (*const u8, usize, usize, usize, usize) {
    let (p, rows, cols, stride) = raw(m);
    (p, rows, cols, stride, 16)
}

/// Element kinds of the operands the micro-kernels read in place.
pub(super) const F32: u8 = 0;
pub(super) const BF16: u8 = 1;
pub(super) const F16: u8 = 2;
/// Int8 offset by 128 (`u8`).
pub(super) const I8: u8 = 3;
/// fp8 e4m3.
pub(super) const F8: u8 = 4;

/// 8 elements from `p` as f32 lanes: f32 (masked), or bf16 / f16 (whole vectors, widened by a
/// shift / by `vcvtph2ps`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load8<const KIND: u8>(p: *const u8, m: __m256i) -> __m256 {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        match KIND {
            BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast()),
            ))),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
            I8 => _mm256_sub_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()))),
                _mm256_set1_ps(128.0),
            ),
            // e4m3 → f16 bits (see `avx512::load16`), × 2⁸.
            F8 => {
                let x = _mm_cvtepu8_epi16(_mm_loadl_epi64(p.cast()));
                let sign = _mm_slli_epi16::<8>(_mm_and_si128(x, _mm_set1_epi16(0x80)));
                let rest = _mm_slli_epi16::<7>(_mm_and_si128(x, _mm_set1_epi16(0x7f)));
                _mm256_mul_ps(
                    _mm256_cvtph_ps(_mm_or_si128(sign, rest)),
                    _mm256_set1_ps(256.0),
                )
            }
            _ => _mm256_maskload_ps(p.cast(), m),
        }
    }
}

/// Bytes per element of a kind.
pub(super) const fn elem(kind: u8) -> usize {
    match kind {
        F32 => 4,
        I8 | F8 => 1,
        _ => 2,
    }
}

/// [`pv`] with `v` int8 (offset by 128) or fp8 e4m3, read in place (`v.cols` a multiple of 8; the rows'
/// scales are folded into `p` by the caller).
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pv_bytes(p: Mat, v: ByteMat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(v.cols().is_multiple_of(8));
        let vp = (v.data().as_ptr(), v.rows(), v.cols(), v.stride(), 16);
        let pp = (p.data(), p.rows(), p.cols(), p.stride(), 1);
        if v.is_fp8() {
            pv_strided::<F8>(pp, vp, acc)
        } else {
            pv_strided::<I8>(pp, vp, acc)
        }
    }
}

/// [`pv`] with `v` stored as panels of 16 columns (f32, bf16 or f16; `panels.rs`).
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pv_panel(p: Mat, v: PanelMat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract; whole vectors of a panel
    // lie in it (its padding columns included, `PanelMat`'s check).
    unsafe {
        let vp = (v.data().as_ptr(), v.rows(), v.cols(), 16, v.slab());
        let pp = (p.data(), p.rows(), p.cols(), p.stride(), 1);
        match v.half_kind() {
            None => pv_strided::<F32>(pp, vp, acc),
            Some(true) => pv_strided::<BF16>(pp, vp, acc),
            Some(false) => pv_strided::<F16>(pp, vp, acc),
        }
    }
}

/// `acc += pᵀ · v` for `p` stored `k × m` (row stride `p.stride`), without a transposed copy.
///
/// A block of [`MR`] output rows at a time, all its columns before the next. The block's rows
/// of `pᵀ` are a strip of columns of the backward's score tile (64 × 256 f32, larger than L1),
/// read once per block this way instead of once per block and 16 columns; `v` (64 rows of `dO`
/// or `Q`) stays in L1 either way. Measured on AMD Zen 3 (a 256 × 64 × 64 product alone):
/// 66% → 70% of the FMA peak.
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pv_t(p: Mat, v: Mat, mut acc: MatMut) {
    let (m, k, st) = (p.cols(), p.rows(), acc.stride());
    let mut r = 0;
    while r < m {
        let mr = (m - r).min(MR);
        let block = MatMut::new(&mut acc.data()[r * st..], mr, v.cols(), st);
        // SAFETY: the caller upholds this function's `# Safety` contract; element (x, j) of
        // the block's `pᵀ` is `p.data()[r + x + j · stride]`, inside `p` (x < mr ≤ m − r).
        unsafe { pv_strided::<F32>((&p.data()[r..], mr, k, 1, p.stride()), raw_v(v), block) }
        r += mr;
    }
}

/// `acc += P · v` where `P` is `m × k` with element `(r, j)` at `data[r·rs + j·cs]` and `v`'s
/// element `(j, c)` at element `(c / 16) · slab + c % 16 + j · v_stride` of `v`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_strided<const KIND: u8>(
    (data, nr, bk, prs, pcs): (&[f32], usize, usize, usize, usize),
    (v, v_rows, dv, v_stride, slab): (*const u8, usize, usize, usize, usize),
    mut acc: MatMut,
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        debug_assert!(v_rows == bk && acc.rows() == nr && acc.cols() == dv);
        debug_assert!(nr == 0 || bk == 0 || (nr - 1) * prs + (bk - 1) * pcs < data.len());
        let mut c = 0;
        while c < dv {
            let w = (dv - c).min(8 * NV);
            let masks = [lanes(w), lanes(w.saturating_sub(8))];
            let nb = w.div_ceil(8);
            // Columns `c..c + 16`: in place `c` elements on, in panels `c / 16` panels on.
            let vp = (v.add(c / 16 * slab * elem(KIND)), v_stride);
            let mut r = 0;
            while r < nr {
                let mr = (nr - r).min(MR);
                let pp = (data.as_ptr().add(r * prs), prs, pcs);
                let op = (
                    acc.data().as_mut_ptr().add(r * acc.stride() + c),
                    acc.stride(),
                );
                // Whole 16-column blocks load without masks (two registers fewer).
                macro_rules! go {
                ($($m:literal),*) => {
                    match (mr, nb, w == 8 * NV) {
                        $(($m, 1, _) => pv_block::<$m, 1, KIND, false>(pp, bk, vp, op, masks),
                          ($m, _, false) => pv_block::<$m, 2, KIND, false>(pp, bk, vp, op, masks),
                          ($m, _, true) => pv_block::<$m, 2, KIND, true>(pp, bk, vp, op, masks),)*
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
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_block<const M: usize, const N: usize, const KIND: u8, const FULL: bool>(
    (p, prs, pcs): (*const f32, usize, usize),
    bk: usize,
    (v, vs): (*const u8, usize),
    (out, os): (*mut f32, usize),
    masks: [__m256i; NV],
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let load = |at: *const f32, n: usize| {
            if FULL {
                _mm256_loadu_ps(at)
            } else {
                _mm256_maskload_ps(at, masks[n])
            }
        };
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        for r in 0..M {
            for n in 0..N {
                acc[r][n] = load(out.add(r * os + 8 * n), n);
            }
        }
        // Element (r, j) of P at `pj + r·prs`, `pj` stepping through the columns.
        let mut pj = p;
        let mut vrow = v;
        for j in 0..bk {
            if j % 8 == 7 {
                super::stream::step();
            }
            let mut vv = [_mm256_setzero_ps(); N];
            for n in 0..N {
                let at = vrow.add(8 * n * elem(KIND));
                vv[n] = if KIND != F32 || !FULL {
                    load8::<KIND>(at, masks[n])
                } else {
                    _mm256_loadu_ps(at.cast())
                };
            }
            for r in 0..M {
                let b = _mm256_broadcast_ss(&*pj.add(r * prs));
                for n in 0..N {
                    acc[r][n] = _mm256_fmadd_ps(b, vv[n], acc[r][n]);
                }
            }
            pj = pj.add(pcs);
            vrow = vrow.add(vs * elem(KIND));
        }
        for r in 0..M {
            for n in 0..N {
                if FULL {
                    _mm256_storeu_ps(out.add(r * os + 8 * n), acc[r][n]);
                } else {
                    _mm256_maskstore_ps(out.add(r * os + 8 * n), masks[n], acc[r][n]);
                }
            }
        }
    }
}
