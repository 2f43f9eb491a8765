//! AVX2 integer products against int8 keys and values read in place, the same exact integers
//! as the AVX512-VNNI kernels (`avx512_vnni.rs`): `vpmaddwd` multiplies 16 key bytes (`k + 128`,
//! widened to 16 bits) by 16 int16 query values and adds each pair of products into a 32-bit
//! lane, and a `vpaddd` accumulates it (see [`super::quant`]). One `vpmaddwd` does the work of
//! two f32 FMAs but issues at half their rate on AMD Zen 3 (register-only loops, one thread: 45
//! multiply-adds per ns either way); what it saves is the widening: a key byte is widened once
//! per block of query rows in one instruction, where the f32 products widen, convert and offset
//! it.

use std::arch::x86_64::*;

use super::mat::{ByteMat, Mat, MatMut};
use super::quant::QRows;

/// `out[r][j] = scale · q.scale[r] · kscale[j] · Σ_x q.vals[r][x] · (k[j][x] − 128)` for int8
/// key rows stored offset by 128 (`k.cols == q.cols`, a multiple of 8, any row stride) with their
/// scales `kscale`: the same bits as `avx512_vnni::qk_rows_q16`. Blocks of 4 query rows × 2 keys
/// while 4 rows are left (each key's 16 bytes widened once for a decode step's 4 query heads of
/// a KV head), else 2 rows × 4 keys: 8 integer accumulators, reduced into one vector.
///
/// # Safety
/// avx2 and fma must be available; `k` must be int8 (not fp8), and the shapes must agree
/// (`k.cols == q.cols <= 256`, a multiple of 8, `kscale.len() >= k.rows`, `out` is
/// `q.rows × k.rows`).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn qk_rows_q16(q: QRows, k: ByteMat, kscale: &[f32], mut out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (nr, d, bk) = (q.rows, q.cols, k.rows());
        debug_assert!(
            !k.is_fp8() && k.cols() == d && d <= 256 && d.is_multiple_of(8) && out.rows() == nr
        );
        debug_assert!(out.cols() == bk && kscale.len() >= bk);
        let mut r = 0;
        while r < nr {
            let o = out.reborrow();
            if nr - r >= 4 {
                rows_block::<4, 2>(q, (k, kscale), o, scale, (r, 4));
                r += 4;
            } else {
                let mr = (nr - r).min(2);
                rows_block::<2, 4>(q, (k, kscale), o, scale, (r, mr));
                r += mr;
            }
        }
    }
}

/// Rows `r..r + mr` (`mr ≤ R`) of [`qk_rows_q16`] against every key, in blocks of `R` rows ×
/// `J` keys (`R · J = 8`).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_block<const R: usize, const J: usize>(
    q: QRows,
    (k, kscale): (ByteMat, &[f32]),
    mut out: MatMut,
    scale: f32,
    (r, mr): (usize, usize),
) {
    // SAFETY: called only by `qk_rows_q16` with rows `r..r + mr` of its checked operands.
    unsafe {
        let (d, bk, ostride) = (q.cols, k.rows(), out.stride());
        let (kp, qp) = (k.data().as_ptr(), q.vals.as_ptr());
        // Rows past `mr`: the last valid one again (computed, not stored).
        let row = |x: usize| r + x.min(mr - 1);
        let qr: [*const i16; R] = std::array::from_fn(|x| qp.add(row(x) * d));
        // Lane L of the reduced sums holds block cell 2·(L % 4) + L / 4 (see `reduce8i`): row
        // cell / J, key cell % J. The rows' offsets and factors in those lanes.
        let cell = |l: usize| 2 * (l % 4) + l / 4;
        let corr: [i32; 8] = std::array::from_fn(|l| q.corr[row(cell(l) / J)]);
        let fac: [f32; 8] = std::array::from_fn(|l| scale * q.scale[row(cell(l) / J)]);
        let corr = _mm256_loadu_si256(corr.as_ptr().cast());
        let fac = _mm256_loadu_ps(fac.as_ptr());
        let mut j = 0;
        while j < bk {
            let mj = (bk - j).min(J);
            // Keys past `mj`: the last again.
            let key = |x: usize| j + x.min(mj - 1);
            let kr: [*const u8; J] = std::array::from_fn(|x| kp.add(key(x) * k.stride()));
            let acc = if d.is_multiple_of(16) {
                qk_block::<R, J, false>(kr, qr, d)
            } else {
                qk_block::<R, J, true>(kr, qr, d)
            };
            super::stream::step();
            // The same operations, in the same order, as the VNNI kernel: the exact sum less
            // the offset's, times the row's factor, times the key's scale.
            let ks: [f32; 8] = std::array::from_fn(|l| *kscale.get_unchecked(key(cell(l) % J)));
            let x = _mm256_cvtepi32_ps(_mm256_sub_epi32(reduce8i(&acc), corr));
            let s = _mm256_mul_ps(_mm256_mul_ps(x, fac), _mm256_loadu_ps(ks.as_ptr()));
            let o = out.data().as_mut_ptr().add(r * ostride + j);
            super::avx2_rows::store_block::<R, J>(s, (o, ostride), (mr, mj));
            j += mj;
        }
    }
}

