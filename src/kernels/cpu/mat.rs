//! Row-major matrices inside slices (f32, bf16 pairs, bf16/f16): the operands of a tile's two
//! products. The constructors check that every element lies in the slice, which is what the
//! products' unchecked (SIMD or `gemm`) accesses rely on.

/// A `rows × cols` matrix whose rows start `stride` elements apart (f32 elements unless said).
#[derive(Clone, Copy)]
pub(super) struct Mat<'a, T = f32> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    stride: usize,
}

/// A `rows × cols` matrix of bf16 pairs (two consecutive elements of a row of the unpaired
/// matrix, the first in the low 16 bits) whose rows start `stride` pairs apart: the operands of
/// the AVX512-BF16 dot products.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 micro-kernels
pub(super) type PairMat<'a> = Mat<'a, u32>;

/// A mutable `rows × cols` matrix whose rows start `stride` elements apart.
pub(super) struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    stride: usize,
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

impl<'a, T> Mat<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize, stride: usize) -> Self {
        check(data.len(), rows, cols, stride, false);
        Self {
            data,
            rows,
            cols,
            stride,
        }
    }

    /// The elements (rows `stride` apart; every element of the matrix lies in it).
    #[inline]
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// Rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    #[inline]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements from one row's start to the next's.
    #[inline]
    pub fn stride(&self) -> usize {
        self.stride
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

    /// The elements (rows `stride` apart; every element of the matrix lies in it).
    #[inline]
    pub fn data(&mut self) -> &mut [f32] {
        self.data
    }

    /// Rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    #[inline]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements from one row's start to the next's.
    #[inline]
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The same matrix, borrowed again (for a call that may leave it to another).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the VNNI products' fallback
    #[inline]
    pub fn reborrow(&mut self) -> MatMut<'_> {
        MatMut {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            stride: self.stride,
        }
    }
}

/// A `rows × cols` matrix of bf16 or f16 elements whose rows start `stride` elements apart,
/// read in place by the micro-kernels (each element widened to f32 in registers).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 micro-kernels
pub(super) struct HalfMat<'a> {
    /// The elements' bits.
    data: &'a [u16],
    /// Whether they are bf16 (else f16).
    bf16: bool,
    rows: usize,
    cols: usize,
    stride: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 micro-kernels
impl<'a> HalfMat<'a> {
    pub fn bf16(data: &'a [half::bf16], rows: usize, cols: usize, stride: usize) -> Self {
        Self::new(bytemuck_u16(data), true, rows, cols, stride)
    }

    pub fn f16(data: &'a [half::f16], rows: usize, cols: usize, stride: usize) -> Self {
        Self::new(bytemuck_u16(data), false, rows, cols, stride)
    }

    /// The bf16 elements of a matrix of pairs (`rows × 2·cols`, row stride `2·stride`): the
    /// same memory, each pair's low half first.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the pair products are x86-only
    pub fn from_pairs(p: Mat<'a, u32>) -> Self {
        // SAFETY: a `u32` slice is also a valid `u16` slice of twice the length (alignment 4
        // ≥ 2, every bit pattern valid); on little-endian targets the low half comes first.
        let halves =
            unsafe { std::slice::from_raw_parts(p.data.as_ptr().cast::<u16>(), 2 * p.data.len()) };
        Self::new(halves, true, p.rows, 2 * p.cols, 2 * p.stride)
    }

    fn new(data: &'a [u16], bf16: bool, rows: usize, cols: usize, stride: usize) -> Self {
        check(data.len(), rows, cols, stride, false);
        Self {
            data,
            bf16,
            rows,
            cols,
            stride,
        }
    }

    /// The elements (rows `stride` apart; every element of the matrix lies in it).
    #[inline]
    pub fn data(&self) -> &'a [u16] {
        self.data
    }

    /// Rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    #[inline]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements from one row's start to the next's.
    #[inline]
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Whether the elements are bf16 (else f16).
    #[inline]
    pub fn is_bf16(&self) -> bool {
        self.bf16
    }
}

