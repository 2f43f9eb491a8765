//! The walk over the key tiles of one work item, in one place for the prefill tile (`tile.rs`)
//! and the decoding paths (`decode.rs`): which keys are visited, in which sub-tiles and order,
//! which are skipped, which are masked, and which keys come next (to prefetch). The callers keep
//! their own state and prefetch policy; the walk only enumerates.
//!
//! The keys a work item may see, `[k_lo, k_hi)` (the union of its rows' visible ranges, clipped
//! to its chunk), are walked in one of two ways:
//! - strided rows: tiles of [`BLOCK_K`] keys aligned to multiples of `BLOCK_K` (clipped to the
//!   range), each cut into sub-tiles of `step` keys; a tile on which the dense key padding is
//!   `-inf` throughout ([`Keys::dead`]) is skipped by its aligned index;
//! - gathered rows (a paged cache): sub-tiles of up to `step` keys from `k_lo`, each made of runs
//!   of consecutive rows ([`View::tile_end`](super::view::View::tile_end)), none skipped.
//!
//! Then, when asked, the appended keys `real_s..s` in tiles of `BLOCK_K`, never masked.

use super::kt::KeyTiles;
use super::tile::Ctx;
use super::BLOCK_K;

/// One sub-tile of keys visited by [`walk_keys`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct KeyTile {
    /// The first key of the sub-tile.
    pub j0: usize,
    /// One past its last key.
    pub j1: usize,
    /// The keys of the next sub-tile of the range, to prefetch while this one is computed:
    /// empty when there is none (`(0, 0)`, or `(k_hi, k_hi)` after the last strided sub-tile),
    /// for the appended keys, and when [`Walk::next`] is off. The next strided sub-tile is the
    /// next `step` keys, even when they fall in a skipped tile.
    pub next: (usize, usize),
    /// Whether the call's masks apply ([`Ctx::masked`], keys among the first `real_s`); the
    /// appended keys never are.
    pub masked: bool,
}

/// How [`walk_keys`] cuts the keys of a work item.
#[derive(Clone, Copy)]
pub(super) struct Walk {
    /// Keys per sub-tile (`1..=BLOCK_K`): strided tiles are cut into sub-tiles of `step` keys
    /// within each aligned tile, gathered rows into sub-tiles of at most `step` keys. The
    /// appended keys always come in tiles of `BLOCK_K`.
    pub step: usize,
    /// Whether to compute each sub-tile's [`KeyTile::next`] (else it is `(0, 0)`).
    pub next: bool,
    /// Whether the appended keys `real_s..s` follow the range.
    pub extra: bool,
}

/// What the walk reads of one batch element's keys.
pub(super) struct Keys<'a, E> {
    /// Gathered rows (a paged cache): the end of a sub-tile from key `a`, before key `b`
    /// ([`View::tile_end`](super::view::View::tile_end)); `None` for strided rows.
    pub gathered: Option<E>,
    /// Per aligned tile of [`BLOCK_K`] keys: the key padding is `-inf` on the whole tile (strided
    /// rows only; `None`: no tile is skipped).
    pub dead: Option<&'a [bool]>,
    /// Whether the call's masks apply to the keys among the first `real_s`.
    pub masked: bool,
    /// The keys the masks and the padding describe.
    pub real_s: usize,
    /// All keys, the appended ones `real_s..s` included.
    pub s: usize,
}