/// The 8 integer dot products `Σ_x q[rr][x] · k[jj][x]` of `R` query rows and `J` key rows over
/// `d` values, unreduced: `acc[i / 4][i % 4]` for cell `i = rr · J + jj`. With `TAIL` the last
/// 8 values (`d % 16 == 8`) are read as half vectors.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn qk_block<const R: usize, const J: usize, const TAIL: bool>(
    kr: [*const u8; J],
    qr: [*const i16; R],
    d: usize,
) -> [[__m256i; 4]; 2] {
    // SAFETY: called only by `rows_block`, which passes rows of `d` values of its operands.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); 4]; 2];
        for v in 0..d / 16 {
            let kv = kr.map(|p| _mm256_cvtepu8_epi16(_mm_loadu_si128(p.add(16 * v).cast())));
            let qv = qr.map(|p| _mm256_loadu_si256(p.add(16 * v).cast()));
            madd_block(&mut acc, kv, qv);
        }
        if TAIL {
            // The last 8 values in the low halves (the high halves zero).
            let at = d - 8;
            let kv = kr.map(|p| _mm256_cvtepu8_epi16(_mm_loadl_epi64(p.add(at).cast())));
            let qv = qr.map(|p| _mm256_zextsi128_si256(_mm_loadu_si128(p.add(at).cast())));
            madd_block(&mut acc, kv, qv);
        }
        acc
    }
}

/// `acc[i / 4][i % 4] += Σ pairs of kv[jj] · qv[rr]` (`vpmaddwd`, `vpaddd`) for the block's
/// cells `i = rr · J + jj`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn madd_block<const R: usize, const J: usize>(
    acc: &mut [[__m256i; 4]; 2],
    kv: [__m256i; J],
    qv: [__m256i; R],
) {
    for (rr, &qv) in qv.iter().enumerate() {
        for (jj, &kv) in kv.iter().enumerate() {
            let i = rr * J + jj;
            acc[i / 4][i % 4] = _mm256_add_epi32(acc[i / 4][i % 4], _mm256_madd_epi16(kv, qv));
        }
    }
}

/// `super::avx2_rows::reduce8` on 32-bit integer lanes: the sum of `acc[i / 4][i % 4]` lands in
/// lane `(i % 2) · 4 + i / 2`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn reduce8i(acc: &[[__m256i; 4]; 2]) -> __m256i {
    let x = |i: usize| acc[i / 4][i % 4];
    let y: [__m256i; 4] = std::array::from_fn(|p| {
        let (a, b) = (x(2 * p), x(2 * p + 1));
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(a, b),
            _mm256_permute2x128_si256::<0x31>(a, b),
        )
    });
    // Within 128-bit halves, as `_mm256_shuffle_ps` (on the bits: no conversion).
    let shuf = |a: __m256i, b: __m256i, even: bool| {
        let (a, b) = (_mm256_castsi256_ps(a), _mm256_castsi256_ps(b));
        _mm256_castps_si256(if even {
            _mm256_shuffle_ps::<0b10_00_10_00>(a, b)
        } else {
            _mm256_shuffle_ps::<0b11_01_11_01>(a, b)
        })
    };
    let z: [__m256i; 2] = std::array::from_fn(|q| {
        let (c, d) = (y[2 * q], y[2 * q + 1]);
        _mm256_add_epi32(shuf(c, d, true), shuf(c, d, false))
    });
    _mm256_add_epi32(shuf(z[0], z[1], true), shuf(z[0], z[1], false))
}

/// Most keys per call of [`pv_q16`] (a tile).
const MAX_KEYS: usize = super::BLOCK_K;

