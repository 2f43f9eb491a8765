//! The backward's fused products, the probabilities ([`products::qk_t_exp`]) and the score
//! gradients ([`products::qk_t_grad`]), against their definitions in f64, on every instruction
//! set this CPU has, over tile shapes with partial register blocks and partial vectors.

use super::super::mat::{Mat, MatMut};
use super::super::products;

/// Uniform values in `[-0.5, 0.5)` from a fixed seed.
fn units() -> impl FnMut() -> f32 {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// (rows, keys, head size): whole and partial register blocks (6 rows) and vectors (16 / 8).
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 8),
    (5, 7, 16),
    (6, 16, 64),
    (7, 17, 24),
    (13, 33, 64),
    (64, 100, 72),
    (64, 128, 64),
    (64, 256, 64),
];

#[test]
fn probabilities_match_their_definition_on_every_isa() {
    let mut unit = units();
    for isa in products::available() {
        for (nr, bk, d) in SHAPES {
            let (stride, ks) = (bk.div_ceil(16) * 16 + 16, bk + 5);
            let q: Vec<f32> = (0..nr * d).map(|_| 4.0 * unit()).collect();
            let kt: Vec<f32> = (0..d * ks).map(|_| 4.0 * unit()).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let s = |r: usize, c: usize| -> f64 {
                let dot: f64 = (0..d)
                    .map(|x| q[r * d + x] as f64 * kt[x * ks + c] as f64)
                    .sum();
                scale as f64 * dot
            };
            // Each row's true log-sum-exp over the tile, and one a little below (scores above
            // it: the result clamps to exp(0) = 1, as `exp_sub` does).
            let lse: Vec<f32> = (0..nr)
                .map(|r| {
                    let m = (0..bk).map(|c| s(r, c)).fold(f64::MIN, f64::max);
                    let sum: f64 = (0..bk).map(|c| (s(r, c) - m).exp()).sum();
                    let l = (m + sum.ln()) as f32;
                    if r % 3 == 2 {
                        l - 2.0
                    } else {
                        l
                    }
                })
                .collect();
            let mut out = vec![f32::NAN; nr * stride];
            products::qk_t_exp(
                isa,
                (Mat::new(&q, nr, d, d), Mat::new(&kt, d, bk, ks)),
                &lse,
                MatMut::new(&mut out, nr, bk, stride),
                scale,
            );
            for r in 0..nr {
                for c in 0..bk {
                    let want = (s(r, c) - lse[r] as f64).min(0.0).exp();
                    let got = out[r * stride + c] as f64;
                    // The scores' f32 rounding (sums of `d` products) moves the exponent.
                    let tol = 2e-6 * (d as f64).sqrt() * want.max(1e-30) + 1e-30;
                    assert!(
                        (got - want).abs() <= tol.max(want * 2e-6),
                        "{isa:?} nr {nr} bk {bk} d {d}: ({r}, {c}) = {got}, want {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn score_gradients_match_their_definition_on_every_isa() {
    let mut unit = units();
    for isa in products::available() {
        for (nr, bk, dv) in SHAPES {
            // Row strides as in the backward: `out` and `p` share one, padded past `bk`; the
            // transposed values are a window of longer rows.
            let (stride, vs) = (bk.div_ceil(16) * 16 + 16, bk + 5);
            let g: Vec<f32> = (0..nr * dv).map(|_| unit()).collect();
            let vt: Vec<f32> = (0..dv * vs).map(|_| unit()).collect();
            let p: Vec<f32> = (0..nr * stride).map(|_| unit() + 0.5).collect();
            let delta: Vec<f32> = (0..nr).map(|_| unit()).collect();
            let mut out = vec![f32::NAN; nr * stride];
            let scale = 0.125;
            products::qk_t_grad(
                isa,
                (Mat::new(&g, nr, dv, dv), Mat::new(&vt, dv, bk, vs)),
                (Mat::new(&p, nr, bk, stride), &delta),
                MatMut::new(&mut out, nr, bk, stride),
                scale,
            );
            for r in 0..nr {
                for c in 0..bk {
                    let dp: f64 = (0..dv)
                        .map(|x| g[r * dv + x] as f64 * vt[x * vs + c] as f64)
                        .sum();
                    let want = scale as f64 * p[r * stride + c] as f64 * (dp - delta[r] as f64);
                    let got = out[r * stride + c] as f64;
                    // f32 sums of `dv` products of magnitude ≤ 0.25 each, times p ≤ 1.
                    let tol = 1e-6 * (dv as f64).sqrt() + 1e-6 * want.abs();
                    assert!(
                        (got - want).abs() <= tol,
                        "{isa:?} nr {nr} bk {bk} dv {dv}: ({r}, {c}) = {got}, want {want}"
                    );
                }
            }
        }
    }
}
