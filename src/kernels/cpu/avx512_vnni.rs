//! AVX512-VNNI `Q · Kᵀ` against int8 keys read in place: `vpdpwssd` multiplies 32 key bytes
//! (`k + 128`, widened to 16 bits) by 32 int16 query values and adds each pair of products to a
//! 32-bit lane, exactly (see [`super::quant`]).

use std::arch::x86_64::*;

use super::mat::{ByteMat, Mat, MatMut};
use super::quant::QRows;

/// Whether the CPU has AVX-512 F/BW/VL and VNNI (`vpdpwssd`), detected once.
pub fn detected() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// `out[r][j] = scale · q.scale[r] · kscale[j] · Σ_x q.vals[r][x] · (k[j][x] − 128)` for int8
/// key rows stored offset by 128 (`k.cols == q.cols`, any row stride) with their scales
/// `kscale`. Blocks of 4 query rows × 4 keys keep 16 integer accumulators; each key row is
/// loaded and widened once per block of rows, 32 bytes at a time; the 16 sums of a block are
/// reduced into one vector whose 128-bit lane `rr` holds row `rr`'s 4 keys, scaled and stored
/// as one piece per row.
///
/// # Safety
/// avx512f, avx512bw, avx512vl and avx512vnni must be available; `k` must be int8 (not fp8), and the
/// shapes must agree (`k.cols == q.cols <= 256`, `kscale.len() >= k.rows`, `out` is
/// `q.rows × k.rows`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn qk_rows_q16(q: QRows, k: ByteMat, kscale: &[f32], mut out: MatMut, scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (nr, d, bk) = (q.rows, q.cols, k.rows());
        debug_assert!(
            !k.is_fp8() && k.cols() == d && d <= 256 && out.rows() == nr && out.cols() == bk
        );
        debug_assert!(kscale.len() >= bk);
        let ostride = out.stride();
        let (kp, qp) = (k.data().as_ptr(), q.vals.as_ptr());
        let nv = d.div_ceil(32);
        let mut r = 0;
        while r < nr {
            let mr = (nr - r).min(4);
            // Lane 4·rr + jj of the reduced sums belongs to row rr: its offset and factor.
            let mut corr = [0i32; 16];
            let mut fac = [0f32; 16];
            for lane in 0..16 {
                if lane / 4 < mr {
                    corr[lane] = q.corr[r + lane / 4];
                    fac[lane] = scale * q.scale[r + lane / 4];
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
                    kr[x] = kp.add((j + x.min(mj - 1)) * k.stride());
                    km[x] = if x < mj { u32::MAX } else { 0 };
                    qr[x] = qp.add((r + x.min(mr - 1)) * d);
                    qm[x] = if x < mr { u32::MAX } else { 0 };
                }
                let last = match d % 32 {
                    0 => u32::MAX,
                    w => (1u32 << w) - 1,
                };
                // Whole blocks of whole 32-value chunks (the common case) load without masks.
                let full = mr == 4 && mj == 4 && last == u32::MAX;
                macro_rules! go {
                    ($($n:literal),*) => {
                        match (nv, full) {
                            $(($n, true) => block::<$n, true>(kr, km, qr, qm, last),
                              ($n, false) => block::<$n, false>(kr, km, qr, qm, last),)*
                            (_, true) => block::<8, true>(kr, km, qr, qm, last),
                            (_, false) => block::<8, false>(kr, km, qr, qm, last),
                        }
                    };
                }
                let acc = go!(1, 2, 3, 4, 5, 6, 7);
                super::stream::step();
                // Row-major sums (lane 4·rr + jj: row rr, key jj) times the rows' factors and
                // the 4 keys' scales (the same in every 128-bit lane).
                let t: [[__m512i; 4]; 4] =
                    std::array::from_fn(|jj| std::array::from_fn(|rr| acc[rr][jj]));
                let sums = _mm512_sub_epi32(reduce16(&t), corr);
                let kmask = (1u8 << mj) - 1;
                let ks = _mm512_broadcast_f32x4(_mm_maskz_loadu_ps(kmask, kscale.as_ptr().add(j)));
                let s = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), fac), ks);
                let o = out.data().as_mut_ptr().add(r * ostride + j);
                _mm_mask_storeu_ps(o, kmask, _mm512_castps512_ps128(s));
                if mr > 1 {
                    _mm_mask_storeu_ps(o.add(ostride), kmask, _mm512_extractf32x4_ps::<1>(s));
                }
                if mr > 2 {
                    _mm_mask_storeu_ps(o.add(2 * ostride), kmask, _mm512_extractf32x4_ps::<2>(s));
                }
                if mr > 3 {
                    _mm_mask_storeu_ps(o.add(3 * ostride), kmask, _mm512_extractf32x4_ps::<3>(s));
                }
                j += mj;
            }
            r += mr;
        }
    }
}

