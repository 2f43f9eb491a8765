//! AVX512-BF16 micro-kernels for the two products of a tile when the inputs are bf16.
//!
//! `vdpbf16ps` multiplies 16 pairs of bf16 elements and adds each pair's two products to an f32
//! lane: twice the products per instruction of f32 FMAs, on operands half the size. As in
//! PyTorch's CPU flash attention for bf16:
//! - the scores `Q · Kᵀ` are accumulated in f32 from the bf16 inputs (each product is exact);
//! - the probabilities are rounded to bf16 (to nearest even) for `P · V`, accumulated in f32;
//! - the softmax's maxima and sums stay f32, computed from the unrounded probabilities.
//!
//! Operands are pairs of consecutive elements along the summed dimension ([`PairMat`], the first
//! element in the low 16 bits): the query rows and a transposed copy of K paired along the head
//! dimension; the probabilities paired along the keys, and V read in place, the rows of two
//! consecutive keys interleaved in registers.
#![allow(clippy::needless_range_loop)] // explicit indices name the register block's cells

use std::arch::x86_64::*;

use super::avx512::{tail_mask, MR};
use super::mat::{HalfMat, Mat, MatMut, PairMat};

/// 32 bf16 elements (16 pairs) as the dot product's operand type.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bh(x: __m512i) -> __m512bh {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe { std::mem::transmute(x) }
}

/// `out[r][c] = scale · Σ_x q[r][x] · k[c][x]` for `r < q.rows`, `c < kt.cols`: `q` holds the
/// query rows as pairs (`nr × D/2`), `kt` the keys' pairs transposed (`D/2 × bk`: column `c`
/// holds key `c`'s pairs). Whole 16-lane vectors are stored: columns `bk..round_up(bk, 16)` of
/// `out` are overwritten too (callers read `..bk`).
///
/// # Safety
/// avx512f, avx512bw and avx512bf16 must be available, and `out` must hold `round_up(bk, 16)`
/// columns in every row.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn qk(q: PairMat, kt: PairMat, mut out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (nr, dp, bk) = (q.rows(), q.cols(), kt.cols());
        debug_assert!(kt.rows() == dp && out.rows() == nr && out.cols() == bk);
        debug_assert!(
            nr == 0 || out.data().len() >= (nr - 1) * out.stride() + bk.div_ceil(16) * 16
        );
        super::avx512::score_blocks(nr, bk, |r, mr, c, nb, masks| {
            let kp = (kt.data().as_ptr().add(16 * c), kt.stride());
            let qp = (q.data().as_ptr().add(r * q.stride()), q.stride());
            let op = (
                out.data().as_mut_ptr().add(r * out.stride() + 16 * c),
                out.stride(),
            );
            macro_rules! go {
            ($($m:literal),*) => {
                match (mr, nb) {
                    $(($m, 1) => qk_block::<$m, 1>(qp, dp, kp, op, scale, masks),
                      ($m, 2) => qk_block::<$m, 2>(qp, dp, kp, op, scale, masks),
                      ($m, 3) => qk_block::<$m, 3>(qp, dp, kp, op, scale, masks),
                      ($m, _) => qk_block::<$m, 4>(qp, dp, kp, op, scale, masks),)*
                    _ => unreachable!(),
                }
            };
        }
            go!(1, 2, 3, 4, 5, 6);
        });
    }
}

/// One `M × 16N` block of [`qk`]: `q`, `kt` and `out` are (pointer, row stride), `dp` the
/// pairs per row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn qk_block<const M: usize, const N: usize>(
    (q, qs): (*const u32, usize),
    dp: usize,
    (kt, s): (*const u32, usize),
    (out, out_stride): (*mut f32, usize),
    scale: f32,
    masks: [u16; 4],
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        for x in 0..dp {
            let krow = kt.add(x * s);
            let mut kv = [_mm512_setzero_si512(); N];
            for n in 0..N {
                kv[n] = _mm512_maskz_loadu_epi32(masks[n], krow.add(16 * n).cast());
            }
            for r in 0..M {
                let b = bh(_mm512_set1_epi32(*q.add(r * qs + x) as i32));
                for n in 0..N {
                    acc[r][n] = _mm512_dpbf16_ps(acc[r][n], bh(kv[n]), b);
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
}

/// The rows of `p` (f32, `nr × bk`) rounded to bf16 (to nearest even) as pairs of consecutive
/// columns: `out` gets `nr × ⌈bk/2⌉` pairs, rows `stride` apart; the second half of the last
/// pair of an odd `bk` is 0.
///
/// # Safety
/// avx512f, avx512bw and avx512bf16 must be available; `out` must hold the rows.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn to_pairs(p: Mat, out: &mut [u32], stride: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (nr, bk) = (p.rows(), p.cols());
        let np = bk.div_ceil(2);
        assert!(nr == 0 || (stride >= np && out.len() >= (nr - 1) * stride + np));
        for r in 0..nr {
            let src = p.data().as_ptr().add(r * p.stride());
            let dst = out.as_mut_ptr().add(r * stride);
            let mut c = 0;
            while c < bk {
                let lo = _mm512_maskz_loadu_ps(tail_mask(bk - c), src.add(c));
                let hi = if bk - c > 16 {
                    _mm512_maskz_loadu_ps(tail_mask(bk - c - 16), src.add(c + 16))
                } else {
                    _mm512_setzero_ps()
                };
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let n = (bk - c).min(32).div_ceil(2);
                _mm512_mask_storeu_epi32(dst.add(c / 2).cast(), tail_mask(n), pairs);
                c += 32;
            }
        }
    }
}

