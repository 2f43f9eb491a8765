//! The bf16 projection GEMM's kernel for CPUs without AVX512-BF16 (AVX2 + FMA; also AVX-512
//! CPUs without the bf16 extension): one `K` block of a task, for [`super::gemm::gemm_bt_avx2`].
//!
//! No widened copies: 16 bf16 elements are loaded as one 256-bit vector and split in registers
//! into their even elements (`x << 16`) and odd elements (`x & 0xFFFF0000`), each 8 f32 lanes;
//! a dot product is the same sum in any order, so the even halves of both operands are
//! multiplied together and the odd halves together. Blocks of 2 rows × 3 weight rows keep 6
//! accumulators and 3 weight vectors in the 16 ymm registers (2 × 4 spilled its halves: 30%
//! slower), summed by the shuffle tree [`super::avx2::reduce8`] (two of its eight inputs zero). The task structure (L1 blocks of `x`
//! copied contiguously, row-major f32 accumulators) is the AVX-512 kernels'.
#![allow(clippy::needless_range_loop)] // explicit indices name the register block's cells

use std::arch::x86_64::*;

use half::bf16;

use super::avx2::reduce8;
use super::gemm::{Acc, KC_BYTES, L1_ROWS, NB};

/// bf16 elements per `K` block.
const KCE: usize = KC_BYTES / 2;

/// Adds one `K` block of products to a task's accumulators: `Σ_{x < kk} x[r][x]·w[j][x]` for
/// `r < mr`, `j < nc` (rows of both operands `stride` apart) to `acc[r·NB + j]`.
///
/// # Safety
/// avx2 and fma must be available; the pointers cover `mr` (`nc`) rows of `kk ≤ KCE` elements,
/// `stride` apart.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn task_block(
    x: *const bf16,
    w: *const bf16,
    stride: usize,
    (mr, nc, kk): (usize, usize, usize),
    acc: &mut Acc,
) {
    debug_assert!(kk <= KCE);
    // Each L1 block of rows is copied to `buf`, zero-padded to whole 16-element steps.
    let kp = kk.div_ceil(16) * 16;
    let mut buf = [bf16::ZERO; L1_ROWS * KCE];
    let mut r0 = 0;
    while r0 < mr {
        let r1 = (r0 + L1_ROWS).min(mr);
        for r in r0..r1 {
            let row = std::slice::from_raw_parts(x.add(r * stride), kk);
            let at = (r - r0) * KCE;
            buf[at..at + kk].copy_from_slice(row);
            buf[at + kk..at + kp].fill(bf16::ZERO);
        }
        let mut j = 0;
        while j < nc {
            let nj = (nc - j).min(3);
            let mut r = r0;
            while r < r1 {
                let nr = (r1 - r).min(2);
                let xp = buf.as_ptr().add((r - r0) * KCE);
                let wp = w.add(j * stride);
                let sums = match (nr, nj) {
                    (1, 1) => dots::<1, 1>(xp, wp, stride, kk),
                    (1, 2) => dots::<1, 2>(xp, wp, stride, kk),
                    (1, 3) => dots::<1, 3>(xp, wp, stride, kk),
                    (2, 1) => dots::<2, 1>(xp, wp, stride, kk),
                    (2, 2) => dots::<2, 2>(xp, wp, stride, kk),
                    _ => dots::<2, 3>(xp, wp, stride, kk),
                };
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
                for rr in 0..nr {
                    for jj in 0..nj {
                        // `reduce8`: the sum of accumulator i = 4·rr + jj is in lane (i % 2)·4 + i / 2.
                        let i = 4 * rr + jj;
                        acc[(r + rr) * NB + j + jj] += lanes[(i % 2) * 4 + i / 2];
                    }
                }
                r += nr;
            }
            j += nj;
        }
        r0 = r1;
    }
}

/// The `R × C` dot products (`R ≤ 2`, `C ≤ 3`) of `R` rows of `x` (`KCE` apart, zero-padded to a
/// multiple of 16) with `C` rows of `w` (`ws` apart, `kk` elements: a partial last step is read
/// through a zero-padded copy), as [`reduce8`] lays them out.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots<const R: usize, const C: usize>(
    x: *const bf16,
    w: *const bf16,
    ws: usize,
    kk: usize,
) -> __m256 {
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let full = kk / 16;
    for s in 0..full {
        step::<R, C>(&mut acc, x, w, ws, 16 * s);
    }
    let tail = kk - 16 * full;
    if tail > 0 {
        // The last weight elements through zero-padded copies (`x` is padded already).
        let mut pad = [[bf16::ZERO; 16]; 4];
        for c in 0..C {
            let row = std::slice::from_raw_parts(w.add(c * ws + 16 * full), tail);
            pad[c][..tail].copy_from_slice(row);
        }
        let rows = [0, 1, 2, 3].map(|c| pad[c].as_ptr());
        step_rows::<R, C>(&mut acc, x.add(16 * full), rows);
    }
    reduce8(&acc)
}

/// One 16-element step at element `at` of `x` (rows `KCE` apart) and `w` (rows `ws` apart).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn step<const R: usize, const C: usize>(
    acc: &mut [[__m256; 4]; 2],
    x: *const bf16,
    w: *const bf16,
    ws: usize,
    at: usize,
) {
    // Rows past `C` are never loaded.
    let rows = [0, 1, 2, 3].map(|c| w.wrapping_add(c * ws + at));
    step_rows::<R, C>(acc, x.add(at), rows);
}

/// One 16-element step over `x` rows `KCE` apart and the given weight rows: each vector loaded
/// once, its even and odd halves multiplied with the other operand's.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn step_rows<const R: usize, const C: usize>(
    acc: &mut [[__m256; 4]; 2],
    x: *const bf16,
    w: [*const bf16; 4],
) {
    let load = |p: *const bf16| _mm256_loadu_si256(p as *const __m256i);
    let even = |v: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
    let odd = |v: __m256i| {
        _mm256_castsi256_ps(_mm256_and_si256(
            v,
            _mm256_set1_epi32(0xFFFF_0000u32 as i32),
        ))
    };
    let wv: [__m256i; C] = std::array::from_fn(|c| load(w[c]));
    for r in 0..R {
        let xv = load(x.add(r * KCE));
        let (xe, xo) = (even(xv), odd(xv));
        for c in 0..C {
            acc[r][c] = _mm256_fmadd_ps(xe, even(wv[c]), acc[r][c]);
            acc[r][c] = _mm256_fmadd_ps(xo, odd(wv[c]), acc[r][c]);
        }
    }
}
