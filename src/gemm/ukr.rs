//! The register-tiled micro-kernels: one `MR × NR` tile of `C` (f32) from a packed sliver of `A`
//! (`MR` rows, `kc` steps: `A[k][i]` at `a + k·MR + i`) and a packed panel of `B` (`kc` steps of
//! `NR` columns: `B[k][j]` at `b + k·NR + j`), in the broadcast formulation of BLIS and oneDNN:
//! each step broadcasts one element of each of the `MR` rows of `A` against the `NR / lanes`
//! vectors of `B`'s step, into `MR · NR / lanes` accumulators that stay in registers for the
//! whole `kc` loop.
//!
//! | kernel | tile | accumulators | per step |
//! |---|---|---|---|
//! | [`f32_avx512`] | 14 × 32 | 28 zmm | 2 loads, 14 broadcasts (folded into the FMAs), 28 FMAs |
//! | [`bf16_avx512`] | 14 × 32 | 28 zmm | 2 loads, 14 pair broadcasts, 28 `vdpbf16ps` (2 `k` each) |
//! | [`f32_avx2`] | 6 × 16 | 12 ymm | 2 loads, 6 broadcasts, 12 FMAs (BLIS haswell's shape) |
//!
//! In [`bf16_avx512`] a packed element is a pair of bf16 values (`k` even in the low half, `k + 1`
//! in the high half) and a step covers two `k`: `vdpbf16ps` adds both products to each f32 lane.
//!
//! Every kernel computes a whole tile; the driver sends partial tiles through a scratch tile.
//! `C` is written as `C = bias + AB` (`init`, bias optional) or `C += AB`, or (the last block of
//! `K` of a bf16 / f16 product) rounded to 16 bits straight into the output ([`Out`]).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of the AVX-512 tiles.
pub(crate) const MR_512: usize = 14;
/// Columns of the AVX-512 tiles (two vectors of 16 lanes).
pub(crate) const NR_512: usize = 32;
/// Rows of the AVX2 tile.
pub(crate) const MR_256: usize = 6;
/// Columns of the AVX2 tile (two vectors of 8 lanes).
pub(crate) const NR_256: usize = 16;

/// Writes the tile of accumulators `$acc` (rows of two vectors) as [`Out`] says, with the
/// vector type's `$load`, `$store`, `$add`, `$zero`, `$lanes` and 16-bit rounding `$round`
/// (`(vector, Half) -> 16-bit vector`, `$store16` to write it; unused by kernels given
/// `Half::No` only). A macro so that it inlines into each kernel (a function would receive the
/// accumulators through memory).
macro_rules! store_tile {
    ($acc:expr, $out:expr, $lanes:expr, $load:ident, $store:ident, $add:ident, $zero:ident, $round:expr, $store16:expr) => {{
        let o: Out = $out;
        let add = if !o.init {
            None
        } else if o.bias.is_null() {
            Some(($zero(), $zero()))
        } else {
            Some(($load(o.bias), $load(o.bias.add($lanes))))
        };
        for (i, row) in $acc.iter().enumerate() {
            // Wrapping: with `half` and `init`, `c` is never dereferenced and may dangle.
            let p = o.c.wrapping_add(i * o.ldc);
            let (c0, c1) = match add {
                Some(b) => b,
                None => ($load(p), $load(p.add($lanes))),
            };
            let (v0, v1) = ($add(c0, row[0]), $add(c1, row[1]));
            if o.half == Half::No {
                $store(p, v0);
                $store(p.add($lanes), v1);
            } else {
                let h = o.h.add(i * o.ldh);
                $store16(h, $round(v0, o.half));
                $store16(h.add($lanes), $round(v1, o.half));
            }
        }
    }};
}

