//! Quantized caches in the tile: the query rows quantized to int16 for `Q · Kᵀ` against int8
//! keys, and the quantized rows' scales applied to a tile's columns.
//!
//! Against int8 keys (stored `k + 128`, one f32 scale per row) on a CPU with AVX512-VNNI or
//! AVX2 ([`products::int16`]), each query row is quantized once per walk to int16,
//! symmetrically with one scale per row (`q ≈ q16 · amax / 32767`, round to nearest even):
//! `vpdpwssd` then multiplies 32 key bytes (widened to 16 bits, one instruction per 32) by 32
//! query values per instruction and sums them in 32-bit lanes, exactly (AVX2: `vpmaddwd` and
//! `vpaddd` on 16, the same integers; `|Σ q16 · (k + 128)| < 2³¹` for head sizes up to 256). The
//! score is `(Σ q16 · (k + 128) − 128 · Σ q16) · scale_q · scale_k · softmax scale`. The query's
//! rounding moves a score by at most `scale_q / 2 · Σ |k|`, `amax / 65534 · Σ |k|`: about a
//! hundredth of what the keys' own int8 rounding may (`scale_k / 2 · Σ |q|`, `1 / 254` of the
//! row's largest key), and below a bf16 query's own rounding (`2⁻⁹` of each element).
//! (Quantizing the queries to int8 instead, as llama.cpp does against q8_0 keys, measurably
//! changed SmolLM2's greedy tokens.)

use super::mat::{ByteMat, Mat, MatMut};
use super::products::{self, Isa};
use super::BLOCK_K;

/// The largest magnitude of `row` (NaNs ignored) and whether every value is finite, in 16
/// independent lanes (which the compiler turns into vector instructions: a maximum does not
/// depend on the order it is taken in, but a fold over one accumulator stays scalar).
fn amax_finite(row: &[f32]) -> (f32, bool) {
    let (mut mx, mut bad) = ([0f32; 16], [false; 16]);
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            let a = c[l].abs();
            mx[l] = if a > mx[l] { a } else { mx[l] };
            bad[l] |= !a.is_finite();
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        let a = x.abs();
        mx[l] = if a > mx[l] { a } else { mx[l] };
        bad[l] |= !a.is_finite();
    }
    (mx.iter().fold(0f32, |m, &x| m.max(x)), !bad.contains(&true))
}

/// Query rows quantized to int16: row `r` is `vals[r·d..(r + 1)·d] · scale[r]`.
#[derive(Default)]
pub(super) struct QuantRows {
    vals: Vec<i16>,
    scale: Vec<f32>,
    corr: Vec<i32>,
    d: usize,
}

/// Rows of a [`QuantRows`]: `rows × cols` int16 values (row stride `cols`), each row's scale,
/// and `128 · Σ vals` of each row (the offset of int8 keys stored as `k + 128`).
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the VNNI kernel
pub(super) struct QRows<'a> {
    pub vals: &'a [i16],
    pub scale: &'a [f32],
    pub corr: &'a [i32],
    pub rows: usize,
    pub cols: usize,
}

/// Adding and subtracting 1.5 · 2²³ rounds an f32 of magnitude below 2²² to the nearest
/// integer, ties to even (the SIMD conversions' rounding), in any instruction set.
const ROUND: f32 = 12_582_912.0;

/// The largest quantized magnitude.
const QMAX: f32 = 32767.0;

impl QuantRows {
    /// Quantizes the `nr` rows of `d` values in `q` (row-major, stride `d`) into rows
    /// `0..nr`. A row with a NaN or an infinity gets a NaN scale (its scores are NaN, as the
    /// f32 products would make them); an all-zero row gets scale 0.
    pub fn quantize(&mut self, q: &[f32], nr: usize, d: usize) {
        assert!(
            q.len() >= nr * d,
            "quantize: {nr} rows of {d} in {}",
            q.len()
        );
        self.d = d;
        if self.vals.len() < nr * d {
            self.vals.resize(nr * d, 0);
        }
        if self.scale.len() < nr {
            self.scale.resize(nr, 0.0);
            self.corr.resize(nr, 0);
        }
        for r in 0..nr {
            let row = &q[r * d..(r + 1) * d];
            let (amax, finite) = amax_finite(row);
            let inv = if amax > 0.0 { QMAX / amax } else { 0.0 };
            let dst = &mut self.vals[r * d..(r + 1) * d];
            let mut sum = 0i32;
            if finite {
                for (o, &x) in dst.iter_mut().zip(row) {
                    *o = ((x * inv + ROUND) - ROUND).clamp(-QMAX, QMAX) as i16;
                    sum += i32::from(*o);
                }
            } else {
                dst.fill(0);
            }
            self.scale[r] = if finite { amax / QMAX } else { f32::NAN };
            self.corr[r] = 128 * sum;
        }
    }

