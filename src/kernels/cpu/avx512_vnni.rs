//! AVX512-VNNI `Q · Kᵀ` against int8 keys read in place: `vpdpwssd` multiplies 32 key bytes
//! (`k + 128`, widened to 16 bits) by 32 int16 query values and adds each pair of products to a
//! 32-bit lane, exactly (see [`super::quant`]).

use std::arch::x86_64::*;

use super::mat::{ByteMat, MatMut};
use super::quant::QRows;

/// `out[r][j] = scale · q.scale[r] · Σ_x q.vals[r][x] · (k[j][x] − 128)` for int8 key rows
/// stored offset by 128 (`k.cols == q.cols`, any row stride; the keys' scales are applied by
/// the caller). Blocks of 4 query rows × 4 keys keep 16 integer accumulators; each key row is
/// loaded and widened once per block of rows, 32 bytes at a time.
///
/// # Safety
/// avx512f, avx512bw, avx512vl and avx512vnni must be available; `k` must be int8 (not fp8), and the
/// shapes must agree (`k.cols == q.cols <= 256`, `out` is `q.rows × k.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn qk_rows_q16(q: QRows, k: ByteMat, out: MatMut, scale: f32) {
    let (nr, d, bk) = (q.rows, q.cols, k.rows);
    debug_assert!(!k.fp8 && k.cols == d && d <= 256 && out.rows == nr && out.cols == bk);
    let (kp, qp) = (k.data.as_ptr(), q.vals.as_ptr());
    let nv = d.div_ceil(32);
    let mut r = 0;
    while r < nr {
        let mr = (nr - r).min(4);
        // Lane 4·jj + rr of the reduced sums belongs to row rr: its offset and factor.
        let mut corr = [0i32; 16];
        let mut fac = [0f32; 16];
        for lane in 0..16 {
            if lane % 4 < mr {
                corr[lane] = q.corr[r + lane % 4];
                fac[lane] = scale * q.scale[r + lane % 4];
            }
        }
        let corr = _mm512_loadu_si512(corr.as_ptr().cast());
        let fac = _mm512_loadu_ps(fac.as_ptr());
        let mut j = 0;
        while j < bk {
            let mj = (bk - j).min(4);
            // Whole 4 × 4 blocks (fixed trip counts keep the accumulators in registers): a
            // missing row or key loads zeros from the last valid one.
            let mut kr = [kp; 4];
            let mut km = [0u32; 4];
            let mut qr = [qp; 4];
            let mut qm = [0u32; 4];
            for x in 0..4 {
                kr[x] = kp.add((j + x.min(mj - 1)) * k.stride);
                km[x] = if x < mj { u32::MAX } else { 0 };
                qr[x] = qp.add((r + x.min(mr - 1)) * d);
                qm[x] = if x < mr { u32::MAX } else { 0 };
            }
            let last = match d % 32 {
                0 => u32::MAX,
                w => (1u32 << w) - 1,
            };
            let acc = match nv {
                1 => block::<1>(kr, km, qr, qm, last),
                2 => block::<2>(kr, km, qr, qm, last),
                3 => block::<3>(kr, km, qr, qm, last),
                4 => block::<4>(kr, km, qr, qm, last),
                5 => block::<5>(kr, km, qr, qm, last),
                6 => block::<6>(kr, km, qr, qm, last),
                7 => block::<7>(kr, km, qr, qm, last),
                _ => block::<8>(kr, km, qr, qm, last),
            };
            super::stream::step();
            let sums = _mm512_sub_epi32(reduce16(&acc), corr);
            let s = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), fac);
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), s);
            for rr in 0..mr {
                for jj in 0..mj {
                    *out.data.get_unchecked_mut((r + rr) * out.stride + j + jj) =
                        lanes[4 * jj + rr];
                }
            }
            j += mj;
        }
        r += mr;
    }
}

/// The 16 integer dot products of 4 key rows (`kr`, masks `km`) and 4 query rows (`qr`, `qm`)
/// over `32 · NV` values (the last 32 masked by `last`): `acc[rr][jj]`, unreduced.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block<const NV: usize>(
    kr: [*const u8; 4],
    km: [u32; 4],
    qr: [*const i16; 4],
    qm: [u32; 4],
    last: u32,
) -> [[__m512i; 4]; 4] {
    let mut acc = [[_mm512_setzero_si512(); 4]; 4];
    for v in 0..NV {
        let m = if v + 1 == NV { last } else { u32::MAX };
        let mut kv = [_mm512_setzero_si512(); 4];
        for x in 0..4 {
            let bytes = _mm256_maskz_loadu_epi8(m & km[x], kr[x].add(32 * v).cast());
            kv[x] = _mm512_cvtepu8_epi16(bytes);
        }
        for rr in 0..4 {
            let qv = _mm512_maskz_loadu_epi16(m & qm[rr], qr[rr].add(32 * v));
            for jj in 0..4 {
                acc[rr][jj] = dpwssd(acc[rr][jj], kv[jj], qv);
            }
        }
    }
    acc
}

/// `acc + Σ pairs of a · b` (`vpdpwssd`), as one instruction: LLVM otherwise splits it into
/// `vpmaddwd` + `vpaddd` for CPUs it does not know to be fast at it (Zen 4 and Intel's cores
/// run it at the `vpmaddwd` rate), doubling the work of the loop above.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpwssd(mut acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    // SAFETY: register-only arithmetic; the caller's target features include AVX512-VNNI.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// [`super::avx512::reduce16`] on 32-bit integer lanes: lane `4·jj + rr` holds the sum of
/// `acc[rr][jj]`'s lanes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn reduce16(acc: &[[__m512i; 4]; 4]) -> __m512i {
    let x = |i: usize| acc[i / 4][i % 4];
    let y: [__m512i; 8] = std::array::from_fn(|p| {
        let (a, b) = (x(2 * p), x(2 * p + 1));
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x44>(a, b),
            _mm512_shuffle_i32x4::<0xEE>(a, b),
        )
    });
    let z: [__m512i; 4] = std::array::from_fn(|q| {
        let (c, d) = (y[2 * q], y[2 * q + 1]);
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x88>(c, d),
            _mm512_shuffle_i32x4::<0xDD>(c, d),
        )
    });
    // Within 128-bit chunks, as `_mm512_shuffle_ps` (on the bits: no conversion).
    let shuf = |a: __m512i, b: __m512i, even: bool| {
        let (a, b) = (_mm512_castsi512_ps(a), _mm512_castsi512_ps(b));
        _mm512_castps_si512(if even {
            _mm512_shuffle_ps::<0b10_00_10_00>(a, b)
        } else {
            _mm512_shuffle_ps::<0b11_01_11_01>(a, b)
        })
    };
    let g: [__m512i; 2] = std::array::from_fn(|s| {
        let (e, f) = (z[2 * s], z[2 * s + 1]);
        _mm512_add_epi32(shuf(e, f, true), shuf(e, f, false))
    });
    _mm512_add_epi32(shuf(g[0], g[1], true), shuf(g[0], g[1], false))
}
