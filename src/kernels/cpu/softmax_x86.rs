//! The vectorised pieces of the fused kernel's softmax on AVX-512 or AVX2 registers: `exp` of 16
//! (8) logits (`softmax.rs`'s polynomial, NaN kept, `-inf` and the range below f32's normals to
//! 0), the backward's `exp(row − lse)`, soft-capping and ALiBi. The online-softmax step of a
//! whole tile is in `softmax_tile.rs`. (The compiler's vectorisation of the portable loops left
//! scalar reductions and `2ⁿ` built from the exponent bits, and spent 2–3× the time.)

use std::arch::x86_64::*;

use super::avx512::tail_mask as tail;
use super::softmax::exp_poly::{LN2_HI, LN2_LO, LOG2E, MAGIC, MIN, P};
use super::softmax::Rational;

/// `exp(x)` for `x <= 0` in 16 lanes: the polynomial of `softmax::fast_exp` (relative error
/// ≈ 1e-7); 0 below the f32 normal range and for `-inf`; NaN stays NaN. The power of two
/// is applied by `vscalefps` (exact, as the portable step's multiplication by `2ⁿ` built from
/// the exponent bits, in one instruction instead of four), merged with the zeroing of the lanes
/// below the range.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp16(x: __m512) -> __m512 {
    let min = _mm512_set1_ps(MIN);
    let magic = _mm512_set1_ps(MAGIC);
    // No clamp to `min` first (the portable step's): below it the lanes are zeroed at the end,
    // whatever the steps between made of them (`-inf` gives NaN there).
    let z = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), magic);
    let n = _mm512_sub_ps(z, magic);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let y = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
    // 0 where x < min (false for NaN); elsewhere y · 2ⁿ (n ≥ -126: a normal result).
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, min);
    _mm512_maskz_scalef_ps(keep, y, n)
}

/// `softmax::exp_sub` on AVX-512: `row[j] = exp(min(row[j] − shift, 0))` with [`exp16`], two
/// vectors per step (the compiler's vectorisation of the portable loop built `2ⁿ` from the
/// exponent bits and kept one vector in flight).
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_sub_avx512(row: &mut [f32], shift: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract; every access is inside
    // `row` (whole vectors below `n`, the last one masked).
    unsafe {
        let (n, p) = (row.len(), row.as_mut_ptr());
        let (sv, zero) = (_mm512_set1_ps(shift), _mm512_setzero_ps());
        // `min(0, y)` keeps y when it is NaN (the second operand wins on NaN), as the portable
        // `if y > 0 { 0 } else { y }`: rounding can leave a logit a hair above its lse.
        let e = |x: __m512| exp16(_mm512_min_ps(zero, _mm512_sub_ps(x, sv)));
        let mut c = 0;
        while c + 32 <= n {
            let (x0, x1) = (_mm512_loadu_ps(p.add(c)), _mm512_loadu_ps(p.add(c + 16)));
            _mm512_storeu_ps(p.add(c), e(x0));
            _mm512_storeu_ps(p.add(c + 16), e(x1));
            c += 32;
        }
        while c < n {
            let k = tail(n - c);
            _mm512_mask_storeu_ps(p.add(c), k, e(_mm512_maskz_loadu_ps(k, p.add(c))));
            c += 16;
        }
    }
}

/// [`exp16`] in 8 lanes (AVX2 + FMA).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp8(x: __m256) -> __m256 {
    let min = _mm256_set1_ps(MIN);
    let magic = _mm256_set1_ps(MAGIC);
    // `max(min, x)` keeps x when it is NaN (the second operand wins on NaN).
    let xc = _mm256_max_ps(min, x);
    let z = _mm256_fmadd_ps(xc, _mm256_set1_ps(LOG2E), magic);
    let n = _mm256_sub_ps(z, magic);
    let ni = _mm256_sub_epi32(_mm256_castps_si256(z), _mm256_castps_si256(magic));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
    let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127)));
    let y = _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
    // 0 where x < min (false for NaN).
    _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, min), y)
}

