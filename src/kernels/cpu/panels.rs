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
//!
//! The backward's `dQ += dS · K` reads K the way `P · V` reads V; on AVX2 it packs each key
//! tile of K into one tile of panels of its own ([`pack_tile`]), reused by every block of query
//! rows of the tile, instead of a copy of the whole of K.

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
                let tile = &mut o[t * np * BLOCK_K * PANEL..];
                for c in c0..c0 + n_keys {
                    put_row(&x[v.at(bi, j, kh)..][..dv], c, tile);
                    j += 1;
                }
            }
        });
    out
}

/// `row` as key `c` of the panels of one tile at `tile` (panel `p` at `p · BLOCK_K · PANEL`),
/// the columns past its end zero.
fn put_row<T: Copy + Default>(row: &[T], c: usize, tile: &mut [T]) {
    for (p, part) in row.chunks(PANEL).enumerate() {
        let at = (p * BLOCK_K + c) * PANEL;
        let (dst, pad) = tile[at..at + PANEL].split_at_mut(part.len());
        dst.copy_from_slice(part);
        pad.fill(T::default());
    }
}

/// Rows `(bi, j0..j0 + n, kh)` of the f32 view `x` (`w` columns, `n ≤ BLOCK_K`) as the panels
/// of one tile in `buf` (grown as needed): the backward's keys for `dQ += dS · K` on AVX2,
/// packed once per key tile and read by every block of query rows. Returns the buffer to read
/// with [`tile_panels`].
pub(super) fn pack_tile<'b>(
    x: &View,
    (bi, kh, j0, n): (usize, usize, usize, usize),
    w: usize,
    buf: &'b mut Vec<f32>,
) -> &'b [f32] {
    let Data::F32(data) = x.data else {
        unreachable!("the backward's f32 products read f32 keys")
    };
    assert!(n <= BLOCK_K, "{n} keys do not fit in a tile of {BLOCK_K}");
    let len = w.div_ceil(PANEL) * BLOCK_K * PANEL;
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    for c in 0..n {
        put_row(&data[x.at(bi, j0 + c, kh)..][..w], c, buf);
    }
    &buf[..len]
}

/// The first `rows` keys of a tile packed by [`pack_tile`] (`w` columns).
pub(super) fn tile_panels(buf: &[f32], rows: usize, w: usize) -> PanelMat<'_> {
    PanelMat::f32(buf, rows, w, BLOCK_K * PANEL)
}