/// The 16 integer dot products of 4 key rows (`kr`, masks `km`) and 4 query rows (`qr`, `qm`)
/// over `32 · NV` values (the last 32 masked by `last`): `acc[rr][jj]`, unreduced. With `FULL`
/// (every mask all ones) the loads take no mask.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block<const NV: usize, const FULL: bool>(
    kr: [*const u8; 4],
    km: [u32; 4],
    qr: [*const i16; 4],
    qm: [u32; 4],
    last: u32,
) -> [[__m512i; 4]; 4] {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); 4]; 4];
        for v in 0..NV {
            let m = if v + 1 == NV { last } else { u32::MAX };
            let mut kv = [_mm512_setzero_si512(); 4];
            for x in 0..4 {
                let at = kr[x].add(32 * v);
                let bytes = if FULL {
                    _mm256_loadu_si256(at.cast())
                } else {
                    _mm256_maskz_loadu_epi8(m & km[x], at.cast())
                };
                kv[x] = _mm512_cvtepu8_epi16(bytes);
            }
            for rr in 0..4 {
                let at = qr[rr].add(32 * v);
                let qv = if FULL {
                    _mm512_loadu_si512(at.cast())
                } else {
                    _mm512_maskz_loadu_epi16(m & qm[rr], at)
                };
                for jj in 0..4 {
                    acc[rr][jj] = dpwssd(acc[rr][jj], kv[jj], qv);
                }
            }
        }
        acc
    }
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

/// Most keys per call of [`pv_q16`] (a tile).
const MAX_KEYS: usize = super::BLOCK_K;

/// `acc[r][c] += Σ_j p[r][j] · vscale[j] · (v[j][c] − 128)` for int8 value rows stored offset
/// by 128 with their scales `vscale` (`v.cols` a multiple of 32, at most [`super::BLOCK_K`]
/// keys), as exact integer products: each row of `p · vscale` quantized to int16 (one scale
/// per row and call, round to nearest even, `0 ≤ p16 ≤ 32767`), two keys' values widened and
/// interleaved into pairs per column, `vpdpwssd` on the pairs. Returns `false`, with `acc`
/// untouched, when a row of `p · vscale` is not finite (the f32 kernel then runs, propagating
/// it).
///
/// # Safety
/// avx512f, avx512bw, avx512vl and avx512vnni must be available; `v` must be int8 (not fp8)
/// and the shapes must agree (`v` is `p.cols × acc.cols`, `vscale.len() >= p.cols`, `acc` has
/// `p.rows` rows).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn pv_q16(p: Mat, v: ByteMat, vscale: &[f32], mut acc: MatMut) -> bool {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        let (nr, bk, dv) = (p.rows(), p.cols(), v.cols());
        debug_assert!(!v.is_fp8() && v.rows() == bk && acc.rows() == nr && acc.cols() == dv);
        debug_assert!(dv.is_multiple_of(32) && bk <= MAX_KEYS && nr <= super::BLOCK_Q);
        debug_assert!(vscale.len() >= bk);
        let vs = vscale.as_ptr();
        if bk == 0 {
            return true;
        }
        // Every row's largest value and sum first: a row that is not finite leaves the call to
        // the f32 kernel before anything is written.
        let mut pmax = [0f32; super::BLOCK_Q];
        for (r, pm) in pmax.iter_mut().enumerate().take(nr) {
            let row = p.data().as_ptr().add(r * p.stride());
            let (mut m, mut s) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for c in (0..bk).step_by(16) {
                let mask = super::avx512::tail_mask(bk - c);
                let x = _mm512_mul_ps(
                    _mm512_maskz_loadu_ps(mask, row.add(c)),
                    _mm512_maskz_loadu_ps(mask, vs.add(c)),
                );
                m = _mm512_max_ps(m, x);
                s = _mm512_add_ps(s, x);
            }
            if !_mm512_reduce_add_ps(s).is_finite() {
                return false;
            }
            *pm = _mm512_reduce_max_ps(m);
        }
        let mut r = 0;
        while r < nr {
            let mr = (nr - r).min(4);
            // The block's rows as int16, two more zeros after each (an odd last key pairs with
            // a zero); rows past the block's last are zeros (their sums are not stored). Only
            // what is read is written: the array is 2 KiB, a decode step's tile 64 keys, and
            // zeroing all of it cost a few percent of an int8 decode step.
            let mut p16 = std::mem::MaybeUninit::<[[i16; MAX_KEYS + 2]; 4]>::uninit();
            let p16p = p16.as_mut_ptr().cast::<i16>();
            let mut corr = [0i32; 4];
            let mut ps = [0f32; 4];
            for rr in 0..4 {
                let dst = p16p.add(rr * (MAX_KEYS + 2));
                if rr >= mr {
                    std::ptr::write_bytes(dst, 0, bk + 2);
                    continue;
                }
                let m = pmax[r + rr];
                let inv = _mm512_set1_ps(if m > 0.0 { 32767.0 / m } else { 0.0 });
                ps[rr] = m / 32767.0;
                let row = p.data().as_ptr().add((r + rr) * p.stride());
                let mut sum = _mm512_setzero_si512();
                for c in (0..bk).step_by(16) {
                    let mask = super::avx512::tail_mask(bk - c);
                    let pv = _mm512_mul_ps(
                        _mm512_maskz_loadu_ps(mask, row.add(c)),
                        _mm512_maskz_loadu_ps(mask, vs.add(c)),
                    );
                    let x = _mm512_cvtps_epi32(_mm512_mul_ps(pv, inv));
                    sum = _mm512_add_epi32(sum, x);
                    _mm256_mask_storeu_epi16(dst.add(c), mask, _mm512_cvtepi32_epi16(x));
                }
                dst.add(bk).write(0);
                dst.add(bk + 1).write(0);
                corr[rr] = 128 * _mm512_reduce_add_epi32(sum);
            }
            let mut c = 0;
            while c < dv {
                let rows = (r, mr, p16p.cast_const(), corr, ps);
                if dv - c >= 64 {
                    pv_block::<2>(
                        rows,
                        bk,
                        (v.data().as_ptr().add(c), v.stride()),
                        &mut acc,
                        c,
                    );
                    c += 64;
                } else {
                    pv_block::<1>(
                        rows,
                        bk,
                        (v.data().as_ptr().add(c), v.stride()),
                        &mut acc,
                        c,
                    );
                    c += 32;
                }
            }
            r += mr;
        }
        true
    }
}