/// A `rows × cols` matrix of quantized bytes (a quantized KV cache's rows): int8 values stored
/// offset by 128, or fp8 e4m3 values; rows start `stride` elements apart. Read in place by the
/// micro-kernels (widened to f32 in registers; the rows' scales are applied by the caller).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 micro-kernels
pub(super) struct ByteMat<'a> {
    data: &'a [u8],
    /// fp8 e4m3 (else int8 + 128).
    fp8: bool,
    rows: usize,
    cols: usize,
    stride: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 micro-kernels
impl<'a> ByteMat<'a> {
    pub fn new(data: &'a [u8], fp8: bool, rows: usize, cols: usize, stride: usize) -> Self {
        check(data.len(), rows, cols, stride, false);
        Self {
            data,
            fp8,
            rows,
            cols,
            stride,
        }
    }

    /// The elements (rows `stride` apart; every element of the matrix lies in it).
    #[inline]
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    #[inline]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements from one row's start to the next's.
    #[inline]
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Whether the elements are fp8 e4m3 (else int8 offset by 128).
    #[inline]
    pub fn is_fp8(&self) -> bool {
        self.fp8
    }
}

/// The bits of a bf16 / f16 slice.
fn bytemuck_u16<T: Copy>(data: &[T]) -> &[u16] {
    assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: `T` is bf16 or f16, 2-byte plain-old-data types with u16's alignment.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u16>(), data.len()) }
}

/// A `rows × cols` matrix stored as panels of 16 columns (`panels.rs`): column `c` of row `r`
/// at element `(c / 16) · slab + r · 16 + c % 16`, the columns of the last panel past `cols`
/// present (padding). f32, bf16 or f16 elements, read by the AVX2 `P · V` micro-kernel.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 micro-kernels
pub(super) struct PanelMat<'a> {
    /// The elements' bytes.
    data: &'a [u8],
    /// `None` for f32, else whether the elements are bf16 (or f16).
    half: Option<bool>,
    rows: usize,
    cols: usize,
    /// Elements from one panel's start to the next's.
    slab: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 micro-kernels
impl<'a> PanelMat<'a> {
    pub fn f32(data: &'a [f32], rows: usize, cols: usize, slab: usize) -> Self {
        // SAFETY: any initialised memory is valid as bytes; the length covers the same bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), 4 * data.len()) };
        Self::new(bytes, None, rows, cols, slab)
    }

    pub fn half<T: Copy>(data: &'a [T], bf16: bool, rows: usize, cols: usize, slab: usize) -> Self {
        assert_eq!(std::mem::size_of::<T>(), 2, "half elements are 2 bytes");
        // SAFETY: as above (`T` is bf16 or f16: plain 2-byte data).
        let bytes =
            unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), 2 * data.len()) };
        Self::new(bytes, Some(bf16), rows, cols, slab)
    }

    fn new(data: &'a [u8], half: Option<bool>, rows: usize, cols: usize, slab: usize) -> Self {
        let elem = if half.is_some() { 2 } else { 4 };
        let panels = cols.div_ceil(16);
        assert!(
            rows == 0
                || cols == 0
                || (slab >= 16 * rows && data.len() / elem >= (panels - 1) * slab + 16 * rows),
            "panels of {rows}×{cols} (panel stride {slab}) do not fit in {} elements",
            data.len() / elem
        );
        Self {
            data,
            half,
            rows,
            cols,
            slab,
        }
    }

    /// The elements' bytes (every panel of the matrix, padding included, lies in them).
    #[inline]
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// `None` for f32 elements, else whether they are bf16 (or f16).
    #[inline]
    pub fn half_kind(&self) -> Option<bool> {
        self.half
    }

    /// Rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    #[inline]
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements from one panel's start to the next's.
    #[inline]
    pub fn slab(&self) -> usize {
        self.slab
    }
}
