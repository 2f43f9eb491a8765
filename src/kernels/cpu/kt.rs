//! Copies of K and V made once per call when many query rows share each key tile: K transposed
//! for the `Q · Kᵀ` micro-kernels (which broadcast query elements against vectors of keys), and V
//! with each head's rows contiguous for `P · V`.

use half::{bf16, f16};
use rayon::prelude::*;

use super::mat::Mat;
use super::spare::{Spare, Word};
use super::view::{Data, View};
use super::BLOCK_K;

/// How the per-call copies of K and V (the transposed copies, [`transpose_blocks`], and the
/// value panels, `panels.rs`) are cut into tiles of keys: aligned tiles of [`BLOCK_K`] keys
/// over the keys the mask plan covers (`0..real_s`), then tiles of `BLOCK_K` from `real_s` over
/// the appended keys. These are the tiles the forward's walk (`walk.rs`) and the backward visit,
/// so a tile they visit lies in one of these. Each is stored whole: a tile of a transposed copy
/// spans `w` rows of [`KeyTiles::stride`] elements (68 KiB at `D` = 64, f32), where rows of the
/// whole head, `S` keys apart, put every row of a tile on its own page (64 of them at `D` = 64,
/// more than the L1 TLB holds) and cost the AVX2 `Q · Kᵀ` 16% at `S` = 8192 (AMD Zen 3).
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyTiles {
    real_s: usize,
    s: usize,
}

impl KeyTiles {
    /// The tiles of `s` keys, the mask plan covering the first `real_s`.
    pub(super) fn new(real_s: usize, s: usize) -> Self {
        assert!(real_s <= s, "{real_s} masked keys of {s}");
        Self { real_s, s }
    }

    /// The keys, `S`.
    pub(super) fn keys(self) -> usize {
        self.s
    }

    /// How many tiles there are.
    pub(super) fn count(self) -> usize {
        self.real_s.div_ceil(BLOCK_K) + (self.s - self.real_s).div_ceil(BLOCK_K)
    }

    /// The keys of every tile in order, as `(first, end)`: the masked keys', then
    /// [`KeyTiles::appended`].
    pub(super) fn spans(self) -> impl Iterator<Item = (usize, usize)> {
        Self::run(0, self.real_s).chain(self.appended())
    }

    /// The keys of the tiles of the appended keys (`real_s..s`), as `(first, end)`.
    pub(super) fn appended(self) -> impl Iterator<Item = (usize, usize)> {
        Self::run(self.real_s, self.s)
    }

    /// Tiles of [`BLOCK_K`] keys from `from`, the last ending at `to`.
    fn run(from: usize, to: usize) -> impl Iterator<Item = (usize, usize)> {
        (from..to)
            .step_by(BLOCK_K)
            .map(move |j0| (j0, (j0 + BLOCK_K).min(to)))
    }

    /// Key `j`'s tile, its column in that tile, and the keys from `j` to the tile's end.
    pub(super) fn at(self, j: usize) -> (usize, usize, usize) {
        debug_assert!(j < self.s);
        if j < self.real_s {
            let c = j % BLOCK_K;
            (j / BLOCK_K, c, (BLOCK_K - c).min(self.real_s - j))
        } else {
            let x = j - self.real_s;
            let c = x % BLOCK_K;
            let t = self.real_s.div_ceil(BLOCK_K) + x / BLOCK_K;
            (t, c, (BLOCK_K - c).min(self.s - j))
        }
    }

    /// The row stride of a tile of a transposed copy ([`kt_stride`] of its widest tile).
    pub(super) fn stride(self) -> usize {
        kt_stride(self.s.min(BLOCK_K))
    }

    /// Keys `j0..j0 + bk` of `head` (`batch · Hkv + KV head`) in a transposed copy `xt` of
    /// `w` rows per key: a `w × bk` matrix, rows [`KeyTiles::stride`] apart.
    ///
    /// # Panics
    /// When the keys are not inside one tile, or past the copy.
    pub(super) fn kt<'a, T>(
        self,
        xt: &'a [T],
        w: usize,
        head: usize,
        (j0, bk): (usize, usize),
    ) -> Mat<'a, T> {
        if bk == 0 {
            return Mat::new(&xt[..0], w, 0, 1);
        }
        let (t, c, left) = self.at(j0);
        assert!(bk <= left, "keys {j0}..{} cross a tile", j0 + bk);
        let ts = self.stride();
        let base = (head * self.count() + t) * w * ts + c;
        Mat::new(&xt[base..], w, bk, ts)
    }
}

/// The row stride of a transposed copy of `s` keys (4-byte elements): `s` rounded up to whole
/// cache lines, and to an odd number of them. Rows a multiple of 128 bytes apart (S = 2048 keys:
/// 8 KiB) map to a few of L1's sets, and a tile's `D` rows evicted each other: the AVX2
/// micro-kernel lost a fifth of its speed to it. An odd number of lines puts every row of a tile
/// in its own set.
fn kt_stride(s: usize) -> usize {
    let lines = s.div_ceil(16);
    16 * (lines | 1)
}

