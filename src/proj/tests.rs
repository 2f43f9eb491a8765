//! The projections against float64 products, and which path each call takes.
use super::*;
use candle_core::{Device, Var};
#[cfg(target_arch = "x86_64")]
use half::bf16;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(dims: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let n = dims.iter().product();
    Tensor::from_vec(rand(n, seed), dims, &Device::Cpu)?.to_dtype(dtype)
}

fn bf16_tensor(dims: &[usize], seed: u64) -> Result<Tensor> {
    tensor(dims, seed, DType::BF16)
}

/// Checks `y` (`(M, N)` flattened) against a float64 product of the operands: within one
/// rounding to `y`'s dtype of the exact value plus f32 accumulation error.
fn check(y: &Tensor, x: &Tensor, w: &Tensor, b: Option<&Tensor>, what: &str) -> Result<()> {
    let unit = match y.dtype() {
        DType::BF16 => 1.0 / 256.0,
        DType::F16 => 1.0 / 2048.0,
        _ => 1.0 / (1u64 << 24) as f64,
    };
    let (n, k) = w.dims2()?;
    let f = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let (xv, wv, yv) = (f(x)?, f(w)?, f(y)?);
    let bv = match b {
        Some(b) => f(b)?,
        None => vec![0.0; n],
    };
    let m = xv.len() / k;
    assert_eq!(yv.len(), m * n, "{what}: output size");
    for r in 0..m {
        for j in 0..n {
            let (mut exact, mut mag) = (bv[j], bv[j].abs());
            for x in 0..k {
                exact += xv[r * k + x] * wv[j * k + x];
                mag += (xv[r * k + x] * wv[j * k + x]).abs();
            }
            let got = yv[r * n + j];
            // f16 also rounds tiny values to its subnormal spacing, 2^-24.
            let floor = if y.dtype() == DType::F16 {
                0.5f64.powi(25)
            } else {
                1e-30
            };
            let tol = exact.abs() * unit + (k as f64 + 2.0) * mag / (1u64 << 24) as f64 + floor;
            assert!(
                (got - exact).abs() <= tol,
                "{what}: y[{r}][{j}] = {got}, exact {exact} (tolerance {tol:e})"
            );
        }
    }
    Ok(())
}

/// `(M, N, K)` around the register blocks (4 × 4; AVX2 2 × 4), the 16-row L1 block and the
/// 64 × 256 task; K around the vector steps (32 bf16 / 16 f32 / AVX2 16) and the 2 KiB block
/// (1024 bf16 / 512 f32), including 1024 f32 (rows 4 KiB apart).
const SHAPES: [(usize, usize, usize); 13] = [
    (1, 1, 1),
    (1, 5, 15),
    (1, 5, 31),
    (2, 4, 16),
    (3, 4, 32),
    (4, 7, 33),
    (5, 3, 64),
    (17, 66, 95),
    (65, 70, 768),
    (8, 9, 1024),
    (70, 300, 600),
    (6, 130, 1057),
    (130, 2, 2080),
];

/// The AVX2 bf16 and f16 kernels, called directly (the dispatcher only picks them on CPUs
/// without AVX-512 (bf16: without AVX512-BF16) or with AVX2 forced, a process-wide switch
/// the parallel tests would race on).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_half_kernels_match_float64() -> Result<()> {
    use crate::kernels::cpu::gemm::{self, gemm_bt_avx2};
    use crate::kernels::cpu::gemm_avx2::Half;
    use half::f16;

    fn run<T: Half + candle_core::WithDType>(dtype: DType) -> Result<()> {
        for (i, &(m, n, k)) in SHAPES.iter().enumerate() {
            let seed = 10 * i as u64 + 5;
            let x = tensor(&[m, k], seed, dtype)?;
            let w = tensor(&[n, k], seed + 1, dtype)?;
            let b = tensor(&[n], seed + 2, dtype)?;
            let bias = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mut out = vec![T::default(); m * n];
            gemm_bt_avx2(
                &x.flatten_all()?.to_vec1::<T>()?,
                &w.flatten_all()?.to_vec1::<T>()?,
                Some(&bias),
                &mut out,
                (m, n, k),
            );
            let y = Tensor::from_vec(out, (m, n), &Device::Cpu)?;
            check(
                &y,
                &x,
                &w,
                Some(&b),
                &format!("AVX2 {dtype:?} ({m}, {n}, {k})"),
            )?;
        }
        Ok(())
    }

    if !gemm::avx2_supported() {
        eprintln!("this CPU has no AVX2 + FMA + F16C: the AVX2 kernels cannot run here");
        return Ok(());
    }
    run::<bf16>(DType::BF16)?;
    run::<f16>(DType::F16)
}

