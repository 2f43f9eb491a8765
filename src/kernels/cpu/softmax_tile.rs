//! The online-softmax step of a whole score tile (up to [`BLOCK_Q`] rows of [`BLOCK_K`]
//! scores): the same function as [`softmax_step`] applied to each of its live rows, with the
//! rows' work arranged for the CPU on AVX-512 and AVX2.
//!
//! Row by row, the step is a chain of dependent stages (the row's maximum, its reduction, the
//! rescaling factor, the `exp` pass) too long for the out-of-order core to overlap one row's
//! with the next's: measured on the forward's causal tiles, it spent about 24 cycles per vector
//! of 16 scores against the dozen instructions the vector needs. On AVX-512 and AVX2 the tile is
//! done in stages instead: every live row's maximum (independent rows), the rescaling factors of
//! 16 (8) rows in one vector `exp`, then each row's `exp` pass, unrolled by two vectors; with
//! bf16 `P · V` on AVX512-BF16 that pass writes the probabilities as bf16 pairs.

use super::mat::Mat;
use super::products::{self, Isa};
use super::softmax::softmax_step;
use super::{BLOCK_K, BLOCK_Q};

// The live rows are the bits of a `u64`.
const _: () = assert!(BLOCK_Q <= 64);

/// The scores of one tile and the online-softmax state of its rows.
pub(super) struct ScoreTile<'a> {
    /// `nr` rows of `BLOCK_K` scores; the first `bk` of each are the tile's keys.
    pub scores: &'a mut [f32],
    /// Keys in the tile (columns used in each row).
    pub bk: usize,
    /// Bit `r` set: row `r` has a visible key in the tile (the others are left as they are).
    pub live: u64,
    /// Running maxima, sums and unnormalised output rows (`dv` columns each) of the `nr` rows.
    pub m: &'a mut [f32],
    pub lsum: &'a mut [f32],
    pub acc: &'a mut [f32],
    pub dv: usize,
    /// With `P · V` on bf16 pairs: room for the probabilities as bf16 pairs of consecutive
    /// columns (`BLOCK_K / 2` per row; rounded to nearest even, as `products::to_pairs`),
    /// written by the step itself while they are in registers. The f32 rows are then left
    /// unspecified (only the pairs are read after the step).
    pub pairs: Option<&'a mut [u32]>,
}

impl ScoreTile<'_> {
    /// The shapes the vector steps index by: at most a tile of rows and keys, a state and an
    /// output row per row, `bk` scores in every row.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn check(&self) {
        let (nr, n) = (self.m.len(), self.bk);
        assert!(nr <= BLOCK_Q && n <= BLOCK_K, "{nr} rows of {n} keys");
        assert!(self.lsum.len() == nr && self.acc.len() >= nr * self.dv);
        assert!(self.scores.len() >= nr.saturating_sub(1) * BLOCK_K + n);
    }
}