/// `acc[r][c] += Σ_j p[r][j] · vscale[j] · (v[j][c] − 128)` for int8 value rows stored offset
/// by 128 with their scales `vscale` (`v.cols` a multiple of 16, at most [`super::BLOCK_K`]
/// keys), as exact integer products: each row of `p · vscale` quantized to int16 as in
/// `avx512_vnni::pv_q16` (one scale per row and call, round to nearest even), two keys' values
/// widened and interleaved into pairs per column, `vpmaddwd` on the pairs; the same bits as that
/// kernel. Returns `false`, with `acc` untouched, when a row of `p · vscale` is not finite (the
/// f32 kernel then runs, propagating it).
///
/// # Safety
/// avx2 and fma must be available; `v` must be int8 (not fp8) and the shapes must agree (`v` is
/// `p.cols × acc.cols`, at most [`super::MAX_HEAD_DIM`] columns, `vscale.len() >= p.cols`,
/// `acc` has `p.rows` rows, at most [`super::BLOCK_Q`]).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn pv_q16(p: Mat, v: ByteMat, vscale: &[f32], mut acc: MatMut) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (nr, bk, dv) = (p.rows(), p.cols(), v.cols());
        debug_assert!(!v.is_fp8() && v.rows() == bk && acc.rows() == nr && acc.cols() == dv);
        debug_assert!(dv.is_multiple_of(16) && bk <= MAX_KEYS && nr <= super::BLOCK_Q);
        debug_assert!(vscale.len() >= bk);
        if bk == 0 {
            return true;
        }
        let vs = vscale.as_ptr();
        // Every row's largest value first, and whether the row is finite: a row that is not
        // leaves the call to the f32 kernel before anything is written.
        let mut pmax = [0f32; super::BLOCK_Q];
        for (r, pm) in pmax.iter_mut().enumerate().take(nr) {
            let row = p.data().as_ptr().add(r * p.stride());
            let (mut m, mut s) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in (0..bk).step_by(8) {
                let mask = super::avx2::lanes(bk - c);
                let x = _mm256_mul_ps(
                    _mm256_maskload_ps(row.add(c), mask),
                    _mm256_maskload_ps(vs.add(c), mask),
                );
                m = _mm256_max_ps(m, x);
                s = _mm256_add_ps(s, x);
            }
            let (mut ms, mut ss) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(ms.as_mut_ptr(), m);
            _mm256_storeu_ps(ss.as_mut_ptr(), s);
            if !ss.iter().sum::<f32>().is_finite() {
                return false;
            }
            *pm = ms.iter().fold(0f32, |a, &b| a.max(b));
        }
        let mut r = 0;
        while r < nr {
            let mr = (nr - r).min(4);
            // The block's rows as int16, written in whole 8s (the lanes past `bk` zero: an odd
            // last key pairs with a zero); rows past the block's last are zeros (their sums are
            // not stored). Only what is read is written (see the VNNI kernel).
            let mut p16 = std::mem::MaybeUninit::<[[i16; MAX_KEYS + 8]; 4]>::uninit();
            let p16p = p16.as_mut_ptr().cast::<i16>();
            let mut corr = [0i32; 4];
            let mut ps = [0f32; 4];
            for rr in 0..4 {
                let dst = p16p.add(rr * (MAX_KEYS + 8));
                if rr >= mr {
                    std::ptr::write_bytes(dst, 0, bk + 2);
                    continue;
                }
                let m = pmax[r + rr];
                let inv = _mm256_set1_ps(if m > 0.0 { 32767.0 / m } else { 0.0 });
                ps[rr] = m / 32767.0;
                let row = p.data().as_ptr().add((r + rr) * p.stride());
                let mut sum = _mm256_setzero_si256();
                for c in (0..bk).step_by(8) {
                    let mask = super::avx2::lanes(bk - c);
                    let pv = _mm256_mul_ps(
                        _mm256_maskload_ps(row.add(c), mask),
                        _mm256_maskload_ps(vs.add(c), mask),
                    );
                    // Rounded to nearest even (the default rounding); lanes past `bk` are 0.
                    let x = _mm256_cvtps_epi32(_mm256_mul_ps(pv, inv));
                    sum = _mm256_add_epi32(sum, x);
                    let h = _mm_packs_epi32(
                        _mm256_castsi256_si128(x),
                        _mm256_extracti128_si256::<1>(x),
                    );
                    _mm_storeu_si128(dst.add(c).cast(), h);
                }
                let mut s = [0i32; 8];
                _mm256_storeu_si256(s.as_mut_ptr().cast(), sum);
                corr[rr] = 128 * s.iter().sum::<i32>();
            }
            // Integer sums in `ai` across chunks of `KC` keys: a chunk's value rows stay in L1
            // while every group of 16 columns passes over them (a cache's rows `Hkv · Dv` bytes
            // apart share few L1 sets: at 1 KiB apart a whole tile of 64 rows did not fit).
            let mut ai = std::mem::MaybeUninit::<[[i32; MAX_COLS]; 4]>::uninit();
            let aip = ai.as_mut_ptr().cast::<i32>();
            for rr in 0..4 {
                std::ptr::write_bytes(aip.add(rr * MAX_COLS), 0, dv);
            }
            let mut k0 = 0;
            while k0 < bk {
                let kn = (bk - k0).min(KC);
                for c in (0..dv).step_by(16) {
                    pv_block(
                        (p16p.add(k0).cast_const(), kn),
                        (v.data().as_ptr().add(k0 * v.stride() + c), v.stride()),
                        aip.add(c),
                    );
                }
                k0 += kn;
            }
            // Back to column order (see `pv_block`), less the offset, times the row's scale.
            for rr in 0..mr {
                let out = acc.data().as_mut_ptr().add((r + rr) * acc.stride());
                let (k, sc) = (_mm256_set1_epi32(corr[rr]), _mm256_set1_ps(ps[rr]));
                for c in (0..dv).step_by(16) {
                    let at = aip.add(rr * MAX_COLS + c);
                    let (lo, hi) = (
                        _mm256_loadu_si256(at.cast()),
                        _mm256_loadu_si256(at.add(8).cast()),
                    );
                    let cols = [
                        _mm256_permute2x128_si256::<0x20>(lo, hi),
                        _mm256_permute2x128_si256::<0x31>(lo, hi),
                    ];
                    for (h, cols) in cols.into_iter().enumerate() {
                        let x = _mm256_cvtepi32_ps(_mm256_sub_epi32(cols, k));
                        let o = out.add(c + 8 * h);
                        _mm256_storeu_ps(o, _mm256_fmadd_ps(x, sc, _mm256_loadu_ps(o)));
                    }
                }
            }
            r += mr;
        }
        true
    }
}

