//! Decoding-shaped calls (few query rows per KV head, long keys): all KV heads of a sequence in
//! one work item, and the keys split into chunks across threads (flash-decoding).
//!
//! In the `(B, S, Hkv, D)` layout of the projections and of the KV cache, one key row of every
//! KV head sits together (`Hkv · D` contiguous values), while the rows of one head are
//! `Hkv · D` apart. An item per KV head would read one short row per 4 KiB page, every page a
//! TLB miss; an item that walks every KV head over the same key tile reads K and V of the
//! sequence front to back instead. When there are fewer such items than twice the worker
//! threads, the keys are also cut into chunks of at least [`SPLIT_MIN_KEYS`]: each chunk's
//! partial softmax state (max, sum, unnormalised rows) is computed in parallel and the chunks
//! are merged per row.
//!
//! The key sub-tiles are those of the prefill path, enumerated by the same walker
//! ([`Ctx::walk_keys`], `walk.rs`), cut finer ([`DECODE_KEYS`]) when several heads walk them
//! together; this file keeps only its own state ([`State`]) and prefetch policy
//! ([`Ctx::prefetch_heads`]).

use rayon::prelude::*;

use super::quant::QuantRows;
use super::stream;
use super::tile::{self, Ctx, Rows, Scratch};
use super::walk::Walk;
use super::{AttnCall, BLOCK_K, BLOCK_Q};

/// Keys per sub-tile when all KV heads walk the keys together.
const DECODE_KEYS: usize = 64;

/// Fewest keys per chunk of a split call.
pub const SPLIT_MIN_KEYS: usize = 1024;

