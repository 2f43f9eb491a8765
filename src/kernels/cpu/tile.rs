//! One work item of the fused CPU kernel: a tile of folded query rows against every key tile it
//! may see (masks, online softmax, the two products), written to its rows of the output.
//!
//! Which key tiles a work item visits (alignment, gathered rows, skipped tiles, appended keys,
//! the next tile to prefetch) is decided in one place, [`Ctx::walk_keys`] (`walk.rs`), shared
//! with the decoding paths (`decode.rs`); this file computes one tile ([`Ctx::tile`]).

use std::cell::RefCell;

use super::kt::KeyTiles;
#[cfg(target_arch = "x86_64")]
use super::mat::HalfMat;
use super::mat::{Mat, MatMut, PairMat};
use super::modifiers::{join_sink, Mods};
pub(super) use super::out::{OutBuf, OutPtr};
use super::panels::Panels;
pub(super) use super::plan::ProductPlan;
use super::plan::{PvPath, QkPath};
use super::products;
#[cfg(target_arch = "x86_64")]
use super::quant::key_scales;
use super::quant::{pv_quantized, scale_columns, QRows, QuantRows};
pub(super) use super::score_row::Bias;
use super::softmax_tile::{softmax_tile, ScoreTile};
pub(super) use super::view::{Data, View};
use super::walk::Walk;
use super::{BLOCK_K, BLOCK_Q, MAX_HEAD_DIM};
use crate::config::MaskedRowPolicy;
use crate::mask::MaskPlan;

/// Everything one work item reads.
pub(super) struct Ctx<'a> {
    pub q: View<'a>,
    pub k: View<'a>,
    pub v: View<'a>,
    pub h: usize,
    pub hkv: usize,
    pub l: usize,
    pub s: usize,
    pub d: usize,
    pub dv: usize,
    pub g: usize,
    /// Keys covered by the mask plan (the first `real_s`); the rest are always visible.
    pub real_s: usize,
    /// How the per-call copies of K and V are cut into tiles of keys.
    pub tiles: KeyTiles,
    /// V as panels ([`products::panels_for`]), which `P · V` reads instead of `v`.
    pub v_panels: Option<&'a Panels>,
    pub scale: f32,
    pub policy: MaskedRowPolicy,
    pub plan: &'a MaskPlan,
    /// Whether the plan masks any of the first `real_s` keys (else masks are skipped).
    pub masked: bool,
    /// Dense `(B, real_s)` key padding.
    pub key_bias: Option<&'a [f32]>,
    /// Per `(batch, aligned key tile)`: the dense key padding is `-inf` on the whole tile.
    pub dead_tiles: Option<Vec<bool>>,
    pub n_tiles: usize,
    pub bias: Option<Bias<'a>>,
    /// Soft-capping, ALiBi and sinks.
    pub mods: &'a Mods,
    /// The products, decided once per call ([`super::inputs::product_plan`]).
    pub paths: ProductPlan<'a>,
    pub out: OutBuf,
    /// Where to write each row's log-sum-exp, `(B, H, L)`, when the backward will need it.
    pub lse: Option<OutPtr>,
}

/// Per-worker scratch.
pub(super) struct Scratch {
    pub scores: Vec<f32>,
    q: Vec<f32>,
    /// The query rows as bf16 pairs (with [`ProductPlan::query_pairs`]).
    qp: Vec<u32>,
    /// The probabilities as bf16 pairs (with [`PvPath::Pairs`]).
    pub pp: Vec<u32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    lsum: Vec<f32>,
    lo: Vec<usize>,
    hi: Vec<usize>,
    /// A K and a V tile converted to f32 (half inputs).
    pub ktile: Vec<f32>,
    pub vtile: Vec<f32>,
    /// A K tile widened from fp8 to bf16 pairs (with [`ProductPlan::fp8_keys`]).
    pub kpairs: Vec<u32>,
    /// The query rows quantized to int16 (with [`ProductPlan::int16_queries`]).
    q16: QuantRows,
}

