//! The quantized KV caches (int8, fp8 e4m3): each stored value within its format's bound of the
//! value appended; the fused CPU kernel reading the rows in place equals the reference reading
//! them dequantized (decode, grouped heads walking together, split over the keys, prefill against a
//! cache; every instruction set); outputs close to an f32 cache's; growth, truncation and the
//! memory it takes.

use candle_core::{DType, Device, Result, Tensor};
use candle_mha::kernels::test_support::{
    cpu_calls, cpu_fp8_tile_calls, cpu_isas, cpu_split_calls, force_cpu_isa,
};
use candle_mha::{
    Backend, KvCache, KvFormat, MhaConfig, MhaInput, MultiHeadAttention, WeightLayout,
};
use candle_nn::{VarBuilder, VarMap};

fn max_abs(a: &Tensor) -> Result<f32> {
    a.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()
}

/// Appended values come back within their format's bound: int8 within half their row's scale
/// (`max|row| / 254`), fp8 e4m3 within 2⁻⁴ of themselves plus half its smallest subnormal step
/// (`2⁻¹⁰ · max|row| / 448`).
#[test]
fn stored_values_are_within_half_a_step() -> Result<()> {
    let dev = Device::Cpu;
    for (dtype, format) in [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .flat_map(|d| [(d, KvFormat::Int8), (d, KvFormat::Fp8E4M3)])
    {
        let mut cache = KvCache::with_chunk(5).with_format(format);
        let mut all = vec![];
        for (n, amp) in [(3usize, 1.0f32), (1, 40.0), (4, 1e-3), (1, 0.0)] {
            let k = (Tensor::randn(0f32, amp.max(1e-30), (2, n, 3, 16), &dev)? * amp as f64)?
                .to_dtype(dtype)?;
            let v =
                (Tensor::randn(0f32, 1., (2, n, 3, 24), &dev)? * amp as f64)?.to_dtype(dtype)?;
            cache.append(&k, &v)?;
            all.push((k, v));
        }
        let (ks, vs) = cache.kv()?.unwrap();
        assert_eq!(ks.dtype(), dtype);
        let k = Tensor::cat(&all.iter().map(|x| &x.0).collect::<Vec<_>>(), 1)?;
        let v = Tensor::cat(&all.iter().map(|x| &x.1).collect::<Vec<_>>(), 1)?;
        for (got, want) in [(&ks, &k), (&vs, &v)] {
            let want = want.to_dtype(DType::F32)?;
            let amax = want.abs()?.max_keepdim(3)?;
            let step = match format {
                KvFormat::Int8 => (amax / 254.0)?,
                _ => (want.abs()? / 16.0)?.broadcast_add(&(amax / (448.0 * 1024.0))?)?,
            };
            let err = (got.to_dtype(DType::F32)? - &want)?.abs()?;
            // Half a step, plus the rounding of the dequantized value to the cache's dtype.
            let tol = match dtype {
                DType::F32 => 1e-6,
                _ => 8e-3,
            };
            let slack = (err.broadcast_sub(&step)? - (want.abs()? * tol)?)?;
            assert!(
                max_abs(&slack.relu()?)? <= 1e-7,
                "{dtype:?} {format:?}: a value is more than half a step off"
            );
        }
        // Zero rows stay zero.
        let last = ks.narrow(1, ks.dim(1)? - 1, 1)?;
        assert_eq!(max_abs(&last)?, 0.0);
    }
    Ok(())
}

fn module(cfg: MhaConfig, varmap: &VarMap, backend: Backend) -> Result<MultiHeadAttention> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let m = MultiHeadAttention::load(cfg.with_backend(backend), &WeightLayout::llama(), vb)?;
    Ok(m.inference())
}

/// One prefill and `steps` decode steps through `cache`; the concatenated outputs.
fn generate(
    m: &MultiHeadAttention,
    x: &Tensor,
    prefill: usize,
    cache: &mut KvCache,
    pad: Option<&[usize]>,
) -> Result<Tensor> {
    let mut outs = vec![];
    let mut inp = MhaInput::new(x.narrow(1, 0, prefill)?);
    if let Some(pad) = pad {
        inp = inp.left_padding(pad);
    }
    outs.push(m.attend_cached(&inp, cache)?.output);
    for t in prefill..x.dim(1)? {
        outs.push(
            m.attend_cached(&MhaInput::new(x.narrow(1, t, 1)?), cache)?
                .output,
        );
    }
    Tensor::cat(&outs, 1)
}

