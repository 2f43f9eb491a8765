//! `y = x · wᵀ (+ bias)` for `x` (`M × K`) and `w` (`N × K`, `nn.Linear`'s orientation), both
//! row-major, on AVX-512: the projections' matrix product.
//!
//! - **bf16** (CPUs with AVX512-BF16): f32 accumulation by `vdpbf16ps` (two bf16 products per
//!   f32 lane per instruction, the instruction PyTorch's oneDNN uses) and one rounding to bf16 at
//!   the end, the bias added in f32 first. candle's CPU matmul has no bf16 kernel: it widens both
//!   operands to f32 copies (single-threaded), multiplies in f32, rounds back, and adds the bias
//!   in bf16.
//! - **f32**: the same loops with FMAs, faster than the `gemm` crate candle's matmul uses on
//!   the projections' shapes (README, "Module forward").
//! - **f16**: 16 elements per load widened to f32 in registers (`vcvtph2ps`), then the f32
//!   loops; one rounding to f16 at the end, the bias added in f32 first. candle's f16 matmul
//!   goes through the `gemm` crate's f16 path and adds the bias in f16.
//!
//! The operands are read in place: rows of `x` and of `w` are both contiguous in `K`, so a block
//! of 4 rows × 4 weight rows keeps 16 dot-product accumulators (the form of
//! [`super::avx512::qk_rows`]), summed horizontally once per block of [`KC_BYTES`] bytes of `K` by the
//! shuffle tree [`super::avx512::reduce16`].
//!
//! Work is cut into tasks of up to [`MB`] rows × [`NB`] weight rows, run on rayon's pool; inside
//! a task the `K` range is walked in blocks of [`KC_BYTES`] per row, so that the task's block of `x`
//! stays in L1 while its weight rows pass through 4 at a time.

use std::arch::x86_64::*;

use half::{bf16, f16};
use rayon::prelude::*;

use super::avx512::reduce16;

/// Bytes of each row per `K` block (1024 bf16 or 512 f32 elements): a 4-row panel of either
/// operand is 8 KiB.
pub const KC_BYTES: usize = 2048;
/// Rows of `x` per L1 block: `L1_ROWS × KC_BYTES` (32 KiB) stays in L1 while the task's weight
/// rows pass it 4 at a time.
pub const L1_ROWS: usize = 16;
/// Rows of `x` per task: the task's block of weight rows (`NB × KC_BYTES`, 512 KiB) is read
/// into L2 once and then passes each of the task's `MB / L1_ROWS` L1 blocks of rows.
pub const MB: usize = 64;
/// Rows of `w` (output columns) per task.
pub const NB: usize = 256;

/// A task's f32 accumulators, row-major (`MB` rows of `NB`).
pub type Acc = [f32; MB * NB];

/// An element type of the GEMM: bf16 (AVX512-BF16 dot products), f32 (AVX-512F FMAs) or f16
/// (widened to f32 in registers, AVX-512F FMAs).
pub trait Elem: Copy + Default + Send + Sync + 'static {
    /// Whether this CPU has the instructions of this element's kernel.
    fn supported() -> bool;
    /// `dst[j]` = the element nearest to `src[j]`.
    fn store_row(src: &[f32], dst: &mut [Self]);
    /// One `K` block of a task: [`bf16_kernel::task_block`], [`f16_kernel::task_block`] or
    /// [`f32_kernel::task_block`] (callable once [`Elem::supported`] holds).
    const BLOCK: Block<Self>;
}

impl Elem for bf16 {
    fn supported() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }

    fn store_row(src: &[f32], dst: &mut [Self]) {
        // `half`'s per-element conversion does not vectorise; this does.
        for (o, &x) in dst.iter_mut().zip(src) {
            *o = super::out::bf16_nearest(x);
        }
    }

    const BLOCK: Block<Self> = bf16_kernel::task_block;
}

impl Elem for f32 {
    fn supported() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    fn store_row(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }

    const BLOCK: Block<Self> = f32_kernel::task_block;
}

impl Elem for f16 {
    fn supported() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    }

    fn store_row(src: &[f32], dst: &mut [Self]) {
        // `half`'s slice conversion (F16C) rounds to nearest even, as `f16::from_f32`.
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }

    const BLOCK: Block<Self> = f16_kernel::task_block;
}

use crate::gemm::OutPtr;

/// `out[r][j] = bf16(Σ_x x[r][x]·w[j][x] + bias[j])` for `r < m`, `j < n`, on rayon's pool.
///
/// # Panics
/// When the slices are shorter than `m·k`, `n·k`, `m·n` and `n` (bias), or when
/// [`Elem::supported`] is false: callers check both.
pub fn gemm_bt<T: Elem>(
    x: &[T],
    w: &[T],
    bias: Option<&[f32]>,
    out: &mut [T],
    mnk: (usize, usize, usize),
) {
    assert!(
        T::supported(),
        "gemm: the CPU lacks the kernel's instructions"
    );
    run(x, w, bias, out, mnk, T::BLOCK)
}