/// Columns `c..c + 32·NB` of [`pv_q16`] for rows `r..r + mr`: `(r, mr, p16, corr, scale)`, row
/// `rr` of the int16 probabilities at `p16 + rr · (MAX_KEYS + 2)` (`bk + 2` written values).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pv_block<const NB: usize>(
    (r, mr, p16, corr, ps): (usize, usize, *const i16, [i32; 4], [f32; 4]),
    bk: usize,
    (v, stride): (*const u8, usize),
    acc: &mut MatMut,
    c: usize,
) {
    // SAFETY: called only by this module's kernels, which run with these target features
    // and pass pointers inside the operands their public entry points checked.
    unsafe {
        // acc[rr][2g] holds columns {8L + 0..4} of group g, acc[rr][2g + 1] columns {8L + 4..8}
        // (L = 0..4, the 128-bit lanes `vpunpck{l,h}wd` work within).
        let mut ai = [[_mm512_setzero_si512(); 4]; 4];
        let mut j = 0;
        while j < bk {
            if j % 8 == 6 {
                super::stream::step();
            }
            let (a, b) = (v.add(j * stride), v.add((j + 1).min(bk - 1) * stride));
            let mut pairs = [_mm512_setzero_si512(); 4];
            for g in 0..NB {
                let wa = _mm512_cvtepu8_epi16(_mm256_loadu_si256(a.add(32 * g).cast()));
                let wb = _mm512_cvtepu8_epi16(_mm256_loadu_si256(b.add(32 * g).cast()));
                pairs[2 * g] = _mm512_unpacklo_epi16(wa, wb);
                pairs[2 * g + 1] = _mm512_unpackhi_epi16(wa, wb);
            }
            for (rr, acc) in ai.iter_mut().enumerate() {
                // (p16[j], p16[j + 1]) as one 32-bit lane, broadcast.
                let at = p16.add(rr * (MAX_KEYS + 2) + j);
                let pp = _mm512_set1_epi32(at.cast::<i32>().read_unaligned());
                for x in 0..2 * NB {
                    acc[x] = dpwssd(acc[x], pairs[x], pp);
                }
            }
            j += 2;
        }
        // Back to column order: lane 4L + i of the low half is column 8L + i, of the high half
        // column 8L + 4 + i.
        let idx = |first: i32| {
            let mut x = [0i32; 16];
            for (n, x) in x.iter_mut().enumerate() {
                let col = first + n as i32;
                let (l, i) = (col / 8, col % 8);
                *x = if i < 4 { 4 * l + i } else { 16 + 4 * l + i - 4 };
            }
            _mm512_loadu_si512(x.as_ptr().cast())
        };
        let (lo, hi) = (idx(0), idx(16));
        for rr in 0..mr {
            let out = acc.data().as_mut_ptr().add((r + rr) * acc.stride() + c);
            let (k, s) = (_mm512_set1_epi32(corr[rr]), _mm512_set1_ps(ps[rr]));
            for g in 0..NB {
                for (h, ix) in [lo, hi].into_iter().enumerate() {
                    let cols = _mm512_permutex2var_epi32(ai[rr][2 * g], ix, ai[rr][2 * g + 1]);
                    let x = _mm512_cvtepi32_ps(_mm512_sub_epi32(cols, k));
                    let o = out.add(32 * g + 16 * h);
                    _mm512_storeu_ps(o, _mm512_fmadd_ps(x, s, _mm512_loadu_ps(o)));
                }
            }
        }
    }
}
