//! One work item of the fused CPU kernel: a tile of folded query rows against every key tile it
//! may see (masks, online softmax, the two products), written to its rows of the output.

use std::cell::RefCell;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::mat::{HalfMat, Mat, MatMut};
pub(super) use super::out::{OutBuf, OutPtr};
use super::products::{self, Isa};
use super::softmax::softmax_step;
use super::{BLOCK_K, BLOCK_Q, MAX_HEAD_DIM};
use crate::config::MaskedRowPolicy;
use crate::mask::MaskPlan;

/// The elements of a tensor the kernel reads in place, in their own dtype: f16/bf16 inputs are
/// read in place by the micro-kernels that take them (AVX-512: bf16 and f16; AVX2: bf16; widened
/// to f32 in registers), else converted to f32 per row or per tile as they are read, never as
/// whole tensors.
#[derive(Clone, Copy)]
pub(super) enum Data<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// A `(B, T, heads, D)` tensor read in place: element `(b, t, h, x)` is
/// `data[b·strides[0] + t·strides[1] + h·strides[2] + x]`.
pub(super) struct View<'a> {
    pub data: Data<'a>,
    pub strides: [usize; 3],
}

impl<'a> View<'a> {
    /// Offset of row `(b, t, h)`.
    pub fn at(&self, b: usize, t: usize, h: usize) -> usize {
        b * self.strides[0] + t * self.strides[1] + h * self.strides[2]
    }

    /// The f32 elements, for an f32 tensor.
    pub fn f32s(&self) -> Option<&'a [f32]> {
        match self.data {
            Data::F32(s) => Some(s),
            _ => None,
        }
    }

    /// `rows × cols` half elements from `at` (row stride `stride`), read in place, when the
    /// tensor is bf16/f16 and `isa` reads such operands directly.
    pub fn half_mat(
        &self,
        isa: Isa,
        at: usize,
        (rows, cols, stride): (usize, usize, usize),
    ) -> Option<HalfMat<'a>> {
        match self.data {
            Data::F32(_) => None,
            Data::Bf16(s) if products::reads_half(isa, true, cols) => {
                Some(HalfMat::bf16(&s[at..], rows, cols, stride))
            }
            Data::F16(s) if products::reads_half(isa, false, cols) => {
                Some(HalfMat::f16(&s[at..], rows, cols, stride))
            }
            _ => None,
        }
    }

    /// Elements `at..at + dst.len()` as f32, into `dst`.
    pub fn row_into(&self, at: usize, dst: &mut [f32]) {
        let n = dst.len();
        match self.data {
            Data::F32(s) => dst.copy_from_slice(&s[at..at + n]),
            // bf16 → f32 is a shift of the bits (a loop the compiler vectorises).
            Data::Bf16(s) => dst
                .iter_mut()
                .zip(&s[at..at + n])
                .for_each(|(o, x)| *o = f32::from_bits(u32::from(x.to_bits()) << 16)),
            Data::F16(s) => s[at..at + n].convert_to_f32_slice(dst),
        }
    }

    /// `rows × cols` elements from `at` with row stride `stride` as an f32 matrix: the tensor
    /// itself for f32, else converted into `buf` (row stride `cols`).
    pub fn mat<'s>(
        &'s self,
        at: usize,
        (rows, cols, stride): (usize, usize, usize),
        buf: &'s mut [f32],
    ) -> Mat<'s> {
        match self.data {
            Data::F32(s) => Mat::new(&s[at..], rows, cols, stride),
            _ => {
                for r in 0..rows {
                    self.row_into(at + r * stride, &mut buf[r * cols..(r + 1) * cols]);
                }
                Mat::new(&buf[..rows * cols], rows, cols, cols)
            }
        }
    }

    /// Asks the CPU to start loading elements `at..at + n` (a hint; out-of-range addresses
    /// are skipped).
    pub fn prefetch(&self, at: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let step = match self.data {
                Data::F32(_) => 16,
                _ => 32,
            };
            for c in (0..n).step_by(step) {
                if let Some(x) = self.ptr(at + c) {
                    // SAFETY: prefetching is a hint; `x` points into the tensor.
                    unsafe {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                            x.cast(),
                        )
                    };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (at, n);
    }

    /// The byte address range of elements `a..b` when both exist (for the prefetch stream).
    pub fn byte_range(&self, a: usize, b: usize) -> Option<(usize, usize)> {
        #[cfg(target_arch = "x86_64")]
        {
            let start = self.ptr(a)? as usize;
            let end = self.ptr(b.checked_sub(1)?)? as usize + 1;
            Some((start, end))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (a, b);
            None
        }
    }

    /// Address of element `at`, if it exists (for prefetching).
    #[cfg(target_arch = "x86_64")]
    fn ptr(&self, at: usize) -> Option<*const u8> {
        match self.data {
            Data::F32(s) => s.get(at).map(|x| (x as *const f32).cast()),
            Data::Bf16(s) => s.get(at).map(|x| (x as *const bf16).cast()),
            Data::F16(s) => s.get(at).map(|x| (x as *const f16).cast()),
        }
    }
}

