//! AVX-512 register-blocked micro-kernels for the two products of a tile.
#![allow(clippy::needless_range_loop)] // explicit indices name the register block's cells

use std::arch::x86_64::*;

use super::mat::{ByteMat, HalfMat, Mat, MatMut};
use super::softmax_x86::exp16;

/// Rows per register block (here and in `avx512_bf16.rs`).
pub(super) const MR: usize = 6;

/// The mask of lanes `0..n` of a 16-lane vector (all of them from 16 on).
pub(super) fn tail_mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// `out[r][c] = scale · Σ_x q[r][x] · kt[x][c]` for `r < q.rows`, `c < kt.cols` (`q` is
/// `nr × d`, `kt` is `d × bk`: kᵀ, columns = keys). Whole 16-lane vectors are stored: columns
/// `bk..round_up(bk, 16)` of `out` are overwritten too (callers read `..bk`).
///
/// # Safety
/// avx512f must be available, and `out` must hold `round_up(bk, 16)` columns in every row.
#[target_feature(enable = "avx512f")]
pub unsafe fn qk(q: Mat, kt: Mat, out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { qk_with::<SCALED>(q, kt, out, scale, (std::ptr::null(), 0, std::ptr::null())) }
}

/// What a score block's epilogue stores (here and in `avx2.rs`): `scale · sums` ([`qk`]), the
/// backward's `dS` ([`qk_grad`]) or its probabilities ([`qk_exp`]).
pub(super) const SCALED: u8 = 0;
pub(super) const GRAD: u8 = 1;
pub(super) const EXP: u8 = 2;

/// The backward's probabilities in one pass: `out[r][c] = exp(min(0, scale · Σ_x q[r][x] ·
/// kt[x][c] − lse[r]))` (the exponential of `softmax::exp_sub`, [`exp16`]) for rows that see
/// every key of the tile. Whole vectors as in [`qk`].
///
/// # Safety
/// avx512f must be available; `out` must hold `round_up(bk, 16)` columns in every row, and
/// `lse` `nr` values.
#[target_feature(enable = "avx512f")]
pub unsafe fn qk_exp(q: Mat, kt: Mat, lse: &[f32], out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { qk_with::<EXP>(q, kt, out, scale, (std::ptr::null(), 0, lse.as_ptr())) }
}

/// The backward's score gradients from `dP = dO · Vᵀ` in one pass: `out[r][c] = (scale ·
/// p[r][c]) · (Σ_x g[r][x] · vt[x][c] − delta[r])` (`g` is `nr × dv`, `vt` is `dv × bk`, `p` is
/// `nr × bk` with `out`'s row stride, `delta` has `nr` values). Whole vectors as in [`qk`].
///
/// # Safety
/// avx512f must be available; `out` and `p` must hold `round_up(bk, 16)` columns in every row,
/// with one row stride, and `delta` `nr` values.
#[target_feature(enable = "avx512f")]
pub unsafe fn qk_grad(g: Mat, vt: Mat, p: Mat, delta: &[f32], out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let grad = (p.data().as_ptr(), p.stride(), delta.as_ptr());
        qk_with::<GRAD>(g, vt, out, scale, grad)
    }
}

/// [`qk`], [`qk_grad`] or [`qk_exp`] by `MODE` (`grad` = (`p`, its row stride, the rows' `Δ`
/// or `lse`), read as the mode needs).
#[target_feature(enable = "avx512f")]
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
        debug_assert!(
            nr == 0 || out.data().len() >= (nr - 1) * out.stride() + bk.div_ceil(16) * 16
        );
        score_blocks(nr, bk, |r, mr, c, nb, masks| {
            let kp = (kt.data().as_ptr().add(16 * c), kt.stride());
            let qp = (q.data().as_ptr().add(r * q.stride()), q.stride());
            let op = (
                out.data().as_mut_ptr().add(r * out.stride() + 16 * c),
                out.stride(),
            );
            // The block's probabilities and row values.
            let gp = match MODE {
                GRAD => (grad.0.add(r * grad.1 + 16 * c), grad.1, grad.2.add(r)),
                EXP => (grad.0, grad.1, grad.2.add(r)),
                _ => grad,
            };
            let ep = (scale, masks, gp);
            macro_rules! go {
            ($($m:literal),*) => {
                match (mr, nb) {
                    $(($m, 1) => qk_block::<$m, 1, MODE>(qp, d, kp, op, ep),
                      ($m, 2) => qk_block::<$m, 2, MODE>(qp, d, kp, op, ep),
                      ($m, 3) => qk_block::<$m, 3, MODE>(qp, d, kp, op, ep),
                      ($m, _) => qk_block::<$m, 4, MODE>(qp, d, kp, op, ep),)*
                    _ => unreachable!(),
                }
            };
        }
            go!(1, 2, 3, 4, 5, 6);
        });
    }
}

