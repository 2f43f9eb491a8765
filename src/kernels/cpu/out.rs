//! The buffers work items write from many threads: raw pointers whose rows each belong to one
//! work item.

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

impl OutBuf {
    /// Writes `src[x] · scale` to elements `off + x`.
    ///
    /// # Safety
    /// `off..off + src.len()` is inside the buffer and belongs to the calling work item.
    pub(super) unsafe fn write(self, off: usize, src: &[f32], scale: f32) {
        let n = src.len();
        match self {
            OutBuf::F32(p) => {
                let dst = std::slice::from_raw_parts_mut(p.add(off), n);
                dst.iter_mut().zip(src).for_each(|(o, x)| *o = x * scale);
            }
            OutBuf::Bf16(p) => {
                let dst = std::slice::from_raw_parts_mut(p.add(off), n);
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(o, x)| *o = bf16_nearest(x * scale));
            }
            OutBuf::F16(p) => {
                let dst = std::slice::from_raw_parts_mut(p.add(off), n);
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(o, x)| *o = half::f16::from_f32(x * scale));
            }
        }
    }

    /// Sets elements `off..off + n` to `v`.
    ///
    /// # Safety
    /// As for [`OutBuf::write`].
    pub(super) unsafe fn fill(self, off: usize, n: usize, v: f32) {
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

/// The bf16 nearest to `x` (ties to even; NaN stays a quiet NaN), as `half::bf16::from_f32`,
/// but branch-free so that loops over it vectorise.
#[inline]
pub(super) fn bf16_nearest(x: f32) -> half::bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    half::bf16::from_bits(if x.is_nan() { nan } else { rounded })
}
