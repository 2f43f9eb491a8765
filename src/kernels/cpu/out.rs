//! The buffers work items write from many threads: raw pointers whose rows each belong to one
//! work item.

use candle_core::{CpuStorage, DType, Device, Result, Shape, Tensor};

/// An f32 buffer written from many threads (the `(B, L, H, Dv)` output, the `(B, H, L)`
/// log-sum-exp, the gradients): every work item writes its own rows only.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub *mut f32);

// SAFETY: work items write disjoint rows (each `(b, i, head)` belongs to exactly one item), and
// the buffer outlives the parallel loop.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

/// The `(B, L, H, Dv)` output in the inputs' dtype (f32, bf16 or f16: half outputs are
/// rounded as their rows are written, with no f32 copy of the whole output), written from many
/// threads: every work item writes its own rows only.
#[derive(Clone, Copy)]
pub(super) enum OutBuf {
    F32(*mut f32),
    Bf16(*mut half::bf16),
    F16(*mut half::f16),
}

// SAFETY: as for `OutPtr`.
unsafe impl Sync for OutBuf {}
unsafe impl Send for OutBuf {}

/// The owner of an [`OutBuf`]: the output's elements in the dtype they are written in.
pub(super) enum OutVec {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl OutVec {
    /// `n` zeros in `dtype` (f32 for every dtype but bf16 and f16).
    pub(super) fn zeros(dtype: DType, n: usize) -> Self {
        use crate::pages::zeroed;
        match dtype {
            DType::BF16 => OutVec::Bf16(zeroed(n)),
            DType::F16 => OutVec::F16(zeroed(n)),
            _ => OutVec::F32(zeroed(n)),
        }
    }

    /// The buffer that work items write through.
    pub(super) fn buf(&mut self) -> OutBuf {
        match self {
            OutVec::F32(v) => OutBuf::F32(v.as_mut_ptr()),
            OutVec::Bf16(v) => OutBuf::Bf16(v.as_mut_ptr()),
            OutVec::F16(v) => OutBuf::F16(v.as_mut_ptr()),
        }
    }

    /// The elements as candle storage when they are in `dtype` already (else `self` back).
    pub(super) fn into_storage(self, dtype: DType) -> std::result::Result<CpuStorage, Self> {
        match (self, dtype) {
            (OutVec::F32(v), DType::F32) => Ok(CpuStorage::F32(v)),
            (OutVec::Bf16(v), DType::BF16) => Ok(CpuStorage::BF16(v)),
            (OutVec::F16(v), DType::F16) => Ok(CpuStorage::F16(v)),
            (other, _) => Err(other),
        }
    }

    /// The elements as a tensor of `shape` in `dtype` (f32 elements converted when `dtype` is
    /// another one).
    pub(super) fn into_tensor(self, shape: Shape, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self {
            OutVec::F32(v) => Tensor::from_vec(v, shape, dev)?.to_dtype(dtype),
            OutVec::Bf16(v) => Tensor::from_vec(v, shape, dev),
            OutVec::F16(v) => Tensor::from_vec(v, shape, dev),
        }
    }
}

impl OutBuf {
    /// Writes `src[x] · scale` to elements `off + x`.
    ///
    /// # Safety
    /// `off..off + src.len()` is inside the buffer and belongs to the calling work item.
    pub(super) unsafe fn write(self, off: usize, src: &[f32], scale: f32) {
        // SAFETY: the caller upholds this function's `# Safety` contract.
        unsafe {
            let n = src.len();
            match self {
                OutBuf::F32(p) => {
                    let dst = std::slice::from_raw_parts_mut(p.add(off), n);
                    dst.iter_mut().zip(src).for_each(|(o, x)| *o = x * scale);
                }
                OutBuf::Bf16(p) => {
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        return write_bf16_avx512(p.add(off), src, scale);
                    }
                    let dst = std::slice::from_raw_parts_mut(p.add(off), n);
                    dst.iter_mut()
                        .zip(src)
                        .for_each(|(o, x)| *o = bf16_nearest(x * scale));
                }
                OutBuf::F16(p) => {
                    use half::slice::HalfFloatSliceExt;
                    // Scaled in chunks on the stack, then rounded by `half`'s slice conversion
                    // (F16C where the CPU has it): `f16::from_f32` element by element checks the
                    // CPU's features on every call (a quarter of an f16 call's time at L = 128).
                    let dst = std::slice::from_raw_parts_mut(p.add(off), n);
                    let mut tmp = [0f32; 64];
                    for (d, s) in dst.chunks_mut(64).zip(src.chunks(64)) {
                        let t = &mut tmp[..s.len()];
                        t.iter_mut().zip(s).for_each(|(o, x)| *o = x * scale);
                        d.convert_from_f32_slice(t);
                    }
                }
            }
        }
    }