/// `acc[r][c] += Σ_j p[r][j] · v[j][c]`: `p` as bf16 pairs of keys (`nr × ⌈bk/2⌉`, from
/// [`to_pairs`]), `v` the `bk × dv` bf16 values read in place (`dv` a multiple of 32), `acc`
/// f32 (`nr × dv`).
///
/// # Safety
/// avx512f, avx512bw and avx512bf16 must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn pv(p: PairMat, v: HalfMat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        assert!(p.cols() == v.rows().div_ceil(2) && acc.rows() == p.rows());
        pv_strided((p.data(), p.rows(), p.stride(), 1), v, acc)
    }
}

/// `acc[r][c] += Σ_j p[j][r] · v[j][c]`: [`pv`] with `p` transposed, as pairs of its rows.
/// `pt` holds `⌈k/2⌉ × m` pairs (from [`interleave`]: pair `(jp, r)` is `p[2jp][r]` and
/// `p[2jp + 1][r]`), `v` the `k × dv` bf16 rows read in place (`dv` a multiple of 32), `acc`
/// f32 (`m × dv`). The backward's `Pᵀ · dO` and `dSᵀ · Q`.
///
/// # Safety
/// avx512f, avx512bw and avx512bf16 must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn pv_t(pt: PairMat, v: HalfMat, acc: MatMut) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        assert!(pt.rows() == v.rows().div_ceil(2) && acc.rows() == pt.cols());
        assert!(pt.rows() == 0 || pt.cols() == 0 || pt.stride() >= pt.cols());
        pv_strided((pt.data(), pt.cols(), 1, pt.stride()), v, acc)
    }
}