/// [`gemm_bt`] for bf16 or f16 on CPUs without AVX-512 (or, for bf16, without AVX512-BF16):
/// the AVX2 + FMA kernels ([`super::gemm_avx2`]).
///
/// # Panics
/// As [`gemm_bt`], and when the CPU lacks AVX2, FMA or F16C.
pub fn gemm_bt_avx2<T: super::gemm_avx2::Half>(
    x: &[T],
    w: &[T],
    bias: Option<&[f32]>,
    out: &mut [T],
    mnk: (usize, usize, usize),
) {
    assert!(avx2_supported(), "gemm: the CPU lacks AVX2 + FMA + F16C");
    run(x, w, bias, out, mnk, T::AVX2_BLOCK)
}

/// Whether this CPU has the instructions of [`gemm_bt_avx2`].
pub fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// One `K` block of a task: `(x, w, row stride, (rows, weight rows, K elements), accumulators)`.
///
/// # Safety
/// The CPU has the kernel's instructions; the pointers cover the rows and elements named.
pub type Block<T> = unsafe fn(*const T, *const T, usize, (usize, usize, usize), &mut Acc);

/// The parallel driver: tasks of `MB × NB` on rayon's pool, each walking `K` in blocks with
/// `block` (whose instructions the caller has checked), then rounding its rows out.
fn run<T: Elem>(
    x: &[T],
    w: &[T],
    bias: Option<&[f32]>,
    out: &mut [T],
    (m, n, k): (usize, usize, usize),
    block: Block<T>,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    let (tm, tn) = (m.div_ceil(MB), n.div_ceil(NB));
    let dst = OutPtr(out.as_mut_ptr());
    (0..tm * tn).into_par_iter().for_each(|t| {
        let (r0, c0) = ((t / tn) * MB, (t % tn) * NB);
        let (mr, nc) = ((m - r0).min(MB), (n - c0).min(NB));
        let mut acc: Acc = [0f32; MB * NB];
        if let Some(b) = bias {
            for row in acc.chunks_exact_mut(NB).take(mr) {
                row[..nc].copy_from_slice(&b[c0..c0 + nc]);
            }
        }
        let mut k0 = 0;
        while k0 < k {
            let kk = (k - k0).min(KC_BYTES / std::mem::size_of::<T>());
            // SAFETY: the CPU has the features (asserted above); every pointer below stays in
            // `x` (rows r0..r0+mr, columns k0..k0+kk) or `w` (rows c0..c0+nc, same columns).
            unsafe {
                block(
                    x.as_ptr().add(r0 * k + k0),
                    w.as_ptr().add(c0 * k + k0),
                    k,
                    (mr, nc, kk),
                    &mut acc,
                )
            };
            k0 += kk;
        }
        for r in 0..mr {
            // SAFETY: row r0 + r < m and columns c0..c0+nc < n are this task's block alone.
            let row = unsafe { std::slice::from_raw_parts_mut(dst.at((r0 + r) * n + c0), nc) };
            T::store_row(&acc[r * NB..r * NB + nc], row);
        }
    });
}

