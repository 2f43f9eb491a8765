//! AVX2 + FMA dot-product micro-kernels: `scale · q · kᵀ` against key rows read in place (f32,
//! bf16, f16, int8 or fp8 e4m3), for few query rows per key (decode steps) where a transposed
//! copy of K would not pay for itself, and the shuffle tree [`reduce8`] that sums their
//! accumulators. The element kinds and their loads are `avx2.rs`'s.

use std::arch::x86_64::*;

use super::avx2::{elem, lanes, load8, raw, BF16, F16, F32, F8, I8};
use super::mat::{ByteMat, HalfMat, Mat, MatMut};

/// The horizontal sums of 8 vectors in one: the sum of `acc[i / 4][i % 4]` lands in lane
/// `(i % 2) · 4 + i / 2`. Three levels of shuffles and adds (21 instructions) instead of 8
/// separate reductions.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn reduce8(acc: &[[__m256; 4]; 2]) -> __m256 {
    let x = |i: usize| acc[i / 4][i % 4];
    // 8 → 4: [a.lo + a.hi | b.lo + b.hi] (128-bit halves).
    let y: [__m256; 4] = std::array::from_fn(|p| {
        let (a, b) = (x(2 * p), x(2 * p + 1));
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    });
    // 4 → 2: in each 128-bit half, [2 partials of c's item, 2 of d's item].
    let z: [__m256; 2] = std::array::from_fn(|q| {
        let (c, d) = (y[2 * q], y[2 * q + 1]);
        _mm256_add_ps(
            _mm256_shuffle_ps::<0b10_00_10_00>(c, d),
            _mm256_shuffle_ps::<0b11_01_11_01>(c, d),
        )
    });
    // 2 → 1: half h = [x[h], x[h + 2], x[h + 4], x[h + 6]].
    _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(z[0], z[1]),
        _mm256_shuffle_ps::<0b11_01_11_01>(z[0], z[1]),
    )
}

/// Stores the block of dot products `s` ([`reduce8`]'s lanes: cell `i = rr · J + jj` in lane
/// `(i % 2) · 4 + i / 2`) of `R` rows × `J` keys (`R · J = 8`) at `o` (rows `ostride` apart):
/// rows `0..mr`, keys `0..mj`. Whole rows of the block as one 8- or 16-byte store each.
///
/// # Safety
/// avx2 must be available; `o` must hold `mr` rows of `mj` values, `ostride` apart.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store_block<const R: usize, const J: usize>(
    s: __m256,
    (o, ostride): (*mut f32, usize),
    (mr, mj): (usize, usize),
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(R * J == 8 && mr <= R && mj <= J);
        // 4 × 2: lane jj·4 + rr, so [r0k0, r0k1, r1k0, r1k1] and [r2k0, r2k1, r3k0, r3k1];
        // 2 × 4: row 0 in lanes [0, 4, 1, 5], row 1 in [2, 6, 3, 7].
        let (lo, hi) = (_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let pair = [_mm_unpacklo_ps(lo, hi), _mm_unpackhi_ps(lo, hi)];
        for rr in 0..mr {
            let at = o.add(rr * ostride);
            let v = if R == 4 {
                let v = pair[rr / 2];
                if rr % 2 == 0 {
                    v
                } else {
                    _mm_movehl_ps(v, v)
                }
            } else {
                pair[rr]
            };
            match mj {
                4 => _mm_storeu_ps(at, v),
                2 => _mm_storel_epi64(at.cast(), _mm_castps_si128(v)),
                _ => {
                    let mut x = [0f32; 4];
                    _mm_storeu_ps(x.as_mut_ptr(), v);
                    std::ptr::copy_nonoverlapping(x.as_ptr(), at, mj);
                }
            }
        }
    }
}

/// `out[r][j] = scale · Σ_x q[r][x] · k[j][x]` with `k` read in place (see the AVX-512
/// `qk_rows`): blocks of 8 dot products (4 rows × 2 keys, or 2 × 4).
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn qk_rows(q: Mat, k: Mat, out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe { qk_rows_kind::<F32>(q, raw(k), out, scale) }
}