/// The register blocks of an `nr × bk` score tile (`Q · Kᵀ` against a transposed K, here and in
/// `avx512_bf16.rs`): column blocks of up to 4 vectors (64 keys: 6 × 4 accumulators, 10 loads per
/// 24 products) with their lanes' masks, each cut into blocks of up to [`MR`] rows;
/// `block(r, mr, c, nb, masks)` computes rows `r..r + mr` × vectors `c..c + nb`.
pub(super) fn score_blocks(
    nr: usize,
    bk: usize,
    mut block: impl FnMut(usize, usize, usize, usize, [u16; 4]),
) {
    let nv = bk.div_ceil(16);
    let mut c = 0;
    while c < nv {
        let nb = (nv - c).min(4);
        let mut masks = [0u16; 4];
        for (n, m) in masks.iter_mut().enumerate().take(nb) {
            *m = tail_mask(bk - 16 * (c + n));
        }
        let mut r = 0;
        while r < nr {
            let mr = (nr - r).min(MR);
            block(r, mr, c, nb, masks);
            r += mr;
        }
        c += nb;
    }
}

/// One `M × 16N` block of [`qk`] (by `MODE`, of [`qk_grad`] or [`qk_exp`]): `q`, `kt` and `out`
/// are (pointer, row stride), `d` the depth; the epilogue `(scale, the columns' lane masks, (p,
/// its row stride, the rows' Δ or lse))`, `p` read with `GRAD` only.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn qk_block<const M: usize, const N: usize, const MODE: u8>(
    (q, qs): (*const f32, usize),
    d: usize,
    (kt, s): (*const f32, usize),
    (out, out_stride): (*mut f32, usize),
    (scale, masks, (p, ps, delta)): (f32, [u16; 4], (*const f32, usize, *const f32)),
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        for dd in 0..d {
            let krow = kt.add(dd * s);
            let mut kv = [_mm512_setzero_ps(); N];
            for n in 0..N {
                kv[n] = _mm512_maskz_loadu_ps(masks[n], krow.add(16 * n));
            }
            for r in 0..M {
                let b = _mm512_set1_ps(*q.add(r * qs + dd));
                for n in 0..N {
                    acc[r][n] = _mm512_fmadd_ps(b, kv[n], acc[r][n]);
                }
            }
        }
        let (sv, zero) = (_mm512_set1_ps(scale), _mm512_setzero_ps());
        for r in 0..M {
            let dl = if MODE == SCALED {
                sv
            } else {
                _mm512_set1_ps(*delta.add(r))
            };
            for n in 0..N {
                let x = match MODE {
                    GRAD => {
                        // (scale · p) · (dP − Δ), as the row-by-row step rounds it.
                        let pr = _mm512_loadu_ps(p.add(r * ps + 16 * n));
                        _mm512_mul_ps(_mm512_mul_ps(sv, pr), _mm512_sub_ps(acc[r][n], dl))
                    }
                    // exp(min(0, scale · S − lse)), as `softmax::exp_sub` rounds it.
                    EXP => exp16(_mm512_min_ps(
                        zero,
                        _mm512_sub_ps(_mm512_mul_ps(acc[r][n], sv), dl),
                    )),
                    _ => _mm512_mul_ps(acc[r][n], sv),
                };
                _mm512_storeu_ps(out.add(r * out_stride + 16 * n), x);
            }
        }
    }
}

/// Element kinds the micro-kernels read: f32, bf16, f16 (the last two widened in registers).
const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;
/// Int8 offset by 128 (`u8`).
const I8: u8 = 3;
/// fp8 e4m3.
const F8: u8 = 4;
/// The bytes of int8 offset by 128 as they are (`0..=255`, the offset taken off by the caller).
const U8: u8 = 5;

