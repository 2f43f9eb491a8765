//! V cut into panels for the AVX2 `P · V` micro-kernel: per KV head and tile of keys
//! ([`KeyTiles`]), the values of each group of [`PANEL`] columns are one contiguous block of
//! `BLOCK_K × PANEL` elements (keys `PANEL` elements apart), so that the micro-kernel reads its
//! operand as one run of addresses: the packed panels of a GEMM (BLIS's `B` panel).
//!
//! The micro-kernel walks a tile's keys once per row block of six query rows and panel of 16
//! columns. Read in place, or from the contiguous per-head copy of V (`Packed`, rows `Dv`
//! elements apart), the 16 columns of a tile's 256 keys are 256 lines a row apart, of which
//! L1 keeps a few sets' worth; as a panel they are 16 KiB in address order, which L1 keeps for
//! the whole row block loop. Measured on AMD Zen 3 (AVX2, a tile of `P · V` alone, 64 × 256 ×
//! 64 f32): 51% of the FMA peak with rows 3 KiB apart, 58% contiguous, 70% as panels.

use half::{bf16, f16};
use rayon::prelude::*;

use super::kt::KeyTiles;
use super::mat::PanelMat;
use super::spare::{Spare, Word};
use super::view::{Data, View};
use super::BLOCK_K;

/// Columns per panel (two AVX2 vectors of f32).
pub(super) const PANEL: usize = 16;

/// V `(B, S, Hkv, Dv)` as panels: `(B · Hkv, tile, ⌈Dv / PANEL⌉, BLOCK_K, PANEL)`, in V's dtype,
/// the columns past `Dv` zero.
pub(super) enum Panels {
    F32(Spare<f32>),
    Bf16(Spare<bf16>),
    F16(Spare<f16>),
}

impl Panels {
    /// Copies `v`, `(b, hkv, S, dv)`, into panels over `tiles` (f32 or half values; quantized
    /// ones are not copied), a task per KV head.
    pub(super) fn new(v: &View, (b, hkv, dv): (usize, usize, usize), tiles: KeyTiles) -> Self {
        let dims = (b, hkv, dv);
        match v.data {
            Data::F32(x) => Panels::F32(pack(x, v, dims, tiles)),
            Data::Bf16(x) => Panels::Bf16(pack(x, v, dims, tiles)),
            Data::F16(x) => Panels::F16(pack(x, v, dims, tiles)),
            Data::Bytes { .. } => unreachable!("quantized values are read in place"),
        }
    }

    /// Keys `j0..j0 + len` (inside one tile) of `head` (`batch · Hkv + KV head`).
    ///
    /// # Panics
    /// When the keys are not inside one tile of `tiles`, or past the copy.
    pub(super) fn tile(
        &self,
        tiles: KeyTiles,
        dv: usize,
        head: usize,
        (j0, len): (usize, usize),
    ) -> PanelMat<'_> {
        let (t, c, left) = tiles.at(j0);
        assert!(len <= left, "keys {j0}..{} cross a tile", j0 + len);
        let slab = BLOCK_K * PANEL;
        let at = (head * tiles.count() + t) * dv.div_ceil(PANEL) * slab + c * PANEL;
        match self {
            Panels::F32(x) => PanelMat::f32(&x[at..], len, dv, slab),
            Panels::Bf16(x) => PanelMat::half(&x[at..], true, len, dv, slab),
            Panels::F16(x) => PanelMat::half(&x[at..], false, len, dv, slab),
        }
    }
}

/// The panels of `x` (the elements of `v`).
fn pack<T: Word + Default + Send + Sync>(
    x: &[T],
    v: &View,
    (b, hkv, dv): (usize, usize, usize),
    tiles: KeyTiles,
) -> Spare<T> {
    let (nt, np) = (tiles.count(), dv.div_ceil(PANEL));
    let per_head = nt * np * BLOCK_K * PANEL;
    let mut out = Spare::new(b * hkv * per_head);
    if per_head == 0 {
        return out;
    }
    let s = tiles.keys();
    out.par_chunks_mut(per_head)
        .enumerate()
        .for_each(|(head, o)| {
            let (bi, kh) = (head / hkv, head % hkv);
            let mut j = 0;
            while j < s {
                // A tile's keys, one row of V at a time.
                let (t, c0, n_keys) = tiles.at(j);
                for c in c0..c0 + n_keys {
                    let row = &x[v.at(bi, j, kh)..][..dv];
                    for (p, part) in row.chunks(PANEL).enumerate() {
                        let at = ((t * np + p) * BLOCK_K + c) * PANEL;
                        let (dst, pad) = o[at..at + PANEL].split_at_mut(part.len());
                        dst.copy_from_slice(part);
                        pad.fill(T::default());
                    }
                    j += 1;
                }
            }
        });
    out
}
