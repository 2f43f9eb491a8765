//! The two products of a tile through the `gemm` crate (the one candle's matmul uses; it
//! dispatches to the best SIMD kernels of the running CPU): used where AVX-512 is missing, and
//! for `Q · Kᵀ` of decode-like items that do not pay for a transposed copy of K.

use super::mat::{Mat, MatMut};

/// `out = scale · q · kᵀ`: `q` is `nr × d`, `k` is `bk × d` (key rows), `out` is `nr × bk`.
pub(super) fn qk(q: Mat, k: Mat, mut out: MatMut, scale: f32) {
    let (nr, d, bk) = (q.rows(), q.cols(), k.rows());
    assert!(k.cols() == d && out.rows() == nr && out.cols() == bk);
    // SAFETY: `Mat`/`MatMut` guarantee every element of these row-major matrices is in its
    // slice; kᵀ (d × bk) is read as element (x, c) at c·k.stride + x.
    unsafe {
        gemm::gemm(
            nr,
            bk,
            d,
            out.data().as_mut_ptr(),
            1,
            out.stride() as isize,
            false,
            q.data().as_ptr(),
            1,
            q.stride() as isize,
            k.data().as_ptr(),
            k.stride() as isize,
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

/// `acc += p · v`: `p` is `nr × bk`, `v` is `bk × dv`, `acc` is `nr × dv`.
pub(super) fn pv(p: Mat, v: Mat, mut acc: MatMut) {
    let (nr, bk, dv) = (p.rows(), p.cols(), v.cols());
    assert!(v.rows() == bk && acc.rows() == nr && acc.cols() == dv);
    // SAFETY: `Mat`/`MatMut` guarantee every element of these row-major matrices is in its
    // slice.
    unsafe {
        gemm::gemm(
            nr,
            dv,
            bk,
            acc.data().as_mut_ptr(),
            1,
            acc.stride() as isize,
            true,
            p.data().as_ptr(),
            1,
            p.stride() as isize,
            v.data().as_ptr(),
            1,
            v.stride() as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `dst = (acc ? dst : 0) + alpha · a · b` for the backward's products, with any strides:
/// `a` is `m × k` with element `(i, p)` at `a[i·a_rs + p·a_cs]`, `b` is `k × n` with `(p, j)` at
/// `b[p·b_rs + j·b_cs]` (so transposes are free), `dst` is row-major `m × n` with row stride
/// `dst_rs`.
pub(super) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_rs >= n && (m - 1) * dst_rs + n <= dst.len(),
        "matmul: dst"
    );
    if k == 0 {
        if !acc {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len(), "matmul: a");
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len(), "matmul: b");
    // SAFETY: the asserts above keep every element of the three operands in its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0f32,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