thread_local! {
    /// One scratch per worker thread, reused across calls.
    pub(super) static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

impl Scratch {
    /// Bytes held beyond the fixed tiles: the converted K and V tiles of half / int8 inputs.
    pub(super) fn extra_bytes(&self) -> usize {
        (self.ktile.capacity() + self.vtile.capacity()) * 4 + self.kpairs.capacity() * 4
    }

    /// Frees the converted K and V tiles (allocated again by the next call that needs them);
    /// the bytes freed.
    pub(super) fn release(&mut self) -> usize {
        let freed = self.extra_bytes();
        self.ktile = Vec::new();
        self.vtile = Vec::new();
        self.kpairs = Vec::new();
        freed
    }

    fn new() -> Self {
        Self {
            scores: vec![0.0; BLOCK_Q * BLOCK_K],
            q: vec![0.0; BLOCK_Q * MAX_HEAD_DIM],
            qp: vec![0; BLOCK_Q * MAX_HEAD_DIM / 2],
            pp: vec![0; BLOCK_Q * BLOCK_K / 2],
            acc: vec![0.0; BLOCK_Q * MAX_HEAD_DIM],
            m: vec![0.0; BLOCK_Q],
            lsum: vec![0.0; BLOCK_Q],
            lo: vec![0; BLOCK_Q],
            hi: vec![0; BLOCK_Q],
            ktile: Vec::new(),
            vtile: Vec::new(),
            kpairs: Vec::new(),
            q16: QuantRows::default(),
        }
    }
}

/// The tile's rows and their state, borrowed from the scratch.
pub(super) struct Rows<'s> {
    /// Folded row index of row 0 (`g · L + i`).
    pub r0: usize,
    pub nr: usize,
    pub q: &'s [f32],
    /// The query rows as bf16 pairs, with [`ProductPlan::query_pairs`].
    pub qp: &'s [u32],
    /// Room for the probabilities as bf16 pairs, `BLOCK_K / 2` per row.
    pub pp: &'s mut [u32],
    pub acc: &'s mut [f32],
    pub scores: &'s mut [f32],
    pub m: &'s mut [f32],
    pub lsum: &'s mut [f32],
    pub lo: &'s [usize],
    pub hi: &'s [usize],
    pub ktile: &'s mut [f32],
    pub vtile: &'s mut [f32],
    /// Room for a K tile widened from fp8, with [`ProductPlan::fp8_keys`].
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the VBMI widening
    pub kpairs: &'s mut [u32],
    /// The query rows quantized to int16, with [`ProductPlan::int16_queries`].
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the VNNI products
    pub q16: Option<QRows<'s>>,
}

