//! The AVX512-BF16 micro-kernels against float64 products of the same bf16 operands, on shapes
//! around every block edge. Skipped (with a message) on CPUs without AVX512-BF16, where the
//! kernels are never selected.

use half::bf16;

use super::*;

fn supported() -> bool {
    let ok = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16");
    if !ok {
        println!("skipped: this CPU lacks AVX512-BF16 (the kernels are never selected on it)");
    }
    ok
}

/// Deterministic bf16 values in [-2, 2) (a few of them exactly 0).
fn values(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0;
            bf16::from_f32(if s.is_multiple_of(17) { 0.0 } else { x })
        })
        .collect()
}

/// The pairs of `rows × cols` elements (even `cols`) at row stride `stride`.
fn pairs(x: &[bf16], rows: usize, cols: usize, stride: usize) -> Vec<u32> {
    (0..rows)
        .flat_map(|r| {
            (0..cols / 2).map(move |c| {
                let (a, b) = (x[r * stride + 2 * c], x[r * stride + 2 * c + 1]);
                u32::from(a.to_bits()) | u32::from(b.to_bits()) << 16
            })
        })
        .collect()
}

/// `|got - want| <= 1e-5 · (1 + Σ|terms|)`: f32 accumulation of exact products.
fn close(got: f32, want: f64, mag: f64, what: &str) {
    assert!(
        (f64::from(got) - want).abs() <= 1e-5 * (1.0 + mag),
        "{what}: got {got}, want {want} (magnitude {mag})"
    );
}

const ROWS: [usize; 8] = [1, 2, 3, 4, 5, 6, 7, 13];
const KEYS: [usize; 9] = [1, 2, 15, 16, 17, 33, 64, 65, 130];

/// `qk` (kᵀ pairs) and `qk_rows` (key rows in place, at an odd offset and a wide row stride)
/// equal the float64 scores, every column up to `bk` and nothing past the padded row.
#[test]
fn scores_match_float64() {
    if !supported() {
        return;
    }
    let shapes = ROWS
        .iter()
        .flat_map(|&nr| KEYS.iter().map(move |&bk| (nr, bk)))
        .zip([2, 4, 30, 32, 34, 64, 66, 128, 256].iter().cycle());
    for (n, ((nr, bk), &d)) in shapes.enumerate() {
        let scale = 0.3;
        let q = values(nr * d, n as u64);
        // Keys at an odd element offset with row stride d + 6 (a narrowed, unaligned view).
        let (off, ks) = (1, d + 6);
        let k = values(off + bk * ks, 1000 + n as u64);
        let key = |j: usize, x: usize| f64::from(k[off + j * ks + x].to_f32());
        let qp = pairs(&q, nr, d, d);
        let kp = pairs(&k[off..], bk, d, ks);
        // kᵀ pairs, (d/2 × bk) with row stride bk + 3.
        let s = bk + 3;
        let mut kt = vec![0u32; d / 2 * s];
        for j in 0..bk {
            for x in 0..d / 2 {
                kt[x * s + j] = kp[j * d / 2 + x];
            }
        }
        let stride = bk.div_ceil(16) * 16 + 16;
        let qm = PairMat::new(&qp, nr, d / 2, d / 2);
        for via_rows in [false, true] {
            let mut out = vec![f32::NAN; nr * stride];
            let om = MatMut::new(&mut out, nr, bk, stride);
            // SAFETY: the test runs only where the CPU has the features; `out` holds the
            // padded columns.
            unsafe {
                if via_rows {
                    let km = HalfMat::bf16(&k[off..], bk, d, ks);
                    qk_rows(qm, km, om, scale);
                } else {
                    qk(qm, PairMat::new(&kt, d / 2, bk, s), om, scale);
                }
            }
            for r in 0..nr {
                for j in 0..bk {
                    let terms = (0..d).map(|x| f64::from(q[r * d + x].to_f32()) * key(j, x));
                    let want = terms.clone().sum::<f64>() * f64::from(scale);
                    let mag = terms.map(f64::abs).sum::<f64>() * f64::from(scale);
                    let what = format!("nr={nr} bk={bk} d={d} rows={via_rows} ({r}, {j})");
                    close(out[r * stride + j], want, mag, &what);
                }
                // Nothing past the padded columns.
                assert!(out[r * stride + bk.div_ceil(16) * 16..(r + 1) * stride]
                    .iter()
                    .all(|x| x.is_nan()));
                if via_rows {
                    assert!(out[r * stride + bk..(r + 1) * stride]
                        .iter()
                        .all(|x| x.is_nan()));
                }
            }
        }
    }
}

/// `to_pairs` rounds each probability to nearest even like `half` (pairs in order, 0 after an
/// odd count), and `pv` adds `P · V` of those rounded values to the accumulator in f32.
#[test]
fn probabilities_times_values_match_float64() {
    if !supported() {
        return;
    }
    for (n, (&nr, &bk)) in ROWS
        .iter()
        .flat_map(|nr| KEYS.iter().map(move |bk| (nr, bk)))
        .enumerate()
    {
        let dv = [32, 64, 96, 128, 256][n % 5];
        // Probabilities in [0, 1] with ties and tiny values, row stride 260.
        let ps = 260;
        let mut p: Vec<f32> = values(nr * ps, n as u64)
            .iter()
            .map(|x| x.to_f32().abs() / 2.0)
            .collect();
        p[0] = f32::from_bits(0x3F00_8000); // a tie: rounds to even
        let last = p.len() - 1;
        p[ps.min(last)] = 1e-30;
        let pstride = bk.div_ceil(2) + 5;
        let mut pp = vec![u32::MAX; nr * pstride];
        // SAFETY: the test runs only where the CPU has the features.
        unsafe { to_pairs(Mat::new(&p, nr, bk, ps), &mut pp, pstride) };
        let rounded = |r: usize, j: usize| bf16::from_f32(p[r * ps + j]);
        for r in 0..nr {
            for c in 0..bk.div_ceil(2) {
                let lo = rounded(r, 2 * c).to_bits();
                let hi = if 2 * c + 1 < bk {
                    rounded(r, 2 * c + 1).to_bits()
                } else {
                    0
                };
                assert_eq!(pp[r * pstride + c], u32::from(lo) | u32::from(hi) << 16);
            }
            assert!(pp[r * pstride + bk.div_ceil(2)..(r + 1) * pstride]
                .iter()
                .all(|&x| x == u32::MAX));
        }
        // Values at an odd offset, row stride dv + 3; the accumulator starts non-zero.
        let (off, vs) = (3, dv + 3);
        let v = values(off + bk * vs, 500 + n as u64);
        let mut acc: Vec<f32> = (0..nr * dv).map(|i| (i % 7) as f32 - 3.0).collect();
        let before = acc.clone();
        // SAFETY: as above.
        unsafe {
            pv(
                PairMat::new(&pp, nr, bk.div_ceil(2), pstride),
                HalfMat::bf16(&v[off..], bk, dv, vs),
                MatMut::new(&mut acc, nr, dv, dv),
            )
        };
        for r in 0..nr {
            for c in 0..dv {
                let terms = (0..bk).map(|j| {
                    f64::from(rounded(r, j).to_f32()) * f64::from(v[off + j * vs + c].to_f32())
                });
                let want = f64::from(before[r * dv + c]) + terms.clone().sum::<f64>();
                let mag = before[r * dv + c].abs() as f64 + terms.map(f64::abs).sum::<f64>();
                close(
                    acc[r * dv + c],
                    want,
                    mag,
                    &format!("nr={nr} bk={bk} dv={dv} ({r}, {c})"),
                );
            }
        }
    }
}