    /// Sets elements `off..off + n` to `v`.
    ///
    /// # Safety
    /// As for [`OutBuf::write`].
    pub(super) unsafe fn fill(self, off: usize, n: usize, v: f32) {
        // SAFETY: the caller upholds this function's `# Safety` contract.
        unsafe {
            match self {
                OutBuf::F32(p) => std::slice::from_raw_parts_mut(p.add(off), n).fill(v),
                OutBuf::Bf16(p) => {
                    std::slice::from_raw_parts_mut(p.add(off), n).fill(half::bf16::from_f32(v))
                }
                OutBuf::F16(p) => {
                    std::slice::from_raw_parts_mut(p.add(off), n).fill(half::f16::from_f32(v))
                }
            }
        }
    }
}

/// `dst[x] = bf16(src[x] · scale)` for every `x`, 16 lanes at a time ([`bf16_nearest`]'s
/// rounding, bit for bit).
///
/// # Safety
/// AVX-512F; `dst` holds `src.len()` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn write_bf16_avx512(dst: *mut half::bf16, src: &[f32], scale: f32) {
    // SAFETY: the caller upholds this function's `# Safety` contract.
    unsafe {
        use crate::gemm::ukr::{round16_512, Half};
        use std::arch::x86_64::*;
        let sv = _mm512_set1_ps(scale);
        let mut c = 0;
        while c < src.len() {
            let left = src.len() - c;
            let m: u16 = if left >= 16 {
                u16::MAX
            } else {
                (1u16 << left) - 1
            };
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src.as_ptr().add(c)), sv);
            let h = round16_512(v, Half::Bf16);
            // 16-bit lanes: a masked store of the lanes written (AVX-512F has no 16-bit masked
            // store; whole vectors, then the tail element by element).
            if left >= 16 {
                _mm256_storeu_si256(dst.add(c).cast(), h);
            } else {
                let mut lanes = [0u16; 16];
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), h);
                for (i, &x) in lanes[..left].iter().enumerate() {
                    *dst.add(c + i) = half::bf16::from_bits(x);
                }
            }
            c += 16;
        }
    }
}

/// The bf16 nearest to `x` (ties to even; NaN stays a quiet NaN), as `half::bf16::from_f32`,
/// but branch-free so that loops over it vectorise.
#[inline]
pub(crate) fn bf16_nearest(x: f32) -> half::bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    half::bf16::from_bits(if x.is_nan() { nan } else { rounded })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 rows written through [`OutBuf`] (16 lanes at a time where the CPU has AVX-512)
    /// equal [`bf16_nearest`] and `half`'s rounding bit for bit: ties both ways, NaN,
    /// infinities, denormals, overflow to infinity, every tail length.
    #[test]
    fn bf16_rows_round_like_half() {
        let mut src: Vec<f32> = vec![
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            1e-40,
            -1e-42,
            0.0,
            -0.0,
            f32::from_bits(0x3f80_8000), // a tie, even below: rounds down
            f32::from_bits(0x3f81_8000), // a tie, odd below: rounds up
            f32::from_bits(0x3f80_8001),
        ];
        let mut x = 0x1234_5678u32;
        while src.len() < 77 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            src.push(f32::from_bits(x));
        }
        for n in 0..src.len() {
            for scale in [1.0f32, 0.37] {
                let mut dst = vec![half::bf16::from_bits(0xAAAA); n + 1];
                // SAFETY: `dst` holds `n` elements (and one more, which must stay untouched).
                unsafe { OutBuf::Bf16(dst.as_mut_ptr()).write(0, &src[..n], scale) };
                // Equal bits, or both NaN (a NaN product's sign is not specified: Miri picks
                // either).
                let same = |a: half::bf16, b: half::bf16| {
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
                };
                for (i, (&got, &x)) in dst.iter().zip(&src[..n]).enumerate() {
                    let want = half::bf16::from_f32(x * scale);
                    assert!(
                        same(got, want),
                        "element {i} of {n}: {x:e} × {scale} gave {got} not {want}"
                    );
                    assert!(same(got, bf16_nearest(x * scale)), "element {i} of {n}");
                }
                assert_eq!(dst[n].to_bits(), 0xAAAA, "wrote past {n} elements");
            }
        }
    }
}
