//! Packing: a block of a row-major operand rewritten as panels for the micro-kernels
//! ([`super::ukr`]): panel `p` holds rows `p·R .. p·R + R` (`R` = the kernel's `MR` for `x`,
//! `NR` for the weight), step-major (`[k][R]`), so that each micro-kernel step reads `R`
//! consecutive elements. Rows past the operand's end are zeros.
//!
//! A packed element is 4 bytes: an f32 (bf16 and f16 operands widened exactly) or, for the
//! AVX512-BF16 kernel, a pair of bf16 values along `k` (`k` even in the low half; a missing
//! last element of an odd `K` is zero).

use half::{bf16, f16};

/// How a packed operand stores its elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// f32 (bf16 and f16 widened: exact).
    F32,
    /// Pairs of bf16 along `k` (bf16 operands only).
    Bf16Pairs,
}

impl Form {
    /// Elements of `K` per packed element.
    pub(crate) fn k_per_unit(self) -> usize {
        match self {
            Form::F32 => 1,
            Form::Bf16Pairs => 2,
        }
    }
}

/// An element type the GEMM reads and writes: f32, bf16 or f16.
pub(crate) trait Elem: Copy + Default + Send + Sync + 'static {
    /// Whether this is f32 (the output is then accumulated in place).
    const IS_F32: bool;
    /// The 16-bit format of this type, if it is one (AVX-512 kernels round into it directly).
    const HALF: super::ukr::Half;
    /// `dst[i] = src[i]` widened to f32 (exact).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// `dst[i]` = the pair `(src[2i], src[2i + 1])` as bf16 bits (low half first), the missing
    /// second element of an odd `src` zero. Only bf16 is ever packed in pairs (the plan's rule).
    fn pairs(src: &[Self], dst: &mut [u32]);
    /// `dst[i]` = the element nearest to `src[i]` (round to nearest even).
    fn store(src: &[f32], dst: &mut [Self]);
}

impl Elem for f32 {
    const IS_F32: bool = true;
    const HALF: super::ukr::Half = super::ukr::Half::No;
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn pairs(_: &[Self], _: &mut [u32]) {
        unreachable!("f32 is never packed in bf16 pairs")
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Elem for bf16 {
    const IS_F32: bool = false;
    const HALF: super::ukr::Half = super::ukr::Half::Bf16;
    fn widen(src: &[Self], dst: &mut [f32]) {
        // A shift: vectorises (half's per-element conversion does not).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn pairs(src: &[Self], dst: &mut [u32]) {
        let whole = src.chunks_exact(2);
        let last = whole.remainder().first().map(|h| h.to_bits() as u32);
        let n = whole.len();
        for (d, p) in dst.iter_mut().zip(whole) {
            *d = p[0].to_bits() as u32 | (p[1].to_bits() as u32) << 16;
        }
        if let (Some(lo), Some(d)) = (last, dst.get_mut(n)) {
            *d = lo;
        }
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        for (o, &x) in dst.iter_mut().zip(src) {
            *o = crate::kernels::cpu::bf16_nearest(x);
        }
    }
}

impl Elem for f16 {
    const IS_F32: bool = false;
    const HALF: super::ukr::Half = super::ukr::Half::F16;
    fn widen(src: &[Self], dst: &mut [f32]) {
        // half's slice conversion (F16C where the CPU has it).
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
    fn pairs(_: &[Self], _: &mut [u32]) {
        unreachable!("f16 is never packed in bf16 pairs")
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

/// Steps of `k` packed per chunk: each of the `R` rows is read 1 KiB (f32) at a time into a
/// staging block (`R × CHUNK`, at most 32 KiB) that is then transposed into the panel (64-step
/// chunks packed 2–8% slower: shorter row streams).
const CHUNK: usize = 256;

/// A row-major source operand: `rows` rows of `k` elements, `stride` apart.
#[derive(Clone, Copy)]
pub(crate) struct Src<'a, T> {
    /// The elements (row `r` starts at `r · stride`).
    pub data: &'a [T],
    /// Elements between the starts of two rows.
    pub stride: usize,
    /// Rows.
    pub rows: usize,
    /// Elements per row (`K`).
    pub k: usize,
}

/// Packs rows `r0 .. r0 + panels·R` (rows past `src.rows` as zeros) and packed steps
/// `u0 .. u0 + units` of `src` into `dst`: panel `p` at `dst[p · panel_stride ..]`, step `u`
/// of its row `i` at `+ u·R + i`.
///
/// Each chunk of [`CHUNK`] steps is staged row by row (widened or paired, vectorised) and then
/// transposed into the panel.
///
/// # Panics
/// When `dst` is too short, a step lies past the packed length of `K`, or `r` is not a tile
/// dimension of a kernel (6, 14, 16, 32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack<T: Elem>(
    form: Form,
    src: Src<T>,
    r0: usize,
    panels: usize,
    r: usize,
    (u0, units): (usize, usize),
    dst: &mut [u32],
    panel_stride: usize,
) {
    match r {
        6 => pack_r::<T, 6>(form, src, r0, panels, (u0, units), dst, panel_stride),
        14 => pack_r::<T, 14>(form, src, r0, panels, (u0, units), dst, panel_stride),
        16 => pack_r::<T, 16>(form, src, r0, panels, (u0, units), dst, panel_stride),
        32 => pack_r::<T, 32>(form, src, r0, panels, (u0, units), dst, panel_stride),
        _ => panic!("pack: no kernel has a tile dimension of {r}"),
    }
}

/// [`pack`] for panels of `R` rows.
fn pack_r<T: Elem, const R: usize>(
    form: Form,
    src: Src<T>,
    r0: usize,
    panels: usize,
    (u0, units): (usize, usize),
    dst: &mut [u32],
    panel_stride: usize,
) {
    let per = form.k_per_unit();
    assert!((u0 + units) * per < src.k + per, "pack: steps past K");
    assert!(panels == 0 || dst.len() >= (panels - 1) * panel_stride + units * R);
    let mut stage = [[0u32; CHUNK]; R];
    let mut wide = [0f32; CHUNK];
    for p in 0..panels {
        let panel = &mut dst[p * panel_stride..p * panel_stride + units * R];
        let mut c0 = 0;
        while c0 < units {
            let cn = (units - c0).min(CHUNK);
            for (i, st) in stage.iter_mut().enumerate() {
                let row = r0 + p * R + i;
                let st = &mut st[..cn];
                if row >= src.rows {
                    st.fill(0);
                    continue;
                }
                let e0 = (u0 + c0) * per;
                let e1 = ((u0 + c0 + cn) * per).min(src.k);
                let s = &src.data[row * src.stride + e0..row * src.stride + e1];
                match form {
                    Form::F32 => {
                        T::widen(s, &mut wide[..cn]);
                        for (d, w) in st.iter_mut().zip(&wide) {
                            *d = w.to_bits();
                        }
                    }
                    Form::Bf16Pairs => T::pairs(s, st),
                }
            }
            let out = &mut panel[c0 * R..(c0 + cn) * R];
            for (u, o) in out.chunks_exact_mut(R).enumerate() {
                for (i, x) in o.iter_mut().enumerate() {
                    *x = stage[i][u];
                }
            }
            c0 += cn;
        }
    }
}