impl Ctx<'_> {
    /// One work item: folded query rows `r0..r0 + nr` (row `g·L + i` is query `i` of head
    /// `kh·G + g`) of KV head `kh` in batch `bi`.
    pub fn item(&self, bi: usize, kh: usize, r0: usize, nr: usize, sc: &mut Scratch) {
        self.accumulate(bi, kh, (r0, nr), (0, usize::MAX), true, sc);
        self.finish_rows(bi, kh, (r0, nr), &sc.m, &sc.lsum, &sc.acc);
    }

    /// Merges the partial states `parts` (`nr` maxima, `nr` sums, `nr × Dv` unnormalised rows
    /// each) of rows `r0..r0 + nr` and writes them.
    pub fn combine(&self, (bi, kh): (usize, usize), (r0, nr): (usize, usize), parts: &[&[f32]]) {
        let dv = self.dv;
        let mut m = vec![f32::NEG_INFINITY; nr];
        let mut lsum = vec![0f32; nr];
        let mut acc = vec![0f32; nr * dv];
        for p in parts {
            for r in 0..nr {
                let (pm, pl) = (p[r], p[nr + r]);
                if pl == 0.0 {
                    continue;
                }
                // NaN wins and sticks, as in the online softmax.
                let m_new = if pm > m[r] || pm.is_nan() { pm } else { m[r] };
                let (a, b) = ((m[r] - m_new).exp(), (pm - m_new).exp());
                lsum[r] = lsum[r] * a + pl * b;
                let dst = &mut acc[r * dv..(r + 1) * dv];
                let src = &p[2 * nr + r * dv..2 * nr + (r + 1) * dv];
                dst.iter_mut()
                    .zip(src)
                    .for_each(|(x, y)| *x = *x * a + y * b);
                m[r] = m_new;
            }
        }
        self.finish_rows(bi, kh, (r0, nr), &m, &lsum, &acc);
    }

    /// The query row at `at` into row `r` of `q` (f32), or of `qp` (bf16 pairs) with
    /// [`ProductPlan::query_pairs`].
    pub(super) fn query_row(&self, at: usize, r: usize, q: &mut [f32], qp: &mut [u32]) {
        let d = self.d;
        if self.paths.query_pairs() {
            let dst = &mut qp[r * d / 2..(r + 1) * d / 2];
            self.q.pairs_into(at, dst).expect("bf16 queries");
        } else {
            self.q.row_into(at, &mut q[r * d..(r + 1) * d]);
        }
    }

    /// Half or int8 inputs: room in `sc` for one K and one V tile converted to f32 (and, with
    /// [`ProductPlan::fp8_keys`], a K tile widened from fp8 to bf16 pairs).
    pub(super) fn half_tiles(&self, sc: &mut Scratch) {
        let f32s = self.q.f32s().is_some() && self.k.f32s().is_some() && self.v.f32s().is_some();
        if !f32s && sc.vtile.is_empty() {
            sc.ktile = vec![0.0; BLOCK_K * MAX_HEAD_DIM];
            sc.vtile = vec![0.0; BLOCK_K * MAX_HEAD_DIM];
        }
        if self.paths.fp8_keys() && sc.kpairs.is_empty() {
            sc.kpairs = vec![0; BLOCK_K * MAX_HEAD_DIM / 2];
        }
    }

    /// Rows `r0..r0 + nr` of KV head `kh` over the keys in `chunk` (intersected with what each
    /// row may see) and, with `extra`, the appended keys, in tiles of `BLOCK_K` walked by
    /// [`Ctx::walk_keys`]: leaves their online-softmax state (`m`, `lsum`, unnormalised `acc`)
    /// in the scratch.
    fn accumulate(
        &self,
        bi: usize,
        kh: usize,
        (r0, nr): (usize, usize),
        chunk: (usize, usize),
        extra: bool,
        sc: &mut Scratch,
    ) {
        let (d, dv, l) = (self.d, self.dv, self.l);
        // Visible range of every row, and their union; gather the query rows.
        let (mut k_lo, mut k_hi) = (usize::MAX, 0);
        for r in 0..nr {
            let (gg, i) = ((r0 + r) / l, (r0 + r) % l);
            let (lo, hi) = self.plan.row_range(bi, i);
            sc.lo[r] = lo;
            sc.hi[r] = hi;
            if lo < hi {
                k_lo = k_lo.min(lo);
                k_hi = k_hi.max(hi);
            }
            let at = self.q.at(bi, i, kh * self.g + gg);
            self.query_row(at, r, &mut sc.q, &mut sc.qp);
        }
        let (k_lo, k_hi) = (k_lo.max(chunk.0), k_hi.min(chunk.1));
        let q16 = self.paths.int16_queries();
        if q16 {
            sc.q16.quantize(&sc.q[..nr * d], nr, d);
        }
        sc.m[..nr].fill(f32::NEG_INFINITY);
        sc.lsum[..nr].fill(0.0);
        sc.acc[..nr * dv].fill(0.0);
        self.half_tiles(sc);
        let mut rows = Rows {
            r0,
            nr,
            q: &sc.q[..nr * d],
            qp: &sc.qp[..nr * d / 2],
            pp: &mut sc.pp,
            acc: &mut sc.acc[..nr * dv],
            scores: &mut sc.scores[..nr * BLOCK_K],
            m: &mut sc.m[..nr],
            lsum: &mut sc.lsum[..nr],
            lo: &sc.lo[..nr],
            hi: &sc.hi[..nr],
            ktile: &mut sc.ktile,
            vtile: &mut sc.vtile,
            kpairs: &mut sc.kpairs,
            q16: q16.then(|| sc.q16.rows(0, nr)),
        };
        // The first tile's strided rows before the walk; each next tile's while the walk
        // computes the current one.
        if let Some((a, b)) = self.first_keys((k_lo, k_hi)) {
            self.prefetch(bi, kh, a, b);
        }
        let walk = Walk {
            step: BLOCK_K,
            next: true,
            extra,
        };
        self.walk_keys(bi, (k_lo, k_hi), walk, |t| {
            if t.next.0 < t.next.1 {
                self.prefetch(bi, kh, t.next.0, t.next.1);
            }
            self.tile(bi, kh, t.j0, t.j1, t.masked, &mut rows);
        });
    }

    /// Normalises rows `r0..r0 + nr` from their softmax state and writes them (and their
    /// log-sum-exp when kept) to the output.
    pub(super) fn finish_rows(
        &self,
        bi: usize,
        kh: usize,
        (r0, nr): (usize, usize),
        m: &[f32],
        lsum: &[f32],
        acc: &[f32],
    ) {
        let (dv, l) = (self.dv, self.l);
        for r in 0..nr {
            let (gg, i) = ((r0 + r) / l, (r0 + r) % l);
            let hh = kh * self.g + gg;
            let off = ((bi * l + i) * self.h + hh) * dv;
            let src = &acc[r * dv..(r + 1) * dv];
            // The sink joins the row's softmax last (a row with no visible key keeps only it:
            // output 0).
            let (mr, sum, corr) = match self.mods.sink(hh) {
                Some(sink) => join_sink(m[r], lsum[r], sink),
                None => (m[r], lsum[r], 1.0),
            };
            if let Some(lse) = self.lse {
                let at = (bi * self.h + hh) * l + i;
                let v = if sum == 0.0 {
                    f32::NEG_INFINITY
                } else {
                    mr + sum.ln()
                };
                // SAFETY: `at` is inside the (B, H, L) buffer and row (bi, head, i) belongs to
                // this work item only.
                unsafe { *lse.0.add(at) = v };
            }
            // SAFETY: `off..off + dv` is inside the (B, L, H, Dv) output, and row (bi, i, head)
            // belongs to this work item only (see `OutBuf`).
            unsafe {
                if sum == 0.0 {
                    let v = match self.policy {
                        MaskedRowPolicy::Zero => 0.0,
                        MaskedRowPolicy::Nan => f32::NAN,
                    };
                    self.out.fill(off, dv, v);
                } else if corr == 0.0 {
                    self.out.fill(off, dv, 0.0);
                } else {
                    self.out.write(off, src, corr / sum);
                }
            }
        }
    }

    /// Asks the CPU to start loading the K and V rows of keys `j0..j1` (the next tile) when they
    /// are strided, e.g. one head of a `(B, S, Hkv, D)` cache: each row then sits in its own
    /// memory page, which the hardware prefetchers do not follow. Into L2: a tile of rows is
    /// larger than L1. (Not V's rows when `P · V` reads its panels: they would only take room.)
    fn prefetch(&self, bi: usize, kh: usize, j0: usize, j1: usize) {
        #[cfg(target_arch = "x86_64")]
        for (view, width, used) in [
            (&self.k, self.d, !self.paths.transposed_k()),
            (&self.v, self.dv, self.v_panels.is_none()),
        ] {
            let stride = view.strides[1];
            if !used || stride <= width {
                continue;
            }
            for j in j0..j1 {
                let row = view.at(bi, j, kh);
                for c in (0..width).step_by(16) {
                    if let Some(x) = view.ptr(row + c) {
                        // SAFETY: prefetching is a hint; `x` points into the tensor.
                        unsafe {
                            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                                x.cast(),
                            )
                        };
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (bi, kh, j0, j1);
    }

    /// Keys `j0..j1` for the item's rows: scores, masks, online softmax, `acc += P · V`. The
    /// keys are one run of consecutive rows, or, gathered from a paged cache, up to 16 runs each
    /// a multiple of 16 keys but the last ([`View::tile_end`]): the products then run per run,
    /// each writing whole vectors of scores at its own columns, and the softmax once.
    pub(super) fn tile(
        &self,
        bi: usize,
        kh: usize,
        j0: usize,
        j1: usize,
        masked: bool,
        rows: &mut Rows,
    ) {
        let (dv, nr) = (self.dv, rows.nr);
        let bk = j1 - j0;
        let mut runs = [(0usize, 0usize); BLOCK_K / 16];
        let mut n_runs = 0;
        let mut a = j0;
        while a < j1 {
            let b = self.k.run_end(bi, a, j1);
            debug_assert!(n_runs < runs.len() && (b == j1 || (b - a).is_multiple_of(16)));
            runs[n_runs] = (a, b);
            n_runs += 1;
            a = b;
        }
        let runs = &runs[..n_runs];
        for &(a, b) in runs {
            self.qk_run(bi, kh, (a, b - a, a - j0), rows);
        }
        // Soft-capping over the whole tile at once (its set-up costs as much as a row of 64).
        if let (Some(_), Some(last)) = (self.mods.softcap, nr.checked_sub(1)) {
            self.mods
                .cap(self.paths.isa, &mut rows.scores[..last * BLOCK_K + bk]);
        }
        let mut live = 0u64;
        for r in 0..nr {
            let row = &mut rows.scores[r * BLOCK_K..r * BLOCK_K + bk];
            let range = (rows.lo[r], rows.hi[r]);
            let at = (bi, kh, rows.r0 + r);
            if self.score_row(at, (range, masked), j0, row) {
                live |= 1 << r;
            } else {
                row.fill(0.0);
            }
        }
        // With `P · V` on bf16 pairs the step writes the pairs itself.
        let pairs = self.paths.pv == PvPath::Pairs;
        let tile = ScoreTile {
            scores: rows.scores,
            bk,
            live,
            m: rows.m,
            lsum: rows.lsum,
            acc: rows.acc,
            dv,
            pairs: pairs.then_some(&mut *rows.pp),
        };
        if !softmax_tile(self.paths.isa, tile) {
            return;
        }
        for &(a, b) in runs {
            self.pv_run(bi, kh, (a, b - a, a - j0), rows);
        }
    }

    /// The scores of keys `a..a + len` (a run of consecutive rows) into columns `o..o + len` of
    /// the score tile (`o` a multiple of 16: the micro-kernels write whole vectors).
    fn qk_run(&self, bi: usize, kh: usize, (a, len, o): (usize, usize, usize), rows: &mut Rows) {
        let (d, nr) = (self.d, rows.nr);
        let k0 = self.k.at(bi, a, kh);
        let kst = self.k.strides[1];
        let q = Mat::new(rows.q, nr, d, d);
        let qp = PairMat::new(rows.qp, nr, d / 2, d / 2);
        let scores = MatMut::new(&mut rows.scores[o..], nr, len, BLOCK_K);
        let isa = self.paths.isa;
        match self.paths.qk {
            QkPath::KtF32(kt) => {
                // kᵀ of keys a..a + len of this KV head (d × len); the score tile has
                // BLOCK_K >= round_up(o + len, 16) columns per row.
                let kt = self.tiles.kt(kt, d, bi * self.hkv + kh, (a, len));
                products::qk_t(isa, q, kt, scores, self.scale);
            }
            QkPath::KtPairs(kt) => {
                // The same in pairs along the head dimension, (d/2 × len).
                let kt = self.tiles.kt(kt, d / 2, bi * self.hkv + kh, (a, len));
                products::qk_pairs(isa, qp, kt, scores, self.scale);
            }
            QkPath::RowsPairs => {
                let k = self.k.bf16_mat(k0, (len, d, kst)).expect("bf16 keys");
                products::qk_rows_pairs(isa, qp, k, scores, self.scale);
            }
            QkPath::RowsHalf => {
                let k = self.k.half_mat(isa, k0, (len, d, kst)).expect("half keys");
                products::qk_rows_half(isa, q, k, scores, self.scale);
            }
            #[cfg(target_arch = "x86_64")]
            QkPath::RowsInt16 => {
                let k = self.k.byte_mat(isa, k0, (len, d, kst));
                let (k, sc, first, step) = k.expect("int8 keys");
                let q16 = rows.q16.expect("int16 query rows");
                let ks = key_scales(len, (sc, first, step));
                products::qk_rows_q16(isa, q16, (k, &ks[..len]), scores, self.scale);
            }
            #[cfg(target_arch = "x86_64")]
            QkPath::Fp8Pairs => {
                let k = self.k.byte_mat(isa, k0, (len, d, kst));
                let (k, sc, first, step) = k.expect("fp8 keys");
                products::fp8_to_pairs(k, rows.kpairs);
                let k = HalfMat::from_pairs(PairMat::new(rows.kpairs, len, d / 2, d / 2));
                products::qk_rows_pairs(isa, qp, k, scores, self.scale);
                scale_columns(&mut rows.scores[o..], (nr, len), (sc, first, step));
            }
            QkPath::RowsBytes => {
                let k = self.k.byte_mat(isa, k0, (len, d, kst));
                let (k, sc, first, step) = k.expect("quantized keys");
                products::qk_rows_bytes(isa, q, k, scores, self.scale);
                scale_columns(&mut rows.scores[o..], (nr, len), (sc, first, step));
            }
            QkPath::RowsF32 => {
                let k = self.k.mat(k0, (len, d, kst), rows.ktile);
                products::qk_rows(isa, q, k, scores, self.scale)
            }
        }
    }

    /// `acc += P · V` over keys `a..a + len` (a run of consecutive rows), the probabilities in
    /// columns `o..o + len` of the tile (and of its bf16 pairs, when `V` is read as pairs).
    fn pv_run(&self, bi: usize, kh: usize, (a, len, o): (usize, usize, usize), rows: &mut Rows) {
        let (dv, nr) = (self.dv, rows.nr);
        let v0 = self.v.at(bi, a, kh);
        let vst = self.v.strides[1];
        let isa = self.paths.isa;
        let acc = MatMut::new(rows.acc, nr, dv, dv);
        let p = Mat::new(&rows.scores[o..], nr, len, BLOCK_K);
        if let Some(panels) = self.v_panels {
            let v = panels.tile(self.tiles, dv, bi * self.hkv + kh, (a, len));
            return products::pv_panel(isa, p, v, acc);
        }
        match self.paths.pv {
            PvPath::Pairs => {
                let v = self.v.bf16_mat(v0, (len, dv, vst)).expect("bf16 values");
                let p = PairMat::new(&rows.pp[o / 2..], nr, len.div_ceil(2), BLOCK_K / 2);
                products::pv_pairs(isa, p, v, acc)
            }
            PvPath::Half => {
                let v = self
                    .v
                    .half_mat(isa, v0, (len, dv, vst))
                    .expect("half values");
                products::pv_half(isa, p, v, acc)
            }
            #[cfg(target_arch = "x86_64")]
            PvPath::Int16 => {
                let v = self
                    .v
                    .byte_mat(isa, v0, (len, dv, vst))
                    .expect("int8 values");
                pv_quantized(isa, true, (&mut rows.scores[o..], nr, len), v, acc)
            }
            PvPath::Bytes => {
                let v = self.v.byte_mat(isa, v0, (len, dv, vst));
                let v = v.expect("quantized values");
                pv_quantized(isa, false, (&mut rows.scores[o..], nr, len), v, acc)
            }
            // In place for f32 values, else a tile converted once here.
            PvPath::F32 => {
                let vtile = self.v.mat(v0, (len, dv, vst), rows.vtile);
                products::pv(isa, p, vtile, acc)
            }
        }
    }
}
