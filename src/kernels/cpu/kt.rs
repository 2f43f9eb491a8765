//! Transposed copies of K for the `Q · Kᵀ` micro-kernels: made once per call when many query
//! rows share each key tile, so that the scores' micro-kernels broadcast query elements against
//! vectors of keys.

use rayon::prelude::*;

use super::tile::Kt;
use super::view::View;

/// K `(B, S, Hkv, D)` (strided, any dtype) → `(B, Hkv, D, S)` f32, contiguous (see
/// [`transpose_blocks`]).
pub(super) fn transpose_heads(k: &View, b: usize, hkv: usize, s: usize, d: usize) -> Vec<f32> {
    transpose_blocks(k, (b, hkv, s, d), 1, |at, dst| k.row_into(at, dst))
}

/// The owner of a [`Kt`].
pub(super) enum KtBuf {
    F32(Vec<f32>),
    Pairs(Vec<u32>),
}

/// K `(B, S, Hkv, D)` (strided) → `(B, Hkv, w, S)` contiguous, one `(w, S)` block per KV head,
/// in parallel, where a row of K is `w` units of `unit` elements (an f32 element, or a pair of
/// bf16 elements) and `read(at, dst)` reads `dst.len()` units from element `at`. Each 32 × 32
/// tile is transposed in a small buffer first, so that both the reads (key rows) and the writes
/// (rows of kᵀ, `S` apart) are whole contiguous runs: scattering single values to rows `S`
/// apart thrashes the cache sets they all map to.
pub(super) fn transpose_blocks<T: Copy + Default + Send + Sync>(
    k: &View,
    (b, hkv, s, w): (usize, usize, usize, usize),
    unit: usize,
    read: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    const T: usize = 32;
    let mut out = vec![T::default(); b * hkv * w * s];
    if s * w == 0 {
        return out;
    }
    let [sb, st, sh] = k.strides;
    out.par_chunks_mut(s * w).enumerate().for_each(|(bk, o)| {
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
                    let at = (d0 + dd) * s + j0;
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
