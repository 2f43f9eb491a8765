//! Row-major f32 matrices inside slices: the operands of a tile's two products. The
//! constructors check that every element lies in the slice, which is what the products'
//! unchecked (SIMD or `gemm`) accesses rely on.

/// A `rows × cols` matrix whose rows start `stride` elements apart.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

/// A mutable `rows × cols` matrix whose rows start `stride` elements apart.
pub(super) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

/// Every element in `len`; rows must not overlap when they are written (`disjoint`), while
/// read-only rows may (a broadcast view has stride 0).
fn check(len: usize, rows: usize, cols: usize, stride: usize, disjoint: bool) {
    assert!(
        rows == 0
            || cols == 0
            || ((!disjoint || stride >= cols) && len >= (rows - 1) * stride + cols),
        "matrix {rows}×{cols} (stride {stride}) does not fit in {len} elements"
    );
}

impl<'a> Mat<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        check(data.len(), rows, cols, stride, false);
        Self {
            data,
            rows,
            cols,
            stride,
        }
    }
}

impl<'a> MatMut<'a> {
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, stride: usize) -> Self {
        check(data.len(), rows, cols, stride, true);
        Self {
            data,
            rows,
            cols,
            stride,
        }
    }
}
