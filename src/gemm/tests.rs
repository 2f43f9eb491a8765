//! The packed GEMM against a float64 product, every kernel this CPU has (called directly, so
//! that no process-wide switch is needed) in every dtype it serves, on shapes around each
//! tile, block and task edge.

use half::{bf16, f16};

use super::*;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A dtype under test: converts from f32 and back to f64, with its rounding unit.
trait TestElem: Elem {
    const UNIT: f64;
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
}

impl TestElem for f32 {
    const UNIT: f64 = 1.0 / (1u64 << 24) as f64;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl TestElem for bf16 {
    const UNIT: f64 = 1.0 / 256.0;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
}

impl TestElem for f16 {
    const UNIT: f64 = 1.0 / 2048.0;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
}

/// `(M, N, K)` around the tiles (14 × 32, 6 × 16), the `K` blocks (`kc` from 64 to 512 steps,
/// bf16 pairs: odd `K`), the row and column blocks and the task split.
const SHAPES: [(usize, usize, usize); 14] = [
    (1, 1, 1),
    (1, 33, 3),
    (5, 16, 7),
    (6, 17, 16),
    (14, 32, 31),
    (15, 31, 64),
    (13, 65, 129),
    (29, 48, 300),
    (28, 64, 515),
    (100, 90, 1025),
    (240, 40, 40),
    (470, 20, 9),
    (37, 700, 33),
    (3, 5, 0),
];

fn check<T: TestElem>(kernel: Kernel, what: &str) {
    for (i, &(m, n, k)) in SHAPES.iter().enumerate() {
        let seed = 3 * i as u64 + 1;
        let x: Vec<T> = rand(m * k, seed).into_iter().map(T::from_f32).collect();
        let w: Vec<T> = rand(n * k, seed + 1).into_iter().map(T::from_f32).collect();
        let b = rand(n, seed + 2);
        for bias in [None, Some(&b[..])] {
            let pw = PackedWeight::new(kernel, &w, (n, k), k);
            let mut out = vec![T::from_f32(f32::NAN); m * n];
            gemm(&x, m, &pw, bias, &mut out, None);
            for r in 0..m {
                for j in 0..n {
                    let b0 = bias.map_or(0.0, |b| b[j] as f64);
                    let (mut exact, mut mag) = (b0, b0.abs());
                    for e in 0..k {
                        let p = x[r * k + e].to_f64() * w[j * k + e].to_f64();
                        exact += p;
                        mag += p.abs();
                    }
                    let got = out[r * n + j].to_f64();
                    let tol = exact.abs() * T::UNIT
                        + (k as f64 + 2.0) * mag / (1u64 << 24) as f64
                        + 0.5f64.powi(24);
                    assert!(
                        (got - exact).abs() <= tol,
                        "{what} {:?} ({m}, {n}, {k}) bias {}: y[{r}][{j}] = {got}, exact {exact}",
                        kernel,
                        bias.is_some()
                    );
                }
            }
        }
    }
}

#[test]
fn every_kernel_matches_float64_in_every_dtype() {
    let mut ran = 0;
    for kernel in [Kernel::Avx512F32, Kernel::Avx2F32] {
        if !kernel.supported() {
            eprintln!("{}: not on this CPU", kernel.name());
            continue;
        }
        check::<f32>(kernel, "f32");
        check::<bf16>(kernel, "bf16 widened");
        check::<f16>(kernel, "f16 widened");
        ran += 1;
    }
    if Kernel::Avx512Bf16.supported() {
        check::<bf16>(Kernel::Avx512Bf16, "bf16 pairs");
        ran += 1;
    }
    eprintln!("{ran} of 3 kernels ran");
}

/// Block sizes follow the caches: a sliver of `x` fits L1, the packed block of `x` and the
/// weight panels a sliver passes at a time L2 together, the weight block 8 MiB, and every size
/// is a whole number of tiles.
#[test]
fn blocking_fits_the_caches() {
    let (l1, l2) = cache_sizes();
    for kernel in [Kernel::Avx512F32, Kernel::Avx512Bf16, Kernel::Avx2F32] {
        let (mr, nr) = kernel.tile();
        let b = blocking(kernel);
        assert_eq!(b.mc % mr, 0, "{kernel:?} {b:?}");
        assert_eq!(b.nc % nr, 0, "{kernel:?} {b:?}");
        assert!(b.kc >= 64 && (b.kc <= 512), "{kernel:?} {b:?}");
        assert!(
            mr * b.kc * 4 <= l1 || b.kc == 64,
            "{kernel:?} {b:?} L1 {l1}"
        );
        assert!(
            b.mc * b.kc * 4 <= l2 / 2 || b.mc == mr,
            "{kernel:?} {b:?} L2 {l2}"
        );
        assert!(b.kc * b.nc * 4 <= 8 << 20 || b.nc == nr, "{kernel:?} {b:?}");
        assert!(b.nb >= 1, "{kernel:?} {b:?}");
        assert!(
            (b.nb * nr + b.mc) * b.kc * 4 <= l2 || b.nb == 1,
            "{kernel:?} {b:?} L2 {l2}: x's block and the panels a sliver passes share L2"
        );
    }
}

/// A weight of a `Var` is packed per call: an update between calls is seen.
#[test]
fn proj_packs_a_var_per_call_and_a_constant_once() -> candle_core::Result<()> {
    use candle_core::{DType, Device, Tensor, Var};
    let dev = Device::Cpu;
    if crate::proj::packed_kernel(DType::F32).is_none() {
        eprintln!("no packed f32 kernel on this CPU");
        return Ok(());
    }
    let x = Tensor::new(rand(32 * 8, 7), &dev)?.reshape((32, 8))?;
    let w0 = Tensor::new(rand(8 * 8, 8), &dev)?.reshape((8, 8))?;
    let var = Var::from_tensor(&w0)?;
    let trained = crate::proj::Proj::new(candle_nn::Linear::new(var.as_tensor().clone(), None));
    let view = trained.detached();
    let y0 = view.forward(&x)?;
    var.set(&(w0.clone() * 2.0)?)?;
    let y1 = view.forward(&x)?;
    let d = (y1 - (y0 * 2.0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d < 1e-5, "the update was not seen: {d}");

    let fixed = crate::proj::Proj::new(candle_nn::Linear::new(w0.clone(), None));
    let before = crate::proj::packed_calls();
    let a = fixed.forward(&x)?;
    let b = fixed.clone().forward(&x)?;
    assert_eq!(crate::proj::packed_calls(), before + 2);
    assert!(fixed.packed_bytes() > 0, "kept packed");
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    Ok(())
}

/// The fused two-layer product equals the two products run one after the other, bit for bit
/// (the same kernels sum each element in the same order), for every f32 kernel, with an
/// activation and a residual epilogue, on row counts around the row blocks.
#[test]
fn mlp_equals_two_gemms() {
    let act = |_: usize, row: &mut [f32]| row.iter_mut().for_each(|v| *v = v.max(0.0) * 0.5);
    let residual = |row: &mut [f32], input: &[f32]| {
        row.iter_mut()
            .zip(input)
            .for_each(|(o, i)| *o = *o * 2.0 + i)
    };
    for kernel in [Kernel::Avx512F32, Kernel::Avx2F32] {
        if !kernel.supported() {
            continue;
        }
        for &(m, k, n1) in &[
            (1usize, 24usize, 40usize),
            (15, 33, 70),
            (250, 64, 200),
            (700, 16, 48),
        ] {
            let x = rand(m * k, 11);
            let w1 = rand(n1 * k, 12);
            let w2 = rand(k * n1, 13);
            let (b1, b2) = (rand(n1, 14), rand(k, 15));
            let p1 = PackedWeight::new(kernel, &w1, (n1, k), k);
            let p2 = PackedWeight::new(kernel, &w2, (k, n1), n1);
            let mut fused = vec![f32::NAN; m * k];
            mlp(
                &x,
                m,
                (&p1, Some(&b1), &act),
                (&p2, Some(&b2), Some(&residual)),
                &mut fused,
            );
            let mut h = vec![0f32; m * n1];
            gemm(&x, m, &p1, Some(&b1), &mut h, Some(&act));
            let mut want = vec![0f32; m * k];
            gemm(&h, m, &p2, Some(&b2), &mut want, None);
            for (r, row) in want.chunks_exact_mut(k).enumerate() {
                residual(row, &x[r * k..(r + 1) * k]);
            }
            assert_eq!(fused, want, "{kernel:?} ({m}, {k}, {n1})");
        }
    }
}

/// The f32 kernels round bf16 / f16 outputs themselves: bit for bit what rounding the f32
/// product with `half` gives, including NaN, infinities, overflow, ties and subnormals (from
/// the bias), on whole and partial tiles, one and several blocks of `K`.
#[test]
fn half_outputs_round_like_half() {
    for kernel in [Kernel::Avx512F32, Kernel::Avx2F32] {
        if kernel.supported() {
            half_outputs_of(kernel);
        } else {
            eprintln!("{}: not on this CPU", kernel.name());
        }
    }
}

fn half_outputs_of(kernel: Kernel) {
    let special = [
        f32::NAN,
        f32::from_bits(0x7FFF_FFFF), // a NaN whose rounding would carry into the sign
        f32::from_bits(0x3F80_8000), // bf16 ties: to even (down) ...
        f32::from_bits(0x3F81_8000), // ... and up
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.0e38,
        -3.3e38,
        1e-40,
        -3e-39,
        6e-8,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        65520.0,
        0.0,
    ];
    for &(m, n, k) in &[(20usize, 40usize, 3usize), (15, 33, 1000), (3, 100, 0)] {
        // The first two rows of x are zero: their outputs are the bias values exactly.
        let x: Vec<f32> = rand(m * k, 5)
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i < 2 * k {
                    0.0
                } else {
                    bf16::from_f32(*v).to_f32()
                }
            })
            .collect();
        let w: Vec<f32> = rand(n * k, 6)
            .iter()
            .map(|v| bf16::from_f32(*v).to_f32())
            .collect();
        let bias: Vec<f32> = (0..n).map(|j| special[j % special.len()]).collect();
        let pw = PackedWeight::new(kernel, &w, (n, k), k);
        let mut sums = vec![0f32; m * n];
        gemm(&x, m, &pw, Some(&bias), &mut sums, None);

        let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
        let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        let pwb = PackedWeight::new(kernel, &wb, (n, k), k);
        let mut got = vec![bf16::ZERO; m * n];
        gemm(&xb, m, &pwb, Some(&bias), &mut got, None);
        for (i, (g, s)) in got.iter().zip(&sums).enumerate() {
            let want = bf16::from_f32(*s);
            let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
            assert!(
                same,
                "{kernel:?} bf16 ({m}, {n}, {k}) [{i}]: {s:e} -> {g} want {want}"
            );
        }

        let xh: Vec<f16> = x.iter().map(|v| f16::from_f32(*v)).collect();
        let wh: Vec<f16> = w.iter().map(|v| f16::from_f32(*v)).collect();
        let pwh = PackedWeight::new(kernel, &wh, (n, k), k);
        let mut goth = vec![f16::ZERO; m * n];
        gemm(&xh, m, &pwh, Some(&bias), &mut goth, None);
        for (i, (g, s)) in goth.iter().zip(&sums).enumerate() {
            let want = f16::from_f32(*s);
            let same = g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan());
            assert!(
                same,
                "{kernel:?} f16 ({m}, {n}, {k}) [{i}]: {s:e} -> {g} want {want}"
            );
        }
    }
}