/// How a kernel's tile is written: the f32 sums to `c` (`C = bias + AB` when `init`, bias null
/// meaning zero, else `C += AB`), or, with `half`, those sums rounded to 16 bits at `h` instead
/// (`C` then only read, when not `init`): the last block of `K` of a bf16 or f16 product writes
/// its output directly.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    /// The tile's f32 sums, rows `ldc` apart (with `half` and `init` never dereferenced: it
    /// may then dangle).
    pub c: *mut f32,
    pub ldc: usize,
    /// `NR` f32 of bias for the first block of `K` (null: none).
    pub bias: *const f32,
    /// Whether this is the first block of `K`.
    pub init: bool,
    /// The rounded output, if any.
    pub half: Half,
    /// The rounded output's rows, `ldh` apart.
    pub h: *mut u16,
    pub ldh: usize,
}

/// The 16-bit output of [`Out`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    /// None: write the f32 sums.
    No,
    /// bf16, rounded to nearest even (NaN stays NaN, quietened), as `half::bf16::from_f32`.
    Bf16,
    /// f16, rounded to nearest even (`vcvtps2ph`), as `half::f16::from_f32`.
    F16,
}

/// One micro-kernel: `(kc, a, b, out)`.
///
/// # Safety
/// The CPU has the kernel's instructions; `a` covers `kc · MR` packed elements, `b` `kc · NR`,
/// `out.c` `MR` rows of `NR` f32 `out.ldc` apart, `out.bias` (when not null) `NR` f32, and
/// `out.h` (with `out.half`) `MR` rows of `NR` 16-bit elements `out.ldh` apart.
pub(crate) type Ukr = unsafe fn(usize, *const u32, *const u32, Out);

/// The f32 AVX-512 kernel (14 × 32). Packed elements are f32 bit patterns.
///
/// # Safety
/// See [`Ukr`]; AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn f32_avx512(kc: usize, a: *const u32, b: *const u32, out: Out) {
    let (a, b) = (a as *const f32, b as *const f32);
    // SAFETY: a prefetch of the tile's own rows (never faults).
    unsafe { prefetch_c(out.c, out.ldc, MR_512) };
    let mut acc = [[_mm512_setzero_ps(); 2]; MR_512];
    for k in 0..kc {
        // SAFETY (whole loop): step k of both packed operands is inside what the caller named.
        unsafe {
            let bp = b.add(k * NR_512);
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            let ap = a.add(k * MR_512);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
    }
    // SAFETY: the caller's `out` covers the tile.
    unsafe {
        store_tile!(
            acc,
            out,
            16,
            _mm512_loadu_ps,
            _mm512_storeu_ps,
            _mm512_add_ps,
            _mm512_setzero_ps,
            round16_512,
            store16_512
        )
    }
}

/// The bf16 AVX512-BF16 kernel (14 × 32). Packed elements are pairs of bf16 along `k`.
///
/// # Safety
/// See [`Ukr`] (`kc` counts pairs); AVX-512F, BW and BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn bf16_avx512(kc: usize, a: *const u32, b: *const u32, out: Out) {
    // SAFETY: a prefetch of the tile's own rows (never faults).
    unsafe { prefetch_c(out.c, out.ldc, MR_512) };
    let mut acc = [[_mm512_setzero_ps(); 2]; MR_512];
    for k in 0..kc {
        // SAFETY (whole loop): step k of both packed operands is inside what the caller named.
        unsafe {
            let bp = b.add(k * NR_512) as *const __m512i;
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
            let ap = a.add(k * MR_512);
            for (i, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                row[1] = _mm512_dpbf16_ps(row[1], av, b1);
            }
        }
    }
    // SAFETY: the caller's `out` covers the tile.
    unsafe {
        store_tile!(
            acc,
            out,
            16,
            _mm512_loadu_ps,
            _mm512_storeu_ps,
            _mm512_add_ps,
            _mm512_setzero_ps,
            round16_512,
            store16_512
        )
    }
}

