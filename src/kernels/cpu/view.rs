//! The inputs the fused kernel reads in place: `(B, T, heads, D)` views of f32, bf16 or f16
//! tensors.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::mat::{ByteMat, HalfMat, Mat, PairMat};
use super::products::{self, Isa};

/// An OCP fp8 e4m3 (`e4m3fn`) value from its bits: as the f16 whose exponent and mantissa
/// are the byte's shifted into place (bias 15 instead of 7, subnormals included), times 2⁸; the
/// SIMD loads do the same in registers. (NaN, `0x7f`, is never stored: quantized rows are
/// within ±448.)
pub(super) fn fp8_e4m3(x: u8) -> f32 {
    let bits = (u16::from(x & 0x80) << 8) | (u16::from(x & 0x7f) << 7);
    f16::from_bits(bits).to_f32() * 256.0
}

/// The elements of a tensor the kernel reads in place, in their own dtype: f16/bf16 inputs are
/// read in place by the micro-kernels that take them (AVX-512 and AVX2: bf16 and f16; widened
/// to f32 in registers), else converted to f32 per row or per tile as they are read, never as
/// whole tensors.
#[derive(Clone, Copy)]
pub(super) enum Data<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// Quantized rows of `row` values, each with its scale (a KV cache's contiguous buffer):
    /// element `at` is `(vals[at] − 128) · scales[at / row]` for int8 stored offset by 128, or
    /// `e4m3(vals[at]) · scales[at / row]` with `fp8`.
    Bytes {
        vals: &'a [u8],
        scales: &'a [f32],
        row: usize,
        fp8: bool,
    },
}

/// A `(B, T, heads, D)` tensor read in place: element `(b, t, h, x)` is
/// `data[b·strides[0] + t·strides[1] + h·strides[2] + x]`, or, for rows gathered in place (a
/// paged KV cache), `data[rows[b·T + t]·strides[1] + h·strides[2] + x]`.
pub(super) struct View<'a> {
    pub data: Data<'a>,
    pub strides: [usize; 3],
    /// The row of each `(b, t)`, `T` per batch element, when they are gathered (checked in
    /// range by the caller).
    pub rows: Option<(&'a [u32], usize)>,
}

impl<'a> View<'a> {
    /// Offset of row `(b, t, h)`.
    pub fn at(&self, b: usize, t: usize, h: usize) -> usize {
        match self.rows {
            Some((rows, n)) => rows[b * n + t] as usize * self.strides[1] + h * self.strides[2],
            None => b * self.strides[0] + t * self.strides[1] + h * self.strides[2],
        }
    }

    /// The end of a tile of positions of batch element `b` from `t0` (before `t1`) that the
    /// kernel reads as runs of consecutive rows ([`Self::run_end`]): runs whose lengths are
    /// multiples of 16 chain (each then starts at a whole vector of the tile's scores), so a
    /// paged cache's blocks of 16, 32, … positions fill whole tiles; a shorter run ends the
    /// tile.
    pub fn tile_end(&self, b: usize, t0: usize, t1: usize) -> usize {
        if self.rows.is_none() {
            return t1;
        }
        let mut a = t0;
        loop {
            let e = self.run_end(b, a, t1);
            if e == t1 || !(e - a).is_multiple_of(16) {
                return e;
            }
            a = e;
        }
    }

    /// The end of the run of positions of batch element `b` from `t0` (before `t1`) whose rows
    /// are consecutive: a tile of them is one strided block of memory.
    pub fn run_end(&self, b: usize, t0: usize, t1: usize) -> usize {
        match self.rows {
            None => t1,
            Some((rows, n)) => {
                let rows = &rows[b * n..(b + 1) * n];
                let first = rows[t0];
                (t0 + 1..t1)
                    .find(|&t| rows[t] != first.wrapping_add((t - t0) as u32))
                    .unwrap_or(t1)
            }
        }
    }

