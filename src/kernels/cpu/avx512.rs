//! AVX-512 register-blocked micro-kernels for the two products of a tile.
#![allow(clippy::needless_range_loop)] // explicit indices name the register block's cells

use std::arch::x86_64::*;

/// Rows per register block.
const MR: usize = 6;

fn tail_mask(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// `out[r][c] = scale · Σ_d q[r][d] · kt[d][j0 + c]` for `r < nr`, `c < round_up(bk, 16)`
/// (columns past `bk` hold garbage-free zeros or unused values; callers read `..bk`).
///
/// # Safety
/// avx512f must be available; `q` holds `nr × d`, `kt` is `d × s` (row stride `s`) with
/// `j0 + bk <= s`, `out` holds `nr` rows of stride `out_stride >= round_up(bk, 16)`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn qk(
    q: &[f32],
    nr: usize,
    d: usize,
    kt: &[f32],
    s: usize,
    j0: usize,
    bk: usize,
    out: &mut [f32],
    out_stride: usize,
    scale: f32,
) {
    debug_assert!(q.len() >= nr * d && kt.len() >= d * s && j0 + bk <= s);
    debug_assert!(out.len() >= (nr - 1) * out_stride + bk.div_ceil(16) * 16);
    let nv = bk.div_ceil(16);
    let mut c = 0;
    while c < nv {
        let nb = (nv - c).min(2);
        let m0 = tail_mask(bk - 16 * c);
        let m1 = if nb == 2 {
            tail_mask(bk - 16 * (c + 1))
        } else {
            0
        };
        let masks = [m0, m1];
        let kp = kt.as_ptr().add(j0 + 16 * c);
        let mut r = 0;
        while r < nr {
            let mr = (nr - r).min(MR);
            let qp = q.as_ptr().add(r * d);
            let op = out.as_mut_ptr().add(r * out_stride + 16 * c);
            macro_rules! go {
                ($($m:literal),*) => {
                    match (mr, nb) {
                        $(($m, 1) => qk_block::<$m, 1>(qp, d, kp, s, op, out_stride, scale, masks),
                          ($m, _) => qk_block::<$m, 2>(qp, d, kp, s, op, out_stride, scale, masks),)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(1, 2, 3, 4, 5, 6);
            r += mr;
        }
        c += nb;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn qk_block<const M: usize, const N: usize>(
    q: *const f32,
    d: usize,
    kt: *const f32,
    s: usize,
    out: *mut f32,
    out_stride: usize,
    scale: f32,
    masks: [u16; 2],
) {
    let mut acc = [[_mm512_setzero_ps(); N]; M];
    for dd in 0..d {
        let krow = kt.add(dd * s);
        let mut kv = [_mm512_setzero_ps(); N];
        for n in 0..N {
            kv[n] = _mm512_maskz_loadu_ps(masks[n], krow.add(16 * n));
        }
        for r in 0..M {
            let b = _mm512_set1_ps(*q.add(r * d + dd));
            for n in 0..N {
                acc[r][n] = _mm512_fmadd_ps(b, kv[n], acc[r][n]);
            }
        }
    }
    let sv = _mm512_set1_ps(scale);
    for r in 0..M {
        for n in 0..N {
            _mm512_storeu_ps(
                out.add(r * out_stride + 16 * n),
                _mm512_mul_ps(acc[r][n], sv),
            );
        }
    }
}

/// `out[r][c] += Σ_{j < bk} p[r][j] · v[j][c]` for `r < nr`, `c < dv`.
///
/// # Safety
/// avx512f must be available; `p` holds `nr` rows of stride `p_stride >= bk`, `v` holds `bk`
/// rows of `dv` values, `v_stride` apart, `out` holds `nr × dv`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn pv(
    p: &[f32],
    p_stride: usize,
    nr: usize,
    bk: usize,
    v: &[f32],
    v_stride: usize,
    dv: usize,
    out: &mut [f32],
) {
    debug_assert!(p.len() >= (nr - 1) * p_stride + bk && v.len() >= (bk - 1) * v_stride + dv);
    debug_assert!(out.len() >= nr * dv);
    let mut c = 0;
    while c < dv {
        let w = (dv - c).min(64);
        let nb = w.div_ceil(16);
        let mut masks = [0u16; 4];
        for (n, m) in masks.iter_mut().enumerate().take(nb) {
            *m = tail_mask(w - 16 * n);
        }
        let vp = v.as_ptr().add(c);
        let mut r = 0;
        while r < nr {
            let mr = (nr - r).min(MR);
            let pp = p.as_ptr().add(r * p_stride);
            let op = out.as_mut_ptr().add(r * dv + c);
            macro_rules! go {
                ($($m:literal),*) => {
                    match (mr, nb) {
                        $(($m, 1) => pv_block::<$m, 1>(pp, p_stride, bk, vp, v_stride, dv, op, masks),
                          ($m, 2) => pv_block::<$m, 2>(pp, p_stride, bk, vp, v_stride, dv, op, masks),
                          ($m, 3) => pv_block::<$m, 3>(pp, p_stride, bk, vp, v_stride, dv, op, masks),
                          ($m, _) => pv_block::<$m, 4>(pp, p_stride, bk, vp, v_stride, dv, op, masks),)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(1, 2, 3, 4, 5, 6);
            r += mr;
        }
        c += w;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pv_block<const M: usize, const N: usize>(
    p: *const f32,
    p_stride: usize,
    bk: usize,
    v: *const f32,
    v_stride: usize,
    dv: usize,
    out: *mut f32,
    masks: [u16; 4],
) {
    let mut acc = [[_mm512_setzero_ps(); N]; M];
    for r in 0..M {
        for n in 0..N {
            acc[r][n] = _mm512_maskz_loadu_ps(masks[n], out.add(r * dv + 16 * n));
        }
    }
    for j in 0..bk {
        let vrow = v.add(j * v_stride);
        let mut vv = [_mm512_setzero_ps(); N];
        for n in 0..N {
            vv[n] = _mm512_maskz_loadu_ps(masks[n], vrow.add(16 * n));
        }
        for r in 0..M {
            let b = _mm512_set1_ps(*p.add(r * p_stride + j));
            for n in 0..N {
                acc[r][n] = _mm512_fmadd_ps(b, vv[n], acc[r][n]);
            }
        }
    }
    for r in 0..M {
        for n in 0..N {
            _mm512_mask_storeu_ps(out.add(r * dv + 16 * n), masks[n], acc[r][n]);
        }
    }
}