/// 16 f32 lanes rounded to bf16 or f16 (to nearest even; see [`Half`]).
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn round16_512(v: __m512, half: Half) -> __m256i {
    if half == Half::F16 {
        return _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
    }
    // bf16: the integer rounding of `bf16_nearest`, 16 lanes at a time.
    let b = _mm512_castps_si512(v);
    let hi = _mm512_srli_epi32::<16>(b);
    let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
    _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
}

/// Stores 16 16-bit elements.
///
/// # Safety
/// AVX-512F; `p` covers 16 elements.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store16_512(p: *mut u16, v: __m256i) {
    // SAFETY: as the caller promised.
    unsafe { _mm256_storeu_si256(p as *mut __m256i, v) }
}

/// Asks for the first 128 bytes of each of `rows` rows of `C` (`ldc` apart) to be brought to
/// L1 while the kernel's loop runs: the tile is read (or written) only after it, and a block of
/// `C` is too large to stay in cache between two passes over `K`.
///
/// # Safety
/// None needed for the prefetch itself (it never faults); `unsafe` for the pointer arithmetic.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_c(c: *mut f32, ldc: usize, rows: usize) {
    for i in 0..rows {
        let p = c.wrapping_add(i * ldc) as *const i8;
        // SAFETY: prefetches do not fault, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
        }
    }
}

/// The f32 AVX2 + FMA kernel (6 × 16). Packed elements are f32 bit patterns.
///
/// # Safety
/// See [`Ukr`]; AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f32_avx2(kc: usize, a: *const u32, b: *const u32, out: Out) {
    let (a, b) = (a as *const f32, b as *const f32);
    // SAFETY: a prefetch of the tile's own rows (never faults).
    unsafe { prefetch_c(out.c, out.ldc, MR_256) };
    let mut acc = [[_mm256_setzero_ps(); 2]; MR_256];
    let step = |acc: &mut [[__m256; 2]; MR_256], k: usize| {
        // SAFETY: step k of both packed operands is inside what the caller named.
        unsafe {
            let bp = b.add(k * NR_256);
            let b0 = _mm256_loadu_ps(bp);
            let b1 = _mm256_loadu_ps(bp.add(8));
            let ap = a.add(k * MR_256);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(i));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
    };
    // Four steps per turn of the loop: on AMD Zen 3 the loop of one step ran 10–15% below the
    // unrolled one (the same instructions in assembly, `kc` = 64–512, operands in L1 and L2).
    let mut k = 0;
    while k + 4 <= kc {
        step(&mut acc, k);
        step(&mut acc, k + 1);
        step(&mut acc, k + 2);
        step(&mut acc, k + 3);
        k += 4;
    }
    while k < kc {
        step(&mut acc, k);
        k += 1;
    }
    // SAFETY: the caller's `out` covers the tile.
    unsafe {
        store_tile!(
            acc,
            out,
            8,
            _mm256_loadu_ps,
            _mm256_storeu_ps,
            _mm256_add_ps,
            _mm256_setzero_ps,
            round16_256,
            store16_256
        )
    }
}

/// 8 f32 lanes rounded to bf16 or f16 (to nearest even; see [`Half`]).
///
/// # Safety
/// AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn round16_256(v: __m256, half: Half) -> __m128i {
    if half == Half::F16 {
        return _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
    }
    // bf16: the integer rounding of `bf16_nearest`, 8 lanes at a time.
    let b = _mm256_castps_si256(v);
    let hi = _mm256_srli_epi32::<16>(b);
    let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    let r = _mm256_blendv_epi8(rounded, quiet, nan);
    // Every lane is below 2^16: pack them (within 128-bit halves), then join the halves.
    let packed = _mm256_packus_epi32(r, r);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed))
}

/// Stores 8 16-bit elements.
///
/// # Safety
/// AVX2; `p` covers 8 elements.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store16_256(p: *mut u16, v: __m128i) {
    // SAFETY: as the caller promised.
    unsafe { _mm_storeu_si128(p as *mut __m128i, v) }
}