    /// The f32 elements, for an f32 tensor.
    pub fn f32s(&self) -> Option<&'a [f32]> {
        match self.data {
            Data::F32(s) => Some(s),
            _ => None,
        }
    }

    /// `rows × cols` half elements from `at` (row stride `stride`), read in place, when the
    /// tensor is bf16/f16 and `isa` reads such operands directly.
    pub fn half_mat(
        &self,
        isa: Isa,
        at: usize,
        (rows, cols, stride): (usize, usize, usize),
    ) -> Option<HalfMat<'a>> {
        match self.data {
            Data::F32(_) | Data::Bytes { .. } => None,
            Data::Bf16(_) if products::reads_half(isa, cols) => {
                self.bf16_mat(at, (rows, cols, stride))
            }
            Data::F16(s) if products::reads_half(isa, cols) => {
                Some(HalfMat::f16(&s[at..], rows, cols, stride))
            }
            _ => None,
        }
    }

    /// `rows × cols` int8 elements from `at` (row stride `stride`, a multiple of the row
    /// length), read in place where `isa` reads them ([`products::reads_half`]), with their
    /// rows' scales: `(matrix, scales, first, step)`, row `r`'s scale being
    /// `scales[first + r · step]`. `None` for other dtypes.
    pub fn byte_mat(
        &self,
        isa: Isa,
        at: usize,
        (rows, cols, stride): (usize, usize, usize),
    ) -> Option<(ByteMat<'a>, &'a [f32], usize, usize)> {
        match self.data {
            Data::Bytes {
                vals,
                scales,
                row,
                fp8,
            } if products::reads_half(isa, cols) && stride.is_multiple_of(row) => {
                let m = ByteMat::new(&vals[at..], fp8, rows, cols, stride);
                Some((m, scales, at / row, stride / row))
            }
            _ => None,
        }
    }

    /// `rows × cols` bf16 elements from `at` (row stride `stride`), read in place; `None` for
    /// other dtypes.
    pub fn bf16_mat(
        &self,
        at: usize,
        (rows, cols, stride): (usize, usize, usize),
    ) -> Option<HalfMat<'a>> {
        match self.data {
            Data::Bf16(s) => Some(HalfMat::bf16(&s[at..], rows, cols, stride)),
            _ => None,
        }
    }

    /// Elements `at..at + dst.len()` as f32, into `dst`.
    pub fn row_into(&self, at: usize, dst: &mut [f32]) {
        let n = dst.len();
        match self.data {
            Data::F32(s) => dst.copy_from_slice(&s[at..at + n]),
            // bf16 → f32 is a shift of the bits (a loop the compiler vectorises).
            Data::Bf16(s) => dst
                .iter_mut()
                .zip(&s[at..at + n])
                .for_each(|(o, x)| *o = f32::from_bits(u32::from(x.to_bits()) << 16)),
            Data::F16(s) => s[at..at + n].convert_to_f32_slice(dst),
            Data::Bytes {
                vals,
                scales,
                row,
                fp8,
            } => {
                // A row never straddles two scales (callers read whole rows or parts of one).
                let scale = scales[at / row];
                let src = &vals[at..at + n];
                if fp8 {
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(o, &x)| *o = fp8_e4m3(x) * scale);
                } else {
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(o, &x)| *o = (f32::from(x) - 128.0) * scale);
                }
            }
        }
    }

    /// Elements `at..at + 2·dst.len()` of a bf16 tensor as pairs (the first of each in the low
    /// 16 bits); `None` for other dtypes.
    pub fn pairs_into(&self, at: usize, dst: &mut [u32]) -> Option<()> {
        let Data::Bf16(s) = self.data else {
            return None;
        };
        let src = &s[at..at + 2 * dst.len()];
        dst.iter_mut()
            .zip(src.chunks_exact(2))
            .for_each(|(o, x)| *o = u32::from(x[0].to_bits()) | u32::from(x[1].to_bits()) << 16);
        Some(())
    }

    /// `rows × 2·pairs` bf16 elements from `at` (row stride `stride`) read in place as a
    /// matrix of pairs (`rows × pairs`), when the tensor is bf16, `stride` is even and element
    /// `at` is 4-byte aligned; `None` otherwise (the caller gathers the rows instead).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the pair products are x86-only
    pub fn pairs_mat(
        &self,
        at: usize,
        (rows, pairs, stride): (usize, usize, usize),
    ) -> Option<PairMat<'a>> {
        let Data::Bf16(s) = self.data else {
            return None;
        };
        if !stride.is_multiple_of(2) || !cfg!(target_endian = "little") {
            return None;
        }
        let s = s.get(at..)?;
        // SAFETY: every bit pattern is a valid u32; `align_to` hands out only the aligned,
        // whole words of the slice, and the bf16 pairs of a little-endian target are exactly
        // those words (first element in the low half).
        let (head, words, _) = unsafe { s.align_to::<u32>() };
        if !head.is_empty() {
            return None;
        }
        let needed = if rows == 0 || pairs == 0 {
            0
        } else {
            (rows - 1) * (stride / 2) + pairs
        };
        (words.len() >= needed).then(|| PairMat::new(words, rows, pairs, stride / 2))
    }

    /// `rows × cols` elements from `at` with row stride `stride` as an f32 matrix: the tensor
    /// itself for f32, else converted into `buf` (row stride `cols`).
    pub fn mat<'s>(
        &'s self,
        at: usize,
        (rows, cols, stride): (usize, usize, usize),
        buf: &'s mut [f32],
    ) -> Mat<'s> {
        match self.data {
            Data::F32(s) => Mat::new(&s[at..], rows, cols, stride),
            _ => {
                for r in 0..rows {
                    self.row_into(at + r * stride, &mut buf[r * cols..(r + 1) * cols]);
                }
                Mat::new(&buf[..rows * cols], rows, cols, cols)
            }
        }
    }

    /// Asks the CPU to start loading elements `at..at + n` into L2 (a hint; out-of-range
    /// addresses are skipped; L2 rather than L1, as the prefetch stream, `stream::prefetch`).
    pub fn prefetch(&self, at: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let step = match self.data {
                Data::F32(_) => 16,
                Data::Bytes { .. } => 64,
                _ => 32,
            };
            for c in (0..n).step_by(step) {
                if let Some(x) = self.ptr(at + c) {
                    // SAFETY: prefetching is a hint; `x` points into the tensor.
                    unsafe {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                            x.cast(),
                        )
                    };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (at, n);
    }

    /// The byte address range of elements `a..b` when both exist (for the prefetch stream).
    pub fn byte_range(&self, a: usize, b: usize) -> Option<(usize, usize)> {
        #[cfg(target_arch = "x86_64")]
        {
            let start = self.ptr(a)? as usize;
            let end = self.ptr(b.checked_sub(1)?)? as usize + 1;
            Some((start, end))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a, b);
            None
        }
    }

    /// Asks the CPU to start loading the `n` elements of the row at `at` (a hint: rows `H · D`
    /// apart each sit on their own pages, which the hardware prefetchers do not follow, so rows
    /// read one after the other wait on each in turn).
    pub fn prefetch_row(&self, at: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let size = match self.data {
                Data::F32(_) => 4,
                Data::Bf16(_) | Data::F16(_) => 2,
                Data::Bytes { .. } => 1,
            };
            for c in (0..n).step_by(64 / size) {
                if let Some(x) = self.ptr(at + c) {
                    // SAFETY: prefetching is a hint; `x` points into the tensor.
                    unsafe {
                        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                        _mm_prefetch::<_MM_HINT_T0>(x.cast())
                    };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (at, n);
    }

    /// Address of element `at`, if it exists (for prefetching).
    #[cfg(target_arch = "x86_64")]
    pub fn ptr(&self, at: usize) -> Option<*const u8> {
        match self.data {
            Data::F32(s) => s.get(at).map(|x| (x as *const f32).cast()),
            Data::Bf16(s) => s.get(at).map(|x| (x as *const bf16).cast()),
            Data::F16(s) => s.get(at).map(|x| (x as *const f16).cast()),
            Data::Bytes { vals, .. } => vals.get(at).map(|x| x as *const u8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mat::{ByteMat, Mat, MatMut};
    use super::super::products;
    use super::fp8_e4m3;

    /// e4m3 from its definition: `(−1)^s · 2^(e−7) · (1 + m/8)`, subnormals `m · 2⁻⁹`.
    fn e4m3(x: u8) -> f32 {
        // 2ⁿ from its bits (`powi` may be inexact: Miri makes it so).
        let pow2 = |n: i32| f32::from_bits(((n + 127) as u32) << 23);
        let (s, e, m) = (x >> 7, (x >> 3) & 15, x & 7);
        let v = if e == 0 {
            f32::from(m) * pow2(-9)
        } else {
            pow2(i32::from(e) - 7) * (1.0 + f32::from(m) / 8.0)
        };
        if s == 1 {
            -v
        } else {
            v
        }
    }

    /// Every byte (but NaN) widens to its e4m3 value, in the scalar conversion and in every
    /// instruction set's in-register one (recovered through `Q · Kᵀ` with unit query rows), and
    /// int8 bytes to their value minus 128.
    #[test]
    fn quantized_bytes_widen_exactly() {
        let bytes: Vec<u8> = (0..=255).collect();
        for &x in &bytes {
            if x & 0x7f != 0x7f {
                assert_eq!(fp8_e4m3(x), e4m3(x), "{x:#04x}");
            }
        }
        // Unit query rows: out[r][j] = k[j][r].
        let mut q = vec![0f32; 16 * 16];
        (0..16).for_each(|r| q[r * 16 + r] = 1.0);
        for isa in products::available() {
            if !products::reads_half(isa, 16) {
                continue;
            }
            for fp8 in [false, true] {
                let mut out = vec![0f32; 16 * 16];
                let k = ByteMat::new(&bytes, fp8, 16, 16, 16);
                let o = MatMut::new(&mut out, 16, 16, 16);
                products::qk_rows_bytes(isa, Mat::new(&q, 16, 16, 16), k, o, 1.0);
                for (j, row) in bytes.chunks(16).enumerate() {
                    for (r, &x) in row.iter().enumerate() {
                        let want = if fp8 { e4m3(x) } else { f32::from(x) - 128.0 };
                        let got = out[r * 16 + j];
                        if !fp8 || x & 0x7f != 0x7f {
                            assert_eq!(got, want, "{isa:?} fp8 {fp8}: {x:#04x}");
                        }
                    }
                }
            }
        }
    }
}
