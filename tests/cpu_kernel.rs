//! The fused CPU kernel (`Backend::CpuFused`) against the reference: random shapes, masks of
//! every kind, all dtypes, both fully-masked-row policies; and every parity case through it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_mha::case::{run_case, Case, RunOptions};
use candle_mha::kernels::test_support::{
    cpu_calls, cpu_isa, cpu_isas, cpu_split_calls, force_cpu_isa, force_gemm_isa, gemm_isa,
    set_portable_only,
};
use candle_mha::kernels::{attention, reference, AttnParams};
use candle_mha::mask::{Causal, CausalAlignment, KeyPaddingMask, MaskDims, MaskPlan};
use candle_mha::{Backend, MaskedRowPolicy};

mod support;
use support::{check_close, random_mask, random_modifiers, tolerances, Rng};

fn run_random(seed: u64, n: usize, big: bool) {
    let mut rng = Rng(seed);
    let dev = Device::Cpu;
    for it in 0..n {
        let b = 1 + rng.below(3);
        let hkv = 1 + rng.below(3);
        let g = rng.pick(&[1, 1, 2, 3, 4]);
        let h = hkv * g;
        let l = if rng.below(4) == 0 {
            1 // decode
        } else if big {
            rng.pick(&[63, 64, 65, 130, 200])
        } else {
            1 + rng.below(40)
        };
        let real_s = if big {
            rng.pick(&[1, 255, 256, 257, 600])
        } else {
            1 + rng.below(40)
        };
        let extra = if rng.below(4) == 0 {
            1 + rng.below(2)
        } else {
            0
        };
        let s = real_s + extra;
        let d = rng.pick(&[1, 3, 8, 16, 17, 32, 64, 80, 128]);
        let d = if rng.below(20) == 0 { 256 } else { d };
        let dv = if rng.below(4) == 0 {
            rng.pick(&[1, 5, 24, 64])
        } else {
            d
        };
        let dtype = rng.pick(&[DType::F32, DType::F32, DType::F16, DType::BF16]);
        let policy = rng.pick(&[MaskedRowPolicy::Zero, MaskedRowPolicy::Nan]);
        let mut desc = format!(
            "#{it} B={b} H={h} Hkv={hkv} L={l} S={real_s}+{extra} D={d} Dv={dv} {dtype:?} {policy:?}"
        );
        let mask = if rng.below(6) == 0 {
            MaskPlan::new(MaskDims::new(b, h, l, real_s))
        } else {
            random_mask(&mut rng, b, h, l, real_s, &mut desc, &dev)
        };
        let mask = if rng.below(3) == 0 {
            random_modifiers(&mut rng, mask, &mut desc, &dev)
        } else {
            mask
        };
        let t = |shape: (usize, usize, usize, usize), rng: &mut Rng| {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            Tensor::from_vec(rng.normal_vec(n), shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        // Inputs in the kernels' (B, T, heads, D) layout, often strided views: narrowed from a
        // packed projection (B, T, heads + extra, D), transposed from (B, heads, T, D), or broadcast.
        let strided = |shape: (usize, usize, usize, usize), rng: &mut Rng| {
            let (b, t_, n, d) = shape;
            match rng.below(4) {
                0 => t(shape, rng),
                3 => t((b, 1, n, d), rng).broadcast_as(shape).unwrap(), // stride 0 over T
                1 => {
                    let more = 1 + rng.below(3);
                    let at = rng.below(more + 1);
                    t((b, t_, n + more, d), rng).narrow(2, at, n).unwrap()
                }
                _ => t((b, n, t_, d), rng).transpose(1, 2).unwrap(),
            }
        };
        let q = strided((b, l, h, d), &mut rng);
        let k = strided((b, s, hkv, d), &mut rng);
        let v = strided((b, s, hkv, dv), &mut rng);
        let mut params = AttnParams::new(d);
        params.masked_rows = policy;
        if rng.below(5) == 0 {
            params.scale = 0.37;
        }
        let want = reference::attention(&q, &k, &v, &mask, &params).unwrap();
        params.backend = Backend::CpuFused;
        let got = attention(&q, &k, &v, &mask, &params).unwrap();
        assert_eq!(got.kernel, "cpu", "{desc}: not served by the fused kernel");
        let (atol, rtol) = tolerances(dtype);
        check_close(&got.output, &want.output, atol, rtol, &desc);
    }
}

#[test]
fn fused_matches_reference_small_random() {
    run_random(0x5eed_0001, 400, false);
}

#[test]
fn fused_matches_reference_multi_tile_random() {
    run_random(0x5eed_0002, 60, true);
}

/// Every instruction set this CPU has (AVX-512, AVX2 + FMA, the portable `gemm` path), each
/// forced in turn, so that CI covers each path whatever its CPU. The switch is process-wide:
/// tests that force it hold `ISA_LOCK`; other tests running meanwhile take any path, all exact.
/// Forcing the attention kernel's instruction set leaves the projections' GEMMs on theirs, and
/// the other way round.
#[test]
fn fused_every_isa_matches_reference() {
    let _guard = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gemm = gemm_isa();
    let isas = cpu_isas();
    assert!(isas.contains(&"portable"));
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        assert!(isas.contains(&"avx2"), "{isas:?}");
    }
    for (n, isa) in isas.iter().enumerate() {
        force_cpu_isa(Some(isa)).unwrap();
        assert_eq!(cpu_isa(), *isa);
        assert_eq!(
            gemm_isa(),
            gemm,
            "forcing the attention's {isa} moved the GEMM's"
        );
        println!("{isa}");
        run_random(0x5eed_0003 + n as u64, 150, false);
        run_random(0x5eed_0013 + n as u64, 20, true);
    }
    force_cpu_isa(None).unwrap();
    set_portable_only(false);
    let best = cpu_isa();
    force_gemm_isa(Some("portable")).unwrap();
    let (attention, projections) = (cpu_isa(), gemm_isa());
    force_gemm_isa(None).unwrap();
    assert_eq!((attention, projections), (best, "portable"));
    assert_eq!(gemm_isa(), gemm);
}

static ISA_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `mask` with a soft-cap of 4, small ALiBi slopes and sinks from −1.5 up, for `h` heads.
fn all_modifiers(mask: MaskPlan, h: usize) -> MaskPlan {
    let dev = Device::Cpu;
    let slopes: Vec<f32> = (0..h).map(|x| 0.01 / (x + 1) as f32).collect();
    let sinks: Vec<f32> = (0..h).map(|x| x as f32 - 1.5).collect();
    mask.with_softcap(4.0)
        .unwrap()
        .with_alibi_slopes(&Tensor::new(slopes, &dev).unwrap())
        .unwrap()
        .with_sinks(&Tensor::new(sinks, &dev).unwrap())
        .unwrap()
}

#[test]
fn fused_decode_gqa_and_long_causal() {
    let dev = Device::Cpu;
    let mut rng = Rng(7);
    // Decode: L = 1, S = 1000, H = 8 sharing 2 KV heads, D = 128, bottom-right causal + lengths.
    // Long causal top-left with sliding window over several key tiles.
    for (n, (b, h, hkv, l, s, d, causal, window)) in [
        (2, 8, 2, 1, 1000, 128, CausalAlignment::BottomRight, None),
        (1, 4, 4, 300, 700, 64, CausalAlignment::TopLeft, Some(300)),
        (1, 2, 1, 333, 333, 256, CausalAlignment::BottomRight, None),
        // Value rows 4 KiB apart (H16 D64 f32), and S ≥ 2048: the kernel copies V with each
        // head's rows contiguous for these.
        (1, 16, 16, 130, 130, 64, CausalAlignment::TopLeft, None),
        (
            1,
            2,
            2,
            70,
            2100,
            32,
            CausalAlignment::BottomRight,
            Some(900),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let q = Tensor::from_vec(rng.normal_vec(b * h * l * d), (b, l, h, d), &dev).unwrap();
        let k = Tensor::from_vec(rng.normal_vec(b * hkv * s * d), (b, s, hkv, d), &dev).unwrap();
        let v = Tensor::from_vec(rng.normal_vec(b * hkv * s * d), (b, s, hkv, d), &dev).unwrap();
        let mask = MaskPlan::build(
            MaskDims {
                batch: b,
                heads: h,
                q_len: l,
                kv_len: s,
                unbatched: false,
            },
            Some(&KeyPaddingMask::from_lengths(&vec![s - 3; b])),
            None,
            Some(Causal {
                alignment: causal,
                window,
            }),
            DType::F32,
            &dev,
        )
        .unwrap();
        // Every other one with all three score modifiers.
        let mask = if n % 2 == 1 {
            all_modifiers(mask, h)
        } else {
            mask
        };
        let mut params = AttnParams::new(d);
        let want = reference::attention(&q, &k, &v, &mask, &params).unwrap();
        params.backend = Backend::CpuFused;
        let got = attention(&q, &k, &v, &mask, &params).unwrap();
        check_close(&got.output, &want.output, 2e-5, 1e-4, "decode/long");
    }
}

/// Decoding one sequence with one or two KV heads: fewer items than worker threads, so the
/// kernel splits the keys into chunks (flash-decoding) and merges them. Against the reference
/// with padding, windows, appended keys, both dtypes; the merged log-sum-exp feeds the fused
/// backward too.
#[test]
fn split_over_keys_decoding_matches_reference() {
    let dev = Device::Cpu;
    let mut rng = Rng(11);
    for (n, (b, h, hkv, l, s, extra, window, dtype)) in [
        (1, 4, 1, 1, 5000, 0, None, DType::F32),
        (1, 8, 2, 2, 4097, 1, Some(3000), DType::F32),
        (1, 2, 1, 1, 9000, 2, None, DType::BF16),
        (1, 1, 1, 1, 2048, 0, Some(100), DType::F16),
        (1, 4, 1, 1, 5000, 0, None, DType::F32),
        (1, 8, 2, 2, 4097, 1, Some(3000), DType::BF16),
    ]
    .into_iter()
    .enumerate()
    {
        let d = 64;
        let mut t = |n: usize, shape: (usize, usize, usize, usize)| {
            Tensor::from_vec(rng.normal_vec(n), shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let q = t(b * h * l * d, (b, l, h, d));
        let k = t(b * hkv * (s + extra) * d, (b, s + extra, hkv, d));
        let v = t(b * hkv * (s + extra) * d, (b, s + extra, hkv, d));
        let mask = MaskPlan::build(
            MaskDims::new(b, h, l, s),
            Some(&KeyPaddingMask::from_lengths(&vec![s - 7; b])),
            None,
            Some(Causal {
                alignment: CausalAlignment::BottomRight,
                window,
            }),
            DType::F32,
            &dev,
        )
        .unwrap();
        // The last two with all three score modifiers: the sink joins the merged chunks once.
        let mask = if n >= 4 { all_modifiers(mask, h) } else { mask };
        let mut params = AttnParams::new(d);
        let want = reference::attention(&q, &k, &v, &mask, &params).unwrap();
        params.backend = Backend::CpuFused;
        let splits = cpu_split_calls();
        let got = attention(&q, &k, &v, &mask, &params).unwrap();
        assert!(
            cpu_split_calls() > splits,
            "the call was not split over its keys"
        );
        let (atol, rtol) = tolerances(dtype);
        check_close(&got.output, &want.output, atol, rtol, "split decode");
        // Backward through the split forward's log-sum-exp.
        let qv = candle_core::Var::from_tensor(&q).unwrap();
        let out = attention(qv.as_tensor(), &k, &v, &mask, &params).unwrap();
        let g = out.output.ones_like().unwrap();
        let grads = (out.output * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let qr = candle_core::Var::from_tensor(&q).unwrap();
        params.backend = Backend::Reference;
        let outr = attention(qr.as_tensor(), &k, &v, &mask, &params).unwrap();
        let gr = (outr.output * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, r) = (grads.get(&qv).unwrap(), gr.get(&qr).unwrap());
        check_close(a, r, atol * 10.0, rtol * 10.0, "split decode dq");
    }
}

/// Prefill over thousands of keys on every instruction set: the transposed copy of K and the
/// copy of V (as panels on AVX2) cut into tiles of keys, the appended keys (past the mask's)
/// in tiles of their own that start mid-way through a copy task's block, value widths whose
/// last panel is partial, every dtype; the output and the gradients of Q, K and V (whose
/// backward copies K and V in the same tiles) against the reference.
#[test]
fn key_tiles_and_value_panels_match_reference_on_every_isa() {
    let _guard = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let mut rng = Rng(0x7115);
    for isa in cpu_isas() {
        force_cpu_isa(Some(isa)).unwrap();
        for (b, h, hkv, l, s, extra, d, dv, dtype) in [
            (1, 2, 1, 70, 2100, 3, 32, 24, DType::F32),
            (2, 2, 2, 64, 2085, 37, 16, 5, DType::BF16),
            (1, 4, 2, 65, 2049, 300, 64, 64, DType::F16),
            (1, 3, 3, 64, 600, 0, 8, 40, DType::F32),
        ] {
            let desc =
                format!("{isa} B={b} H={h} Hkv={hkv} L={l} S={s}+{extra} D={d} Dv={dv} {dtype:?}");
            let mut t = |shape: (usize, usize, usize, usize)| {
                let n = shape.0 * shape.1 * shape.2 * shape.3;
                Tensor::from_vec(rng.normal_vec(n), shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            // The first three copy V (S ≥ 2048, L ≥ 64); the last has too few keys for that.
            let (q, k, v) = (
                t((b, l, h, d)),
                t((b, s + extra, hkv, d)),
                t((b, s + extra, hkv, dv)),
            );
            let mask = MaskPlan::build(
                MaskDims::new(b, h, l, s),
                Some(&KeyPaddingMask::from_lengths(&vec![s - 5; b])),
                None,
                Some(Causal {
                    alignment: CausalAlignment::BottomRight,
                    window: None,
                }),
                DType::F32,
                &dev,
            )
            .unwrap();
            let (atol, rtol) = tolerances(dtype);
            let run = |backend: Backend| {
                let vars = [&q, &k, &v].map(|x| candle_core::Var::from_tensor(x).unwrap());
                let mut params = AttnParams::new(d);
                params.backend = backend;
                let out = attention(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                    &mask,
                    &params,
                )
                .unwrap();
                let g = Tensor::from_vec(
                    (0..b * l * h * dv)
                        .map(|i| ((i % 7) as f32 - 3.0) / 4.0)
                        .collect::<Vec<_>>(),
                    (b, l, h, dv),
                    &dev,
                )
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
                let grads = (&out.output * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grads = vars.map(|x| grads.get(&x).unwrap().clone());
                (out, grads)
            };
            let (got, dgot) = run(Backend::CpuFused);
            let (want, dwant) = run(Backend::Reference);
            assert_eq!(got.kernel, "cpu", "{desc}: not served by the fused kernel");
            check_close(&got.output, &want.output, atol, rtol, &desc);
            for (name, (a, r)) in ["dq", "dk", "dv"].iter().zip(dgot.iter().zip(&dwant)) {
                check_close(a, r, atol * 10.0, rtol * 10.0, &format!("{desc} {name}"));
            }
        }
    }
    force_cpu_isa(None).unwrap();
}

#[test]
fn routing_rules() {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (1, 5, 2, 8), &dev).unwrap();
    let mask = MaskPlan::new(MaskDims::new(1, 2, 5, 5));
    // Weights requested: the reference serves the call even when fused is forced.
    let mut params = AttnParams::new(8);
    params.backend = Backend::CpuFused;
    params.need_weights = true;
    let out = attention(&q, &q, &q, &mask, &params).unwrap();
    assert!(out.weights.is_some());
    assert_eq!(out.kernel, "reference");
    // f64 cannot be forced through the f32 kernel: a clear error.
    let q64 = q.to_dtype(DType::F64).unwrap();
    params.need_weights = false;
    let err = attention(&q64, &q64, &q64, &mask, &params).unwrap_err();
    assert!(err.to_string().contains("CpuFused"), "{err}");
    // Auto still serves f64 (through the reference).
    params.backend = Backend::Auto;
    attention(&q64, &q64, &q64, &mask, &params).unwrap();
    // Auto on a large call uses the fused kernel.
    let big = Tensor::randn(0f32, 1., (1, 256, 4, 32), &dev).unwrap();
    let mask = MaskPlan::new(MaskDims::new(1, 4, 256, 256));
    let out = attention(&big, &big, &big, &mask, &AttnParams::new(32)).unwrap();
    assert_eq!(out.kernel, "cpu", "Auto did not pick the fused kernel");
}

/// Every parity case with the backend forced to the fused kernel (f64 cases, which the f32
/// kernel does not serve, keep `Auto`; calls asking for weights go to the reference by rule).
#[test]
fn all_parity_cases_pass_through_fused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(files.len() >= 40);
    let before = cpu_calls();
    let mut failed = vec![];
    for f in &files {
        let case = Case::load(f).unwrap();
        let f64_case = case.dtype().unwrap() == DType::F64;
        let opts = RunOptions::new(Device::Cpu)
            .with_grad(false)
            .with_backend(if f64_case {
                Backend::Auto
            } else {
                Backend::CpuFused
            });
        let r = run_case(f, &opts);
        println!("{r}");
        if !r.passed() {
            failed.push(r.to_string());
        }
    }
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    assert!(cpu_calls() > before + files.len() / 2);
}
