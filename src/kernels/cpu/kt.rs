//! Copies of K and V made once per call when many query rows share each key tile: K transposed
//! for the `Q · Kᵀ` micro-kernels (which broadcast query elements against vectors of keys), and V
//! with each head's rows contiguous for `P · V`.

use half::{bf16, f16};
use rayon::prelude::*;

use super::spare::{Spare, Word};
use super::tile::Kt;
use super::view::{Data, View};

/// The row stride of a transposed copy of `s` keys (4-byte elements): `s` rounded up to whole
/// cache lines, and to an odd number of them. Rows a multiple of 128 bytes apart (S = 2048 keys:
/// 8 KiB) map to a few of L1's sets, and a tile's `D` rows evicted each other: the AVX2
/// micro-kernel lost a fifth of its speed to it. An odd number of lines puts every row of a tile
/// in its own set.
pub(super) fn kt_stride(s: usize) -> usize {
    let lines = s.div_ceil(16);
    16 * (lines | 1)
}

/// K `(B, S, Hkv, D)` (strided, any dtype) → `(B, Hkv, D, S)` f32, rows [`kt_stride`] apart (see
/// [`transpose_blocks`]).
pub(super) fn transpose_heads(k: &View, b: usize, hkv: usize, s: usize, d: usize) -> Spare<f32> {
    transpose_blocks(k, (b, hkv, s, d), 1, |at, dst| k.row_into(at, dst))
}

/// The owner of a [`Kt`].
pub(super) enum KtBuf {
    F32(Spare<f32>),
    Pairs(Spare<u32>),
}

/// K `(B, S, Hkv, D)` (strided) → `(B, Hkv, w, S)`, one `(w, S)` block per KV head with rows
/// [`kt_stride`]`(S)` apart, in parallel, where a row of K is `w` units of `unit` elements (an f32 element, or a pair of
/// bf16 elements) and `read(at, dst)` reads `dst.len()` units from element `at`. Each 32 × 32
/// tile is transposed in a small buffer first, so that both the reads (key rows) and the writes
/// (rows of kᵀ, `S` apart) are whole contiguous runs: scattering single values to rows `S`
/// apart thrashes the cache sets they all map to.
pub(super) fn transpose_blocks<T: Word + Default + Send + Sync>(
    k: &View,
    (b, hkv, s, w): (usize, usize, usize, usize),
    unit: usize,
    read: impl Fn(usize, &mut [T]) + Sync,
) -> Spare<T> {
    const T: usize = 32;
    let ks = kt_stride(s);
    // The columns past `s` (stride padding) are never read.
    let mut out = Spare::new(b * hkv * w * ks);
    if s * w == 0 {
        return out;
    }
    let [sb, st, sh] = k.strides;
    out.par_chunks_mut(ks * w).enumerate().for_each(|(bk, o)| {
        let base = (bk / hkv) * sb + (bk % hkv) * sh;
        let mut buf = [T::default(); T * T];
        let mut row = [T::default(); T];
        for j0 in (0..s).step_by(T) {
            let nj = T.min(s - j0);
            for d0 in (0..w).step_by(T) {
                let nd = T.min(w - d0);
                for jj in 0..nj {
                    read(base + (j0 + jj) * st + d0 * unit, &mut row[..nd]);
                    for (dd, &x) in row[..nd].iter().enumerate() {
                        buf[dd * T + jj] = x;
                    }
                }
                for dd in 0..nd {
                    let at = (d0 + dd) * ks + j0;
                    o[at..at + nj].copy_from_slice(&buf[dd * T..dd * T + nj]);
                }
            }
        }
    });
    out
}

impl KtBuf {
    /// The copy, borrowed.
    pub(super) fn view(&self) -> Kt<'_> {
        match self {
            KtBuf::F32(x) => Kt::F32(x),
            KtBuf::Pairs(x) => Kt::Pairs(x),
        }
    }
}

/// V `(B, S, Hkv, Dv)` copied to `(B, Hkv, S, Dv)`, contiguous, in its own dtype. In the
/// projections' layout one head's value rows are `Hkv · Dv` (or, in a packed `[q; k; v]`
/// projection, `3 · E`) elements apart: a power-of-two multiple of 1 KiB maps a tile's rows to a
/// few L1 sets, which cost the AVX2 `P · V` micro-kernel 40% of its speed (9% on AVX-512).
/// Contiguous rows spread over every set.
pub(super) enum Packed {
    F32(Spare<f32>),
    Bf16(Spare<bf16>),
    F16(Spare<f16>),
}

impl Packed {
    /// Copies `v`, `(b, hkv, s, dv)`, one `(S, Dv)` block per KV head, in parallel (f32 or
    /// half values; int8 ones are not packed).
    pub(super) fn new(v: &View, dims: (usize, usize, usize, usize)) -> Self {
        match v.data {
            Data::F32(x) => Packed::F32(pack(x, v.strides, dims)),
            Data::Bf16(x) => Packed::Bf16(pack(x, v.strides, dims)),
            Data::F16(x) => Packed::F16(pack(x, v.strides, dims)),
            // Int8 rows keep their cache layout (their scales are numbered by it).
            Data::Bytes { .. } => unreachable!("int8 values are read in place, never packed"),
        }
    }

    /// The copy as a `(B, S, Hkv, Dv)` view.
    pub(super) fn view(&self, hkv: usize, s: usize, dv: usize) -> View<'_> {
        let data = match self {
            Packed::F32(x) => Data::F32(x),
            Packed::Bf16(x) => Data::Bf16(x),
            Packed::F16(x) => Data::F16(x),
        };
        View {
            data,
            strides: [hkv * s * dv, dv, s * dv],
            rows: None,
        }
    }
}

fn pack<T: Word + Send + Sync>(
    x: &[T],
    [sb, st, sh]: [usize; 3],
    (b, hkv, s, dv): (usize, usize, usize, usize),
) -> Spare<T> {
    let mut out = Spare::new(b * hkv * s * dv);
    if s * dv == 0 {
        return out;
    }
    out.par_chunks_mut(s * dv).enumerate().for_each(|(bk, o)| {
        let base = (bk / hkv) * sb + (bk % hkv) * sh;
        for (j, row) in o.chunks_exact_mut(dv).enumerate() {
            row.copy_from_slice(&x[base + j * st..base + j * st + dv]);
        }
    });
    out
}
