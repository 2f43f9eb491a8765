//! The two products of a tile through the `gemm` crate (the one candle's matmul uses; it
//! dispatches to the best SIMD kernels of the running CPU): used where AVX-512 is missing, and
//! for `Q · Kᵀ` of decode-like items that do not pay for a transposed copy of K.

use super::mat::{Mat, MatMut};

/// `out = scale · q · kᵀ`: `q` is `nr × d`, `k` is `bk × d` (key rows), `out` is `nr × bk`.
pub(super) fn qk(q: Mat, k: Mat, out: MatMut, scale: f32) {
    let (nr, d, bk) = (q.rows, q.cols, k.rows);
    assert!(k.cols == d && out.rows == nr && out.cols == bk);
    // SAFETY: `Mat`/`MatMut` guarantee every element of these row-major matrices is in its
    // slice; kᵀ (d × bk) is read as element (x, c) at c·k.stride + x.
    unsafe {
        gemm::gemm(
            nr,
            bk,
            d,
            out.data.as_mut_ptr(),
            1,
            out.stride as isize,
            false,
            q.data.as_ptr(),
            1,
            q.stride as isize,
            k.data.as_ptr(),
            k.stride as isize,
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
pub(super) fn pv(p: Mat, v: Mat, acc: MatMut) {
    let (nr, bk, dv) = (p.rows, p.cols, v.cols);
    assert!(v.rows == bk && acc.rows == nr && acc.cols == dv);
    // SAFETY: `Mat`/`MatMut` guarantee every element of these row-major matrices is in its
    // slice.
    unsafe {
        gemm::gemm(
            nr,
            dv,
            bk,
            acc.data.as_mut_ptr(),
            1,
            acc.stride as isize,
            true,
            p.data.as_ptr(),
            1,
            p.stride as isize,
            v.data.as_ptr(),
            1,
            v.stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