/// The horizontal maximum of 8 lanes (no NaN among them).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hmax8(x: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// The horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hsum8(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `row[j] = c · tanh(row[j] / c)` (`softmax::softcap`) on AVX-512: `tanh|y| = 1 − 2e / (1 + e)`
/// with `e = exp(−2|y|)` from [`exp16`], the division as a reciprocal estimate refined by one
/// Newton step (relative error ≈ 2⁻²⁸), the sign put back; NaN stays NaN, ±inf gives ±c. (A
/// 13/6 rational approximation of `tanh` costs a third less but is off by up to 6 f32 units
/// near ±1: too much for logits capped at 50.)
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn softcap_avx512(row: &mut [f32], c: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let n = row.len();
        let p = row.as_mut_ptr();
        let (k, cap) = (_mm512_set1_ps(-2.0 / c), _mm512_set1_ps(c));
        let (one, two) = (_mm512_set1_ps(1.0), _mm512_set1_ps(2.0));
        let sign = _mm512_set1_epi32(i32::MIN);
        let mut i = 0;
        while i < n {
            let m = tail(n - i);
            let x = _mm512_maskz_loadu_ps(m, p.add(i));
            let e = exp16(_mm512_mul_ps(_mm512_abs_ps(x), k));
            let den = _mm512_add_ps(one, e);
            let r = _mm512_rcp14_ps(den);
            let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, two));
            // tanh|y| = 1 − 2e / (1 + e): exactly 1 once e underflows.
            let y = _mm512_mul_ps(cap, _mm512_fnmadd_ps(_mm512_add_ps(e, e), r, one));
            let s = _mm512_and_si512(_mm512_castps_si512(x), sign);
            let y = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), s));
            _mm512_mask_storeu_ps(p.add(i), m, y);
            i += 16;
        }
    }
}

/// `softmax::softcap` with the rational `tanh` `f` on AVX-512.
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn softcap_rational_avx512<const N: usize>(
    row: &mut [f32],
    c: f32,
    f: &Rational<N>,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let n = row.len();
        let p = row.as_mut_ptr();
        let (alpha, beta) = f.scaled(c);
        let inv = _mm512_set1_ps(1.0 / c);
        let (hi, lo) = (_mm512_set1_ps(f.clamp), _mm512_set1_ps(-f.clamp));
        let mut i = 0;
        while i < n {
            let m = tail(n - i);
            let x = _mm512_maskz_loadu_ps(m, p.add(i));
            // NaN passes both bounds (the second operand wins on NaN).
            let y = _mm512_max_ps(lo, _mm512_min_ps(hi, _mm512_mul_ps(x, inv)));
            let y2 = _mm512_mul_ps(y, y);
            let mut num = _mm512_set1_ps(alpha[0]);
            for a in &alpha[1..] {
                num = _mm512_fmadd_ps(num, y2, _mm512_set1_ps(*a));
            }
            let mut den = _mm512_set1_ps(beta[0]);
            for b in &beta[1..] {
                den = _mm512_fmadd_ps(den, y2, _mm512_set1_ps(*b));
            }
            // A division: the divider runs beside the FMA pipes this is bound by.
            let t = _mm512_div_ps(_mm512_mul_ps(num, y), den);
            _mm512_mask_storeu_ps(p.add(i), m, t);
            i += 16;
        }
    }
}

/// `row[k] −= m · |centre − k|` (ALiBi over a row of scores) on AVX-512: the distances as f32
/// (exact: integers below 2²⁴), counted down by 16.
///
/// # Safety
/// avx512f must be available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn alibi_avx512(row: &mut [f32], m: f32, centre: i32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let n = row.len();
        let p = row.as_mut_ptr();
        let mv = _mm512_set1_ps(m);
        let mut d = _mm512_sub_ps(
            _mm512_set1_ps(centre as f32),
            _mm512_setr_ps(
                0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
            ),
        );
        let step = _mm512_set1_ps(16.0);
        let mut i = 0;
        while i < n {
            let mk = tail(n - i);
            let x = _mm512_maskz_loadu_ps(mk, p.add(i));
            _mm512_mask_storeu_ps(p.add(i), mk, _mm512_fnmadd_ps(mv, _mm512_abs_ps(d), x));
            d = _mm512_sub_ps(d, step);
            i += 16;
        }
    }
}