    /// Rows `a..b` of the last [`Self::quantize`].
    pub fn rows(&self, a: usize, b: usize) -> QRows<'_> {
        let d = self.d;
        QRows {
            vals: &self.vals[a * d..b * d],
            scale: &self.scale[a..b],
            corr: &self.corr[a..b],
            rows: b - a,
            cols: d,
        }
    }
}

/// The scales of a tile's `bk` quantized rows, `scales[first + j·step]` for key `j` (at most
/// [`BLOCK_K`]), as one slice for the products that apply them.
pub(super) fn key_scales(
    bk: usize,
    (scales, first, step): (&[f32], usize, usize),
) -> [f32; BLOCK_K] {
    let mut col = [0f32; BLOCK_K];
    for (j, c) in col[..bk].iter_mut().enumerate() {
        *c = scales[first + j * step];
    }
    col
}

/// Multiplies columns `0..bk` of the `nr` rows of the score or probability tile `m` (rows
/// [`BLOCK_K`] apart) by the quantized rows' scales `scales[first + j·step]`.
pub(super) fn scale_columns(
    m: &mut [f32],
    (nr, bk): (usize, usize),
    (scales, first, step): (&[f32], usize, usize),
) {
    let col = key_scales(bk, (scales, first, step));
    for r in 0..nr {
        m[r * BLOCK_K..r * BLOCK_K + bk]
            .iter_mut()
            .zip(&col[..bk])
            .for_each(|(x, s)| *x *= s);
    }
}

