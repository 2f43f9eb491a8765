//! The half-precision projection GEMM's kernels for CPUs without AVX-512 (AVX2 + FMA + F16C;
//! for bf16 also AVX-512 CPUs without the bf16 extension): one `K` block of a task, for
//! [`super::gemm::gemm_bt_avx2`].
//!
//! No widened copies: 16 elements are loaded as one 256-bit vector and split in registers into
//! two vectors of 8 f32 lanes: bf16 into its even elements (`x << 16`) and odd elements
//! (`x & 0xFFFF0000`), f16 into its first and last 8 (`vcvtph2ps` of each 128-bit half). A dot
//! product is the same sum in any order, so the first halves of both operands are multiplied
//! together and the second halves together. Blocks of 2 rows × 4 weight rows keep 8
//! accumulators (with 4-cycle FMAs, 8 independent chains keep both FMA pipes busy; 2 × 3 left
//! a quarter of them idle: 170 → 200 GFLOP/s on 2 Zen 5 cores), the two rows of `x` split once
//! per step and each weight row split in turn (14 of the 16 ymm registers; splitting every
//! weight row first spilled), summed by the shuffle tree [`super::avx2_rows::reduce8`]. The task
//! structure (L1 blocks of `x` copied contiguously, row-major f32 accumulators) is the AVX-512
//! kernels'.
#![allow(clippy::needless_range_loop)] // explicit indices name the register block's cells

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::avx2_rows::reduce8;
use super::gemm::{Acc, Block, Elem, KC_BYTES, L1_ROWS, NB};

/// Half elements per `K` block.
const KCE: usize = KC_BYTES / 2;

/// A 16-bit element type of the AVX2 kernels: bf16 or f16.
pub trait Half: Elem {
    /// Whether the elements are f16 (else bf16): how [`split`] widens them.
    const F16: bool;
    /// One `K` block of a task on AVX2 + FMA + F16C.
    const AVX2_BLOCK: Block<Self> = task_block::<Self>;
}

impl Half for bf16 {
    const F16: bool = false;
}

impl Half for f16 {
    const F16: bool = true;
}

/// 16 elements of `T` as two vectors of 8 f32 lanes, each element in exactly one of them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split<T: Half>(v: __m256i) -> (__m256, __m256) {
    if T::F16 {
        (
            _mm256_cvtph_ps(_mm256_castsi256_si128(v)),
            _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(v)),
        )
    } else {
        (
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
            _mm256_castsi256_ps(_mm256_and_si256(
                v,
                _mm256_set1_epi32(0xFFFF_0000u32 as i32),
            )),
        )
    }
}

/// Adds one `K` block of products to a task's accumulators: `Σ_{x < kk} x[r][x]·w[j][x]` for
/// `r < mr`, `j < nc` (rows of both operands `stride` apart) to `acc[r·NB + j]`.
///
/// # Safety
/// avx2, fma and f16c must be available; the pointers cover `mr` (`nc`) rows of `kk ≤ KCE`
/// elements, `stride` apart.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn task_block<T: Half>(
    x: *const T,
    w: *const T,
    stride: usize,
    (mr, nc, kk): (usize, usize, usize),
    acc: &mut Acc,
) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        debug_assert!(kk <= KCE);
        // Each L1 block of rows is copied to `buf`, zero-padded to whole 16-element steps.
        let kp = kk.div_ceil(16) * 16;
        let mut buf = [T::default(); L1_ROWS * KCE];
        let mut r0 = 0;
        while r0 < mr {
            let r1 = (r0 + L1_ROWS).min(mr);
            for r in r0..r1 {
                let row = std::slice::from_raw_parts(x.add(r * stride), kk);
                let at = (r - r0) * KCE;
                buf[at..at + kk].copy_from_slice(row);
                buf[at + kk..at + kp].fill(T::default());
            }
            let mut j = 0;
            while j < nc {
                let nj = (nc - j).min(4);
                let mut r = r0;
                while r < r1 {
                    let nr = (r1 - r).min(2);
                    let xp = buf.as_ptr().add((r - r0) * KCE);
                    let wp = w.add(j * stride);
                    let sums = match (nr, nj) {
                        (1, 1) => dots::<T, 1, 1>(xp, wp, stride, kk),
                        (1, 2) => dots::<T, 1, 2>(xp, wp, stride, kk),
                        (1, 3) => dots::<T, 1, 3>(xp, wp, stride, kk),
                        (1, 4) => dots::<T, 1, 4>(xp, wp, stride, kk),
                        (2, 1) => dots::<T, 2, 1>(xp, wp, stride, kk),
                        (2, 2) => dots::<T, 2, 2>(xp, wp, stride, kk),
                        (2, 3) => dots::<T, 2, 3>(xp, wp, stride, kk),
                        _ => dots::<T, 2, 4>(xp, wp, stride, kk),
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
}

/// The `R × C` dot products (`R ≤ 2`, `C ≤ 4`) of `R` rows of `x` (`KCE` apart, zero-padded to a
/// multiple of 16) with `C` rows of `w` (`ws` apart, `kk` elements: a partial last step is read
/// through a zero-padded copy), as [`reduce8`] lays them out.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots<T: Half, const R: usize, const C: usize>(
    x: *const T,
    w: *const T,
    ws: usize,
    kk: usize,
) -> __m256 {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let full = kk / 16;
        for s in 0..full {
            step::<T, R, C>(&mut acc, x, w, ws, 16 * s);
        }
        let tail = kk - 16 * full;
        if tail > 0 {
            // The last weight elements through zero-padded copies (`x` is padded already).
            let mut pad = [[T::default(); 16]; 4];
            for c in 0..C {
                let row = std::slice::from_raw_parts(w.add(c * ws + 16 * full), tail);
                pad[c][..tail].copy_from_slice(row);
            }
            let rows = [0, 1, 2, 3].map(|c| pad[c].as_ptr());
            step_rows::<T, R, C>(&mut acc, x.add(16 * full), rows);
        }
        reduce8(&acc)
    }
}

/// One 16-element step at element `at` of `x` (rows `KCE` apart) and `w` (rows `ws` apart).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step<T: Half, const R: usize, const C: usize>(
    acc: &mut [[__m256; 4]; 2],
    x: *const T,
    w: *const T,
    ws: usize,
    at: usize,
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        // Rows past `C` are never loaded.
        let rows = [0, 1, 2, 3].map(|c| w.wrapping_add(c * ws + at));
        step_rows::<T, R, C>(acc, x.add(at), rows);
    }
}

/// One 16-element step over `x` rows `KCE` apart and the given weight rows: each vector loaded
/// once and split into two halves of 8 f32 lanes ([`split`]), each multiplied with the other
/// operand's matching half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn step_rows<T: Half, const R: usize, const C: usize>(
    acc: &mut [[__m256; 4]; 2],
    x: *const T,
    w: [*const T; 4],
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let load = |p: *const T| split::<T>(_mm256_loadu_si256(p as *const __m256i));
        // The rows of `x` split once; each weight row split in turn (8 accumulators, 2R + 2
        // operand halves: 14 of the 16 registers).
        let xv: [(__m256, __m256); R] = std::array::from_fn(|r| load(x.add(r * KCE)));
        for c in 0..C {
            let (wa, wb) = load(w[c]);
            for r in 0..R {
                acc[r][c] = _mm256_fmadd_ps(xv[r].0, wa, acc[r][c]);
                acc[r][c] = _mm256_fmadd_ps(xv[r].1, wb, acc[r][c]);
            }
        }
    }
}