/// [`softmax_step`] on every live row of the tile; returns whether any row has a probability
/// that may be non-zero (a row whose maximum is still `-inf` is zeroed, its state unchanged).
pub(super) fn softmax_tile(isa: Isa, t: ScoreTile) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`products::Detected`), with
        // AVX512-BF16 (and BW, which the detection requires of it).
        Isa::Avx512Bf16(_) if t.pairs.is_some() => unsafe { x86::softmax_tile_avx512_pairs(t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe { x86::softmax_tile_avx512(t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (AVX2 + FMA implies AVX).
        Isa::Avx2(_) => unsafe { x86::softmax_tile_avx2(t) },
        _ => {
            let mut any = false;
            for r in live_rows(t.live, t.m.len()) {
                let row = &mut t.scores[r * BLOCK_K..r * BLOCK_K + t.bk];
                let acc = &mut t.acc[r * t.dv..(r + 1) * t.dv];
                any |= softmax_step(row, &mut t.m[r], &mut t.lsum[r], acc);
            }
            if let (true, Some(pairs)) = (any, t.pairs) {
                let p = Mat::new(t.scores, t.m.len(), t.bk, BLOCK_K);
                products::to_pairs(isa, p, pairs, BLOCK_K / 2);
            }
            any
        }
    }
}

/// The indices of the set bits of `live` below `nr`, in order.
fn live_rows(live: u64, nr: usize) -> impl Iterator<Item = usize> {
    let live = if nr >= 64 {
        live
    } else {
        live & ((1u64 << nr) - 1)
    };
    (0..64).filter(move |r| live >> r & 1 == 1)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{live_rows, ScoreTile};
    use crate::kernels::cpu::avx512::tail_mask as tail;
    use crate::kernels::cpu::softmax::running_max;
    use crate::kernels::cpu::softmax_x86::{exp16, exp8, hmax8, hsum8};
    use crate::kernels::cpu::{BLOCK_K, BLOCK_Q};

    /// After a row's maximum over the tile (`tile_max`, NaN if any score is): its new running
    /// maximum from the old one `m`, into `m_new`. Returns whether the row has had a visible
    /// key; if not, its `n` scores at `p` become 0 (probabilities 0, state unchanged).
    ///
    /// # Safety
    /// `p` points to the row's `n` scores, written by nobody else meanwhile.
    #[inline(always)]
    unsafe fn settle(p: *mut f32, n: usize, tile_max: f32, m: f32, m_new: &mut f32) -> bool {
        *m_new = running_max(tile_max, m);
        if *m_new == f32::NEG_INFINITY {
            // SAFETY: the caller's contract.
            unsafe { std::slice::from_raw_parts_mut(p, n).fill(0.0) };
            return false;
        }
        true
    }

    /// [`super::softmax_tile`] on AVX-512, in three stages over the tile's live rows
    /// (`t.pairs` must be `None`).
    ///
    /// # Safety
    /// avx512f must be available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_tile_avx512(t: ScoreTile) -> bool {
        assert!(t.pairs.is_none());
        // SAFETY: the caller's contract.
        unsafe { tile_avx512::<false>(t) }
    }

    /// [`softmax_tile_avx512`] writing the probabilities as bf16 pairs into `t.pairs` (which
    /// must be `Some`) instead of f32.
    ///
    /// # Safety
    /// avx512f, avx512bw and avx512bf16 must be available.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn softmax_tile_avx512_pairs(t: ScoreTile) -> bool {
        // SAFETY: the caller's contract.
        unsafe { tile_avx512::<true>(t) }
    }

    /// The AVX-512 tile step, inlined into its two entry points (whose target features its
    /// intrinsics need); with `PAIRS` the probabilities go to `t.pairs` as bf16 pairs.
    ///
    /// # Safety
    /// avx512f must be available, and with `PAIRS` avx512bw and avx512bf16 too.
    #[inline(always)]
    unsafe fn tile_avx512<const PAIRS: bool>(mut t: ScoreTile) -> bool {
        let (nr, n, dv) = (t.m.len(), t.bk, t.dv);
        let np = n.div_ceil(2);
        let pairs = t.pairs.take().map(|p| {
            assert!(p.len() >= nr.saturating_sub(1) * (BLOCK_K / 2) + np);
            p.as_mut_ptr()
        });
        assert_eq!(pairs.is_some(), PAIRS);
        let pp = pairs.unwrap_or(std::ptr::null_mut());
        t.check();
        let full = n / 16 * 16;
        let tail_k = tail(n - full);
        let base = t.scores.as_mut_ptr();
        let mut live = 0u64;
        let mut m_new = [f32::NEG_INFINITY; BLOCK_Q];
        // SAFETY: avx512f is available (the caller's contract); every row `r < nr` holds `n`
        // scores at `base + r·BLOCK_K` (`t.check()`), read in whole vectors below `full` and
        // through the tail mask above it.
        unsafe {
            let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
            // 1. Each row's maximum (rows are independent: their chains overlap).
            for r in live_rows(t.live, nr) {
                let p = base.add(r * BLOCK_K);
                let (mut mx0, mut mx1) = (neg_inf, neg_inf);
                let mut nan = 0u16;
                let mut c = 0;
                while c + 32 <= full {
                    let (x0, x1) = (_mm512_loadu_ps(p.add(c)), _mm512_loadu_ps(p.add(c + 16)));
                    nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x0, x0)
                        | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x1, x1);
                    mx0 = _mm512_max_ps(mx0, x0);
                    mx1 = _mm512_max_ps(mx1, x1);
                    c += 32;
                }
                if c < n {
                    let x = _mm512_mask_loadu_ps(neg_inf, tail(n - c), p.add(c));
                    nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
                    mx0 = _mm512_max_ps(mx0, x);
                    if c + 16 < n {
                        let x = _mm512_mask_loadu_ps(neg_inf, tail(n - c - 16), p.add(c + 16));
                        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
                        mx1 = _mm512_max_ps(mx1, x);
                    }
                }
                // NaN wins and sticks (a NaN logit makes the row NaN, as in PyTorch).
                let tile_max = if nan != 0 {
                    f32::NAN
                } else {
                    _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1))
                };
                if settle(p, n, tile_max, t.m[r], &mut m_new[r]) {
                    live |= 1 << r;
                }
            }
            if live == 0 {
                return false;
            }
            if PAIRS {
                // Rows with nothing visible: zero pairs.
                for r in (0..nr).filter(|r| live >> r & 1 == 0) {
                    std::slice::from_raw_parts_mut(pp.add(r * (BLOCK_K / 2)), np).fill(0);
                }
            }
            // 2. The rescaling factors `exp(m − m_new)` of 16 rows at once (0 where m was -inf;
            // 1 where the maximum did not change, as the row-by-row step leaves them).
            let mut corr = [1f32; BLOCK_Q];
            for r0 in (0..nr).step_by(16) {
                let k = ((live >> r0) as u16) & tail(nr - r0);
                let old = _mm512_maskz_loadu_ps(k, t.m.as_ptr().add(r0));
                let new = _mm512_maskz_loadu_ps(k, m_new.as_ptr().add(r0));
                let changed = _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(k, old, new);
                let e = exp16(_mm512_sub_ps(old, new));
                _mm512_mask_storeu_ps(corr.as_mut_ptr().add(r0), changed, e);
                _mm512_mask_storeu_ps(t.m.as_mut_ptr().add(r0), k, new);
            }
            // 3. Each row's probabilities and sum; its output row rescaled.
            for r in live_rows(live, nr) {
                let p = base.add(r * BLOCK_K);
                let q = pp.wrapping_add(r * (BLOCK_K / 2));
                // Columns `c..c + 32` (`e1` zero past the row's end), as f32 or as pairs.
                let store = |c: usize, e0: __m512, e1: __m512, k0: u16| {
                    if PAIRS {
                        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0));
                        let k = tail((n - c).min(32).div_ceil(2));
                        _mm512_mask_storeu_epi32(q.add(c / 2).cast(), k, v);
                    } else {
                        _mm512_mask_storeu_ps(p.add(c), k0, e0);
                        if c + 16 < n {
                            _mm512_mask_storeu_ps(p.add(c + 16), tail(n - c - 16), e1);
                        }
                    }
                };
                let mv = _mm512_set1_ps(m_new[r]);
                let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let mut c = 0;
                while c + 32 <= full {
                    let e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(c)), mv));
                    let e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(c + 16)), mv));
                    store(c, e0, e1, u16::MAX);
                    s0 = _mm512_add_ps(s0, e0);
                    s1 = _mm512_add_ps(s1, e1);
                    c += 32;
                }
                if c < n {
                    // The last 1..=31 columns: a whole vector and the masked tail, or the tail.
                    let (e0, e1) = if c < full {
                        let e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(c)), mv));
                        let e1 = if full < n {
                            let x = _mm512_mask_loadu_ps(neg_inf, tail_k, p.add(full));
                            _mm512_maskz_mov_ps(tail_k, exp16(_mm512_sub_ps(x, mv)))
                        } else {
                            _mm512_setzero_ps()
                        };
                        (e0, e1)
                    } else {
                        let x = _mm512_mask_loadu_ps(neg_inf, tail_k, p.add(c));
                        let e0 = _mm512_maskz_mov_ps(tail_k, exp16(_mm512_sub_ps(x, mv)));
                        (e0, _mm512_setzero_ps())
                    };
                    store(c, e0, e1, tail(n - c));
                    s0 = _mm512_add_ps(s0, e0);
                    s1 = _mm512_add_ps(s1, e1);
                }
                let sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
                let cr = corr[r];
                if cr != 1.0 && t.lsum[r] != 0.0 {
                    let a = t.acc.as_mut_ptr().add(r * dv);
                    let cv = _mm512_set1_ps(cr);
                    let mut c = 0;
                    while c < dv {
                        let k = tail(dv - c);
                        let x = _mm512_maskz_loadu_ps(k, a.add(c));
                        _mm512_mask_storeu_ps(a.add(c), k, _mm512_mul_ps(x, cv));
                        c += 16;
                    }
                }
                t.lsum[r] = t.lsum[r] * cr + sum;
            }
        }
        true
    }

    /// [`super::softmax_tile`] on AVX2 + FMA, in the stages of [`softmax_tile_avx512`]: whole
    /// vectors of 8, the last `bk % 8` scores of a row one lane at a time (as the row-by-row
    /// AVX2 step, with the same arithmetic).
    ///
    /// # Safety
    /// avx2 and fma must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_tile_avx2(t: ScoreTile) -> bool {
        let (nr, n, dv) = (t.m.len(), t.bk, t.dv);
        t.check();
        let full = n / 8 * 8;
        let base = t.scores.as_mut_ptr();
        let mut live = 0u64;
        let mut m_new = [f32::NEG_INFINITY; BLOCK_Q];
        // SAFETY: avx2 and fma are available (the caller's contract); every row `r < nr` holds
        // `n` scores at `base + r·BLOCK_K` (`t.check()`), read in whole vectors below `full`
        // and one by one above it.
        unsafe {
            let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
            // 1. Each row's maximum.
            for r in live_rows(t.live, nr) {
                let p = base.add(r * BLOCK_K);
                let (mut mx0, mut mx1) = (neg_inf, neg_inf);
                let (mut nan0, mut nan1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c + 16 <= full {
                    let (x0, x1) = (_mm256_loadu_ps(p.add(c)), _mm256_loadu_ps(p.add(c + 8)));
                    nan0 = _mm256_or_ps(nan0, _mm256_cmp_ps::<_CMP_UNORD_Q>(x0, x0));
                    nan1 = _mm256_or_ps(nan1, _mm256_cmp_ps::<_CMP_UNORD_Q>(x1, x1));
                    mx0 = _mm256_max_ps(mx0, x0);
                    mx1 = _mm256_max_ps(mx1, x1);
                    c += 16;
                }
                if c < full {
                    let x = _mm256_loadu_ps(p.add(c));
                    nan0 = _mm256_or_ps(nan0, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
                    mx0 = _mm256_max_ps(mx0, x);
                }
                let mut tile_max = hmax8(_mm256_max_ps(mx0, mx1));
                let mut nan = _mm256_movemask_ps(_mm256_or_ps(nan0, nan1)) != 0;
                for j in full..n {
                    let x = *p.add(j);
                    nan |= x.is_nan();
                    tile_max = tile_max.max(x);
                }
                // NaN wins and sticks (a NaN logit makes the row NaN, as in PyTorch).
                if nan {
                    tile_max = f32::NAN;
                }
                if settle(p, n, tile_max, t.m[r], &mut m_new[r]) {
                    live |= 1 << r;
                }
            }
            if live == 0 {
                return false;
            }
            // 2. The rescaling factors of 8 rows at once (1 where the maximum did not change).
            let mut corr = [1f32; BLOCK_Q];
            let mut old = [0f32; BLOCK_Q];
            for r in live_rows(live, nr) {
                old[r] = t.m[r];
                t.m[r] = m_new[r];
            }
            for r0 in (0..nr).step_by(8) {
                let (o, w) = (
                    _mm256_loadu_ps(old.as_ptr().add(r0)),
                    m_new.as_ptr().add(r0),
                );
                let e = exp8(_mm256_sub_ps(o, _mm256_loadu_ps(w)));
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), e);
                for (i, &x) in lanes.iter().enumerate().take(nr - r0) {
                    let r = r0 + i;
                    if live >> r & 1 == 1 && old[r] != m_new[r] {
                        corr[r] = x;
                    }
                }
            }
            // 3. Each row's probabilities and sum; its output row rescaled.
            for r in live_rows(live, nr) {
                let p = base.add(r * BLOCK_K);
                let mv = _mm256_set1_ps(m_new[r]);
                let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut c = 0;
                while c + 16 <= full {
                    let e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(c)), mv));
                    let e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(c + 8)), mv));
                    _mm256_storeu_ps(p.add(c), e0);
                    _mm256_storeu_ps(p.add(c + 8), e1);
                    s0 = _mm256_add_ps(s0, e0);
                    s1 = _mm256_add_ps(s1, e1);
                    c += 16;
                }
                if c < full {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(c)), mv));
                    _mm256_storeu_ps(p.add(c), e);
                    s0 = _mm256_add_ps(s0, e);
                }
                let mut sum = hsum8(_mm256_add_ps(s0, s1));
                for j in full..n {
                    let e = _mm256_cvtss_f32(exp8(_mm256_set1_ps(*p.add(j) - m_new[r])));
                    *p.add(j) = e;
                    sum += e;
                }
                let cr = corr[r];
                if cr != 1.0 && t.lsum[r] != 0.0 {
                    let a = &mut t.acc[r * dv..(r + 1) * dv];
                    let (ap, vec_end) = (a.as_mut_ptr(), dv / 8 * 8);
                    let cv = _mm256_set1_ps(cr);
                    let mut c = 0;
                    while c < vec_end {
                        _mm256_storeu_ps(ap.add(c), _mm256_mul_ps(_mm256_loadu_ps(ap.add(c)), cv));
                        c += 8;
                    }
                    a[vec_end..].iter_mut().for_each(|x| *x *= cr);
                }
                t.lsum[r] = t.lsum[r] * cr + sum;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::products::available;
    use crate::kernels::cpu::softmax::softmax_step_impl;

    /// The tile step against the portable row-by-row step on every instruction set of this CPU
    /// (with fused multiply-adds where the SIMD steps have them): probabilities and maxima bit
    /// for bit (one `exp` polynomial), sums and rescaled
    /// output rows to f32 rounding (lanes summed in another order), rows with nothing visible
    /// zeroed with their state kept, rows not live untouched; NaN and `-inf` rows; running
    /// states fresh, below and above the tile; every width up to a whole tile.
    #[test]
    fn tile_matches_row_steps() {
        let mut s = 0x9e37_79b9u32;
        let mut rnd = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32
        };
        let dv = 40;
        for isa in available() {
            for (nr, bk) in [
                (1, 1),
                (2, 2),
                (5, 7),
                (9, 8),
                (12, 9),
                (3, 17),
                (16, 16),
                (17, 33),
                (20, 31),
                (40, 100),
                (64, 256),
                (64, 250),
            ] {
                for case in 0..9 {
                    let mut scores = vec![0f32; nr * BLOCK_K];
                    let mut m = vec![f32::NEG_INFINITY; nr];
                    let mut lsum = vec![0f32; nr];
                    let acc: Vec<f32> = (0..nr * dv).map(|_| rnd()).collect();
                    let mut live = 0u64;
                    for r in 0..nr {
                        let row = &mut scores[r * BLOCK_K..r * BLOCK_K + bk];
                        row.iter_mut().for_each(|x| *x = rnd() * 40.0 - 30.0);
                        match (r + case) % 9 {
                            1 => row
                                .iter_mut()
                                .step_by(3)
                                .for_each(|x| *x = f32::NEG_INFINITY),
                            2 => row.fill(f32::NEG_INFINITY),
                            3 => row[bk / 2] = f32::NAN,
                            4 => row[bk - 1] = -100.0,
                            5 => (m[r], lsum[r]) = (-5.0, 2.5),
                            6 => (m[r], lsum[r]) = (50.0, 1.0),
                            7 => (m[r], lsum[r]) = (f32::NAN, f32::NAN),
                            8 => row[bk - 1] = f32::NAN,
                            _ => {}
                        }
                        if (r * 7 + case) % 5 != 0 {
                            live |= 1 << r;
                        }
                    }
                    let (mut sa, mut ma, mut la, mut aa) =
                        (scores.clone(), m.clone(), lsum.clone(), acc.clone());
                    let mut want = false;
                    let mut seen = vec![false; nr];
                    for r in live_rows(live, nr) {
                        let row = &mut sa[r * BLOCK_K..r * BLOCK_K + bk];
                        let a = &mut aa[r * dv..(r + 1) * dv];
                        let (m, l) = (&mut ma[r], &mut la[r]);
                        seen[r] = match isa {
                            Isa::Portable => softmax_step(row, m, l, a),
                            _ => softmax_step_impl::<true, 16>(row, m, l, a),
                        };
                        want |= seen[r];
                    }
                    // With AVX512-BF16 also the step that writes bf16 pairs: the rows' pairs
                    // as `to_pairs` rounds them (zero for rows with nothing visible).
                    let with_pairs = matches!(isa, Isa::Avx512Bf16(_)) && case % 2 == 1;
                    let mut pairs = vec![0x5555_5555u32; nr * BLOCK_K / 2];
                    let (mut sb, mut mb, mut lb, mut ab) = (scores, m, lsum, acc);
                    let tile = ScoreTile {
                        scores: &mut sb,
                        bk,
                        live,
                        m: &mut mb,
                        lsum: &mut lb,
                        acc: &mut ab,
                        dv,
                        pairs: with_pairs.then_some(&mut pairs[..]),
                    };
                    let got = softmax_tile(isa, tile);
                    let what = format!("{isa:?} nr={nr} bk={bk} case={case} pairs={with_pairs}");
                    assert_eq!(want, got, "{what}");
                    if with_pairs && want {
                        let bf = |x: f32| u32::from(half::bf16::from_f32(x).to_bits());
                        for r in 0..nr {
                            for jp in 0..bk.div_ceil(2) {
                                let at = |j: usize| {
                                    if seen[r] && j < bk {
                                        sa[r * BLOCK_K + j]
                                    } else {
                                        0.0
                                    }
                                };
                                let (lo, hi) = (at(2 * jp), at(2 * jp + 1));
                                let g = pairs[r * BLOCK_K / 2 + jp];
                                let half_ok = |w: f32, g: u32| {
                                    bf(w) == g
                                        || (w.is_nan() && half::bf16::from_bits(g as u16).is_nan())
                                };
                                assert!(
                                    half_ok(lo, g & 0xffff) && half_ok(hi, g >> 16),
                                    "{what} row {r} pair {jp}: {g:#x} vs {lo} {hi}"
                                );
                            }
                        }
                    }
                    let same =
                        |x: f32, y: f32| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
                    let close =
                        |x: f32, y: f32| same(x, y) || (x - y).abs() <= 1e-6 * x.abs().max(1.0);
                    for r in 0..nr {
                        let w = format!("{what} row {r}");
                        let (ra, rb) = (r * BLOCK_K, r * BLOCK_K + bk);
                        // (With pairs the f32 rows are left unspecified.)
                        assert!(
                            with_pairs
                                || sa[ra..rb]
                                    .iter()
                                    .zip(&sb[ra..rb])
                                    .all(|(x, y)| same(*x, *y)),
                            "{w}"
                        );
                        assert!(same(ma[r], mb[r]), "{w}: max {} vs {}", ma[r], mb[r]);
                        assert!(close(la[r], lb[r]), "{w}: sum {} vs {}", la[r], lb[r]);
                        let (a0, a1) = (r * dv, (r + 1) * dv);
                        assert!(
                            aa[a0..a1]
                                .iter()
                                .zip(&ab[a0..a1])
                                .all(|(x, y)| close(*x, *y)),
                            "{w}"
                        );
                    }
                }
            }
        }
    }
}