/// [`qk_rows`] with bf16 or f16 key rows read in place (`k.cols` a multiple of 8).
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn qk_rows_half(q: Mat, k: HalfMat, out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(k.cols().is_multiple_of(8));
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

/// [`qk_rows`] over key rows (pointer, rows, cols, row stride in elements) of a kind.
///
/// Blocks of 4 rows × 2 keys while 4 rows are left (each key vector widened once for four
/// rows: a decode step's query heads sharing a KV head), else 2 rows × 4 keys. Measured on AMD
/// Zen 3 (4 rows × 64 bf16 keys of 128, alone in L1): 41% → 47% of the FMA peak.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qk_rows_kind<const KIND: u8>(
    q: Mat,
    k: (*const u8, usize, usize, usize),
    out: MatMut,
    scale: f32,
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let (nr, d, bk) = (q.rows(), q.cols(), k.1);
        debug_assert!(k.2 == d && out.rows() == nr && out.cols() == bk);
        let mut out = out;
        let mut r = 0;
        let full = d.is_multiple_of(8);
        while r < nr {
            let o = out.reborrow();
            if nr - r >= 4 {
                if full {
                    qk_rows_block::<KIND, 4, 2, true>(q, k, (r, 4), o, scale);
                } else {
                    qk_rows_block::<KIND, 4, 2, false>(q, k, (r, 4), o, scale);
                }
                r += 4;
            } else {
                let mr = (nr - r).min(2);
                if full {
                    qk_rows_block::<KIND, 2, 4, true>(q, k, (r, mr), o, scale);
                } else {
                    qk_rows_block::<KIND, 2, 4, false>(q, k, (r, mr), o, scale);
                }
                r += mr;
            }
        }
    }
}

/// Rows `r..r + mr` (`mr ≤ R`) of [`qk_rows_kind`], in blocks of `R` rows × `J` keys
/// (`R · J = 8` accumulators, summed by [`reduce8`]); `FULL`: the rows are whole vectors
/// (`d` a multiple of 8), loaded without masks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qk_rows_block<const KIND: u8, const R: usize, const J: usize, const FULL: bool>(
    q: Mat,
    (kp, bk, _, kstride): (*const u8, usize, usize, usize),
    (r, mr): (usize, usize),
    mut out: MatMut,
    scale: f32,
) {
    // SAFETY: as in `qk_rows_kind`: rows `r..r + mr` of `q` and `out`, keys `j..j + mj` of
    // `k`, whole vectors of a row (masked past `d` for f32).
    unsafe {
        debug_assert!(R * J == 8 && mr <= R && r + mr <= q.rows());
        let (d, ostride) = (q.cols(), out.stride());
        let nv = d.div_ceil(8);
        // The block's query rows (past `mr`: the first again, computed and not stored).
        let mut qrow = [q.data().as_ptr(); R];
        for (rr, p) in qrow.iter_mut().enumerate() {
            *p = q.data().as_ptr().add((r + rr.min(mr - 1)) * q.stride());
        }
        let mut j = 0;
        while j < bk {
            let mj = (bk - j).min(J);
            // Keys past `mj`: the last again.
            let mut krow = [kp; J];
            for (jj, p) in krow.iter_mut().enumerate() {
                *p = kp.add((j + jj.min(mj - 1)) * kstride * elem(KIND));
            }
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            // Constant trip counts throughout, so that the accumulators and the key vectors
            // stay in registers.
            for v in 0..nv {
                let m = lanes(d - 8 * v);
                let mut kv = [_mm256_setzero_ps(); J];
                for (kv, krow) in kv.iter_mut().zip(krow) {
                    let at = krow.add(8 * v * elem(KIND));
                    *kv = if KIND == F32 && FULL {
                        _mm256_loadu_ps(at.cast())
                    } else {
                        load8::<KIND>(at, m)
                    };
                }
                for (rr, qrow) in qrow.iter().enumerate() {
                    let qv = if FULL {
                        _mm256_loadu_ps(qrow.add(8 * v))
                    } else {
                        _mm256_maskload_ps(qrow.add(8 * v), m)
                    };
                    for (jj, &kv) in kv.iter().enumerate() {
                        let i = rr * J + jj;
                        acc[i / 4][i % 4] = _mm256_fmadd_ps(qv, kv, acc[i / 4][i % 4]);
                    }
                }
            }
            super::stream::step();
            // The 8 dot products in one vector (see `reduce8` for the lane order).
            let sums = _mm256_mul_ps(_mm256_set1_ps(scale), reduce8(&acc));
            let o = out.data().as_mut_ptr().add(r * ostride + j);
            store_block::<R, J>(sums, (o, ostride), (mr, mj));
            j += mj;
        }
    }
}

/// [`qk_rows`] with `k` int8 (offset by 128) or fp8 e4m3, read in place (`k.cols` a multiple of 8; the rows'
/// scales are applied to `out` by the caller).
///
/// # Safety
/// avx2, fma and f16c must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn qk_rows_bytes(q: Mat, k: ByteMat, out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(k.cols().is_multiple_of(8));
        let kp = (k.data().as_ptr(), k.rows(), k.cols(), k.stride());
        if k.is_fp8() {
            qk_rows_kind::<F8>(q, kp, out, scale)
        } else {
            qk_rows_kind::<I8>(q, kp, out, scale)
        }
    }
}
