//! The online softmax's row step and `exp` on any CPU (the reference of the vectorised tile step
//! in `softmax_tile.rs`), the backward's `exp(row − lse)`, soft-capping and ALiBi.

use super::products::Isa;

/// One row of one tile, on any CPU: `row` (logits) becomes `exp(row - m_new)`, `m`/`lsum` are
/// updated and `acc` is rescaled. Returns whether the row has any nonzero probability in this
/// tile. (Where the CPU has AVX-512 or AVX2, `softmax_tile` does every row of a tile at once.)
pub(super) fn softmax_step(row: &mut [f32], m: &mut f32, lsum: &mut f32, acc: &mut [f32]) -> bool {
    softmax_step_impl::<false, 8>(row, m, lsum, acc)
}

/// [`softmax_step`] with fused multiply-adds in `exp` (`FMA`, as the vectorised steps compute
/// it: the same probabilities bit for bit), in `W` lanes.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
pub(super) fn softmax_step_impl<const FMA: bool, const W: usize>(
    row: &mut [f32],
    m: &mut f32,
    lsum: &mut f32,
    acc: &mut [f32],
) -> bool {
    // The running-max rule lane by lane: NaN wins and sticks.
    let max = |m: f32, x: f32| running_max(x, m);
    let mut mx = [f32::NEG_INFINITY; W];
    let mut chunks = row.chunks_exact(W);
    for c in &mut chunks {
        for t in 0..W {
            mx[t] = max(mx[t], c[t]);
        }
    }
    for (t, &x) in chunks.remainder().iter().enumerate() {
        mx[t] = max(mx[t], x);
    }
    let tile_max = tree(mx, max);
    let m_new = running_max(tile_max, *m);
    if m_new == f32::NEG_INFINITY {
        // Nothing visible so far: probabilities 0, no state change.
        row.fill(0.0);
        return false;
    }
    let mut sums = [0f32; W];
    let mut chunks = row.chunks_exact_mut(W);
    for c in &mut chunks {
        for t in 0..W {
            let e = fast_exp::<FMA>(c[t] - m_new);
            c[t] = e;
            sums[t] += e;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        let e = fast_exp::<FMA>(*x - m_new);
        *x = e;
        sum += e;
    }
    sum += tree(sums, |a, b| a + b);
    if m_new != *m {
        let corr = fast_exp::<FMA>(*m - m_new); // 0 when m was -inf
        if *lsum != 0.0 {
            acc.iter_mut().for_each(|x| *x *= corr);
        }
        *lsum *= corr;
        *m = m_new;
    }
    *lsum += sum;
    true
}

/// `op` over the `W` lanes (a power of two) as a tree of vector steps (a scalar loop over the
/// lanes would be a chain of `W` dependent operations).
#[inline(always)]
fn tree<const W: usize>(mut x: [f32; W], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut half = W / 2;
    while half > 0 {
        for t in 0..half {
            x[t] = op(x[t], x[t + half]);
        }
        half /= 2;
    }
    x[0]
}

/// `row[j] = exp(row[j] - shift)` for a row whose entries are at most `shift` (probabilities
/// from logits and their log-sum-exp); `-inf` entries give 0.
pub(super) fn exp_sub(isa: Isa, row: &mut [f32], shift: f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`products::Detected`).
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe {
            super::softmax_x86::exp_sub_avx512(row, shift)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (AVX2 + FMA implies AVX).
        Isa::Avx2(_) => unsafe { exp_sub_avx(row, shift) },
        _ => exp_sub_impl::<false>(row, shift),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn exp_sub_avx(row: &mut [f32], shift: f32) {
    exp_sub_impl::<true>(row, shift)
}

#[inline(always)]
fn exp_sub_impl<const FMA: bool>(row: &mut [f32], shift: f32) {
    for x in row.iter_mut() {
        // Rounding can leave a logit a hair above its log-sum-exp: clamp to exp(0) = 1.
        let y = *x - shift;
        *x = fast_exp::<FMA>(if y > 0.0 { 0.0 } else { y });
    }
}

/// Which `tanh` soft-capping computes: the precision a call's dtype needs, at the least cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Tanh {
    /// `tanh|y| = (1 − e) / (1 + e)` with `e = exp(−2|y|)` from the softmax's `exp`: within
    /// 2e-7 of `tanh` (f32 inputs: the logits' own rounding at `|s| ≈ c`).
    #[default]
    Exp,
    /// [`TANH_13`]: within 4e-7, 35% cheaper (f16 inputs, rounded to 2⁻¹¹).
    Rational13,
    /// [`TANH_9`]: within 2e-6, 45% cheaper (bf16 inputs, rounded to 2⁻⁸, whose probabilities
    /// also enter `P·V` as bf16).
    Rational9,
}

impl Tanh {
    /// The `tanh` for inputs of `dtype`.
    pub fn for_dtype(dtype: candle_core::DType) -> Self {
        match dtype {
            candle_core::DType::BF16 => Self::Rational9,
            candle_core::DType::F16 => Self::Rational13,
            _ => Self::Exp,
        }
    }
}

/// `row[j] = c · tanh(row[j] / c)` (logit soft-capping), vectorised, with the `tanh` of `kind`;
/// NaN stays NaN, ±inf gives ±c (to the function's error). Every instruction set computes the
/// same function. (AVX-512 / AVX2 in `softmax_x86.rs`.)
pub(super) fn softcap(isa: Isa, row: &mut [f32], c: f32, kind: Tanh) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::softmax_x86 as x86;
        // SAFETY: `isa` carries the proof that the CPU runs it (`products::Detected`); AVX2 + FMA
        // implies AVX.
        unsafe {
            match (isa, kind) {
                (Isa::Avx512(_) | Isa::Avx512Bf16(_), Tanh::Exp) => {
                    return x86::softcap_avx512(row, c)
                }
                (Isa::Avx512(_) | Isa::Avx512Bf16(_), Tanh::Rational13) => {
                    return x86::softcap_rational_avx512(row, c, &TANH_13)
                }
                (Isa::Avx512(_) | Isa::Avx512Bf16(_), Tanh::Rational9) => {
                    return x86::softcap_rational_avx512(row, c, &TANH_9)
                }
                (Isa::Avx2(_), Tanh::Exp) => return x86::softcap_avx2(row, c),
                (Isa::Avx2(_), Tanh::Rational13) => {
                    return x86::softcap_rational_avx2(row, c, &TANH_13)
                }
                (Isa::Avx2(_), Tanh::Rational9) => {
                    return x86::softcap_rational_avx2(row, c, &TANH_9)
                }
                _ => {}
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    match kind {
        Tanh::Exp => softcap_impl::<false>(row, c),
        Tanh::Rational13 => TANH_13.softcap(row, c),
        Tanh::Rational9 => TANH_9.softcap(row, c),
    }
}

/// A rational `tanh(y) ≈ y · P(y²) / Q(y²)` for `|y| ≤ clamp` (`y` clamped beyond, where
/// `tanh` is ±1 to the function's error).
pub(super) struct Rational<const N: usize> {
    /// Where `y` is clamped.
    pub clamp: f32,
    /// P's coefficients, highest degree first.
    alpha: [f32; N],
    /// Q's coefficients, highest degree first.
    beta: [f32; 4],
}

/// Eigen's f32 `tanh` (a 13/6 rational, `ptanh_float`): within 4e-7 of `tanh`.
pub(super) const TANH_13: Rational<7> = Rational {
    clamp: 7.905_311,
    alpha: [
        -2.760_768_5e-16,
        2.000_188e-13,
        -8.604_672e-11,
        5.122_297e-8,
        1.485_722_4e-5,
        6.372_619e-4,
        4.893_524_6e-3,
    ],
    beta: [1.198_258_4e-6, 1.185_347e-4, 2.268_434_6e-3, 4.893_525e-3],
};

/// A 9/6 rational fitted to `tanh` on `[0, 7.25]` by `scripts/fit_tanh_rational.py`
/// (minimax by Lawson's iteration): within 2e-6 of `tanh`, clamping included.
pub(super) const TANH_9: Rational<5> = Rational {
    clamp: 7.25,
    alpha: [
        -8.181_471_5e-9,
        8.210_779e-6,
        2.828_955_2e-3,
        0.128_399_97,
        1.0,
    ],
    beta: [2.141_485_5e-4, 2.340_694_5e-2, 0.461_733_13, 1.0],
};

impl<const N: usize> Rational<N> {
    /// P's coefficients times `c` (the cap folded into the numerator), and Q's.
    pub fn scaled(&self, c: f32) -> ([f32; N], [f32; 4]) {
        (self.alpha.map(|a| a * c), self.beta)
    }

    /// `row[j] = c · tanh(row[j] / c)`, one element at a time.
    fn softcap(&self, row: &mut [f32], c: f32) {
        let (alpha, beta) = self.scaled(c);
        for x in row.iter_mut() {
            // `max`/`min` would turn NaN into the bound: clamp only numbers.
            let y = if x.is_nan() {
                *x
            } else {
                (*x / c).clamp(-self.clamp, self.clamp)
            };
            let y2 = y * y;
            let p = alpha[1..].iter().fold(alpha[0], |p, &a| p * y2 + a) * y;
            let q = beta[1..].iter().fold(beta[0], |q, &b| q * y2 + b);
            *x = p / q;
        }
    }
}

/// `row[k] −= m · |centre − k|` (ALiBi over the scores of consecutive keys; `centre` is the
/// query's position minus the first key's). (AVX-512 / AVX2 in `softmax_x86.rs`.)
pub(super) fn alibi(isa: Isa, row: &mut [f32], m: f32, centre: i32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` carries the proof that the CPU runs it (`products::Detected`).
        Isa::Avx512(_) | Isa::Avx512Bf16(_) => unsafe {
            super::softmax_x86::alibi_avx512(row, m, centre)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2(_) => unsafe { super::softmax_x86::alibi_avx2(row, m, centre) },
        _ => {
            let mut d = centre;
            for x in row.iter_mut() {
                *x -= m * d.unsigned_abs() as f32;
                d = d.wrapping_sub(1);
            }
        }
    }
}

#[inline(always)]
fn softcap_impl<const FMA: bool>(row: &mut [f32], c: f32) {
    let (inv2, cap) = (-2.0 / c, c);
    for x in row.iter_mut() {
        let e = fast_exp::<FMA>(x.abs() * inv2);
        let t = (1.0 - e) / (1.0 + e);
        // tanh keeps the sign (and NaN stays NaN through `e`).
        *x = (cap * t).copysign(*x);
    }
}

#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The constants of [`fast_exp`] and of its SIMD versions in `softmax_x86.rs` (one polynomial,
/// so that every instruction set computes the same probabilities).
pub(super) mod exp_poly {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 in two parts (Cody–Waite), for an exact `x - n·ln 2`.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// 1.5 · 2^23: adding it rounds to an integer.
    pub const MAGIC: f32 = 12_582_912.0;
    /// exp(MIN) ≈ the smallest normal f32.
    pub const MIN: f32 = -87.336_55;
    /// `exp(r) ≈ 1 + r·(c₁ + r·(c₂ + … + r·c₆))` on `|r| ≤ ln 2 / 2`, the coefficients
    /// `c₆ … c₁` (highest degree first): a minimax fit of the relative error (2e-9 in exact
    /// arithmetic; evaluated in f32 by Horner's rule, within 7.4e-8 of `exp`, where Cephes's
    /// `expf` polynomial, two instructions longer, was within 1.2e-7).
    /// `scripts/exp_poly.py` fits and checks it.
    pub const P: [f32; 6] = [
        1.384_360_1e-3,
        8.374_182e-3,
        4.166_800_5e-2,
        1.666_643e-1,
        4.999_999_4e-1,
        1.0,
    ];
}

/// The running maximum after a tile whose maximum is `tile_max` (NaN wins and sticks).
pub(super) fn running_max(tile_max: f32, m: f32) -> f32 {
    if tile_max > m || tile_max.is_nan() {
        tile_max
    } else {
        m
    }
}

/// `exp(x)` for `x <= 0` ([`exp_poly::P`], relative error ≈ 1e-7); 0 below the f32 normal
/// range and for `-inf`. Branch-free so that it vectorises.
#[inline(always)]
fn fast_exp<const FMA: bool>(x: f32) -> f32 {
    use exp_poly::{LN2_HI, LN2_LO, LOG2E, MAGIC, MIN, P};
    let xc = if x < MIN { MIN } else { x };
    let z = fma::<FMA>(xc, LOG2E, MAGIC);
    let n = z - MAGIC;
    let ni = z.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = fma::<FMA>(n, -LN2_HI, xc);
    let r = fma::<FMA>(n, -LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = fma::<FMA>(p, r, *c);
    }
    let y = fma::<FMA>(p, r, 1.0);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = y * scale;
    if x < MIN {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 1e-7 of `exp` (relative, against f64's `exp`: 7.4e-8 from the polynomial in f32,
    /// the rest from rounding `r`), over the whole range and densely near 0; 0 below the
    /// normal range. (Every 13th point under Miri, which interprets every step.)
    #[test]
    fn fast_exp_is_accurate() {
        let step = if cfg!(miri) { 13 } else { 1 };
        let coarse = (0..6600).map(|k| -90.0 + k as f32 * 0.0137);
        let fine = (0..200_000).map(|k| -(k as f32) * 5e-6);
        let mut worst = 0f64;
        for x in coarse.chain(fine).step_by(step) {
            let want = f64::from(x).exp();
            for got in [fast_exp::<false>(x), fast_exp::<true>(x)] {
                if want < f64::from(f32::MIN_POSITIVE) {
                    assert!(got < 1.2e-38, "{x}: {got} vs {want}");
                    continue;
                }
                let err = (f64::from(got) - want).abs() / want;
                worst = worst.max(err);
                assert!(err <= 1e-7, "{x}: {got} vs {want} ({err:.2e})");
            }
        }
        println!("largest relative error {worst:.2e}");
        assert_eq!(fast_exp::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp::<false>(0.0), 1.0);
    }

    /// The backward's `exp(row − lse)` on every instruction set of this CPU, bit for bit with
    /// the portable loop (with fused multiply-adds where the SIMD steps have them): rows of
    /// every length up to two vectors and a tail, entries above the shift (clamped to 1),
    /// `-inf` (0), NaN.
    #[test]
    fn exp_sub_matches_portable() {
        for isa in super::super::products::available() {
            for n in [1, 5, 16, 17, 31, 32, 33, 64, 100] {
                let row: Vec<f32> = (0..n)
                    .map(|j| match j % 11 {
                        3 => f32::NEG_INFINITY,
                        7 => f32::NAN,
                        9 => 2.0 + 1e-6,
                        _ => 2.0 - (j as f32 * 0.731) % 40.0,
                    })
                    .collect();
                let (mut a, mut b) = (row.clone(), row);
                match isa {
                    Isa::Portable => exp_sub_impl::<false>(&mut a, 2.0),
                    _ => exp_sub_impl::<true>(&mut a, 2.0),
                }
                exp_sub(isa, &mut b, 2.0);
                for (j, (x, y)) in a.iter().zip(&b).enumerate() {
                    let same = x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
                    assert!(same, "{isa:?} n={n} [{j}]: {y} vs {x}");
                }
                assert_eq!(a.get(9).copied(), (n > 9).then_some(1.0), "{isa:?}");
            }
        }
    }

    /// Soft-capping against `c · tanh(x / c)` in f64, for every `tanh` on every instruction
    /// set of this CPU: within `c` times the stated error (absolute), saturating at ±c (to the
    /// same error), NaN kept; every instruction set within 4 f32 units of `c` of the portable one.
    #[test]
    fn softcap_matches_tanh() {
        for (kind, tol) in [
            (Tanh::Exp, 2e-7),
            (Tanh::Rational13, 4e-7),
            (Tanh::Rational9, 2e-6),
        ] {
            for c in [0.5f32, 5.0, 30.0, 50.0, 2000.0] {
                // (Every 37th point under Miri, which interprets every step.)
                let step = if cfg!(miri) { 37 } else { 1 };
                let xs: Vec<f32> = (-4000..4000)
                    .step_by(step)
                    .map(|k| k as f32 * 0.037 * c / 10.0)
                    .collect();
                let mut portable = xs.clone();
                softcap(Isa::Portable, &mut portable, c, kind);
                for isa in super::super::products::available() {
                    let mut row = xs.clone();
                    row.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
                    softcap(isa, &mut row, c, kind);
                    for ((x, y), p) in xs.iter().zip(&row).zip(&portable) {
                        let want = c as f64 * (*x as f64 / c as f64).tanh();
                        let err = (*y as f64 - want).abs();
                        let ctx = format!("{kind:?} {isa:?} c={c} x={x}: {y} vs {want}");
                        assert!(err <= tol * c as f64, "{ctx}");
                        assert!(
                            (y - p).abs() <= 4.0 * f32::EPSILON * c,
                            "{ctx}, portable {p}"
                        );
                    }
                    let n = xs.len();
                    assert!(row[n].is_nan(), "{kind:?} {isa:?}");
                    assert!((row[n + 1] - c).abs() <= tol as f32 * c, "{kind:?} {isa:?}");
                    assert!((row[n + 2] + c).abs() <= tol as f32 * c, "{kind:?} {isa:?}");
                }
            }
        }
    }

    /// ALiBi on every instruction set against `x − m · |centre − k|` in f64: every tail length,
    /// centres before, inside and after the row.
    #[test]
    fn alibi_matches_formula() {
        for isa in super::super::products::available() {
            for n in [1usize, 7, 8, 15, 16, 17, 33, 256] {
                for centre in [-40i32, 0, 5, 16, 300] {
                    let m = 0.37f32;
                    let xs: Vec<f32> = (0..n).map(|k| (k as f32 * 0.7).sin()).collect();
                    let mut row = xs.clone();
                    alibi(isa, &mut row, m, centre);
                    for (k, (x, y)) in xs.iter().zip(&row).enumerate() {
                        let d = (i64::from(centre) - k as i64).abs() as f64;
                        let want = *x as f64 - m as f64 * d;
                        let err = (*y as f64 - want).abs();
                        assert!(
                            err <= 2e-7 * want.abs().max(1.0),
                            "{isa:?} n={n} centre={centre} k={k}: {y} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