/// Runs `c` through the decoding paths when its shape calls for them; `false` leaves it to the
/// general loop over work items.
pub(super) fn run(c: &AttnCall, ctx: &Ctx) -> bool {
    if c.mask.is_packed() {
        return false;
    }
    let (g, l) = (ctx.g, c.l);
    let rows = g * l;
    // All KV heads together: one tile of query rows per head, heads adjacent in each key row.
    let together = c.hkv > 1
        && rows <= BLOCK_Q
        && ctx.k.strides[2] == c.d
        && ctx.v.strides[2] == c.dv
        && c.s >= BLOCK_K;
    let units = if together {
        c.b
    } else {
        c.b * c.hkv * rows.div_ceil(BLOCK_Q)
    };
    let threads = rayon::current_num_threads();
    let real_s = c.s - c.extra_keys;
    let nsplit = if units < 2 * threads {
        (2 * threads)
            .div_ceil(units.max(1))
            .min(real_s / SPLIT_MIN_KEYS)
            .max(1)
    } else {
        1
    };
    if !together && nsplit < 2 {
        return false;
    }
    let chunk = real_s.div_ceil(nsplit).div_ceil(BLOCK_K).max(1) * BLOCK_K;
    let nsplit = real_s.div_ceil(chunk).max(1);
    if nsplit > 1 {
        super::SPLITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let row_tiles = rows.div_ceil(BLOCK_Q);
    // The query-row tiles of a unit: (KV head, first folded row, rows).
    let unit_rows = |u: usize| -> Vec<(usize, usize, usize)> {
        if together {
            (0..c.hkv).map(|kh| (kh, 0, rows)).collect()
        } else {
            let (t, kh) = (u % row_tiles, u / row_tiles % c.hkv);
            let r0 = t * BLOCK_Q;
            vec![(kh, r0, BLOCK_Q.min(rows - r0))]
        }
    };
    let batch_of = |u: usize| {
        if together {
            u
        } else {
            u / (c.hkv * row_tiles)
        }
    };
    let heads = if together { c.hkv } else { 1 };
    let slot = BLOCK_Q * (2 + c.dv);
    if nsplit == 1 {
        (0..units).into_par_iter().for_each(|u| {
            let mut st = State::new(heads, rows.min(BLOCK_Q), c.d, c.dv);
            tile::SCRATCH.with(|sc| {
                let sc = &mut sc.borrow_mut();
                ctx.accumulate_heads(batch_of(u), &unit_rows(u), (0, real_s), true, &mut st, sc);
            });
            for (n, &(kh, r0, nr)) in unit_rows(u).iter().enumerate() {
                let (m, lsum, acc) = st.head(n, nr);
                ctx.finish_rows(batch_of(u), kh, (r0, nr), m, lsum, acc);
            }
        });
        return true;
    }
    // Partial states: [unit][chunk][head][slot].
    let mut parts = vec![0f32; units * nsplit * heads * slot];
    parts
        .par_chunks_mut(heads * slot)
        .enumerate()
        .for_each(|(x, part)| {
            let (u, sp) = (x / nsplit, x % nsplit);
            let keys = (sp * chunk, ((sp + 1) * chunk).min(real_s));
            let last = sp + 1 == nsplit;
            let list = unit_rows(u);
            let mut st = State::new(heads, rows.min(BLOCK_Q), c.d, c.dv);
            tile::SCRATCH.with(|sc| {
                let sc = &mut sc.borrow_mut();
                ctx.accumulate_heads(batch_of(u), &list, keys, last, &mut st, sc);
            });
            for (n, &(_, _, nr)) in list.iter().enumerate() {
                let (m, lsum, acc) = st.head(n, nr);
                let p = &mut part[n * slot..(n + 1) * slot];
                p[..nr].copy_from_slice(m);
                p[nr..2 * nr].copy_from_slice(lsum);
                p[2 * nr..2 * nr + acc.len()].copy_from_slice(acc);
            }
        });
    (0..units * heads).into_par_iter().for_each(|x| {
        let (u, n) = (x / heads, x % heads);
        let (kh, r0, nr) = unit_rows(u)[n];
        let mine: Vec<&[f32]> = (0..nsplit)
            .map(|sp| &parts[((u * nsplit + sp) * heads + n) * slot..][..slot])
            .collect();
        ctx.combine((batch_of(u), kh), (r0, nr), &mine);
    });
    true
}

/// The online-softmax state of every head of a unit: query rows, max, sum, unnormalised rows.
struct State {
    nr: usize,
    dv: usize,
    q: Vec<f32>,
    /// The query rows as bf16 pairs (with `kᵀ` pairs).
    qp: Vec<u32>,
    m: Vec<f32>,
    lsum: Vec<f32>,
    acc: Vec<f32>,
    lo: Vec<usize>,
    hi: Vec<usize>,
    /// The query rows quantized to int16 (with
    /// [`ProductPlan::int16_queries`](super::plan::ProductPlan::int16_queries)).
    q16: QuantRows,
}

impl State {
    fn new(heads: usize, nr: usize, d: usize, dv: usize) -> Self {
        Self {
            nr,
            dv,
            q: vec![0.0; heads * nr * d],
            qp: vec![0; heads * nr * d / 2],
            m: vec![f32::NEG_INFINITY; heads * nr],
            lsum: vec![0.0; heads * nr],
            acc: vec![0.0; heads * nr * dv],
            lo: vec![0; nr],
            hi: vec![0; nr],
            q16: QuantRows::default(),
        }
    }

    /// Head `n`'s first `nr` rows: (max, sum, unnormalised rows).
    fn head(&self, n: usize, nr: usize) -> (&[f32], &[f32], &[f32]) {
        let (s, dv) = (self.nr, self.dv);
        (
            &self.m[n * s..n * s + nr],
            &self.lsum[n * s..n * s + nr],
            &self.acc[n * s * dv..(n * s + nr) * dv],
        )
    }
}

impl Ctx<'_> {
    /// The query-row tiles `list` (KV head, first folded row, rows: every tile of one batch
    /// element) over the keys in `chunk` (and, with `extra`, the appended keys), walking each
    /// key sub-tile of [`Ctx::walk_keys`] through every head before the next, into `st`.
    fn accumulate_heads(
        &self,
        bi: usize,
        list: &[(usize, usize, usize)],
        chunk: (usize, usize),
        extra: bool,
        st: &mut State,
        sc: &mut Scratch,
    ) {
        let (d, dv, l, g) = (self.d, self.dv, self.l, self.g);
        let s_nr = st.nr;
        // Rows of every tile in `list` share one layout (same r0 and nr in "together" mode;
        // one tile otherwise): their structured ranges depend on the query only.
        let (r0, nr) = (list[0].1, list[0].2);
        let (mut k_lo, mut k_hi) = (usize::MAX, 0);
        for r in 0..nr {
            let i = (r0 + r) % l;
            let (lo, hi) = self.plan.row_range(bi, i);
            st.lo[r] = lo;
            st.hi[r] = hi;
            if lo < hi {
                k_lo = k_lo.min(lo);
                k_hi = k_hi.max(hi);
            }
        }
        for (n, &(kh, r0, nr)) in list.iter().enumerate() {
            for r in 0..nr {
                let (gg, i) = ((r0 + r) / l, (r0 + r) % l);
                let at = self.q.at(bi, i, kh * g + gg);
                let row = n * s_nr + r;
                self.query_row(at, row, &mut st.q, &mut st.qp);
            }
        }
        let (k_lo, k_hi) = (k_lo.max(chunk.0), k_hi.min(chunk.1));
        let q16 = self.paths.int16_queries();
        if q16 {
            st.q16.quantize(&st.q, list.len() * s_nr, d);
        }
        self.half_tiles(sc);
        // Sub-tiles of `step` keys: every head's pass over one sub-tile finds it in L2
        // (`step · Hkv · (D + Dv)` values). Heads walking together prefetch the next sub-tile
        // meanwhile (`next`: the key rows to prefetch before this sub-tile is computed).
        let several = list.len() > 1;
        let walk = Walk {
            step: if several { DECODE_KEYS } else { BLOCK_K },
            next: several,
            extra,
        };
        stream::restart();
        self.walk_keys(bi, (k_lo, k_hi), walk, |t| {
            self.prefetch_heads(bi, t.next, list.len());
            for (n, &(kh, r0, nr)) in list.iter().enumerate() {
                let (a, b) = (n * s_nr, n * s_nr + nr);
                let mut rows = Rows {
                    r0,
                    nr,
                    q: &st.q[a * d..b * d],
                    qp: &st.qp[a * d / 2..b * d / 2],
                    pp: &mut sc.pp,
                    acc: &mut st.acc[a * dv..b * dv],
                    scores: &mut sc.scores[..nr * BLOCK_K],
                    m: &mut st.m[a..b],
                    lsum: &mut st.lsum[a..b],
                    lo: &st.lo[..nr],
                    hi: &st.hi[..nr],
                    ktile: &mut sc.ktile,
                    vtile: &mut sc.vtile,
                    kpairs: &mut sc.kpairs,
                    q16: q16.then(|| st.q16.rows(a, b)),
                };
                self.tile(bi, kh, t.j0, t.j1, t.masked, &mut rows);
            }
            stream::flush();
        });
    }

    /// Prefetches keys `next.0..next.1` (the next sub-tile) of every KV head of batch element
    /// `bi` for `heads` heads walking them together: queued on the prefetch stream, which the
    /// micro-kernels drain a few lines at a time, when K's and V's rows of the sub-tile are a few
    /// contiguous runs (one, or a paged cache's blocks); else as one burst. Nothing when `next`
    /// is empty.
    fn prefetch_heads(&self, bi: usize, next: (usize, usize), heads: usize) {
        if next.0 >= next.1 {
            return;
        }
        let (d, dv) = (self.d, self.dv);
        let mut ranges = [(0usize, 0usize); stream::MAX_RANGES];
        let mut n = 0;
        let mut ok = self.k.strides[1] == self.hkv * d && self.v.strides[1] == self.hkv * dv;
        let mut a = next.0;
        while ok && a < next.1 {
            let b = self.k.run_end(bi, a, next.1);
            for (view, width) in [(&self.k, d), (&self.v, dv)] {
                let r =
                    view.byte_range(view.at(bi, a, 0), view.at(bi, b - 1, 0) + self.hkv * width);
                match r {
                    Some(r) if n < ranges.len() => {
                        ranges[n] = r;
                        n += 1;
                    }
                    _ => ok = false,
                }
            }
            a = b;
        }
        if ok {
            // Over the steps the previous sub-tile took; the first of a walk guesses 32 per
            // head (AVX-512's count at D = 128; AVX2's blocks step three times as often).
            // Measured on AMD Zen 3 (B8 H32 Hkv8 D128 S4096, int8 and bf16): lines spread over
            // 32 steps per head (ending a third of the way through the sub-tile) left the loads
            // of the next one waiting on memory; spread over the whole, 20–25% faster.
            stream::queue_spread(&ranges[..n], 32 * heads);
        } else {
            for j in next.0..next.1 {
                self.k.prefetch(self.k.at(bi, j, 0), self.hkv * d);
                self.v.prefetch(self.v.at(bi, j, 0), self.hkv * dv);
            }
        }
    }
}
