//! The backward's fused score-gradient product ([`products::qk_t_grad`]) against its
//! definition in f64, on every instruction set this CPU has, over tile shapes with partial
//! register blocks and partial vectors.

use super::super::mat::{Mat, MatMut};
use super::super::products;

#[test]
fn score_gradients_match_their_definition_on_every_isa() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut unit = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for isa in products::available() {
        for (nr, bk, dv) in [
            (1usize, 1usize, 8usize),
            (5, 7, 16),
            (6, 16, 64),
            (7, 17, 24),
            (13, 33, 64),
            (64, 100, 72),
            (64, 128, 64),
        ] {
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