/// Additive bias, broadcast over B/H/L by zero strides; the key dim is contiguous.
#[derive(Clone, Copy)]
pub(super) struct Bias<'a> {
    pub data: &'a [f32],
    pub sb: usize,
    pub sh: usize,
    pub sl: usize,
}

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
    /// `kᵀ` as `(B, Hkv, D, S)` when a SIMD `Q · Kᵀ` micro-kernel is used.
    pub kt: Option<&'a [f32]>,
    /// The instruction set of the products.
    pub isa: Isa,
    pub out: OutBuf,
    /// Where to write each row's log-sum-exp, `(B, H, L)`, when the backward will need it.
    pub lse: Option<OutPtr>,
}

/// Per-worker scratch.
pub(super) struct Scratch {
    pub scores: Vec<f32>,
    q: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    lsum: Vec<f32>,
    lo: Vec<usize>,
    hi: Vec<usize>,
    /// A K and a V tile converted to f32 (half inputs).
    pub ktile: Vec<f32>,
    pub vtile: Vec<f32>,
}

thread_local! {
    /// One scratch per worker thread, reused across calls.
    pub(super) static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

impl Scratch {
    fn new() -> Self {
        Self {
            scores: vec![0.0; BLOCK_Q * BLOCK_K],
            q: vec![0.0; BLOCK_Q * MAX_HEAD_DIM],
            acc: vec![0.0; BLOCK_Q * MAX_HEAD_DIM],
            m: vec![0.0; BLOCK_Q],
            lsum: vec![0.0; BLOCK_Q],
            lo: vec![0; BLOCK_Q],
            hi: vec![0; BLOCK_Q],
            ktile: Vec::new(),
            vtile: Vec::new(),
        }
    }
}

/// The tile's rows and their state, borrowed from the scratch.
pub(super) struct Rows<'s> {
    /// Folded row index of row 0 (`g · L + i`).
    pub r0: usize,
    pub nr: usize,
    pub q: &'s [f32],
    pub acc: &'s mut [f32],
    pub scores: &'s mut [f32],
    pub m: &'s mut [f32],
    pub lsum: &'s mut [f32],
    pub lo: &'s [usize],
    pub hi: &'s [usize],
    pub ktile: &'s mut [f32],
    pub vtile: &'s mut [f32],
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

    /// Half inputs: room in `sc` for one K and one V tile converted to f32.
    pub(super) fn half_tiles(&self, sc: &mut Scratch) {
        if self.q.f32s().is_none() && sc.vtile.is_empty() {
            sc.ktile = vec![0.0; BLOCK_K * MAX_HEAD_DIM];
            sc.vtile = vec![0.0; BLOCK_K * MAX_HEAD_DIM];
        }
    }

    /// Rows `r0..r0 + nr` of KV head `kh` over the keys in `chunk` (intersected with what each
    /// row may see) and, with `extra`, the appended keys: leaves their online-softmax state
    /// (`m`, `lsum`, unnormalised `acc`) in the scratch.
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
            self.q.row_into(at, &mut sc.q[r * d..(r + 1) * d]);
        }
        let (k_lo, k_hi) = (k_lo.max(chunk.0), k_hi.min(chunk.1));
        sc.m[..nr].fill(f32::NEG_INFINITY);
        sc.lsum[..nr].fill(0.0);
        sc.acc[..nr * dv].fill(0.0);
        self.half_tiles(sc);
        let mut rows = Rows {
            r0,
            nr,
            q: &sc.q[..nr * d],
            acc: &mut sc.acc[..nr * dv],
            scores: &mut sc.scores[..nr * BLOCK_K],
            m: &mut sc.m[..nr],
            lsum: &mut sc.lsum[..nr],
            lo: &sc.lo[..nr],
            hi: &sc.hi[..nr],
            ktile: &mut sc.ktile,
            vtile: &mut sc.vtile,
        };
        if k_lo < k_hi {
            let mut start = k_lo / BLOCK_K * BLOCK_K;
            self.prefetch(bi, kh, k_lo, (start + BLOCK_K).min(k_hi));
            while start < k_hi {
                let tile = start / BLOCK_K;
                let (j0, j1) = (start.max(k_lo), (start + BLOCK_K).min(k_hi));
                start += BLOCK_K;
                if let Some(dead) = &self.dead_tiles {
                    if dead[bi * self.n_tiles + tile] {
                        continue;
                    }
                }
                self.prefetch(bi, kh, j1, (j1 + BLOCK_K).min(k_hi));
                self.tile(bi, kh, j0, j1, self.masked, &mut rows);
            }
        }
        // Appended keys: never masked.
        let mut j0 = self.real_s;
        while extra && j0 < self.s {
            let j1 = (j0 + BLOCK_K).min(self.s);
            self.tile(bi, kh, j0, j1, false, &mut rows);
            j0 = j1;
        }
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
            let off = ((bi * l + i) * self.h + kh * self.g + gg) * dv;
            let src = &acc[r * dv..(r + 1) * dv];
            let sum = lsum[r];
            if let Some(lse) = self.lse {
                let at = (bi * self.h + kh * self.g + gg) * l + i;
                let v = if sum == 0.0 {
                    f32::NEG_INFINITY
                } else {
                    m[r] + sum.ln()
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
                } else {
                    self.out.write(off, src, 1.0 / sum);
                }
            }
        }
    }

    /// Asks the CPU to start loading the K and V rows of keys `j0..j1` (the next tile) when they
    /// are strided, e.g. one head of a `(B, S, Hkv, D)` cache: each row then sits in its own
    /// memory page, which the hardware prefetchers do not follow.
    fn prefetch(&self, bi: usize, kh: usize, j0: usize, j1: usize) {
        #[cfg(target_arch = "x86_64")]
        for (view, width, used) in [
            (&self.k, self.d, self.kt.is_none()),
            (&self.v, self.dv, true),
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
                            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
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

    /// Keys `j0..j1` for the item's rows: scores, masks, online softmax, `acc += P · V`.
    pub(super) fn tile(
        &self,
        bi: usize,
        kh: usize,
        j0: usize,
        j1: usize,
        masked: bool,
        rows: &mut Rows,
    ) {
        let (d, dv, nr) = (self.d, self.dv, rows.nr);
        let bk = j1 - j0;
        let k0 = self.k.at(bi, j0, kh);
        let v0 = self.v.at(bi, j0, kh);
        let (kst, vst) = (self.k.strides[1], self.v.strides[1]);
        // In place for f32, and for bf16/f16 where the instruction set reads them directly;
        // else half tiles converted once here (K only when no kᵀ copy is used).
        let vhalf = self.v.half_mat(self.isa, v0, (bk, dv, vst));
        let vtile = match vhalf {
            Some(_) => None,
            None => Some(self.v.mat(v0, (bk, dv, vst), rows.vtile)),
        };
        let khalf = match self.kt {
            Some(_) => None,
            None => self.k.half_mat(self.isa, k0, (bk, d, kst)),
        };
        let ktile = match (self.kt, khalf) {
            (None, None) => Some(self.k.mat(k0, (bk, d, kst), rows.ktile)),
            _ => None,
        };
        let q = Mat::new(rows.q, nr, d, d);
        let scores = MatMut::new(rows.scores, nr, bk, BLOCK_K);
        match self.kt {
            Some(kt) => {
                // kᵀ of this KV head, (d × s), from column j0; the score tile has
                // BLOCK_K >= round_up(bk, 16) columns per row.
                let base = (bi * self.hkv + kh) * d * self.s;
                let kt = Mat::new(&kt[base + j0..base + d * self.s], d, bk, self.s);
                products::qk_t(self.isa, q, kt, scores, self.scale);
            }
            None => match (khalf, ktile) {
                (Some(kh), _) => products::qk_rows_half(self.isa, q, kh, scores, self.scale),
                (None, Some(ktile)) => products::qk_rows(self.isa, q, ktile, scores, self.scale),
                (None, None) => unreachable!("a key tile is read or converted"),
            },
        }
        let mut any = false;
        for r in 0..nr {
            let row = &mut rows.scores[r * BLOCK_K..r * BLOCK_K + bk];
            if masked && !self.mask_row(bi, kh, rows.r0 + r, (rows.lo[r], rows.hi[r]), j0, row) {
                row.fill(0.0);
                continue;
            }
            let acc = &mut rows.acc[r * dv..(r + 1) * dv];
            any |= softmax_step(self.isa, row, &mut rows.m[r], &mut rows.lsum[r], acc);
        }
        if !any {
            return;
        }
        let p = Mat::new(rows.scores, nr, bk, BLOCK_K);
        let acc = MatMut::new(rows.acc, nr, dv, dv);
        match (vhalf, vtile) {
            (Some(vh), _) => products::pv_half(self.isa, p, vh, acc),
            (None, Some(vtile)) => products::pv(self.isa, p, vtile, acc),
            (None, None) => unreachable!("a value tile is read or converted"),
        }
    }
}

impl Ctx<'_> {
    /// Masks the scores `row` of keys `j0..j0 + row.len()` (all among the first `real_s`) for
    /// folded row `fr` of KV head `kh`, whose structured range is `range`: `-inf` outside it,
    /// the dense key padding and attention bias added inside. Returns `false` (row untouched)
    /// when no key of the tile is visible.
    pub fn mask_row(
        &self,
        bi: usize,
        kh: usize,
        fr: usize,
        range: (usize, usize),
        j0: usize,
        row: &mut [f32],
    ) -> bool {
        let j1 = j0 + row.len();
        let (lo, hi) = (range.0.clamp(j0, j1), range.1.clamp(j0, j1));
        if lo >= hi {
            return false;
        }
        row[..lo - j0].fill(f32::NEG_INFINITY);
        row[hi - j0..].fill(f32::NEG_INFINITY);
        let vis = &mut row[lo - j0..hi - j0];
        if let Some(p) = self.key_bias {
            add_assign(vis, &p[bi * self.real_s + lo..bi * self.real_s + hi]);
        }
        if let Some(bias) = self.bias {
            let (hh, i) = (kh * self.g + fr / self.l, fr % self.l);
            let base = bi * bias.sb + hh * bias.sh + i * bias.sl;
            add_assign(vis, &bias.data[base + lo..base + hi]);
        }
        true
    }
}

fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}