/// The fused kernel over the quantized rows agrees with the reference over the dequantized
/// rows (int8 on AVX512-VNNI: within the query rows' int16 rounding), on every instruction set: decode with all KV heads walking together, a single sequence split
/// over its keys, prefill against the cache (the transposed-K path), left padding, sliding
/// window; and both are close to an f32 cache.
#[test]
fn fused_int8_equals_reference_and_stays_near_f32() -> Result<()> {
    let dev = Device::Cpu;
    // (name, config, batch, prompt, total, left padding, window)
    type Case = (
        &'static str,
        MhaConfig,
        usize,
        usize,
        usize,
        Option<Vec<usize>>,
        Option<usize>,
    );
    let cases: Vec<Case> = vec![
        (
            "gqa decode, heads together",
            MhaConfig::llama(256, 8, 2, 32),
            2,
            300,
            304,
            Some(vec![0, 7]),
            None,
        ),
        (
            "one sequence split over its keys",
            MhaConfig::llama(128, 2, 1, 64),
            1,
            2600,
            2602,
            None,
            None,
        ),
        (
            "prefill against a cache, window",
            MhaConfig::llama(128, 4, 4, 32),
            1,
            40,
            120,
            None,
            Some(50),
        ),
    ];
    for (isa, format) in cpu_isas()
        .into_iter()
        .flat_map(|i| [(i, KvFormat::Int8), (i, KvFormat::Fp8E4M3)])
    {
        force_cpu_isa(Some(isa)).unwrap();
        for (name, cfg, b, prompt, total, pad, window) in &cases {
            let varmap = VarMap::new();
            let fused = module(cfg.clone(), &varmap, Backend::CpuFused)?;
            let reference = module(cfg.clone(), &varmap, Backend::Reference)?;
            let x = Tensor::randn(0f32, 1., (*b, *total, cfg.embed_dim), &dev)?;
            let run = |m: &MultiHeadAttention, format: KvFormat| -> Result<Tensor> {
                let mut cache = KvCache::new().with_format(format);
                match window {
                    // Prefill in chunks of 20 against the cache (L = 20 rows per call).
                    Some(w) => {
                        let mut outs = vec![];
                        for t0 in (0..*total).step_by(20) {
                            let xi = x.narrow(1, t0, 20.min(total - t0))?;
                            let inp = MhaInput::new(xi).sliding_window(*w);
                            outs.push(m.attend_cached(&inp, &mut cache)?.output);
                        }
                        Tensor::cat(&outs, 1)
                    }
                    None => generate(m, &x, *prompt, &mut cache, pad.as_deref()),
                }
            };
            let (calls, splits) = (cpu_calls(), cpu_split_calls());
            let got = run(&fused, format)?;
            assert!(
                cpu_calls() > calls,
                "{isa} {name}: the fused kernel did not run"
            );
            if name.contains("split") {
                assert!(cpu_split_calls() > splits, "{isa} {name}: not split");
            }
            let want = run(&reference, format)?;
            let exact = run(&reference, KvFormat::Native)?;
            let scale = max_abs(&exact)?;
            let d_ref = max_abs(&(&got - &want)?)? / scale;
            let d_f32 = max_abs(&(&got - &exact)?)? / scale;
            println!(
                "{isa} {format:?} {name}: fused vs reference {d_ref:.2e}, vs f32 cache {d_f32:.2e}"
            );
            // Against int8 keys on AVX512-VNNI the fused kernel quantizes the query rows to
            // int16 (one scale per row, exact integer products): a score moves by at most
            // 2⁻¹⁶ of the row's largest query value times Σ|k|, about 1e-5 of the output here.
            let same = match format {
                KvFormat::Int8 => 1e-4,
                _ => 1e-5,
            };
            assert!(
                d_ref <= same,
                "{isa} {format:?} {name}: fused vs reference on quantized rows: {d_ref}"
            );
            // int8: an absolute error of half a step per value; fp8: a relative one of up to
            // 2⁻⁴ (3 bits of mantissa), larger on these Gaussian rows.
            let bound = match format {
                KvFormat::Int8 => 2e-2,
                _ => 6e-2,
            };
            assert!(
                d_f32 <= bound,
                "{isa} {format:?} {name}: vs the f32 cache: {d_f32}"
            );
        }
    }
    force_cpu_isa(None).unwrap();
    Ok(())
}