/// The first `n` (< 8 or more) of 8 lanes, as a mask for `maskload` / `maskstore`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes8(n: usize) -> __m256i {
    let n = n.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// [`softcap_avx512`] on AVX2 + FMA (the reciprocal estimate is 12 bits; one Newton step).
///
/// # Safety
/// avx2 and fma must be available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softcap_avx2(row: &mut [f32], c: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let n = row.len();
        let p = row.as_mut_ptr();
        let (k, cap) = (_mm256_set1_ps(-2.0 / c), _mm256_set1_ps(c));
        let (one, two) = (_mm256_set1_ps(1.0), _mm256_set1_ps(2.0));
        let sign = _mm256_set1_ps(-0.0);
        let mut i = 0;
        while i < n {
            let m = lanes8(n - i);
            let x = _mm256_maskload_ps(p.add(i), m);
            let e = exp8(_mm256_mul_ps(_mm256_andnot_ps(sign, x), k));
            let den = _mm256_add_ps(one, e);
            let r = _mm256_rcp_ps(den);
            let r = _mm256_mul_ps(r, _mm256_fnmadd_ps(den, r, two));
            let y = _mm256_mul_ps(cap, _mm256_fnmadd_ps(_mm256_add_ps(e, e), r, one));
            let y = _mm256_or_ps(y, _mm256_and_ps(x, sign));
            _mm256_maskstore_ps(p.add(i), m, y);
            i += 8;
        }
    }
}

/// `softmax::softcap` with the rational `tanh` `f` on AVX2 + FMA.
///
/// # Safety
/// avx2 and fma must be available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softcap_rational_avx2<const N: usize>(
    row: &mut [f32],
    c: f32,
    f: &Rational<N>,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let n = row.len();
        let p = row.as_mut_ptr();
        let (alpha, beta) = f.scaled(c);
        let inv = _mm256_set1_ps(1.0 / c);
        let (hi, lo) = (_mm256_set1_ps(f.clamp), _mm256_set1_ps(-f.clamp));
        let mut i = 0;
        while i < n {
            let m = lanes8(n - i);
            let x = _mm256_maskload_ps(p.add(i), m);
            // NaN passes both bounds (the second operand wins on NaN).
            let y = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_mul_ps(x, inv)));
            let y2 = _mm256_mul_ps(y, y);
            let mut num = _mm256_set1_ps(alpha[0]);
            for a in &alpha[1..] {
                num = _mm256_fmadd_ps(num, y2, _mm256_set1_ps(*a));
            }
            let mut den = _mm256_set1_ps(beta[0]);
            for b in &beta[1..] {
                den = _mm256_fmadd_ps(den, y2, _mm256_set1_ps(*b));
            }
            // A division: the divider runs beside the FMA pipes this is bound by.
            let t = _mm256_div_ps(_mm256_mul_ps(num, y), den);
            _mm256_maskstore_ps(p.add(i), m, t);
            i += 8;
        }
    }
}

/// [`alibi_avx512`] on AVX2.
///
/// # Safety
/// avx2 and fma must be available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn alibi_avx2(row: &mut [f32], m: f32, centre: i32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let n = row.len();
        let p = row.as_mut_ptr();
        let mv = _mm256_set1_ps(m);
        let mut d = _mm256_sub_ps(
            _mm256_set1_ps(centre as f32),
            _mm256_setr_ps(0., 1., 2., 3., 4., 5., 6., 7.),
        );
        let (step, sign) = (_mm256_set1_ps(8.0), _mm256_set1_ps(-0.0));
        let mut i = 0;
        while i < n {
            let mk = lanes8(n - i);
            let x = _mm256_maskload_ps(p.add(i), mk);
            let dist = _mm256_andnot_ps(sign, d);
            _mm256_maskstore_ps(p.add(i), mk, _mm256_fnmadd_ps(mv, dist, x));
            d = _mm256_sub_ps(d, step);
            i += 8;
        }
    }
}
