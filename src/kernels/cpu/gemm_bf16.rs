//! `y = x · wᵀ (+ bias)` for bf16 `x` (`M × K`) and `w` (`N × K`, `nn.Linear`'s orientation),
//! both row-major, with f32 accumulation by AVX512-BF16 dot products (`vdpbf16ps`: two bf16
//! products per f32 lane per instruction, the instruction PyTorch's oneDNN uses) and one
//! rounding to bf16 at the end (bias added in f32 first).
//!
//! candle's CPU matmul has no bf16 kernel: it widens both operands to f32 copies, multiplies in
//! f32 and rounds back, single-threaded conversions included. Here the operands are read in
//! place: rows of `x` and of `w` are both contiguous in `K`, so a block of 4 rows × 4 weight
//! rows keeps 16 dot-product accumulators (the form of [`super::avx512::qk_rows`]), summed
//! horizontally once per block of [`KC`] keys by the shuffle tree
//! [`super::avx512::reduce16`].
//!
//! Work is cut into tasks of up to [`MB`] rows × [`NB`] weight rows, run on rayon's pool; inside
//! a task the `K` range is walked in blocks of [`KC`] so that the 4-row panels of both operands
//! stay in L1 while the task's `MB × KC` / `NB × KC` blocks stay in L2.
#![allow(clippy::needless_range_loop)] // explicit indices name the register block's cells

use std::arch::x86_64::*;

use half::bf16;
use rayon::prelude::*;

use super::avx512::reduce16;

/// Elements of `K` per block: a 4-row panel of either operand is 8 KiB.
pub const KC: usize = 1024;
/// Rows of `x` per task: the task's `MB × KC` block of `x` (32 KiB) stays in L1 while its
/// weight rows stream through it 4 at a time.
pub const MB: usize = 16;
/// Rows of `w` (output columns) per task.
pub const NB: usize = 256;

/// Accumulator cells per task: one per 4 × 4 register block.
const TILES: usize = (MB / 4) * (NB / 4);

/// Whether this CPU has the instructions of [`gemm_bt`].
pub fn supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

/// The output, written from many tasks: each task writes its own `MB × NB` block only.
#[derive(Clone, Copy)]
struct OutPtr(*mut bf16);
// SAFETY: tasks write disjoint blocks of the buffer, which outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Element `i` of the output (a method, so that closures capture the whole `Sync` wrapper).
    fn at(self, i: usize) -> *mut bf16 {
        self.0.wrapping_add(i)
    }
}

/// `out[r][j] = bf16(Σ_x x[r][x]·w[j][x] + bias[j])` for `r < m`, `j < n`, on rayon's pool.
///
/// # Panics
/// When the slices are shorter than `m·k`, `n·k`, `m·n` and `n` (bias), or when [`supported`]
/// is false: callers check both.
pub fn gemm_bt(
    x: &[bf16],
    w: &[bf16],
    bias: Option<&[f32]>,
    out: &mut [bf16],
    (m, n, k): (usize, usize, usize),
) {
    assert!(supported(), "gemm_bf16: the CPU lacks avx512bf16");
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
        // One 16-lane cell per 4 × 4 block, lane `4·jj + rr` (the layout of `dots`' sums).
        let mut acc = [[0f32; 16]; TILES];
        if let Some(b) = bias {
            for (t, cell) in acc.iter_mut().enumerate() {
                let j = c0 + 4 * (t % (NB / 4));
                for (lane, a) in cell.iter_mut().enumerate() {
                    *a = b.get(j + lane / 4).copied().unwrap_or(0.0);
                }
            }
        }
        let mut k0 = 0;
        while k0 < k {
            let kk = (k - k0).min(KC);
            // SAFETY: the CPU has the features (asserted above); every pointer below stays in
            // `x` (rows r0..r0+mr, columns k0..k0+kk) or `w` (rows c0..c0+nc, same columns).
            unsafe {
                task_block(
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
            for (j, o) in row.iter_mut().enumerate() {
                *o = bf16::from_f32(acc[(r / 4) * (NB / 4) + j / 4][4 * (j % 4) + r % 4]);
            }
        }
    });
}