#[test]
fn gemm_matches_float64_on_every_edge_in_bf16_f16_and_f32() -> Result<()> {
    let mut ran = 0;
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        if proj_kernel(dtype).is_none() {
            eprintln!("this CPU cannot run the {dtype:?} GEMM (no AVX-512 / AVX512-BF16)");
            continue;
        }
        ran += 1;
        for (i, &(m, n, k)) in SHAPES.iter().enumerate() {
            let seed = 10 * i as u64;
            let x = tensor(&[m, k], seed, dtype)?;
            let w = tensor(&[n, k], seed + 1, dtype)?;
            let b = tensor(&[n], seed + 2, dtype)?;
            for bias in [None, Some(b)] {
                let lin = Linear::new(w.clone(), bias.clone());
                let before = fast_calls();
                let y = linear(&lin, &x)?;
                let what = format!("{dtype:?} ({m}, {n}, {k}) bias {}", bias.is_some());
                assert_eq!(fast_calls(), before + 1, "{what}: took the fast path");
                assert_eq!(y.dtype(), dtype);
                check(&y, &x, &w, bias.as_ref(), &what)?;
            }
        }
    }
    eprintln!("{ran} of 3 GEMM kernels ran");
    Ok(())
}

#[test]
fn bf16_linear_keeps_shapes_views_and_falls_back_where_it_must() -> Result<()> {
    let fast = proj_kernel(DType::BF16).is_some();
    let (e, n) = (48, 40);
    let w = bf16_tensor(&[n, e], 1)?;
    let b = bf16_tensor(&[n], 2)?;
    let lin = Linear::new(w.clone(), Some(b.clone()));
    // A (L, B, E) input read as (B, L, E): a non-contiguous view.
    let x = bf16_tensor(&[5, 3, e], 3)?.transpose(0, 1)?;
    let before = fast_calls();
    let y = linear(&lin, &x)?;
    assert_eq!(y.dims(), &[3, 5, n]);
    assert_eq!(fast_calls(), before + usize::from(fast));
    check(
        &y.flatten_to(1)?,
        &x.flatten_to(1)?,
        &w,
        Some(&b),
        "3-d view",
    )?;
    // The candle path on the same call agrees to one bf16 rounding of each of its two steps.
    let reference = lin.forward(&x)?.to_dtype(DType::F32)?;
    let diff = (y.to_dtype(DType::F32)? - &reference)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        diff <= scale / 64.0,
        "differs from Linear::forward by {diff} (scale {scale})"
    );

    // A transposed weight (GPT-2's Conv1D view), a tracked weight and an f64 call all fall back
    // from our GEMMs: f64 to `Linear::forward` itself, bf16 to the same widened to f32 and
    // rounded once (PyTorch's numerics; candle's bf16 matmul rounds twice).
    let wt = w.t()?.contiguous()?.t()?;
    let var = Var::from_tensor(&w)?;
    let x64 = x.to_dtype(DType::F64)?;
    let cases: [(&str, Linear, &Tensor); 3] = [
        ("transposed weight", Linear::new(wt, Some(b.clone())), &x),
        (
            "tracked weight",
            Linear::new(var.as_tensor().clone(), Some(b.clone())),
            &x,
        ),
        ("f64", Linear::new(w.to_dtype(DType::F64)?, None), &x64),
    ];
    for (what, lin, x) in cases {
        let before = fast_calls();
        let y = linear(&lin, x)?;
        assert_eq!(fast_calls(), before, "{what}: fell back");
        let want = if x.dtype() == DType::BF16 {
            let wide = |t: &Tensor| t.to_dtype(DType::F32);
            let lin32 = Linear::new(wide(lin.weight())?, lin.bias().map(wide).transpose()?);
            lin32.forward(&wide(x)?)?.to_dtype(DType::BF16)?
        } else {
            lin.forward(x)?
        };
        let d = (y - want)?
            .abs()?
            .to_dtype(DType::F32)?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{what}: same as Linear::forward in f32");
    }
    Ok(())
}

/// No input features (K = 0): the output is the bias, through candle's path (the rows of `x`
/// cannot be counted from its elements), for a kept-packed projection too.
#[test]
fn zero_features_give_the_bias() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((3, 20, 0), DType::F32, &dev)?;
    let w = Tensor::zeros((5, 0), DType::F32, &dev)?;
    let b = Tensor::new(&[1f32, 2., 3., 4., 5.], &dev)?;
    let p = Proj::new(Linear::new(w, Some(b.clone())));
    let y = p.forward(&x)?;
    assert_eq!(y.dims(), &[3, 20, 5]);
    let want = b.broadcast_as((3, 20, 5))?;
    let d = (y - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    Ok(())
}