/// One element type's kernel, as a module `$name`: `task_block` (one `K` block of a task) over
/// `dots` (one register block) over `step` (one vector of each operand row), for element type
/// `$t` in vectors `$v` of `$lanes` elements, with the element's loads, multiply-accumulate and
/// target features.
macro_rules! dot_kernel {
    ($name:ident, $t:ty, $v:ty, $lanes:expr, $features:literal, $load:path, $load_tail:path, $mac:path) => {
        /// The dot-product kernel of one element type (see [`dot_kernel`]).
        pub mod $name {
            #![allow(clippy::needless_range_loop)] // explicit indices name the register block's cells
            use super::*;

            /// Adds one `K` block of products to a task's accumulators: `Σ_{x < kk} x[r][x]·w[j][x]` for
            /// `r < mr`, `j < nc` (rows of both operands `stride` apart) to `acc[r·NB + j]`. The task's rows go in blocks of `L1_ROWS` (held in L1),
            /// each passed by every group of 4 weight rows.
            #[target_feature(enable = $features)]
            pub unsafe fn task_block(
                x: *const $t,
                w: *const $t,
                stride: usize,
                (mr, nc, kk): (usize, usize, usize),
                acc: &mut super::Acc,
            ) {
                // SAFETY: called only by this module's kernels, which run with these target features
                // and pass pointers inside the operands their public entry points checked.
                unsafe {
                    // Blocks of L1_ROWS rows of `x` (held in L1), each passed by every group of 4
                    // weight rows (streamed from L2).
                    // Each L1 block is copied to `buf` first (rows `KCE` elements apart): rows of `x`
                    // a power of two of 4 KiB apart (K = 1024 in f32) would all map to the same L1
                    // sets and evict each other.
                    const KCE: usize = super::KC_BYTES / std::mem::size_of::<$t>();
                    let mut buf = [<$t>::default(); super::L1_ROWS * KCE];
                    debug_assert!(kk <= KCE);
                    let mut r0 = 0;
                    while r0 < mr {
                        let r1 = (r0 + super::L1_ROWS).min(mr);
                        for r in r0..r1 {
                            let row = std::slice::from_raw_parts(x.add(r * stride), kk);
                            buf[(r - r0) * KCE..(r - r0) * KCE + kk].copy_from_slice(row);
                        }
                        let mut j = 0;
                        while j < nc {
                            let nj = (nc - j).min(4);
                            let mut r = r0;
                            while r < r1 {
                                let nr = (r1 - r).min(4);
                                let xp = buf.as_ptr().add((r - r0) * KCE);
                                let wp = w.add(j * stride);
                                let sums = match (nr, nj) {
                                    (1, 2) => dots::<1, 2>(xp, KCE, wp, stride, kk),
                                    (1, 3) => dots::<1, 3>(xp, KCE, wp, stride, kk),
                                    (1, 4) => dots::<1, 4>(xp, KCE, wp, stride, kk),
                                    (2, 1) => dots::<2, 1>(xp, KCE, wp, stride, kk),
                                    (2, 2) => dots::<2, 2>(xp, KCE, wp, stride, kk),
                                    (2, 3) => dots::<2, 3>(xp, KCE, wp, stride, kk),
                                    (2, 4) => dots::<2, 4>(xp, KCE, wp, stride, kk),
                                    (3, 1) => dots::<3, 1>(xp, KCE, wp, stride, kk),
                                    (3, 2) => dots::<3, 2>(xp, KCE, wp, stride, kk),
                                    (3, 3) => dots::<3, 3>(xp, KCE, wp, stride, kk),
                                    (3, 4) => dots::<3, 4>(xp, KCE, wp, stride, kk),
                                    (4, 1) => dots::<4, 1>(xp, KCE, wp, stride, kk),
                                    (4, 2) => dots::<4, 2>(xp, KCE, wp, stride, kk),
                                    (4, 3) => dots::<4, 3>(xp, KCE, wp, stride, kk),
                                    (4, 4) => dots::<4, 4>(xp, KCE, wp, stride, kk),
                                    _ => dots::<1, 1>(xp, KCE, wp, stride, kk),
                                };
                                // Lane 4·jj + rr → 4·rr + jj: row rr's sums are lanes 4·rr..4·rr + 4.
                                let rows = _mm512_permutexvar_ps(
                                    _mm512_loadu_si512(TRANSPOSE_IDX.as_ptr() as *const __m512i),
                                    sums,
                                );
                                let at = acc.as_mut_ptr().add(r * super::NB + j);
                                if nj == 4 {
                                    let row = |i: usize| -> __m128 {
                                        match i {
                                            0 => _mm512_extractf32x4_ps::<0>(rows),
                                            1 => _mm512_extractf32x4_ps::<1>(rows),
                                            2 => _mm512_extractf32x4_ps::<2>(rows),
                                            _ => _mm512_extractf32x4_ps::<3>(rows),
                                        }
                                    };
                                    for rr in 0..nr {
                                        let p = at.add(rr * super::NB);
                                        _mm_storeu_ps(p, _mm_add_ps(_mm_loadu_ps(p), row(rr)));
                                    }
                                } else {
                                    let mut lanes = [0f32; 16];
                                    _mm512_storeu_ps(lanes.as_mut_ptr(), rows);
                                    for rr in 0..nr {
                                        for jj in 0..nj {
                                            *at.add(rr * super::NB + jj) += lanes[4 * rr + jj];
                                        }
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

            /// The `R × C` dot products (`R, C ≤ 4`) of `R` rows of `x` (`xs` apart) with `C` rows of `w`
            /// (`ws` apart) over `kk` elements, in one vector: lane `4·c + r` (other lanes 0). Operand rows beyond `R` / `C` are
            /// not read, and the last partial step is a masked load (no element past `kk`).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn dots<const R: usize, const C: usize>(
                x: *const $t,
                xs: usize,
                w: *const $t,
                ws: usize,
                kk: usize,
            ) -> __m512 {
                // SAFETY: called only by this module's kernels, which run with these target features
                // and pass pointers inside the operands their public entry points checked.
                unsafe {
                    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                    let full = kk / $lanes;
                    for s in 0..full {
                        step::<R, C, false>(&mut acc, (x, xs), (w, ws), $lanes * s, 0);
                    }
                    let tail = kk - $lanes * full;
                    if tail > 0 {
                        step::<R, C, true>(&mut acc, (x, xs), (w, ws), $lanes * full, tail);
                    }
                    reduce16(&acc)
                }
            }

            /// One step of [`dots`] (one vector of each operand row) at element `at`: whole vectors, or
            /// (`MASKED`) the first `tail` elements only (the last, partial step).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn step<const R: usize, const C: usize, const MASKED: bool>(
                acc: &mut [[__m512; 4]; 4],
                (x, xs): (*const $t, usize),
                (w, ws): (*const $t, usize),
                at: usize,
                tail: usize,
            ) {
                // SAFETY: called only by this module's kernels, which run with these target features
                // and pass pointers inside the operands their public entry points checked.
                unsafe {
                    let load = |p: *const $t| -> $v {
                        if MASKED {
                            $load_tail(p, tail)
                        } else {
                            $load(p)
                        }
                    };
                    let wv: [$v; C] = std::array::from_fn(|c| load(w.add(c * ws + at)));
                    for r in 0..R {
                        let xv = load(x.add(r * xs + at));
                        for c in 0..C {
                            acc[r][c] = $mac(acc[r][c], xv, wv[c]);
                        }
                    }
                }
            }
        }
    };
}

dot_kernel!(
    bf16_kernel,
    bf16,
    __m512bh,
    32,
    "avx512f,avx512bw,avx512bf16",
    load_bf16,
    load_bf16_tail,
    dp_bf16
);
dot_kernel!(
    f16_kernel,
    f16,
    __m512,
    16,
    "avx512f,avx512bw,avx512vl",
    load_f16,
    load_f16_tail,
    fma_f32
);
dot_kernel!(
    f32_kernel,
    f32,
    __m512,
    16,
    "avx512f",
    load_f32,
    load_f32_tail,
    fma_f32
);

/// The 4 × 4 transpose of a vector's lanes: `dots`' lane `4·c + r` to `4·r + c`.
const TRANSPOSE_IDX: [i32; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// 32 bf16 elements.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load_bf16(p: *const bf16) -> __m512bh {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe { std::mem::transmute(_mm512_loadu_si512(p as *const __m512i)) }
}

/// The first `n < 32` of 32 bf16 elements, the rest 0 (nothing past them is read).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load_bf16_tail(p: *const bf16, n: usize) -> __m512bh {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe { std::mem::transmute(_mm512_maskz_loadu_epi16((1u32 << n) - 1, p as *const i16)) }
}

/// `acc` plus the products of 16 pairs: `vdpbf16ps`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dp_bf16(acc: __m512, a: __m512bh, b: __m512bh) -> __m512 {
    _mm512_dpbf16_ps(acc, a, b)
}

/// 16 f32 elements.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32(p: *const f32) -> __m512 {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe { _mm512_loadu_ps(p) }
}

/// The first `n < 16` of 16 f32 elements, the rest 0 (nothing past them is read).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_f32_tail(p: *const f32, n: usize) -> __m512 {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe { _mm512_maskz_loadu_ps((1u16 << n) - 1, p) }
}

/// 16 f16 elements, widened to f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_f16(p: *const f16) -> __m512 {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
}