/// K `(B, S, Hkv, D)` (strided, any dtype) → its transposed copy in f32 tiles of `tiles` (see
/// [`transpose_blocks`]).
pub(super) fn transpose_heads(
    k: &View,
    (b, hkv, d): (usize, usize, usize),
    tiles: KeyTiles,
) -> Spare<f32> {
    transpose_blocks(k, (b, hkv, d), tiles, |at, dst| k.row_into(at, dst))
}

/// A transposed copy of K (or, in the backward, of V), borrowed from its [`KtBuf`]: one block
/// per `(batch, KV head)` for the `Q · Kᵀ` micro-kernels, in tiles of keys ([`KeyTiles`]).
#[derive(Clone, Copy)]
pub(super) enum Kt<'a> {
    /// f32 elements, `(B, Hkv, D, S)`.
    F32(&'a [f32]),
    /// bf16 pairs along the head dimension, `(B, Hkv, D/2, S)` (AVX512-BF16 dot products; the
    /// query rows are read as pairs too).
    Pairs(&'a [u32]),
}

/// The owner of a [`Kt`].
pub(super) enum KtBuf {
    F32(Spare<f32>),
    Pairs(Spare<u32>),
}

/// K `(B, S, Hkv, D)` (strided) → `(B, Hkv, tile, w, stride)`: per KV head, each tile of
/// `tiles` as a `(w, tile's keys)` block with rows [`KeyTiles::stride`] apart (read with
/// [`KeyTiles::kt`]), in parallel, where a row of K is `w` units (f32 elements, or pairs of
/// bf16 elements) and `read(at, dst)` reads `dst.len()` units from element `at`.
///
/// A task owns [`BLOCK`] keys of one batch element: it reads their rows of every KV head in
/// memory order ([`Blocks::rows`]), then transposes each head's rows as 32 × 32 tiles in a small
/// buffer, so that every write is a whole run of `kᵀ`'s row (scattering single values to rows
/// `S` apart thrashes the cache sets they all map to). Reading head by head instead, in the
/// projections' `(B, S, Hkv, D)` layout, jumped a page per key row, which the hardware
/// prefetchers do not follow: the copy took about twice as long (AMD Zen 4, causal L = 2048,
/// H = 16, f32).
pub(super) fn transpose_blocks<T: Word + Default + Send + Sync>(
    k: &View,
    (b, hkv, w): (usize, usize, usize),
    tiles: KeyTiles,
    read: impl Fn(usize, &mut [T]) + Sync,
) -> Spare<T> {
    let (s, ks, nt) = (tiles.s, tiles.stride(), tiles.count());
    // The columns past a tile's keys (stride padding) are never read.
    let mut out = Spare::new(b * hkv * nt * w * ks);
    if s * w * hkv == 0 {
        return out;
    }
    let blocks = Blocks::new(k.strides, (b, hkv, s, w));
    let dst = Dst(out.as_mut_ptr(), out.len());
    blocks.run(|rows, (bi, j0, nj), (h0, nh)| {
        let mut buf = [T::default(); BLOCK * BLOCK];
        blocks.rows(rows, (bi, j0, nj), (h0, nh), &read);
        for kh in h0..h0 + nh {
            let tile = &rows[(kh - h0) * BLOCK * w..(kh - h0 + 1) * BLOCK * w];
            let o = (bi * hkv + kh) * nt * w * ks;
            for d0 in (0..w).step_by(BLOCK) {
                let nd = BLOCK.min(w - d0);
                for jj in 0..nj {
                    for (dd, &x) in tile[jj * w + d0..jj * w + d0 + nd].iter().enumerate() {
                        buf[dd * BLOCK + jj] = x;
                    }
                }
                for dd in 0..nd {
                    // Keys `j0..j0 + nj` of row `d0 + dd` of head `kh`: this task's columns,
                    // in the one or two tiles they fall in.
                    let row = &buf[dd * BLOCK..dd * BLOCK + nj];
                    let mut jj = 0;
                    while jj < nj {
                        let (t, c, left) = tiles.at(j0 + jj);
                        let n = left.min(nj - jj);
                        dst.write(o + (t * w + d0 + dd) * ks + c, &row[jj..jj + n]);
                        jj += n;
                    }
                }
            }
        }
    });
    out
}

/// Keys per copy task (and the side of the transposed tiles).
const BLOCK: usize = 32;

/// Most bytes of key rows one copy task holds at once (it takes fewer heads when a block of
/// every head's rows would be larger: at most a quarter of a typical L2).
const TASK_BYTES: usize = 256 << 10;

/// The copy tasks over `(B, S, Hkv, w)` rows: [`BLOCK`] keys of one batch element and a group of
/// KV heads each, run in parallel.
struct Blocks {
    strides: [usize; 3],
    b: usize,
    hkv: usize,
    s: usize,
    w: usize,
    /// KV heads per task.
    group: usize,
}

impl Blocks {
    /// The tasks over rows of `w` units (at most 4 bytes each).
    fn new(strides: [usize; 3], (b, hkv, s, w): (usize, usize, usize, usize)) -> Self {
        let group = (TASK_BYTES / (BLOCK * w * 4)).clamp(1, hkv);
        Self {
            strides,
            b,
            hkv,
            s,
            w,
            group,
        }
    }

    /// Runs `f(rows, (batch, first key, keys), (first head, heads))` on every task in
    /// parallel, with `rows` a per-worker buffer of `heads × BLOCK × w` units.
    fn run<T: Word + Default + Send>(
        &self,
        f: impl Fn(&mut [T], (usize, usize, usize), (usize, usize)) + Sync,
    ) {
        let (kb, hg) = (self.s.div_ceil(BLOCK), self.hkv.div_ceil(self.group));
        (0..self.b * kb * hg).into_par_iter().for_each_init(
            || vec![T::default(); self.group * BLOCK * self.w],
            |rows, task| {
                let (bi, jb, g) = (task / (kb * hg), task / hg % kb, task % hg);
                let (j0, h0) = (jb * BLOCK, g * self.group);
                let (nj, nh) = (BLOCK.min(self.s - j0), self.group.min(self.hkv - h0));
                f(rows, (bi, j0, nj), (h0, nh));
            },
        );
    }

    /// Reads keys `j0..j0 + nj` of heads `h0..h0 + nh` of batch element `bi` into `rows`
    /// (`(head, key, w)`), in the order of their addresses: key by key when the heads of a key
    /// are adjacent (the projections' layout), head by head otherwise.
    fn rows<T>(
        &self,
        rows: &mut [T],
        (bi, j0, nj): (usize, usize, usize),
        (h0, nh): (usize, usize),
        read: &impl Fn(usize, &mut [T]),
    ) {
        let [sb, st, sh] = self.strides;
        let w = self.w;
        let mut one = |kh: usize, jj: usize| {
            let r = ((kh - h0) * BLOCK + jj) * w;
            read(bi * sb + (j0 + jj) * st + kh * sh, &mut rows[r..r + w]);
        };
        if st >= sh {
            for jj in 0..nj {
                for kh in h0..h0 + nh {
                    one(kh, jj);
                }
            }
        } else {
            for kh in h0..h0 + nh {
                for jj in 0..nj {
                    one(kh, jj);
                }
            }
        }
    }
}

/// A buffer that parallel copy tasks write at disjoint places: (pointer, length).
struct Dst<T>(*mut T, usize);

// SAFETY: the tasks write disjoint ranges of the buffer (each owns its keys' columns),
// and nothing reads it until every task has finished.
unsafe impl<T: Send> Send for Dst<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Dst<T> {}

impl<T: Copy> Dst<T> {
    /// Writes `src` at element `at`; the caller owns that range (no other task writes it).
    fn write(&self, at: usize, src: &[T]) {
        assert!(at + src.len() <= self.1, "copy task writes past its buffer");
        // SAFETY: in bounds (asserted); the range belongs to the calling task alone, and the
        // buffer outlives every task (`run` returns after all of them).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(at), src.len()) };
    }
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

/// `x` `(b, S, hkv, dv)` with `strides` copied to `(b, hkv, S, dv)`, contiguous, a task per
/// head: each row is one contiguous copy. (Tasks of a block of keys over every head, reading
/// the rows in address order as [`transpose_blocks`] does, measured no faster here.)
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

#[cfg(test)]
mod tests {
    use super::{KeyTiles, BLOCK_K};

    /// The tiles cover every key once, in order: aligned over the masked keys, then from
    /// `real_s` on; `at` names each key's tile, column and the keys left in its tile, and
    /// `spans` / `appended` list the same tiles.
    #[test]
    fn key_tiles_partition_the_keys_as_the_walks_visit_them() {
        for (real_s, s) in [
            (0, 0),
            (0, 5),
            (1, 1),
            (255, 258),
            (256, 256),
            (600, 900),
            (513, 513),
        ] {
            let tiles = KeyTiles::new(real_s, s);
            let spans: Vec<_> = tiles.spans().collect();
            let mut seen = 0;
            let mut j = 0;
            while j < s {
                let (t, c, left) = tiles.at(j);
                assert_eq!(
                    spans[t],
                    (j, j + left),
                    "S = {real_s}+{}: tile {t}",
                    s - real_s
                );
                assert_eq!((t, c), (seen, 0), "S = {real_s}+{}: key {j}", s - real_s);
                let start = if j < real_s { j } else { j - real_s };
                assert!(start.is_multiple_of(BLOCK_K) && (1..=BLOCK_K).contains(&left));
                assert!(
                    j >= real_s || j + left <= real_s,
                    "a tile crosses the masked keys' end"
                );
                for x in 0..left {
                    assert_eq!(tiles.at(j + x), (t, x, left - x));
                }
                seen += 1;
                j += left;
            }
            assert_eq!(tiles.count(), seen, "S = {real_s}+{}", s - real_s);
            assert_eq!(spans.len(), seen);
            let appended: Vec<_> = tiles.appended().collect();
            assert_eq!(appended, spans[spans.len() - appended.len()..]);
            assert!(appended.iter().all(|&(j0, _)| j0 >= real_s));
        }
    }
}