/// Keys per chunk of [`pv_q16`] (even: a chunk's pairs of keys never straddle two chunks).
const KC: usize = 16;

/// Most value columns of [`pv_q16`].
const MAX_COLS: usize = super::MAX_HEAD_DIM;

/// One chunk of `kn` keys of [`pv_q16`] on 16 columns for 4 rows: `ai[rr][0..8]` (at `ai +
/// rr · MAX_COLS`) += columns {0..4, 8..12}, `ai[rr][8..16]` += columns {4..8, 12..16} (the
/// 128-bit halves `vpunpck{l,h}wd` work within) of `Σ_j p16[rr][j] · v[j]`; row `rr` of the
/// int16 probabilities at `p16 + rr · (MAX_KEYS + 8)` (`kn + 1` values when `kn` is odd: the
/// last key pairs with a zero).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_block((p16, kn): (*const i16, usize), (v, stride): (*const u8, usize), ai: *mut i32) {
    // SAFETY: called only by `pv_q16`, which passes `kn` rows of 16 columns of its values, the
    // chunk's written int16 probabilities, and its integer sums.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); 2]; 4];
        for (rr, acc) in acc.iter_mut().enumerate() {
            let at = ai.add(rr * MAX_COLS);
            acc[0] = _mm256_loadu_si256(at.cast());
            acc[1] = _mm256_loadu_si256(at.add(8).cast());
        }
        let mut row = v;
        let mut j = 0;
        while j < kn {
            if j % 8 == 6 {
                super::stream::step();
            }
            let wa = _mm256_cvtepu8_epi16(_mm_loadu_si128(row.cast()));
            let wb = if j + 1 < kn {
                _mm256_cvtepu8_epi16(_mm_loadu_si128(row.add(stride).cast()))
            } else {
                wa
            };
            let pairs = [_mm256_unpacklo_epi16(wa, wb), _mm256_unpackhi_epi16(wa, wb)];
            for (rr, acc) in acc.iter_mut().enumerate() {
                // (p16[j], p16[j + 1]) as one 32-bit lane, broadcast.
                let at = p16.add(rr * (MAX_KEYS + 8) + j);
                let pp = _mm256_set1_epi32(at.cast::<i32>().read_unaligned());
                for x in 0..2 {
                    acc[x] = _mm256_add_epi32(acc[x], _mm256_madd_epi16(pairs[x], pp));
                }
            }
            row = row.wrapping_add(2 * stride);
            j += 2;
        }
        for (rr, acc) in acc.iter().enumerate() {
            let at = ai.add(rr * MAX_COLS);
            _mm256_storeu_si256(at.cast(), acc[0]);
            _mm256_storeu_si256(at.add(8).cast(), acc[1]);
        }
    }
}