/// Visits, in order, the key sub-tiles within `(k_lo, k_hi)` (keys among the first `real_s`)
/// and then, with [`Walk::extra`], the appended keys, cut as `walk` says (see the module docs).
pub(super) fn walk_keys<E: Fn(usize, usize) -> usize>(
    keys: &Keys<'_, E>,
    (k_lo, k_hi): (usize, usize),
    walk: Walk,
    mut visit: impl FnMut(KeyTile),
) {
    let (step, masked) = (walk.step, keys.masked);
    if k_lo >= k_hi {
        // No keys of the range: only the appended ones, below.
    } else if let Some(tile_end) = &keys.gathered {
        // Gathered rows: each sub-tile (and the next) ends where `tile_end` says.
        let end = |a: usize| tile_end(a, (a + step).min(k_hi));
        let mut j0 = k_lo;
        while j0 < k_hi {
            let j1 = end(j0);
            let next = if walk.next && j1 < k_hi {
                (j1, end(j1))
            } else {
                (0, 0)
            };
            visit(KeyTile {
                j0,
                j1,
                next,
                masked,
            });
            j0 = j1;
        }
    } else {
        let mut start = k_lo / BLOCK_K * BLOCK_K;
        while start < k_hi {
            let (t0, t1) = (start.max(k_lo), (start + BLOCK_K).min(k_hi));
            let tile = start / BLOCK_K;
            start += BLOCK_K;
            if keys.dead.is_some_and(|dead| dead[tile]) {
                continue;
            }
            for j0 in (t0..t1).step_by(step) {
                let j1 = (j0 + step).min(t1);
                let next = if walk.next {
                    (j1, (j1 + step).min(k_hi))
                } else {
                    (0, 0)
                };
                visit(KeyTile {
                    j0,
                    j1,
                    next,
                    masked,
                });
            }
        }
    }
    if walk.extra {
        for (j0, j1) in KeyTiles::new(keys.real_s, keys.s).appended() {
            visit(KeyTile {
                j0,
                j1,
                next: (0, 0),
                masked: false,
            });
        }
    }
}

impl Ctx<'_> {
    /// [`walk_keys`] over the keys of batch element `bi`.
    pub(super) fn walk_keys(
        &self,
        bi: usize,
        range: (usize, usize),
        walk: Walk,
        visit: impl FnMut(KeyTile),
    ) {
        let keys = Keys {
            gathered: self
                .k
                .rows
                .is_some()
                .then_some(|a, b| self.k.tile_end(bi, a, b)),
            dead: self
                .dead_tiles
                .as_deref()
                .map(|d| &d[bi * self.n_tiles..(bi + 1) * self.n_tiles]),
            masked: self.masked,
            real_s: self.real_s,
            s: self.s,
        };
        walk_keys(&keys, range, walk, visit);
    }

    /// The keys of the first aligned tile of a strided walk over `(k_lo, k_hi)` (skipped or
    /// not), to prefetch before [`Ctx::walk_keys`] starts; `None` for gathered rows or no keys.
    pub(super) fn first_keys(&self, (k_lo, k_hi): (usize, usize)) -> Option<(usize, usize)> {
        (k_lo < k_hi && self.k.rows.is_none())
            .then(|| (k_lo, (k_lo / BLOCK_K * BLOCK_K + BLOCK_K).min(k_hi)))
    }
}

#[cfg(test)]
mod tests {
    //! Properties of the walk over random ranges, steps, skipped tiles and gathered runs.

    use super::*;