/// `acc += P · v` where `P` (`nr` rows of `⌈bk/2⌉` pairs) has pair `(r, jp)` at
/// `data[r·rs + jp·cs]`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pv_strided(
    (data, nr, rs, cs): (&[u32], usize, usize, usize),
    v: HalfMat,
    mut acc: MatMut,
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let (bk, dv) = (v.rows(), v.cols());
        assert!(v.is_bf16() && dv.is_multiple_of(32));
        assert!(acc.rows() == nr && acc.cols() == dv);
        let np = bk.div_ceil(2);
        assert!(nr == 0 || np == 0 || (nr - 1) * rs + (np - 1) * cs < data.len());
        let mut c = 0;
        while c < dv {
            let w = (dv - c).min(64);
            let vp = (v.data().as_ptr().add(c), v.stride());
            let mut r = 0;
            while r < nr {
                let mr = (nr - r).min(MR);
                let pp = (data.as_ptr().add(r * rs), rs, cs);
                let op = (
                    acc.data().as_mut_ptr().add(r * acc.stride() + c),
                    acc.stride(),
                );
                macro_rules! go {
                ($($m:literal),*) => {
                    match (mr, w) {
                        $(($m, 32) => pv_block::<$m, 1>(pp, bk, vp, op),
                          ($m, _) => pv_block::<$m, 2>(pp, bk, vp, op),)*
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

/// Pairs of consecutive rows of `p` (f32, `k × m`) rounded to bf16 (to nearest even) and
/// interleaved: `out` gets `⌈k/2⌉ × m` pairs, rows `stride` apart, pair `(jp, c)` holding
/// `p[2jp][c]` (low half) and `p[2jp + 1][c]` (0 past the last row). What [`pv_t`] reads.
///
/// # Safety
/// avx512f, avx512bw and avx512bf16 must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn interleave(p: Mat, out: &mut [u32], stride: usize) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (k, m) = (p.rows(), p.cols());
        let np = k.div_ceil(2);
        assert!(np == 0 || m == 0 || (stride >= m && out.len() >= (np - 1) * stride + m));
        // Word 2i of the result is word i of the first row, word 2i + 1 word i of the second.
        let idx: [i16; 32] = std::array::from_fn(|w| ((w % 2) * 16 + w / 2) as i16);
        let idx = _mm512_loadu_si512(idx.as_ptr().cast());
        for jp in 0..np {
            let a = p.data().as_ptr().add(2 * jp * p.stride());
            let second = 2 * jp + 1 < k;
            let dst = out.as_mut_ptr().add(jp * stride);
            let mut c = 0;
            while c < m {
                let mask = tail_mask(m - c);
                let lo = _mm512_maskz_loadu_ps(mask, a.add(c));
                let hi = if second {
                    _mm512_maskz_loadu_ps(mask, a.add(p.stride() + c))
                } else {
                    _mm512_setzero_ps()
                };
                // Words 0..16: the first row's 16 values, 16..32: the second's.
                let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                let pairs = _mm512_permutexvar_epi16(idx, halves);
                _mm512_mask_storeu_epi32(dst.add(c).cast(), mask, pairs);
                c += 16;
            }
        }
    }
}

/// Within 32 columns, the order of [`pv_block`]'s accumulators: vector `2h` lane `4k + i` is
/// column `8k + i`, vector `2h + 1` lane `4k + i` column `8k + 4 + i` (what `vpunpcklwd` /
/// `vpunpckhwd` make of two rows). Indices into the two 16-column halves of a row.
const FROM_ROW: [[i32; 16]; 2] = [
    [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27],
    [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31],
];
/// The inverse of [`FROM_ROW`]: the two 16-column halves of a row from the two accumulators.
const TO_ROW: [[i32; 16]; 2] = [
    [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23],
    [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31],
];

/// One `M × 32H` block of [`pv`] / [`pv_t`]: `p` is (pointer, row step, pair step), `v` and
/// `out` are (pointer, row stride). Per pair of
/// keys, each 32 columns of their two value rows are interleaved into two vectors of pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pv_block<const M: usize, const H: usize>(
    (p, p_rs, p_cs): (*const u32, usize, usize),
    bk: usize,
    (v, v_stride): (*const u16, usize),
    (out, out_stride): (*mut f32, usize),
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let from = FROM_ROW.map(|i| _mm512_loadu_si512(i.as_ptr().cast()));
        let to = TO_ROW.map(|i| _mm512_loadu_si512(i.as_ptr().cast()));
        let mut acc = [[_mm512_setzero_ps(); 4]; M];
        for r in 0..M {
            for h in 0..H {
                let x = out.add(r * out_stride + 32 * h);
                let (a, b) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
                acc[r][2 * h] = _mm512_permutex2var_ps(a, from[0], b);
                acc[r][2 * h + 1] = _mm512_permutex2var_ps(a, from[1], b);
            }
        }
        for jp in 0..bk.div_ceil(2) {
            if jp % 4 == 3 {
                super::stream::step();
            }
            let row = v.add(2 * jp * v_stride);
            let second = 2 * jp + 1 < bk;
            let mut vv = [_mm512_setzero_si512(); 4];
            for h in 0..H {
                let a = _mm512_loadu_si512(row.add(32 * h).cast());
                let b = if second {
                    _mm512_loadu_si512(row.add(v_stride + 32 * h).cast())
                } else {
                    _mm512_setzero_si512()
                };
                vv[2 * h] = _mm512_unpacklo_epi16(a, b);
                vv[2 * h + 1] = _mm512_unpackhi_epi16(a, b);
            }
            for r in 0..M {
                let b = bh(_mm512_set1_epi32(*p.add(r * p_rs + jp * p_cs) as i32));
                for n in 0..2 * H {
                    acc[r][n] = _mm512_dpbf16_ps(acc[r][n], bh(vv[n]), b);
                }
            }
        }
        for r in 0..M {
            for h in 0..H {
                let x = out.add(r * out_stride + 32 * h);
                let (lo, hi) = (acc[r][2 * h], acc[r][2 * h + 1]);
                _mm512_storeu_ps(x, _mm512_permutex2var_ps(lo, to[0], hi));
                _mm512_storeu_ps(x.add(16), _mm512_permutex2var_ps(lo, to[1], hi));
            }
        }
    }
}

/// `out[r][j] = scale · Σ_x q[r][x] · k[j][x]` with `q` as bf16 pairs (`nr × D/2`) and the key
/// rows `k` (`bk × D` bf16, even `D`, any row stride) read in place: dot products of each query
/// row with each key row, for the few query rows of a decode step (see
/// [`super::avx512::qk_rows`]). Blocks of up to 4 rows × 4 keys keep 16 accumulators.
///
/// # Safety
/// avx512f, avx512bw and avx512bf16 must be available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn qk_rows(q: PairMat, k: HalfMat, mut out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (nr, dp, bk) = (q.rows(), q.cols(), k.rows());
        assert!(k.is_bf16() && k.cols() == 2 * dp && out.rows() == nr && out.cols() == bk);
        if dp == 0 {
            for r in 0..nr {
                let st = out.stride();
                out.data()[r * st..r * st + bk].fill(0.0);
            }
            return;
        }
        let mut r = 0;
        while r < nr {
            let mr = (nr - r).min(4);
            let qp = (q.data().as_ptr().add(r * q.stride()), q.stride());
            let mut j = 0;
            while j < bk {
                let mj = (bk - j).min(4);
                let kp = (k.data().as_ptr().add(j * k.stride()), k.stride());
                let op = (
                    out.data().as_mut_ptr().add(r * out.stride() + j),
                    out.stride(),
                );
                macro_rules! go {
                ($($m:literal),*) => {
                    match (mr, mj) {
                        $(($m, 1) => dots::<$m, 1>(qp, kp, dp, op, scale),
                          ($m, 2) => dots::<$m, 2>(qp, kp, dp, op, scale),
                          ($m, 3) => dots::<$m, 3>(qp, kp, dp, op, scale),
                          ($m, _) => dots::<$m, 4>(qp, kp, dp, op, scale),)*
                        _ => unreachable!(),
                    }
                };
            }
                go!(1, 2, 3, 4);
                super::stream::step();
                j += mj;
            }
            r += mr;
        }
    }
}