/// bf16 queries over an fp8 cache, where the CPU multiplies bf16 by AVX512-BF16 dot products
/// and has AVX512-VBMI: the key tiles are widened to bf16 exactly and `Q · Kᵀ` runs on the
/// bf16 dot products. Against the f32 widening path (the `avx512` instruction set) on the same
/// module and cache: the same exact products summed in another order, so the outputs (bf16)
/// agree within a bf16 rounding or two; both stay near a bf16 cache. Decode with grouped heads
/// walking together (odd tile lengths from left padding), one sequence split over its keys,
/// D = 128, each after a prefill against the cache.
#[test]
fn fused_fp8_bf16_tiles_match_the_widening_path() -> Result<()> {
    let dev = Device::Cpu;
    let isas = cpu_isas();
    if !isas.contains(&"avx512bf16") || !isas.contains(&"avx512") {
        eprintln!("skipped: the bf16 tiles need AVX512-BF16 (this CPU has {isas:?})");
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    let vbmi = std::arch::is_x86_feature_detected!("avx512vbmi");
    #[cfg(not(target_arch = "x86_64"))]
    let vbmi = false;
    // (name, config, batch, prompt, total, left padding)
    let cases = [
        (
            "gqa decode",
            MhaConfig::llama(256, 8, 2, 32),
            2,
            300,
            305,
            Some(vec![0, 7]),
        ),
        (
            "split over the keys",
            MhaConfig::llama(256, 4, 2, 64),
            1,
            2600,
            2602,
            None,
        ),
        (
            "d128 decode",
            MhaConfig::llama(512, 4, 1, 128),
            1,
            200,
            203,
            None,
        ),
    ];
    for (name, cfg, b, prompt, total, pad) in &cases {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::BF16, &dev);
        let cfg = cfg.clone().with_backend(Backend::CpuFused);
        let m = MultiHeadAttention::load(cfg.clone(), &WeightLayout::llama(), vb)?.inference();
        let x =
            Tensor::randn(0f32, 1., (*b, *total, cfg.embed_dim), &dev)?.to_dtype(DType::BF16)?;
        let run = |isa: &str, format: KvFormat| -> Result<Tensor> {
            force_cpu_isa(Some(isa)).unwrap();
            let mut cache = KvCache::new().with_format(format);
            let out = generate(&m, &x, *prompt, &mut cache, pad.as_deref());
            force_cpu_isa(None).unwrap();
            out?.to_dtype(DType::F32)
        };
        let tiles = cpu_fp8_tile_calls();
        let got = run("avx512bf16", KvFormat::Fp8E4M3)?;
        let used = cpu_fp8_tile_calls() - tiles;
        let tiles = cpu_fp8_tile_calls();
        let widened = run("avx512", KvFormat::Fp8E4M3)?;
        assert_eq!(
            cpu_fp8_tile_calls(),
            tiles,
            "{name}: avx512 took the bf16 tiles"
        );
        let exact = run("avx512", KvFormat::Native)?;
        let scale = max_abs(&exact)?;
        let d_path = max_abs(&(&got - &widened)?)? / scale;
        let d_exact = max_abs(&(&got - &exact)?)? / scale;
        println!("{name}: bf16 key tiles ({used} calls) vs widening {d_path:.2e}, vs a bf16 cache {d_exact:.2e}");
        if vbmi {
            assert!(used > 0, "{name}: the bf16 tiles did not run");
        }
        assert!(
            d_path <= 4e-3,
            "{name}: bf16 key tiles vs widening: {d_path}"
        );
        assert!(d_exact <= 8e-2, "{name}: vs a bf16 cache: {d_exact}");
    }
    Ok(())
}

/// Memory: int8 rows and their f32 scales against bf16 and f32 rows; growth, truncation and
/// reset keep what is stored.
#[test]
fn memory_growth_truncate() -> Result<()> {
    let dev = Device::Cpu;
    let (b, hkv, d) = (2, 4, 128);
    let kv = |n: usize, dt: DType| -> Result<Tensor> {
        Tensor::randn(0f32, 1., (b, n, hkv, d), &dev)?.to_dtype(dt)
    };
    let mut q8 = KvCache::with_chunk(64).with_format(KvFormat::Int8);
    let mut h16 = KvCache::with_chunk(64);
    let mut f32c = KvCache::with_chunk(64);
    let (k, v) = (kv(100, DType::F32)?, kv(100, DType::F32)?);
    q8.append(&k, &v)?;
    h16.append(&k.to_dtype(DType::BF16)?, &v.to_dtype(DType::BF16)?)?;
    f32c.append(&k, &v)?;
    let ratio = q8.memory_bytes() as f64 / h16.memory_bytes() as f64;
    assert!(
        (ratio - (d as f64 + 4.0) / (2.0 * d as f64)).abs() < 1e-9,
        "{ratio}"
    );
    let mut f8 = KvCache::with_chunk(64).with_format(KvFormat::Fp8E4M3);
    f8.append(&k, &v)?;
    assert_eq!(f8.memory_bytes(), q8.memory_bytes());
    assert!(q8.memory_bytes() * 3 < f32c.memory_bytes());
    // Growth past the first chunk keeps the stored rows bit for bit.
    let before = q8.kv()?.unwrap().0;
    q8.append(&kv(50, DType::F32)?, &kv(50, DType::F32)?)?;
    assert_eq!(q8.capacity(), 192);
    let after = q8.kv()?.unwrap().0.narrow(1, 0, 100)?;
    assert_eq!(max_abs(&(&after - &before)?)?, 0.0);
    q8.truncate(60)?;
    assert_eq!(q8.kv()?.unwrap().0.dim(1)?, 60);
    assert_eq!(
        max_abs(&(q8.kv()?.unwrap().0 - before.narrow(1, 0, 60)?)?)?,
        0.0
    );
    // Another dtype into a non-empty cache is an error naming both.
    let e = q8
        .append(&kv(1, DType::BF16)?, &kv(1, DType::BF16)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("F32") && e.contains("BF16"), "{e}");
    q8.reset();
    q8.append(&kv(1, DType::BF16)?, &kv(1, DType::BF16)?)?;
    assert_eq!(q8.kv()?.unwrap().0.dtype(), DType::BF16);
    Ok(())
}