/// `acc += P · V` over quantized value rows `v` read in place, the probabilities `p` (`nr ×
/// len`, rows [`BLOCK_K`] apart) times the rows' scales (`scales[first + j·step]`; the
/// softmax's sums are already taken). With `int16` (the call's
/// [`PvPath::Int16`](super::plan::PvPath), int8 values on VNNI or AVX2): exact integer products of
/// `p · scale` quantized to int16 per row (its rounding moves an output by at most
/// `max_j (p · scale)_j / 65534 · Σ_j |v_j|`), or, when a row of them is not finite, the values
/// widened in registers; else the values widened in registers. `p` may be left scaled.
pub(super) fn pv_quantized(
    isa: Isa,
    int16: bool,
    (p, nr, len): (&mut [f32], usize, usize),
    (v, scales, first, step): (ByteMat, &[f32], usize, usize),
    acc: MatMut,
) {
    #[cfg(target_arch = "x86_64")]
    let mut acc = acc;
    #[cfg(target_arch = "x86_64")]
    if int16 {
        // The scales applied as `p` is quantized; `pv_q16` leaves `acc` untouched when it
        // returns false (then as below).
        let col = key_scales(len, (scales, first, step));
        let pm = Mat::new(p, nr, len, BLOCK_K);
        if products::pv_q16(isa, pm, (v, &col[..len]), acc.reborrow()) {
            return;
        }
    }
    let _ = int16;
    scale_columns(p, (nr, len), (scales, first, step));
    products::pv_bytes(isa, Mat::new(p, nr, len, BLOCK_K), v, acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_rows_are_within_half_a_step_and_sum_their_offsets() {
        let d = 40;
        let q: Vec<f32> = (0..3 * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut qr = QuantRows::default();
        qr.quantize(&q, 3, d);
        let rows = qr.rows(0, 3);
        for r in 0..3 {
            let row = &q[r * d..(r + 1) * d];
            let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(rows.scale[r], amax / QMAX);
            let vals = &rows.vals[r * d..(r + 1) * d];
            assert!(vals.iter().any(|&v| f32::from(v.abs()) == QMAX));
            for (&v, &x) in vals.iter().zip(row) {
                assert!((f32::from(v) * rows.scale[r] - x).abs() <= rows.scale[r] * 0.5001);
            }
            let sum: i32 = vals.iter().map(|&v| i32::from(v)).sum();
            assert_eq!(rows.corr[r], 128 * sum);
        }
    }

    /// The instruction sets of this CPU with int16 products (AVX512-VNNI, AVX2), or `None` (said
    /// on stderr) when it has none.
    #[cfg(target_arch = "x86_64")]
    fn int16_sets() -> Option<Vec<super::super::products::Isa>> {
        use super::super::products;
        let sets: Vec<_> = products::available()
            .into_iter()
            .filter(|&i| products::int16(i))
            .collect();
        if sets.is_empty() {
            eprintln!("no AVX2 or AVX512-VNNI on this CPU: the int16 products are not used");
            return None;
        }
        Some(sets)
    }

    /// On every instruction set with int16 products (AVX512-VNNI, AVX2) the products of int16
    /// query rows and int8 keys are the exact integers, scaled (the same bits as an i64
    /// computation), and within the query's rounding of the f32 products.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn int16_products_are_exact_and_near_the_f32_products() {
        use super::super::mat::{ByteMat, Mat, MatMut};
        use super::super::products::{self, reads_half};
        let Some(int16) = int16_sets() else { return };
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for d in [8usize, 16, 40, 48, 64, 112, 128, 136, 144, 256] {
            let (nr, bk, ks) = (7usize, 13usize, d + 16);
            // Key bytes 1..=255 (int8 −127..=127 offset by 128); the worst case, every key
            // byte 255 against a row of +32767, in the last key.
            let mut kb: Vec<u8> = (0..bk * ks).map(|_| 1 + (next() % 255) as u8).collect();
            kb[(bk - 1) * ks..].fill(255);
            let mut q: Vec<f32> = (0..nr * d)
                .map(|_| (next() % 2001) as f32 / 100.0 - 10.0)
                .collect();
            q[..d].fill(3.0);
            let mut qr = QuantRows::default();
            qr.quantize(&q, nr, d);
            let q16 = qr.rows(0, nr);
            let scale = 0.125f32;
            let kscale: Vec<f32> = (0..bk).map(|j| 0.5 + (j % 7) as f32 * 0.125).collect();
            let mut want = vec![0f32; nr * bk];
            let mut scaled = vec![0f32; nr * bk];
            let mut wide = vec![0f32; nr * bk];
            for r in 0..nr {
                for j in 0..bk {
                    let dot: i64 = (0..d)
                        .map(|x| i64::from(q16.vals[r * d + x]) * (i64::from(kb[j * ks + x]) - 128))
                        .sum();
                    want[r * bk + j] = dot as f32 * (scale * q16.scale[r]);
                    scaled[r * bk + j] = want[r * bk + j] * kscale[j];
                }
            }
            let k = ByteMat::new(&kb, false, bk, d, ks);
            // Each set with the head sizes it reads in place (AVX-512: multiples of 16).
            let here: Vec<Isa> = int16
                .iter()
                .copied()
                .filter(|&i| reads_half(i, d))
                .collect();
            for &isa in &here {
                let mut got = vec![f32::NAN; nr * bk];
                let out = MatMut::new(&mut got, nr, bk, bk);
                products::qk_rows_q16(isa, q16, (k, &kscale), out, scale);
                let same = got
                    .iter()
                    .zip(&scaled)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{isa:?} d={d}: {got:?} vs {scaled:?}");
            }
            let qm = Mat::new(&q, nr, d, d);
            let Some(&first) = here.first() else {
                continue;
            };
            let out = MatMut::new(&mut wide, nr, bk, bk);
            products::qk_rows_bytes(first, qm, k, out, scale);
            for r in 0..nr {
                for j in 0..bk {
                    let k_abs: f32 = (0..d)
                        .map(|x| (f32::from(kb[j * ks + x]) - 128.0).abs())
                        .sum();
                    let bound = scale * (q16.scale[r] * 0.5 * k_abs) * 1.01 + 1e-4;
                    let (a, b) = (want[r * bk + j], wide[r * bk + j]);
                    assert!((a - b).abs() <= bound, "d={d} ({r}, {j}): {a} vs {b}");
                }
            }
        }
    }

    /// On every instruction set with int16 products, `P · V` over int8 values with the
    /// probabilities quantized to int16 per row stays within that rounding of the f32 products
    /// (odd key counts, 32-column tails, rows beyond a block of 4), the sets agree to the bit,
    /// and a row that is not finite leaves the call to the f32 products.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn int16_probability_products_are_near_the_f32_products() {
        use super::super::products;
        let Some(int16) = int16_sets() else { return };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (nr, bk, dv) in [
            (4usize, 64usize, 128usize),
            (6, 37, 96),
            (1, 1, 32),
            (3, 256, 64),
            (5, 255, 32),
            (4, 12, 160),
        ] {
            let vs = dv + 32;
            let vb: Vec<u8> = (0..bk * vs).map(|_| 1 + (next() % 255) as u8).collect();
            let p: Vec<f32> = (0..nr * bk)
                .map(|_| (next() % 10_000) as f32 / 10_000.0 * 0.03)
                .collect();
            let acc0: Vec<f32> = (0..nr * dv).map(|i| (i % 7) as f32 - 3.0).collect();
            let v = ByteMat::new(&vb, false, bk, dv, vs);
            // The values' scales, applied to the probabilities' columns.
            let vscale: Vec<f32> = (0..bk).map(|j| 0.25 + (j % 5) as f32 * 0.5).collect();
            let ps: Vec<f32> = (0..nr * bk).map(|i| p[i] * vscale[i % bk]).collect();
            let mut want = acc0.clone();
            let psm = Mat::new(&ps, nr, bk, bk);
            products::pv_bytes(int16[0], psm, v, MatMut::new(&mut want, nr, dv, dv));
            let mut first: Option<Vec<f32>> = None;
            for &isa in &int16 {
                let mut got = acc0.clone();
                let pm = Mat::new(&p, nr, bk, bk);
                assert!(products::pv_q16(
                    isa,
                    pm,
                    (v, &vscale),
                    MatMut::new(&mut got, nr, dv, dv)
                ));
                for r in 0..nr {
                    let pmax = ps[r * bk..(r + 1) * bk].iter().fold(0f32, |m, &x| m.max(x));
                    for c in 0..dv {
                        let v_abs: f32 = (0..bk)
                            .map(|j| (f32::from(vb[j * vs + c]) - 128.0).abs())
                            .sum();
                        let bound = pmax / 65534.0 * v_abs * 1.01 + 1e-4;
                        let (a, b) = (got[r * dv + c], want[r * dv + c]);
                        assert!(
                            (a - b).abs() <= bound,
                            "{isa:?} {nr}×{bk}×{dv} ({r}, {c}): {a} vs {b}"
                        );
                    }
                }
                match &first {
                    None => first = Some(got),
                    Some(f) => assert!(
                        f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} {nr}×{bk}×{dv}: not the bits of {:?}",
                        int16[0]
                    ),
                }
                let mut bad = p.clone();
                bad[bk / 2] = f32::NAN;
                let mut same = acc0.clone();
                let pm = Mat::new(&bad, nr, bk, bk);
                assert!(!products::pv_q16(
                    isa,
                    pm,
                    (v, &vscale),
                    MatMut::new(&mut same, nr, dv, dv)
                ));
                assert_eq!(
                    same, acc0,
                    "a refused call leaves the accumulators untouched"
                );
            }
        }
    }

    #[test]
    fn zero_and_non_finite_rows() {
        let mut q = vec![0f32; 8];
        q.extend([1.0, f32::NAN, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        q.extend([1.0, f32::INFINITY, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let mut qr = QuantRows::default();
        qr.quantize(&q, 3, 8);
        let rows = qr.rows(0, 3);
        assert_eq!(rows.scale[0], 0.0);
        assert!(rows.vals[..8].iter().all(|&v| v == 0));
        assert!(rows.scale[1].is_nan() && rows.scale[2].is_nan());
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 32767 / 65534 = 1/2: {0.5, 1.5, 2.5, -0.5} and the maximum.
        let q = [1.0f32, 3.0, 5.0, -1.0, 65534.0];
        let mut qr = QuantRows::default();
        qr.quantize(&q, 1, 5);
        assert_eq!(qr.rows(0, 1).vals, &[0, 2, 2, 0, 32767]);
    }
}