/// The 4 × 4 transpose of a vector's lanes: [`super::avx512::reduce16`]'s lane `4·j + r` to
/// `4·r + j`.
const TRANSPOSE_IDX: [i32; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// The `R × J` dot products of [`qk_rows`]' query rows `q` (pairs) with key rows `k`
/// (elements), both (pointer, row stride), over `dp` pairs, scaled into `out`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dots<const R: usize, const J: usize>(
    (q, qs): (*const u32, usize),
    (k, ks): (*const u16, usize),
    dp: usize,
    (out, os): (*mut f32, usize),
    scale: f32,
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let nv = dp.div_ceil(16);
        for v in 0..nv {
            // 16 pairs of the query rows, 32 elements of the key rows; the last vector masked.
            let left = dp - 16 * v;
            let (mq, mk) = if left >= 16 {
                (u16::MAX, u32::MAX)
            } else {
                (tail_mask(left), (1u32 << (2 * left)) - 1)
            };
            let mut kv = [_mm512_setzero_si512(); J];
            // Whole vectors by plain loads (measured faster than masked ones here).
            let full = left >= 16;
            for jj in 0..J {
                let p = k.add(jj * ks + 32 * v);
                kv[jj] = if full {
                    _mm512_loadu_si512(p.cast())
                } else {
                    _mm512_maskz_loadu_epi16(mk, p.cast())
                };
            }
            for rr in 0..R {
                let p = q.add(rr * qs + 16 * v);
                let qv = if full {
                    _mm512_loadu_si512(p.cast())
                } else {
                    _mm512_maskz_loadu_epi32(mq, p.cast())
                };
                for jj in 0..J {
                    acc[rr][jj] = _mm512_dpbf16_ps(acc[rr][jj], bh(qv), bh(kv[jj]));
                }
            }
        }
        // Lane 4·jj + rr of the reduction, transposed to lane 4·rr + jj: each row's J dots are
        // one 128-bit chunk.
        let idx = _mm512_loadu_si512(TRANSPOSE_IDX.as_ptr().cast());
        let sums = _mm512_mul_ps(_mm512_set1_ps(scale), super::avx512::reduce16(&acc));
        let rows = _mm512_permutexvar_ps(idx, sums);
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), rows);
        for rr in 0..R {
            std::ptr::copy_nonoverlapping(lanes.as_ptr().add(4 * rr), out.add(rr * os), J);
        }
    }
}

#[cfg(test)]
#[path = "avx512_bf16_tests.rs"]
mod tests;