/// 16 elements of kind `K` from `p` as f32 lanes: masked for f32; whole vectors for the half
/// and int8 kinds (their callers take only multiples of 16 columns).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<const K: u8>(p: *const u8, m: u16) -> __m512 {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        match K {
            F32 => _mm512_maskz_loadu_ps(m, p.cast()),
            BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p.cast()),
            ))),
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            I8 => _mm512_sub_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()))),
                _mm512_set1_ps(128.0),
            ),
            U8 => _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast()))),
            // e4m3 → the f16 with the same sign, exponent and mantissa bits shifted into place
            // (bias 15 for 7: × 2⁸ after; subnormals map to f16 subnormals), as `view::fp8_e4m3`.
            _ => {
                let x = _mm256_cvtepu8_epi16(_mm_loadu_si128(p.cast()));
                let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(x, _mm256_set1_epi16(0x80)));
                let rest = _mm256_slli_epi16::<7>(_mm256_and_si256(x, _mm256_set1_epi16(0x7f)));
                _mm512_mul_ps(
                    _mm512_cvtph_ps(_mm256_or_si256(sign, rest)),
                    _mm512_set1_ps(256.0),
                )
            }
        }
    }
}

/// Bytes per element of kind `K`.
const fn size_of_kind(k: u8) -> usize {
    match k {
        F32 => 4,
        I8 | F8 | U8 => 1,
        _ => 2,
    }
}

/// [`pv`] with `v` int8 (offset by 128) or fp8 e4m3, read in place (`v.cols` a multiple of 16; the rows'
/// scales are folded into `p` by the caller).
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn pv_bytes(p: Mat, v: ByteMat, mut acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(v.cols().is_multiple_of(16));
        let vp = (v.data().as_ptr(), v.rows(), v.cols(), v.stride());
        let pp = (p.data(), p.rows(), p.cols(), p.stride(), 1);
        if v.is_fp8() {
            pv_strided::<F8>(pp, vp, acc)
        } else {
            // Σ_j p_j · (u_j − 128) = Σ_j p_j · u_j − 128 · Σ_j p_j: the offset leaves the inner
            // loop (one instruction fewer per 16 values) and is taken off each row once.
            for r in 0..p.rows() {
                let row = p.data().as_ptr().add(r * p.stride());
                let mut s = _mm512_setzero_ps();
                for c in (0..p.cols()).step_by(16) {
                    s = _mm512_add_ps(
                        s,
                        _mm512_maskz_loadu_ps(tail_mask(p.cols() - c), row.add(c)),
                    );
                }
                let off = 128.0 * _mm512_reduce_add_ps(s);
                let (st, cols) = (acc.stride(), acc.cols());
                let row = &mut acc.data()[r * st..r * st + cols];
                row.iter_mut().for_each(|x| *x -= off);
            }
            pv_strided::<U8>(pp, vp, acc)
        }
    }
}

/// [`qk_rows`] with `k` int8 (offset by 128) or fp8 e4m3, read in place (`k.cols` a multiple of 16; the
/// rows' scales are applied to `out` by the caller).
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn qk_rows_bytes(q: Mat, k: ByteMat, out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(k.cols().is_multiple_of(16));
        let kp = (k.data().as_ptr(), k.rows(), k.cols(), k.stride());
        if k.is_fp8() {
            qk_rows_kind::<F8>(q, kp, out, scale)
        } else {
            qk_rows_kind::<I8>(q, kp, out, scale)
        }
    }
}

/// [`pv`] with `v` in bf16 / f16, read in place (`v.cols` a multiple of 16).
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn pv_half(p: Mat, v: HalfMat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(v.cols().is_multiple_of(16));
        let vp = (
            v.data().as_ptr().cast::<u8>(),
            v.rows(),
            v.cols(),
            v.stride(),
        );
        let pp = (p.data(), p.rows(), p.cols(), p.stride(), 1);
        if v.is_bf16() {
            pv_strided::<BF16>(pp, vp, acc)
        } else {
            pv_strided::<F16>(pp, vp, acc)
        }
    }
}

/// [`qk_rows`] with `k` in bf16 / f16, read in place (`k.cols` a multiple of 16).
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn qk_rows_half(q: Mat, k: HalfMat, out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(k.cols().is_multiple_of(16));
        let kp = (
            k.data().as_ptr().cast::<u8>(),
            k.rows(),
            k.cols(),
            k.stride(),
        );
        if k.is_bf16() {
            qk_rows_kind::<BF16>(q, kp, out, scale)
        } else {
            qk_rows_kind::<F16>(q, kp, out, scale)
        }
    }
}