/// Adds one `KC` block of products to a task's accumulators: `Σ_{x < kk} x[r][x]·w[j][x]` for
/// `r < mr`, `j < nc` (rows of both operands `stride` apart) to lane `4·(j % 4) + r % 4` of cell
/// `(r / 4)·(NB / 4) + j / 4`. Each group of 4 weight rows is held in L1 while the task's rows
/// pass it 4 at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn task_block(
    x: *const bf16,
    w: *const bf16,
    stride: usize,
    (mr, nc, kk): (usize, usize, usize),
    acc: &mut [[f32; 16]; TILES],
) {
    let mut j = 0;
    while j < nc {
        let nj = (nc - j).min(4);
        let mut r = 0;
        while r < mr {
            let nr = (mr - r).min(4);
            let xp = x.add(r * stride);
            let wp = w.add(j * stride);
            let sums = match (nr, nj) {
                (1, 2) => dots::<1, 2>(xp, wp, stride, kk),
                (1, 3) => dots::<1, 3>(xp, wp, stride, kk),
                (1, 4) => dots::<1, 4>(xp, wp, stride, kk),
                (2, 1) => dots::<2, 1>(xp, wp, stride, kk),
                (2, 2) => dots::<2, 2>(xp, wp, stride, kk),
                (2, 3) => dots::<2, 3>(xp, wp, stride, kk),
                (2, 4) => dots::<2, 4>(xp, wp, stride, kk),
                (3, 1) => dots::<3, 1>(xp, wp, stride, kk),
                (3, 2) => dots::<3, 2>(xp, wp, stride, kk),
                (3, 3) => dots::<3, 3>(xp, wp, stride, kk),
                (3, 4) => dots::<3, 4>(xp, wp, stride, kk),
                (4, 1) => dots::<4, 1>(xp, wp, stride, kk),
                (4, 2) => dots::<4, 2>(xp, wp, stride, kk),
                (4, 3) => dots::<4, 3>(xp, wp, stride, kk),
                (4, 4) => dots::<4, 4>(xp, wp, stride, kk),
                _ => dots::<1, 1>(xp, wp, stride, kk),
            };
            let cell = acc[(r / 4) * (NB / 4) + j / 4].as_mut_ptr();
            _mm512_storeu_ps(cell, _mm512_add_ps(_mm512_loadu_ps(cell), sums));
            r += nr;
        }
        j += nj;
    }
}

/// The `R × C` dot products (`R, C ≤ 4`) of `R` rows of `x` with `C` rows of `w` over `kk`
/// elements, in one vector: lane `4·c + r` (other lanes 0). Operand rows beyond `R` / `C` are
/// not read, and the last partial 32-element step is a masked load (no element past `kk`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dots<const R: usize, const C: usize>(
    x: *const bf16,
    w: *const bf16,
    stride: usize,
    kk: usize,
) -> __m512 {
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let full = kk / 32;
    for s in 0..full {
        step::<R, C, false>(&mut acc, x, w, stride, 32 * s, u32::MAX);
    }
    let tail = kk - 32 * full;
    if tail > 0 {
        step::<R, C, true>(&mut acc, x, w, stride, 32 * full, (1u32 << tail) - 1);
    }
    reduce16(&acc)
}

/// One 32-element step of [`dots`] at element `at`: whole vectors, or (`MASKED`) the lanes of
/// `m` only (the last, partial step).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn step<const R: usize, const C: usize, const MASKED: bool>(
    acc: &mut [[__m512; 4]; 4],
    x: *const bf16,
    w: *const bf16,
    stride: usize,
    at: usize,
    m: u32,
) {
    let load = |p: *const bf16| -> __m512bh {
        let v = if MASKED {
            _mm512_maskz_loadu_epi16(m, p as *const i16)
        } else {
            _mm512_loadu_si512(p as *const __m512i)
        };
        std::mem::transmute(v)
    };
    let wv: [__m512bh; C] = std::array::from_fn(|c| load(w.add(c * stride + at)));
    for r in 0..R {
        let xv = load(x.add(r * stride + at));
        for c in 0..C {
            acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, wv[c]);
        }
    }
}