    /// xorshift64*: a fixed sequence of cases.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as usize % n.max(1)
        }
    }

    /// One random case: the keys, a range of them, the walk and the tiles it visits.
    struct Case {
        real_s: usize,
        s: usize,
        range: (usize, usize),
        walk: Walk,
        masked: bool,
        dead: Option<Vec<bool>>,
        /// Gathered rows: the positions where a run of consecutive rows ends.
        cuts: Option<Vec<bool>>,
        tiles: Vec<KeyTile>,
    }

    fn case(rng: &mut Rng) -> Case {
        let real_s = rng.below(5 * BLOCK_K);
        let s = real_s + [0, 1, BLOCK_K + 3][rng.below(3)];
        let k_lo = rng.below(real_s + 1);
        let k_hi = k_lo + rng.below(real_s - k_lo + 1);
        let walk = Walk {
            step: [1, 7, 16, BLOCK_K / 2, BLOCK_K][rng.below(5)],
            next: rng.below(2) == 1,
            extra: rng.below(2) == 1,
        };
        let gathered = rng.below(2) == 1;
        let dead = (!gathered && rng.below(2) == 1).then(|| {
            (0..real_s.div_ceil(BLOCK_K))
                .map(|_| rng.below(3) == 0)
                .collect()
        });
        let cuts: Option<Vec<bool>> = gathered.then(|| (0..s).map(|_| rng.below(9) == 0).collect());
        let masked = rng.below(2) == 1;
        let mut tiles = vec![];
        {
            // A sub-tile of gathered rows ends at the first run end, or at its limit.
            let end = |a: usize, b: usize| {
                let cuts = cuts.as_ref().unwrap();
                (a + 1..b).find(|&j| cuts[j - 1]).unwrap_or(b)
            };
            let keys = Keys {
                gathered: gathered.then_some(end),
                dead: dead.as_deref(),
                masked,
                real_s,
                s,
            };
            walk_keys(&keys, (k_lo, k_hi), walk, |t| tiles.push(t));
        }
        Case {
            real_s,
            s,
            range: (k_lo, k_hi),
            walk,
            masked,
            dead,
            cuts,
            tiles,
        }
    }

    /// Random cases per property (fewer under Miri, which interprets every step).
    const CASES: usize = if cfg!(miri) { 200 } else { 20_000 };

    #[test]
    fn every_key_of_the_range_once_in_order_then_the_appended_keys() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..CASES {
            let c = case(&mut rng);
            let (k_lo, k_hi) = c.range;
            let n_range = c.tiles.iter().filter(|t| t.j0 < c.real_s).count();
            let (range, extra) = c.tiles.split_at(n_range);
            // The range: non-empty sub-tiles of at most `step` keys, increasing, disjoint, with
            // the call's mask flag; exactly the keys of live tiles.
            let mut keys = vec![];
            for t in range {
                assert!(t.j0 < t.j1 && t.j1 - t.j0 <= c.walk.step, "{t:?}");
                assert!(k_lo <= t.j0 && t.j1 <= k_hi, "{t:?} outside {:?}", c.range);
                assert_eq!(t.masked, c.masked);
                assert!(
                    keys.last().is_none_or(|&last| last < t.j0),
                    "{t:?} after {keys:?}"
                );
                keys.extend(t.j0..t.j1);
            }
            let live = |j: usize| c.dead.as_ref().is_none_or(|d| !d[j / BLOCK_K]);
            let want: Vec<usize> = (k_lo..k_hi).filter(|&j| live(j)).collect();
            assert_eq!(keys, want, "range {:?} step {}", c.range, c.walk.step);
            // The appended keys: in tiles of BLOCK_K from `real_s`, unmasked, only if asked.
            let want_extra: Vec<(usize, usize)> = if c.walk.extra {
                (c.real_s..c.s)
                    .step_by(BLOCK_K)
                    .map(|j| (j, (j + BLOCK_K).min(c.s)))
                    .collect()
            } else {
                vec![]
            };
            let got_extra: Vec<(usize, usize)> = extra.iter().map(|t| (t.j0, t.j1)).collect();
            assert_eq!(got_extra, want_extra);
            assert!(extra.iter().all(|t| !t.masked && t.next == (0, 0)));
        }
    }

    #[test]
    fn sub_tiles_follow_the_tiles_and_runs_and_name_the_next() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..CASES {
            let c = case(&mut rng);
            let (_, k_hi) = c.range;
            let range: Vec<&KeyTile> = c.tiles.iter().filter(|t| t.j0 < c.real_s).collect();
            for (i, t) in range.iter().enumerate() {
                match &c.cuts {
                    // Strided: within one aligned tile of BLOCK_K keys; the next `step` keys
                    // (even in a skipped tile) are prefetched.
                    None => {
                        assert_eq!(t.j0 / BLOCK_K, (t.j1 - 1) / BLOCK_K, "{t:?} crosses a tile");
                        let next = (t.j1, (t.j1 + c.walk.step).min(k_hi));
                        assert_eq!(t.next, if c.walk.next { next } else { (0, 0) });
                    }
                    // Gathered: no run ends inside a sub-tile, which stops at its first run end
                    // or after `step` keys; the next is the following sub-tile.
                    Some(cuts) => {
                        assert!(
                            (t.j0 + 1..t.j1).all(|j| !cuts[j - 1]),
                            "{t:?} spans a run end"
                        );
                        assert!(
                            t.j1 == k_hi || cuts[t.j1 - 1] || t.j1 - t.j0 == c.walk.step,
                            "{t:?} stops early"
                        );
                        let next = range.get(i + 1).map_or((0, 0), |n| (n.j0, n.j1));
                        assert_eq!(t.next, if c.walk.next { next } else { (0, 0) });
                    }
                }
            }
        }
    }
}