/// `acc[r][c] += Σ_{j < bk} p[r][j] · v[j][c]` for `r < p.rows`, `c < v.cols` (`p` is
/// `nr × bk`, `v` is `bk × dv`, `acc` is `nr × dv`).
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn pv(p: Mat, v: Mat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { pv_strided::<F32>((p.data(), p.rows(), p.cols(), p.stride(), 1), raw(v), acc) }
}

/// A matrix as (pointer, rows, cols, row stride in elements).
fn raw(m: Mat) -> (*const u8, usize, usize, usize) {
    (m.data().as_ptr().cast(), m.rows(), m.cols(), m.stride())
}

/// `acc[r][c] += Σ_j p[j][r] · v[j][c]`: [`pv`] with `p` transposed (`p` is stored `k × m`,
/// row stride `p.stride`; the product is `pᵀ · v`, `m × n`). No transposed copy of `p` is made.
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn pv_t(p: Mat, v: Mat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { pv_strided::<F32>((p.data(), p.cols(), p.rows(), 1, p.stride()), raw(v), acc) }
}

/// `acc += P · v` where `P` is `m × k` with element `(r, j)` at `data[r·rs + j·cs]`.
#[target_feature(enable = "avx512f")]
unsafe fn pv_strided<const K: u8>(
    (data, nr, bk, prs, pcs): (&[f32], usize, usize, usize, usize),
    (v, v_rows, dv, v_stride): (*const u8, usize, usize, usize),
    mut acc: MatMut,
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        debug_assert!(v_rows == bk && acc.rows() == nr && acc.cols() == dv);
        debug_assert!(nr == 0 || bk == 0 || (nr - 1) * prs + (bk - 1) * pcs < data.len());
        let mut c = 0;
        while c < dv {
            let w = (dv - c).min(64);
            let nb = w.div_ceil(16);
            let mut masks = [0u16; 4];
            for (n, m) in masks.iter_mut().enumerate().take(nb) {
                *m = tail_mask(w - 16 * n);
            }
            let vp = (v.add(c * size_of_kind(K)), v_stride);
            let mut r = 0;
            while r < nr {
                let mr = (nr - r).min(MR);
                let pp = (data.as_ptr().add(r * prs), prs, pcs);
                let op = (
                    acc.data().as_mut_ptr().add(r * acc.stride() + c),
                    acc.stride(),
                );
                macro_rules! go {
                ($($m:literal),*) => {
                    match (mr, nb) {
                        $(($m, 1) => pv_block::<$m, 1, K>(pp, bk, vp, op, masks),
                          ($m, 2) => pv_block::<$m, 2, K>(pp, bk, vp, op, masks),
                          ($m, 3) => pv_block::<$m, 3, K>(pp, bk, vp, op, masks),
                          ($m, _) => pv_block::<$m, 4, K>(pp, bk, vp, op, masks),)*
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

/// One `M × 16N` block of [`pv`]: `p` is (pointer, row stride, column stride), `v` and `out`
/// are (pointer, row stride).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pv_block<const M: usize, const N: usize, const K: u8>(
    (p, p_stride, p_cs): (*const f32, usize, usize),
    bk: usize,
    (v, v_stride): (*const u8, usize),
    (out, out_stride): (*mut f32, usize),
    masks: [u16; 4],
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        for r in 0..M {
            for n in 0..N {
                acc[r][n] = _mm512_maskz_loadu_ps(masks[n], out.add(r * out_stride + 16 * n));
            }
        }
        for j in 0..bk {
            if j % 8 == 7 {
                super::stream::step();
            }
            let vrow = v.add(j * v_stride * size_of_kind(K));
            let mut vv = [_mm512_setzero_ps(); N];
            for n in 0..N {
                vv[n] = load16::<K>(vrow.add(16 * n * size_of_kind(K)), masks[n]);
            }
            for r in 0..M {
                let b = _mm512_set1_ps(*p.add(r * p_stride + j * p_cs));
                for n in 0..N {
                    acc[r][n] = _mm512_fmadd_ps(b, vv[n], acc[r][n]);
                }
            }
        }
        for r in 0..M {
            for n in 0..N {
                _mm512_mask_storeu_ps(out.add(r * out_stride + 16 * n), masks[n], acc[r][n]);
            }
        }
    }
}

/// The horizontal sums of 16 vectors in one: lane `4·jj + rr` holds the sum of `acc[rr][jj]`'s
/// lanes. A tree of 4 levels (halving the lanes summed, doubling the vectors packed), 45
/// shuffles and adds instead of 16 separate reductions (about 160).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn reduce16(acc: &[[__m512; 4]; 4]) -> __m512 {
    let x = |i: usize| acc[i / 4][i % 4];
    // 16 → 8: [a.lo256 + a.hi256 | b.lo256 + b.hi256].
    let y: [__m512; 8] = std::array::from_fn(|p| {
        let (a, b) = (x(2 * p), x(2 * p + 1));
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // 8 → 4: chunk k (128 bits) of z[q] holds 4 partial sums of x[4q + k].
    let z: [__m512; 4] = std::array::from_fn(|q| {
        let (c, d) = (y[2 * q], y[2 * q + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(c, d),
            _mm512_shuffle_f32x4::<0xDD>(c, d),
        )
    });
    // 4 → 2: chunk k of g[s] = [2 partials of x[8s + k], 2 partials of x[8s + 4 + k]].
    let g: [__m512; 2] = std::array::from_fn(|s| {
        let (e, f) = (z[2 * s], z[2 * s + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(e, f),
            _mm512_shuffle_ps::<0b11_01_11_01>(e, f),
        )
    });
    // 2 → 1: chunk k = [x[k], x[4 + k], x[8 + k], x[12 + k]], i.e. lane 4·k + m is x[4m + k].
    _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(g[0], g[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(g[0], g[1]),
    )
}

/// `out[r][j] = scale · Σ_x q[r][x] · k[j][x]` with `k` read in place (`bk × d` key rows, any
/// row stride): dot products of each query row with each key row, for the few query rows of a
/// decode step, where a transposed copy of K would cost a second pass over it. Blocks of 4 rows
/// × 4 keys keep 16 accumulators; each key row is loaded once per block of rows.
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn qk_rows(q: Mat, k: Mat, out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { qk_rows_kind::<F32>(q, raw(k), out, scale) }
}

/// [`qk_rows`] over key rows of kind `K`: (pointer, rows, cols, row stride in elements).
#[target_feature(enable = "avx512f")]
unsafe fn qk_rows_kind<const K: u8>(
    q: Mat,
    (kp, bk, kd, kstride): (*const u8, usize, usize, usize),
    mut out: MatMut,
    scale: f32,
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let (nr, d) = (q.rows(), q.cols());
        debug_assert!(kd == d && out.rows() == nr && out.cols() == bk);
        let ostride = out.stride();
        let nv = d.div_ceil(16);
        let mut r = 0;
        while r < nr {
            let mr = (nr - r).min(4);
            let mut j = 0;
            while j < bk {
                let mj = (bk - j).min(4);
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                for v in 0..nv {
                    let m = tail_mask(d - 16 * v);
                    let mut kv = [_mm512_setzero_ps(); 4];
                    for (jj, kv) in kv.iter_mut().enumerate().take(mj) {
                        let at = (j + jj) * kstride + 16 * v;
                        *kv = load16::<K>(kp.add(at * size_of_kind(K)), m);
                    }
                    for rr in 0..mr {
                        let qv = _mm512_maskz_loadu_ps(
                            m,
                            q.data().as_ptr().add((r + rr) * q.stride() + 16 * v),
                        );
                        for jj in 0..4 {
                            acc[rr][jj] = _mm512_fmadd_ps(qv, kv[jj], acc[rr][jj]);
                        }
                    }
                }
                super::stream::step();
                // The 16 dot products in one vector (lane 4·jj + rr), unused accumulators being 0.
                let sums = _mm512_mul_ps(_mm512_set1_ps(scale), reduce16(&acc));
                let mut lanes = [0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
                for rr in 0..mr {
                    for jj in 0..mj {
                        *out.data().get_unchecked_mut((r + rr) * ostride + j + jj) =
                            lanes[4 * jj + rr];
                    }
                }
                j += mj;
            }
            r += mr;
        }
    }
}