/// The first `n < 16` of 16 f16 elements widened to f32, the rest 0 (nothing past them is
/// read).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn load_f16_tail(p: *const f16, n: usize) -> __m512 {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((1u16 << n) - 1, p as *const i16)) }
}

/// `acc + a·b`: one FMA.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fma_f32(acc: __m512, a: __m512, b: __m512) -> __m512 {
    _mm512_fmadd_ps(a, b, acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorisable bf16 rounding equals `half`'s (round to nearest even; NaN stays NaN,
    /// infinities and overflow to infinity as in `half`).
    #[test]
    fn bf16_store_row_rounds_like_half() {
        let mut src = vec![
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::from_bits(0x3F80_8000), // a tie: 1 + 2^-8, rounds to even (1.0)
            f32::from_bits(0x3F81_8000), // a tie that rounds up
            f32::from_bits(0x7F7F_FFFF),
        ];
        let mut s = 0x9E37_79B9u32;
        for _ in 0..4096 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            src.push(f32::from_bits(s));
        }
        let mut got = vec![bf16::ZERO; src.len()];
        <bf16 as Elem>::store_row(&src, &mut got);
        for (x, g) in src.iter().zip(&got) {
            let want = bf16::from_f32(*x);
            if x.is_nan() {
                assert!(g.is_nan(), "{x:e} ({:#x}) → {g}", x.to_bits());
            } else {
                assert_eq!(g.to_bits(), want.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
    }
}
