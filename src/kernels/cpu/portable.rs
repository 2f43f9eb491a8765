//! The two products of a tile through the `gemm` crate (the one candle's matmul uses; it
//! dispatches to the best SIMD kernels of the running CPU): used where AVX-512 is missing, and
//! for `Q · Kᵀ` of decode-like items that do not pay for a transposed copy of K.

/// `out[r][c] = scale · Σ_x q[r][x] · k[c][x]` for `r < nr`, `c < bk`: `q` is `nr × d`
/// contiguous, `k` holds `bk` key rows of `d` values, `k_stride` apart; `out` rows are
/// `out_stride` apart.
#[allow(clippy::too_many_arguments)]
pub(super) fn qk(
    q: &[f32],
    nr: usize,
    d: usize,
    k: &[f32],
    k_stride: usize,
    bk: usize,
    out: &mut [f32],
    out_stride: usize,
    scale: f32,
) {
    assert!(q.len() >= nr * d && k.len() >= (bk - 1) * k_stride + d);
    assert!(out.len() >= (nr - 1) * out_stride + bk);
    // SAFETY: the assertions above keep every access of these row-major matrices in bounds:
    // out (nr × bk, row stride out_stride), q (nr × d), kᵀ (d × bk: element (x, c) at
    // c·k_stride + x).
    unsafe {
        gemm::gemm(
            nr,
            bk,
            d,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            k.as_ptr(),
            k_stride as isize,
            1,
            0.0f32,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `acc[r][c] += Σ_{j < bk} p[r][j] · v[j][c]` for `r < nr`, `c < dv`: `p` rows are `p_stride`
/// apart, `v` holds `bk` rows of `dv` values, `v_stride` apart; `acc` is `nr × dv`.
#[allow(clippy::too_many_arguments)]
pub(super) fn pv(
    p: &[f32],
    p_stride: usize,
    nr: usize,
    bk: usize,
    v: &[f32],
    v_stride: usize,
    dv: usize,
    acc: &mut [f32],
) {
    assert!(p.len() >= (nr - 1) * p_stride + bk && v.len() >= (bk - 1) * v_stride + dv);
    assert!(acc.len() >= nr * dv);
    // SAFETY: the assertions above keep every access in bounds: acc (nr × dv), p (nr × bk,
    // row stride p_stride), v (bk × dv, row stride v_stride), all row-major.
    unsafe {
        gemm::gemm(
            nr,
            dv,
            bk,
            acc.as_mut_ptr(),
            1,
            dv as isize,
            true,
            p.as_ptr(),
            1,
            p_stride as isize,
            v.as_ptr(),
            1,
            v_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
